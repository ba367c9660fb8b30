"""Batch discovery's fast header path gives exactly what pydicom gives, file for file.

``read_header(path, fast=False)`` is the reference (pydicom with ``specific_tags``, as before the
fast path existed). Each case below is read both ways, the fast way after files of the same
series so that the layout memo is in use, and the results must be equal.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from batch_helpers import make_study
from pipeline.batch.discover import discover_studies, read_header, read_headers

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real"

TAGS = {  # keyword -> (group, element, VR) as written in explicit VR little endian
    "StudyInstanceUID": (0x0020, 0x000D, b"UI"),
    "SeriesInstanceUID": (0x0020, 0x000E, b"UI"),
    "SOPInstanceUID": (0x0008, 0x0018, b"UI"),
    "SOPClassUID": (0x0008, 0x0016, b"UI"),
    "Modality": (0x0008, 0x0060, b"CS"),
}


def _patch(path: Path, keyword: str, value: bytes) -> None:
    """Replace the value of ``keyword`` (same length) in the data set of an explicit-VR file."""
    group, elem, vr = TAGS[keyword]
    data = bytearray(path.read_bytes())
    key = group.to_bytes(2, "little") + elem.to_bytes(2, "little") + vr
    at = data.index(key, 132 + 12)  # after the file meta group's first element
    if keyword == "SOPClassUID" or keyword == "SOPInstanceUID":
        at = data.index(key, at + 1) if data.find(key, at + 1) > 0 else at  # the data set's, not the meta's
    length = int.from_bytes(data[at + 6:at + 8], "little")
    assert len(value) == length, (keyword, length, value)
    data[at + 8:at + 8 + length] = value
    path.write_bytes(bytes(data))


def _series(root: Path, n: int = 5) -> list[Path]:
    _, files = make_study(root, 1, study_uid="1.2.3.4.5", n_slices=n)
    return sorted(files)


def _both(files: list[Path]) -> tuple[list, list]:
    return read_headers(files, fast=True), [read_header(f, fast=False) for f in files]


VARIANTS = [
    ("StudyInstanceUID", b"1.2.3.4.5\x00"),  # the usual padding
    ("StudyInstanceUID", b"1.2.3.4.5 "),  # padded with a space
    ("StudyInstanceUID", b" 1.2.3.4.5"),  # a leading space
    ("StudyInstanceUID", b"\x001.2.3.4.5"),  # a leading NUL
    ("StudyInstanceUID", b"1.2.3\\4.5\x00"),  # two values
    ("StudyInstanceUID", b"1.2.a.4.5\x00"),  # not a UID
    ("StudyInstanceUID", b"          "),  # blank
    ("Modality", b"CT"),
    ("Modality", b"ct"),
    ("Modality", b"C "),
    ("Modality", b" T"),
    ("Modality", b"C\\"),
    ("Modality", b"\x00\x00"),
    ("Modality", b"\xe9T"),  # not ASCII
]


@pytest.mark.parametrize("keyword,value", VARIANTS, ids=[f"{k}={v!r}" for k, v in VARIANTS])
def test_fast_and_pydicom_agree_on_odd_values(tmp_path, keyword, value):
    files = _series(tmp_path / "s")
    _patch(files[3], keyword, value)  # after three files of the same layout
    fast, reference = _both(files)
    assert fast == reference


def test_fast_and_pydicom_agree_on_sop_uids_and_classes(tmp_path):
    files = _series(tmp_path / "s", n=6)
    sop = read_header(files[4], fast=False).sop_uid.encode()
    _patch(files[4], "SOPInstanceUID", (b" " + sop[1:]) if len(sop) % 2 == 0 else sop + b" ")
    fast, reference = _both(files)
    assert fast == reference


def test_fast_and_pydicom_agree_on_files_that_are_not_plain_dicom(tmp_path):
    files = _series(tmp_path / "s", n=4)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "empty.dcm").write_bytes(b"")
    (odd / "notes.dcm").write_bytes(b"hello, not DICOM" * 20)
    (odd / "truncated.dcm").write_bytes(files[0].read_bytes()[:400])
    (odd / "nopreamble.dcm").write_bytes(files[1].read_bytes()[132:])  # meta group without preamble
    (odd / "nopreamble").write_bytes(files[1].read_bytes()[132:])
    (odd / "nopreamble.xyz").write_bytes(files[1].read_bytes()[132:])
    shutil.copy(files[2], odd / "copy.dcm")
    (odd / "adir.dcm").mkdir()
    os.mkfifo(odd / "fifo.dcm")
    everything = files + sorted(odd.iterdir())
    fast, reference = _both(everything)
    assert fast == reference
    assert reference[len(files)] in ("unreadable", "not-dicom")


def test_discovery_reads_the_real_folders_as_pydicom_does():
    folders = [p for p in sorted(REAL.rglob("*")) if p.is_dir()] if REAL.exists() else []
    if not folders:
        pytest.skip(f"real DICOM test data not found at {REAL}")
    files = sorted(f for d in folders for f in d.iterdir() if f.is_file())
    fast, reference = _both(files)
    assert fast == reference
    assert sum(not isinstance(r, str) for r in reference) > 100


def test_discovery_of_the_shipped_sample_is_unchanged():
    root = REPO / "data_samples"
    files = sorted(f for f in root.rglob("*") if f.is_file())
    fast, reference = _both(files)
    assert fast == reference
    studies, stats = discover_studies(root)
    assert stats.dicom_files == sum(not isinstance(r, str) for r in reference) and studies


def test_a_plain_series_is_read_without_pydicom(tmp_path, monkeypatch):
    """The fast path is really taken: pydicom reads none of a clean series' files."""
    import pipeline.batch.discover as bd

    files = _series(tmp_path / "s", n=6)
    reference = [read_header(f, fast=False) for f in files]
    calls = []
    real = bd.pydicom.dcmread
    monkeypatch.setattr(bd.pydicom, "dcmread", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert read_headers(files) == reference and calls == []
