"""report.json: the machine-readable result of one study (contract in DESIGN.md).

Units: millimetres for lengths and coordinates (LPS, DICOM patient space), millilitres for
volumes, Hounsfield units for densities, seconds for timings. Floats are rounded (mm to 0.01,
ml to 0.001, HU to 0.1) and every value is a plain Python type, so ``json.dumps`` always works.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline import DISCLAIMER
from pipeline.logs import anon
from pipeline.types import CanalSummary, Lesion, Recommendation, Segmentation, Volume

SCHEMA_VERSION = "1.0"


def build_report(volume: Volume, seg: Segmentation, lesions: list[Lesion], recs: list[Recommendation],
                 canal: CanalSummary, *, intent: str, timings: dict[str, float], fast: bool,
                 deidentify: bool, rules: Any = None) -> dict[str, Any]:
    """Assemble report.json. ``recs[n]`` is the recommendation for ``lesions[n]``.

    ``timings`` is stored by reference (not copied): the caller keeps adding stages to it.
    With ``deidentify`` the UIDs become ``anon()`` pseudonyms and the input path its bare name.
    """
    if len(recs) != len(lesions):
        raise ValueError(f"{len(lesions)} lesions but {len(recs)} recommendations")
    return {
        "schema_version": SCHEMA_VERSION,
        "input": _input_block(volume, deidentify),
        "series": _series_block(volume, deidentify),
        "model": {
            "name": seg.model.name,
            "version": seg.model.version,
            "sha256": seg.model.sha256,
            "spacing_mm": [_r(s, 4) for s in seg.model.spacing_mm],
        },
        "device": str(seg.device),
        "postprocess": to_jsonable(seg.postprocess),
        "intent": intent,
        "fast": bool(fast),
        "rules": ({"version": str(rules.version), "sha256": str(rules.sha256),
                   "file": Path(str(rules.path)).name} if rules is not None else None),
        "deidentified": bool(deidentify),
        "canal": {"found": bool(canal.found), "volume_ml": _r(canal.volume_ml, 3)},
        "lesions": [lesion_entry(les, rec) for les, rec in zip(lesions, recs)],
        "warnings": [str(w) for w in volume.warnings],
        "timings_s": timings,
        "disclaimer": DISCLAIMER,
    }


def lesion_entry(les: Lesion, rec: Recommendation) -> dict[str, Any]:
    """One ``lesions[]`` item."""
    return {
        "id": int(les.id),
        "voxel_count": int(les.voxel_count),
        "volume_ml": _r(les.volume_ml, 3),
        "max_diameter_mm": _r(les.max_diameter_mm, 2),
        "mean_hu": _r(les.mean_hu, 1),
        "type": str(les.type),
        "location": str(les.location),
        "bone_reference_hu": _r(les.bone_reference_hu, 1),
        "centroid_lps_mm": _point(les.centroid_lps_mm),
        "min_distance_to_canal_mm": _r(les.min_distance_to_canal_mm, 2),
        "distance_uncertainty_mm": _r(les.distance_uncertainty_mm, 2),
        "closest_point_lesion_lps_mm": _point(les.closest_point_lesion_lps_mm),
        "closest_point_canal_lps_mm": _point(les.closest_point_canal_lps_mm),
        "canal_contact": bool(les.canal_contact),
        "solitary": bool(les.solitary),
        "bbox_ijk": [[int(v) for v in les.bbox_ijk[0]], [int(v) for v in les.bbox_ijk[1]]],
        "features": to_jsonable(les.features),
        "recommendation": {
            "primary": str(rec.primary),
            "options": [str(o) for o in rec.options],
            "flags": [str(f) for f in rec.flags],
            "rationale": [{"rule": str(c.rule), "text": str(c.text), "source": str(c.source)}
                          for c in rec.rationale],
            "borderline": to_jsonable(rec.borderline),
        },
    }


def _input_block(volume: Volume, deidentify: bool) -> dict[str, Any]:
    path = str(volume.input_path)
    if deidentify:
        path = Path(path).name
    return {"path": path, "kind": volume.input_kind}


def _series_block(volume: Volume, deidentify: bool) -> dict[str, Any]:
    g = volume.geometry
    src = volume.dicom

    def uid(value: str | None) -> str | None:
        if not value:
            return None
        return anon(value) if deidentify else value

    block: dict[str, Any] = {
        "study_instance_uid": uid(src.study_instance_uid) if src else None,
        "series_instance_uid": uid(src.series_instance_uid) if src else None,
        "frame_of_reference_uid": uid(src.frame_of_reference_uid) if src else None,
        "modality": src.modality if src else None,
        "series_description": (src.series_description if src and not deidentify else None),
        "series_number": (int(src.series_number) if src and src.series_number is not None else None),
        "n_instances": len(src.sop_instance_uids) if src else None,
        "size": [int(s) for s in g.shape],
        "spacing_mm": [_r(s, 4) for s in g.spacing],
        "origin_lps_mm": [_r(o, 3) for o in g.origin],
        "direction": [[_r(v, 6) for v in row] for row in np.asarray(g.direction).tolist()],
        "selection": _scrub(to_jsonable(volume.selection), deidentify),
    }
    return block


def _scrub(obj: Any, deidentify: bool) -> Any:
    """With ``deidentify``: pseudonymise UID-valued keys and reduce path-valued keys to names."""
    if not deidentify:
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = str(k).lower()
            if "uid" in key and isinstance(v, str):
                out[k] = anon(v)
            elif "uid" in key and isinstance(v, list):
                out[k] = [anon(x) if isinstance(x, str) else _scrub(x, True) for x in v]
            elif key in ("path", "folder", "file", "files", "dir", "directory") and isinstance(v, str):
                out[k] = Path(v).name
            elif key in ("patient_name", "patient_id", "patient_birth_date", "patientname", "patientid",
                         "accession_number", "study_date", "series_date", "institution_name",
                         "series_description"):  # free text, as the top-level series_description
                continue
            else:
                out[k] = _scrub(v, True)
        return out
    if isinstance(obj, list):
        return [_scrub(v, True) for v in obj]
    return obj


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays, tuples, sets and Paths -> plain JSON types (NaN/inf -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _r(value: float | None, ndigits: int) -> float | None:
    if value is None:
        return None
    f = float(value)
    if not math.isfinite(f):
        return None
    r = round(f, ndigits)
    return 0.0 if r == 0 else r  # no "-0.0"


def _point(p: Iterable[float] | None) -> list[float] | None:
    if p is None:
        return None
    return [_r(v, 2) for v in p]  # type: ignore[misc]
