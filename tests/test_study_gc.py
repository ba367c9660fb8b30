"""The runner keeps its long-lived objects out of the cyclic garbage collector (gc.freeze)."""

from __future__ import annotations

import gc
import weakref

import pipeline.study as study
from pipeline.study import StudyOptions, StudyRunner, freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freeze_collects_garbage_first_then_freezes_the_living():
    gc.unfreeze()
    dead = _Node()
    gone = weakref.ref(dead)
    del dead  # unreachable cycle: must be collected, not frozen
    alive = _Node()
    before = gc.get_freeze_count()
    freeze_long_lived()
    assert gone() is None
    assert gc.get_freeze_count() > before
    assert not any(o is alive for o in gc.get_objects())  # frozen: no collection walks it any more
    gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())


def test_runner_freezes_when_it_starts_and_after_its_first_study(monkeypatch, shipped_model):
    calls: list[int] = []
    monkeypatch.setattr(study, "freeze_long_lived", lambda: calls.append(1))
    runner = StudyRunner(StudyOptions(device="cpu", formats=("json",)))
    assert calls == [1]
    for n in range(4):
        runner._before_study()
        assert runner.studies_started == n + 1
    assert calls == [1, 1]  # once more at the start of the second study, never after


def test_later_studies_make_no_full_collection_over_the_runner(shipped_model, tmp_path):
    """With the runner's objects frozen, what a collection can walk is only what studies leave."""
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "data_samples" / "phantom01"
    runner = StudyRunner(StudyOptions(device="cpu", formats=("json",)))
    assert gc.get_freeze_count() > 10_000  # torch, MONAI, the model
    for k in range(2):
        runner.run(sample, tmp_path / str(k))
    tracked = len(gc.get_objects())
    assert tracked < 20_000, tracked  # unfrozen: ~550k


def test_batch_fork_server_freezes_what_it_preloaded():
    """The fork server imports WORKER_PRELOAD in order: the last module freezes the others' objects."""
    import subprocess
    import sys

    from pipeline.batch.local import WORKER_PRELOAD

    assert WORKER_PRELOAD[-1] == "pipeline.batch.preload_frozen"
    code = ("import gc, importlib\n"
            f"for m in {list(WORKER_PRELOAD)!r}: importlib.import_module(m)\n"
            "print(gc.get_freeze_count(), len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    frozen, walked = int(out[0]), int(out[1])
    assert frozen > 50_000 and walked < 1_000  # torch, MONAI, the pipeline: frozen before any fork
