"""Where a lesion sits relative to the spinal canal: vertebral body, posterior elements, other bone.

Geometry only (the segmentation has one bone class), in LPS so that it does not depend on how
the patient lay or how the array is stored: anterior is -P (decreasing y).

- centroid farther than ``other_bone_distance_mm`` from the nearest canal voxel -> ``other_bone``
  (pelvis, ribs, long bones...);
- else the canal's local anterior wall is the most anterior canal-surface point within
  ``canal_neighbourhood_mm`` of the canal point nearest to the centroid; a centroid anterior of
  that wall -> ``vertebral_body``, otherwise ``posterior_elements`` (pedicles, laminae,
  processes: the neural arch lies beside and behind the canal);
- no canal -> ``unknown``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.measure.distance import VoxelSurface
from pipeline.plan.rules import LocationParams
from pipeline.types import Geometry


def classify_location(centroid_ijk: np.ndarray, canal: VoxelSurface | None, geometry: Geometry,
                      params: LocationParams) -> tuple[str, dict[str, Any]]:
    """(location, details) for a lesion whose centroid is at fractional index ``centroid_ijk``."""
    if canal is None:
        return "unknown", {}
    c_mm = np.asarray(centroid_ijk, dtype=np.float64) * canal.spacing
    dist, nearest = canal.tree.query(c_mm, k=1)
    details: dict[str, Any] = {"centroid_to_canal_mm": round(float(dist), 3)}
    if dist > params.other_bone_distance_mm:
        return "other_bone", details
    near = canal.tree.query_ball_point(canal.points[nearest], r=params.canal_neighbourhood_mm)
    wall_p = float(geometry.index_to_lps(canal.indices[np.asarray(near, dtype=np.int64)])[:, 1].min())
    centroid_p = float(geometry.index_to_lps(np.asarray(centroid_ijk, dtype=np.float64))[0, 1])
    details.update(canal_anterior_wall_p_mm=round(wall_p, 3), centroid_p_mm=round(centroid_p, 3))
    return ("vertebral_body" if centroid_p < wall_p else "posterior_elements"), details
