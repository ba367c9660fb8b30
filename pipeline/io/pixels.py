"""Decode the pixel data of one stack straight into a preallocated (slice, row, column) array, in HU.

Rules (README "Input" copies them):

- HU = stored value * RescaleSlope + RescaleIntercept, per slice (per frame for enhanced CT);
  slope 1 / intercept 0 when the image has none. Bits above BitsStored are masked (unsigned) or
  sign-extended (signed).
- The array is int16 when every slope and intercept is a whole number and every slice's HU fits
  in int16 (a 512x512x300 CT stays ~160 MB); otherwise float32.
- Uncompressed little-endian 16-bit data is read with one ``preadv`` per slice at the offset the
  header pass recorded: straight into the output array when the stored values are already HU;
  otherwise into a one-slice buffer per thread that stays in the CPU cache, where bits are fixed,
  the int16 range is checked (with only the min or max it needs) and HU computed into the output
  array by the last pass.
  Two threads share these files. Each reads from the page cache first (``RWF_NOWAIT``); once
  files are not cached it keeps its next files open with their pixel bytes advised
  (POSIX_FADV_WILLNEED), so a cold cache is read several files at a time. Anything else (JPEG
  2000, JPEG-LS, RLE, big endian, 8/32-bit) goes through pydicom's decoders (pylibjpeg /
  openjpeg for JPEG 2000), spread over a small thread pool.
- A file that fails to decode does not stop the load: its slices are reported as failed and the
  caller treats them as missing slices.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

import pipeline.io  # noqa: F401  (pydicom configuration)
from pipeline.io.arena import ARENA
from pipeline.io.discover import CacheFirstReads, SliceHeader

log = logging.getLogger("osteoplan.io")

INT16_MIN, INT16_MAX = -32768, 32767
LITTLE_ENDIAN_HOST = sys.byteorder == "little"  # native pixels are read straight into native int16
NATIVE_THREADS = 2  # threads reading native files (more gained nothing on the 2-core bench machine)
READ_AHEAD_FILES = 16  # native files each thread keeps open and advised ahead of the one it reads (once cold)


@dataclass
class Decoded:
    """``buf[k]`` is slice k as (rows, cols) HU; ``failed`` lists slices that could not be decoded."""

    buf: np.ndarray
    failed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def integral_rescale(slices: list[SliceHeader]) -> bool:
    """True when every slope/intercept is a whole number, so HU can be stored as integers."""
    return all(float(s.slope).is_integer() and float(s.intercept).is_integer() and s.bits_allocated <= 16
               for s in slices)


def decode_stack(slices: list[SliceHeader], workers: int | None = None) -> Decoded:
    """Decode ``slices`` (all the same rows x cols) into one array of HU, slice k at ``buf[k]``."""
    rows, cols = slices[0].rows, slices[0].cols
    dtype = np.int16 if integral_rescale(slices) else np.float32
    buf = ARENA.empty((len(slices), rows, cols), dtype)  # recycled memory of a volume no longer used
    overflow: dict[int, np.ndarray] = {}
    groups = _file_groups(slices)
    failed: list[int] = []
    errors: list[str] = []

    def task(ks: list[int]) -> tuple[list[int], str | None]:
        try:
            for k, raw in _read_file(slices, ks):
                _store_hu(raw, slices[k], buf, k, overflow)
            return [], None
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the load
            return ks, _error_text(exc)

    fast: list[list[int]] = []
    slow: list[list[int]] = []
    for ks in groups:
        (fast if _is_fast(slices, ks) else slow).append(ks)
    n_workers = workers or min(8, os.cpu_count() or 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = _read_native_all(slices, fast, buf, overflow, min(NATIVE_THREADS, n_workers))
        # decoders (openjpeg...) release the GIL
        if n_workers <= 1 or len(slow) <= 2:
            results += [task(ks) for ks in slow]
        else:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                results += list(pool.map(task, slow))
    for ks, err in results:
        if err is not None:
            failed.extend(ks)
            errors.append(err)
            log.info("pixel data of %d slice(s) could not be decoded: %s", len(ks), err)
    if overflow:
        log.info("%d slice(s) exceed the int16 range; storing HU as float32", len(overflow))
        buf = buf.astype(np.float32)
        for k, v in overflow.items():
            buf[k] = v
    return Decoded(buf, sorted(failed), errors)


def _file_groups(slices: list[SliceHeader]) -> list[list[int]]:
    """The slice indices of each file, in order of first appearance: the frames of a multi-frame
    file are decoded together; a single-frame file is a group of its own (the same file listed
    twice is read twice, with the same result as reading it once for both)."""
    groups: list[list[int]] = []
    frames: dict[Path, list[int]] = {}
    for k, s in enumerate(slices):
        if s.frame is None:
            groups.append([k])
        elif s.path in frames:
            frames[s.path].append(k)
        else:
            frames[s.path] = [k]
            groups.append(frames[s.path])
    return groups


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _read_native_all(slices: list[SliceHeader], groups: list[list[int]], buf: np.ndarray,
                     overflow: dict[int, np.ndarray], threads: int) -> list[tuple[list[int], str | None]]:
    """Read the native files ``groups`` (slice indices of one file each); (ks, error) per file.

    With ``threads`` > 1 each thread takes every n-th file: preadv and the numpy passes release
    the GIL, so page faults, copies and I/O waits overlap (measured on the 2-core bench machine:
    2 threads beat 1 warm and cold, more gain nothing).
    """
    if threads <= 1 or len(groups) < 4 * threads:
        return _read_native_files(slices, groups, buf, overflow)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(lambda i: _read_native_files(slices, groups[i::threads], buf, overflow),
                              range(threads)))
    results: list[tuple[list[int], str | None]] = [([], None)] * len(groups)
    for i, part in enumerate(parts):
        results[i::threads] = part  # back to file order
    return results


def _read_native_files(slices: list[SliceHeader], groups: list[list[int]], buf: np.ndarray,
                       overflow: dict[int, np.ndarray]) -> list[tuple[list[int], str | None]]:
    """Read the files ``groups`` in order; once the page cache looks cold, keep the next
    READ_AHEAD_FILES open and advised.

    Each file's pixel bytes are first read with ``RWF_NOWAIT`` (only what the page cache holds,
    never waiting on the disk): a warm study costs no advice at all. COLD_AFTER_MISSES files in a
    row that miss switch this reader to read-ahead: from then on each file is opened
    READ_AHEAD_FILES before it is read, with POSIX_FADV_WILLNEED on its pixel bytes, so a cold
    cache is read several files at a time instead of one after the other. Only timing depends on the cache: the values and
    errors are the same.
    """
    results: list[tuple[list[int], str | None]] = []
    scratch = np.empty(buf.shape[1:], np.int16)  # this thread's one-slice read buffer (every slice is rows x cols)
    pending = iter(groups)
    ahead: deque[tuple[list[int], int | OSError]] = deque()

    def top_up() -> None:
        while len(ahead) < READ_AHEAD_FILES:
            ks = next(pending, None)
            if ks is None:
                return
            ahead.append((ks, _open_advised(slices, ks)))

    reader = CacheFirstReads(top_up)
    try:
        if not reader.nowait:
            top_up()  # no page-cache reads here: read ahead from the start
        while True:
            if ahead:
                ks, fd = ahead.popleft()
                top_up()
            else:
                ks = next(pending, None)
                if ks is None:
                    break
                fd = _open_plain(slices, ks)
            if isinstance(fd, OSError):
                results.append((ks, _error_text(fd)))
                continue
            try:
                _read_native(fd, slices, ks, buf, overflow, reader, scratch)
                results.append(([], None))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the load
                results.append((ks, _error_text(exc)))
            finally:
                os.close(fd)
    finally:
        for _, fd in ahead:
            if not isinstance(fd, OSError):
                os.close(fd)
    return results


def _open_plain(slices: list[SliceHeader], ks: list[int]) -> int | OSError:
    """An open descriptor for the file of slices ``ks`` (no advice: it may well be cached)."""
    try:
        return os.open(slices[ks[0]].path, os.O_RDONLY)
    except OSError as exc:
        return exc


def _open_advised(slices: list[SliceHeader], ks: list[int]) -> int | OSError:
    """An open descriptor for the file of slices ``ks``, its pixel bytes advised WILLNEED."""
    try:
        fd = os.open(slices[ks[0]].path, os.O_RDONLY)
    except OSError as exc:
        return exc
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        start = min(int(slices[k].pixel_offset or 0) for k in ks)
        end = max(int(slices[k].pixel_offset or 0) + slices[k].rows * slices[k].cols * 2 for k in ks)
        try:
            advise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advice only
    return fd


def _is_fast(slices: list[SliceHeader], ks: list[int]) -> bool:
    """Uncompressed little-endian 16-bit pixels at a known offset: read straight into the array."""
    return LITTLE_ENDIAN_HOST and all(
        slices[k].pixel_offset is not None and slices[k].bits_allocated == 16 and slices[k].samples_per_pixel == 1
        for k in ks)


def _read_native(fd: int, slices: list[SliceHeader], ks: list[int], buf: np.ndarray,
                 overflow: dict[int, np.ndarray], reader: CacheFirstReads, scratch: np.ndarray) -> None:
    """The slices ``ks`` of one open file: one ``preadv`` each, then bits fixed and HU computed --
    the same values as ``_fix_bits`` + ``_store_hu`` on a copy.

    A slice that needs no arithmetic (16 stored bits, signed, slope 1, intercept 0, int16 ``buf``)
    is read straight into ``buf[k]``. Any other is read into this thread's one-slice ``scratch``
    buffer, which stays in the CPU cache: the bits, the int16 range check and the HU are computed
    there and written to ``buf[k]`` by the last pass, so the volume's memory is written once and
    never read back.
    """
    for k in ks:
        s = slices[k]
        plain = buf.dtype == np.int16 and _needs_no_arithmetic(s)
        target = buf[k] if plain else scratch
        if reader.read_into(fd, memoryview(target).cast("B"), int(s.pixel_offset), target.nbytes) != target.nbytes:
            raise ValueError("pixel data shorter than Rows x Columns")
        if plain:
            continue
        raw = target.view(np.int16 if s.pixel_representation else np.uint16)
        _fix_bits_inplace(raw, s)
        if buf.dtype == np.int16:
            _hu_into(raw, s, buf, k, overflow)
        else:
            _store_hu(raw, s, buf, k, overflow)  # float32 stack: the plain conversion


def _needs_no_arithmetic(s: SliceHeader) -> bool:
    """Stored values are HU as they are: all 16 bits stored, signed, slope 1, intercept 0."""
    return (s.pixel_representation == 1 and not (0 < s.bits_stored < 16)
            and float(s.slope) == 1.0 and float(s.intercept) == 0.0)


def _fix_bits_inplace(raw: np.ndarray, s: SliceHeader) -> None:
    """``_fix_bits`` for a 16-bit array, in place."""
    if not (0 < s.bits_stored < 16):
        return
    if s.pixel_representation:
        shift = np.int16(16 - s.bits_stored)
        np.left_shift(raw, shift, out=raw)
        np.right_shift(raw, shift, out=raw)
    else:
        np.bitwise_and(raw, np.uint16((1 << s.bits_stored) - 1), out=raw)


def _stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """The values a 16-bit stored pixel can take once its bits are fixed."""
    bits = bits_stored if 0 < bits_stored < 16 else 16
    if pixel_representation:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@lru_cache(maxsize=256)
def _ends_fit(slope: int, intercept: int, bits_stored: int, pixel_representation: int) -> tuple[bool, bool]:
    """Whether the lowest and the highest HU the stored range allows fit int16 (one answer per
    rescale and encoding: a series has one or a few)."""
    smin, smax = _stored_range(bits_stored, pixel_representation)
    return (min(smin * slope, smax * slope) + intercept >= INT16_MIN,
            max(smin * slope, smax * slope) + intercept <= INT16_MAX)


def _overflows(raw: np.ndarray, slope: int, intercept: int, s: SliceHeader) -> bool:
    """``_store_hu``'s test (raw.min() and raw.max() as HU outside int16?) with fewer passes.

    HU = v * slope + intercept is monotonic in v: when the stored range alone keeps one HU end
    inside int16, only the other end's stored extreme is needed; when it keeps both, none.
    """
    low_ok, high_ok = _ends_fit(slope, intercept, s.bits_stored, s.pixel_representation)
    if low_ok and high_ok:
        return False
    if high_ok:  # only the lowest HU can leave int16
        v = int(raw.min()) if slope > 0 else int(raw.max())
        return v * slope + intercept < INT16_MIN
    if low_ok:  # only the highest HU can
        v = int(raw.max()) if slope > 0 else int(raw.min())
        return v * slope + intercept > INT16_MAX
    ends = (int(raw.min()) * slope + intercept, int(raw.max()) * slope + intercept)
    return min(ends) < INT16_MIN or max(ends) > INT16_MAX


def _hu_into(raw: np.ndarray, s: SliceHeader, buf: np.ndarray, k: int, overflow: dict[int, np.ndarray]) -> None:
    """``buf[k]`` = HU of the stored values ``raw`` (int16 ``buf``), as ``_store_hu``.

    When every HU fits int16, v * slope + intercept computed modulo 2**16 (uint16 arithmetic)
    is exactly the int16 HU; otherwise the slice goes to ``overflow`` as float32.
    """
    slope, intercept = int(s.slope), int(s.intercept)
    if _overflows(raw, slope, intercept, s):
        overflow[k] = (raw.astype(np.float64) * slope + intercept).astype(np.float32)
        return
    wrapped = raw.view(np.uint16)
    out = buf[k].view(np.uint16)
    if slope != 1:
        np.multiply(wrapped, np.uint16(slope % 65536), out=out)
        if intercept != 0:
            np.add(out, np.uint16(intercept % 65536), out=out)
    elif intercept != 0:
        np.add(wrapped, np.uint16(intercept % 65536), out=out)
    else:
        np.copyto(out, wrapped)


def _read_file(slices: list[SliceHeader], ks: list[int]):
    """Yield (k, raw stored values as (rows, cols)) for the slices ``ks`` of one file (pydicom decoders)."""
    first = slices[ks[0]]
    ds = pydicom.dcmread(first.path, force=True)
    if not getattr(ds.file_meta, "TransferSyntaxUID", None):
        ds.file_meta.TransferSyntaxUID = UID(first.transfer_syntax)
    arr = ds.pixel_array
    n_frames = first.n_frames
    if n_frames > 1:
        if arr.ndim != 3 or arr.shape[0] != n_frames:
            raise ValueError("decoded frames do not match NumberOfFrames")
    for k in ks:
        s = slices[k]
        frame = arr[s.frame] if (n_frames > 1 and s.frame is not None) else arr
        if frame.shape != (s.rows, s.cols):
            raise ValueError("decoded image size does not match Rows x Columns")
        yield k, _fix_bits(frame, s)


def _fix_bits(raw: np.ndarray, s: SliceHeader) -> np.ndarray:
    """Mask (unsigned) or sign-extend (signed) values stored in fewer bits than allocated."""
    if raw.dtype.kind not in "iu" or raw.dtype.itemsize != 2 or not (0 < s.bits_stored < 16):
        return raw
    if s.pixel_representation:
        shift = 16 - s.bits_stored
        return (raw.astype(np.int16) << shift) >> shift
    return raw & np.uint16((1 << s.bits_stored) - 1)


def _store_hu(raw: np.ndarray, s: SliceHeader, buf: np.ndarray, k: int, overflow: dict[int, np.ndarray]) -> None:
    """buf[k] = raw * slope + intercept, exactly in int16 when it fits, else in float32."""
    if buf.dtype == np.float32:
        buf[k] = raw.astype(np.float64) * s.slope + s.intercept
        return
    if raw.dtype.kind not in "iu":
        overflow[k] = (raw.astype(np.float64) * s.slope + s.intercept).astype(np.float32)
        return
    slope, intercept = int(s.slope), int(s.intercept)
    lo, hi = int(raw.min()), int(raw.max())
    ends = (lo * slope + intercept, hi * slope + intercept)
    if min(ends) < INT16_MIN or max(ends) > INT16_MAX:
        overflow[k] = (raw.astype(np.float64) * slope + intercept).astype(np.float32)
        return
    if slope == 1:
        if intercept == 0 and raw.dtype == np.int16:
            buf[k] = raw
        else:
            np.add(raw, np.int32(intercept), out=buf[k], casting="unsafe")
    else:
        np.add(raw.astype(np.int32) * slope, intercept, out=buf[k], casting="unsafe")
