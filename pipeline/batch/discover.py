"""Find the studies under an input root, whatever the folder layout.

* DICOM files are grouped by StudyInstanceUID (and, inside a study, by SeriesInstanceUID),
  however the folders are arranged: one folder per study, one folder per series, two studies
  mixed in one folder, or everything flat. Only headers are read: by the loader's fast header
  reader (a series' files by their shared layout), by pydicom (``stop_before_pixels`` +
  ``specific_tags``) wherever the fast reader declines or a value's bytes are not plain (the
  same values either way: ``tests/test_batch_discovery_fast.py``). Files that are not DICOM are
  skipped.
  Duplicate copies of an instance (same SOPInstanceUID) are kept once.
* Every NIfTI file (``.nii``, ``.nii.gz``) is one study, and so is every ``.zip``.
* Files whose DICOM header cannot be parsed cannot be grouped; when a folder holds only such
  files they become one ``unreadable`` study, so the failure shows up in the manifest.

Hidden names (starting with ".") are skipped: that is where atomic writes keep temporary
files. The output folder is skipped when it lies under the input root.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pydicom
from pydicom.errors import InvalidDicomError

from pipeline.errors import InputError
from pipeline.io.discover import fast_raw_elements
from pipeline.io.layout import LayoutMemo

log = logging.getLogger("osteoplan.batch")

NO_UID_PREFIX = "no-study-uid:"
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"]
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ZIP_SUFFIXES = (".zip",)
# Files that are never DICOM; skipping them by name saves a read per file.
NON_DICOM_SUFFIXES = (
    ".txt", ".csv", ".json", ".jsonl", ".yaml", ".yml", ".md", ".html", ".htm", ".png", ".jpg",
    ".jpeg", ".gif", ".pdf", ".xml", ".log", ".py", ".nrrd", ".mha", ".mhd", ".raw", ".gz", ".npz", ".npy",
)
# Files without a DICOM preamble are tried with force=True only with these suffixes (or none).
FORCE_SUFFIXES = ("", ".dcm", ".dicom", ".ima", ".img")
HEADER_THREADS = 8  # concurrent reads: a network share answers several at once
HEADER_CHUNK = 64  # files per task: a series' files share one layout memo (listing order)


@dataclass(frozen=True)
class DicomHeader:
    path: Path
    size: int
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a DICOM study (for the manifest: what was there)."""

    series_uid: str
    modality: str
    n_files: int


@dataclass(frozen=True)
class Study:
    """One unit of batch work.

    ``key`` is the expected output folder name (StudyInstanceUID, or the input's stem);
    ``shard_key`` is what sharding hashes: StudyInstanceUID for DICOM, the path relative to
    the root for files (stable across machines and listings, cheap: no content read).
    ``sop_sizes`` holds (SOPInstanceUID, file size in bytes) per DICOM instance.
    """

    key: str
    kind: str  # dicom | nifti | zip | unreadable
    input_path: Path  # the file (nifti/zip), or the deepest folder holding all the study's files
    rel: str  # input_path relative to the root, POSIX style ("." for the root itself)
    shard_key: str
    files: tuple[Path, ...] = ()
    sop_sizes: tuple[tuple[str, int], ...] = ()
    series: tuple[SeriesInfo, ...] = ()
    error: str | None = None  # a discovery-level failure (kind == "unreadable")
    out_subdir: str = ""  # "" = OUT/<key>; set when two studies would share an output folder

    def with_out_subdir(self, subdir: str) -> "Study":
        from dataclasses import replace

        return replace(self, out_subdir=subdir)


@dataclass
class DiscoveryStats:
    files_seen: int = 0
    dicom_files: int = 0
    non_dicom_skipped: int = 0
    unreadable_headers: int = 0
    duplicate_instances: int = 0
    notes: list[str] = field(default_factory=list)


