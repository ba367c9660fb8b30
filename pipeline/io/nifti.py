"""NIfTI in and out. NIfTI's world space is RAS; ours is DICOM LPS.

Rules (README "Input" copies them):

- Reading: nibabel's ``img.affine`` is used (the sform when its code is set, else the qform, else
  the header's fall-back), converted to LPS with ``diag(-1, -1, 1) @ affine``. The voxel array is
  kept in its stored (i, j, k) order -- no reorientation -- so a PIR or LAS file keeps its axes and
  only the direction matrix says where they point. Column norms of the 3x3 part give the spacing;
  a sheared affine (columns not orthogonal to within 1e-3) is refused. A 4-D file with one volume
  is squeezed; several volumes are refused. Values are taken as HU after the header's
  scl_slope/scl_inter; non-finite values are set to -1024 HU with a warning. The array is int16
  when the values are whole numbers in the int16 range, else float32.
- Writing: ``affine = geometry.affine_ras`` for both qform and sform (code 1, scanner), units mm,
  gzip when the name ends in ``.gz``. Label maps are uint8. nibabel writes the file, but a .gz
  reaches zlib through a ``GZIP_CHUNK_BYTES`` buffer instead of one write per slice: the same bytes,
  and zlib runs without the GIL for whole chunks, so the file no longer waits for the GIL once per
  slice while the SEG is built beside it.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from pipeline.errors import InputError
from pipeline.types import Geometry, Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SHEAR_TOL = 1e-3
GZIP_CHUNK_BYTES = 16 << 20  # bytes handed to zlib at a time when a .nii.gz is written


def geometry_from_affine(affine_ras: np.ndarray, shape: tuple[int, ...]) -> Geometry:
    """Geometry (LPS) of a NIfTI/nibabel RAS affine and a 3-D shape; InputError for sheared affines."""
    a = np.asarray(affine_ras, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError("the NIfTI affine is not a finite 4x4 matrix")
    lps = LPS_FROM_RAS @ a
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 1e-9):
        raise InputError("the NIfTI affine has a zero voxel size")
    direction = m / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > SHEAR_TOL:
        raise InputError("the NIfTI affine is sheared (axes not orthogonal); resample it to an orthogonal grid first")
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt  # nearest orthonormal matrix, removes rounding residue
    return Geometry(shape=tuple(int(s) for s in shape[:3]), spacing=tuple(spacing), origin=tuple(lps[:3, 3]),
                    direction=direction)


def hu_array(data: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """HU values as int16 when whole and in range, else float32; non-finite values set to -1024."""
    warnings: list[str] = []
    if data.dtype.kind in "iub":
        if data.size == 0 or (int(data.min()) >= -32768 and int(data.max()) <= 32767):
            return data.astype(np.int16, copy=False), warnings
        return data.astype(np.float32, copy=False), warnings
    data = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        data = data.copy() if not data.flags.writeable else data
        data[bad] = -1024.0
        warnings.append(f"{int(bad.sum())} non-finite voxel values set to -1024 HU")
    if data.size and float(data.min()) >= -32768 and float(data.max()) <= 32767 and np.array_equal(data, np.rint(data)):
        return data.astype(np.int16), warnings
    return data, warnings


def read_nifti(path: Path, max_voxels: int | None = None) -> Volume:
    """A NIfTI CT (HU) as a Volume in LPS; InputError with one line when it cannot be used."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise InputError("the NIfTI input does not exist") from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise InputError(f"the NIfTI input cannot be read ({type(exc).__name__})") from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"the NIfTI input has shape {shape}; a single 3-D volume is needed")
    if min(shape) < 1:
        raise InputError("the NIfTI input is empty")
    if max_voxels is not None and int(np.prod(shape)) > max_voxels:
        raise InputError(f"the NIfTI volume is too large: {' x '.join(map(str, shape))} = {int(np.prod(shape)):,} "
                         f"voxels exceeds the limit of {max_voxels:,} (memory.max_input_voxels)")
    geometry = geometry_from_affine(img.affine, shape)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data block
        raise InputError(f"the NIfTI voxel data cannot be read ({type(exc).__name__})") from None
    data = np.asarray(data).reshape(shape, order="F") if data.ndim != 3 else np.asarray(data)
    array, warnings = hu_array(data)
    return Volume(
        array=array, geometry=geometry, dicom=None, input_path=str(path), input_kind="nifti",
        selection={"chosen": {"series_instance_uid": None, "series_number": None, "series_description": path.name,
                              "n_slices": int(shape[2]), "slice_spacing_mm": round(float(geometry.spacing[2]), 4),
                              "reason": "NIfTI input (one volume)", "resampled": None},
                   "passed_over": []},
        warnings=warnings,
    )


def _nifti_image(data: np.ndarray, geometry: Geometry) -> nib.Nifti1Image:
    affine = geometry.affine_ras
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def write_label_nifti(labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a uint8 label map on ``geometry`` (gzip for .nii.gz), qform = sform = geometry.affine_ras."""
    labels = np.asarray(labels)
    if tuple(labels.shape) != geometry.shape:
        raise ValueError(f"label shape {labels.shape} != geometry shape {geometry.shape}")
    if labels.dtype != np.uint8 and labels.size and (labels.min() < 0 or labels.max() > 255):  # uint8: always fits
        raise ValueError("label values must fit in uint8")
    _save(_nifti_image(labels.astype(np.uint8, copy=False), geometry), Path(path))


def _save(img: nib.Nifti1Image, path: Path) -> None:
    """``nib.save``, except that a .gz gets nibabel's bytes through a ``GZIP_CHUNK_BYTES`` buffer:
    nibabel writes a volume one slice at a time, and each of those writes would release and
    re-take the GIL in zlib (tests compare the decompressed file with ``nib.save``'s)."""
    if not path.name.endswith(".gz"):
        nib.save(img, str(path))
        return
    level = Opener.default_compresslevel  # nib.save's
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz, \
            io.BufferedWriter(gz, buffer_size=GZIP_CHUNK_BYTES) as chunked:
        img.to_file_map({"image": nib.FileHolder(fileobj=chunked)})


def write_volume_nifti(volume: Volume, path: Path) -> None:
    """Write a Volume's HU array (int16 or float32) with its geometry."""
    arr = volume.array
    if arr.dtype not in (np.int16, np.float32):
        arr = arr.astype(np.float32)
    _save(_nifti_image(arr, volume.geometry), Path(path))
