"""Pick the CT series to analyse, and say why every other series was passed over.

Rules (README "Input" copies them):

- Images are grouped by SeriesInstanceUID (see ``discover`` for images without one), then split into *stacks* of one image size
  (Rows x Columns), one PixelSpacing, one orientation (ImageOrientationPatient within 1e-3) and one kind
  (localizer or not): a series that mixes a scout with its axial images, or several
  orientations, gives several stacks.
- A stack is a candidate when its Modality is CT (or its SOP class is a CT image class), it is
  not a LOCALIZER/SCOUT/TOPOGRAM, its images are monochrome, its orientation vectors are valid,
  and it has at least 3 distinct slice positions.
- Candidates are ranked, best first, by: no unrecoverable gap (see ``geometry.plan_spacing``)
  > axial (slice normal closest to the patient's S axis, tilted axial included; sagittal,
  coronal and oblique acquisitions are accepted, the segmenter resamples) > ORIGINAL before
  DERIVED images > thinner slice step (from positions, rounded to 0.01 mm) > more slices.
- ``series_uid`` forces a series (the best stack within it); it must exist and be CT.
- No CT image at all (empty input, only non-DICOM files, only MR, only SR...) or only CT
  localizers -> ``NoCTSeriesError`` (exit 3); but when no image at all could be read and some
  files were DICOM that could not be used (truncated, unreadable header...) -> ``InputError``. CT images that cannot form a volume (1 or 2
  slices, broken orientation) -> ``InputError`` (exit 2).
- Every stack and non-image object not chosen is listed in ``passed_over`` with a reason, and
  logged with anonymised UIDs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InputError, NoCTSeriesError
from pipeline.io.discover import BROKEN_DICOM, CT_SOP_CLASSES, NO_POSITION, Scan, SliceHeader
from pipeline.io.geometry import (
    GeometryError,
    SpacingPlan,
    group_positions,
    is_axial,
    orientation_label,
    plan_spacing,
    positions_along,
    slice_axes,
)
from pipeline.logs import anon

log = logging.getLogger("osteoplan.io")

MIN_SLICES = 3
ORIENTATION_MATCH = 1e-3


@dataclass
class Stack:
    """Images of one series with one size, one orientation and one kind."""

    series_uid: str
    slices: list[SliceHeader]
    localizer: bool
    axes: np.ndarray | None = None  # columns: row, col, normal (LPS)
    problem: str | None = None  # why it cannot be a volume at all
    n_positions: int = 0
    plan: SpacingPlan | None = None
    label: str = ""
    modality: str = ""
    n_files: int = 0
    original: bool = True

    @property
    def axial(self) -> bool:
        return self.axes is not None and is_axial(self.axes[:, 2])

    @property
    def step(self) -> float:
        return self.plan.step_mm if self.plan is not None else float("inf")

    @property
    def is_ct(self) -> bool:
        first = self.slices[0]
        return first.modality == "CT" or (not first.modality and first.sop_class in CT_SOP_CLASSES)

    def rank_key(self) -> tuple[Any, ...]:
        fillable = self.plan is not None and self.plan.fillable
        return (fillable, self.axial, self.original, -round(self.step, 2), self.n_positions)

    def describe(self) -> str:
        step = f"{self.step:.2f} mm" if np.isfinite(self.step) else "? mm"
        return f"{self.label or 'unknown'} CT, {self.n_positions} slices, {step} step"


@dataclass
class Selection:
    chosen: Stack
    reason: str
    passed_over: list[dict[str, Any]] = field(default_factory=list)


def build_stacks(slices: list[SliceHeader]) -> list[Stack]:
    """Group images into stacks (series x size x orientation x localizer) and describe each."""
    by_series: dict[str, list[SliceHeader]] = {}
    for s in slices:
        by_series.setdefault(s.series_key, []).append(s)
    stacks: list[Stack] = []
    for items in by_series.values():
        uid = items[0].series_uid
        groups: list[tuple[tuple[Any, ...], tuple[float, ...], np.ndarray, list[SliceHeader]]] = []
        keys: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # the images of a stack share these values
        for s in items:
            raw = (s.rows, s.cols, s.image_type, s.pixel_spacing)
            key = keys.get(raw)
            if key is None:
                key = keys[raw] = (s.rows, s.cols, s.is_localizer, round(s.pixel_spacing[0], 4),
                                   round(s.pixel_spacing[1], 4))
            iop_t = s.row_dir + s.col_dir
            iop = None
            for gkey, giop_t, giop, members in groups:
                if gkey != key:
                    continue
                if iop_t == giop_t:  # the same orientation exactly (finite: see discover): a match
                    members.append(s)
                    break
                if iop is None:
                    iop = np.array(iop_t)
                if np.max(np.abs(giop - iop)) <= ORIENTATION_MATCH:
                    members.append(s)
                    break
            else:
                groups.append((key, iop_t, np.array(iop_t), [s]))
        for key, _, _, members in groups:
            stacks.append(_describe(Stack(uid, members, localizer=bool(key[2]))))
    return stacks


def _describe(stack: Stack) -> Stack:
    first = stack.slices[0]
    stack.modality = first.modality or ("CT" if first.sop_class in CT_SOP_CLASSES else "?")
    stack.n_files = len({s.path for s in stack.slices})
    stack.original = not (first.image_type and first.image_type[0] == "DERIVED")
    if first.samples_per_pixel != 1 or not first.photometric.startswith("MONOCHROME"):
        shown = "".join(c for c in str(first.photometric) if c.isalnum())[:16]
        stack.problem = f"not a grey-scale image (PhotometricInterpretation {shown or 'missing'})"
        return stack
    try:
        stack.axes = slice_axes(np.array(first.row_dir), np.array(first.col_dir))
    except GeometryError as exc:
        stack.problem = str(exc)
        return stack
    stack.label = orientation_label(stack.axes[:, 2])
    t = np.sort(positions_along(np.array([s.ipp for s in stack.slices]), stack.axes[:, 2]))
    groups = group_positions(t)
    stack.n_positions = len(groups)
    if stack.n_positions >= 2:
        stack.plan = plan_spacing(np.array([t[g[0]] for g in groups]))
    return stack


def choose_series(scan: Scan, series_uid: str | None = None) -> Selection:
    """The best CT stack of a scan, or NoCTSeriesError / InputError with one clear line."""
    stacks = build_stacks(scan.slices)
    passed: list[dict[str, Any]] = []
    ct = [s for s in stacks if s.is_ct]
    if series_uid is not None:
        wanted = [s for s in stacks if s.series_uid == series_uid]
        if not wanted:
            others = [o for o in scan.others if o.series_uid == series_uid]
            if others:
                raise InputError(f"the requested series is not an image series ({others[0].what})")
            raise InputError(f"the requested series was not found in the input ({_inventory(scan, stacks)})")
        if not any(s.is_ct for s in wanted):
            raise InputError(f"the requested series is {wanted[0].modality}, not CT")
        pool = [s for s in wanted if s.is_ct]
    else:
        pool = ct
    if not ct and scan.skipped.get(NO_POSITION):
        raise InputError("the CT images carry no ImagePositionPatient/ImageOrientationPatient "
                         "(old ACR-NEMA format?); cannot build a volume")
    broken = sum(scan.skipped.get(r, 0) for r in BROKEN_DICOM)
    if not stacks and broken:
        raise InputError(f"the input's DICOM files cannot be read ({_inventory(scan, stacks)})")
    if not ct:
        raise NoCTSeriesError(f"no CT series in the input ({_inventory(scan, stacks)})")
    volumes = [s for s in pool if not s.localizer and s.problem is None and s.n_positions >= MIN_SLICES]
    if not volumes:
        _refuse(pool, forced=series_uid is not None)
    volumes.sort(key=lambda s: s.rank_key(), reverse=True)
    chosen = volumes[0]
    if series_uid is not None:
        reason = "requested series"
    elif len(volumes) == 1:
        reason = "the only CT series that can form a volume"
    else:
        reason = (f"best of {len(volumes)} candidate CT stacks: "
                  f"{'complete' if chosen.plan and chosen.plan.fillable else 'incomplete'}, {chosen.describe()}")
    for s in stacks:
        if s is chosen:
            continue
        why = _why_not(s, chosen, series_uid)
        passed.append({"series_instance_uid": s.series_uid, "modality": s.modality, "n_files": s.n_files,
                       "reason": why})
    for series, members in _others_by_series(scan).items():
        modality, what = members
        passed.append({"series_instance_uid": series, "modality": modality, "n_files": what[1], "reason": what[0]})
    for p in passed:
        log.info("passed over series %s (%s, %d files): %s", anon(p["series_instance_uid"]), p["modality"],
                 p["n_files"], p["reason"])
    log.info("chose series %s: %s", anon(chosen.series_uid), reason)
    return Selection(chosen, reason, passed)


def _refuse(pool: list[Stack], forced: bool) -> None:
    """No stack in ``pool`` can form a volume: raise the most useful error."""
    non_loc = [s for s in pool if not s.localizer]
    if not non_loc and forced:
        raise InputError("the requested series holds only localizer/scout images")
    if not non_loc:
        raise NoCTSeriesError("no CT series to analyse: the input holds only localizer/scout images")
    broken = [s for s in non_loc if s.problem is not None]
    if broken and len(broken) == len(non_loc):
        raise InputError(f"the CT series cannot form a volume: {broken[0].problem}")
    best = max((s for s in non_loc if s.problem is None), key=lambda s: s.n_positions)
    n = best.n_positions
    raise InputError(f"the CT series has only {n} slice position{'s' if n != 1 else ''}; "
                     f"at least {MIN_SLICES} are needed to form a volume")


def _why_not(s: Stack, chosen: Stack, series_uid: str | None) -> str:
    if not s.is_ct:
        return f"modality {s.modality}, not CT"
    if s.localizer:
        return "localizer/scout image"
    if s.problem is not None:
        return s.problem
    if s.n_positions < MIN_SLICES:
        return f"only {s.n_positions} slice position(s)"
    if series_uid is not None and s.series_uid != series_uid:
        return "not the requested series"
    a, b = s.rank_key(), chosen.rank_key()
    if a[0] != b[0]:
        return f"unrecoverable gap: {s.plan.detail if s.plan else 'unknown spacing'}"
    if a[1] != b[1]:
        return f"{s.label} acquisition; an axial series is preferred"
    if a[2] != b[2]:
        return "derived images; an original series is preferred"
    if a[3] != b[3]:
        return f"thicker slices ({s.step:.2f} mm vs {chosen.step:.2f} mm)"
    if a[4] != b[4]:
        return f"fewer slices ({s.n_positions} vs {chosen.n_positions})"
    return "equivalent to the chosen series; the first one found was kept"


def _others_by_series(scan: Scan) -> dict[str, tuple[str, tuple[str, int]]]:
    out: dict[str, tuple[str, tuple[str, int]]] = {}
    for o in scan.others:
        if o.series_uid in out:
            modality, (what, n) = out[o.series_uid]
            out[o.series_uid] = (modality, (what, n + 1))
        else:
            out[o.series_uid] = (o.modality, (o.what, 1))
    return out


def _inventory(scan: Scan, stacks: list[Stack]) -> str:
    """'12 files: 10 MR images, 2 non-DICOM files' -- counts only, no names."""
    parts: list[str] = []
    modalities = Counter()
    for s in stacks:
        modalities[s.modality or "?"] += len(s.slices)
    for modality, n in sorted(modalities.items()):
        parts.append(f"{n} {modality} image{'s' if n != 1 else ''}")
    if scan.others:
        parts.append(f"{len(scan.others)} non-image DICOM object{'s' if len(scan.others) != 1 else ''}")
    for reason, n in sorted(scan.skipped.items()):
        parts.append(f"{n} {reason}")
    head = f"{scan.n_files} file{'s' if scan.n_files != 1 else ''}"
    return f"{head}: {', '.join(parts)}" if parts else head
