"""Read the header elements the loader needs straight from a Part-10 file's bytes (no pydicom).

pydicom spends ~1.5 ms per CT header building its Dataset; for a plain single-frame image this
reader walks the data elements itself, keeps the raw bytes of the wanted tags and stops at the
pixel data, in ~50 microseconds (~0.25 ms for a 50 KB Philips header with undefined-length
sequences, open and reads included). It reproduces what ``pydicom.dcmread(fh,
stop_before_pixels=True, specific_tags=...)`` gives the header pass (the kept elements' VR and
bytes, the transfer syntax, the position of the pixel data element) and nothing more.

Handled (the common case):

- a Part-10 file ('DICM' at byte 128) whose file meta group (0002) is explicit VR little endian
  and holds a TransferSyntaxUID;
- a data set in Implicit VR Little Endian, or in Explicit VR Little Endian under any transfer
  syntax that pydicom reads as such (Explicit VR Little Endian and the encapsulated ones: JPEG,
  JPEG 2000, RLE...);
- elements of defined, even length in ascending tag order, skipped by length unless wanted (a
  sequence of defined length is skipped whole, as pydicom does with ``specific_tags``);
- well-formed undefined-length sequences that are not wanted, nested at any depth up to
  ``MAX_DEPTH``: pydicom reads those whole even with ``specific_tags`` (and keeps nothing of them),
  so they are walked item by item with pydicom's rules (see ``_skip_undefined``): an SQ, an UN
  (read as a sequence) or, in implicit VR, a dictionary SQ or an unknown tag followed by an item;
  items of defined length (their elements must fill them exactly) or undefined length (ended by
  an item delimiter of length 0), an item of an explicit VR data set read as implicit VR when its
  first VR is not two capital letters; the sequence ended by a sequence delimiter of length 0;
- the walk ends at the first top-level (7FE0,0010), (7FE0,0008) or (7FE0,0009), or exactly at
  the end of the file (a non-image object, or an image truncated before its pixel data).

Anything else raises :class:`Fallback` and the caller reads the file with pydicom, so the result
never depends on which reader ran: no DICM marker (raw data sets), big endian, deflated, a
private transfer syntax registered with pydicom, file meta without a TransferSyntaxUID, with an
element outside PS3.10's list or with another VR than the standard's (pydicom decodes some
of them while reading), a data set whose first element contradicts the transfer
syntax (pydicom switches VR then), a command group (0000), a SpecificCharacterSet other than
none / ISO_IR 100 / ISO_IR 192 (pydicom decodes it while reading, and raises on some values; the
same in every item pydicom reads), an undefined length on anything but such a sequence before
the pixel data (pydicom scans those values for a delimiter) or on a wanted element, an unknown
VR (in items too), an odd length at the top level, an element running past the end of the file
or of its item, stray bytes at the end, item or delimiter tags (FFFE) at the top level or out of
place in a sequence or item, missing delimiters, delimiters of non-zero length, sequences nested
deeper than ``MAX_DEPTH``, elements out of order or repeated at the top level. Multi-frame
images and the sequences the loader reads are the caller's to hand over
(``pipeline.io.discover._read_fast``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

import pydicom.config
import pydicom.uid
from pydicom.datadict import _dictionary_vr_fast  # the lookup pydicom's reader uses

HEAD_BYTES = 16384  # first read; CT headers are usually 2-10 KB
CHUNK_BYTES = 65536  # later reads, when a header is longer or an element is skipped
UNDEFINED = 0xFFFFFFFF
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
TRANSFER_SYNTAX_TAG = 0x00020010
CHARSET_TAG = 0x00080005
# pydicom decodes (0008,0005) while reading and may raise on an odd value: only these are left to us
PLAIN_CHARSETS = frozenset({"", "ISO_IR 100", "ISO_IR 192"})
IMPLICIT_LE = "1.2.840.10008.1.2"
NOT_HANDLED_TS = {"1.2.840.10008.1.2.2": "big endian", "1.2.840.10008.1.2.1.99": "deflated"}
# The 34 standard VRs; in explicit VR the ones below have 2 reserved bytes and a 4-byte length.
STANDARD_VR = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
                        b"UC UI UL UN UR US UT UV".split())
LONG_VR = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

# The file meta elements of PS3.10 with their VRs; every meta element is kept (and checked).
_META_VR = {0x00020000: "UL", 0x00020001: "OB", 0x00020002: "UI", 0x00020003: "UI", 0x00020010: "UI",
            0x00020012: "UI", 0x00020013: "SH", 0x00020016: "AE", 0x00020017: "AE", 0x00020018: "AE",
            0x00020026: "UR", 0x00020027: "UR", 0x00020028: "UR", 0x00020100: "UI", 0x00020102: "OB"}
_META_TAGS = frozenset(_META_VR)

_HEADER_SIZE = {vr: 12 if vr in LONG_VR else 8 for vr in STANDARD_VR}  # explicit VR element header bytes

_IMPLICIT = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")


class Fallback(Exception):
    """This reader is not certain about the file: read it with pydicom instead (message = why)."""


@dataclass(frozen=True)
class RawHeader:
    """What the header pass needs from one file, as pydicom would have read it."""

    elements: dict[int, tuple[str | None, bytes]]  # wanted tag -> (VR in the file, or None if implicit; value)
    implicit: bool
    transfer_syntax: str
    pixel_pos: int  # offset of the pixel data element's tag; the file size when there is none
    pixel_head: bytes  # the 12 bytes at pixel_pos (b"" when there is no pixel data)
    layout: Any = None  # the pipeline.io.layout.Layout it was read by (None: walked element by element)


class _Window:
    """The file's bytes, read in windows; ``at(pos, n)`` -> (buffer, offset) holding bytes pos..pos+n."""

    def __init__(self, fh: BinaryIO, head: bytes, size: int) -> None:
        self.fh, self.data, self.base, self.size = fh, head, 0, size

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        off = pos - self.base
        if off >= 0 and off + n <= len(self.data):
            return self.data, off
        if pos + n > self.size:
            raise Fallback("an element runs past the end of the file")
        self.fh.seek(pos)
        self.data, self.base = self.fh.read(max(n, CHUNK_BYTES)), pos
        if len(self.data) < n:
            raise Fallback("the file is shorter than its size")
        return self.data, 0


