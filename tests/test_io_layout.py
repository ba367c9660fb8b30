"""Headers read by an earlier file's layout (pipeline.io.layout) are exactly what pydicom reads.

``scan_files`` keeps the layout of the files it walks and reads the next files of the same
series by it. Every scan here is compared, slice for slice, with a reference pass that reads
each file alone with pydicom; separate counts make sure the layout path really ran.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.io import discover, layout
from pipeline.io.discover import _Skip, list_files, read_header, scan_files

from io_helpers import REAL, geometry, random_hu, rotation, set_tags, write_ct_series
from test_io_fastheader import _mutants_read_the_same, _nested_file


def reference(files: list[Path]) -> tuple[str, str, Counter]:
    """What a scan should give: each file read alone by pydicom (slices, other objects, skips)."""
    scan = scan_files(files, fast=False)
    return repr(scan.slices), repr(scan.others), scan.skipped


@pytest.fixture
def layout_reads(monkeypatch):
    """Counts the files read by a layout (the rest were walked element by element or by pydicom):
    the distinct headers a layout matched, by the template path or through ``LayoutMemo.read``."""
    count = Counter()
    seen: set[bytes] = set()
    original = layout.Layout.read_varying

    def spy(self, head):
        got = original(self, head)
        if got is not None and head not in seen:
            seen.add(head)
            count["layout"] += 1
        return got

    monkeypatch.setattr(layout.Layout, "read_varying", spy)
    return count


def assert_scan_same(files: list[Path]) -> None:
    scan = scan_files(files)
    slices, others, skipped = reference(files)
    assert repr(scan.slices) == slices
    assert repr(scan.others) == others
    assert scan.skipped == skipped


def _series(tmp: Path, name: str, n: int = 10, ts: str = "explicit", direction=None, **kw) -> list[Path]:
    g = geometry(shape=(6, 5, n), direction=direction)
    src = write_ct_series(random_hu(g.shape, n), g, tmp / name, transfer_syntax=ts, file_names="random",
                          instance_numbers="shuffled", seed=n, **kw)
    return list(src.files)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("direction", [None, rotation((0.3, -0.2, 1.0), 17.0)], ids=["axial", "oblique"])
def test_a_series_is_read_by_its_layout_and_the_same(tmp_path, layout_reads, ts, direction):
    files = _series(tmp_path, "ct", 12, ts, direction)
    random.Random(1).shuffle(files)
    assert_scan_same(files)
    # the first files teach the layout what varies (up to 4 when the random UIDs' lengths differ:
    # the file meta group length then varies too)
    assert layout_reads["layout"] >= len(files) - 4


def test_uids_of_different_lengths(tmp_path, layout_reads):
    # the file meta group length and the UIDs' lengths vary from file to file
    files = _series(tmp_path, "ct", 10)
    for i, path in enumerate(files):
        uid = "1.2.826.0.1.3680043.9.7." + "9" * (i + 1) + ".1"
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(path, enforce_file_format=True)
    assert_scan_same(files)
    assert layout_reads["layout"] >= 6


def test_a_file_that_differs_elsewhere_is_read_as_it_is(tmp_path, layout_reads):
    files = _series(tmp_path, "ct", 10)
    # same lengths, other values: the runs that do not vary no longer match for these files
    set_tags(files[5], RescaleIntercept="-1000", SeriesDescription="osteoplan phantoN")
    set_tags(files[7], PixelSpacing=[0.7, 0.9], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    set_tags(files[8], ImageType=["DERIVED", "SECONDARY"], AcquisitionNumber=7)
    assert_scan_same(files)
    scan = scan_files(files)
    by_path = {s.path: s for s in scan.slices}
    assert by_path[files[5]].intercept == -1000.0 and by_path[files[4]].intercept == -1024.0
    assert by_path[files[7]].col_dir == (0.0, 0.0, -1.0)
    assert by_path[files[8]].image_type == ("DERIVED", "SECONDARY") and by_path[files[8]].acquisition_number == 7


def _big_header(files: list[Path], nbytes: int = 40000) -> None:
    """A private element of ``nbytes`` in every file (Philips headers are ~50 KB): the header
    runs past the first bytes read (fastheader.HEAD_BYTES)."""
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.private_block(0x2001, "OSTEOPLAN BIG", create=True).add_new(0x10, "OB", bytes([i % 7]) * nbytes)
        ds.save_as(path)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_headers_longer_than_the_first_read(tmp_path, layout_reads, ts):
    from pipeline.io.fastheader import HEAD_BYTES

    files = _series(tmp_path, "ct", 10, ts)
    _big_header(files)
    (s,) = read_header(files[0])
    assert s.pixel_offset > HEAD_BYTES + 20000
    assert_scan_same(files)
    assert layout_reads["layout"] >= len(files) - 4
    # mixed with a series of short headers, and one file of the long ones cut inside its header
    short = _series(tmp_path, "short", 6, ts)
    files[4].write_bytes(files[4].read_bytes()[:HEAD_BYTES + 5000])
    mixed = [f for pair in zip(files, short) for f in pair] + files[6:]
    assert_scan_same(mixed)


def test_interleaved_series(tmp_path, layout_reads):
    a = _series(tmp_path, "a", 8)
    b = _series(tmp_path, "b", 7, ts="implicit")
    c = _series(tmp_path, "c", 6, series_description="another")
    files = [f for trio in zip(a, b, c) for f in trio] + a[6:] + b[6:]
    assert_scan_same(files)
    assert layout_reads["layout"] >= len(files) - 3 * 4


def test_sequences_in_every_file(tmp_path, layout_reads):
    files = _series(tmp_path, "ct", 6, ts="implicit")
    nested = [_nested_file(f, tmp_path / f"nested{i}.dcm", depth=2) for i, f in enumerate(files)]
    assert_scan_same(nested)
    assert layout_reads["layout"] >= 2


@pytest.mark.parametrize("value", ["nan\\0\\0", "1e9\\0\\0", "1\\2", ""])
def test_a_bad_position_in_a_series(tmp_path, value):
    files = _series(tmp_path, "ct", 8)
    set_tags(files[5], ImagePositionPatient=None)
    ds = pydicom.dcmread(files[5])
    ds.add_new(0x00200032, "DS", value)
    ds.save_as(files[5])
    assert_scan_same(files)


def test_truncated_and_odd_files_in_a_series(tmp_path):
    files = _series(tmp_path, "ct", 9)
    data = files[6].read_bytes()
    files[6].write_bytes(data[:-10])  # pixel data cut short
    files[7].write_bytes(files[7].read_bytes()[:600])  # header cut short
    assert_scan_same(files)
    skipped = scan_files(files).skipped
    assert skipped["truncated files"] >= 1


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_mutants_read_by_a_learned_layout(tmp_path, ts):
    """Mutated copies of one file of a series, read after the scan learned the series' layout."""
    files = _series(tmp_path, "ct", 4, ts)
    data = files[2].read_bytes()
    (s,) = read_header(files[2])
    memo = layout.LayoutMemo()
    for f in files[:2]:
        discover._read_header(f, True, None, memo)
    assert memo.layouts and memo.layouts[0].ops, "the layout should know what varies"
    ipp = data.index(b"\x20\x00\x32\x00")  # where ImagePositionPatient is: a varying value
    rng = random.Random(5)
    out = tmp_path / "mutated.dcm"
    hits = Counter()
    original = layout.Layout.read_varying

    def spy(self, head):
        got = original(self, head)
        hits["layout"] += got is not None
        return got

    def outcome(path: Path, fast: bool):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                result = discover._read_header(path, True, None, memo) if fast else read_header(path, fast=False)
            except _Skip as exc:
                return ("skipped", str(exc))
            except Exception:  # noqa: BLE001
                return ("skipped", "unreadable DICOM header")
        return repr(result)

    import test_io_fastheader

    with pytest.MonkeyPatch.context() as m:
        m.setattr(layout.Layout, "read_varying", spy)
        m.setattr(test_io_fastheader, "outcome", outcome)
        _mutants_read_the_same(data, out, rng, 300, (1, 1, 2, 3),
                               lambda: rng.randrange(ipp, ipp + 40) if rng.random() < 0.5
                               else rng.randrange(128, s.pixel_offset + 12), (0, 0xFF, 0x20, 0x5C, 0x30))
    assert hits["layout"] > 30, "many mutants should be read by the layout"


