"""Shared builders for the measure/plan tests (imported explicitly, not a conftest)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.types import Geometry, Lesion, ModelInfo, Segmentation, Volume

MODEL = ModelInfo(name="test", version="0", sha256="", spacing_mm=(1.5, 1.5, 1.5))


def rotation(axis: str, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


# Orthonormal direction matrices (column a = LPS direction of array axis a).
DIRECTIONS: dict[str, np.ndarray] = {
    "identity": np.eye(3),
    "k_flipped": np.diag([1.0, 1.0, -1.0]),  # slices stored superior -> inferior
    "ffs": np.diag([-1.0, 1.0, -1.0]),  # feet-first supine
    "prone": np.diag([-1.0, -1.0, 1.0]),  # head-first prone
    "oblique": rotation("z", 20.0) @ rotation("x", 10.0),
}


def centred_geometry(shape: Sequence[int], spacing: Sequence[float], direction: np.ndarray,
                     centre_lps: Sequence[float] = (0.0, 0.0, 0.0)) -> Geometry:
    """A grid whose middle voxel position is ``centre_lps``."""
    half = (np.asarray(shape, dtype=float) - 1) / 2 * np.asarray(spacing)
    origin = np.asarray(centre_lps, dtype=float) - np.asarray(direction) @ half
    return Geometry(tuple(shape), tuple(spacing), tuple(origin), np.asarray(direction, dtype=float))


def lps_grid(geom: Geometry) -> np.ndarray:
    """(I, J, K, 3) LPS coordinates of every voxel centre."""
    idx = np.indices(geom.shape).reshape(3, -1).T
    return geom.index_to_lps(idx).reshape(*geom.shape, 3)


def sphere(geom: Geometry, centre: Sequence[float], radius: float, pts: np.ndarray | None = None) -> np.ndarray:
    pts = lps_grid(geom) if pts is None else pts
    return ((pts - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2


def cylinder_s(geom: Geometry, axis_lp: Sequence[float], radius: float, pts: np.ndarray | None = None,
               s_range: tuple[float, float] | None = None) -> np.ndarray:
    """Cylinder along the patient S axis through (L, P) = ``axis_lp``."""
    pts = lps_grid(geom) if pts is None else pts
    m = ((pts[..., :2] - np.asarray(axis_lp)) ** 2).sum(-1) <= radius ** 2
    if s_range is not None:
        m &= (pts[..., 2] >= s_range[0]) & (pts[..., 2] <= s_range[1])
    return m


def brute_force_gap(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Minimum box gap over ALL voxel pairs (O(n*m)), the reference for the KD-tree method."""
    pa, pb = np.argwhere(a), np.argwhere(b)
    g = np.maximum(np.abs(pa[:, None, :] - pb[None, :, :]) - 1, 0) * np.asarray(spacing)
    return float(np.sqrt((g ** 2).sum(-1)).min())


def flip_storage(arr: np.ndarray, geom: Geometry, axis: int) -> tuple[np.ndarray, Geometry]:
    """The same image stored with array axis ``axis`` reversed, and the matching geometry."""
    corner = np.zeros(3)
    corner[axis] = geom.shape[axis] - 1
    origin = geom.index_to_lps(corner)[0]
    d = geom.direction.copy()
    d[:, axis] *= -1
    return np.flip(arr, axis).copy(), Geometry(geom.shape, geom.spacing, tuple(origin), d)


def transpose_storage(arr: np.ndarray, geom: Geometry, perm: Sequence[int]) -> tuple[np.ndarray, Geometry]:
    """The same image stored with its axes permuted, and the matching geometry."""
    perm = list(perm)
    g = Geometry(tuple(geom.shape[p] for p in perm), tuple(geom.spacing[p] for p in perm), geom.origin,
                 geom.direction[:, perm])
    return np.ascontiguousarray(arr.transpose(perm)), g


def volume_seg(labels: np.ndarray, hu: np.ndarray, geom: Geometry,
               model: ModelInfo = MODEL) -> tuple[Volume, Segmentation]:
    return Volume(hu, geom), Segmentation(labels.astype(np.uint8), geom, model)


def lesion(distance: float | None = 20.0, diameter: float = 20.0, type: str = "lytic",
           location: str = "vertebral_body", uncertainty: float = 0.1, lesion_id: int = 1) -> Lesion:
    """A Lesion with the fields the planner reads (others plausible)."""
    contact = distance is not None and distance == 0.0
    return Lesion(
        id=lesion_id, voxel_count=1000, volume_ml=1.0, max_diameter_mm=diameter, mean_hu=100.0, type=type,
        bone_reference_hu=200.0, location=location, centroid_lps_mm=(0.0, 0.0, 0.0),
        bbox_ijk=((0, 0, 0), (10, 10, 10)), min_distance_to_canal_mm=distance,
        closest_point_lesion_lps_mm=None if distance is None else (0.0, 0.0, 0.0),
        closest_point_canal_lps_mm=None if distance is None else (0.0, distance, 0.0),
        canal_contact=contact, distance_uncertainty_mm=uncertainty,
        features={"bone_reference_hu": 200.0, "lytic_fraction": 0.9, "blastic_fraction": 0.0},
    )
