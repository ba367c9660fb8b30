"""Find DICOM files and read their headers in one pass (no pixel data).

Rules (README "Input" copies them):

- A folder is walked at any depth (symbolic links to folders are not followed). File names and
  extensions carry no meaning: every regular file is looked at.
- A file is read as DICOM when it carries the Part-10 'DICM' marker at byte 128. A file without it
  is read with pydicom's ``force=True`` only when its first bytes look like a raw little-endian
  data set (a group 0x0002 or 0x0008 tag first, as in old ACR-NEMA files); anything else is
  skipped as "not DICOM". Headers are read with ``stop_before_pixels=True``.
- Plain Part-10 files (little endian, single frame, well-formed sequences: see
  ``pipeline.io.fastheader``) have their header read straight from the bytes (the header pass of
  a 301-file CT ~6x faster; of the 141-file Philips chest CT, whose undefined-length sequences
  pydicom used to read, ~4x), with exactly the result pydicom's reading gives; every other file
  is read with pydicom.
- Skipped, counted by reason and never named (file names may carry patient names): zero-byte
  files, non-DICOM files, headers that cannot be parsed, images whose file is too short for their
  own (uncompressed) pixel data (truncated), images with invalid geometry values.
- Images without SeriesInstanceUID (some anonymisers blank UIDs) are grouped by study UID,
  SeriesNumber, SeriesDescription, Modality, FrameOfReferenceUID and SeriesTime instead.
- DICOM objects without pixel data (SR, SEG without frames, DICOMDIR, presentation states...) are
  kept as non-image objects so the selection can list them as passed over.
- A multi-frame image (enhanced CT) gives one ``SliceHeader`` per frame from its per-frame and
  shared functional groups (plane position, plane orientation, pixel measures, pixel value
  transformation); a multi-frame image without per-frame positions is skipped.
- For uncompressed little-endian pixel data the byte offset of the pixel values is recorded, so
  decoding is a plain ``pread`` into the output array.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import pydicom
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID

import pipeline.io  # noqa: F401  (pydicom configuration)
from pipeline.io.fastheader import HEAD_BYTES, Fallback, RawHeader, read_raw_header
from pipeline.io.layout import MAX_HEADER_BYTES, Layout, LayoutMemo

log = logging.getLogger("osteoplan.io")

NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
}
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
NO_POSITION = "CT images without ImagePositionPatient/ImageOrientationPatient"
READ_AHEAD_FILES = 32  # header pass, cold cache: files whose first bytes are requested ahead of the one being read
NOWAIT_FLAG = getattr(os, "RWF_NOWAIT", 0)  # read what the page cache holds without waiting (Linux)
NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)  # what a kernel/file system without it says
MAX_POSITION_MM = 1e7  # an ImagePositionPatient coordinate beyond this is not a position
COLD_AFTER_MISSES = 2  # page-cache reads in a row that miss before a pass takes the cache for cold
# Only these elements are parsed (pydicom skips the others' values): about 25 % faster on real headers.
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "SeriesTime", "Rows", "Columns",
    "NumberOfFrames", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "RescaleSlope", "RescaleIntercept", "InstanceNumber", "AcquisitionNumber",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "DirectoryRecordSequence",
]


@dataclass(frozen=True)
class SliceHeader:
    """One 2-D image (a single-frame file, or one frame of a multi-frame file): what loading needs.

    Geometry in DICOM LPS mm. ``pixel_spacing`` is (row spacing, column spacing) as in DICOM,
    i.e. (step between rows = along the column vector, step between columns = along the row vector).
    """

    path: Path
    frame: int | None  # frame index in a multi-frame file, None for a single-frame file
    n_frames: int
    study_uid: str
    series_uid: str  # as in the file; may be empty in badly anonymised data
    series_key: str  # grouping key: the SeriesInstanceUID, or a stand-in built from other attributes
    for_uid: str | None
    sop_uid: str
    sop_class: str
    modality: str
    image_type: tuple[str, ...]
    series_number: int | None
    series_description: str
    rows: int
    cols: int
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    ipp: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    slope: float
    intercept: float
    has_rescale: bool
    instance_number: int | None
    acquisition_number: int | None
    transfer_syntax: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples_per_pixel: int
    photometric: str
    pixel_offset: int | None  # byte offset of native little-endian pixel values, else None

    @property
    def is_localizer(self) -> bool:
        return any(v in ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW") for v in self.image_type)


@dataclass(frozen=True)
class OtherObject:
    """A DICOM object without usable pixel data (listed as passed over)."""

    path: Path
    series_uid: str
    modality: str
    what: str


@dataclass
class Scan:
    """Everything the header pass found."""

    slices: list[SliceHeader] = field(default_factory=list)
    others: list[OtherObject] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    n_files: int = 0

    def skipped_summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))


# Skip reasons that mean "a DICOM file we could not use", as opposed to "not DICOM at all".
BROKEN_DICOM = ("unreadable DICOM header", "truncated files", "images with invalid size",
                "images with invalid geometry values", "images with invalid rescale values",
                "multi-frame images without per-frame positions", NO_POSITION)


class _Skip(Exception):
    """A file that is not a usable DICOM image; the message is the (identity-free) reason."""


def list_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``[root]`` for a file), in a stable order.

    The order and the files are those of ``os.walk(root)`` (top-down, sub-folders sorted and
    not followed through links, each folder's files sorted by name, kept when ``Path.is_file``),
    from one ``scandir`` per folder: a plain file's type comes from the directory entry, only
    links and other odd entries are looked up.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    out: list[Path] = []
    _walk_files(str(root), root, out)
    return out


def _child(folder: Path, name: str) -> Path:
    """``folder / name`` for a directory entry's name (one component, never "." or ".."): pathlib's
    own child constructor where it has one (no re-parsing of the folder, ~1 us instead of ~4)."""
    make = getattr(folder, "_make_child_relpath", None)
    return make(name) if make is not None else folder / name


def _walk_files(top: str, folder: Path, out: list[Path]) -> None:
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:
        return  # os.walk skips a folder it cannot list
    dirs: list[str] = []
    files: list[os.DirEntry] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            dirs.append(entry.name)
        else:
            files.append(entry)
    files.sort(key=lambda e: e.name)
    for entry in files:
        try:
            plain = entry.is_file(follow_symlinks=False)
        except OSError:
            plain = False
        path = _child(folder, entry.name)
        if plain or path.is_file():
            out.append(path)
    dirs.sort()
    for name in dirs:
        sub = os.path.join(top, name)
        if not os.path.islink(sub):
            _walk_files(sub, _child(folder, name), out)


def scan_files(files: Iterable[Path], fast: bool = True) -> Scan:
    """Read the header of every file; sort results into images, other objects and skipped files.

    ``fast=False`` reads each file alone with pydicom: the reference the fast readers (and their
    layout reads across a series) must equal, used by the tests and ``scripts/fuzz_ingest.py``.
    """
    scan = Scan()
    files = [f if isinstance(f, Path) else Path(f) for f in files]
    heads = _HeadReads(files, READ_AHEAD_FILES) if fast else None
    memo = LayoutMemo() if fast else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, path in enumerate(files):
            scan.n_files += 1
            if heads is not None:
                heads.index = index
            try:
                result = _read_header(path, fast, heads, memo)
            except _Skip as exc:
                scan.skipped[str(exc)] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - any parser failure means "unreadable header"
                log.debug("header read failed: %s: %s", type(exc).__name__, exc)
                scan.skipped["unreadable DICOM header"] += 1
                continue
            if isinstance(result, OtherObject):
                scan.others.append(result)
            else:
                scan.slices.extend(result)
    if scan.skipped:
        log.info("skipped %d of %d files: %s", sum(scan.skipped.values()), scan.n_files, scan.skipped_summary())
    return scan


class CacheFirstReads:
    """Reads that take what the page cache holds first, until the cache looks cold.

    ``read_into(fd, view, offset, enough)`` fills ``view`` from ``offset``. While ``nowait`` is
    set (``RWF_NOWAIT``) it first asks only for cached bytes; the rest of a partial read (or the
    whole, after ``BlockingIOError``) is read normally. A read that got fewer than ``enough``
    bytes is a miss. After COLD_AFTER_MISSES misses in a row (a warm cache misses now and then:
    a page locked for a moment), or when ``RWF_NOWAIT`` is not supported, ``on_cold`` is called
    once (the caller starts its read-ahead there) and reads are plain from then on. The bytes
    are the same either way; only timing depends on the cache. Used by the header pass
    (``_HeadReads``) and the native pixel reads (``pixels``).
    """

    def __init__(self, on_cold: Callable[[], None], nowait: int | None = None) -> None:
        self.nowait = NOWAIT_FLAG if nowait is None else nowait
        self.misses = 0  # reads in a row that missed the page cache
        self.on_cold = on_cold

    def read_into(self, fd: int, view: memoryview, offset: int, enough: int) -> int:
        got = 0
        if self.nowait:
            try:
                got = os.preadv(fd, [view], offset, self.nowait)
            except BlockingIOError:
                got = 0
            except OSError as exc:
                if exc.errno not in NOWAIT_UNSUPPORTED:
                    raise
                got, self.misses = 0, COLD_AFTER_MISSES  # not supported here: plain reads from now on
            if got >= enough:
                self.misses = 0
                return got
            self.misses += 1
            if self.misses >= COLD_AFTER_MISSES:
                self.nowait = 0
                self.on_cold()
        while got < len(view):  # fewer bytes only at the end of the file, like a buffered read
            more = os.preadv(fd, [view[got:]], offset + got)
            if not more:
                break
            got += more
        return got


class _HeadReads:
    """The first HEAD_BYTES of each file of one scan, from the page cache first
    (:class:`CacheFirstReads`).

    Once the cache looks cold, before each file is read the heads of the next ``n`` files are
    advised (POSIX_FADV_WILLNEED), so the kernel fetches several at once (the header pass from a
    cold cache was ~1.6x faster on the bench study). A warm scan gives no advice at all; without
    ``RWF_NOWAIT`` every scan is advised ahead, and without ``posix_fadvise`` nothing is.
    """

    def __init__(self, files: list[Path], n: int) -> None:
        self.files, self.n = files, n
        self.index = 0  # the file being read
        self.advised = 0  # files[:advised] were advised
        self.can_advise = hasattr(os, "posix_fadvise")
        self.reads = CacheFirstReads(self._advise_ahead, None if self.can_advise else 0)
        self.buf = memoryview(bytearray(HEAD_BYTES))

    def read(self, fd: int, n: int) -> bytes:
        """The file's first ``n`` bytes (at most HEAD_BYTES; fewer at its end)."""
        if self.can_advise and not self.reads.nowait:
            self._advise_ahead()  # cold: advise ahead before each read
        n = min(n, HEAD_BYTES)
        got = self.reads.read_into(fd, self.buf[:n], 0, n)
        return self.buf[:got].tobytes()

    def _advise_ahead(self) -> None:
        end = min(len(self.files), self.index + 1 + self.n)
        for path in self.files[max(self.advised, self.index + 1):end]:
            _advise_head(path)
        self.advised = max(self.advised, end)


