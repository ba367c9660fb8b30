"""VolumeArena: memory of a released volume is reused; a volume still referred to never is."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from pipeline.io.arena import ARENA, VolumeArena
from pipeline.io.load import load_input

from io_helpers import geometry, random_hu, write_ct_series


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_released_memory_is_reused():
    arena = VolumeArena(slots=2)
    a = arena.empty((4, 8, 8), np.int16)
    first = _address(a)
    del a
    b = arena.empty((4, 8, 8), np.int16)
    assert _address(b) == first and arena.reused == 1
    assert b.shape == (4, 8, 8) and b.dtype == np.int16 and b.flags.c_contiguous and b.flags.writeable


@pytest.mark.parametrize("holder", ["array", "view", "flipped view", "tensor", "memoryview"])
def test_memory_in_use_is_never_handed_out(holder):
    arena = VolumeArena(slots=2)
    a = arena.empty((4, 8, 8), np.int16)
    a[...] = 7
    kept = {"array": lambda: a, "view": lambda: a[1:3], "flipped view": lambda: a[::-1],
            "tensor": lambda: torch.from_numpy(a), "memoryview": lambda: memoryview(a)}[holder]()
    first = _address(a)
    del a
    b = arena.empty((4, 8, 8), np.int16)
    b[...] = -1
    assert _address(b) != first and arena.reused == 0
    assert int(np.asarray(kept).min()) == 7  # what is held is untouched


def test_a_much_larger_block_is_not_pinned_by_a_small_volume():
    arena = VolumeArena(slots=2)
    big = arena.empty((10, 64, 64), np.int16)
    del big
    small = arena.empty((2, 64, 64), np.int16)  # 5x smaller: fresh memory
    assert arena.reused == 0
    del small
    again = arena.empty((6, 64, 64), np.int16)  # the 10-slice block fits within 2x: reused
    assert arena.reused == 1 and again.shape == (6, 64, 64)


def test_slots_bound_what_is_kept_and_clear_frees_idle_buffers():
    arena = VolumeArena(slots=2)
    held = [arena.empty((n, 16, 16), np.int16) for n in (1, 2, 3)]
    assert len(arena._bufs) == 2  # the oldest busy one is forgotten (its owner keeps it alive)
    del held
    gc.collect()
    assert arena.held_bytes() == (2 + 3) * 16 * 16 * 2
    assert arena.clear() == (2 + 3) * 16 * 16 * 2 and arena.held_bytes() == 0


def test_zero_slots_turns_recycling_off():
    arena = VolumeArena(slots=0)
    a = arena.empty((2, 4, 4), np.float32)
    del a
    arena.empty((2, 4, 4), np.float32)
    assert arena.reused == 0 and arena.held_bytes() == 0


def test_two_studies_loaded_in_turn_keep_their_own_values(tmp_path):
    """The loader recycles the memory of a released volume, never of one still in use."""
    g = geometry(shape=(12, 10, 6))
    hu_a, hu_b = random_hu(g.shape, 1), random_hu(g.shape, 2)
    write_ct_series(hu_a, g, tmp_path / "a", file_names="random", seed=1)
    write_ct_series(hu_b, g, tmp_path / "b", file_names="random", seed=2)
    ARENA.clear()
    a = load_input(tmp_path / "a")
    expected_a = a.array.copy()
    b = load_input(tmp_path / "b")  # a is alive: b gets its own memory
    assert not np.shares_memory(a.array, b.array)
    np.testing.assert_array_equal(a.array, expected_a)
    expected_b = b.array.copy()
    a_address = _address(a.array)
    del a
    gc.collect()
    reused_before = ARENA.reused
    a2 = load_input(tmp_path / "a")  # a's memory is free again: recycled, values exact
    assert ARENA.reused == reused_before + 1 and _address(a2.array) == a_address
    np.testing.assert_array_equal(a2.array, expected_a)
    np.testing.assert_array_equal(b.array, expected_b)


def test_prefetched_loads_hold_their_own_values_while_earlier_volumes_come_and_go(tmp_path):
    """As in a batch worker: a thread loads ahead (depth 2) while the consumer holds one volume,
    keeps some and lets others go; every volume keeps exactly its own study's values."""
    from pipeline.batch.prefetch import Prefetcher

    g = geometry(shape=(16, 12, 9))
    folders, truth = [], []
    for i in range(7):
        hu = random_hu(g.shape, 10 + i)
        write_ct_series(hu, g, tmp_path / f"s{i}", file_names="random", seed=i)
        folders.append(tmp_path / f"s{i}")
    ARENA.slots = 0
    try:
        truth = [load_input(f).array.copy() for f in folders]  # fresh memory each: the reference
    finally:
        ARENA.slots = 4
    ARENA.clear()
    kept = []
    reused_before = ARENA.reused
    with Prefetcher(folders, load_input, depth=2) as loads:
        for i, loaded in enumerate(loads):
            assert loaded.error is None
            np.testing.assert_array_equal(loaded.value.array, truth[i])
            if i % 3 == 0:
                kept.append((i, loaded.value))  # held to the end
            del loaded
            gc.collect()
            for j, vol in kept:
                np.testing.assert_array_equal(vol.array, truth[j])
    assert ARENA.reused > reused_before  # memory was recycled along the way
