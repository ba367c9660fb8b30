#!/usr/bin/env python
"""Fuzz the ingestion layer: byte-level mutations of generated DICOM (and NIfTI/zip) inputs.

Every mutated input is fed to ``pipeline.io.load.load_input``. The contract: it returns a Volume
or raises an ``OsteoplanError`` (one clear line). Anything else -- another exception, a hang
longer than ``--case-timeout`` seconds -- is a finding. For a DICOM folder, the header pass
(fast readers, layouts shared across a series) must also equal pydicom reading each file alone,
and so must batch discovery's fast header path (``pipeline.batch.discover.read_headers``):
a difference is a finding (``HeaderMismatch``). Findings are grouped by exception type
and the innermost project frame, printed, and (with ``--save DIR``) the offending inputs are kept.

Usage:  python scripts/fuzz_ingest.py [--seconds 60] [--seed 0] [--max-cases N] [--save DIR]
Exit status: 0 when there were no findings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.errors import OsteoplanError  # noqa: E402
from pipeline.io.dicom_write import write_ct_series, write_enhanced_ct, write_localizer  # noqa: E402
from pipeline.batch.discover import read_headers  # noqa: E402
from pipeline.io.discover import list_files, scan_files  # noqa: E402
from pipeline.io.load import load_input  # noqa: E402
from pipeline.io.nifti import write_volume_nifti  # noqa: E402
from pipeline.types import Geometry, Volume  # noqa: E402

# Offsets worth hitting: tags whose values drive sizes, geometry and decoding.
INTERESTING_TAGS = [
    (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0103),
    (0x0028, 0x0002), (0x0028, 0x0008), (0x0020, 0x0032), (0x0020, 0x0037), (0x0028, 0x0030),
    (0x0028, 0x1052), (0x0028, 0x1053), (0x0002, 0x0010), (0x7FE0, 0x0010), (0x0020, 0x000E),
    (0x0008, 0x0060), (0x0008, 0x0008), (0x0002, 0x0000),
]
SPECIAL_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, ord("-"), ord("."), ord("\\"), ord("e")]


class CaseTimeout(Exception):
    pass


@dataclass
class FuzzReport:
    cases: int = 0
    loaded: int = 0
    compared: int = 0  # DICOM folders whose header pass was compared with pydicom's
    refused: Counter = field(default_factory=Counter)  # exception class -> count
    messages: Counter = field(default_factory=Counter)  # refusal message with digits masked -> count
    findings: dict[str, list[str]] = field(default_factory=dict)  # signature -> [case ids]
    details: dict[str, str] = field(default_factory=dict)  # signature -> traceback
    slowest_s: float = 0.0


def _base_cases(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Small valid inputs of several kinds, each in its own folder/file."""
    out: dict[str, Path] = {}
    hu = rng.integers(-1024, 2000, size=(16, 12, 9)).astype(np.int16)
    g = Geometry((16, 12, 9), (0.8, 0.9, 2.0), (-10, 20, 30), np.eye(3))
    for ts in ("explicit", "implicit", "rle"):
        src = write_ct_series(hu, g, root / ts, transfer_syntax=ts, study_date="20000101",
                              file_names="random", instance_numbers="shuffled", seed=1)
        out[ts] = root / ts
    write_localizer(root / "explicit", src.study_instance_uid, src.frame_of_reference_uid, study_date="20000101")
    hu2 = rng.integers(-1024, 2000, size=(32, 32, 6)).astype(np.int16)
    g2 = Geometry((32, 32, 6), (1, 1, 1.5), (0, 0, 0), np.diag([-1.0, 1.0, -1.0]))
    write_ct_series(hu2, g2, root / "jpeg2000", transfer_syntax="jpeg2000", study_date="20000101")
    out["jpeg2000"] = root / "jpeg2000"
    t = np.radians(15.0)
    tilt = np.array([[1.0, 0, 0], [0, np.cos(t), 0], [0, -np.sin(t), 1.0]])
    write_ct_series(hu, Geometry(g.shape, g.spacing, g.origin, tilt), root / "tilt", study_date="20000101")
    out["tilt"] = root / "tilt"
    (root / "enhanced").mkdir()
    write_enhanced_ct(root / "enhanced" / "mf.dcm", hu, g, per_frame_rescale=True)
    out["enhanced"] = root / "enhanced" / "mf.dcm"
    vol = Volume(array=hu, geometry=g)
    write_volume_nifti(vol, root / "ct.nii")
    out["nifti"] = root / "ct.nii"
    zpath = root / "series.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((root / "implicit").iterdir()):
            zf.write(f, f"s/{f.name}")
    out["zip"] = zpath
    return out


