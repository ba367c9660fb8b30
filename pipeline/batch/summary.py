"""``OUT/summary.csv``: one row per lesion over every finished (ok) study in OUT.

Built from the manifests (latest line per fingerprint) and each study's report.json, with the
columns of ``pipeline.report.csv_out.CSV_COLUMNS``; written to a temp file, then renamed.
Studies are ordered by output folder, lesions by id.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import uuid
from pathlib import Path

from pipeline.batch.manifest import latest_by_fingerprint, read_entries
from pipeline.report.csv_out import CSV_COLUMNS, lesion_rows

log = logging.getLogger("osteoplan.batch")

SUMMARY = "summary.csv"


def write_summary(out: Path) -> tuple[Path, int]:
    """Write OUT/summary.csv atomically; returns (path, number of lesion rows)."""
    out = Path(out)
    entries = [e for e in latest_by_fingerprint(read_entries(out)).values() if e.get("status") == "ok"]
    entries.sort(key=lambda e: (str(e.get("output")), str(e.get("fingerprint"))))
    rows = []
    seen: set[str] = set()
    for e in entries:
        output = str(e.get("output") or "")
        if not output or output in seen:
            continue
        seen.add(output)
        try:
            report = json.loads((out / output / "report.json").read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("summary: report.json of %s missing or unreadable; skipped", output)
            continue
        rows.extend(lesion_rows(report, str(e.get("study") or Path(output).name)))
    path = out / SUMMARY
    tmp = out / f".{SUMMARY}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path, len(rows)
