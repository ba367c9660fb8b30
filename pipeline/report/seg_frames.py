"""The SEG's frames, encoded directly: the same file highdicom writes, ~5x faster (issue 7).

highdicom builds one pydicom Dataset per frame (per-frame functional groups) and pydicom then
encodes each of them element by element: ~1.5 ms per frame, 1-2 s for the ~600-1000 frames of a
512x512x300-400 CT, the largest part of writing the outputs. Here highdicom still builds the
SEG, but from a one-voxel label map (one frame) on the first source image alone:
every attribute outside the frames (patient, study, series, segments, shared functional groups,
dimension index) is highdicom's own. The references to every source image (Source Image Sequence,
Referenced Series Sequence) are then added as highdicom's own method makes them, encoded here as
pydicom writes them (``reference_all_sources``), and the three frame-dependent attributes are
replaced:

- ``NumberOfFrames``;
- ``PerFrameFunctionalGroupsSequence``: the bytes of each item are assembled from pieces of
  the template item as pydicom encodes it (with undefined-length, delimited sequences and
  items, so that the pieces stay valid whatever a value's length), with the four frame-dependent elements (source SOP Instance UID, dimension
  index values, image position, segment number) encoded by pydicom's own element writer once
  per slice or per value. The element is stored raw and written as it is;
- ``PixelData``: the frames, bit-packed as one stream (``pack_bits``, little-endian bit order).

Frames come in highdicom's order: segment by segment, then the non-empty planes sorted along
the slice normal (highdicom's own ``_get_slice_distances``); a frame for every plane where the
segment is present; the position index counts the planes where any segment is present.

Only the common case takes this path: single-frame source images matching the grid slice for
slice, one SOP class, a non-empty label map, and the highdicom version it was checked against
(0.28). Anything else, or any surprise, goes through ``build_seg`` unchanged. Tests compare both
builders' files element by element (``tests/test_report_seg_frames.py``).
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import Tag
from pydicom.valuerep import DS

from pipeline.labelbits import label_bits

log = logging.getLogger("osteoplan.report.seg")

CHECKED_HIGHDICOM = ("0.28",)
PFFG = Tag(0x52009230)  # PerFrameFunctionalGroupsSequence
PIXEL_DATA = Tag(0x7FE00010)
UID_TAG, DIM_TAG, POS_TAG, SEGNUM_TAG = 0x00081155, 0x00209157, 0x00200032, 0x0062000B
ITEM_START = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


class NotApplicable(Exception):
    """The fast path does not apply here; use highdicom's builder."""


@dataclass(frozen=True)
class FramePlan:
    """Which frames the SEG holds: ``segments[f]`` and ``planes[f]`` (index k into the grid's
    slices) of frame f, and the 1-based position index of each frame."""

    segments: np.ndarray
    planes: np.ndarray
    position_index: np.ndarray


def _encode(elem: DataElement) -> bytes:
    """One element as pydicom writes it (explicit VR little endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


_UID_TEXT = re.compile(r"[0-9.]{1,64}")
_DS_TEXT = re.compile(r"[0-9+\-.eE]{1,16}(\\[0-9+\-.eE]{1,16})*")


def _short_element(tag: int, vr: bytes, text: str, pad: bytes) -> bytes:
    """An explicit VR little endian element with a 2-byte length, its ASCII value padded to even."""
    value = text.encode("ascii")
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _uid_element(tag: int, uid: str) -> bytes:
    """``_encode`` of a UI element, without pydicom's writer (~30 us) where the UID is plain
    digits and dots (pydicom writes those as they are, 0-padded); anything else goes through it."""
    if _UID_TEXT.fullmatch(uid):
        return _short_element(tag, b"UI", uid, b"\0")
    return _encode(DataElement(tag, "UI", uid))


def _encode_position(ipp: Any) -> bytes:
    """``_encode`` of the Image Position (Patient) element highdicom puts in a frame's Plane
    Position Sequence (``PlanePositionSequence``: ``DS(value, auto_format=True)`` per value), without
    highdicom's sequence or pydicom's writer where the values are plain decimal strings; pydicom
    writes a DS value's ``original_string`` (else ``str``), joined by backslashes, space-padded."""
    values = [DS(v, auto_format=True) for v in ipp]
    text = "\\".join(v.original_string if hasattr(v, "original_string") else str(v) for v in values)
    if len(values) == 3 and _DS_TEXT.fullmatch(text):
        return _short_element(POS_TAG, b"DS", text, b" ")
    return _encode(DataElement(POS_TAG, "DS", values))


