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
    assert not report.findings, "\n\n".join(report.details.values())
