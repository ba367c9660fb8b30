"""The training schedule fitted to a wall-time budget follows the steady step rate (issue 4 follow-up)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.train import trainer


def _simulate(monkeypatch, fast_steps: int, fast_s: float, slow_s: float, limit: float, max_steps: int = 100_000):
    clock = [0.0]
    monkeypatch.setattr(trainer.time, "time", lambda: clock[0])
    cfg = SimpleNamespace(time_limit_s=limit, max_steps=max_steps)
    last, sched, rates, step = max_steps, [max_steps], {}, 0
    while step < last:
        step += 1
        clock[0] += fast_s if step <= fast_steps else slow_s
        last = trainer._fit_to_time(cfg, step, last, 0.0, rates, sched)
    return step, clock[0], sched[0]


def test_schedule_follows_a_slower_steady_rate(monkeypatch):
    # prefetched batches first (0.03 s/step), then the loader is the limit (0.15 s/step), 110 s budget
    stop, elapsed, sched = _simulate(monkeypatch, fast_steps=120, fast_s=0.03, slow_s=0.15, limit=110.0)
    assert elapsed <= 110.0 + 0.15  # stopped at the limit at the latest
    # the schedule ends about when the budget does: the learning rate has annealed
    assert stop == sched or sched - stop <= 0.05 * sched
    assert 780 <= sched <= 830  # 120 fast steps + (110 - 3.6) / 0.15 slow ones = 829, with 3 % to spare


def test_a_steady_rate_keeps_the_first_fit(monkeypatch):
    stop, elapsed, sched = _simulate(monkeypatch, fast_steps=0, fast_s=0.1, slow_s=0.1, limit=50.0)
    assert stop == sched and 470 <= sched <= 500 and elapsed <= 50.0


@pytest.mark.parametrize("max_steps", [300])
def test_the_schedule_never_exceeds_max_steps(monkeypatch, max_steps):
    stop, _, sched = _simulate(monkeypatch, fast_steps=0, fast_s=0.01, slow_s=0.01, limit=100.0, max_steps=max_steps)
    assert sched <= max_steps and stop == max_steps
