"""`osteoplan evaluate DATA --model NAME`: segmentation and lesion metrics on a labelled set.

DATA is either a phantom folder written by ``osteoplan samples`` (``<root>/phantomNN/`` DICOM and
``<root>/truth/phantomNN/labels.npz`` with ``labels`` on the CT grid and ``affine_lps``) or an
nnU-Net / MSD folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``; label values mapped to ours
from the label names in dataset.json, or by an explicit ``label_map``).

Each case runs through the real pipeline (the StudyRunner's Segmenter and ``measure_lesions``,
without the writers). Metrics, all on the input grid and in mm of patient space:

- Dice per class (canal 1, lesion 2, bone 3); NaN when the class is absent in both maps.
- HD95 per class: the larger of the two directed 95th percentiles of surface-to-surface
  distances; surfaces are the voxels with a 6-neighbour outside the mask, distances are between
  voxel centres (``index * spacing``), nearest neighbours from a KD-tree (no whole-volume EDT).
  Infinite when one map has the class and the other not.
- Lesion detection: lesions are the components that ``measure_lesions`` keeps (26-connected,
  at least ``postprocess.min_lesion_volume_ml``), in prediction and truth alike. A true lesion
  is detected when a predicted lesion overlaps it; a predicted lesion that overlaps no true one
  is a false positive.
- Phantoms only: per detected lesion, the predicted shortest distance to the canal against the
  same measurement (``pipeline.measure``) on the TRUE label map; the error in mm and in voxels
  (mm divided by the largest voxel edge of the input grid).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.errors import InputError
from pipeline.measure.distance import surface_indices
from pipeline.types import BONE, CANAL, LESION, Geometry, Lesion, Segmentation, Volume

log = logging.getLogger("osteoplan.evaluate")

CLASSES = {CANAL: "canal", LESION: "lesion", BONE: "bone"}
_CUBE = np.ones((3, 3, 3), bool)


# ------------------------------------------------------------------------------------------ metrics


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return float(2.0 * (p & t).sum() / denom) if denom else float("nan")


def _surface_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = [s.start for s in box]
    return surface_indices(mask[box], offset) * spacing


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance (mm) between the surfaces of two masks.

    NaN when both masks are empty, +inf when exactly one is. Surface voxels only, KD-tree queries;
    the grid's direction is orthonormal, so array-axis millimetres are patient-space millimetres.
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return float("nan")
    if not p.any() or not t.any():
        return float("inf")
    sp = np.asarray(spacing, float)
    sp_pts, st_pts = _surface_mm(p, sp), _surface_mm(t, sp)
    d_pt = cKDTree(st_pts).query(sp_pts, k=1)[0]
    d_tp = cKDTree(sp_pts).query(st_pts, k=1)[0]
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def lesion_instances(labels: np.ndarray, geometry: Geometry, min_volume_ml: float,
                     require_bone_contact: bool = False) -> np.ndarray:
    """uint16 map of the lesion components that ``measure_lesions`` keeps, numbered like its lesions
    (pass the same postprocessing settings as the run)."""
    from pipeline.measure.lesions import _components, _label_slices

    inst = np.zeros(labels.shape, np.uint16)
    region = _label_slices(np.asarray(labels, np.uint8))[LESION]
    for n, (mask, offset) in enumerate(_components(labels, region, geometry, min_volume_ml, require_bone_contact),
                                       start=1):
        crop = tuple(slice(o, o + s) for o, s in zip(offset, mask.shape))
        inst[crop][mask] = n
    return inst


@dataclass
class Detection:
    n_true: int
    n_pred: int
    detected: int
    false_positives: int
    matches: dict[int, int] = field(default_factory=dict)  # true id -> predicted id with the largest overlap

    @property
    def sensitivity(self) -> float:
        return self.detected / self.n_true if self.n_true else float("nan")


def detect(pred_inst: np.ndarray, true_inst: np.ndarray) -> Detection:
    """Lesion-wise detection from two instance maps (0 = none): overlap counts as a hit."""
    n_true, n_pred = int(true_inst.max()), int(pred_inst.max())
    both = (true_inst > 0) & (pred_inst > 0)
    pairs = np.stack([true_inst[both], pred_inst[both]], axis=1).astype(np.int64)
    matches: dict[int, int] = {}
    if len(pairs):
        uniq, counts = np.unique(pairs, axis=0, return_counts=True)
        for (t, p), c in sorted(zip(map(tuple, uniq), counts), key=lambda x: -x[1]):
            matches.setdefault(int(t), int(p))
    hit_pred = set(int(p) for p in np.unique(pairs[:, 1])) if len(pairs) else set()
    return Detection(n_true, n_pred, len(matches), n_pred - len(hit_pred), matches)


def class_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, dict]:
    return {name: {"dice": dice(pred == c, truth == c), "hd95_mm": hd95(pred == c, truth == c, spacing)}
            for c, name in CLASSES.items()}


# -------------------------------------------------------------------------------------------- cases


@dataclass
class EvalCase:
    name: str
    volume: Volume
    truth: np.ndarray  # uint8 0..3 on the volume's grid
    phantom: bool


def align_labels(labels: np.ndarray, affine_lps: np.ndarray, geom: Geometry) -> np.ndarray:
    """Nearest-neighbour resampling of a label map (given its 4x4 index->LPS affine) onto ``geom``.

    Exact (a pure re-indexing) when the two grids share voxel centres, e.g. the same grid stored in
    another axis order or direction. Voxels outside the source grid get 0.
    """
    src_aff = np.asarray(affine_lps, float)
    if np.allclose(src_aff, geom.affine_lps, atol=1e-4) and tuple(labels.shape) == geom.shape:
        return np.asarray(labels)
    m = np.linalg.inv(src_aff) @ geom.affine_lps
    out = np.zeros(geom.shape, np.asarray(labels).dtype)
    ni, nj, nk = geom.shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    base = np.stack([ii, jj], -1).reshape(-1, 2).astype(float)
    size = np.asarray(labels.shape)
    for k in range(nk):
        ijk = np.column_stack([base, np.full(len(base), k, float)])
        src = np.rint(ijk @ m[:3, :3].T + m[:3, 3]).astype(np.int64)
        ok = np.all((src >= 0) & (src < size), axis=1)
        sl = np.zeros(len(base), out.dtype)
        sl[ok] = labels[src[ok, 0], src[ok, 1], src[ok, 2]]
        out[:, :, k] = sl.reshape(ni, nj)
    return out


def is_phantom_folder(root: Path) -> bool:
    return (root / "truth").is_dir() and any((root / "truth").glob("*/labels.npz"))


def is_nnunet_folder(root: Path) -> bool:
    return (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir()


def phantom_cases(root: Path) -> Iterator[EvalCase]:
    from pipeline.io.load import load_input

    for truth_dir in sorted(p for p in (root / "truth").iterdir() if (p / "labels.npz").is_file()):
        study = root / truth_dir.name
        if not study.is_dir():
            log.warning("truth %s has no study folder; skipped", truth_dir.name)
            continue
        volume = load_input(study)
        z = np.load(truth_dir / "labels.npz")
        truth = align_labels(z["labels"], z["affine_lps"], volume.geometry)
        yield EvalCase(truth_dir.name, volume, truth.astype(np.uint8), True)


_NAME_TO_CLASS = (("canal", CANAL), ("cord", CANAL), ("metast", LESION), ("lesion", LESION), ("tumo", LESION),
                  ("vertebra", BONE), ("bone", BONE), ("spine", BONE))


def label_map_from_dataset_json(meta: dict[str, Any]) -> dict[int, int]:
    """Source label value -> 0..3 from dataset.json label names (nnU-Net v2 ``{name: value}`` or MSD
    ``{"value": name}``); names containing canal/cord, metast/lesion/tumo(u)r, vertebra/bone/spine."""
    labels = meta.get("labels", {})
    pairs: list[tuple[str, int]] = []
    for k, v in labels.items():
        if isinstance(v, (int, list)) and not str(k).lstrip("-").isdigit():  # v2: name -> value(s)
            for val in (v if isinstance(v, list) else [v]):
                pairs.append((str(k).lower(), int(val)))
        elif str(k).lstrip("-").isdigit():  # MSD: "value" -> name
            pairs.append((str(v).lower(), int(k)))
    out = {}
    for name, val in pairs:
        for key, cls in _NAME_TO_CLASS:
            if key in name:
                out[val] = cls
                break
    return out


def nnunet_eval_cases(root: Path, label_map: dict[int, int] | None = None) -> Iterator[EvalCase]:
    import nibabel as nib

    from pipeline.io.nifti import geometry_from_affine, read_nifti

    meta = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    suffix = meta.get("file_ending", ".nii.gz")
    lmap = label_map if label_map else label_map_from_dataset_json(meta)
    if not lmap:
        raise InputError(f"{root}: cannot map its labels to canal/lesion/bone (dataset.json has no usable names)")
    for lab_path in sorted((root / "labelsTr").glob(f"*{suffix}")):
        case = lab_path.name[: -len(suffix)]
        img_path = next((p for p in (root / "imagesTr" / f"{case}_0000{suffix}", root / "imagesTr" / f"{case}{suffix}")
                         if p.exists()), None)
        if img_path is None:
            log.warning("nnU-Net case %s has no image; skipped", case)
            continue
        volume = read_nifti(img_path)
        lab_img = nib.load(str(lab_path))
        lab = np.asarray(lab_img.dataobj).astype(np.int64)
        lut = np.zeros(max(int(lab.max()), max(lmap)) + 1, np.uint8)
        for src, dst in lmap.items():
            if 0 <= src < len(lut):
                lut[src] = dst
        geom = geometry_from_affine(lab_img.affine, lab.shape)
        truth = align_labels(lut[np.clip(lab, 0, None)], geom.affine_lps, volume.geometry)
        yield EvalCase(case, volume, truth, False)


# ------------------------------------------------------------------------------------------- runner


def _finite(x: float) -> float | None:
    return None if (x is None or not math.isfinite(x)) else round(float(x), 4)


def evaluate_case(runner, case: EvalCase, fast: bool = False) -> dict[str, Any]:
    """Segment and measure one case with the runner's model, compare with the truth."""
    from pipeline.measure.lesions import measure_lesions

    vol = case.volume
    seg = runner.segmenter.segment(vol, fast=fast)
    post = runner.config.postprocess
    lesions, canal = measure_lesions(vol, seg, post, runner.rules)
    geom = vol.geometry
    out: dict[str, Any] = {"case": case.name, "shape": list(geom.shape), "spacing_mm": [round(s, 4) for s in geom.spacing]}
    out["classes"] = {k: {m: _finite(v) if m == "dice" else (None if math.isnan(v) else v) for m, v in d.items()}
                      for k, d in class_metrics(seg.labels, case.truth, geom.spacing).items()}
    pred_inst = lesion_instances(seg.labels, geom, post.min_lesion_volume_ml, post.require_bone_contact)
    true_inst = lesion_instances(case.truth, geom, post.min_lesion_volume_ml, post.require_bone_contact)
    det = detect(pred_inst, true_inst)
    out["detection"] = {"n_true": det.n_true, "n_pred": det.n_pred, "detected": det.detected,
                        "false_positives": det.false_positives, "sensitivity": _finite(det.sensitivity)}
    out["canal_found"] = canal.found
    if case.phantom:
        out["distance"] = _distance_errors(vol, case.truth, seg, lesions, det, runner, max(geom.spacing))
    return out