def _advise_head(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never wait on a FIFO
    except (OSError, ValueError, TypeError):
        return
    try:
        os.posix_fadvise(fd, 0, HEAD_BYTES, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sniff(head: bytes) -> bool | None:
    """True: Part-10 file; False: raw data set that is safe to force-read; None: not DICOM."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8 and head[0:2] in (b"\x02\x00", b"\x08\x00"):
        elem = struct.unpack("<H", head[2:4])[0]
        if elem < 0x0100:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return False
            length = struct.unpack("<I", head[4:8])[0]
            if length < 0x10000:
                return False
    return None


@dataclass(frozen=True)
class _Parsed:
    """One file's header as read by either reader: a keyword view plus where the pixel data starts."""

    ds: Any  # _Header (pydicom) or _RawView (fast reader): .get(keyword) and `keyword in ds`
    raw_ds: Dataset | None  # the pydicom Dataset (None from the fast reader: no sequences kept)
    pixel_pos: int
    pixel_head: bytes
    fast_encoding: tuple[bool, bool, str] | None = None  # the fast reader's (implicit, little, ts)
    layout: Layout | None = None  # the layout the fast reader read it by, if any

    def encoding(self) -> tuple[bool, bool, str]:
        """(implicit VR, little endian, transfer syntax UID); pydicom's are decoded only when asked."""
        if self.fast_encoding is not None:
            return self.fast_encoding
        assert self.raw_ds is not None
        implicit, little = _encoding(self.raw_ds)
        ts = str(getattr(getattr(self.raw_ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if not ts:
            ts = "1.2.840.10008.1.2" if (implicit and little) else ("1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
        return implicit, little, ts


def read_header(path: Path, fast: bool = True) -> list[SliceHeader] | OtherObject:
    """Header of one file -> its image slices (one per frame) or a non-image object; raises _Skip.

    ``fast``: try :mod:`pipeline.io.fastheader` first (same result, see ``_read_fast``); False
    reads every file with pydicom (the reference the tests compare against).
    """
    return _read_header(Path(path), fast, None)


def _read_header(path: Path, fast: bool, heads: _HeadReads | None,
                 memo: LayoutMemo | None = None) -> list[SliceHeader] | OtherObject:
    try:  # O_NONBLOCK: a FIFO (size 0) must not block the open; reads of files are unaffected
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        raise _Skip("unreadable files") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise _Skip("empty files")
        known = fast and memo is not None and bool(memo.layouts)
        # as far as the known layouts need (~5 KB for a CT: most files are read by one), else HEAD_BYTES
        first = min(size, memo.head_bytes() if known else HEAD_BYTES)
        head = heads.read(fd, first) if heads is not None else _pread(fd, min(first, HEAD_BYTES), 0)
        fh = _FdFile(fd)
        if known:
            head = _extend(fh, head, first)
            by_template = _read_by_template(path, size, head, memo)
            if by_template is not None:
                return by_template
            head = _extend(fh, head, min(size, HEAD_BYTES))  # the general path reads on from HEAD_BYTES
        kind = _sniff(head[:132])
        if kind is None:
            raise _Skip("non-DICOM files")
        parsed = _read_fast(fh, head, size, memo) if (fast and kind) else None
        if parsed is None:
            with open(fd, "rb", closefd=False) as fh:
                parsed = _read_pydicom(fh, kind)
    finally:
        os.close(fd)
    if parsed.layout is not None:
        return _from_layout(path, size, parsed)
    return _from_parsed(path, size, parsed)


def fast_raw_elements(fd: int, size: int, memo: LayoutMemo | None = None
                      ) -> tuple[bytes, dict[str, bytes] | None]:
    """(the file's first ``HEAD_BYTES``, the raw value bytes of its HEADER_TAGS elements by keyword)
    for an open Part-10 file, by the fast reader (with ``memo``: by a layout where one fits).

    The second item is None wherever the fast reader declines (no preamble, multi-frame, a
    sequence the loader reads, anything it doubts): read that file with pydicom. An element
    the file does not hold is absent. For readers that need a few plain values of many files
    (batch discovery) without building SliceHeaders.
    """
    head = _pread(fd, HEAD_BYTES, 0)
    if _sniff(head[:132]) is not True:
        return head, None
    parsed = _read_fast(_FdFile(fd), head, size, memo)
    if parsed is None:
        return head, None
    return head, {_KEYWORD_OF[tag][0]: raw for tag, (_, raw) in parsed.ds.elements.items()}


def _pread(fd: int, n: int, pos: int) -> bytes:
    """Up to ``n`` bytes at ``pos`` (fewer only at the end of the file), like a buffered read."""
    data = os.pread(fd, n, pos)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, pos + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _FdFile:
    """``seek`` + ``read`` over an open descriptor (the fast reader's later windows), with ``pread``."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos = fd, 0

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = _pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data


def _read_fast(fh: BinaryIO, head: bytes, size: int, memo: LayoutMemo | None = None) -> _Parsed | None:
    """The fast reader's result, or None when the file is for pydicom (any doubt, any error).

    The kept elements are decoded by the same ``_parse_raw`` as pydicom's raw elements, so both
    readers give identical SliceHeaders. Multi-frame images and files holding a sequence the
    loader reads (functional groups, DICOMDIR records) go to pydicom. With a ``memo`` (one per
    header pass), a file that follows the layout of an earlier one is read by that layout
    (:mod:`pipeline.io.layout`: the same result), and the values that do not vary across the
    series are decoded once.
    """
    try:
        raw = None
        if memo is not None and memo.layouts:
            head = _extend(fh, head, min(size, memo.head_bytes()))
            raw = memo.read(head, _WANTED_TAGS)
        if raw is None:
            trace: list[int] | None = [] if memo is not None else None
            raw = read_raw_header(fh, head, size, _WANTED_TAGS, trace)
            if memo is not None and trace is not None and memo.learning and len(raw.pixel_head) == 12:
                head = _extend(fh, head, min(raw.pixel_pos + 12, MAX_HEADER_BYTES))  # the whole header
                memo.learn(head, trace, raw, _WANTED_TAGS)
        view = _view(raw)
        if any(tag in raw.elements for tag in _SEQUENCE_TAGS) or (_int(view, "NumberOfFrames") or 1) > 1:
            return None
    except Fallback as exc:
        log.debug("header read by pydicom: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - never trust a surprise: pydicom decides
        log.debug("fast header reader failed (%s); header read by pydicom", type(exc).__name__)
        return None
    return _Parsed(view, None, raw.pixel_pos, raw.pixel_head, (raw.implicit, True, raw.transfer_syntax), raw.layout)


def _extend(fh: BinaryIO, head: bytes, n: int) -> bytes:
    """``head`` extended to the file's first ``n`` bytes (fewer at the end of the file)."""
    if n <= len(head):
        return head
    fh.seek(len(head))
    return head + fh.read(n - len(head))


def _read_pydicom(fh: BinaryIO, kind: bool) -> _Parsed:
    """Read the header with pydicom (any encoding it supports); its exceptions propagate."""
    fh.seek(0)
    raw_ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not kind, specific_tags=HEADER_TAGS)
    pixel_pos = fh.tell()
    fh.seek(pixel_pos)
    pixel_head = fh.read(12)
    return _Parsed(_Header(raw_ds), raw_ds, pixel_pos, pixel_head)


def _from_parsed(path: Path, size: int, parsed: _Parsed) -> list[SliceHeader] | OtherObject:
    """The checks and SliceHeader fields common to both readers; raises _Skip."""
    ds, pixel_head = parsed.ds, parsed.pixel_head
    if "SOPClassUID" not in ds and "Modality" not in ds and "Rows" not in ds:
        raise _Skip("non-DICOM files")
    tag = struct.unpack("<HH", pixel_head[:4]) if len(pixel_head) >= 4 else None
    has_pixels = tag is not None and ((tag[0] << 16) | tag[1]) in PIXEL_TAGS
    modality = str(ds.get("Modality", "") or "").upper()
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not has_pixels and ("Rows" in ds or "ImagePositionPatient" in ds or sop_class in CT_SOP_CLASSES):
        raise _Skip("truncated files")  # an image whose file ends before (or inside) its pixel data
    if not has_pixels or "Rows" not in ds:
        what = UID(sop_class).name if sop_class else "no pixel data"
        if "DirectoryRecordSequence" in ds:
            what = "DICOMDIR"
        return OtherObject(path, series_uid, modality or "?", f"not an image ({what})")
    series_key = series_uid or _fallback_series_key(ds)
    implicit, little, ts = parsed.encoding()
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows <= 0 or cols <= 0:
        raise _Skip("images with invalid size")
    n_frames = _int(ds, "NumberOfFrames") or 1
    bits_allocated = _int(ds, "BitsAllocated") or 16
    samples = _int(ds, "SamplesPerPixel") or 1
    frame_bytes = (rows * cols * samples * bits_allocated + 7) // 8
    expected = (rows * cols * n_frames * samples * bits_allocated + 7) // 8
    pixel_offset = _native_offset(pixel_head, parsed.pixel_pos, implicit, little, ts)
    if pixel_offset is not None:
        declared = _declared_length(pixel_head, implicit)
        if declared < expected or size < pixel_offset + expected:
            raise _Skip("truncated files")
    elif ts in NATIVE_LE and len(pixel_head) < 12:
        raise _Skip("truncated files")
    common: dict[str, Any] = dict(
        path=path, n_frames=n_frames,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""), series_uid=series_uid, series_key=series_key,
        for_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""), sop_class=str(ds.get("SOPClassUID", "") or ""),
        modality=modality, image_type=tuple(str(v).upper() for v in _multi(ds.get("ImageType"))),
        series_number=_int(ds, "SeriesNumber"), series_description=str(ds.get("SeriesDescription", "") or ""),
        rows=rows, cols=cols, instance_number=_int(ds, "InstanceNumber"),
        acquisition_number=_int(ds, "AcquisitionNumber"), transfer_syntax=ts,
        bits_allocated=bits_allocated, bits_stored=_int(ds, "BitsStored") or bits_allocated,
        pixel_representation=_int(ds, "PixelRepresentation") or 0, samples_per_pixel=samples,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper(),
    )
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        assert parsed.raw_ds is not None  # the fast reader leaves multi-frame images to pydicom
        return _frames(parsed.raw_ds, ds, common, pixel_offset, frame_bytes)
    geo = _geometry(ds, ds)
    if geo is None:
        if modality == "CT":
            raise _Skip(NO_POSITION)
        return OtherObject(path, series_uid, modality or "?", "image without position/orientation")
    common.update(geo)
    common["frame"], common["pixel_offset"] = None, pixel_offset
    return [_slice_header(common)]


# The keywords that may vary between the files of one layout while the SliceHeaders' other fields
# stay those of the layout's first file (see _from_layout); each maps to one field.
_PER_SLICE_KEYWORDS = frozenset({"SOPInstanceUID", "ImagePositionPatient", "InstanceNumber", "AcquisitionNumber"})


@dataclass(frozen=True)
class _SliceTemplate:
    """The SliceHeader fields of a layout's first image, and what the per-slice fields need."""

    fields: dict[str, Any]
    pixel_head: bytes  # its pixel data element's first 12 bytes (tag, VR, length)
    header: int  # bytes from that element's tag to its values
    nbytes: int  # bytes of pixel data the image needs
    varying: frozenset[str]  # the per-slice keywords the layout varies


def _from_layout(path: Path, size: int, parsed: _Parsed) -> list[SliceHeader] | OtherObject:
    """``_from_parsed`` for a file read by a layout (:mod:`pipeline.io.layout`): the same result.

    The elements a layout does not vary have the same values in all its files, so every field
    but the per-slice ones (path, SOP instance UID, position, instance and acquisition numbers,
    pixel offset) is that of the first image read by the layout. Those are computed here as
    ``_from_parsed`` computes them (the pixel offset and size checks from the same pixel data
    element header as that image's); any doubt (other elements varying, another pixel data
    element header, a position that is not 3 finite numbers, a file too short, no template yet)
    and the file goes through ``_from_parsed`` itself.
    """
    layout = parsed.layout
    assert layout is not None and isinstance(parsed.ds, _LayoutView)
    template: _SliceTemplate | None = layout.slice_cache
    if template is None:
        result = _from_parsed(path, size, parsed)
        varying = parsed.ds.keywords  # the keywords of the elements the layout varies
        if isinstance(result, list) and len(result) == 1 and result[0].pixel_offset is not None \
                and varying <= _PER_SLICE_KEYWORDS:
            first = result[0]
            nbytes = (first.rows * first.cols * first.samples_per_pixel * first.bits_allocated + 7) // 8
            layout.slice_cache = _SliceTemplate(first.__dict__, parsed.pixel_head, first.pixel_offset - parsed.pixel_pos,
                                                nbytes, varying)
        return result
    one = _template_slice(template, path, size, parsed.pixel_pos, parsed.pixel_head, parsed.ds)
    return [one] if one is not None else _from_parsed(path, size, parsed)


def _template_slice(template: _SliceTemplate, path: Path, size: int, pixel_pos: int, pixel_head: bytes,
                    ds: Any) -> SliceHeader | None:
    """The SliceHeader of a file read by a layout with a slice template: the template's fields
    with this file's path, pixel offset and per-slice values (``ds.get(keyword)``, decoded as
    ``_parse_raw`` does). None on any doubt (see ``_from_layout``)."""
    pixel_offset = pixel_pos + template.header
    if pixel_head != template.pixel_head or size < pixel_offset + template.nbytes:
        return None
    fields = template.fields.copy()  # the same keys in the same order as SliceHeader's fields
    fields["path"], fields["pixel_offset"] = path, pixel_offset
    for keyword in template.varying:
        if keyword == "ImagePositionPatient":
            ipp = _floats(ds.get(keyword), 3)
            if ipp is None or not all(map(math.isfinite, ipp)) or max(map(abs, ipp)) > MAX_POSITION_MM:
                return None
            fields["ipp"] = tuple(ipp)
        elif keyword == "SOPInstanceUID":
            fields["sop_uid"] = str(ds.get(keyword, "") or "")
        elif keyword == "InstanceNumber":
            fields["instance_number"] = _int(ds, keyword)
        else:
            fields["acquisition_number"] = _int(ds, keyword)
    obj = object.__new__(SliceHeader)
    object.__setattr__(obj, "__dict__", fields)
    return obj


def _read_by_template(path: Path, size: int, head: bytes, memo: LayoutMemo) -> list[SliceHeader] | None:
    """``_read_fast`` + ``_from_layout`` in one step, for a file that follows a known layout whose
    first image made a slice template (most files of a series): the same SliceHeader, without
    the intermediate header objects. None: the general path decides (and may still use a layout).

    Every check the general path makes holds by construction here: the layout's kept elements
    that do not vary passed them in the template's file (no sequence, one frame, a handled
    character set), and a template exists only when the varying ones are per-slice values."""
    match = memo.match(head, _WANTED_TAGS)
    if match is None or match[0].slice_cache is None:
        return None
    layout, varying, pixel_pos = match
    values = _RawView(varying, layout.varying_tags).values
    one = _template_slice(layout.slice_cache, path, size, pixel_pos, head[pixel_pos:pixel_pos + 12], values)
    return None if one is None else [one]


def _frames(ds: Dataset, header: _Header, common: dict[str, Any], offset: int | None,
            frame_bytes: int) -> list[SliceHeader]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    n = int(common["n_frames"])
    if per_frame is None or len(per_frame) < n:
        raise _Skip("multi-frame images without per-frame positions")
    out = []
    for f in range(n):
        geo = _geometry(header, _FunctionalGroups(per_frame[f], shared))
        if geo is None:
            raise _Skip("multi-frame images without per-frame positions")
        frame_offset = None if offset is None else offset + f * frame_bytes
        out.append(SliceHeader(frame=f, pixel_offset=frame_offset, **common, **geo))
    return out


_SLICE_FIELDS = tuple(f.name for f in dataclasses.fields(SliceHeader))
_SLICE_FIELD_SET = frozenset(_SLICE_FIELDS)


def _slice_header(fields: dict[str, Any]) -> SliceHeader:
    """``SliceHeader(**fields)`` without the frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` per field, ~10 us a header): the same instance, field for field."""
    if fields.keys() != _SLICE_FIELD_SET:
        return SliceHeader(**fields)  # its own error
    obj = object.__new__(SliceHeader)
    object.__setattr__(obj, "__dict__", {name: fields[name] for name in _SLICE_FIELDS})
    return obj


class _FunctionalGroups:
    """Attribute look-up through a frame's functional groups, then the shared ones, then the top level."""

    _SEQ = {
        "ImagePositionPatient": "PlanePositionSequence",
        "ImageOrientationPatient": "PlaneOrientationSequence",
        "PixelSpacing": "PixelMeasuresSequence",
        "SliceThickness": "PixelMeasuresSequence",
        "RescaleSlope": "PixelValueTransformationSequence",
        "RescaleIntercept": "PixelValueTransformationSequence",
    }

    def __init__(self, frame: Dataset, shared: Dataset | None) -> None:
        self.groups = [g for g in (frame, shared) if g is not None]

    def get(self, keyword: str, default: Any = None) -> Any:
        seq_name = self._SEQ.get(keyword)
        for group in self.groups:
            seq = group.get(seq_name) if seq_name else None
            if seq and keyword in seq[0]:
                return seq[0].get(keyword)
        return default

    def __contains__(self, keyword: str) -> bool:
        return self.get(keyword) is not None


def _geometry(ds: Any, src: Any) -> dict[str, Any] | None:
    """Geometry and rescale fields, or None when position/orientation/spacing are absent or invalid."""
    iop = _floats(src.get("ImageOrientationPatient"), 6) or _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(src.get("ImagePositionPatient"), 3) or _floats(ds.get("ImagePositionPatient"), 3)
    ps = _floats(src.get("PixelSpacing"), 2) or _floats(ds.get("PixelSpacing"), 2)
    if iop is None or ipp is None or ps is None:
        return None
    if not all(map(math.isfinite, iop + ipp + ps)) or min(ps) < 1e-3 or max(ps) > 1e3:
        raise _Skip("images with invalid geometry values")
    if max(abs(v) for v in ipp) > MAX_POSITION_MM:
        raise _Skip("images with invalid geometry values")
    slope = _float(src.get("RescaleSlope")) if "RescaleSlope" in src else _float(ds.get("RescaleSlope"))
    intercept = _float(src.get("RescaleIntercept")) if "RescaleIntercept" in src else _float(ds.get("RescaleIntercept"))
    has_rescale = slope is not None and intercept is not None
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0 or abs(slope) > 1e6 or abs(intercept) > 1e7:
        raise _Skip("images with invalid rescale values")
    thickness = _float(src.get("SliceThickness")) if "SliceThickness" in src else _float(ds.get("SliceThickness"))
    return dict(
        row_dir=tuple(iop[:3]), col_dir=tuple(iop[3:]), ipp=tuple(ipp), pixel_spacing=(ps[0], ps[1]),
        slice_thickness=thickness, slope=slope, intercept=intercept, has_rescale=has_rescale,
    )


_STRUCT = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}
_STRUCT_SIZE = {code: struct.calcsize(code) for code in _STRUCT.values()}
_LE_ONE = {code: struct.Struct("<" + code).unpack for code in _STRUCT.values()}
_BE_ONE = {code: struct.Struct(">" + code).unpack for code in _STRUCT.values()}


def _tag_table() -> dict[str, tuple[int, str]]:
    """HEADER_TAGS keyword -> (tag, dictionary VR)."""
    out = {}
    for kw in HEADER_TAGS:
        tag = tag_for_keyword(kw)
        if tag is not None:
            out[kw] = (int(tag), dictionary_VR(tag))
    return out


_TAG_TABLE = _tag_table()
_KEYWORD_OF = {tag: (kw, vr) for kw, (tag, vr) in _TAG_TABLE.items()}  # tag -> (keyword, dictionary VR)
_WANTED_TAGS = frozenset(tag for tag, _ in _TAG_TABLE.values())  # what the fast reader keeps
_SEQUENCE_TAGS = tuple(tag for tag, vr in _TAG_TABLE.values() if vr == "SQ")  # files holding one go to pydicom


class _Header:
    """Fast read-only view of a header: values of our tags are decoded straight from the raw bytes.

    pydicom's element conversion (with value validation) costs more than parsing the file; for
    the ~30 simple elements the loader needs, a plain bytes -> str/int decode is enough. Sequences
    and anything already converted go through pydicom.
    """

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def get(self, keyword: str, default: Any = None) -> Any:
        spec = _TAG_TABLE.get(keyword)
        if spec is None:
            return self.ds.get(keyword, default)
        tag, vr = spec
        elem = self.ds.get_item(tag)
        if elem is None:
            return default
        if vr == "SQ" or not getattr(elem, "is_raw", False):
            value = self.ds.get(keyword, default)
        else:
            value = _parse_raw(elem.value, elem.VR or vr, elem.is_little_endian)
        return default if value is None or value == "" else value

    def __contains__(self, keyword: str) -> bool:
        return self.get(keyword) is not None


class _RawView:
    """The same view over the fast reader's elements: the same ``_parse_raw`` on the same bytes.

    Only HEADER_TAGS keywords can be asked for (the fast reader keeps nothing else); the
    sequences among them never reach this view (such files are read by pydicom). Every kept
    element is decoded once, up front (the loader asks for nearly all of them); with ``tags``,
    only those (:class:`_LayoutView`).
    """

    def __init__(self, elements: dict[int, tuple[str | None, bytes]], tags: Iterable[int] | None = None) -> None:
        self.elements = elements
        values: dict[str, Any] = {}  # keyword -> decoded value (absent: absent or empty)
        for tag in elements if tags is None else tags:
            vr, raw = elements[tag]
            if not raw:
                continue
            keyword, dict_vr = _KEYWORD_OF[tag]
            value = _parse_raw(raw, vr or dict_vr, True)
            if value is not None and value != "":
                values[keyword] = value
        self.values = values

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.values.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.values


def _view(raw: RawHeader) -> _RawView | _LayoutView:
    """The keyword view of a fast read (by a layout: :class:`_LayoutView`)."""
    return _RawView(raw.elements) if raw.layout is None else _LayoutView(raw)


class _LayoutView:
    """The view of a file read by a layout: the values of the elements the layout does not vary
    are decoded once per layout (the same bytes in all its files); only the varying ones here."""

    def __init__(self, raw: RawHeader) -> None:
        layout = raw.layout
        if layout.view_cache is None:
            keywords = frozenset(_KEYWORD_OF[tag][0] for tag in layout.varying_tags)
            layout.view_cache = (_RawView(layout.stable).values, keywords)
        self.elements = raw.elements
        self.base, self.keywords = layout.view_cache
        self.values = _RawView(raw.elements, layout.varying_tags).values  # the varying ones

    def get(self, keyword: str, default: Any = None) -> Any:
        return (self.values if keyword in self.keywords else self.base).get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in (self.values if keyword in self.keywords else self.base)


def _parse_raw(value: bytes | None, vr: str, little: bool) -> Any:
    """bytes of one element -> str, list[str], int/float or list of numbers (multi-valued)."""
    if not value:
        return None
    code = _STRUCT.get(vr)
    if code is not None:
        size = _STRUCT_SIZE[code]
        n = len(value) // size
        if n == 0:
            return None
        if n == 1:
            return (_LE_ONE if little else _BE_ONE)[code](value[:size])[0]
        return list(struct.unpack(("<" if little else ">") + code * n, value[: n * size]))
    text = value.decode("latin-1").strip("\x00 ")
    if "\\" in text:
        return [part.strip("\x00 ") for part in text.split("\\")]
    return text


def _fallback_series_key(ds: Any) -> str:
    """Stand-in series key for images without SeriesInstanceUID (some anonymisers blank UIDs)."""
    parts = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesNumber", "SeriesDescription",
                                                    "Modality", "FrameOfReferenceUID", "SeriesTime")]
    return "no-series-uid:" + "|".join(parts)