def _undefined_lengths(ds: pydicom.Dataset) -> None:
    """Mark every nested sequence and item of ``ds`` as undefined length (delimited), so that its
    encoded pieces stay valid when a frame's UID or position has another length."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


def _encode_item(item: pydicom.Dataset) -> bytes:
    _undefined_lengths(item)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, item)
    return fp.getvalue()


def plan_frames(frames: np.ndarray, n_segments: int, sort_index: np.ndarray,
                masks: list[np.ndarray] | None = None) -> tuple[FramePlan, list[np.ndarray]]:
    """Frame order as highdicom makes it, and per segment the mask of planes where it is present.

    ``frames`` (planes, rows, columns) uint8 label map; ``sort_index``: plane indices sorted along
    the slice normal; ``masks``: ``planes_with_segments(frames, n_segments)`` if the caller has it.
    """
    if masks is None:
        masks = planes_with_segments(frames, n_segments)
    present = [np.zeros(frames.shape[0], bool)] + list(masks)
    included = np.logical_or.reduce(present[1:])
    order = [int(p) for p in sort_index if included[p]]
    rank = {p: r for r, p in enumerate(order, 1)}
    segs, planes, pos = [], [], []
    for s in range(1, n_segments + 1):
        for p in order:
            if present[s][p]:
                segs.append(s)
                planes.append(p)
                pos.append(rank[p])
    return FramePlan(np.asarray(segs, int), np.asarray(planes, int), np.asarray(pos, int)), present


def planes_with_segments(frames: np.ndarray, n_segments: int, chunk: int = 16) -> list[np.ndarray]:
    """Per segment 1..n_segments, which planes of ``frames`` (planes, rows, columns) hold it.

    The same masks as ``(frames == s).any(axis=(1, 2))`` for each s, from one pass
    (``labelbits.label_bits``, ``chunk`` planes at a time).
    """
    return segment_extent(frames, n_segments, chunk)[0]


def segment_extent(frames: np.ndarray, n_segments: int, chunk: int = 16
                   ) -> tuple[list[np.ndarray], dict[int, tuple[int, int]]]:
    """``planes_with_segments``, and per segment present the rows [r0, r1) that hold it in any
    plane (``pack_frames`` encodes only those; every bit outside them is 0), from the same pass.
    """
    if n_segments >= 8:  # one bit per label no longer fits a byte
        masks = [(frames == s).any(axis=(1, 2)) for s in range(1, n_segments + 1)]
        rows = {s: (0, frames.shape[1]) for s, m in enumerate(masks, 1) if m.any()}
        return masks, rows
    plane = max(1, frames.shape[1] * frames.shape[2])
    bits = label_bits(frames, axes=(0, 1), chunk_bytes=chunk * plane)
    masks = [(bits[0] & np.uint8(1 << s)) != 0 for s in range(1, n_segments + 1)]
    rows = {}
    for s in range(1, n_segments + 1):
        held = np.flatnonzero(bits[1] & np.uint8(1 << s))
        if held.size:
            rows[s] = (int(held[0]), int(held[-1]) + 1)
    return masks, rows


SOURCE_IMAGES = Tag(0x00082112)  # SourceImageSequence
REFERENCED_SERIES = Tag(0x00081115)  # ReferencedSeriesSequence
_CLASS_UID_TAG, _INSTANCES_TAG, _SERIES_UID_TAG = 0x00081150, 0x0008114A, 0x0020000E


def _defined_item(body: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _defined_sequence(tag: int, items: bytes) -> RawDataElement:
    """A sequence of already encoded (defined-length) items, as the raw element pydicom writes as it is."""
    return RawDataElement(Tag(tag), "SQ", len(items), items, 0, False, True)


def reference_all_sources(template: pydicom.Dataset, headers: list[pydicom.Dataset]) -> None:
    """Make a SEG built on one source image reference every image of the series, as highdicom's
    own ``_Image._add_source_image_references`` (0.28), which a SEG built on all of them runs, does:
    a Source Image Sequence item per image in the given order (its SOP class and instance UIDs),
    the same items grouped by series in the Referenced Series Sequence. Both are set as raw
    elements holding the bytes pydicom writes for highdicom's (the tests compare them).

    Raises ``NotApplicable`` where highdicom would refuse the images (``_init_multiframe_image``):
    not one study, series, frame of reference and image size; or where that method is missing.
    """
    if len({(str(h.StudyInstanceUID), str(h.SeriesInstanceUID), int(h.Rows), int(h.Columns),
              str(getattr(h, "FrameOfReferenceUID", None))) for h in headers}) != 1:
        raise NotApplicable("source images of several series, frames of reference or image sizes")
    # what highdicom's method sets (one series: one Referenced Series item), encoded here: ~600
    # Datasets fewer to build, and written as they are by ``save``
    items = b"".join(_defined_item(_uid_element(_CLASS_UID_TAG, str(h.SOPClassUID)) +
                                   _uid_element(UID_TAG, str(h.SOPInstanceUID))) for h in headers)
    template[SOURCE_IMAGES] = _defined_sequence(SOURCE_IMAGES, items)
    instances = struct.pack("<HH2sHI", _INSTANCES_TAG >> 16, _INSTANCES_TAG & 0xFFFF, b"SQ", 0, len(items)) + items
    series = _defined_item(instances + _uid_element(_SERIES_UID_TAG, str(headers[0].SeriesInstanceUID)))
    template[REFERENCED_SERIES] = _defined_sequence(REFERENCED_SERIES, series)


def slice_sort_index(headers: list[pydicom.Dataset]) -> np.ndarray:
    """Plane order of the source images as highdicom sorts them (distance along the normal)."""
    try:
        from highdicom.image import _get_slice_distances
        from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector
    except ImportError as exc:  # pragma: no cover - another highdicom
        raise NotApplicable(f"highdicom internals changed: {exc}") from exc
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    normal = get_normal_vector(headers[0].ImageOrientationPatient, index_convention=VOLUME_INDEX_CONVENTION)
    distances = _get_slice_distances(positions, normal)
    _, sort_index = np.unique(distances, return_index=True)
    if len(sort_index) != len(headers):
        raise NotApplicable("duplicate slice positions")
    return sort_index


def _template_pieces(item: pydicom.Dataset) -> list[bytes]:
    """The template frame's item bytes cut around its four frame-dependent elements (in order)."""
    body = _encode_item(item)
    src = item.DerivationImageSequence[0].SourceImageSequence[0]
    variable = [
        src[UID_TAG],
        item.FrameContentSequence[0][DIM_TAG],
        item.PlanePositionSequence[0][POS_TAG],
        item.SegmentIdentificationSequence[0][SEGNUM_TAG],
    ]
    pieces, start = [], 0
    for elem in variable:
        enc = _encode(elem)
        at = body.find(enc, start)
        if at < 0:
            raise NotApplicable(f"cannot locate element {elem.tag} in the template frame")
        pieces.append(body[start:at])
        start = at + len(enc)
    pieces.append(body[start:])
    return pieces


