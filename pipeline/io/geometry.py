"""Slice geometry of one DICOM stack: pure functions over header values (mm, DICOM LPS).

Rules (README "Input" copies them):

- The slice normal is ``row x col`` (cross product of the two ImageOrientationPatient vectors).
  Slices are sorted by ``t = ImagePositionPatient . normal`` -- never by file name,
  InstanceNumber or SliceLocation. The array's k axis runs along ``+normal``, so the direction
  matrix (row, col, normal) is right-handed whatever the patient position.
- Orientation vectors are normalised; if they are not orthogonal to within 0.01 (cosine), the
  stack is refused. The label (axial / coronal / sagittal) is the patient axis closest to the
  normal; "oblique" is added when that axis is more than ~26 degrees off.
- Two slices whose positions differ by less than ``POSITION_TOL_MM`` along the normal sit at the
  same position (duplicates; see ``pipeline.io.dicom`` for what happens to them).
- The slice spacing comes from the positions, not from SliceThickness. With ``step`` the median
  of the steps between neighbours: all steps within ``max(0.01 mm, 2 %)`` of ``step`` -> uniform,
  spacing = extent / (n - 1). Otherwise each step is read as ``round(step_i / step)`` regular
  steps: a gap worth more than ``MAX_FILLED_SLICES`` (2) missing slices (i.e. a step >= ~3.5x the
  usual one) is unrecoverable and the stack is refused; smaller gaps and uneven steps are
  resampled onto a uniform grid of ``extent / round(extent / step)`` mm by linear interpolation
  between the two neighbouring slices, with a warning ("missing slices filled" when every odd
  step is close to a whole multiple of the usual one, "uneven spacing resampled" otherwise).
- In-plane offsets: each slice's position is also projected onto the row and column vectors. A
  stack whose slices are shifted in-plane relative to each other by more than
  ``INPLANE_TOL_FRACTION`` of a pixel (gantry tilt shears the stack along the column direction)
  is corrected by shifting every slice onto the grid of the median slice (linear interpolation;
  voxels that come from outside the field of view are set to -1024 HU, air), giving an orthogonal
  grid; the tilt angle goes into the warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POSITION_TOL_MM = 0.02
ORTHOGONALITY_TOL = 0.01
STEP_ABS_TOL_MM = 0.01
STEP_REL_TOL = 0.02
MAX_FILLED_SLICES = 2
MULTIPLE_TOL = 0.15
INPLANE_TOL_FRACTION = 0.05
OBLIQUE_COS = 0.9


class GeometryError(ValueError):
    """Header geometry that cannot describe a volume (degenerate or non-orthogonal vectors...)."""


def slice_axes(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """3x3 matrix whose columns are the unit row, column and normal vectors (LPS)."""
    r = np.asarray(row, dtype=np.float64).reshape(3)
    c = np.asarray(col, dtype=np.float64).reshape(3)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        raise GeometryError("ImageOrientationPatient holds non-finite values")
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr < 1e-6 or nc < 1e-6:
        raise GeometryError("ImageOrientationPatient holds a zero vector")
    r, c = r / nr, c / nc
    dot = float(r @ c)
    if abs(dot) > ORTHOGONALITY_TOL:
        raise GeometryError(f"ImageOrientationPatient vectors are not orthogonal (cosine {dot:.3f})")
    c = c - dot * r  # remove the rounding residue so the matrix is exactly orthonormal
    c /= np.linalg.norm(c)
    n = np.cross(r, c)
    return np.stack([r, c, n], axis=1)


def orientation_label(normal: np.ndarray) -> str:
    """'axial', 'coronal' or 'sagittal' (closest patient axis), with ' oblique' when far from it."""
    n = np.abs(np.asarray(normal, dtype=np.float64))
    axis = int(np.argmax(n))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if n[axis] >= OBLIQUE_COS else f"{name} oblique"


def is_axial(normal: np.ndarray) -> bool:
    """True when the slice normal is closest to the patient's S axis (tilted axial included)."""
    return int(np.argmax(np.abs(np.asarray(normal, dtype=np.float64)))) == 2


