"""load_input(): any supported input -> one CT Volume (HU, LPS geometry, provenance, warnings).

Rules (README "Input" copies them):

- ``path`` may be a folder of DICOM files (any depth, any mix of series, junk files allowed),
  a single DICOM file, a NIfTI file (``.nii`` / ``.nii.gz``), or a zip archive (extracted safely
  into a temporary folder, then read as a folder; the folder is removed when the Volume is
  garbage-collected or the process exits, so ``Volume.dicom.files`` stays readable while the
  Volume lives).
- The kind of a file is decided from its content (DICM marker, zip magic, gzip/NIfTI header),
  with the ``.nii``/``.nii.gz``/``.zip`` name as a hint only.
- Errors: ``InputError`` (exit 2) for a missing path, unreadable or unsuitable input; a
  ``NoCTSeriesError`` (exit 3) when no CT series is found. Messages are one line without patient
  identity; details go to the log with UIDs anonymised.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import InputError
from pipeline.io.dicom import build_volume
from pipeline.io.discover import list_files, scan_files
from pipeline.io.nifti import read_nifti
from pipeline.io.select import choose_series
from pipeline.io.zipin import extract_zip, is_zip
from pipeline.types import Volume

log = logging.getLogger("osteoplan.io")

DEFAULT_MAX_VOXELS = 1_500_000_000


def load_input(path: Path, series_uid: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load the CT volume from a DICOM folder or file, a NIfTI file or a zip archive."""
    path = Path(path)
    if not path.exists():
        raise InputError("the input path does not exist")
    if path.is_dir():
        volume = load_dicom_files(list_files(path), series_uid=series_uid, max_voxels=max_voxels)
        volume.input_path = str(path)
        return volume
    if not path.is_file():
        raise InputError("the input is neither a file nor a folder")
    kind = _file_kind(path)
    if kind == "nifti":
        if series_uid is not None:
            log.info("--series ignored for a NIfTI input")
        return read_nifti(path, max_voxels=max_voxels)
    if kind == "zip":
        return _load_zip(path, series_uid, max_voxels)
    volume = load_dicom_files([path], series_uid=series_uid, max_voxels=max_voxels)
    volume.input_path = str(path)
    return volume


def load_dicom_files(files: list[Path], series_uid: str | None = None,
                     max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load the best (or the requested) CT series from an explicit list of files."""
    files = [f if isinstance(f, Path) else Path(f) for f in files]  # Path(a Path) parses it again: ~5 us a file
    with quiet_pydicom():
        scan = scan_files(files)
        selection = choose_series(scan, series_uid)
        return build_volume(selection, scan, max_voxels, input_path=_common_root(files), input_kind="dicom")


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom logs every odd value it meets at WARNING; those are not for the user's screen.

    Our own summary (files skipped, slices dropped...) is logged and reported instead.
    """
    logger = logging.getLogger("pydicom")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _load_zip(path: Path, series_uid: str | None, max_voxels: int) -> Volume:
    tmp = Path(tempfile.mkdtemp(prefix="osteoplan-zip-"))
    try:
        n = extract_zip(path, tmp, max_bytes=4 * max_voxels + (64 << 20))
        log.info("extracted %d files from the zip input", n)
        volume = load_dicom_files(list_files(tmp), series_uid=series_uid, max_voxels=max_voxels)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    volume.input_path = str(path)
    volume.input_kind = "zip"
    weakref.finalize(volume, shutil.rmtree, str(tmp), True)
    return volume


def _file_kind(path: Path) -> str:
    """'dicom', 'nifti' or 'zip' from the first bytes (the name is only a hint for NIfTI)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        raise InputError("the input file cannot be read") from None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") and is_zip(path):
        return "zip"
    name = path.name.lower()
    if head[:2] == b"\x1f\x8b" or name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if len(head) >= 348 and (head[344:348] in (b"n+1\x00", b"ni1\x00", b"n+2\x00")):
        return "nifti"
    if name.endswith(".zip"):
        return "zip"
    return "dicom"


def _common_root(files: list[Path]) -> str:
    if not files:
        return ""
    # os.path.dirname of the (normalised) Path's text is str(f.parent), without a new Path per file
    parents = {os.path.dirname(str(f)) or "." for f in files}
    if len(parents) == 1:
        return parents.pop()
    try:  # files in different folders share what their folders share
        return os.path.commonpath(sorted(parents))
    except ValueError:
        return ""
