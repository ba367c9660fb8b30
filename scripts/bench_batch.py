"""Batch throughput: `osteoplan batch` over N phantom studies vs N sequential `osteoplan run` calls.

Each `run` call is a fresh process that imports the stack and loads the model again; `batch`
loads it once per worker and overlaps reading the next study with inference. Prints a small
table (studies/hour, speed-up). Usage:

    python scripts/bench_batch.py [--n 6] [--device cpu] [--workers 1] [--format all] [--size small]

Throughput on big studies (e.g. a GPU machine, `make bench-gpu`): ``--study DIR --copies N``
makes N copies of one DICOM study folder, each with its own Study/Series Instance UID (the
bytes of the files are otherwise identical), and times only `osteoplan batch` over them
(``--workers`` as given, comma-separated for several runs). Besides the wall time from process
start (imports and model loading included), it prints the steady rate: studies finished per
second between the first and the last finish (from the manifest's ``finished_at``).

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
    ap.add_argument("--workers", default="1", help="worker processes (with --study: a comma-separated list)")
    ap.add_argument("--format", default="all", help="outputs written (same for both ways)")
    ap.add_argument("--model", default="osteoplan-spine", help="bundle name under models/ or a bundle folder")
    ap.add_argument("--size", default="small", help="phantom size: small | full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    ap.add_argument("--study", type=Path, default=None, help="copy this DICOM study folder instead (batch only)")
    ap.add_argument("--copies", type=int, default=8, help="with --study: how many copies")
    ap.add_argument("--json", type=Path, default=None, help="with --study: write the figures here")
    args = ap.parse_args()
    if args.study is not None:
        return throughput_of_copies(args)

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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

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


def _renumbered(uid: str, index: int) -> str:
    """``uid`` with the last digits of its last component replaced by ``index`` (same length)."""
    head, _, last = uid.rpartition(".")
    width = min(len(last), 6)
    tail = f"{index:0{width}d}"[-width:]
    new_last = last[:-width] + tail if len(last) > width else ("9" + tail[1:] if width > 1 else "9")
    return f"{head}.{new_last}"


def copy_study(src: Path, dst: Path, index: int) -> None:
    """Copy every file of ``src`` to ``dst`` with new Study, Series and SOP Instance UIDs of the
    same length (bytes replaced in place: the files stay valid and otherwise identical)."""
    import pydicom

    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    for f in sorted(f for f in Path(src).rglob("*") if f.is_file()):
        data = f.read_bytes()
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(keys))
            uids = {str(ds[k].value) for k in keys if k in ds and ds[k].value}
        except Exception:  # noqa: BLE001 - not DICOM: copied as it is
            uids = set()
        for uid in sorted(uids, key=len, reverse=True):
            data = data.replace(uid.encode(), _renumbered(uid, index).encode())
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)


def throughput_of_copies(args: argparse.Namespace) -> int:
    """`osteoplan batch` over ``--copies`` copies of ``--study`` for each ``--workers`` value."""
    from datetime import datetime

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_batch-"))
    inputs = work / "inputs"
    t0 = time.perf_counter()
    for i in range(args.copies):
        if not (inputs / f"study{i:03d}").exists():
            copy_study(args.study, inputs / f"study{i:03d}", i + 1)
    print(f"{args.copies} copies of {args.study} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results = []
    try:
        for workers in [int(w) for w in str(args.workers).split(",")]:
            out = work / f"out_w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            _check([sys.executable, "-m", "pipeline", "batch", str(inputs), "-o", str(out), "--quiet",
                    "--workers", str(workers), "--device", args.device, "--format", args.format,
                    "--model", args.model], env)
            wall = time.perf_counter() - t0
            lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines() if x.strip()]
            ok = [x for x in lines if x["status"] == "ok"]
            ends = sorted(datetime.strptime(x["finished_at"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() for x in ok)
            steady = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else None
            row = {"workers": workers, "studies": len(lines), "ok": len(ok), "wall_s": round(wall, 2),
                   "studies_per_s_incl_start": round(len(ok) / wall, 3),
                   "steady_studies_per_s": round(steady, 3) if steady else None,
                   "median_study_total_s": sorted(x["timings_s"].get("total", 0) for x in ok)[len(ok) // 2] if ok else None}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps({"study": str(args.study), "copies": args.copies,
                                                   "device": args.device, "format": args.format,
                                                   "runs": results}, indent=1))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["ok"] == r["studies"] for r in results) else 1


def _check(cmd: list[str], env: dict[str, str]) -> None:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_batch: command failed (rc {r.returncode}): {' '.join(cmd[2:5])} ...\n"
                         f"{r.stderr[-1500:]}")


if __name__ == "__main__":
    raise SystemExit(main())
