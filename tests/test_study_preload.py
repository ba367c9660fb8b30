"""run_study() without a runner reads the study in a thread while the runner starts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import pipeline.study as study
from pipeline.errors import InputError
from pipeline.study import StudyOptions, StudyRunner, run_study

SAMPLE = Path(__file__).resolve().parent.parent / "data_samples" / "phantom01"


def test_the_study_is_read_while_the_runner_starts(monkeypatch, tmp_path, shipped_model):
    """The read runs in its own thread during the runner's start; the report has the wait as
    "load" and the read's own duration as "load_read"; same result as a runner reading it."""
    readers: list[str] = []
    from pipeline.io import load as load_mod

    real_load = load_mod.load_input

    def spy(*args, **kwargs):
        readers.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(load_mod, "load_input", spy)
    started = threading.Event()
    real_init = StudyRunner.__init__

    def slow_start(self, options=None):
        started.set()
        time.sleep(0.5)  # a model load: the read overlaps it
        real_init(self, options)

    monkeypatch.setattr(StudyRunner, "__init__", slow_start)
    opts = StudyOptions(device="cpu", formats=("json",))
    result = run_study(SAMPLE, tmp_path / "pre", opts)
    assert readers == ["osteoplan-preload"]
    timings = result.report["timings_s"]
    assert timings["load_read"] > 0 and timings["load"] < timings["load_read"]  # read during the sleep
    assert set(timings) >= {"load", "load_read", "inference", "total"}

    monkeypatch.setattr(StudyRunner, "__init__", real_init)
    direct = StudyRunner(opts).run(SAMPLE, tmp_path / "direct")
    assert [les["min_distance_to_canal_mm"] for les in result.report["lesions"]] == \
        [les["min_distance_to_canal_mm"] for les in direct.report["lesions"]]
    assert readers[-1] == threading.current_thread().name  # a runner reads in the calling thread


def test_a_read_error_is_raised_by_run_study_as_before(tmp_path, shipped_model):
    with pytest.raises(InputError, match="does not exist"):
        run_study(tmp_path / "nothing-here", tmp_path / "out", StudyOptions(device="cpu", formats=("json",)))


def test_a_runner_that_cannot_start_wins_over_the_read(monkeypatch, tmp_path):
    """The runner's own error (e.g. no model) is what the caller sees, as before the preload."""
    def no_model(self, options=None):
        raise InputError("model bundle not found")

    monkeypatch.setattr(StudyRunner, "__init__", no_model)
    with pytest.raises(InputError, match="model bundle"):
        run_study(SAMPLE, tmp_path / "out", StudyOptions(device="cpu"))


def test_preload_returns_the_volume_or_its_error(tmp_path):
    from pipeline.config import load_inference_config
    from pipeline.report.background import BackgroundCall

    limit = load_inference_config(None).memory.max_input_voxels
    good = BackgroundCall(study._read_timed, SAMPLE, None, limit)
    good.start()
    volume, seconds = good.result()
    assert volume.geometry.shape[2] > 3 and seconds > 0
    bad = BackgroundCall(study._read_timed, tmp_path / "missing", None, limit)
    bad.start()
    with pytest.raises(InputError):
        bad.result()
