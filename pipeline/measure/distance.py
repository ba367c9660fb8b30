"""Exact lesion <-> canal distances on the voxel grid (pure functions, no whole-volume arrays).

Model. Each voxel is a box of size ``spacing`` centred on its index. The distance between two
voxel sets A and B is the smallest gap between a box of A and a box of B. For voxels p and q with
index difference Δ = q - p the gap along array axis a is ``max(0, |Δ_a| - 1) * spacing_a`` and the
gap is the Euclidean norm of those three numbers (the direction matrix is orthonormal, so array-axis
millimetres are patient-space millimetres). Touching (26-adjacent) or overlapping voxels -> 0.

Method. For disjoint sets the minimum is reached by a pair of *surface* voxels (voxels with a
6-neighbour outside their set): from any pair, stepping an interior voxel one index towards the
other voxel stays inside its set and never increases the gap, until a surface voxel is reached.
So only surface voxels enter a KD-tree (``scipy.spatial.cKDTree``) on centre coordinates
``index * spacing``. The gap of a pair is never less than its centre distance minus the voxel
diagonal (per axis ``gap_a >= |Δ_a| s_a - s_a``, then the triangle inequality), and never more
than its centre distance. So: take each A point's nearest B centre, the smallest gap g0 among
those pairs is an upper bound of the answer, and every pair that could beat or tie it has a
centre distance <= g0 + diagonal; all those pairs are examined. The result is exact.

Closest points are the nearest points of the two boxes: per axis the same coordinate where the
gap is 0 (the middle of the overlap of the two box extents), else the two facing box faces; they
are ``distance_mm`` apart. Among tied pairs the choice is deterministic and independent of how
the array is stored (flips, transposes): smallest gap, then smallest centre distance, then the
lexicographically smallest closest points in LPS.

``min_centre_distance`` is the centre-to-centre variant: the smallest distance between a voxel
centre of A and one of B, which is what ``scipy.ndimage.distance_transform_edt(~B, sampling=
spacing)`` gives at A's voxels (the benchmark compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.types import Geometry

_FACES = ndimage.generate_binary_structure(3, 1)  # 6-connectivity
_TIE_MM = 1e-9
_CHUNK = 4096


def surface_indices(mask: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """(n, 3) int64 indices (+ ``offset``) of the voxels of ``mask`` with a 6-neighbour outside it.

    Voxels on the array border count as surface (outside the array is outside the mask).
    """
    mask = np.asarray(mask, dtype=bool)
    interior = ndimage.binary_erosion(mask, structure=_FACES, border_value=0)
    return np.argwhere(mask & ~interior).astype(np.int64) + np.asarray(offset, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class VoxelSurface:
    """Surface voxels of one voxel set, with a KD-tree on their centres (mm, array axes)."""

    indices: np.ndarray  # (n, 3) int64, voxel indices on the volume grid
    spacing: np.ndarray  # (3,) mm per array axis
    tree: cKDTree

    @classmethod
    def from_indices(cls, indices: np.ndarray, spacing: Sequence[float]) -> "VoxelSurface":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
        if len(idx) == 0:
            raise ValueError("empty voxel set")
        sp = np.asarray(spacing, dtype=np.float64)
        return cls(idx, sp, cKDTree(idx * sp))

    @classmethod
    def from_mask(cls, mask: np.ndarray, spacing: Sequence[float],
                  offset: Sequence[int] = (0, 0, 0)) -> "VoxelSurface":
        """``mask`` may be a crop; ``offset`` is the crop's first index on the volume grid."""
        return cls.from_indices(surface_indices(mask, offset), spacing)

    @property
    def points(self) -> np.ndarray:
        return self.tree.data

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class ClosestPair:
    """The result of a distance query. Points are fractional voxel indices on the volume grid."""

    distance_mm: float
    point_a_ijk: np.ndarray  # closest point on A's voxel box (fractional index)
    point_b_ijk: np.ndarray  # closest point on B's voxel box
    voxel_a: tuple[int, int, int]
    voxel_b: tuple[int, int, int]

    def points_lps(self, geometry: Geometry) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        pa, pb = geometry.index_to_lps(np.stack([self.point_a_ijk, self.point_b_ijk]))
        return tuple(float(x) for x in pa), tuple(float(x) for x in pb)  # type: ignore[return-value]


