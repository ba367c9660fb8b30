"""The loader's speed paths (issue 7, warm DICOM loading) give exactly what the plain paths give.

Each test builds the same input twice over: once with the speed path in place, once with it
switched off (the plain path it replaced), and compares everything the loader returns: the
array's values, dtype and shape, the geometry, the provenance, the selection and the warnings.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.io import discover, pixels
from pipeline.io.discover import list_files, read_header, scan_files
from pipeline.io.fastheader import HEAD_BYTES
from pipeline.io.load import load_input
from pipeline.io.pixels import decode_stack

from pipeline.io.dicom_write import write_localizer

from io_helpers import geometry, random_hu, rotation, set_tags, write_ct_series
from test_io_pixels_native import _template, _write, reference


def signature(vol) -> tuple:
    """Everything a Volume carries, arrays as bytes (dtype and shape included)."""
    a = vol.array
    g = vol.geometry
    return (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes(), g.shape, g.spacing, g.origin,
            np.asarray(g.direction).tobytes(), repr(vol.dicom), vol.input_path, vol.input_kind,
            repr(vol.selection), list(vol.warnings))


def _series(tmp: Path, name: str, **kw) -> Path:
    direction = kw.pop("direction", None)
    g = geometry(shape=(11, 9, 7), direction=direction)
    write_ct_series(random_hu(g.shape, 5), g, tmp / name / "ct", file_names="random",
                    instance_numbers="shuffled", seed=3, **kw)
    return tmp / name


SERIES = {
    "plain": {},
    "implicit": {"transfer_syntax": "implicit"},
    "oblique": {"direction": rotation((0.3, -0.2, 1.0), 17.0)},
    "feet-first": {"direction": np.diag([-1.0, 1.0, -1.0]), "patient_position": "FFS"},
    "slope2": {"rescale_slope": 2, "rescale_intercept": -2048},
    "no-intercept": {"rescale_intercept": 0},
    "fractional": {"rescale_slope": 0.5, "rescale_intercept": -1024.5},
}


def _stack(tmp_path, n=13) -> list:
    template = _template(tmp_path, "explicit")
    rng = np.random.default_rng(9)
    out = []
    for k in range(n):
        stored = rng.integers(-2000, 3000, size=(7, 9)).astype(np.int16)
        out.append(_write(template, tmp_path / f"p{k}.dcm", stored, 12, True, 1, -1024))
    return out


def _missing_preadv(miss: str, partial, calls: dict | None = None):
    """An ``os.preadv`` whose RWF_NOWAIT reads miss the page cache as ``miss`` says: "none cached"
    (EAGAIN), "unsupported" (EOPNOTSUPP) or "partial" (only ``partial(buffer)`` is filled)."""
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        if not flags:
            return real_preadv(fd, buffers, offset)
        assert flags == os.RWF_NOWAIT
        if calls is not None:
            calls["nowait"] = calls.get("nowait", 0) + 1
        if miss == "none cached":
            raise BlockingIOError(errno.EAGAIN, "would block")
        if miss == "unsupported":
            raise OSError(errno.EOPNOTSUPP, "not supported")
        (target,) = buffers
        return real_preadv(fd, [partial(target)], offset)

    return preadv


def _spy(monkeypatch, module, name: str, record) -> list:
    """``module.name`` still runs; the returned list gets ``record(*args)`` of each call."""
    calls: list = []
    real = getattr(module, name)

    def spy(*args):
        calls.append(record(*args))
        return real(*args)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("miss", ["partial", "none cached", "unsupported"])
def test_page_cache_misses_read_the_same(tmp_path, monkeypatch, miss):
    slices = _stack(tmp_path)
    want = reference(slices)
    preadv = _missing_preadv(miss, lambda target: memoryview(target).cast("B")[: target.nbytes // 2 + 1])
    monkeypatch.setattr(os, "preadv", preadv)
    advised = _spy(monkeypatch, pixels, "_open_advised", lambda s, ks: ks[0])
    for workers in (None, 1):
        advised.clear()
        got = decode_stack(slices, workers=workers)
        assert not got.failed and got.buf.dtype == want.dtype
        np.testing.assert_array_equal(got.buf, want)
        assert advised, "no read-ahead after a page cache miss"  # (or without RWF_NOWAIT)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform")
def test_warm_files_need_no_advice(tmp_path, monkeypatch):
    slices = _stack(tmp_path)
    want = reference(slices)  # reads every file: the pages are cached now
    advised: list[int] = []
    monkeypatch.setattr(pixels, "_open_advised", lambda s, ks: advised.append(ks[0]) or os.open(s[ks[0]].path, 0))
    got = decode_stack(slices)
    np.testing.assert_array_equal(got.buf, want)
    assert advised == []


def _scan_outcome(files) -> tuple:
    scan = scan_files(files)
    return repr(scan.slices), repr(scan.others), dict(scan.skipped), scan.n_files


def _mixed_folder(tmp_path) -> list[Path]:
    """A series, a second series, junk, an empty file and a file shorter than HEAD_BYTES."""
    a = _series(tmp_path, "a")
    b = _series(tmp_path, "b", transfer_syntax="implicit")
    (tmp_path / "junk.txt").write_bytes(b"not dicom" * 100)
    (tmp_path / "empty").write_bytes(b"")
    files = list_files(tmp_path)
    assert any(f.stat().st_size < HEAD_BYTES for f in files) and a.is_dir() and b.is_dir()
    return files


@pytest.mark.parametrize("miss", ["partial", "none cached", "unsupported"])
def test_header_pass_page_cache_misses_read_the_same(tmp_path, monkeypatch, miss):
    files = _mixed_folder(tmp_path)
    want = _scan_outcome(files)
    calls = {"nowait": 0}
    monkeypatch.setattr(os, "preadv", _missing_preadv(miss, lambda target: memoryview(target)[:100], calls))
    advised = _spy(monkeypatch, discover, "_advise_head", lambda p: p)
    assert _scan_outcome(files) == want
    read = [i for i, f in enumerate(files) if f.stat().st_size]  # the empty file is not read
    cold_at = read[0] if miss == "unsupported" else read[discover.COLD_AFTER_MISSES - 1]
    assert calls["nowait"] == read.index(cold_at) + 1, "once cold the heads are read plainly"
    assert advised == files[cold_at + 1:]  # from then on the next files are advised ahead, each once


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform")
def test_header_pass_warm_needs_no_advice(tmp_path, monkeypatch):
    files = _mixed_folder(tmp_path)
    for f in files:
        f.read_bytes()
    advised: list[Path] = []
    monkeypatch.setattr(discover, "_advise_head", advised.append)
    scan = scan_files(files)
    assert len(scan.slices) == 14 and advised == []


def test_pread_reads_like_a_buffered_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    data = bytes(range(256)) * 300
    path.write_bytes(data)
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, pos: real_pread(fd, min(n, 1000), pos))  # short reads
    fd = os.open(path, os.O_RDONLY)
    try:
        assert discover._pread(fd, 20000, 5) == data[5:20005]
        assert discover._pread(fd, 200000, 70000) == data[70000:]
        assert discover._pread(fd, 10, len(data)) == b""
        f = discover._FdFile(fd)
        f.seek(100)
        assert f.read(3000) == data[100:3100] and f.read(10) == data[3100:3110]
    finally:
        os.close(fd)


def _general_paths(m) -> None:
    """Every speed path off: pydicom reads every header, pydicom's decoders every pixel file."""
    m.setattr(discover, "_read_fast", lambda fh, head, size, memo=None: None)
    m.setattr(pixels, "_is_fast", lambda slices, ks: False)
    m.setattr(discover, "NOWAIT_FLAG", 0)  # the header pass and the pixel reads


