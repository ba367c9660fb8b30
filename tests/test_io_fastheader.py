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
import pydicom.filereader
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from pipeline.io import fastheader
from pipeline.io.discover import _WANTED_TAGS, _Skip, _sniff, list_files, read_header, scan_files
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
            read_raw_header(fh, data[:HEAD_BYTES], len(data), _WANTED_TAGS)
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


def _first_main_tag_at(data: bytes, group_min: int, implicit: bool = False) -> int:
    """Offset of the first element of the main data set whose group is >= group_min (defined lengths)."""
    pos = 132
    while True:
        group, _, vr = struct.unpack_from("<HH2s", data, pos)
        if group >= group_min:
            return pos
        if implicit and group != 2:
            pos += 8 + struct.unpack_from("<I", data, pos + 4)[0]
        elif vr in LONG_VR:
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]


def _insert(path: Path, out: Path, element: bytes, before_group: int, implicit: bool = False) -> Path:
    data = path.read_bytes()
    at = _first_main_tag_at(data, before_group, implicit)
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
    # implicit VR undefined lengths: the same dictionary lookup as pydicom's reader
    assert fastheader._dictionary_vr_fast is pydicom.filereader._dictionary_vr_fast


# --- real data ------------------------------------------------------------------------------

@pytest.mark.realdata
def test_every_real_file_reads_the_same(real_data):
    files = list_files(real_data)
    assert files, f"no files under {real_data}"
    fast = 0
    philips = []  # implicit VR, undefined-length sequences (nested items of both kinds) before the pixels
    for path in files:
        assert_same(path)
        head = path.read_bytes()[:132]
        handled = _sniff(head) is not None and fast_reason(path) is None
        fast += handled
        if "chest_ct_philips" in path.parts:
            philips.append((path.name, handled))
    assert fast > 0, "the fast reader handled none of the real files"
    if philips:
        assert all(handled for _, handled in philips), [name for name, handled in philips if not handled][:5]


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


# --- undefined-length sequences and items -------------------------------------------------------
#
# pydicom reads an undefined-length sequence whole (every item parsed, nested ones too) even when
# its tag is not wanted; the fast reader walks the same bytes and must end up at the same place,
# keep nothing from inside, and hand over everything that is not well formed.

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
CT_UID = CT_CLASS.encode() + b"\x00"  # padded to an even length
ITEM_UNDEFINED = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQ_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _raw(tag: int, vr: bytes, value: bytes, implicit: bool, undefined: bool = False) -> bytes:
    """One element's bytes (value as given; ``undefined``: length 0xFFFFFFFF, the caller ends it)."""
    group, elem = tag >> 16, tag & 0xFFFF
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit:
        return struct.pack("<HHI", group, elem, length) + value
    if vr in LONG_VR:
        return struct.pack("<HH2sHI", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, length) + value


def _item(body: bytes, undefined: bool = True) -> bytes:
    if undefined:
        return ITEM_UNDEFINED + body + ITEM_END
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _ref_item(level: int, depth: int, undefined: bool) -> Dataset:
    """An item with wanted keywords inside (never read as the file's) and, above ``depth``, a
    nested undefined-length sequence of one undefined- and one defined-length item."""
    item = Dataset()
    item.ReferencedSOPClassUID = CT_CLASS
    item.ReferencedSOPInstanceUID = f"1.2.3.{level}"
    item.SeriesDescription = f"inside {level}"
    item.Rows = 99
    item.ImagePositionPatient = [1, 2, 3]
    if level < depth:
        _undefined(item, 0x00081140, [_ref_item(level + 1, depth, True), _ref_item(level + 1, depth, False)])
    item.is_undefined_length_sequence_item = undefined
    return item


def _undefined(ds: Dataset, tag: int, items: list[Dataset]) -> None:
    """ds[tag] = a sequence of ``items``, written with undefined length."""
    ds.add_new(tag, "SQ", Sequence(items))
    ds[tag].is_undefined_length = True


