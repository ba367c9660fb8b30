"""Issue 2 acceptance: foreign spine phantoms, end to end through the real CLI.

For each of N phantoms made by ``tests/foreign_phantom.py`` (a generator independent of the
project's own: other shapes, HU, noise, blur), in several storage orientations and anisotropic
spacings, written as DICOM with random file names, shuffled instance numbers and a localizer
series in the same study folder:

    osteoplan run <study> -o <out>/runs          (pipeline.cli.main, in process)

then every predicted lesion is matched to the true ones by voxel overlap (in patient space) and

- every lesion is found;
- every distance is within 1.5 voxels (largest input voxel spacing) of the truth, the truth
  being the project's box-gap distance on the TRUE label maps;
- every primary recommendation equals ``plan_lesion`` on the true measurements;
- canal Dice >= 0.85 in every study;
- at most one false-positive lesion across the set.

Prints a table per lesion and per study, writes ``<out>/results.json``; exit 0 only when every
criterion holds (1 otherwise, 2 on bad usage).

    python scripts/acceptance.py [--n 6] [--out out/acceptance] [--seed 2026] [--device auto] [--small]
                                 [--model NAME_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import e2e_helpers as ev  # noqa: E402
import foreign_phantom as fp  # noqa: E402


@dataclass(frozen=True)
class Case:
    """How one acceptance phantom is stored: grid, orientation and which lesions it holds."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    position: str
    flip_rows: bool = False
    flip_cols: bool = False
    swap_inplane: bool = False
    lesions: tuple[tuple[str, str], ...] = ()


# Every kind meets every gap band across the set; one solitary lesion exercises the curative path.
FULL_CASES = (
    Case("foreign01", (224, 224, 72), (0.8, 0.8, 2.0), "HFS",
         lesions=(("lytic", "contact"), ("blastic", "mid"), ("mixed", "far"))),
    Case("foreign02", (176, 176, 90), (1.0, 1.0, 1.5), "FFS",
         lesions=(("blastic", "near"), ("mixed", "mid"), ("lytic", "far"))),
    Case("foreign03", (200, 200, 80), (0.9, 0.9, 2.0), "HFP",
         lesions=(("mixed", "contact"), ("lytic", "near"), ("blastic", "far"))),
    Case("foreign04", (224, 224, 72), (0.8, 0.8, 2.0), "HFS", flip_rows=True,
         lesions=(("blastic", "contact"), ("lytic", "mid"), ("mixed", "near"))),
    Case("foreign05", (176, 176, 90), (1.0, 1.0, 1.5), "FFS", flip_cols=True, swap_inplane=True,
         lesions=(("lytic", "near"), ("blastic", "far"))),
    Case("foreign06", (200, 200, 80), (0.9, 0.9, 2.0), "HFS", swap_inplane=True,
         lesions=(("lytic", "mid"),)),
)
# small grids (about 160 x 160 x 60) for the pytest acceptance test
SMALL_CASES = (
    Case("small01", (160, 160, 60), (0.9, 0.9, 2.0), "FFS",
         lesions=(("lytic", "contact"), ("blastic", "mid"), ("mixed", "far"))),
    Case("small02", (150, 150, 64), (1.0, 1.0, 1.5), "HFP", flip_rows=True,
         lesions=(("blastic", "near"), ("lytic", "far"))),
)


def cases_for(n: int, small: bool = False) -> list[Case]:
    """``n`` cases, cycling through the designed set (later rounds get other seeds)."""
    base = SMALL_CASES if small else FULL_CASES
    out = []
    for i in range(n):
        c = base[i % len(base)]
        name = c.name if i < len(base) else f"{c.name}r{i // len(base)}"
        out.append(Case(name, c.shape, c.spacing, c.position, c.flip_rows, c.flip_cols, c.swap_inplane, c.lesions))
    return out


def build_case(case: Case, seed: int, data_root: Path) -> dict[str, Any]:
    """Render and write one phantom: ``data_root/studies/<name>`` and ``data_root/truth/<name>``."""
    ph = fp.make_foreign(seed, shape=case.shape, spacing=case.spacing, position=case.position,
                         flip_rows=case.flip_rows, flip_cols=case.flip_cols, swap_inplane=case.swap_inplane,
                         lesions=list(case.lesions))
    truth = fp.write_study(ph, data_root / "studies" / case.name, data_root / "truth" / case.name, seed=seed)
    return {"truth": truth, "labels": ph.labels, "instances": ph.instances, "geometry": ph.geometry}


