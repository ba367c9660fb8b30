"""Smoke tests of scripts/bench.py on a tiny generated study (no timing assertions)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_module import load_script  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench.py"


bench = load_script("bench.py", "osteoplan_bench")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench")
    return cache, bench.ensure_data(cache, "tiny")


def _ns(data, **kw) -> argparse.Namespace:
    base = {"data": json.dumps({k: str(v) for k, v in data.__dict__.items()}), "repeat_io": 1, "labels_in": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_parse_size_accepts_names_and_shapes():
    assert bench.parse_size("full") == "full"
    assert bench.parse_size("512,512,400") == "bench400"
    assert bench.parse_size("512x512x300") == "full"
    with pytest.raises(SystemExit):
        bench.parse_size("100,100,100")


def test_tiny_data_is_generated_once_and_reused(tiny):
    cache, data = tiny
    assert (data.root / ".complete").is_file()
    assert any(data.study.rglob("*")) and any(data.baseline_series.iterdir()) and data.truth.is_file()
    stamp = (data.root / ".complete").stat().st_mtime
    again = bench.ensure_data(cache, "tiny")
    assert again == data and (data.root / ".complete").stat().st_mtime == stamp


def test_distance_worker_agrees_with_the_whole_volume_edt(tiny):
    _, data = tiny
    out = bench.worker_distance(_ns(data))
    truth = out["truth"]
    assert truth["lesions"] >= 2
    assert truth["max_abs_diff_mm"] <= 0.01 and truth["report_matches"]
    assert len(truth["centre_mm"]) == len(truth["edt_mm"]) == truth["lesions"]


def test_bytes_worker_reports_cache_and_memory_states(tiny):
    from pipeline.io.arena import ARENA, DEFAULT_SLOTS

    _, data = tiny
    out = bench.worker_bytes(_ns(data))
    assert out["files"] >= 28 and out["bytes"] > 0
    for label in ("cold", "warm", "warm_fresh"):
        assert out[label]["load_s"] > 0 and out[label]["bytes_s"] > 0 and out[label]["ratio"] > 0
    assert ARENA.slots == DEFAULT_SLOTS  # the fresh-memory row turned recycling back on


def test_probe_attributes_stage_peaks():
    probe = bench.Probe()
    try:
        with probe.stage("outer"):
            with probe.stage("inner"):
                block = bytearray(64 << 20)  # 64 MB touched
                block[::4096] = b"x" * len(block[::4096])
            del block
        log = probe.log.as_dict()
        assert set(log["wall_s"]) == {"outer", "inner"}
        assert log["peak_rss_gb"]["outer"] >= log["peak_rss_gb"]["inner"] > 0.05
    finally:
        probe.sampler.stop()


def test_report_states_pass_and_fail():
    args = argparse.Namespace(size="full", device="cpu", repeat=1, modes=["default", "fast"])
    run = {"timings_s": {"load": 1.0, "inference": 10.0, "total": 20.0}, "cpu_s": {"load": 1.0}, "run_cpu_s": 30.0,
           "peak_rss_gb": {"load": 0.5}, "run_peak_rss_gb": 1.0, "loadavg_before": [1, 1, 1],
           "loadavg_after": [1, 1, 1], "lesions": []}
    fast = {**run, "timings_s": {"load": 1.0, "total": 16.0}}
    base_run = {"run_wall_s": 100.0, "run_cpu_s": 100.0, "wall_s": {"load": 5.0}, "cpu_s": {"load": 5.0},
                "peak_rss_gb": {"load": 2.0}, "run_peak_rss_gb": 5.0, "loadavg_before": [1, 1, 1],
                "loadavg_after": [1, 1, 1], "labels_shape": [1, 1, 1], "edt_distances_mm": []}
    results = {"machine": {"host_cpu": "cpu", "logical_cpus": 2, "physical_cores": 2, "memory_gb": 8, "torch": "t",
                           "torch_threads": 2, "monai": "m", "python": "3.11", "date": "d", "commit": "c",
                           "loadavg": [1, 1, 1]},
               "ours_default": {"runs": [run], "process_maxrss_gb": 1.5},
               "ours_fast": {"runs": [fast], "process_maxrss_gb": 1.2},
               "baseline": {"runs": [base_run], "process_maxrss_gb": 5.0}}
    text, verdict = bench.build_report(results, args)
    assert verdict["end to end default <= 45 s"] is True
    assert verdict["end to end --fast <= 15 s"] is False
    assert verdict[">= 3x faster than the baseline"] is True  # 100 s vs 20 s
    assert "5.0x" in text and "FAIL" in text


@pytest.mark.slow
def test_bench_script_end_to_end_on_tiny(tiny):
    """The real script, all its worker processes (fast mode + baseline) on the tiny study."""
    if not (REPO / "models" / "osteoplan-spine" / "metadata.json").is_file():
        pytest.skip("model bundle models/osteoplan-spine is not present")
    cache, _ = tiny
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--modes", "fast", "--cache", str(cache),
                           "--timeout", "300"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| inference |" in proc.stdout and "end to end" in proc.stdout and "Targets" in proc.stdout
    results = sorted((cache / "results").glob("bench-*-cpu-tiny.json"))
    assert results
    data = json.loads(results[-1].read_text())
    for part in ("bytes", "ours_fast", "baseline", "distance"):
        assert "error" not in data[part], data[part]
    run = data["ours_fast"]["runs"][0]
    assert {"load", "preprocess", "inference", "postprocess", "measure", "plan", "write"} <= set(run["timings_s"])
    assert set(run["peak_rss_gb"]) >= {"inference", "write"}
    assert data["baseline"]["runs"][0]["labels_shape"] == [80, 72, 28]
