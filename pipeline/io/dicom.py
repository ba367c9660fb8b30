"""Build a Volume from the chosen DICOM stack: sort, decode, resolve duplicates, correct tilt, fill gaps.

Rules (README "Input" copies them; geometry details in ``pipeline.io.geometry``):

- Slices are sorted along the slice normal (``row x col``); k runs along +normal.
- Memory guard: a volume of more than ``max_voxels`` voxels (after any resampling) is refused
  before any pixel data is read, with the size and the limit in the message.
- A slice whose pixel data cannot be decoded is dropped with a warning and counts as missing.
- Duplicate positions (within 0.02 mm): identical pixel data -> the extra copies are dropped with
  a warning. Different pixel data -> the series holds overlapping acquisitions: when
  AcquisitionNumber tells them apart, the acquisition with the most slices (tie: the higher
  number, i.e. the later one) is kept and the others are dropped with a warning; when it does
  not, the series is refused (InputError) -- we never guess which image is right.
- Fewer than 3 slice positions left -> InputError.
- Gaps: up to 2 missing slices per gap are filled by linear interpolation; uneven spacing is
  resampled to a uniform step; a larger gap is refused (InputError). Slices shifted in-plane
  (gantry tilt) are shifted back onto an orthogonal grid. Each correction adds a line to
  ``Volume.warnings`` and ``selection["chosen"]["resampled"]`` says why the grid differs from
  the source slices (then ``Volume.dicom.files`` still lists the source images in position
  order, but not one per k: DICOM SEG cannot reference them slice by slice).
- HU values produced by interpolation are rounded to whole HU when the array is int16.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.io.discover import Scan, SliceHeader
from pipeline.io.geometry import (
    group_positions,
    inplane_offsets,
    needs_inplane_shift,
    plan_spacing,
    positions_along,
    tilt_degrees,
)
from pipeline.io.pixels import decode_stack
from pipeline.io.select import MIN_SLICES, Selection
from pipeline.logs import anon
from pipeline.types import DicomSource, Geometry, Volume

log = logging.getLogger("osteoplan.io")

AIR_HU = -1024


def build_volume(selection: Selection, scan: Scan, max_voxels: int, input_path: str = "",
                 input_kind: str = "dicom") -> Volume:
    """Load the chosen stack of ``selection`` into a Volume (HU, LPS geometry, provenance)."""
    stack = selection.chosen
    axes = stack.axes
    assert axes is not None  # guaranteed by choose_series
    normal = axes[:, 2]
    warnings: list[str] = []
    if scan.skipped:
        n = sum(scan.skipped.values())
        warnings.append(f"{n} file(s) skipped while reading the input: {scan.skipped_summary()}")
    t_all = positions_along(np.array([s.ipp for s in stack.slices]), normal)
    order = np.argsort(t_all, kind="stable")
    slices = [stack.slices[i] for i in order]
    t = t_all[order]
    first = slices[0]
    plan = stack.plan
    if plan is not None and not plan.fillable:
        raise InputError(f"the CT series cannot be used: {plan.detail}; at most 2 missing slices per gap are filled")
    n_est = max(len(slices), plan.n_out if plan is not None else 0)
    check_size((first.cols, first.rows, n_est), max_voxels)

    decoded = decode_stack(slices)
    buf = decoded.buf
    keep = np.ones(len(slices), dtype=bool)
    if decoded.failed:
        keep[decoded.failed] = False
        if not keep.any():
            raise InputError(f"the pixel data of the CT series could not be decoded "
                             f"({decoded.errors[0].split(':')[0]}; details in the log)")
        warnings.append(f"{len(decoded.failed)} slice(s) whose pixel data could not be decoded were dropped")
    keep, dup_warnings = _resolve_duplicates(slices, t, buf, keep)
    warnings.extend(dup_warnings)
    idx = np.flatnonzero(keep)
    if idx.size < MIN_SLICES:
        raise InputError(f"the CT series has only {idx.size} usable slice position(s); "
                         f"at least {MIN_SLICES} are needed to form a volume")
    if idx.size != len(slices):
        buf = buf[idx]
        slices = [slices[i] for i in idx]
        t = t[idx]
    plan = plan_spacing(t)
    if not plan.fillable:
        raise InputError(f"the CT series cannot be used: {plan.detail}; at most 2 missing slices per gap are filled")
    check_size((first.cols, first.rows, plan.n_out), max_voxels)

    resampled: list[str] = []
    ipp = np.array([s.ipp for s in slices])
    spacing_i, spacing_j = first.pixel_spacing[1], first.pixel_spacing[0]
    offsets = inplane_offsets(ipp, axes)
    origin = ipp[0].copy()
    if needs_inplane_shift(offsets, (spacing_i, spacing_j)):
        ref = np.median(offsets, axis=0)
        _shift_slices(buf, offsets - ref, (spacing_i, spacing_j))
        origin = ipp[0] + axes[:, 0] * ref[0] + axes[:, 1] * ref[1]
        angle = tilt_degrees(t, offsets)
        shift_mm = float(np.abs(offsets - ref).max())
        msg = (f"gantry tilt of {angle:.1f} degrees corrected: slices shifted onto an orthogonal grid "
               f"(up to {shift_mm:.1f} mm, linear interpolation; voxels from outside the field of view set to "
               f"{AIR_HU} HU)")
        warnings.append(msg)
        resampled.append("gantry tilt corrected")
    if plan.resample:
        buf = _resample_along_normal(buf, t - t[0], plan.n_out, plan.spacing_mm)
        warnings.append(plan.detail)
        resampled.append(plan.kind == "missing" and "missing slices filled" or "uneven spacing resampled")
    spacing_k = plan.spacing_mm if plan.n_out > 1 else (first.slice_thickness or 1.0)
    if not any(s.has_rescale for s in slices):
        warnings.append("the CT images carry no RescaleSlope/RescaleIntercept: stored values used as HU")

    geometry = Geometry(shape=(first.cols, first.rows, buf.shape[0]), spacing=(spacing_i, spacing_j, spacing_k),
                        origin=tuple(origin), direction=axes)
    array = buf.transpose(2, 1, 0)  # (k, row, col) C-order -> (i, j, k), slices stay contiguous
    multiframe = first.frame is not None
    files = [first.path] if multiframe else [s.path for s in slices]
    sops = [first.sop_uid] if multiframe else [s.sop_uid for s in slices]
    source = DicomSource(
        study_instance_uid=first.study_uid, series_instance_uid=first.series_uid,
        frame_of_reference_uid=first.for_uid, sop_instance_uids=sops, files=files, modality="CT",
        series_description=first.series_description, series_number=first.series_number,
    )
    chosen: dict[str, Any] = {
        "series_instance_uid": first.series_uid,
        "series_number": first.series_number,
        "series_description": first.series_description,
        "n_slices": int(geometry.shape[2]),
        "slice_spacing_mm": round(float(spacing_k), 4),
        "reason": selection.reason,
        "orientation": stack.label,
        "n_files": stack.n_files,
        "resampled": "; ".join(resampled) or None,
    }
    for w in warnings:
        log.warning("series %s: %s", anon(first.series_uid), w)
    return Volume(array=array, geometry=geometry, dicom=source, input_path=input_path, input_kind=input_kind,
                  selection={"chosen": chosen, "passed_over": selection.passed_over}, warnings=warnings)


def check_size(shape: tuple[int, int, int], max_voxels: int) -> None:
    """InputError when a (i, j, k) grid holds more voxels than allowed."""
    n = int(shape[0]) * int(shape[1]) * int(shape[2])
    if n > max_voxels:
        raise InputError(f"the CT volume is too large: {shape[0]} x {shape[1]} x {shape[2]} = {n:,} voxels "
                         f"exceeds the limit of {max_voxels:,} (memory.max_input_voxels)")


def _resolve_duplicates(slices: list[SliceHeader], t: np.ndarray, buf: np.ndarray,
                        keep: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Drop identical copies at one position; keep one acquisition when copies differ."""
    warnings: list[str] = []
    idx = np.flatnonzero(keep)
    groups = [[int(idx[g]) for g in grp] for grp in group_positions(t[idx])]
    dupes = [g for g in groups if len(g) > 1]
    if not dupes:
        return keep, warnings
    conflicting = [g for g in dupes if any(not np.array_equal(buf[g[0]], buf[m]) for m in g[1:])]
    if conflicting:
        acq = [slices[i].acquisition_number for i in idx]
        distinct = {a for a in acq if a is not None}
        conflict_acqs = {slices[m].acquisition_number for g in conflicting for m in g}
        if len(distinct) < 2 or None in conflict_acqs or len(conflict_acqs) < 2:
            raise InputError(f"the CT series holds different images at {len(conflicting)} slice position(s) "
                             "(overlapping acquisitions that cannot be told apart); cannot build one volume")
        counts = Counter(a for a in acq if a is not None)
        best = max(counts, key=lambda a: (counts[a], a))
        keep = keep.copy()
        for i in idx:
            if slices[i].acquisition_number != best:
                keep[i] = False
        dropped = int(len(idx) - keep.sum())
        warnings.append(f"the CT series holds overlapping acquisitions: kept acquisition {best} "
                        f"({counts[best]} slices), dropped {dropped} slice(s) of the others")
        if _has_conflicts(slices, t, buf, keep):
            raise InputError("the CT series holds different images at the same slice position within one "
                             "acquisition; cannot build one volume")
        kept, more = _resolve_duplicates(slices, t, buf, keep)  # only identical copies are left
        return kept, warnings + more
    keep = keep.copy()
    n_drop = 0
    for g in dupes:
        for m in g[1:]:
            keep[m] = False
            n_drop += 1
    warnings.append(f"{n_drop} duplicate slice(s) (same position, identical pixels) dropped")
    return keep, warnings