def test_layout_memo_gives_up_on_a_folder_without_series(tmp_path, layout_reads):
    # files that share no layout: after a few, the memo stops learning (no cost for nothing)
    files = []
    for i in range(layout.MAX_LEARNED_WITHOUT_USE + 6):
        (path,) = _series(tmp_path, f"s{i}", 1)
        ds = pydicom.dcmread(path)
        for j in range(i + 1):  # i + 1 extra elements: no two files have the same structure
            ds.add_new(0x00431000 + j, "LO", f"extra {j}")
        ds.save_as(path)
        files.append(path)
    memo = layout.LayoutMemo()
    for f in files:
        discover._read_header(f, True, None, memo)
    assert memo.learned == layout.MAX_LEARNED_WITHOUT_USE + 1
    assert_scan_same(files)


def _real_folders() -> list[Path]:
    if not REAL.exists():
        return []
    return sorted({p.parent for p in REAL.rglob("*") if p.is_file() and p.suffix.lower() in ("", ".dcm")})


@pytest.mark.skipif(not _real_folders(), reason="real DICOM data not found (../shared/data/real)")
def test_real_folders_scan_the_same(tmp_path, layout_reads):
    n = 0
    for folder in _real_folders():
        files = list_files(folder)
        if len(files) < 3:
            continue
        assert_scan_same(files)
        n += 1
    assert n >= 1
    assert layout_reads["layout"] > 0


def test_a_series_copied_with_other_names(tmp_path):
    files = _series(tmp_path, "ct", 6)
    copies = []
    for i, f in enumerate(files):
        copies.append(tmp_path / f"copy{i}")
        shutil.copy(f, copies[-1])
    scan = scan_files(files + copies)
    assert len(scan.slices) == 12
    assert [s.ipp for s in scan.slices[:6]] == [s.ipp for s in scan.slices[6:]]
    assert_scan_same(files + copies)
    assert np.isfinite([s.ipp for s in scan.slices]).all()
