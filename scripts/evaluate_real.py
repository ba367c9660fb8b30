#!/usr/bin/env python
"""`make evaluate`: the model on real CT nobody on the project made, plus unseen phantoms.

Evaluation only: nothing here is ever used for training or tuning (see ../shared/data/README.md).

1. ``totalseg_example/dicom_slab`` (Siemens, JPEG 2000): share of TotalSegmentator's spinal-cord
   voxels (label 79, mapped onto the CT grid by patient coordinates) inside the predicted canal.
2. ``chest_ct_philips/dicom``: the full StudyRunner (all outputs, report.html with key images);
   the canal's extent along S and the largest S-gap between canal-containing slices; lesion count.
3. ``blds_lesion_patches`` 1, 2, 7, 8: the 10 spine lesion boxes (CSV centre + size, mm; the
   coordinate convention is checked against the NIfTI affines): a box is hit when a predicted
   lesion component has a voxel centre inside it; unmatched components are false positives.
4. Phantoms never used for training (``write_samples(seed=999)``): Dice per class etc., then the
   same phantoms with ``--fast`` (lesions found, lesion Dice, distance error on its coarser grid).

Prints every figure, writes ``out/evaluate/real_metrics.json`` and ``MODEL_CARD_snippet.md``.
Skips with a clear message when ``../shared/data/real`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.types import CANAL, LESION, Geometry  # noqa: E402

TARGETS = {"cord_in_canal": 0.95, "canal_max_gap_mm": 10.0, "canal_min_cover": 0.9, "blds_hits": 7, "blds_fp_per_patch": 1.0,
           "phantom_dice_canal": 0.90, "phantom_dice_lesion": 0.75}
BLDS_SPINE = ("1.nii.gz", "2.nii.gz", "7.nii.gz", "8.nii.gz")
ALL_CHECKS = ("cord", "chest", "blds", "phantoms")


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------- 1. cord


def cord_share(runner, real: Path) -> dict:
    import nibabel as nib

    from pipeline.io.load import load_input
    from pipeline.io.nifti import geometry_from_affine
    from pipeline.train.evaluate import align_labels

    t0 = time.time()
    vol = load_input(real / "totalseg_example" / "dicom_slab")
    seg = runner.segmenter.segment(vol)
    img = nib.load(str(real / "totalseg_example" / "dicom_slab_seg_total.nii.gz"))
    lab = np.asarray(img.dataobj)
    geom = geometry_from_affine(img.affine, lab.shape)
    cord_src = (lab == 79).astype(np.uint8)
    cord = align_labels(cord_src, geom.affine_lps, vol.geometry) > 0
    # the label grid is the DICOM grid stored LAS: every cord voxel must land on exactly one CT voxel
    m = np.linalg.inv(geom.affine_lps) @ vol.geometry.affine_lps
    same_grid = bool(np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-3)
                     and np.allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-2))
    canal = seg.labels == CANAL
    n = int(cord.sum())
    share = float((cord & canal).sum() / n) if n else float("nan")
    out = {"cord_voxels_source": int(cord_src.sum()), "cord_voxels_on_ct_grid": n,
           "grids_share_voxel_centres": bool(same_grid), "predicted_canal_voxels": int(canal.sum()),
           "share_cord_in_canal": round(share, 4), "target": TARGETS["cord_in_canal"],
           "pass": bool(share >= TARGETS["cord_in_canal"]), "seconds": round(time.time() - t0, 1)}
    _say(f"[cord] dicom_slab: {out['share_cord_in_canal']:.3f} of {n} cord voxels inside the predicted canal "
         f"(target >= {TARGETS['cord_in_canal']}) -> {'PASS' if out['pass'] else 'FAIL'}")
    return out


# ------------------------------------------------------------------------------------- 2. chest CT


def canal_extent(labels: np.ndarray, geom: Geometry) -> dict:
    """Extent of the canal (label 1 of ``labels``; the caller passes its largest component) along S and the largest S-gap between canal-containing slices (mm).

    Slices are the grid's planes along the array axis closest to S; each plane's S position is that
    of its centre voxel, so the figures hold for any orientation without resampling.
    """
    axis = int(np.argmax(np.abs(geom.direction[2])))
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero((labels == CANAL).any(axis=other))
    if present.size == 0:
        return {"found": False}
    centre = (np.asarray(geom.shape) - 1) / 2.0
    idx = np.tile(centre, (present.size, 1))
    idx[:, axis] = present
    s = np.sort(geom.index_to_lps(idx)[:, 2])
    gaps = np.diff(s)
    step = float(geom.spacing[axis] * abs(geom.direction[2, axis]))
    return {"found": True, "s_min_mm": round(float(s[0]), 2), "s_max_mm": round(float(s[-1]), 2),
            "extent_mm": round(float(s[-1] - s[0]), 2), "slices_with_canal": int(present.size),
            "slices_in_range": int(round((s[-1] - s[0]) / step)) + 1 if step > 0 else int(present.size),
            "largest_gap_mm": round(float(gaps.max() - step), 2) if gaps.size else 0.0}


def chest(runner, real: Path, out: Path) -> dict:
    from pipeline.study import StudyOptions

    t0 = time.time()
    res = runner.run(real / "chest_ct_philips" / "dicom", out / "chest_ct_philips",
                     StudyOptions(model=runner.options.model, device=runner.options.device))
    from scipy import ndimage

    comp, n = ndimage.label(res.segmentation.labels == CANAL, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comp.ravel())[1:] if n else np.zeros(0, int)
    largest = (comp == int(np.argmax(sizes)) + 1) if n else np.zeros(comp.shape, bool)
    ext = canal_extent(np.where(largest, CANAL, 0), res.volume.geometry)  # one tube, not scattered specks
    ext["components"] = int(n)
    ext["largest_component_share"] = round(float(sizes.max() / sizes.sum()), 4) if n else None
    vol_s = res.volume.geometry
    s_all = vol_s.index_to_lps(np.array([[0, 0, 0], np.asarray(vol_s.shape) - 1]))[:, 2]
    pngs = sorted(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)
                  for p in res.study_dir.glob("key_lesion*.png"))
    o = {"study_dir": str(res.study_dir), "report_html": str(res.study_dir / "report.html"),
         "scan_s_range_mm": [round(float(min(s_all)), 1), round(float(max(s_all)), 1)], "canal": ext,
         "n_lesions": len(res.lesions), "lesions": [
             {"id": les.id, "volume_ml": round(les.volume_ml, 3), "type": les.type, "location": les.location,
              "distance_mm": None if les.min_distance_to_canal_mm is None else round(les.min_distance_to_canal_mm, 2)}
             for les in res.lesions], "key_images": pngs, "seconds": round(time.time() - t0, 1)}
    scan_mm = float(max(s_all) - min(s_all))
    cover = ext["extent_mm"] / scan_mm if ext.get("found") and scan_mm > 0 else 0.0
    ext["share_of_scan_s_range"] = round(cover, 4)
    # the spine is visible over the whole scan (C6..T12): one canal tube must span >= 90 % of it, gap-free
    gap_ok = bool(ext.get("found") and ext["largest_gap_mm"] <= TARGETS["canal_max_gap_mm"]
                  and cover >= TARGETS["canal_min_cover"])
    o["pass_no_gap"] = gap_ok
    if ext.get("found"):
        _say(f"[chest] largest canal component ({ext['largest_component_share']} of canal voxels, {ext['components']} "
             f"components): S {ext['s_min_mm']}..{ext['s_max_mm']} mm (extent {ext['extent_mm']} mm of the scan's "
             f"{o['scan_s_range_mm']}, share {cover:.2f}), largest gap {ext['largest_gap_mm']} mm (targets: share >= 0.9, "
             f"gap <= 10 mm) -> "
             f"{'PASS' if gap_ok else 'FAIL'}")
    else:
        _say("[chest] no canal predicted -> FAIL")
    _say(f"[chest] {len(res.lesions)} lesion(s) predicted; report: {o['report_html']}")
    return o


# ------------------------------------------------------------------------------------------ 3. BLDS


def read_boxes(path: Path) -> dict[str, list[dict]]:
    boxes: dict[str, list[dict]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["image_path"], []).append(
                {"centre": [float(row["x"]), float(row["y"]), float(row["z"])],
                 "size": [float(row["width"]), float(row["height"]), float(row["depth"])], "class": row["class"]})
    return boxes


def box_convention(real: Path, boxes: dict[str, list[dict]]) -> str:
    """'LPS' or 'RAS': the convention under which every box centre lies inside its patch."""
    from pipeline.io.nifti import read_nifti

    inside = {"LPS": 0, "RAS": 0}
    total = 0
    for name, bl in boxes.items():
        g = read_nifti(real / "blds_lesion_patches" / name).geometry
        for b in bl:
            total += 1
            for conv, flip in (("LPS", np.array([1, 1, 1])), ("RAS", np.array([-1, -1, 1]))):
                idx = g.lps_to_index(np.asarray(b["centre"]) * flip)[0]
                inside[conv] += bool(np.all((idx >= -0.5) & (idx <= np.asarray(g.shape) - 0.5)))
    _say(f"[blds] box centres inside their patch: LPS {inside['LPS']}/{total}, RAS {inside['RAS']}/{total}")
    return "LPS" if inside["LPS"] >= inside["RAS"] else "RAS"


def blds(runner, real: Path) -> dict:
    from pipeline.io.nifti import read_nifti
    from pipeline.measure.lesions import measure_lesions
    from pipeline.train.evaluate import lesion_instances

    t0 = time.time()
    boxes = read_boxes(real / "blds_lesion_patches" / "image_bone_lesions.csv")
    conv = box_convention(real, boxes)
    flip = np.array([1, 1, 1]) if conv == "LPS" else np.array([-1, -1, 1])
    patches, hits, total, fps = [], 0, 0, 0
    for name in BLDS_SPINE:
        vol = read_nifti(real / "blds_lesion_patches" / name)
        seg = runner.segmenter.segment(vol)
        lesions, _ = measure_lesions(vol, seg, runner.config.postprocess, runner.rules)
        post = runner.config.postprocess
        inst = lesion_instances(seg.labels, vol.geometry, post.min_lesion_volume_ml, post.require_bone_contact)
        ijk = np.argwhere(inst > 0)
        ids = inst[tuple(ijk.T)]
        lps = vol.geometry.index_to_lps(ijk) if len(ijk) else np.zeros((0, 3))
        matched: set[int] = set()
        rows = []
        for b in boxes.get(name, []):
            c, half = np.asarray(b["centre"]) * flip, np.asarray(b["size"]) / 2.0
            inside = np.all(np.abs(lps - c) <= half, axis=1) if len(lps) else np.zeros(0, bool)
            hit_ids = sorted(set(int(i) for i in ids[inside]))
            matched.update(hit_ids)
            rows.append({"centre_lps_mm": [round(float(v), 2) for v in c], "size_mm": b["size"], "hit": bool(hit_ids),
                         "lesion_ids": hit_ids})
        n_fp = int(inst.max()) - len(matched)
        hits += sum(r["hit"] for r in rows)
        total += len(rows)
        fps += n_fp
        patches.append({"patch": name, "boxes": rows, "n_pred_lesions": int(inst.max()), "false_positives": n_fp,
                        "pred_lesions": [{"id": les.id, "volume_ml": round(les.volume_ml, 3), "type": les.type}
                                         for les in lesions]})
        _say(f"[blds] patch {name}: {sum(r['hit'] for r in rows)}/{len(rows)} boxes hit, {int(inst.max())} predicted "
             f"lesion(s), {n_fp} false positive(s)")
    fp_per = fps / len(BLDS_SPINE)
    ok = hits >= TARGETS["blds_hits"] and all(p["false_positives"] <= TARGETS["blds_fp_per_patch"] for p in patches)
    _say(f"[blds] {hits}/{total} spine boxes hit (target >= 7), {fp_per:.2f} FP/patch (target <= 1) -> "
         f"{'PASS' if ok else 'FAIL'}")
    return {"csv_convention": conv, "hits": hits, "boxes": total, "false_positives": fps,
            "fp_per_patch": round(fp_per, 3), "pass": bool(ok), "patches": patches,
            "seconds": round(time.time() - t0, 1)}


# -------------------------------------------------------------------------------------- 4. phantoms


def phantoms(runner, n: int, seed: int, out: Path) -> dict:
    from pipeline.train.evaluate import evaluate_folder
    from pipeline.train.samples import write_samples

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="osteoplan-eval-") as tmp:
        write_samples(Path(tmp), n=n, seed=seed)
        res = evaluate_folder(Path(tmp), runner=runner, output=out / "phantoms")
        # --fast on the same phantoms: its coarser grid misses lesions, and users should know how many
        fast = evaluate_folder(Path(tmp), runner=runner, fast=True, output=out / "phantoms-fast", quiet=True)
    s = res["summary"]
    dc, dl = s["classes"]["canal"]["dice_mean"], s["classes"]["lesion"]["dice_mean"]
    ok = (dc or 0) >= TARGETS["phantom_dice_canal"] and (dl or 0) >= TARGETS["phantom_dice_lesion"]
    _say(f"[phantoms] seed {seed}, n {n}: Dice canal {dc}, lesion {dl}, bone {s['classes']['bone']['dice_mean']} "
         f"(targets 0.90 / 0.75) -> {'PASS' if ok else 'FAIL'}")
    fs = fast["summary"]
    fd, fe = fs["detection"], fs.get("distance_error", {})
    spacing = runner.segmenter.fast_spacing
    _say(f"[phantoms] --fast ({spacing[0]:g} mm grid): {fd['detected']}/{fd['n_true']} lesions found "
         f"(default {s['detection']['detected']}/{s['detection']['n_true']}), Dice lesion "
         f"{fs['classes']['lesion']['dice_mean']}, mean distance error {fe.get('mean_abs_mm')} mm")
    return {"seed": seed, "n": n, "summary": s, "pass": bool(ok), "seconds": round(time.time() - t0, 1),
            "fast": {"spacing_mm": list(spacing), "summary": fs}}


# --------------------------------------------------------------------------------------- snippet


def snippet(m: dict) -> str:
    def f(x, nd=3):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    lines = [f"## Evaluation on real CT and unseen phantoms ({m['date']}, weights sha256 {m['model_sha256'][:12]}…, "
             f"{m['model_steps']} steps)", "",
             "Evaluation only: none of these data were used for training or tuning. "
             "`make evaluate` (scripts/evaluate_real.py) reproduces the table.", "",
             "| check | data | result | target | pass |", "|---|---|---|---|---|"]
    c = m.get("cord")
    if c:
        lines.append(f"| cord voxels inside predicted canal | TotalSegmentator dicom_slab (Siemens, JPEG 2000) | "
                     f"{f(c['share_cord_in_canal'])} | ≥ 0.95 | {'yes' if c['pass'] else 'no'} |")
    ch = m.get("chest")
    if ch:
        e = ch["canal"]
        res = (f"largest canal tube S {e['s_min_mm']}..{e['s_max_mm']} mm ({f(e.get('share_of_scan_s_range'), 2)} of the "
               f"scan), largest gap {e['largest_gap_mm']} mm; {e.get('components')} canal components; "
               f"{ch['n_lesions']} lesion(s)") if e.get("found") else "no canal"
        lines.append(f"| canal continuous over the visible spine | Philips chest CT (C6–T12) | {res} | ≥ 90 % of scan, gap ≤ 10 mm | "
                     f"{'yes' if ch['pass_no_gap'] else 'no'} |")
    b = m.get("blds")
    if b:
        lines.append(f"| spine lesion boxes hit | BLDS patches 1, 2, 7, 8 | {b['hits']}/{b['boxes']}, "
                     f"{f(b['fp_per_patch'], 2)} FP/patch | ≥ 7/10, ≤ 1 FP/patch | {'yes' if b['pass'] else 'no'} |")
    p = m.get("phantoms")
    if p:
        s = p["summary"]
        cl = s["classes"]
        de = s.get("distance_error", {})
        lines.append(f"| Dice canal / lesion / bone | {p['n']} unseen phantoms (seed {p['seed']}) | "
                     f"{f(cl['canal']['dice_mean'])} / {f(cl['lesion']['dice_mean'])} / {f(cl['bone']['dice_mean'])} | "
                     f"≥ 0.90 / ≥ 0.75 / – | {'yes' if p['pass'] else 'no'} |")
        lines.append(f"| HD95 canal / lesion / bone (median, mm) | same | {f(cl['canal']['hd95_median_mm'], 1)} / "
                     f"{f(cl['lesion']['hd95_median_mm'], 1)} / {f(cl['bone']['hd95_median_mm'], 1)} | – | – |")
        d = s["detection"]
        lines.append(f"| lesion detection | same | {d['detected']}/{d['n_true']}, {f(d['fp_per_scan'], 2)} FP/scan | – | – |")
        if de:
            lines.append(f"| distance-to-canal error (detected lesions) | same | mean {f(de['mean_abs_mm'], 2)} mm "
                         f"({f(de['mean_abs_vox'], 2)} vox), max {f(de['max_abs_mm'], 2)} mm | – | – |")
        fast = p.get("fast")
        if fast:
            fs, fd = fast["summary"], fast["summary"]["detection"]
            fe = fs.get("distance_error", {})
            lines.append(f"| `--fast` ({fast['spacing_mm'][0]:g} mm grid): lesions found; Dice lesion; mean distance "
                         f"error | same | {fd['detected']}/{fd['n_true']}; {f(fs['classes']['lesion']['dice_mean'])}; "
                         f"{f(fe.get('mean_abs_mm'), 2)} mm | – | – |")
    for k, v in m.get("skipped", {}).items():
        lines.append(f"| {k} | – | skipped: {v} | – | – |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=(REPO.parent / "shared" / "data" / "real"))
    ap.add_argument("--model", default="osteoplan-spine")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "evaluate")
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--phantom-seed", type=int, default=999)
    ap.add_argument("--only", default=",".join(ALL_CHECKS),
                    help="comma list of checks to run (a partial run updates the existing real_metrics.json)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args(argv)

    import torch

    from pipeline.errors import OsteoplanError
    from pipeline.study import StudyOptions, StudyRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    real = args.data.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        runner = StudyRunner(StudyOptions(model=args.model, device=args.device))
    except OsteoplanError as exc:
        _say(f"evaluate: {exc}")
        return 2
    md = runner.segmenter.bundle.metadata
    previous = args.out / "real_metrics.json"
    m: dict = json.loads(previous.read_text()) if (only != set(ALL_CHECKS) and previous.is_file()) else {}
    prev_sha = m.get("model_sha256")
    m.update({"date": dt.date.today().isoformat(), "model": md["name"], "model_version": md["version"],
               "model_sha256": md["sha256"], "model_steps": md.get("training", {}).get("steps"),
               "device": str(runner.segmenter.device), "targets": TARGETS, "skipped": {}})
    if prev_sha and prev_sha != md["sha256"]:  # a partial run over results of other weights: start clean
        _say("note: real_metrics.json came from other weights; its other checks are dropped")
        for k in ALL_CHECKS:
            m.pop(k, None)
    have_real = real.is_dir()
    if not have_real:
        _say(f"evaluate: real CT data not found at {real} (it lives in ../shared/data/real beside the checkout); "
             "real-CT checks skipped")
    checks = [("cord", lambda: cord_share(runner, real), True), ("chest", lambda: chest(runner, real, args.out), True),
              ("blds", lambda: blds(runner, real), True),
              ("phantoms", lambda: phantoms(runner, args.phantoms, args.phantom_seed, args.out), False)]
    for name, fn, needs_real in checks:
        if name not in only:
            continue
        if needs_real and not have_real:
            m["skipped"][name] = "real CT data absent"
            continue
        try:
            m[name] = fn()
        except OsteoplanError as exc:
            _say(f"[{name}] could not run: {exc}")
            m["skipped"][name] = str(exc)
    (args.out / "real_metrics.json").write_text(json.dumps(m, indent=2, default=str))
    (args.out / "MODEL_CARD_snippet.md").write_text(snippet(m))
    _say(f"wrote {args.out / 'real_metrics.json'} and {args.out / 'MODEL_CARD_snippet.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