def _bits(folder: Path, bits: int, signed: bool) -> None:
    for f in (folder / "ct").iterdir():
        set_tags(f, BitsStored=bits, HighBit=bits - 1, PixelRepresentation=int(signed))


@pytest.mark.parametrize("name", sorted(SERIES) + ["bits12-unsigned", "bits12-signed", "mixed-folder"])
def test_load_matches_the_general_path(tmp_path, monkeypatch, name):
    if name.startswith("bits12"):
        study = _series(tmp_path, name)
        _bits(study, 12, name.endswith("-signed"))
    elif name == "mixed-folder":
        study = _series(tmp_path, name)
        src = write_ct_series(random_hu((6, 5, 4), 2), geometry(shape=(6, 5, 4)), study / "small")
        write_localizer(study / "loc", src.study_instance_uid, src.frame_of_reference_uid)
        (study / "junk.bin").write_bytes(b"\x00" * 5000)
        (study / "notes.txt").write_text("hello")
    else:
        study = _series(tmp_path, name, **SERIES[name])
    fast = signature(load_input(study))
    with monkeypatch.context() as m:
        _general_paths(m)
        plain = signature(load_input(study))
    assert fast == plain


def test_raw_view_decodes_as_parse_raw():
    # the view decodes text inline: the same values as _parse_raw on awkward bytes
    rng = np.random.default_rng(5)
    alphabet = [b"a", b"1", b".", b"-", b" ", b"\x00", b"\\", b"E", b"\xe9"]
    table = [(kw, tag, vr) for kw, (tag, vr) in discover._TAG_TABLE.items() if vr != "SQ"]
    for _ in range(3000):
        kw, tag, vr = table[rng.integers(len(table))]
        raw = b"".join(alphabet[i] for i in rng.integers(len(alphabet), size=rng.integers(0, 12)))
        explicit = [None, vr, "LO", "US", "FD", "SS"][rng.integers(6)]
        want = discover._parse_raw(raw, explicit or vr, True)
        want = None if want == "" else want
        view = discover._RawView({tag: (explicit, raw)})
        assert view.get(kw) == want and (kw in view) == (want is not None), (kw, explicit, raw)