def replace_frames(template: hd.seg.Segmentation, headers: list[pydicom.Dataset], frames: np.ndarray,
                   n_segments: int, masks: list[np.ndarray] | None = None,
                   rows: dict[int, tuple[int, int]] | None = None) -> pydicom.Dataset:
    """Turn the one-frame ``template`` SEG into the SEG of ``frames`` (see the module docstring).

    ``headers`` are the single-frame source images in plane order (``frames[k]`` is on
    ``headers[k]``); ``masks`` as for ``plan_frames`` and ``rows`` as for ``pack_frames``
    (``segment_extent`` gives both). Returns the same dataset object, changed in place.
    """
    if not hd.__version__.startswith(CHECKED_HIGHDICOM):
        raise NotApplicable(f"highdicom {hd.__version__} is not the version this path was checked against")
    if len({str(h.SOPClassUID) for h in headers}) != 1:
        raise NotApplicable("source images of several SOP classes")
    if int(template.NumberOfFrames) != 1:
        raise NotApplicable("the template SEG does not have exactly one frame")
    plan, _ = plan_frames(frames, n_segments, slice_sort_index(headers), masks)
    if plan.segments.size == 0:
        raise NotApplicable("empty label map")
    pieces = _template_pieces(template.PerFrameFunctionalGroupsSequence[0])
    uid_enc: dict[int, bytes] = {}
    pos_enc: dict[int, bytes] = {}
    seg_enc = {s: _encode(DataElement(SEGNUM_TAG, "US", s)) for s in range(1, n_segments + 1)}
    dim_head = struct.pack("<HH2sH", 0x0020, 0x9157, b"UL", 8)
    out = []
    for s, k, r in zip(plan.segments.tolist(), plan.planes.tolist(), plan.position_index.tolist()):
        if k not in uid_enc:
            uid_enc[k] = _uid_element(UID_TAG, str(headers[k].SOPInstanceUID))
            pos_enc[k] = _encode_position(headers[k].ImagePositionPatient)
        out += [ITEM_START, pieces[0], uid_enc[k], pieces[1], dim_head, struct.pack("<II", s, r), pieces[2],
                pos_enc[k], pieces[3], seg_enc[s], pieces[4], ITEM_END]
    value = b"".join(out)
    del template.PerFrameFunctionalGroupsSequence
    template[PFFG] = RawDataElement(PFFG, "SQ", 0xFFFFFFFF, value, 0, False, True)
    template.NumberOfFrames = int(plan.segments.size)
    pixel_vr = template[PIXEL_DATA].VR
    if pixel_vr not in ("OB", "OW"):  # "OB or OW": resolved as pydicom's writer does (PS3.5 8.2)
        pixel_vr = "OB" if int(template.BitsAllocated) <= 8 else "OW"
    template[PIXEL_DATA] = DataElement(PIXEL_DATA, pixel_vr, pack_frames(frames, plan, rows))
    # which source image and segment each frame has (the SR's frame references), without
    # parsing the raw sequence back
    template.osteoplan_frame_sources = [(s, str(headers[k].SOPInstanceUID))
                                        for s, k in zip(plan.segments.tolist(), plan.planes.tolist())]
    return template


