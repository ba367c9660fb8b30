"""lesions.csv (one row per lesion) from report.json; the batch runner reuses it for summary.csv."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

CSV_COLUMNS: list[str] = [
    "study", "lesion_id", "volume_ml", "max_diameter_mm", "mean_hu", "type", "location",
    "min_distance_to_canal_mm", "canal_contact", "primary", "options", "flags", "borderline",
]


def study_label(report: dict[str, Any]) -> str:
    """The study's name in a row: StudyInstanceUID (pseudonym when de-identified) or the input's
    stem (as ``Volume.study_key``, i.e. the output folder name)."""
    uid = (report.get("series") or {}).get("study_instance_uid")
    if uid:
        return str(uid)
    name = Path(str((report.get("input") or {}).get("path", ""))).name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name or "study"


def lesion_rows(report: dict[str, Any], study: str | None = None) -> list[dict[str, Any]]:
    """Rows keyed by ``CSV_COLUMNS``; lists joined with ";", missing values as ""."""
    name = study if study is not None else study_label(report)
    rows = []
    for les in report.get("lesions", []):
        rec = les.get("recommendation") or {}
        borderline = rec.get("borderline")
        if isinstance(borderline, dict):
            borderline = borderline.get("value", False)
        rows.append({
            "study": name,
            "lesion_id": les.get("id"),
            "volume_ml": _cell(les.get("volume_ml")),
            "max_diameter_mm": _cell(les.get("max_diameter_mm")),
            "mean_hu": _cell(les.get("mean_hu")),
            "type": _cell(les.get("type")),
            "location": _cell(les.get("location")),
            "min_distance_to_canal_mm": _cell(les.get("min_distance_to_canal_mm")),
            "canal_contact": _cell(les.get("canal_contact")),
            "primary": _cell(rec.get("primary")),
            "options": ";".join(str(o) for o in rec.get("options", [])),
            "flags": ";".join(str(f) for f in rec.get("flags", [])),
            "borderline": _cell(bool(borderline)),
        })
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows with a header, columns in ``CSV_COLUMNS`` order."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