def _walk_reference(root: Path) -> list[Path]:
    """The previous list_files: os.walk, sorted, Path.is_file."""
    root = Path(root)
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                out.append(p)
    return out


def test_list_files_is_os_walk(tmp_path):
    root = tmp_path / "in"
    for d in ("b", "a/z", "a/y/x", "c d", "É"):
        (root / d).mkdir(parents=True)
    for f in ("b/2", "b/1", "a/z/f", "a/y/x/g", "a/top", "c d/h h", "É/é", "0", "Z", "_"):
        (root / f).write_bytes(b"x")
    (root / "link-to-file").symlink_to(root / "a" / "top")
    (root / "link-to-dir").symlink_to(root / "a")
    (root / "broken").symlink_to(root / "nowhere")
    (root / "a" / "loop").symlink_to(root)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo")
    got = list_files(root)
    assert got == _walk_reference(root) and len(got) == 11
    for r in (root / "a", root / "a" / "top", root / "link-to-dir", root / "missing", Path(str(root) + "/")):
        assert list_files(r) == _walk_reference(r)


def test_read_errors_are_not_taken_for_a_missing_nowait(tmp_path, monkeypatch):
    # an I/O error on the page-cache read is the file's error, as on a plain read
    slices = _stack(tmp_path, n=5)
    files = [s.path for s in slices]
    real_preadv = os.preadv

    def preadv(fd, buffers, offset, flags=0):
        if flags:
            raise OSError(errno.EIO, "input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    got = decode_stack(slices, workers=1)
    assert got.failed == [0, 1, 2, 3, 4] and got.errors[0].startswith("OSError")
    scan = scan_files(files)
    assert scan.skipped == {"unreadable DICOM header": 5} and not scan.slices


def test_common_root_is_the_files_common_path():
    from pipeline.io.load import _common_root

    def reference(files):
        parents = {str(f.parent) for f in files}
        if len(parents) == 1:
            return parents.pop()
        try:
            return os.path.commonpath([str(f) for f in files])
        except ValueError:
            return ""

    cases = [["/a/b/x", "/a/c/y"], ["/a/b/x", "/a/b/c/y", "/a/b/z"], ["/x", "/a/y"], ["a/x", "a/b/y"],
             ["x", "a/y"], ["./a/x", "a/b/y"], ["/a/x", "b/y"], ["/s/ct/1", "/s/ct/2", "/s/localizer/1"],
             ["/a/bc/x", "/a/b/y"], ["/a/x"], []]
    for files in cases:
        paths = [Path(f) for f in files]
        assert _common_root(paths) == (reference(paths) if paths else ""), files


def test_without_rwf_nowait_everything_is_read_ahead(tmp_path, monkeypatch):
    # a platform without RWF_NOWAIT reads ahead from the start, as before it was used
    files = _mixed_folder(tmp_path)
    want = _scan_outcome(files)
    slices = _stack(tmp_path / "stack")
    want_pixels = reference(slices)
    monkeypatch.setattr(discover, "NOWAIT_FLAG", 0)  # the header pass and the pixel reads
    heads: list[Path] = []
    monkeypatch.setattr(discover, "_advise_head", heads.append)
    assert _scan_outcome(files) == want
    first = next(i for i, f in enumerate(files) if f.stat().st_size)
    assert heads == files[first + 1:]  # every file after the first one read, advised before it is read
    opened: list[int] = []
    real_open_advised = pixels._open_advised
    monkeypatch.setattr(pixels, "_open_advised", lambda s, ks: opened.append(ks[0]) or real_open_advised(s, ks))
    got = decode_stack(slices, workers=1)
    np.testing.assert_array_equal(got.buf, want_pixels)
    assert sorted(opened) == list(range(len(slices)))


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform")
def test_one_miss_now_and_then_is_not_a_cold_cache(tmp_path, monkeypatch):
    # a warm cache misses a read now and then: no read-ahead for that, and the same values
    files = _mixed_folder(tmp_path)
    want = _scan_outcome(files)
    slices = _stack(tmp_path / "stack")
    want_pixels = reference(slices)
    real_preadv = os.preadv
    calls = {"n": 0}
    per_thread = threading.local()  # the reader threads keep their own miss counts: so does the fake

    def preadv(fd, buffers, offset, flags=0):
        if flags:
            calls["n"] += 1
            per_thread.n = getattr(per_thread, "n", 0) + 1
            if per_thread.n % 3 == 0:  # every third page-cache read of a thread comes back short
                (target,) = buffers
                return real_preadv(fd, [memoryview(target).cast("B")[:10]], offset)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    advised: list = []
    monkeypatch.setattr(discover, "_advise_head", advised.append)
    real_open_advised = pixels._open_advised
    monkeypatch.setattr(pixels, "_open_advised", lambda s, ks: advised.append(ks) or real_open_advised(s, ks))
    assert _scan_outcome(files) == want
    for workers in (None, 1):
        got = decode_stack(slices, workers=workers)
        np.testing.assert_array_equal(got.buf, want_pixels)
    assert advised == [] and calls["n"] > 20


def test_group_positions_as_before():
    from pipeline.io.geometry import POSITION_TOL_MM, group_positions

    def reference(t_sorted, tol=POSITION_TOL_MM):  # the previous loop over numpy scalars
        groups = []
        for idx, t in enumerate(np.asarray(t_sorted, dtype=np.float64)):
            if groups and t - t_sorted[groups[-1][0]] < tol:
                groups[-1].append(idx)
            else:
                groups.append([idx])
        return groups

    rng = np.random.default_rng(7)
    for _ in range(500):
        base = np.round(rng.normal(0, 20, rng.integers(0, 30)), rng.integers(0, 3))
        jitter = rng.choice([0.0, 0.005, 0.0199, 0.02, 0.0201, 0.5], size=base.size)
        t = np.sort(np.concatenate([base, base + jitter]))
        for arg in (t, t.astype(np.float32), list(t)):
            assert group_positions(arg) == reference(arg)
