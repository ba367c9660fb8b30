"""Lesion size: the largest Feret (caliper) diameter in patient space.

The largest distance between two voxel centres of a lesion is found on the convex hull of its
surface voxel centres (interior voxels are inside that hull). Voxel centres underestimate the
extent by about one voxel, so one voxel's extent along the diameter direction u is added: the
width along u of the ellipsoid inscribed in a voxel, ``sqrt(sum_a (spacing_a * u_a)**2)``. That is
the voxel step along an array axis and one voxel size in any direction on an isotropic grid, so a
voxelised sphere of radius r measures about 2r (the box width ``sum_a spacing_a |u_a|`` would add
up to sqrt(3) voxels along diagonals and overestimate). A single voxel measures its largest
step. Millimetres along array axes equal patient-space millimetres (orthonormal direction matrix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.spatial import ConvexHull, QhullError

_BRUTE_FORCE_MAX = 1500  # below this many points, skip the hull
_PAIRS_PER_BLOCK = 2_000_000


@dataclass(frozen=True)
class Feret:
    diameter_mm: float  # centre span + one voxel's width along the span direction
    centre_span_mm: float  # largest distance between two voxel centres
    end_a_ijk: np.ndarray  # the two voxel centres that realise the span (indices)
    end_b_ijk: np.ndarray


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    if len(points) <= _BRUTE_FORCE_MAX:
        return np.arange(len(points))
    try:
        return ConvexHull(points).vertices
    except QhullError:  # flat (one slice) or collinear: joggled hull, vertices are input points
        try:
            return ConvexHull(points, qhull_options="QJ").vertices
        except QhullError:
            return np.arange(len(points))


def _farthest_pair(points: np.ndarray) -> tuple[int, int, float]:
    """Indices and distance of the two farthest points (blocks of about 2 M distances)."""
    n = len(points)
    sq = np.einsum("ij,ij->i", points, points)
    chunk = max(1, _PAIRS_PER_BLOCK // n)
    best = (0, 0, -1.0)
    for start in range(0, n, chunk):
        block = points[start:start + chunk]
        d2 = sq[start:start + chunk, None] + sq[None, :] - 2.0 * (block @ points.T)
        k = int(np.argmax(d2))
        i, j = divmod(k, n)
        if d2[i, j] > best[2]:
            best = (start + i, j, float(d2[i, j]))
    i, j = best[0], best[1]
    return i, j, float(np.linalg.norm(points[i] - points[j]))


def max_feret_diameter(indices: np.ndarray, spacing: Sequence[float]) -> Feret:
    """Largest Feret diameter (mm) of the voxels ``indices`` (n, 3) (surface voxels suffice)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    if len(idx) == 0:
        raise ValueError("empty voxel set")
    sp = np.asarray(spacing, dtype=np.float64)
    pts = idx * sp
    verts = _hull_vertices(pts)
    i, j, span = _farthest_pair(pts[verts])
    a, b = idx[verts[i]], idx[verts[j]]
    if span == 0.0:
        return Feret(float(sp.max()), 0.0, a, b)
    u = (pts[verts[j]] - pts[verts[i]]) / span
    return Feret(span + float(np.linalg.norm(u * sp)), span, a, b)