def _encoding(ds: Dataset) -> tuple[bool, bool]:
    enc = getattr(ds, "original_encoding", None)
    if enc and enc[0] is not None:
        return bool(enc[0]), bool(enc[1])
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None:
        uid = UID(str(ts))
        return bool(uid.is_implicit_VR), bool(uid.is_little_endian)
    return True, True


def _native_offset(head: bytes, pos: int, implicit: bool, little: bool, ts: str) -> int | None:
    """Byte offset of uncompressed little-endian pixel values, else None (compressed, big endian...)."""
    if not little or len(head) < 8 or ts not in NATIVE_LE:
        return None
    if struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    length = _declared_length(head, implicit)
    if length == 0xFFFFFFFF:
        return None
    return pos + (8 if implicit else 12)


def _declared_length(head: bytes, implicit: bool) -> int:
    if implicit:
        return struct.unpack("<I", head[4:8])[0]
    if len(head) < 12:
        return 0
    return struct.unpack("<I", head[8:12])[0]


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _floats(value: Any, n: int) -> list[float] | None:
    items = _multi(value)
    if len(items) != n:
        return None
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


_EXACT_INT = 2**53  # every int up to this is a float exactly


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value reads as absent
        return None
    if value is None or value == "":
        return None
    if type(value) is int and -_EXACT_INT <= value <= _EXACT_INT:
        return value  # what int(float(value)) gives
    try:
        if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, str)):
            value = list(value)[0]
        return int(float(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