def positions_along(points: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """(n, 3) LPS points -> (n,) signed distances along the unit vector ``axis``."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 3) @ np.asarray(axis, dtype=np.float64)


def group_positions(t_sorted: np.ndarray, tol: float = POSITION_TOL_MM) -> list[list[int]]:
    """Indices of a sorted position list grouped by equal position (consecutive within ``tol``)."""
    groups: list[list[int]] = []
    ts = np.asarray(t_sorted, dtype=np.float64).tolist()  # Python floats: the same doubles, ~5x faster to loop over
    for idx, t in enumerate(ts):
        if groups and t - ts[groups[-1][0]] < tol:
            groups[-1].append(idx)
        else:
            groups.append([idx])
    return groups


@dataclass(frozen=True)
class SpacingPlan:
    """How the sorted, duplicate-free slice positions map onto a uniform k axis."""

    kind: str  # uniform | missing | uneven | gap
    step_mm: float  # median step between neighbours
    spacing_mm: float  # output spacing (uniform grid from the first to the last position)
    n_in: int
    n_out: int
    missing: int  # estimated missing slices, summed over all gaps
    largest_gap_mm: float
    detail: str  # one line for warnings / refusals

    @property
    def fillable(self) -> bool:
        return self.kind != "gap"

    @property
    def resample(self) -> bool:
        return self.kind in ("missing", "uneven")


def plan_spacing(t: np.ndarray) -> SpacingPlan:
    """Classify strictly increasing positions (mm) and plan the uniform output grid."""
    t = np.asarray(t, dtype=np.float64)
    n = int(t.size)
    if n < 2:
        return SpacingPlan("uniform", 0.0, 0.0, n, n, 0, 0.0, "single position")
    d = np.diff(t)
    if np.any(d <= 0):
        raise GeometryError("slice positions must be strictly increasing")
    step = float(np.median(d))
    extent = float(t[-1] - t[0])
    tol = max(STEP_ABS_TOL_MM, STEP_REL_TOL * step)
    largest = float(d.max())
    if np.all(np.abs(d - step) <= tol):
        return SpacingPlan("uniform", step, extent / (n - 1), n, n, 0, largest, f"uniform {extent / (n - 1):.3f} mm")
    ratios = d / step
    whole = np.rint(ratios)
    missing_per_gap = np.maximum(whole - 1, 0).astype(int)
    missing = int(missing_per_gap.sum())
    worst = int(missing_per_gap.max())
    if worst > MAX_FILLED_SLICES:
        return SpacingPlan(
            "gap", step, step, n, n, missing, largest,
            f"a gap of {largest:.1f} mm between slices (about {worst} missing at the usual {step:.2f} mm step)",
        )
    n_out = max(int(round(extent / step)) + 1, 2)
    spacing = extent / (n_out - 1)
    odd = np.abs(d - step) > tol
    if np.all(np.abs(ratios[odd] - whole[odd]) <= MULTIPLE_TOL) and np.all(whole[odd] >= 2):
        detail = (f"{missing} missing slice(s) filled by linear interpolation "
                  f"(gaps up to {largest:.1f} mm at a {step:.2f} mm step)")
        kind = "missing"
    else:
        detail = (f"uneven slice spacing ({float(d.min()):.2f}-{largest:.2f} mm) resampled to a uniform "
                  f"{spacing:.3f} mm by linear interpolation")
        kind = "uneven"
    return SpacingPlan(kind, step, spacing, n, n_out, missing, largest, detail)


def inplane_offsets(points: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """(n, 3) slice positions -> (n, 2) offsets (mm) along the row and column vectors, from point 0."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return (p - p[0]) @ np.asarray(axes, dtype=np.float64)[:, :2]


def tilt_degrees(t: np.ndarray, offsets: np.ndarray) -> float:
    """Angle between the stack's progression and its slice normal (gantry tilt), in degrees."""
    t = np.asarray(t, dtype=np.float64)
    if t.size < 2 or np.ptp(t) == 0:
        return 0.0
    tc = t - t.mean()
    slope = (tc @ (offsets - offsets.mean(axis=0))) / float(tc @ tc)
    return math.degrees(math.atan(float(np.linalg.norm(slope))))


def needs_inplane_shift(offsets: np.ndarray, pixel_spacing: tuple[float, float]) -> bool:
    """True when some slice is shifted in-plane by more than a small fraction of a pixel."""
    o = np.asarray(offsets, dtype=np.float64)
    if o.size == 0:
        return False
    ref = np.median(o, axis=0)
    dev = np.abs(o - ref)
    return bool(np.any(dev[:, 0] > INPLANE_TOL_FRACTION * pixel_spacing[0])
                or np.any(dev[:, 1] > INPLANE_TOL_FRACTION * pixel_spacing[1]))