def run_cli(study: Path, out: Path, device: str, extra: list[str] | None = None) -> int:
    from pipeline.cli import main

    return main(["run", str(study), "-o", str(out), "--device", device, "--quiet", *(extra or [])])


def _model_args(model: str | None) -> list[str]:
    return ["--model", model] if model else []


def run_acceptance(n: int, out: Path, seed: int, device: str, small: bool = False, keep_data: bool = True,
                   model: str | None = None) -> tuple[ev.Verdict, list[ev.StudyEval], dict[str, Any]]:
    out = Path(out)
    data = out / "data"
    runs = out / "runs"
    for d in (data, runs):
        if d.exists():
            shutil.rmtree(d)
    evals: list[ev.StudyEval] = []
    meta: dict[str, Any] = {"cases": [], "timings_s": {}}
    for i, case in enumerate(cases_for(n, small)):
        t0 = time.perf_counter()
        built = build_case(case, seed + 101 * i, data)
        t1 = time.perf_counter()
        rc = run_cli(data / "studies" / case.name, runs, device, _model_args(model))
        t2 = time.perf_counter()
        truth = built["truth"]
        meta["cases"].append({"name": case.name, "shape": case.shape, "spacing_mm": case.spacing,
                              "position": case.position, "flip_rows": case.flip_rows, "flip_cols": case.flip_cols,
                              "swap_inplane": case.swap_inplane, "patient_position": truth["patient_position"],
                              "exit_code": rc, "render_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 2)})
        if rc != 0:
            raise RuntimeError(f"osteoplan run exited {rc} on {case.name} (see {runs / 'osteoplan.log'})")
        study_dir = runs / truth["study_instance_uid"]
        evals.append(ev.evaluate_study(study_dir, truth, built["labels"], built["instances"], built["geometry"],
                                       name=case.name))
    if not keep_data:
        shutil.rmtree(data, ignore_errors=True)
    return ev.verdict(evals), evals, meta


def model_description(model: str | None = None) -> dict[str, Any]:
    folder = Path(model) if model and Path(model).is_dir() else REPO / "models" / (model or "osteoplan-spine")
    try:
        meta = json.loads((folder / "metadata.json").read_text())
        return {"name": meta.get("name"), "version": meta.get("version"), "sha256": meta.get("sha256")}
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="number of foreign phantoms (default 6)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "acceptance")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="bundle name under models/ or a bundle folder (default: the CLI's)")
    ap.add_argument("--small", action="store_true", help="small grids (the pytest set), quicker")
    ap.add_argument("--drop-data", action="store_true", help="delete the phantom DICOM afterwards")
    args = ap.parse_args(argv)
    if args.n < 1:
        print("acceptance: --n must be at least 1", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    v, evals, meta = run_acceptance(args.n, args.out, args.seed, args.device, args.small, not args.drop_data,
                                    args.model)
    print(ev.format_table(evals))
    print(f"\nlesions found {v.found}/{v.lesions}; distances within {ev.DISTANCE_TOL_VOXELS} voxels "
          f"{v.distance_ok}/{v.lesions}; primaries matching {v.primary_ok}/{v.lesions}; "
          f"min canal Dice {v.min_canal_dice:.3f} (>= {ev.MIN_CANAL_DICE}); false positives {v.false_positives} "
          f"(<= {ev.MAX_FALSE_POSITIVES})")
    print("ACCEPTED" if v.passed else "NOT ACCEPTED:\n  " + "\n  ".join(v.failures))
    results = {
        "passed": v.passed, "failures": v.failures, "model": model_description(args.model),
        "criteria": {"distance_tolerance_voxels": ev.DISTANCE_TOL_VOXELS, "min_canal_dice": ev.MIN_CANAL_DICE,
                     "max_false_positives": ev.MAX_FALSE_POSITIVES},
        "totals": {"lesions": v.lesions, "found": v.found, "distance_ok": v.distance_ok,
                   "primary_ok": v.primary_ok, "min_canal_dice": round(v.min_canal_dice, 4),
                   "false_positives": v.false_positives},
        "studies": [e.as_dict() for e in evals], "cases": meta["cases"],
        "seed": args.seed, "n": args.n, "small": args.small, "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    print(f"results: {args.out / 'results.json'}")
    return 0 if v.passed else 1


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
