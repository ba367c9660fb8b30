"""End-to-end evaluation helpers: compare a study's outputs with a phantom's exact truth.

Everything is compared in patient space (LPS mm): the pipeline may store its label map on a grid
whose axes are permuted/flipped relative to the truth grid (the loader sorts slices along the
normal), so predicted labels are mapped onto the truth grid by LPS position (nearest voxel; exact
when both grids are the same lattice, as they are for a DICOM round trip).

Used by ``tests/test_e2e_*.py`` and ``scripts/acceptance.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.types import CANAL, LESION, Geometry

_CUBE = np.ones((3, 3, 3), bool)

# acceptance thresholds (issue 2, "Done when")
DISTANCE_TOL_VOXELS = 1.5
MIN_CANAL_DICE = 0.85
MAX_FALSE_POSITIVES = 1


def geometry_from_affine_lps(affine_lps: np.ndarray, shape: tuple[int, ...]) -> Geometry:
    a = np.asarray(affine_lps, float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    return Geometry(shape=tuple(int(s) for s in shape[:3]), spacing=tuple(spacing), origin=tuple(a[:3, 3]),
                    direction=a[:3, :3] / spacing[None, :])


def read_label_nifti(path: Path) -> tuple[np.ndarray, Geometry]:
    """segmentation.nii.gz -> (uint8 labels, LPS Geometry), with nibabel only (RAS -> LPS)."""
    import nibabel as nib

    img = nib.load(str(path))
    labels = np.asarray(img.dataobj).astype(np.uint8)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, float)
    return labels, geometry_from_affine_lps(affine_lps, labels.shape)


def map_to_grid(labels: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Nearest-voxel resampling of ``labels`` (on ``src``) onto ``dst``, by LPS position; 0 outside."""
    # index_src = A (index_dst) + b, both affine maps are exact
    a_src = src.affine_lps
    a_dst = dst.affine_lps
    m = np.linalg.inv(a_src) @ a_dst
    out = np.zeros(dst.shape, np.uint8)
    ii, jj = np.meshgrid(np.arange(dst.shape[0]), np.arange(dst.shape[1]), indexing="ij")
    for k in range(dst.shape[2]):
        idx = [np.rint(m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * k + m[r, 3]).astype(np.int64) for r in range(3)]
        ok = np.ones(ii.shape, bool)
        for r in range(3):
            ok &= (idx[r] >= 0) & (idx[r] < src.shape[r])
        sl = np.zeros(ii.shape, np.uint8)
        sl[ok] = labels[idx[0][ok], idx[1][ok], idx[2][ok]]
        out[:, :, k] = sl
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def lesion_masks_from_report(labels: np.ndarray, report: dict[str, Any]) -> dict[int, np.ndarray]:
    """Report lesion id -> (n, 3) voxel indices of its connected component on the prediction grid.

    Components are the 26-connected components of label 2; each report lesion is identified by
    its ``bbox_ijk`` and ``voxel_count`` (exactly what the measurement step saw).
    """
    comp, _ = ndimage.label(labels == LESION, structure=_CUBE)
    boxes = ndimage.find_objects(comp)
    out: dict[int, np.ndarray] = {}
    for les in report.get("lesions", []):
        lo, hi = les["bbox_ijk"]
        found = None
        for n, box in enumerate(boxes, start=1):
            if box is None:
                continue
            if [s.start for s in box] == list(lo) and [s.stop for s in box] == list(hi):
                idx = np.argwhere(comp[box] == n) + np.asarray(lo)
                if len(idx) == int(les["voxel_count"]):
                    found = idx
                    break
        if found is None:
            raise AssertionError(f"report lesion {les['id']} has no matching component in segmentation.nii.gz")
        out[int(les["id"])] = found
    return out


def oracle_report(volume: Any, labels: np.ndarray, intent: str = "palliative") -> dict[str, Any]:
    """report.json for ``volume`` with ``labels`` (on its grid) as the segmentation, no model.

    The real measurement, rule engine and report builder; the 'model' is the truth. Returns the
    report as plain JSON types (as written to disk).
    """
    from pipeline.config import load_inference_config
    from pipeline.measure.lesions import measure_lesions
    from pipeline.plan.engine import load_rules, plan_study
    from pipeline.report.json_report import build_report
    from pipeline.types import ModelInfo, Segmentation

    seg = Segmentation(np.asarray(labels, np.uint8), volume.geometry, ModelInfo("truth", "0", "-", (1.5, 1.5, 1.5)))
    rules = load_rules(None)
    lesions, canal = measure_lesions(volume, seg, load_inference_config(None).postprocess, rules)
    recs = plan_study(lesions, rules, intent)
    report = build_report(volume, seg, lesions, recs, canal, intent=intent, timings={"total": 0.0}, fast=False,
                          deidentify=False, rules=rules)
    return json.loads(json.dumps(report))


