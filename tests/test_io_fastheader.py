"""The fast header reader (pipeline.io.fastheader) gives exactly what the pydicom path gives.

For every file (real data, generated series, hand-made awkward files, truncated and mutated
copies) ``read_header(path, fast=True)`` and ``read_header(path, fast=False)`` must agree: the
same SliceHeaders field for field, the same non-image object, or the same skip reason. Separate
checks make sure the fast reader really runs on plain files and steps aside on the others.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from pipeline.io.discover import _Skip, _sniff, _wanted_tags, list_files, read_header, scan_files
from pipeline.io.fastheader import _META_VR, HEAD_BYTES, LONG_VR, STANDARD_VR, Fallback, read_raw_header

from io_helpers import REAL, geometry, random_hu, rotation, write_ct_series, write_enhanced_ct

ORIENTATIONS = {
    "HFS": np.eye(3),
    "FFS": np.diag([-1.0, 1.0, -1.0]),
    "prone": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation((0.3, -0.2, 1.0), 17.0),
}
POSITION = {"HFS": "HFS", "FFS": "FFS", "prone": "HFP", "oblique": "HFS"}


def outcome(path: Path, fast: bool):
    """What the header pass makes of one file: slices / other object (as repr), or why it is skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = read_header(path, fast=fast)
        except _Skip as exc:
            return ("skipped", str(exc))
        except Exception:  # noqa: BLE001 - scan_files counts these as "unreadable DICOM header"
            return ("skipped", "unreadable DICOM header")
    # repr: field for field, types included (1 != 1.0), and nan equal to nan
    return repr(result)


def fast_reason(path: Path) -> str | None:
    """None when the fast reader handles the file itself, else its reason for handing it over."""
    data = path.read_bytes()
    with open(path, "rb") as fh:
        try:
            read_raw_header(fh, data[:HEAD_BYTES], len(data), _wanted_tags())
        except Fallback as exc:
            return str(exc)
    return None


def assert_same(path: Path) -> None:
    reference, fast = outcome(path, fast=False), outcome(path, fast=True)
    assert fast == reference, f"{path.name}: fast reader {fast!r} != pydicom {reference!r}"


def _series(tmp: Path, orientation: str, ts: str, shape=(8, 7, 3)) -> list[Path]:
    g = geometry(shape=shape, direction=ORIENTATIONS[orientation])
    src = write_ct_series(random_hu(g.shape, 3), g, tmp / f"{orientation}-{ts}", transfer_syntax=ts,
                          patient_position=POSITION[orientation], series_description=f"test {orientation}")
    return list(src.files)


def _one_file(tmp: Path, ts: str = "explicit") -> Path:
    return _series(tmp, "HFS", ts)[0]


def _first_main_tag_at(data: bytes, group_min: int) -> int:
    """Offset of the first explicit-VR element of the main data set whose group is >= group_min."""
    pos = 132
    while True:
        group, _, vr = struct.unpack_from("<HH2s", data, pos)
        if group >= group_min:
            return pos
        if vr in LONG_VR:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]


def _insert(path: Path, out: Path, element: bytes, before_group: int) -> Path:
    data = path.read_bytes()
    at = _first_main_tag_at(data, before_group)
    out.write_bytes(data[:at] + element + data[at:])
    return out


# --- the VR tables --------------------------------------------------------------------------

def test_vr_tables_match_pydicom():
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
    from pydicom.valuerep import STANDARD_VR as PYDICOM_STANDARD

    assert STANDARD_VR == {str(v).encode() for v in PYDICOM_STANDARD}
    assert LONG_VR == {str(v).encode() for v in EXPLICIT_VR_LENGTH_32}
    for tag, vr in _META_VR.items():
        assert dictionary_VR(tag) == vr, hex(tag)


# --- real data ------------------------------------------------------------------------------

