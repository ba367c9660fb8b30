"""Compare inference-time settings (mirror TTA, class offsets) on a labelled phantom folder.

The network runs once per case and mirror (identity, lr, si, lr+si), its canonical-grid logits
cached under ``--cache``; every setting is then a cheap recombination of the cached logits,
followed by the real postprocessing (``logits_to_labels``) and measurement (``measure_lesions``),
and scored like ``osteoplan evaluate`` (Dice per class, detection, distance error vs the same
measurement on the true label map; signed error > 0 = measured too far).

Choose settings on the project's own phantoms with seeds unused in training, e.g.

    osteoplan samples -o /tmp/val777 -n 8 --seed 777
    python scripts/tune_inference.py /tmp/val777 --cache /tmp/val777-logits

never on the acceptance phantoms or on real evaluation CT.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MIRRORS = {"id": (), "lr": (2,), "si": (4,), "lrsi": (2, 4)}


def _logits(seg, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    if not dims:
        return seg._sliding_window(x)
    return torch.flip(seg._sliding_window(torch.flip(x, dims=dims)), dims=dims)


@torch.inference_mode()
def cache_case(seg, case, cache: Path, fast: bool) -> dict:
    from pipeline.segment.resample import canonical_geometry, to_canonical
    from pipeline.segment.segmenter import normalise

    d = cache / case.name
    d.mkdir(parents=True, exist_ok=True)
    spacing = seg.fast_spacing if fast else seg.spacing
    canon = canonical_geometry(case.volume.geometry, spacing)
    x = None
    for name, dims in MIRRORS.items():
        f = d / f"{name}{'_fast' if fast else ''}.npy"
        if f.exists():
            continue
        if x is None:
            x = normalise(to_canonical(case.volume.array, case.volume.geometry, canon), seg.bundle.metadata["intensity"])
        t0 = time.perf_counter()
        out = _logits(seg, x, dims)
        np.save(f, out[0].numpy().astype(np.float16))
        print(f"  {case.name} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return {"canon": canon}


def combine(cache: Path, name: str, mirrors: tuple[str, ...], mode: str, offsets: dict[int, float],
            fast: bool) -> torch.Tensor:
    """The cached outputs of ``mirrors`` combined as the pipeline combines them (``tta.average_outputs``)."""
    from pipeline.segment.tta import add_class_offsets, average_outputs

    outputs = (torch.from_numpy(np.load(cache / name / f"{m}{'_fast' if fast else ''}.npy").astype(np.float32))[None]
               for m in mirrors)
    return add_class_offsets(average_outputs(outputs, mode), offsets)


def grow_lesions(logits: torch.Tensor, min_prob: float, lesion: int = 2, into=None) -> int:
    """Experiment (not shipped): lesion hysteresis. Voxels with lesion probability >= ``min_prob``
    connected to arg-max lesion voxels become lesion (optionally only voxels whose arg-max is in
    ``into``). On the tuning phantoms it changed nothing measurable: the network is confident."""
    from scipy import ndimage

    lg = logits[0]
    arg = lg.argmax(dim=0)
    seed = (arg == lesion).numpy()
    prob = torch.softmax(lg, dim=0)[lesion].numpy()
    cand = (prob >= min_prob) & ~seed
    if into is not None:
        cand &= np.isin(arg.numpy(), list(into))
    if not seed.any() or not cand.any():
        return 0
    comp, _ = ndimage.label(cand | seed, structure=np.ones((3, 3, 3), bool))
    keep = np.unique(comp[seed])
    grown = torch.from_numpy(np.isin(comp, keep[keep > 0]) & cand)
    others = torch.cat([lg[:lesion], lg[lesion + 1:]]).amax(dim=0)
    lg[lesion] = torch.where(grown, torch.maximum(lg[lesion], others + 1e-3), lg[lesion])
    return int(grown.sum())


def score_case(case, canon, logits: torch.Tensor, runner, corner_labels: bool = False) -> dict:
    from pipeline.measure.lesions import measure_lesions
    from pipeline.segment.resample import logits_to_labels
    from pipeline.train.evaluate import _distance_errors, detect, dice, lesion_instances
    from pipeline.types import ModelInfo, Segmentation

    geom = case.volume.geometry
    labels = logits_to_labels(logits, canon, geom, corner_labels=corner_labels)
    info = ModelInfo(name="tune", version="0", sha256="", spacing_mm=tuple(canon.spacing))
    seg = Segmentation(labels=labels, geometry=geom, model=info, device="cpu")
    post = runner.config.postprocess
    lesions, _ = measure_lesions(case.volume, seg, post, runner.rules)
    det = detect(lesion_instances(labels, geom, post.min_lesion_volume_ml, post.require_bone_contact),
                 lesion_instances(case.truth, geom, post.min_lesion_volume_ml, post.require_bone_contact))
    rows = _distance_errors(case.volume, case.truth, seg, lesions, det, runner, max(geom.spacing))
    return {"dice": {c: dice(labels == v, case.truth == v) for c, v in (("canal", 1), ("lesion", 2), ("bone", 3))},
            "n_true": det.n_true, "detected": det.detected, "fp": det.false_positives, "dist": rows}


def summarise(scores: list[dict]) -> dict:
    errs = [r["error_mm"] for s in scores for r in s["dist"] if r["error_mm"] is not None]
    voxs = [r["error_vox"] for s in scores for r in s["dist"] if r["error_vox"] is not None]
    contact = [r["pred_mm"] for s in scores for r in s["dist"] if r["true_mm"] == 0.0 and r["pred_mm"] is not None]
    out = {f"dice_{c}": float(np.mean([s["dice"][c] for s in scores])) for c in ("canal", "lesion", "bone")}
    out["min_dice_canal"] = float(min(s["dice"]["canal"] for s in scores))
    out.update(found=sum(s["detected"] for s in scores), n_true=sum(s["n_true"] for s in scores),
               fp=sum(s["fp"] for s in scores))
    if errs:
        out.update(mean_abs_mm=float(np.mean(np.abs(errs))), mean_signed_mm=float(np.mean(errs)),
                   max_abs_mm=float(np.max(np.abs(errs))), max_abs_vox=float(np.max(np.abs(voxs))),
                   within_1p5_vox=int(np.sum(np.abs(voxs) <= 1.5)), n_dist=len(errs),
                   contact_not_zero=int(sum(1 for c in contact if c > 0)), n_contact=len(contact))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="phantom folder from `osteoplan samples` (truth/*/labels.npz)")
    ap.add_argument("--cache", type=Path, required=True, help="folder for the cached logits")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--mirrors", default="id;id,lr;id,si;id,lr,si,lrsi", help="';'-separated mirror sets")
    ap.add_argument("--modes", default="logits,softmax")
    ap.add_argument("--lesion-offsets", default="0", help="comma-separated logit offsets for class 2")
    ap.add_argument("--canal-offsets", default="0", help="comma-separated logit offsets for class 1")
    ap.add_argument("--grow", default="0", help="comma-separated lesion hysteresis probabilities (0 = off)")
    ap.add_argument("--grow-into", default="any", help="comma-separated: any | bone | bone+lesion ...")
    ap.add_argument("--interp", default="logits", help="comma-separated: logits | probs (what is resampled) | corner (logits, labels limited to "
                         "the 8 surrounding model voxels' labels)")
    ap.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    from pipeline.train.evaluate import phantom_cases
    from pipeline.study import StudyOptions, StudyRunner

    runner = StudyRunner(StudyOptions(device="cpu", fast=args.fast))
    cases = list(phantom_cases(args.data))
    canons = {}
    for case in cases:
        canons[case.name] = cache_case(runner.segmenter, case, args.cache, args.fast)["canon"]
    results = []
    mirror_sets = [tuple(s.split(",")) for s in args.mirrors.split(";")]
    grid = itertools.product(mirror_sets, args.modes.split(","),
                             [float(v) for v in args.lesion_offsets.split(",")],
                             [float(v) for v in args.canal_offsets.split(",")],
                             [float(v) for v in args.grow.split(",")], args.grow_into.split(","),
                             args.interp.split(","))
    into_map = {"any": None, "bone": (3,), "bone+bg": (0, 3)}
    for mirrors, mode, les_off, can_off, grow, into, interp in grid:
        if not grow and into != args.grow_into.split(",")[0]:
            continue
        if mirrors == ("id",) and mode == "softmax":
            continue  # same as logits
        scores = []
        for c in cases:
            lg = combine(args.cache, c.name, mirrors, mode, {1: can_off, 2: les_off}, args.fast)
            if grow:
                grow_lesions(lg, grow, into=into_map[into])
            if interp.startswith("probs"):
                t = float(interp[6:]) if interp.startswith("probsT") else 1.0
                lg = torch.softmax(lg / t, dim=1)
            scores.append(score_case(c, canons[c.name], lg, runner, corner_labels=interp == "corner"))
        s = summarise(scores)
        row = {"mirrors": "+".join(mirrors), "mode": mode, "lesion_offset": les_off, "canal_offset": can_off,
               "grow": grow, "grow_into": into, "interp": interp, **s,
               "cases": scores}
        results.append(row)
        print(f"{row['mirrors']:<12} {mode:<7} les{les_off:+.2f} can{can_off:+.2f} grow {grow:.2f} {into:<5} {interp:<6}| Dice c/l/b "
              f"{s['dice_canal']:.3f}/{s['dice_lesion']:.3f}/{s['dice_bone']:.3f} min canal {s['min_dice_canal']:.3f}"
              f" | found {s['found']}/{s['n_true']} fp {s['fp']} | dist |err| {s.get('mean_abs_mm', float('nan')):.2f}"
              f" signed {s.get('mean_signed_mm', float('nan')):+.2f} max {s.get('max_abs_mm', float('nan')):.2f} mm"
              f" ({s.get('max_abs_vox', float('nan')):.2f} vox) ok {s.get('within_1p5_vox')}/{s.get('n_dist')}"
              f" contact>0 {s.get('contact_not_zero')}/{s.get('n_contact')}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