def _tag_offsets(data: bytes) -> list[int]:
    offs = []
    for group, elem in INTERESTING_TAGS:
        needle = struct.pack("<HH", group, elem)
        start = 0
        while (i := data.find(needle, start)) >= 0:
            offs.append(i)
            start = i + 1
    return offs


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random byte-level mutations, biased towards interesting tags."""
    buf = bytearray(data)
    offsets = _tag_offsets(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        op = rng.choice(["flip", "special", "tagval", "taglen", "truncate", "insert", "delete", "dup", "digits"])
        pos = rng.randrange(len(buf))
        if op in ("tagval", "taglen", "digits") and offsets:
            base = rng.choice(offsets)
            pos = min(len(buf) - 1, base + (rng.randint(4, 7) if op == "taglen" else rng.randint(8, 24)))
        if op == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif op in ("special", "tagval", "taglen"):
            buf[pos] = rng.choice(SPECIAL_BYTES)
        elif op == "digits":
            for i in range(pos, min(len(buf), pos + rng.randint(1, 8))):
                buf[i] = ord(rng.choice("0123456789-+.eE\\ 9"))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == "delete":
            del buf[pos: pos + rng.randint(1, 64)]
        elif op == "dup":
            n = rng.randint(1, 256)
            buf[pos:pos] = buf[pos: pos + n]
    return bytes(buf)


def _prepare_case(base: Path, case_dir: Path, rng: random.Random) -> Path:
    """Copy a base input and mutate one or more of its files; returns the path to load."""
    if base.is_file():
        target = case_dir / base.name
        target.write_bytes(mutate(base.read_bytes(), rng))
        return target
    shutil.copytree(base, case_dir / "in")
    files = sorted((case_dir / "in").iterdir())
    if rng.random() < 0.35:
        # series-wide: the same mutation in every file (same layout -> same tag hit), so the
        # damage survives the per-file checks and reaches selection, geometry and decoding
        case_seed = rng.getrandbits(32)
        for f in files:
            f.write_bytes(mutate(f.read_bytes(), random.Random(case_seed)))
        return case_dir / "in"
    for f in rng.sample(files, k=rng.randint(1, min(3, len(files)))):
        f.write_bytes(mutate(f.read_bytes(), rng))
    return case_dir / "in"


class HeaderMismatch(Exception):
    """The header pass read a file otherwise than pydicom reading it alone."""


def compare_headers(folder: Path) -> None:
    """The header pass over ``folder`` (fast readers, layouts shared across a series) must equal
    each file read alone by pydicom: the same slices field for field, objects and skip reasons."""
    files = list_files(folder)
    fast, ref = scan_files(files), scan_files(files, fast=False)
    if repr(fast.others) != repr(ref.others) or fast.skipped != ref.skipped:
        raise HeaderMismatch(f"objects or skips differ: {dict(fast.skipped)} vs pydicom {dict(ref.skipped)}")
    if repr(fast.slices) != repr(ref.slices):
        theirs = {repr(s) for s in ref.slices}
        first = next((s for s in fast.slices if repr(s) not in theirs), None)
        raise HeaderMismatch(f"slices differ ({len(fast.slices)} vs {len(ref.slices)}), first: "
                             f"{first.path.name if first else '?'}")
    # batch discovery: its fast path (layouts, plain values) must equal pydicom file for file
    quick, slow = read_headers(files), read_headers(files, fast=False)
    if quick != slow:
        i = next(k for k, (a, b) in enumerate(zip(quick, slow)) if a != b)
        raise HeaderMismatch(f"batch discovery differs on {files[i].name}: {quick[i]!r} vs pydicom {slow[i]!r}")


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/pipeline/" in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    loc = f"{Path(where.filename).name}:{where.lineno} {where.name}" if where else "?"
    return f"{type(exc).__name__} at {loc}"


def _alarm(signum, frame):  # noqa: ANN001
    raise CaseTimeout("case took too long")


def run_fuzz(seconds: float = 60.0, seed: int = 0, max_cases: int | None = None, save: Path | None = None,
             case_timeout: float = 20.0, max_voxels: int = 50_000_000) -> FuzzReport:
    """Mutate and load inputs until the time budget or ``max_cases`` is spent."""
    logging.getLogger().setLevel(logging.CRITICAL)
    rng = random.Random(seed)
    report = FuzzReport()
    with tempfile.TemporaryDirectory(prefix="osteoplan-fuzz-") as tmp:
        tmp_path = Path(tmp)
        bases = _base_cases(tmp_path / "bases", np.random.default_rng(seed))
        names = sorted(bases)
        deadline = time.monotonic() + seconds
        use_alarm = hasattr(signal, "setitimer")
        old = signal.signal(signal.SIGALRM, _alarm) if use_alarm else None
        try:
            while time.monotonic() < deadline and (max_cases is None or report.cases < max_cases):
                report.cases += 1
                name = names[report.cases % len(names)] if rng.random() < 0.5 else rng.choice(names)
                case_dir = tmp_path / f"case{report.cases:06d}"
                case_dir.mkdir()
                target = _prepare_case(bases[name], case_dir, rng)
                t0 = time.perf_counter()
                try:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, case_timeout)
                    try:
                        vol = load_input(target, max_voxels=max_voxels)
                        assert vol.array.shape == vol.geometry.shape
                        report.loaded += 1
                    except OsteoplanError as exc:
                        report.refused[type(exc).__name__] += 1
                        report.messages[re.sub(r"[0-9][0-9.,]*", "#", str(exc))[:90]] += 1
                    if target.is_dir():
                        compare_headers(target)
                        report.compared += 1
                except BaseException as exc:  # noqa: BLE001 - anything else is a finding
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    sig = _signature(exc)
                    report.findings.setdefault(sig, []).append(f"{name}#{report.cases}")
                    report.details.setdefault(sig, "".join(traceback.format_exception(exc))[-3000:])
                    if save is not None:
                        dest = Path(save) / f"{len(report.findings):03d}_{name}_{report.cases}"
                        if not dest.exists():
                            shutil.copytree(case_dir, dest)
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                report.slowest_s = max(report.slowest_s, time.perf_counter() - t0)
                shutil.rmtree(case_dir, ignore_errors=True)
        finally:
            if use_alarm:
                signal.signal(signal.SIGALRM, old)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60 s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--save", type=Path, default=None, help="keep inputs that produced findings here")
    ap.add_argument("--verbose", action="store_true", help="also list the refusal messages")
    ap.add_argument("--case-timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    args = ap.parse_args(argv)
    rep = run_fuzz(args.seconds, args.seed, args.max_cases, args.save, args.case_timeout)
    print(f"cases {rep.cases}: loaded {rep.loaded}, refused {dict(rep.refused)}, slowest {rep.slowest_s:.2f} s; "
          f"header pass compared with pydicom on {rep.compared} folders")
    if args.verbose:
        for msg, n in rep.messages.most_common():
            print(f"  {n:5d}  {msg}")
    if not rep.findings:
        print("no findings")
        return 0
    for sig, cases in sorted(rep.findings.items(), key=lambda kv: -len(kv[1])):
        print(f"FINDING x{len(cases)}: {sig}  (e.g. {cases[0]})")
        print("    " + rep.details[sig].strip().splitlines()[-1])
    return 1


if __name__ == "__main__":
    sys.exit(main())