def read_raw_header(fh: BinaryIO, head: bytes, size: int, wanted: frozenset[int],
                    trace: list[int] | None = None) -> RawHeader:
    """The wanted elements of a Part-10 file; ``head`` = its first bytes, ``size`` = its length.

    Raises :class:`Fallback` for anything not handled (see the module docstring). ``trace``, when
    given, receives where each top-level element starts: the file meta elements, then -1, then the
    data set's elements (``pipeline.io.layout`` learns a series' layout from it).
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        raise Fallback("no DICM marker")
    src = _Window(fh, head, size)
    meta, start = _walk(src, 132, False, _META_TAGS, meta=True, trace=trace)
    _check_meta_vrs(meta)
    ts, implicit = _transfer_syntax(meta)
    _check_first_element(src, start, implicit)
    if trace is not None:
        trace.append(-1)
    elements, pixel_pos = _walk(src, start, implicit, _with_charset(wanted), meta=False, trace=trace)
    _check_charset(elements.pop(CHARSET_TAG, None))
    pixel_head = b""
    if pixel_pos < size:
        data, off = src.at(pixel_pos, 12)
        pixel_head = data[off:off + 12]
    return RawHeader(elements, implicit, ts, pixel_pos, pixel_head)


@lru_cache(maxsize=4)
def _with_charset(wanted: frozenset[int]) -> frozenset[int]:
    return wanted | {CHARSET_TAG}


def _check_meta_vrs(meta: dict[int, tuple[str | None, bytes]]) -> None:
    """pydicom decodes some file meta elements while reading: only their dictionary VRs are safe."""
    for tag, (vr, _) in meta.items():
        if _META_VR.get(tag) != vr:
            raise Fallback("a file meta element with an unexpected VR")


def _check_charset(item: tuple[str | None, bytes] | None) -> None:
    """Absent, empty, ISO_IR 100 or ISO_IR 192 only (kept text is decoded as before either way)."""
    if item is None:
        return
    vr, value = item
    if vr not in (None, "CS") or value.decode("latin-1").rstrip(" \x00") not in PLAIN_CHARSETS:
        raise Fallback("a SpecificCharacterSet left to pydicom")


def _transfer_syntax(meta: dict[int, tuple[str | None, bytes]]) -> tuple[str, bool]:
    """(transfer syntax UID as pydicom gives it, implicit VR?) for the syntaxes handled here."""
    if TRANSFER_SYNTAX_TAG not in meta:
        raise Fallback("no TransferSyntaxUID")
    vr, value = meta[TRANSFER_SYNTAX_TAG]
    text = value.decode("latin-1").rstrip("\x00 ")  # as pydicom's convert_UI, then UID() strips
    if vr != "UI" or "\\" in text or not text.strip():
        raise Fallback("unusual TransferSyntaxUID element")
    ts = text.strip()
    if ts in NOT_HANDLED_TS:
        raise Fallback(NOT_HANDLED_TS[ts])
    if ts in pydicom.uid.PrivateTransferSyntaxes:
        raise Fallback("private transfer syntax")
    return ts, ts == IMPLICIT_LE  # pydicom reads every other syntax as explicit VR little endian


def _check_first_element(src: _Window, pos: int, implicit: bool) -> None:
    """pydicom switches VR when the first element looks otherwise, and reads a group 0000 as a
    command set: leave such files to it."""
    if pos + 6 > src.size:
        raise Fallback("no data set after the file meta")
    data, off = src.at(pos, 6)
    if _vr_looks_explicit(data, off) == implicit:
        raise Fallback("the data set's VR encoding contradicts the transfer syntax")
    if data[off] == 0 and data[off + 1] == 0:
        raise Fallback("a command group (0000)")


def _walk(src: _Window, pos: int, implicit: bool, wanted: frozenset[int],
          meta: bool, trace: list[int] | None = None) -> tuple[dict[int, tuple[str | None, bytes]], int]:
    """Walk elements from ``pos``; return the wanted ones and where the walk stopped.

    ``meta``: the file meta group, which ends at the first element of another group. Otherwise
    the data set, which ends at the pixel data (or exactly at the end of the file). The loop
    works on the current window's bytes and asks ``src`` for more only past its end. ``trace``
    receives the start of every element walked (not of the one the walk stops at).
    """
    size = src.size
    data, base = src.data, src.base
    dlen = len(data)
    unpack = _IMPLICIT.unpack_from if implicit else _EXPLICIT.unpack_from
    found: dict[int, tuple[str | None, bytes]] = {}
    prev = -1
    vr: str | None = None
    header = 8
    while True:
        off = pos - base
        if off < 0 or off + 12 > dlen:  # past the window, or near the end of the file
            if pos == size and not meta:
                return found, pos
            if pos + 8 > size:
                raise Fallback("stray bytes at the end of the file" if pos < size else "the file ends in its meta group")
            data, off = src.at(pos, min(12, size - pos))
            base, dlen = src.base, len(data)
        if implicit:
            group, elem, length = unpack(data, off)
        else:
            group, elem, raw_vr, length = unpack(data, off)
        tag = group << 16 | elem
        if meta:
            if group != 2:
                return found, pos
            if tag not in _META_VR:
                raise Fallback("an unknown file meta element")
        elif tag >= 0x7FE00008 and tag in PIXEL_TAGS:
            return found, pos
        if tag <= prev or group == 0xFFFE:
            raise Fallback("elements out of order or repeated, or an item tag at the top level")
        prev = tag
        if trace is not None:
            trace.append(pos)
        if not implicit:
            header = _HEADER_SIZE.get(raw_vr, 0)
            if header == 12:
                if off + 12 > dlen:
                    raise Fallback("the file ends inside an element header")
                length = _U32.unpack_from(data, off + 8)[0]
            elif not header:
                raise Fallback("unknown VR")
        start = pos + header
        if length & 1:  # odd, or undefined (0xFFFFFFFF)
            if length != UNDEFINED:
                raise Fallback("odd element length")
            if meta or tag in wanted:
                raise Fallback("a file meta or wanted element of undefined length")
            # pydicom reads the whole sequence (nothing of it is kept: no specific_tags inside)
            pos = _skip_undefined(src, tag, None if implicit else raw_vr, start, implicit, 0)
            data, base = src.data, src.base
            dlen = len(data)
            continue
        pos = start + length
        if pos > size:
            raise Fallback("an element runs past the end of the file")
        if tag in wanted:
            if not implicit:
                vr = raw_vr.decode("ascii")
            vstart = start - base
            if vstart + length <= dlen:
                found[tag] = (vr, data[vstart:vstart + length])
            else:
                data, vstart = src.at(start, length)
                found[tag] = (vr, data[vstart:vstart + length])
                base, dlen = src.base, len(data)


# --- undefined-length sequences ----------------------------------------------------------------
#
# pydicom reads an undefined-length sequence whole even with ``specific_tags`` (and drops it
# afterwards when its tag is not wanted): every item of it is parsed element by element, its
# nested undefined-length sequences too, without ``stop_before_pixels`` (pixel data inside an item
# is an ordinary element). Defined-length elements inside items are read by length (a defined-
# length sequence there stays raw bytes). The functions below walk the same bytes the same way
# and keep nothing; whatever pydicom would read otherwise than by these rules is a Fallback.

ITEM_TAG = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
MAX_DEPTH = 16  # sequences nested deeper than this go to pydicom


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    """The VR pydicom's reader looks up for an implicit-VR element (None: not in its dictionary)."""
    try:
        return _dictionary_vr_fast(tag)
    except KeyError:
        return None


