"""Native 16-bit pixels read straight into the volume give the values of the plain reference.

The reference is the previous code path, written out here on purpose: one ``pread`` per slice
into a new array, then ``_fix_bits`` and ``_store_hu`` (masking / sign extension, HU in int16
when every slice fits, float32 otherwise).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.io.discover import SliceHeader, read_header
from pipeline.io.pixels import _fix_bits, _store_hu, decode_stack, integral_rescale

from io_helpers import geometry, random_hu, write_ct_series, write_enhanced_ct


def reference(slices: list[SliceHeader]) -> np.ndarray:
    rows, cols = slices[0].rows, slices[0].cols
    buf = np.empty((len(slices), rows, cols), np.int16 if integral_rescale(slices) else np.float32)
    overflow: dict[int, np.ndarray] = {}
    for k, s in enumerate(slices):
        with open(s.path, "rb") as fh:
            fh.seek(s.pixel_offset)
            data = fh.read(rows * cols * 2)
        raw = np.frombuffer(data, "<i2" if s.pixel_representation else "<u2").reshape(rows, cols)
        _store_hu(_fix_bits(raw, s), s, buf, k, overflow)
    if overflow:
        buf = buf.astype(np.float32)
        for k, v in overflow.items():
            buf[k] = v
    return buf


def assert_same(slices: list[SliceHeader]) -> None:
    want = reference(slices)
    got = decode_stack(slices)
    assert not got.failed
    assert got.buf.dtype == want.dtype
    np.testing.assert_array_equal(got.buf, want)


def _template(tmp: Path, ts: str) -> Path:
    g = geometry(shape=(9, 7, 1))
    return write_ct_series(random_hu(g.shape, 5), g, tmp / f"template-{ts}", transfer_syntax=ts).files[0]


def _stored(rng: np.random.Generator, signed: bool, bits: int, shape=(7, 9)) -> np.ndarray:
    """Stored values over the whole bit range, with junk above BitsStored and both extremes."""
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    values.flat[0], values.flat[1] = info.min, info.max
    if bits == 16:
        return values
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values.flat[2], values.flat[3] = lo, hi
    return values


def _write(template: Path, out: Path, stored: np.ndarray, bits: int, signed: bool, slope: float,
           intercept: float) -> SliceHeader:
    ds = pydicom.dcmread(template)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(out)
    (s,) = read_header(out)
    assert s.pixel_offset is not None
    return s


CASES = list(itertools.product([False, True], [16, 12, 10], [1, 2, -1], [0, -1024, 1000, -40000]))


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_every_bits_and_rescale_combination(tmp_path, ts):
    template = _template(tmp_path, ts)
    rng = np.random.default_rng(0)
    for n, (signed, bits, slope, intercept) in enumerate(CASES):
        stored = _stored(rng, signed, bits)
        s = _write(template, tmp_path / f"c{n}.dcm", stored, bits, signed, slope, intercept)
        assert_same([s])  # whole range: often outside int16 -> float32
        small = np.clip(stored, 0, 2000).astype(stored.dtype)  # fits int16 for most rescales
        s = _write(template, tmp_path / f"s{n}.dcm", small, bits, signed, slope, intercept)
        assert_same([s])


def _unsigned_stack(tmp_path, prefix: str, n: int, seed: int, big_slice: int, big_at: tuple[int, int],
                    big_value: int) -> list:
    """``n`` unsigned 16-bit 7x9 slices (intercept -1024) in explicit VR; slice ``big_slice`` holds
    ``big_value`` at ``big_at``, which takes its HU out of int16."""
    template = _template(tmp_path, "explicit")
    rng = np.random.default_rng(seed)
    slices = []
    for k in range(n):
        stored = rng.integers(0, 4095, size=(7, 9)).astype(np.uint16)
        if k == big_slice:
            stored[big_at] = big_value
        slices.append(_write(template, tmp_path / f"{prefix}{k}.dcm", stored, 16, False, 1, -1024))
    return slices


def test_mixed_stack_with_one_slice_out_of_int16(tmp_path):
    slices = _unsigned_stack(tmp_path, "m", 4, seed=1, big_slice=2, big_at=(0, 0), big_value=65535)
    assert_same(slices)
    assert decode_stack(slices).buf.dtype == np.float32


def test_non_integral_rescale_gives_float32(tmp_path):
    template = _template(tmp_path, "implicit")
    stored = _stored(np.random.default_rng(2), True, 12)
    s = _write(template, tmp_path / "f.dcm", stored, 12, True, 0.5, -1024.25)
    assert_same([s])
    assert decode_stack([s]).buf.dtype == np.float32


def test_enhanced_ct_frames(tmp_path):
    g = geometry(shape=(9, 7, 5))
    path = write_enhanced_ct(tmp_path / "enh.dcm", random_hu(g.shape, 3), g, per_frame_rescale=True)
    slices = read_header(path)
    assert len(slices) == 5 and all(s.pixel_offset is not None for s in slices)
    assert_same(slices)
    assert_same(slices[::-1])


def test_truncated_after_the_header_pass_fails_cleanly(tmp_path):
    template = _template(tmp_path, "explicit")
    s = _write(template, tmp_path / "t.dcm", _stored(np.random.default_rng(3), True, 16), 16, True, 1, 0)
    data = s.path.read_bytes()
    s.path.write_bytes(data[:-10])
    got = decode_stack([s])
    assert got.failed == [0] and "shorter" in got.errors[0]


def test_many_files_read_by_threads_in_file_order(tmp_path):
    # enough files for the threaded path; one slice out of int16, one file gone
    slices = _unsigned_stack(tmp_path, "n", 13, seed=4, big_slice=5, big_at=(3, 3), big_value=65000)
    assert_same(slices)
    slices[8].path.unlink()
    got = decode_stack(slices)
    assert got.failed == [8] and got.errors[0].startswith("FileNotFoundError")
    want = reference([s for k, s in enumerate(slices) if k != 8])
    np.testing.assert_array_equal(np.delete(got.buf, 8, axis=0), want)
    assert decode_stack(slices, workers=1).failed == [8]