def discover_studies(root: Path, exclude: Iterable[Path] = ()) -> tuple[list[Study], DiscoveryStats]:
    """All studies under ``root`` (a folder, or a single NIfTI/zip/DICOM file), sorted by key.

    ``exclude``: folders not to descend into (e.g. the output folder).
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"input root not found: {root}")
    stats = DiscoveryStats()
    excluded = {_resolve(p) for p in exclude}
    nifti: list[Path] = []
    zips: list[Path] = []
    candidates: list[Path] = []
    for path in _walk(root, excluded):
        stats.files_seen += 1
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES):
            nifti.append(path)
        elif name.endswith(ZIP_SUFFIXES):
            zips.append(path)
        elif name.endswith(NON_DICOM_SUFFIXES) or name == "dicomdir":
            stats.non_dicom_skipped += 1
        else:
            candidates.append(path)

    headers: list[DicomHeader] = []
    unreadable: dict[Path, list[Path]] = defaultdict(list)
    chunks = [candidates[i:i + HEADER_CHUNK] for i in range(0, len(candidates), HEADER_CHUNK)]
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        results = [r for part in pool.map(read_headers, chunks) for r in part]
        for path, result in zip(candidates, results):
            if isinstance(result, DicomHeader):
                headers.append(result)
            elif result == "unreadable":
                unreadable[path.parent].append(path)
            else:
                stats.non_dicom_skipped += 1
    stats.dicom_files = len(headers)
    stats.unreadable_headers = sum(len(v) for v in unreadable.values())

    base = root if root.is_dir() else root.parent
    studies = _group_dicom(headers, base, stats)
    dicom_folders = {h.path.parent for h in headers}
    for folder, files in sorted(unreadable.items()):
        if folder in dicom_folders:
            stats.notes.append(f"{len(files)} file(s) with unreadable DICOM headers skipped beside readable ones")
            continue
        rel = _rel(folder, base)
        studies.append(Study(
            key=f"unreadable-{rel}", kind="unreadable", input_path=folder, rel=rel, shard_key=f"path:{rel}",
            files=tuple(sorted(files)), sop_sizes=tuple(sorted((_rel(f, base), _size(f)) for f in files)),
            error=f"{len(files)} file(s) look like DICOM but their headers cannot be read",
        ))
    for path in nifti:
        rel = _rel(path, base)
        studies.append(Study(key=_strip_suffix(path.name, NIFTI_SUFFIXES), kind="nifti", input_path=path,
                             rel=rel, shard_key=f"path:{rel}", files=(path,)))
    for path in zips:
        rel = _rel(path, base)
        studies.append(Study(key=_zip_key(path), kind="zip", input_path=path, rel=rel,
                             shard_key=f"path:{rel}", files=(path,)))
    studies.sort(key=lambda s: (s.key, s.shard_key))
    return studies, stats


def read_headers(paths: list[Path], fast: bool = True) -> list[DicomHeader | str]:
    """``read_header`` for each of ``paths`` (in order), sharing one layout memo: files of one
    series written alike are read by comparing bytes (``pipeline.io.layout``)."""
    memo = LayoutMemo() if fast else None
    return [read_header(p, fast, memo) for p in paths]


def read_header(path: Path, fast: bool = True, memo: LayoutMemo | None = None) -> DicomHeader | str:
    """The grouping tags of one file, or "not-dicom" / "unreadable".

    With ``fast`` a Part-10 file is first read by the loader's fast header reader, and its
    values are taken only where their bytes are plain (UIDs of digits and dots, a Modality of
    capitals, digits, underscores and spaces, with the usual one-byte padding), where pydicom
    gives the same strings; anything else, and every file the fast reader declines, is read
    by pydicom as before (``fast=False``: always; the reference the tests compare against).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never wait on a FIFO
        try:
            size = os.fstat(fd).st_size
            if fast:
                head, elements = fast_raw_elements(fd, size, memo)
            else:
                head, elements = os.pread(fd, 132, 0), None
        finally:
            os.close(fd)
    except OSError:
        return "unreadable"
    except Exception:  # noqa: BLE001 - the fast reader's doubt: pydicom decides below
        head, elements = _head(path), None
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if not has_preamble and path.suffix.lower() not in FORCE_SUFFIXES:
        return "not-dicom"
    values = _plain_values(elements) if elements is not None else None
    if values is None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=not has_preamble)
            values = (str(ds.get("StudyInstanceUID", "") or "").strip(),
                      str(ds.get("SeriesInstanceUID", "") or "").strip(),
                      str(ds.get("SOPInstanceUID", "") or "").strip(),
                      str(ds.get("SOPClassUID", "") or ""),
                      str(ds.get("Modality", "") or "").strip().upper())
        except (InvalidDicomError, EOFError):
            return "unreadable" if has_preamble else "not-dicom"
        except Exception:  # noqa: BLE001 - any parse failure of a third-party file
            return "unreadable" if has_preamble else "not-dicom"
    study, series, sop, sop_class, modality = values
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        return "not-dicom"
    if not study and not sop and has_preamble and modality:
        # Real files do come with empty Study/SOP Instance UIDs (the Siemens slab in the shared
        # test data): such files form one study per folder, instances known by name and size.
        study = f"{NO_UID_PREFIX}{path.parent}"
    if study and not _looks_like_uid(sop):
        sop = f"no-sop-uid:{path.name}:{size}"
    if not ((_looks_like_uid(study) or study.startswith(NO_UID_PREFIX)) and sop):
        # With a preamble: a truncated or broken header. Without: force=True on a random file
        # yields an empty dataset, which is not DICOM.
        return "unreadable" if has_preamble else "not-dicom"
    return DicomHeader(path=path, size=size, study_uid=study, series_uid=series or "-", sop_uid=sop,
                       modality=modality or "-")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)
    except OSError:
        return b""


