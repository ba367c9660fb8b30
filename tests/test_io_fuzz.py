"""A short run of scripts/fuzz_ingest.py: mutated inputs load or raise OsteoplanError, nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_module import load_script  # noqa: E402


def _fuzz_module():
    return load_script("fuzz_ingest.py", "fuzz_ingest")


def test_mutator_changes_bytes_deterministically():
    fuzz = _fuzz_module()
    import random

    data = bytes(range(256)) * 4
    a = fuzz.mutate(data, random.Random(5))
    b = fuzz.mutate(data, random.Random(5))
    assert a == b and a != data


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzz_short_run_has_no_findings(seed):
    fuzz = _fuzz_module()
    report = fuzz.run_fuzz(seconds=60, seed=seed, max_cases=30, case_timeout=30)
    assert report.cases == 30
    assert report.loaded > 0, "the mutations should leave some inputs loadable"
    assert sum(report.refused.values()) > 0, "and make some of them refused"
    assert report.compared > 10, "DICOM folders' header passes are compared with pydicom's"
    assert not report.findings, "\n\n".join(report.details.values())


def test_a_header_pass_that_differs_from_pydicom_is_a_finding(tmp_path, monkeypatch):
    import dataclasses

    import numpy as np

    from pipeline.io import discover
    from pipeline.io.dicom_write import write_ct_series
    from pipeline.types import Geometry

    fuzz = _fuzz_module()
    g = Geometry((6, 5, 4), (0.8, 0.9, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    write_ct_series(np.zeros(g.shape, np.int16), g, tmp_path / "ct")
    fuzz.compare_headers(tmp_path / "ct")  # the same: no exception
    original = discover._read_header

    def off_by_a_bit(path, fast, heads, memo=None):  # a fast reader that gets one position wrong
        result = original(path, fast, heads, memo)
        if fast and path.name.endswith("2.dcm"):
            result = [dataclasses.replace(result[0], ipp=(0.0, 0.0, 1e-3))]
        return result

    monkeypatch.setattr(discover, "_read_header", off_by_a_bit)
    with pytest.raises(fuzz.HeaderMismatch, match="slices differ"):
        fuzz.compare_headers(tmp_path / "ct")