def _skip_undefined(src: _Window, tag: int, raw_vr: bytes | None, pos: int, implicit: bool, depth: int) -> int:
    """An element of undefined length whose value starts at ``pos``; returns the position after it.

    pydicom reads it as a sequence when its VR is SQ, or UN (read as a sequence, PS3.5 6.2.2),
    or, in implicit VR, when the dictionary says SQ or the tag is unknown to the dictionary and an
    item tag follows. Any other undefined-length value is scanned for a delimiter: not handled.
    ``raw_vr`` is the element's VR bytes (None in implicit VR).
    """
    if raw_vr is None:
        vr = _dictionary_vr(tag)
        if vr is None:
            data, off = src.at(pos, 4)
            is_sequence = _U32.unpack_from(data, off)[0] == 0xE000FFFE  # (FFFE,E000) little endian
        else:
            is_sequence = vr == "SQ"
    else:
        is_sequence = raw_vr == b"SQ" or (raw_vr == b"UN" and pydicom.config.settings.infer_sq_for_un_vr)
    if not is_sequence:
        raise Fallback("an undefined-length value that is not a sequence")
    return _skip_sequence(src, pos, implicit, depth + 1)


def _skip_sequence(src: _Window, pos: int, implicit: bool, depth: int) -> int:
    """The items of an undefined-length sequence from ``pos``; returns the position after its
    sequence delimiter (FFFE,E0DD) of length 0."""
    if depth > MAX_DEPTH:
        raise Fallback("sequences nested too deep")
    size = src.size
    while True:
        data, off = src.at(pos, 8)
        group, elem, length = _IMPLICIT.unpack_from(data, off)
        tag = group << 16 | elem
        pos += 8
        if tag == SEQUENCE_DELIMITER:
            if length:
                raise Fallback("a sequence delimiter of non-zero length")
            return pos
        if tag != ITEM_TAG:
            raise Fallback("something other than an item in a sequence")
        if length == UNDEFINED:
            pos = _walk_item(src, pos, -1, implicit or _looks_implicit(src, pos), depth)
        elif length:
            end = pos + length
            if end > size:
                raise Fallback("an item runs past the end of the file")
            pos = _walk_item(src, pos, end, implicit or _looks_implicit(src, pos), depth)