def _nested_file(src: Path, out: Path, depth: int = 3) -> Path:
    """``src`` with undefined-length sequences of every kind pydicom writes, saved as ``out``."""
    ds = pydicom.dcmread(src)
    empty_defined = Dataset()
    empty_undefined = Dataset()
    empty_undefined.is_undefined_length_sequence_item = True
    _undefined(ds, 0x00081140, [_ref_item(1, depth, True), _ref_item(1, depth, False), empty_undefined, empty_defined])
    _undefined(ds, 0x00082112, [])  # SourceImageSequence without items
    icon = Dataset()  # pixel data inside an item does not stop pydicom's reading
    icon.Rows, icon.Columns, icon.BitsAllocated = 2, 2, 8
    icon.add_new(0x7FE00010, "OB", bytes(4))
    icon.is_undefined_length_sequence_item = True
    _undefined(ds, 0x00880200, [icon])  # IconImageSequence
    ds.private_block(0x0009, "OSTEOPLAN TEST", create=True)  # implicit VR: an unknown tag, then items
    _undefined(ds, 0x00091010, [_ref_item(1, 2, True)])
    ds.save_as(out)
    return out


def _same_headers_but_pixels(a: Path, b: Path) -> None:
    """The slice of ``b`` is the slice of ``a`` (same values; path and pixel offset aside)."""
    (sa,), (sb,) = read_header(a), read_header(b)
    keep = lambda s: {k: v for k, v in vars(s).items() if k not in ("path", "pixel_offset")}  # noqa: E731
    assert keep(sa) == keep(sb)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_nested_undefined_length_sequences_are_read_fast_and_the_same(tmp_path, ts):
    src = _one_file(tmp_path, ts)
    path = _nested_file(src, tmp_path / "nested.dcm")
    data = path.read_bytes()
    assert data.count(ITEM_END) >= 8 and data.count(SEQ_END) >= 8  # really undefined lengths, nested
    assert fast_reason(path) is None
    assert_same(path)
    # nothing from inside the items is taken for the file's own elements
    _same_headers_but_pixels(src, path)
    assert read_header(path)[0].series_description == "test HFS"


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("depth, fast", [(16, True), (17, False)])
def test_sequence_nesting_depth(tmp_path, ts, depth, fast):
    ds = pydicom.dcmread(_one_file(tmp_path, ts))
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3"
    for _ in range(depth - 1):
        item = Dataset()
        _undefined(item, 0x00081140, [inner])
        item.is_undefined_length_sequence_item = True
        inner = item
    _undefined(ds, 0x00081140, [inner])
    ds.save_as(tmp_path / "deep.dcm")
    assert tmp_path.joinpath("deep.dcm").read_bytes().count(SEQ_END) == depth
    reason = fast_reason(tmp_path / "deep.dcm")
    assert reason is None if fast else "too deep" in reason
    assert_same(tmp_path / "deep.dcm")


@pytest.mark.parametrize("vr", [b"SQ", b"UN"])
@pytest.mark.parametrize("items_implicit", [True, False])
def test_explicit_vr_sequence_with_implicit_or_explicit_items(tmp_path, vr, items_implicit):
    # PS3.5 6.2.2: an undefined-length UN is a sequence whose items are implicit VR; pydicom also
    # reads any item of an explicit VR file as implicit when its first VR is not two letters
    ref = _raw(0x00081150, b"UI", CT_UID, items_implicit)
    nested = _raw(0x00081140, b"SQ", _item(ref) + _item(ref, undefined=False) + SEQ_END, items_implicit, True)
    body = _item(ref + nested) + _item(ref + _raw(0x0008103E, b"LO", b"inside", items_implicit), undefined=False)
    element = _raw(0x00091010, vr, body + SEQ_END, implicit=False, undefined=True)
    creator = _raw(0x00090010, b"LO", b"OSTEOPLAN TEST", implicit=False)
    src = _one_file(tmp_path)
    path = _insert(src, tmp_path / "seq.dcm", creator + element, 0x0010)
    assert fast_reason(path) is None
    assert_same(path)
    _same_headers_but_pixels(src, path)


