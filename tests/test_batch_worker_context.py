"""Batch workers come from a fork server that imported the heavy modules once (spawn elsewhere)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from pipeline.batch import local


def _modules_loaded(q) -> None:
    q.put([m for m in local.WORKER_PRELOAD if m in sys.modules])


@pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="no fork server on this platform")
def test_workers_start_with_the_preloaded_modules():
    ctx = local.worker_context()
    assert ctx.get_start_method() == "forkserver"
    q = ctx.SimpleQueue()
    p = ctx.Process(target=_modules_loaded, args=(q,))
    p.start()
    loaded = q.get()
    p.join(timeout=60)
    # a spawned interpreter would have none of them before the target imports them
    assert loaded == list(local.WORKER_PRELOAD)


def test_spawn_can_be_asked_for(monkeypatch):
    monkeypatch.setenv(local.WORKER_START_ENV, "spawn")
    assert local.worker_context().get_start_method() == "spawn"
    monkeypatch.setenv(local.WORKER_START_ENV, "bogus")
    expected = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    assert local.worker_context().get_start_method() == expected


def test_driver_liveness_is_by_pid_not_parenthood():
    assert local._alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not local._alive(proc.pid)


def test_preloaded_modules_touch_no_cuda_at_import():
    """A fork server must not initialise CUDA: workers forked after that could not use the GPU."""
    code = """
import importlib, sys, torch
calls = []
for name in ("is_available", "device_count", "init", "current_device", "get_device_name",
             "get_device_properties", "is_bf16_supported", "synchronize"):
    orig = getattr(torch.cuda, name)
    setattr(torch.cuda, name, lambda *a, _n=name, _o=orig, **k: calls.append(_n) or _o(*a, **k))
from pipeline.batch.local import WORKER_PRELOAD
for m in WORKER_PRELOAD:
    importlib.import_module(m)
print(",".join(calls) or "none")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "none"