def _looks_implicit(src: _Window, pos: int) -> bool:
    """pydicom reads an item of an explicit VR data set as implicit VR when its first element's VR
    bytes are not two capital letters (``filereader._is_implicit_vr``, in a sequence)."""
    if pos + 6 > src.size:
        return False
    data, off = src.at(pos, 6)
    return not _vr_looks_explicit(data, off)


def _vr_looks_explicit(data: bytes, off: int) -> bool:
    """The bytes where an explicit VR would be (element at ``off``) are two capital letters: pydicom's
    test of an element's VR encoding (``filereader._is_implicit_vr``)."""
    return 0x40 < data[off + 4] < 0x5B and 0x40 < data[off + 5] < 0x5B


def _walk_item(src: _Window, pos: int, end: int, implicit: bool, depth: int) -> int:
    """The elements of one item from ``pos``: up to ``end`` exactly (a defined-length item), or,
    with ``end`` = -1, up to its item delimiter (FFFE,E00D) of length 0. Returns where it ends."""
    limit = src.size if end < 0 else end
    while True:
        if pos == end:
            return pos
        if pos + 8 > limit:
            raise Fallback("an item runs past its end or the end of the file")
        data, off = src.at(pos, 8)
        group, elem, length = _IMPLICIT.unpack_from(data, off)
        tag = group << 16 | elem
        if group == 0xFFFE:
            if tag == ITEM_DELIMITER and end < 0:
                if length:
                    raise Fallback("an item delimiter of non-zero length")
                return pos + 8
            raise Fallback("an item or delimiter tag out of place in an item")
        raw_vr = None
        header = 8
        if not implicit:
            raw_vr = data[off + 4:off + 6]
            header = _HEADER_SIZE.get(raw_vr, 0)
            if header == 12:
                if pos + 12 > limit:
                    raise Fallback("an item runs past its end or the end of the file")
                data, off = src.at(pos, 12)
                length = _U32.unpack_from(data, off + 8)[0]
            elif header:
                length >>= 16
            else:
                raise Fallback("unknown VR")
        start = pos + header
        if length == UNDEFINED:
            pos = _skip_undefined(src, tag, raw_vr, start, implicit, depth)
            continue
        pos = start + length
        if pos > limit:
            raise Fallback("an element runs past its item or the end of the file")
        if tag == CHARSET_TAG:  # pydicom decodes it in every item it reads
            data, off = src.at(start, length)
            _check_charset((None if implicit else raw_vr.decode("ascii"), data[off:off + length]))
