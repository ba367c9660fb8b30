"""``OUT/manifest.jsonl``: one JSON line per study, appended as each study ends.

Each line is written with one ``write`` followed by flush + fsync, so a killed run leaves at
most one torn last line, which the reader skips. At the end of a run the file is compacted
(latest line per input fingerprint, written to a temp file and renamed into place), so it
holds one line per study. With ``--shard K/N`` each shard appends to its own
``manifest.shard-K-of-N.jsonl`` (no two machines ever append to one file); readers take all
``manifest*.jsonl`` files in OUT together.

Line fields: ``study`` (output folder name), ``kind``, ``input`` (relative to the input root),
``fingerprint``, ``options`` (digest of result-changing options), ``status`` (ok | failed),
``reason`` (one line, no patient identity; null when ok), ``output`` (study folder relative to
OUT; null when failed), ``n_lesions``, ``timings_s`` (load, run, total; seconds), ``attempts``,
``worker``, ``run_id``, ``finished_at`` (UTC, ISO 8601).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from pipeline.batch.shard import Shard

log = logging.getLogger("osteoplan.batch")

MANIFEST = "manifest.jsonl"
TMP_DIR_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]+$")  # StudyRunner's temp/old study folders
TMP_FILE_RE = re.compile(r"^\..+\.[0-9a-f]{8,}\.tmp$")  # atomic-write temp files
MAX_REASON = 300


@dataclass
class ManifestEntry:
    study: str
    kind: str
    input: str
    fingerprint: str
    options: str
    status: str  # ok | failed
    reason: str | None = None
    output: str | None = None
    n_lesions: int | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    attempts: int = 1
    worker: str = ""
    run_id: str = ""
    finished_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False, separators=(",", ":"))


def manifest_path(out: Path, shard: Shard | None) -> Path:
    if shard is None:
        return Path(out) / MANIFEST
    return Path(out) / f"manifest.shard-{shard.index}-of-{shard.count}.jsonl"


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def append_entry(path: Path, entry: ManifestEntry) -> None:
    """Append one line durably (one write, flush, fsync)."""
    line = entry.to_json() + "\n"
    if os.path.exists(path) and os.path.getsize(path) > 0 and not _ends_with_newline(path):
        line = "\n" + line  # a killed run left a torn line: start a fresh one
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with os.fdopen(fd, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_entries(out: Path) -> list[dict[str, Any]]:
    """Every well-formed line of every manifest in OUT, oldest first (torn lines skipped)."""
    entries: list[dict[str, Any]] = []
    for path in sorted(Path(out).glob("manifest*.jsonl")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and "fingerprint" in item and "status" in item:
                entries.append(item)
    entries.sort(key=lambda e: str(e.get("finished_at", "")))  # stable: file order within a second
    return entries


def latest_by_fingerprint(entries: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for e in entries:
        latest[str(e["fingerprint"])] = e
    return latest


def finished(out: Path, entries: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(fingerprint, options digest) -> entry, for studies whose latest line is ok and whose
    report.json is still in place."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for fp, e in latest_by_fingerprint(entries).items():
        if e.get("status") == "ok" and e.get("output") and (Path(out) / e["output"] / "report.json").is_file():
            done[(fp, str(e.get("options", "")))] = e
    return done


def compact(path: Path) -> None:
    """Rewrite ``path`` with the latest line per fingerprint (temp file + rename)."""
    if not path.exists():
        return
    entries = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and "fingerprint" in item:
            entries.append(item)
    latest = latest_by_fingerprint(entries)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        for e in latest.values():
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cleanup_stale(out: Path, min_age_s: float = 0.0) -> list[str]:
    """Remove temp study folders and temp files left by a killed run, in OUT and OUT/_dup/*.

    ``min_age_s`` > 0 spares entries modified more recently (other shards may be writing).
    Returns the names removed.
    """
    removed: list[str] = []
    now = time.time()
    folders = [Path(out)]
    dup = Path(out) / "_dup"
    if dup.is_dir():
        folders += [p for p in dup.iterdir() if p.is_dir()]
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            is_dir = entry.is_dir() and TMP_DIR_RE.match(entry.name)
            is_file = entry.is_file() and TMP_FILE_RE.match(entry.name)
            if not (is_dir or is_file):
                continue
            try:
                if min_age_s > 0 and now - entry.stat().st_mtime < min_age_s:
                    continue
                if is_dir:
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry.name)
            except FileNotFoundError:
                continue
    return removed


def safe_reason(exc: BaseException | str) -> str:
    """One line for the manifest: the error's message without file paths (they may name patients)."""
    from pipeline.errors import OsteoplanError

    if isinstance(exc, BaseException):
        text = str(exc).strip()
        if not isinstance(exc, OsteoplanError):
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    else:
        text = str(exc)
    text = " ".join(text.split())
    text = re.sub(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:]+)+[\\/]?", "<path>", text)
    text = re.sub(r"'[^']*<path>[^']*'", "<path>", text)
    return text[:MAX_REASON] or "unknown error"


def _ends_with_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except OSError:
        return True