@pytest.mark.parametrize("charset, fast", [("ISO_IR 100", True), ("ISO_IR 144", False), ("ISO_IR 1\x000", False)])
@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_character_set_inside_an_item(tmp_path, ts, charset, fast):
    # pydicom decodes (0008,0005) in every item it reads: only the plain ones are left to us
    implicit = ts == "implicit"
    body = _raw(0x00080005, b"CS", charset.encode("latin-1").ljust(10, b" "), implicit)
    body += _raw(0x00081150, b"UI", CT_UID, implicit)
    element = _raw(0x00081140, b"SQ", _item(body) + _item(body, undefined=False) + SEQ_END, implicit, True)
    path = _insert(_one_file(tmp_path, ts), tmp_path / "charset.dcm", element, 0x0010, implicit)
    assert (fast_reason(path) is None) == fast
    assert_same(path)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("case", [
    "wanted sequence",  # a sequence the loader reads: pydicom's
    "empty private value",  # implicit: unknown tag, no item after it -> pydicom scans for a delimiter
    "private value",
    "known non-sequence",  # implicit: the dictionary's VR is not SQ -> pydicom scans for a delimiter
    "OB value",  # explicit: undefined-length OB before the pixel data
    "UN with a broken item",  # a sequence whose item ("abcd") holds no whole element
])
def test_undefined_length_values_that_are_not_walked(tmp_path, ts, case):
    implicit = ts == "implicit"
    items = _item(_raw(0x00081150, b"UI", CT_UID, implicit)) + SEQ_END
    element = {
        "wanted sequence": _raw(0x52009229, b"SQ", items, implicit, True),
        "empty private value": _raw(0x00091010, b"UN", SEQ_END, implicit, True),
        "private value": _raw(0x00091010, b"OB", b"abcd" + SEQ_END, implicit, True),
        "known non-sequence": _raw(0x00181030, b"UT", items, implicit, True),
        "OB value": _raw(0x00091010, b"OB", struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd" + SEQ_END, implicit,
                         True),
        "UN with a broken item": _raw(0x00091010, b"UN", struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"abcd" + SEQ_END,
                                      implicit, True),
    }[case]
    before = 0x7FE0 if case == "wanted sequence" else 0x0010  # in tag order
    path = _insert(_one_file(tmp_path, ts), tmp_path / "value.dcm", element, before, implicit)
    if not implicit and case == "empty private value":
        # explicit UN is read as a sequence, an empty one is fine
        assert fast_reason(path) is None
    else:
        assert fast_reason(path) is not None
    assert_same(path)


def _header_end(path: Path) -> int:
    (s,) = read_header(path)
    return s.pixel_offset


def _nth(data: bytes, needle: bytes, n: int, end: int) -> int:
    at = -1
    for _ in range(n + 1):
        at = data.index(needle, at + 1, end)
    return at


def _first_defined_item(data: bytes, end: int) -> int:
    """Offset of the first item tag with a defined, non-zero length."""
    at = data.index(b"\xfe\xff\x00\xe0", 132, end)
    while struct.unpack_from("<I", data, at + 4)[0] in (0, 0xFFFFFFFF):
        at = data.index(b"\xfe\xff\x00\xe0", at + 1, end)
    return at


def _malformed(data: bytes, end: int, case: str) -> bytes:
    """``data`` (a nested file) with one well-formedness rule broken before ``end``."""
    b = bytearray(data)
    if case == "no item delimiter":
        at = _nth(data, ITEM_END, 1, end)
        return data[:at] + data[at + 8:]
    if case == "no sequence delimiter":
        at = _nth(data, SEQ_END, 1, end)
        return data[:at] + data[at + 8:]
    if case == "last sequence delimiter missing":
        at = data.rindex(SEQ_END, 0, end)
        return data[:at] + data[at + 8:]
    if case == "item delimiter of length 4":
        at = _nth(data, ITEM_END, 0, end)
        b[at + 4] = 4
    elif case == "sequence delimiter of length 2":
        at = _nth(data, SEQ_END, 2, end)
        b[at + 4] = 2
    elif case == "no item tag":
        at = _nth(data, ITEM_UNDEFINED, 1, end)
        b[at:at + 4] = struct.pack("<HH", 0x0008, 0x1150)
    elif case in ("defined item 2 bytes short", "defined item 2 bytes long", "defined item 8 bytes short"):
        at = _first_defined_item(data, end)
        delta = {"defined item 2 bytes short": -2, "defined item 2 bytes long": 2, "defined item 8 bytes short": -8}[case]
        struct.pack_into("<I", b, at + 4, struct.unpack_from("<I", data, at + 4)[0] + delta)
    elif case == "item delimiter in a defined item":
        at = _first_defined_item(data, end)
        struct.pack_into("<I", b, at + 4, struct.unpack_from("<I", data, at + 4)[0] + 8)
        return bytes(b[:at + 8]) + ITEM_END + bytes(b[at + 8:])
    elif case == "sequence delimiter in an item":
        at = _nth(data, ITEM_END, 0, end)
        b[at + 2:at + 4] = b"\xdd\xe0"
    else:
        raise AssertionError(case)
    return bytes(b)