@dataclass
class LesionRow:
    """One true lesion and the predicted lesion matched to it (by overlap)."""

    study: str
    true_index: int
    kind: str
    band: str
    found: bool
    pred_id: int | None
    overlap_voxels: int
    pred_type: str | None
    distance_true_mm: float
    distance_pred_mm: float | None
    error_mm: float | None
    error_voxels: float | None
    distance_ok: bool
    primary_true: str
    primary_pred: str | None
    primary_ok: bool
    closest_point_true_lps_mm: list[float] = field(default_factory=list)
    closest_point_pred_lps_mm: list[float] | None = None


@dataclass
class StudyEval:
    study: str
    canal_dice: float
    bone_dice: float
    lesion_dice: float
    rows: list[LesionRow]
    false_positive_ids: list[int]
    spacing_mm: list[float]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["rows"] = [r.__dict__ for r in self.rows]
        return d


def evaluate_study(study_dir: Path, truth: dict[str, Any], true_labels: np.ndarray,
                   true_instances: np.ndarray, true_geom: Geometry, name: str = "") -> StudyEval:
    """Compare one study's outputs (report.json + segmentation.nii.gz) with the truth."""
    report = json.loads((Path(study_dir) / "report.json").read_text())
    pred, pgeom = read_label_nifti(Path(study_dir) / "segmentation.nii.gz")
    return evaluate_prediction(report, pred, pgeom, truth, true_labels, true_instances, true_geom, name)