def box_gap_mm(delta: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Gap (mm) between voxel boxes whose index difference is ``delta`` (..., 3)."""
    g = np.maximum(np.abs(np.asarray(delta, dtype=np.float64)) - 1.0, 0.0) * np.asarray(spacing, dtype=np.float64)
    return np.sqrt(np.einsum("...i,...i->...", g, g))


def box_closest_points(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest points of the boxes of voxels ``p`` and ``q`` (fractional indices, (..., 3))."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    delta = q - p
    apart = np.abs(delta) > 1.0
    step = 0.5 * np.sign(delta)
    mid = 0.5 * (p + q)
    return np.where(apart, p + step, mid), np.where(apart, q - step, mid)


def _pick(a_idx: np.ndarray, b_idx: np.ndarray, spacing: np.ndarray, geometry: Geometry | None,
          centre: bool) -> int:
    """Index of the best pair: smallest distance, then centre distance, then LPS of the points."""
    delta = b_idx - a_idx
    cdist = np.sqrt(np.einsum("ij,ij->i", delta * spacing, delta * spacing))
    dist = cdist if centre else box_gap_mm(delta, spacing)
    tied = np.flatnonzero(dist <= dist.min() + _TIE_MM)
    if len(tied) == 1:
        return int(tied[0])
    if centre:
        pa, pb = a_idx[tied].astype(np.float64), b_idx[tied].astype(np.float64)
    else:
        pa, pb = box_closest_points(a_idx[tied], b_idx[tied])
        ct = cdist[tied]
        keep = ct <= ct.min() + _TIE_MM
        tied, pa, pb = tied[keep], pa[keep], pb[keep]
    if geometry is not None:
        pa, pb = geometry.index_to_lps(pa), geometry.index_to_lps(pb)
    key = np.round(np.concatenate([pa, pb], axis=1), 6)
    order = np.lexsort(key.T[::-1])
    return int(tied[order[0]])


def min_box_distance(a: VoxelSurface, b: VoxelSurface, geometry: Geometry | None = None) -> ClosestPair:
    """Exact smallest box gap between two *disjoint* voxel sets given by their surfaces.

    ``geometry`` (optional) only makes the choice among tied pairs storage-independent (LPS order).
    For sets that may overlap use :func:`mask_distance`, which checks the overlap first.
    """
    sp = a.spacing
    if not np.allclose(sp, b.spacing):
        raise ValueError("both voxel sets must be on the same grid")
    diag = float(np.linalg.norm(sp))
    nn_dist, nn = b.tree.query(a.points, k=1)
    g0 = float(box_gap_mm(b.indices[nn] - a.indices, sp).min())
    radius = g0 + diag + 1e-9
    cand = np.flatnonzero(nn_dist <= radius)
    best_a: list[np.ndarray] = []
    best_b: list[np.ndarray] = []
    best = np.inf
    for start in range(0, len(cand), _CHUNK):
        rows = cand[start:start + _CHUNK]
        lists = b.tree.query_ball_point(a.points[rows], r=radius)
        lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        if lens.sum() == 0:
            continue
        ai = np.repeat(rows, lens)
        bi = np.fromiter((j for x in lists for j in x), dtype=np.int64, count=int(lens.sum()))
        gaps = box_gap_mm(b.indices[bi] - a.indices[ai], sp)
        m = float(gaps.min())
        if m > best + _TIE_MM:
            continue
        keep = gaps <= m + _TIE_MM
        if m < best - _TIE_MM:
            best_a, best_b = [], []
        best = min(best, m)
        best_a.append(a.indices[ai[keep]])
        best_b.append(b.indices[bi[keep]])
    a_idx, b_idx = np.concatenate(best_a), np.concatenate(best_b)
    k = _pick(a_idx, b_idx, sp, geometry, centre=False)
    p, q = a_idx[k], b_idx[k]
    pa, pb = box_closest_points(p, q)
    return ClosestPair(float(box_gap_mm(q - p, sp)), pa, pb, _tuple(p), _tuple(q))


def min_centre_distance(a: VoxelSurface, b: VoxelSurface, geometry: Geometry | None = None) -> ClosestPair:
    """Smallest voxel-centre to voxel-centre distance between two disjoint voxel sets (mm).

    Equals the minimum over A's voxels of ``distance_transform_edt(~B, sampling=spacing)``.
    The points returned are the two voxel centres.
    """
    nn_dist, nn = b.tree.query(a.points, k=1)
    m = float(nn_dist.min())
    rows = np.flatnonzero(nn_dist <= m + _TIE_MM)
    k = _pick(a.indices[rows], b.indices[nn[rows]], a.spacing, geometry, centre=True)
    p, q = a.indices[rows[k]], b.indices[nn[rows[k]]]
    d = float(np.linalg.norm((q - p) * a.spacing))
    return ClosestPair(d, p.astype(np.float64), q.astype(np.float64), _tuple(p), _tuple(q))


def mask_distance(mask_a: np.ndarray, mask_b: np.ndarray, geometry: Geometry, centre: bool = False) -> ClosestPair:
    """Distance between two full-grid masks (convenience for tests and tools; may overlap).

    Overlapping masks give 0 with both points at the centre of the first shared voxel.
    """
    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    if not a.any() or not b.any():
        raise ValueError("both masks must hold at least one voxel")
    shared = np.argwhere(a & b)
    if len(shared):
        p = shared[0].astype(np.float64)
        return ClosestPair(0.0, p, p.copy(), _tuple(shared[0]), _tuple(shared[0]))
    sa = VoxelSurface.from_mask(a, geometry.spacing)
    sb = VoxelSurface.from_mask(b, geometry.spacing)
    return (min_centre_distance if centre else min_box_distance)(sa, sb, geometry)


def distance_uncertainty_mm(input_spacing: Sequence[float], model_spacing: Sequence[float] | None) -> float:
    """About one voxel diagonal of the coarser resolution (per axis) of the input and model grids.

    The label boundaries come from the model grid (then resampled to the input grid), so along
    each array axis the coarser of the two steps limits where a boundary can be.
    """
    sp = np.asarray(input_spacing, dtype=np.float64)
    if model_spacing is not None and len(model_spacing) == 3 and all(float(x) > 0 for x in model_spacing):
        sp = np.maximum(sp, np.asarray(model_spacing, dtype=np.float64))
    return float(np.linalg.norm(sp))


def _tuple(x: np.ndarray) -> tuple[int, int, int]:
    return int(x[0]), int(x[1]), int(x[2])