def _has_conflicts(slices: list[SliceHeader], t: np.ndarray, buf: np.ndarray, keep: np.ndarray) -> bool:
    idx = np.flatnonzero(keep)
    for grp in group_positions(t[idx]):
        g = [int(idx[i]) for i in grp]
        if any(not np.array_equal(buf[g[0]], buf[m]) for m in g[1:]):
            return True
    return False


def _shift_slices(buf: np.ndarray, offsets_mm: np.ndarray, spacing_ij: tuple[float, float]) -> None:
    """Shift each slice in place so that a slice offset by (di, dj) mm lands on the reference grid.

    ``buf[k]`` is (rows, cols) = (j, i). Source pixel (i, j) of slice k sits at
    grid (i + di/spacing_i, j + dj/spacing_j), so the slice is shifted by that amount.
    """
    for k in range(buf.shape[0]):
        di, dj = float(offsets_mm[k, 0]) / spacing_ij[0], float(offsets_mm[k, 1]) / spacing_ij[1]
        if abs(di) < 1e-3 and abs(dj) < 1e-3:
            continue
        moved = ndimage.shift(buf[k].astype(np.float32), (dj, di), order=1, mode="constant", cval=AIR_HU)
        buf[k] = np.rint(moved) if buf.dtype.kind == "i" else moved


def _resample_along_normal(buf: np.ndarray, t_rel: np.ndarray, n_out: int, spacing: float) -> np.ndarray:
    """Linear interpolation of (k, rows, cols) slices at uneven positions onto a uniform k grid."""
    out = np.empty((n_out,) + buf.shape[1:], dtype=buf.dtype)
    n = buf.shape[0]
    for k in range(n_out):
        pos = k * spacing
        i = int(np.clip(np.searchsorted(t_rel, pos, side="right") - 1, 0, n - 2))
        span = float(t_rel[i + 1] - t_rel[i])
        w = float(np.clip((pos - t_rel[i]) / span, 0.0, 1.0))
        if w < 1e-6:
            out[k] = buf[i]
        elif w > 1 - 1e-6:
            out[k] = buf[i + 1]
        else:
            mixed = buf[i].astype(np.float32) * (1 - w) + buf[i + 1].astype(np.float32) * w
            out[k] = np.rint(mixed) if buf.dtype.kind == "i" else mixed
    return out
