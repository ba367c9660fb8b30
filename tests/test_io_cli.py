"""CLI exit codes for bad input: one line on stderr, no traceback (needs the model bundle to start)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "osteoplan-spine" / "metadata.json"

pytestmark = pytest.mark.skipif(not BUNDLE.exists(),
                                reason=f"model bundle {BUNDLE.relative_to(ROOT)} not built yet (the CLI loads it first)")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_empty_folder_exits_3(tmp_path):
    (tmp_path / "in").mkdir()
    r = _run(["run", str(tmp_path / "in"), "-o", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(_errors(r.stderr)) == 1 and "no CT series" in r.stderr


def test_missing_input_exits_2(tmp_path):
    r = _run(["run", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr


def test_single_slice_exits_2(tmp_path):
    from pipeline.io.dicom_write import write_ct_series

    import numpy as np
    from pipeline.types import Geometry

    write_ct_series(np.zeros((8, 8, 1), np.int16), Geometry((8, 8, 1), (1, 1, 1), (0, 0, 0), np.eye(3)),
                    tmp_path / "in")
    (tmp_path / "in" / "junk.txt").write_text("x")
    r = _run(["run", str(tmp_path / "in"), "-o", str(tmp_path / "out")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errs = _errors(r.stderr)
    assert len(errs) == 1 and "slice" in errs[0], errs
