"""The volume's array reserved and faulted in during the header pass (pipeline.io.prefault).

The loaded volume must be the same with or without it; it must be used when it fits, dropped
when it does not, and its thread must always end.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.io import load, prefault
from pipeline.io.load import load_input
from pipeline.io.prefault import Prefault

from io_helpers import assert_same_patient_content, geometry, random_hu, write_ct_series


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "osteoplan-prefault"]


@pytest.fixture
def taken(monkeypatch):
    """The arrays Prefault.take handed over (None when it did not fit)."""
    out: list[np.ndarray | None] = []
    original = Prefault.take

    def spy(self, slices, dtype):
        buf = original(self, slices, dtype)
        out.append(buf)
        return buf

    monkeypatch.setattr(Prefault, "take", spy)
    return out


def _write(tmp, name, n, seed=0, **kw):
    g = geometry(shape=(9, 7, n))
    hu = random_hu(g.shape, seed)
    write_ct_series(hu, g, tmp / name, file_names="random", instance_numbers="shuffled", seed=seed, **kw)
    return hu, g


def test_the_reserved_array_becomes_the_volume(tmp_path, taken):
    hu, g = _write(tmp_path, "ct", prefault.MIN_SLICES + 8)
    vol = load_input(tmp_path / "ct")
    assert_same_patient_content(vol, hu, g)
    assert taken and taken[0] is not None and np.shares_memory(vol.array, taken[0])
    assert not _threads()


def test_same_volume_without_it(tmp_path, monkeypatch):
    hu, g = _write(tmp_path, "ct", prefault.MIN_SLICES + 3, seed=4)
    with_it = load_input(tmp_path / "ct")
    monkeypatch.setattr(load.Prefault, "saw", lambda self, s: None)
    without = load_input(tmp_path / "ct")
    np.testing.assert_array_equal(with_it.array, without.array)
    assert repr(with_it.geometry) == repr(without.geometry) and with_it.array.dtype == without.array.dtype


def test_another_series_chosen(tmp_path, taken):
    # the array was reserved for the first series met; the one asked for is another
    _write(tmp_path, "a", prefault.MIN_SLICES + 2, seed=1)
    hu, g = _write(tmp_path, "b", prefault.MIN_SLICES + 5, seed=2, series_number=2)
    from pipeline.io.discover import list_files, scan_files

    files = list_files(tmp_path)
    uids = {s.series_uid for s in scan_files(files).slices}
    want = next(u for u in uids if len([s for s in scan_files(files).slices if s.series_uid == u]) ==
                prefault.MIN_SLICES + 5)
    vol = load_input(tmp_path, series_uid=want)
    assert_same_patient_content(vol, hu, g)
    assert vol.array.shape[2] == prefault.MIN_SLICES + 5
    assert not _threads()


def test_float_hu_does_not_use_it(tmp_path, taken):
    hu, g = _write(tmp_path, "ct", prefault.MIN_SLICES + 1, rescale_slope=0.5)
    vol = load_input(tmp_path / "ct")
    assert vol.array.dtype == np.float32
    assert taken == [None]
    assert not _threads()


def test_small_series_start_no_thread(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name))
    hu, g = _write(tmp_path, "ct", 5)
    vol = load_input(tmp_path / "ct")
    assert_same_patient_content(vol, hu, g)
    assert "osteoplan-prefault" not in started


def test_thread_ends_when_loading_fails(tmp_path, monkeypatch):
    _write(tmp_path, "ct", prefault.MIN_SLICES + 1)

    def boom(*a, **k):
        raise RuntimeError("selection failed")

    monkeypatch.setattr(load, "choose_series", boom)
    with pytest.raises(RuntimeError):
        load_input(tmp_path / "ct")
    assert not _threads()


def test_touches_no_more_slices_than_headers_seen(tmp_path):
    from pipeline.io.discover import list_files, scan_files

    _write(tmp_path, "ct", prefault.MIN_SLICES + 20)
    files = list_files(tmp_path / "ct")
    pf = Prefault(len(files) + 100)  # room for far more slices than the series has
    scan_files(files, pf.saw)
    pf.stop()
    assert pf.seen == len(files)
    assert pf.touched <= pf.seen
    assert pf.buf is not None and len(pf.buf) == len(files) + 100
    pf.stop()  # twice is fine
    assert not _threads()