@pytest.mark.realdata
def test_every_real_file_reads_the_same(real_data):
    files = list_files(real_data)
    assert files, f"no files under {real_data}"
    fast = 0
    for path in files:
        assert_same(path)
        head = path.read_bytes()[:132]
        fast += _sniff(head) is not None and fast_reason(path) is None
    assert fast > 0, "the fast reader handled none of the real files"


# --- generated series -----------------------------------------------------------------------

@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_generated_native_series_are_read_fast_and_the_same(tmp_path, orientation, ts):
    for path in _series(tmp_path, orientation, ts):
        assert fast_reason(path) is None
        assert_same(path)
        (s,) = read_header(path)
        assert s.pixel_offset is not None and s.transfer_syntax == ("1.2.840.10008.1.2" if ts == "implicit"
                                                                   else "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("ts", ["jpeg2000", "rle"])
def test_generated_compressed_series_read_the_same(tmp_path, ts):
    for path in _series(tmp_path, "oblique", ts, shape=(32, 32, 2)):
        assert_same(path)
        (s,) = read_header(path)
        assert s.pixel_offset is None


def test_enhanced_ct_goes_to_pydicom(tmp_path):
    g = geometry(shape=(8, 7, 4))
    path = write_enhanced_ct(tmp_path / "enh.dcm", random_hu(g.shape, 2), g)
    assert_same(path)
    assert len(read_header(path)) == 4


@pytest.mark.parametrize("charset, fast", [("ISO_IR 192", True), ("ISO_IR 144", False)])
def test_character_sets(tmp_path, charset, fast):
    # Kept text is decoded from the raw bytes by both readers; other character sets go to pydicom
    path = _one_file(tmp_path)
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = "Позвоночник"
    ds.save_as(path)
    assert (fast_reason(path) is None) == fast
    assert_same(path)


def test_a_character_set_pydicom_rejects_is_left_to_it(tmp_path):
    # pydicom decodes SpecificCharacterSet while reading and raises on some values
    path = _one_file(tmp_path)
    data = path.read_bytes()
    assert b"ISO_IR 100" in data
    path.write_bytes(data.replace(b"ISO_IR 100", b"ISO_IR 1\x000", 1))
    assert "SpecificCharacterSet" in fast_reason(path)
    assert outcome(path, fast=True) == ("skipped", "unreadable DICOM header")
    assert_same(path)


# --- files the fast reader must hand over -----------------------------------------------------

def test_undefined_length_sequence_reads_the_same(tmp_path):
    path = _one_file(tmp_path)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item])
    ds.save_as(tmp_path / "defined.dcm")
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.save_as(tmp_path / "undefined.dcm")
    assert fast_reason(tmp_path / "defined.dcm") is None  # a defined-length sequence is skipped by length
    assert_same(tmp_path / "defined.dcm")
    assert fast_reason(tmp_path / "undefined.dcm") is None  # an undefined-length one is walked
    assert_same(tmp_path / "undefined.dcm")


def test_malformed_undefined_length_un_goes_to_pydicom(tmp_path):
    element = struct.pack("<HH2sHI", 0x0009, 0x1001, b"UN", 0, 0xFFFFFFFF)
    element += struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd" + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    path = _insert(_one_file(tmp_path), tmp_path / "un.dcm", element, 0x0010)
    assert "runs past" in fast_reason(path)  # its item ("abcd") holds no whole element
    assert_same(path)


@pytest.mark.parametrize("element, reason", [
    (struct.pack("<HH2sH", 0x0009, 0x1001, b"LO", 3) + b"abc", "odd element length"),
    (struct.pack("<HH2sH", 0x0009, 0x1001, b"XY", 4) + b"abcd", "unknown VR"),
    (struct.pack("<HH2sH", 0x0008, 0x0008, b"CS", 4) + b"ABCD", "out of order"),  # repeated ImageType
])
def test_awkward_elements_go_to_pydicom(tmp_path, element, reason):
    path = _insert(_one_file(tmp_path), tmp_path / "odd.dcm", element, 0x0010)
    assert reason in fast_reason(path)
    assert_same(path)