def pack_frames(frames: np.ndarray, plan: FramePlan, rows: dict[int, tuple[int, int]] | None = None) -> bytes:
    """1-bit frames in order, packed as one little-endian bit stream, padded to an even length.

    ``rows``: per segment, rows [r0, r1) outside which no plane holds it (``segment_extent``).
    When a row is whole bytes (columns a multiple of 8), only those rows are compared and packed
    into the zeroed buffer: the same bytes, for the work of the segment's extent instead of the
    whole plane (a 512 x 512 x 300 CT: ~70 -> ~15 ms).
    """
    n_cols = frames.shape[2]
    nbits = frames.shape[1] * n_cols
    nbytes = (nbits * len(plan.segments) + 7) // 8
    if nbits % 8 == 0:  # whole bytes per frame: pack frame by frame into one buffer
        per = nbits // 8
        row_bytes = n_cols // 8 if n_cols % 8 == 0 else None
        buf = bytearray(nbytes + (nbytes % 2))
        view = np.frombuffer(buf, np.uint8)
        for f, (s, k) in enumerate(zip(plan.segments.tolist(), plan.planes.tolist())):
            if rows is not None and row_bytes is not None:
                r0, r1 = rows[s]
                start = f * per + r0 * row_bytes
                view[start:start + (r1 - r0) * row_bytes] = np.packbits(frames[k, r0:r1] == s, bitorder="little")
            else:
                view[f * per:(f + 1) * per] = np.packbits(frames[k] == s, bitorder="little")
        return bytes(buf)
    bits = np.stack([frames[k] == s for s, k in zip(plan.segments.tolist(), plan.planes.tolist())])
    packed = np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    return packed + (b"\x00" if len(packed) % 2 else b"")