# Raw value bytes pydicom turns into the same string as a plain ASCII decode and strip.
_PLAIN_UID = re.compile(rb"[0-9.]*[\x00 ]?")
_PLAIN_CS = re.compile(rb"[A-Z0-9_ ]*")
_PLAIN = (("StudyInstanceUID", _PLAIN_UID), ("SeriesInstanceUID", _PLAIN_UID), ("SOPInstanceUID", _PLAIN_UID),
          ("SOPClassUID", _PLAIN_UID), ("Modality", _PLAIN_CS))


def _plain_values(elements: dict[str, bytes]) -> tuple[str, str, str, str, str] | None:
    """(study, series, SOP instance, SOP class, modality) as ``read_header`` makes them from
    pydicom's values, or None when any value's bytes are not plain (then pydicom reads it)."""
    out = []
    for keyword, plain in _PLAIN:
        raw = elements.get(keyword, b"")
        if not plain.fullmatch(raw):
            return None
        out.append(raw.decode("ascii").strip("\x00 "))
    return out[0], out[1], out[2], out[3], out[4]


def _group_dicom(headers: list[DicomHeader], base: Path, stats: DiscoveryStats) -> list[Study]:
    by_study: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_study[h.study_uid].append(h)
    studies = []
    for uid, items in by_study.items():
        items.sort(key=lambda h: str(h.path))
        unique: dict[str, DicomHeader] = {}
        for h in items:
            if h.sop_uid in unique:
                stats.duplicate_instances += 1
                continue
            unique[h.sop_uid] = h
        kept = list(unique.values())
        series: dict[str, list[DicomHeader]] = defaultdict(list)
        for h in kept:
            series[h.series_uid].append(h)
        folder = Path(os.path.commonpath([str(h.path.parent) for h in kept]))
        key = Path(uid[len(NO_UID_PREFIX):]).name if uid.startswith(NO_UID_PREFIX) else uid  # as run_study names it
        studies.append(Study(
            key=key, kind="dicom", input_path=folder, rel=_rel(folder, base), shard_key=f"dicom:{uid}",
            files=tuple(h.path for h in kept),
            sop_sizes=tuple(sorted((h.sop_uid, h.size) for h in kept)),
            series=tuple(sorted((SeriesInfo(s, v[0].modality, len(v)) for s, v in series.items()),
                                key=lambda si: si.series_uid)),
        ))
    return studies


def _walk(root: Path, excluded: set[Path]) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and _resolve(here / d) not in excluded)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


def _zip_key(path: Path) -> str:
    """StudyInstanceUID of the first DICOM member of a zip, else the zip's stem (the output name)."""
    stem = _strip_suffix(path.name, ZIP_SUFFIXES)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist()[:64]:
                if info.is_dir() or info.file_size < 132:
                    continue
                with zf.open(info) as fh:
                    head = fh.read(132)
                    if head[128:132] != b"DICM":
                        continue
                with zf.open(info) as fh:
                    ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                uid = str(ds.get("StudyInstanceUID", "") or "").strip()
                return uid if _looks_like_uid(uid) else stem
    except Exception:  # noqa: BLE001 - a bad zip is reported when the study is loaded
        return stem
    return stem


def _looks_like_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid)


def _strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    low = name.lower()
    for suffix in suffixes:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rel(path: Path, base: Path) -> str:
    try:
        rel = Path(path).relative_to(base).as_posix()
    except ValueError:
        rel = Path(path).as_posix()
    return rel or "."


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _resolve(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path).absolute()
