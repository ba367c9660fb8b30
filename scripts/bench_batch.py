"""Batch throughput: `osteoplan batch` over N phantom studies vs N sequential `osteoplan run` calls.

Each `run` call is a fresh process that imports the stack and loads the model again; `batch`
loads it once per worker and overlaps reading the next study with inference. Prints a small
table (studies/hour, speed-up). Usage:

    python scripts/bench_batch.py [--n 6] [--device cpu] [--workers 1] [--format all] [--size small]

Needs the model bundle (models/osteoplan-spine) and the phantom generator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="number of phantom studies")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--format", default="all", help="outputs written (same for both ways)")
    ap.add_argument("--model", default="osteoplan-spine", help="bundle name under models/ or a bundle folder")
    ap.add_argument("--size", default="small", help="phantom size: small | full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from pipeline.train.samples import write_samples

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_batch-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs = work / "inputs"
        if inputs.exists():
            shutil.rmtree(inputs)
        studies = write_samples(inputs, n=args.n, seed=args.seed, size=args.size)
        common = ["--device", args.device, "--format", args.format, "--model", args.model]
        env = {**os.environ, "PYTHONPATH": str(REPO)}

        seq_out = work / "out_run"
        t0 = time.perf_counter()
        for study in studies:
            _check([sys.executable, "-m", "pipeline", "run", str(study), "-o", str(seq_out), "--quiet", *common], env)
        t_seq = time.perf_counter() - t0

        batch_out = work / "out_batch"
        t0 = time.perf_counter()
        _check([sys.executable, "-m", "pipeline", "batch", str(inputs), "-o", str(batch_out), "--quiet",
                "--workers", str(args.workers), *common], env)
        t_batch = time.perf_counter() - t0

        lines = [json.loads(l) for l in (batch_out / "manifest.jsonl").read_text().splitlines() if l.strip()]
        ok = sum(l["status"] == "ok" for l in lines)
        if ok != len(studies):
            print(f"bench_batch: only {ok}/{len(studies)} studies finished in batch", file=sys.stderr)
            return 1
        rate_seq, rate_batch = 3600 * len(studies) / t_seq, 3600 * len(studies) / t_batch
        print(f"\nbatch vs sequential `osteoplan run` ({len(studies)} {args.size} phantoms, device {args.device}, "
              f"formats {args.format}, model {Path(args.model).name}, {os.cpu_count()} CPUs)")
        print(f"{'mode':<34}{'wall s':>9}{'s/study':>10}{'studies/h':>12}")
        print(f"{'sequential run (model per study)':<34}{t_seq:>9.1f}{t_seq / len(studies):>10.2f}{rate_seq:>12.0f}")
        label = f"batch --workers {args.workers}"
        print(f"{label:<34}{t_batch:>9.1f}{t_batch / len(studies):>10.2f}{rate_batch:>12.0f}")
        print(f"speed-up: {t_seq / t_batch:.2f}x")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _check(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_batch: command failed (rc {r.returncode}): {' '.join(cmd[2:5])} ...\n"
                         f"{r.stderr[-1500:]}")


if __name__ == "__main__":
    raise SystemExit(main())