def evaluate_prediction(report: dict[str, Any], pred: np.ndarray, pgeom: Geometry, truth: dict[str, Any],
                        true_labels: np.ndarray, true_instances: np.ndarray, true_geom: Geometry,
                        name: str = "") -> StudyEval:
    on_truth = map_to_grid(pred, pgeom, true_geom)
    masks = lesion_masks_from_report(pred, report)
    # each predicted lesion's voxels -> truth grid indices -> true instance overlaps
    m = np.linalg.inv(true_geom.affine_lps) @ pgeom.affine_lps
    overlaps: dict[int, dict[int, int]] = {}
    for lid, idx in masks.items():
        t = np.rint(idx @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
        ok = np.all((t >= 0) & (t < np.asarray(true_geom.shape)), axis=1)
        inst = true_instances[t[ok, 0], t[ok, 1], t[ok, 2]]
        counts = np.bincount(inst, minlength=int(true_instances.max()) + 1)
        overlaps[lid] = {int(i): int(c) for i, c in enumerate(counts) if i > 0 and c > 0}
    by_id = {int(les["id"]): les for les in report.get("lesions", [])}
    tol_mm = DISTANCE_TOL_VOXELS * float(max(true_geom.spacing))
    rows = []
    for t in truth["lesions"]:
        ti = int(t["index"])
        cands = [(ov[ti], lid) for lid, ov in overlaps.items() if ti in ov]
        if cands:
            best_ov, lid = max(cands)
            les = by_id[lid]
            d_pred = les["min_distance_to_canal_mm"]
            err = None if d_pred is None else abs(float(d_pred) - float(t["distance_mm"]))
            prim = les["recommendation"]["primary"]
            rows.append(LesionRow(
                study=name, true_index=ti, kind=t["kind"], band=t["band"], found=True, pred_id=lid,
                overlap_voxels=best_ov, pred_type=les["type"], distance_true_mm=float(t["distance_mm"]),
                distance_pred_mm=None if d_pred is None else float(d_pred), error_mm=err,
                error_voxels=None if err is None else err / float(max(true_geom.spacing)),
                distance_ok=err is not None and err <= tol_mm, primary_true=t["primary"], primary_pred=prim,
                primary_ok=prim == t["primary"], closest_point_true_lps_mm=t["closest_point_lesion_lps_mm"],
                closest_point_pred_lps_mm=les["closest_point_lesion_lps_mm"]))
        else:
            rows.append(LesionRow(
                study=name, true_index=ti, kind=t["kind"], band=t["band"], found=False, pred_id=None,
                overlap_voxels=0, pred_type=None, distance_true_mm=float(t["distance_mm"]), distance_pred_mm=None,
                error_mm=None, error_voxels=None, distance_ok=False, primary_true=t["primary"], primary_pred=None,
                primary_ok=False, closest_point_true_lps_mm=t["closest_point_lesion_lps_mm"]))
    fps = sorted(lid for lid, ov in overlaps.items() if not ov)
    return StudyEval(
        study=name,
        canal_dice=dice(on_truth == CANAL, true_labels == CANAL),
        bone_dice=dice(on_truth == 3, true_labels == 3),
        lesion_dice=dice(on_truth == LESION, true_labels == LESION),
        rows=rows, false_positive_ids=fps, spacing_mm=[float(s) for s in true_geom.spacing],
        warnings=list(report.get("warnings", [])),
    )


@dataclass
class Verdict:
    lesions: int
    found: int
    distance_ok: int
    primary_ok: int
    min_canal_dice: float
    false_positives: int
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures


def verdict(evals: list[StudyEval]) -> Verdict:
    """Issue 2's acceptance criteria over a set of studies."""
    rows = [r for e in evals for r in e.rows]
    fps = sum(len(e.false_positive_ids) for e in evals)
    min_dice = min((e.canal_dice for e in evals), default=0.0)
    failures = []
    for r in rows:
        tag = f"{r.study} lesion {r.true_index} ({r.kind}, {r.band})"
        if not r.found:
            failures.append(f"{tag}: not found")
            continue
        if not r.distance_ok:
            failures.append(f"{tag}: distance {r.distance_pred_mm} mm vs truth {r.distance_true_mm:.2f} mm "
                            f"(error {r.error_voxels if r.error_voxels is None else round(r.error_voxels, 2)} voxels)")
        if not r.primary_ok:
            failures.append(f"{tag}: primary {r.primary_pred} vs rule table {r.primary_true}")
    for e in evals:
        if e.canal_dice < MIN_CANAL_DICE:
            failures.append(f"{e.study}: canal Dice {e.canal_dice:.3f} < {MIN_CANAL_DICE}")
    if fps > MAX_FALSE_POSITIVES:
        failures.append(f"{fps} false-positive lesions (at most {MAX_FALSE_POSITIVES} allowed)")
    return Verdict(len(rows), sum(r.found for r in rows), sum(r.distance_ok for r in rows),
                   sum(r.primary_ok for r in rows), min_dice, fps, failures)


def format_table(evals: list[StudyEval]) -> str:
    """A plain-text table: per lesion, then per study."""
    lines = [f"{'study':<10} {'les':>3} {'type true/pred':<17} {'found':<5} {'dist true':>9} {'pred':>7} "
             f"{'err mm':>7} {'err vox':>7}  {'primary true / pred'}"]
    for e in evals:
        for r in e.rows:
            pred_d = "-" if r.distance_pred_mm is None else f"{r.distance_pred_mm:.2f}"
            err = "-" if r.error_mm is None else f"{r.error_mm:.2f}"
            errv = "-" if r.error_voxels is None else f"{r.error_voxels:.2f}"
            lines.append(f"{e.study:<10} {r.true_index:>3} {r.kind + '/' + str(r.pred_type):<17} "
                         f"{'yes' if r.found else 'NO':<5} {r.distance_true_mm:>9.2f} {pred_d:>7} {err:>7} "
                         f"{errv:>7}  {r.primary_true} / {r.primary_pred}{'' if r.primary_ok else '  <-- differs'}")
        lines.append(f"{e.study:<10} canal Dice {e.canal_dice:.3f}  bone Dice {e.bone_dice:.3f}  lesion Dice "
                     f"{e.lesion_dice:.3f}  false positives {len(e.false_positive_ids)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# DICOM SEG in patient space (pydicom only, independent of the writer's library)


def seg_points_by_label(seg_path: Path) -> dict[int, np.ndarray]:
    """DICOM SEG -> {label value: (n, 3) LPS positions (mm) of its set pixels}.

    The label value is read from each segment's SegmentLabel / SegmentedPropertyTypeCodeSequence
    via its SegmentNumber, mapped to the project's labels by name: canal 1, metastasis 2, bone 3.
    """
    import pydicom

    ds = pydicom.dcmread(str(seg_path))
    names: dict[int, int] = {}
    for item in ds.SegmentSequence:
        text = " ".join([str(getattr(item, "SegmentLabel", ""))] +
                        [str(c.CodeMeaning) for c in getattr(item, "SegmentedPropertyTypeCodeSequence", [])]).lower()
        if "canal" in text:
            names[int(item.SegmentNumber)] = CANAL
        elif "metasta" in text or "neoplasm" in text:
            names[int(item.SegmentNumber)] = LESION
        elif "bone" in text or "vertebra" in text:
            names[int(item.SegmentNumber)] = 3
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]
    ps = [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing]  # row spacing, column spacing
    out: dict[int, list[np.ndarray]] = {}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_no = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rc = np.argwhere(frames[f] > 0)
        if not len(rc):
            continue
        pts = ipp + rc[:, 1:2] * ps[1] * row_dir + rc[:, 0:1] * ps[0] * col_dir
        out.setdefault(names.get(seg_no, -seg_no), []).append(pts)
    return {k: np.concatenate(v) for k, v in out.items()}


def points_of_labels(labels: np.ndarray, geom: Geometry) -> dict[int, np.ndarray]:
    """{label: (n, 3) LPS voxel centres} for labels 1..3 of a label map."""
    return {v: geom.index_to_lps(np.argwhere(labels == v)) for v in (1, 2, 3) if (labels == v).any()}


def lattice_keys(points: np.ndarray, geom: Geometry, tol: float = 0.05) -> set[tuple[int, int, int]]:
    """LPS points -> the set of voxel indices of ``geom`` they sit on (for comparing voxel sets
    stored in different orders). Raises if a point is off the lattice by more than ``tol`` voxels."""
    f = geom.lps_to_index(np.asarray(points, float))
    r = np.rint(f)
    if len(f) and float(np.abs(f - r).max()) > tol:
        raise AssertionError(f"points are off the grid lattice by up to {float(np.abs(f - r).max()):.3f} voxels")
    return set(map(tuple, r.astype(np.int64).tolist()))
