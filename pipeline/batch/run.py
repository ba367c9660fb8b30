"""run_batch(): discover -> shard -> resume filter -> run (local or Ray) -> manifest + summary.

Exit code (``BatchResult.exit_code``): 0 when every study of this run (this shard) finished,
1 when some failed; each failure is a manifest line with its reason. A bad study never stops
the run; only problems that stop every study (no model, bad options) raise.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.batch.discover import Study, discover_studies
from pipeline.batch.fingerprint import fingerprint, options_digest
from pipeline.batch.manifest import ManifestEntry, append_entry, cleanup_stale, compact, finished, \
    manifest_path, read_entries
from pipeline.batch.progress import make_progress
from pipeline.batch.shard import Shard, select
from pipeline.batch.summary import write_summary
from pipeline.batch.worker import BatchSettings, Task
from pipeline.errors import InputError
from pipeline.logs import anon
from pipeline.study import StudyOptions, _safe_name

log = logging.getLogger("osteoplan.batch")

DUP_DIR = "_dup"
SHARED_OUT_STALE_S = 1800.0  # with --shard, other machines may be writing: spare recent temp folders


@dataclass
class BatchOptions:
    workers: int = 1
    shard: Shard | None = None
    resume: bool = False
    ray: str | None = None  # None: local; "local" | "auto" | an address
    quiet: bool = False
    prefetch: int = 2
    runner_factory: str = "pipeline.study:StudyRunner"
    loader: str = "pipeline.batch.worker:load_study"


@dataclass
class BatchResult:
    found: int  # studies discovered under the root
    selected: int  # in this shard
    skipped: int  # already done (resume)
    ok: int = 0
    failed: int = 0
    manifest: Path | None = None
    summary: Path | None = None
    removed_stale: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_batch(root: Path, out: Path, options: StudyOptions, batch: BatchOptions | None = None) -> BatchResult:
    """Analyse every study under ``root`` into ``out`` (see module docstring)."""
    batch = batch or BatchOptions()
    if batch.workers < 1:
        raise InputError("--workers must be >= 1")
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    removed = cleanup_stale(out, min_age_s=SHARED_OUT_STALE_S if batch.shard else 0.0)
    if removed:
        log.info("removed %d stale temporary entries left by an interrupted run", len(removed))

    t0 = time.perf_counter()
    studies, stats = discover_studies(root, exclude=[out])
    log.info("discovery: %d files, %d DICOM, %d skipped as non-DICOM, %d unreadable headers, "
             "%d duplicate instances -> %d studies (%.1f s)", stats.files_seen, stats.dicom_files,
             stats.non_dicom_skipped, stats.unreadable_headers, stats.duplicate_instances, len(studies),
             time.perf_counter() - t0)
    for note in stats.notes:
        log.warning("discovery: %s", note)
    if not studies:
        raise InputError(f"no studies found under {root} (looked for DICOM, NIfTI and zip files)")
    studies = assign_output_dirs(studies)
    mine = select(studies, batch.shard)

    digest = options_digest(result_settings(options))
    tasks = _unique_tasks(mine)
    skipped = 0
    if batch.resume:
        done = finished(out, read_entries(out))
        before = len(tasks)
        tasks = [t for t in tasks if (t.fingerprint, digest) not in done]
        skipped = before - len(tasks)
    result = BatchResult(found=len(studies), selected=len(mine), skipped=skipped,
                         manifest=manifest_path(out, batch.shard), removed_stale=removed)
    settings = BatchSettings(out=out, options=options, options_digest=digest, run_id=uuid.uuid4().hex[:12],
                             prefetch=batch.prefetch, runner_factory=batch.runner_factory, loader=batch.loader)
    assert result.manifest is not None
    manifest = result.manifest
    manifest.touch()  # even a shard that owns no study leaves its (empty) manifest: it ran

    progress = make_progress(len(tasks), skipped, batch.quiet)

    def on_result(entry: ManifestEntry) -> None:
        append_entry(manifest, entry)
        if entry.status == "ok":
            result.ok += 1
        else:
            result.failed += 1
        progress.update(entry)

    try:
        if batch.ray:
            from pipeline.batch.ray_backend import run_ray

            run_ray(tasks, settings, batch.ray, batch.workers if batch.workers > 1 else None, on_result)
        else:
            from pipeline.batch.local import run_local

            run_local(tasks, settings, batch.workers, on_result)
    finally:
        progress.close()
        if manifest.exists():
            compact(manifest)
        result.summary, n_rows = write_summary(out)
        log.info("batch: ok=%d failed=%d skipped=%d; summary.csv %d lesion rows", result.ok, result.failed,
                 skipped, n_rows)
    return result


def result_settings(options: StudyOptions) -> dict:
    """The options that change a study's results (resume redoes a study when they change)."""
    return {
        "model": options.model or "(config default)",
        "fast": bool(options.fast),
        "intent": options.intent,
        "formats": tuple(options.formats),
        "deidentify": bool(options.deidentify),
        "series_uid": options.series_uid or "",
        "inference_config": options.inference_config or "",
        "rules_config": options.rules_config or "",
    }


def assign_output_dirs(studies: list[Study]) -> list[Study]:
    """Give each study its own output folder: when several would land in OUT/<same name>
    (two NIfTI files with one stem; a zip holding a study also found as loose files), all but
    the first (by shard key) go to OUT/_dup/<hash of shard key>/<name>. Depends on the whole
    discovery only, so every shard decides the same."""
    groups: dict[str, list[Study]] = defaultdict(list)
    for s in studies:
        try:
            groups[_safe_name(s.key)].append(s)
        except InputError:
            groups[s.key].append(s)
    out = []
    for name in sorted(groups):
        items = sorted(groups[name], key=lambda s: s.shard_key)
        out.append(items[0])
        for s in items[1:]:
            sub = f"{DUP_DIR}/{hashlib.sha256(s.shard_key.encode()).hexdigest()[:12]}"
            log.warning("study %s: output name already taken by another input; writing under %s",
                        anon(s.key), sub)
            out.append(s.with_out_subdir(sub))
    out.sort(key=lambda s: (s.key, s.shard_key))
    return out


def _unique_tasks(studies: list[Study]) -> list[Task]:
    """Tasks with fingerprints; identical inputs (same fingerprint) are done once."""
    tasks: list[Task] = []
    seen: set[str] = set()
    for s in studies:
        try:
            fp = fingerprint(s)
        except OSError as exc:
            fp = f"{s.kind}:unreadable:{s.shard_key}"
            log.warning("study %s: cannot fingerprint (%s)", anon(s.key), type(exc).__name__)
        if fp in seen:
            log.warning("study %s: identical to another input; done once", anon(s.key))
            continue
        seen.add(fp)
        tasks.append(Task(s, fp))
    return tasks