def test_odd_length_kept_element_reads_the_same(tmp_path):
    # SeriesDescription of odd length (not padded): pydicom keeps the bytes; we hand the file over
    path = _one_file(tmp_path)
    data = path.read_bytes()
    at = data.find(struct.pack("<HH2s", 0x0008, 0x103E, b"LO"))
    length = struct.unpack_from("<H", data, at + 6)[0]
    value = b"odd"
    patched = data[:at] + struct.pack("<HH2sH", 0x0008, 0x103E, b"LO", len(value)) + value + data[at + 8 + length:]
    (tmp_path / "odd.dcm").write_bytes(patched)
    assert "odd" in fast_reason(tmp_path / "odd.dcm")
    assert_same(tmp_path / "odd.dcm")


def test_big_endian_and_deflated_go_to_pydicom(tmp_path):
    path = _one_file(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(tmp_path / "be.dcm", ds, implicit_vr=False, little_endian=False, force_encoding=True)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm")
    assert fast_reason(tmp_path / "be.dcm") == "big endian"
    assert fast_reason(tmp_path / "deflated.dcm") == "deflated"
    assert_same(tmp_path / "be.dcm")
    assert_same(tmp_path / "deflated.dcm")


def test_transfer_syntax_contradicted_by_the_data_goes_to_pydicom(tmp_path):
    path = _one_file(tmp_path, "explicit")
    data = path.read_bytes()
    patched = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00\x00", 1)
    assert patched != data
    (tmp_path / "liar.dcm").write_bytes(patched)
    assert "contradicts" in fast_reason(tmp_path / "liar.dcm")
    assert_same(tmp_path / "liar.dcm")


def test_raw_data_set_without_preamble_goes_to_pydicom(tmp_path):
    ds = pydicom.dcmread(_one_file(tmp_path, "implicit"))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "raw.dcm", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert fast_reason(tmp_path / "raw.dcm") == "no DICM marker"
    assert_same(tmp_path / "raw.dcm")
    assert read_header(tmp_path / "raw.dcm")[0].pixel_offset is not None


# --- truncated and mutated copies: the same outcome, whoever reads them --------------------------

@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_every_truncation_reads_the_same(tmp_path, ts):
    path = _one_file(tmp_path, ts)
    data = path.read_bytes()
    (s,) = read_header(path)
    cuts = list(range(1, s.pixel_offset + 24)) + [len(data) - 2, len(data) - 1]
    out = tmp_path / "cut.dcm"
    skipped = set()
    for n in cuts:
        out.write_bytes(data[:n])
        assert_same(out)
        result = outcome(out, fast=True)
        if isinstance(result, tuple):
            skipped.add(result[1])
    assert "truncated files" in skipped


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_mutated_headers_read_the_same(tmp_path, ts):
    path = _one_file(tmp_path, ts)
    data = path.read_bytes()
    (s,) = read_header(path)
    rng = random.Random(7)
    out = tmp_path / "mutated.dcm"
    handled = 0
    for _ in range(300):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4))):
            at = rng.randrange(128, s.pixel_offset)
            buf[at] = rng.choice((0, 0xFF, 0x20, 0x5C, rng.randrange(256), buf[at] ^ (1 << rng.randrange(8))))
        out.write_bytes(bytes(buf))
        assert_same(out)
        handled += fast_reason(out) is None
    assert handled > 50, "the mutations should leave many files to the fast reader"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_scan_read_ahead_never_waits_on_a_fifo(tmp_path):
    # the header pass opens files ahead of reading them: a FIFO among them must not block it
    files = _series(tmp_path, "HFS", "explicit")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(scan_files([fifo, *files])), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "scan_files blocked on a FIFO"
    assert len(done[0].slices) == len(files) and done[0].skipped == {"empty files": 1}