MALFORMED = ["no item delimiter", "no sequence delimiter", "last sequence delimiter missing",
             "item delimiter of length 4", "sequence delimiter of length 2", "no item tag",
             "defined item 2 bytes short", "defined item 2 bytes long", "defined item 8 bytes short",
             "item delimiter in a defined item", "sequence delimiter in an item"]


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_sequences_go_to_pydicom(tmp_path, ts, case):
    path = _nested_file(_one_file(tmp_path, ts), tmp_path / "nested.dcm")
    data = path.read_bytes()
    out = tmp_path / "bad.dcm"
    out.write_bytes(_malformed(data, _header_end(path), case))
    assert fast_reason(out) is not None
    assert_same(out)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
@pytest.mark.parametrize("tag", [0xE000, 0xE00D, 0xE0DD])
def test_item_and_delimiter_tags_at_the_top_level_go_to_pydicom(tmp_path, ts, tag):
    implicit = ts == "implicit"
    element = struct.pack("<HHI", 0xFFFE, tag, 0) if tag != 0xE000 else _item(b"", undefined=False)
    path = _insert(_one_file(tmp_path, ts), tmp_path / "top.dcm", element, 0x0010, implicit)
    assert fast_reason(path) is not None
    assert_same(path)


# --- files the fast reader must hand over -----------------------------------------------------

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


def _mutants_read_the_same(data: bytes, out: Path, rng: random.Random, rounds: int, counts: tuple[int, ...],
                           position, values: tuple[int, ...]) -> int:
    """``rounds`` mutants of ``data``, each with ``rng.choice(counts)`` bytes set at ``position()``
    to one of ``values``, a random byte or a bit flip; each must read the same with both readers.
    Returns how many the fast reader handled itself."""
    handled = 0
    for _ in range(rounds):
        buf = bytearray(data)
        for _ in range(rng.choice(counts)):
            at = position()
            buf[at] = rng.choice((*values, rng.randrange(256), buf[at] ^ (1 << rng.randrange(8))))
        out.write_bytes(bytes(buf))
        assert_same(out)
        handled += fast_reason(out) is None
    return handled


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_mutated_headers_read_the_same(tmp_path, ts):
    path = _one_file(tmp_path, ts)
    data = path.read_bytes()
    (s,) = read_header(path)
    rng = random.Random(7)
    handled = _mutants_read_the_same(data, tmp_path / "mutated.dcm", rng, 300, (1, 1, 2, 4),
                                     lambda: rng.randrange(128, s.pixel_offset), (0, 0xFF, 0x20, 0x5C))
    assert handled > 50, "the mutations should leave many files to the fast reader"


def _sequence_region(path: Path) -> tuple[bytes, int, int]:
    """The nested file's bytes, (about) where its first sequence starts and where its pixel data starts."""
    data = path.read_bytes()
    (s,) = read_header(path)
    first_item = data.index(b"\xfe\xff\x00\xe0", 132)
    return data, first_item - 12, s.pixel_offset - (8 if s.transfer_syntax == "1.2.840.10008.1.2" else 12)


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_every_truncation_inside_sequences_reads_the_same(tmp_path, ts):
    path = _nested_file(_one_file(tmp_path, ts), tmp_path / "nested.dcm", depth=2)
    data, start, pixels = _sequence_region(path)
    out = tmp_path / "cut.dcm"
    handled = 0
    for n in range(start, pixels + 24):
        out.write_bytes(data[:n])
        assert_same(out)
        handled += fast_reason(out) is None  # cuts between top-level elements (non-image objects)
    assert handled > 0


@pytest.mark.parametrize("ts", ["explicit", "implicit"])
def test_mutations_inside_sequences_read_the_same(tmp_path, ts):
    path = _nested_file(_one_file(tmp_path, ts), tmp_path / "nested.dcm")
    data, start, pixels = _sequence_region(path)
    # the bytes of item tags, delimiters and their lengths: where a mutation changes the structure
    marks = [i for i in range(start, pixels) if data[i:i + 2] == b"\xfe\xff"]
    assert len(marks) > 40
    rng = random.Random(11)
    handled = _mutants_read_the_same(
        data, tmp_path / "mutated.dcm", rng, 400, (1, 1, 2, 3),
        lambda: rng.choice(marks) + rng.randrange(8) if rng.random() < 0.5 else rng.randrange(start, pixels),
        (0, 0xFF, 0xFE, 0xE0, 0xDD, 0x0D))
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