def save(ds: pydicom.Dataset, path) -> None:
    """Write ``ds`` to ``path`` as ``save_as(enforce_file_format=True)`` does.

    A SEG from ``replace_frames`` holds its per-frame sequence as raw bytes; pydicom's writer
    would parse them back into ~1000 Datasets first (to check for ambiguous VRs), which costs
    more than building them. The sequence and the pixel data are the dataset's last two
    elements, so the rest is written by pydicom and they are appended as they are encoded.
    """
    raw = ds.get_item(PFFG) if PFFG in ds else None
    tail = sorted(t for t in ds.keys() if t >= PFFG)
    if not isinstance(raw, RawDataElement) or tail != [PFFG, PIXEL_DATA] or not _writes_as_is(ds):
        ds.save_as(str(path), enforce_file_format=True)
        return
    pixels = ds[PIXEL_DATA]
    del ds[PFFG], ds[PIXEL_DATA]
    encoding = (ds.original_encoding, ds.original_character_set)
    # written in the encoding it is in: pydicom then writes raw elements (the source references)
    # as they are, instead of parsing them back to check for ambiguous VRs (``_writes_as_is``)
    ds.set_original_encoding(False, True, _character_set(ds))
    try:
        with open(path, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.write(struct.pack("<HH2sHI", 0x5200, 0x9230, b"SQ", 0, 0xFFFFFFFF))
            fh.write(raw.value)
            fh.write(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimitation item
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, pixels.VR.encode("ascii"), 0, len(pixels.value)))
            fh.write(pixels.value)  # even length (pack_frames), so no padding
    finally:
        ds.set_original_encoding(encoding[0][0], encoding[0][1], encoding[1])
        ds[PFFG] = raw
        ds[PIXEL_DATA] = pixels


def _character_set(ds: pydicom.Dataset) -> Any:
    """The character set pydicom encodes ``ds``'s text with (what ``Dataset._character_set`` gives)."""
    return convert_encodings(ds.SpecificCharacterSet) if "SpecificCharacterSet" in ds else default_encoding


def _writes_as_is(ds: pydicom.Dataset) -> bool:
    """Whether pydicom's ambiguous-VR pass, which writing in another encoding than a dataset's
    own runs, would change nothing at the top level: explicit VR little endian file meta, no
    top-level element with an ambiguous VR ("US or SS"...), no raw element but those encoded
    here (the reference and per-frame sequences; a raw element from elsewhere might need
    re-encoding, e.g. text in another character set), pixel data of even length in OB/OW.
    (Sequence items are Datasets of their own: the pass still runs on them.)"""
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(getattr(meta, "TransferSyntaxUID", "")) != "1.2.840.10008.1.2.1":
        return False
    pixels = ds.get_item(PIXEL_DATA)
    if not isinstance(pixels, DataElement) or pixels.VR not in ("OB", "OW") or len(pixels.value) % 2:
        return False
    for elem in ds.elements():
        if isinstance(elem, RawDataElement):
            if elem.tag not in (SOURCE_IMAGES, REFERENCED_SERIES, PFFG):
                return False
        elif " or " in str(elem.VR):
            return False
    return True