def _distance_errors(vol: Volume, truth: np.ndarray, seg: Segmentation, lesions: list[Lesion], det: Detection,
                     runner, max_spacing: float) -> list[dict[str, Any]]:
    from pipeline.measure.lesions import measure_lesions

    tseg = Segmentation(labels=truth, geometry=vol.geometry, model=seg.model)
    true_lesions, _ = measure_lesions(vol, tseg, runner.config.postprocess, runner.rules)
    rows = []
    for tid, pid in sorted(det.matches.items()):
        t, p = true_lesions[tid - 1], lesions[pid - 1]
        row = {"true_id": tid, "pred_id": pid, "true_mm": t.min_distance_to_canal_mm,
               "pred_mm": p.min_distance_to_canal_mm, "error_mm": None, "error_vox": None}
        if t.min_distance_to_canal_mm is not None and p.min_distance_to_canal_mm is not None:
            err = p.min_distance_to_canal_mm - t.min_distance_to_canal_mm
            row["error_mm"] = round(err, 4)
            row["error_vox"] = round(err / max_spacing, 4)
        rows.append(row)
    return rows


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases (Dice), medians (HD95, finite values), pooled detection, distance errors."""
    summ: dict[str, Any] = {"n_cases": len(cases), "classes": {}}
    for name in CLASSES.values():
        d = [c["classes"][name]["dice"] for c in cases if c["classes"][name]["dice"] is not None]
        h = [c["classes"][name]["hd95_mm"] for c in cases if c["classes"][name]["hd95_mm"] is not None]
        hf = [x for x in h if math.isfinite(x)]
        summ["classes"][name] = {"dice_mean": _finite(float(np.mean(d))) if d else None,
                                 "hd95_median_mm": _finite(float(np.median(hf))) if hf else None,
                                 "hd95_infinite_cases": len(h) - len(hf)}
    n_true = sum(c["detection"]["n_true"] for c in cases)
    det = sum(c["detection"]["detected"] for c in cases)
    fp = sum(c["detection"]["false_positives"] for c in cases)
    summ["detection"] = {"n_true": n_true, "detected": det, "sensitivity": _finite(det / n_true) if n_true else None,
                         "false_positives": fp, "fp_per_scan": _finite(fp / len(cases)) if cases else None}
    errs = [r["error_mm"] for c in cases for r in c.get("distance", []) if r["error_mm"] is not None]
    voxs = [r["error_vox"] for c in cases for r in c.get("distance", []) if r["error_vox"] is not None]
    if errs:
        a, v = np.abs(errs), np.abs(voxs)
        summ["distance_error"] = {"n": len(errs), "mean_abs_mm": _finite(a.mean()), "median_abs_mm": _finite(np.median(a)),
                                  "max_abs_mm": _finite(a.max()), "mean_signed_mm": _finite(float(np.mean(errs))),
                                  "mean_abs_vox": _finite(v.mean()), "max_abs_vox": _finite(v.max())}
    return summ


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else None)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"osteoplan evaluate: {result['model']} on {result['data']} ({result['kind']})")
    cols = ["case", "Dice canal", "Dice lesion", "Dice bone", "HD95 canal", "HD95 lesion", "HD95 bone",
            "lesions hit/true", "FP", "|dist err| mm"]
    for c in cols:
        table.add_column(c, justify="right" if c != "case" else "left")
    for c in result["cases"]:
        cl = c["classes"]
        errs = [abs(r["error_mm"]) for r in c.get("distance", []) if r["error_mm"] is not None]
        table.add_row(c["case"], *[_fmt(cl[n]["dice"]) for n in CLASSES.values()],
                      *[_fmt(cl[n]["hd95_mm"], 1) for n in CLASSES.values()],
                      f"{c['detection']['detected']}/{c['detection']['n_true']}", str(c["detection"]["false_positives"]),
                      _fmt(float(np.mean(errs)), 2) if errs else "-")
    s = result["summary"]
    d = s["detection"]
    de = s.get("distance_error", {})
    table.add_row("[b]all[/b]", *[_fmt(s["classes"][n]["dice_mean"]) for n in CLASSES.values()],
                  *[_fmt(s["classes"][n]["hd95_median_mm"], 1) for n in CLASSES.values()],
                  f"{d['detected']}/{d['n_true']}", f"{_fmt(d['fp_per_scan'], 2)}/scan",
                  _fmt(de.get("mean_abs_mm"), 2))
    import sys

    Console(width=None if sys.stdout.isatty() else 180).print(table)


def evaluate_folder(data: Path, model: str = "osteoplan-spine", device: str = "auto", fast: bool = False,
                    output: Path | None = None, label_map: dict[int, int] | None = None,
                    runner=None, quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` on a phantom or nnU-Net folder; print a table, write ``metrics.json`` to ``output``."""
    from pipeline.study import StudyOptions, StudyRunner

    data = Path(data)
    if not data.is_dir():
        raise InputError(f"evaluation data folder not found: {data}")
    if is_phantom_folder(data):
        kind, cases = "phantom", phantom_cases(data)
    elif is_nnunet_folder(data):
        kind, cases = "nnunet", nnunet_eval_cases(data, label_map)
    else:
        raise InputError(f"{data} is neither a phantom folder (truth/*/labels.npz) nor an nnU-Net folder "
                         "(imagesTr/, labelsTr/)")
    runner = runner or StudyRunner(StudyOptions(model=model, device=device, fast=fast))
    rows = []
    for case in cases:
        rows.append(evaluate_case(runner, case, fast=fast))
        log.info("evaluated %s", case.name)
    if not rows:
        raise InputError(f"no labelled cases found in {data}")
    info = runner.segmenter.bundle.info
    result = {"model": info.name, "model_version": info.version, "model_sha256": info.sha256, "data": str(data),
              "kind": kind, "fast": fast, "device": str(runner.segmenter.device), "cases": rows,
              "summary": summarise(rows)}
    if not quiet:
        print_table(result)
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result


__all__ = ["dice", "hd95", "detect", "Detection", "lesion_instances", "align_labels", "evaluate_folder",
           "evaluate_case", "summarise", "label_map_from_dataset_json"]
