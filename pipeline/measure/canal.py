"""The spinal canal (label 1): kept components, volume and a surface KD-tree built once per study.

With ``postprocess.keep_largest_canal_component`` the largest 26-connected component is kept,
and so is every other component of at least ``measurement.canal.min_component_fraction`` of its
size (configs/rules.yaml). Keeping only the largest would be unsafe: a lesion invading the canal
can split it, and dropping the part next to the lesion would make the lesion look farther from
the canal than it is. Small specks (segmentation noise) are still dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.measure.distance import VoxelSurface
from pipeline.types import CANAL, CanalSummary, Geometry

log = logging.getLogger("osteoplan.measure")

_CUBE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class Canal:
    voxel_count: int
    volume_ml: float
    surface: VoxelSurface | None  # None when no canal voxel was kept
    components_kept: int = 0
    components_dropped: int = 0
    dropped_voxels: int = 0

    @property
    def found(self) -> bool:
        return self.surface is not None

    def summary(self) -> CanalSummary:
        return CanalSummary(found=self.found, volume_ml=round(self.volume_ml, 4))


def extract_canal(labels: np.ndarray, geometry: Geometry, canal_slices: tuple[slice, ...] | None,
                  keep_largest: bool, min_component_fraction: float) -> Canal:
    """The canal inside its bounding box ``canal_slices`` (from ``ndimage.find_objects``)."""
    if canal_slices is None:
        return Canal(0, 0.0, None)
    mask = labels[canal_slices] == CANAL
    kept, dropped, dropped_vox = 1, 0, 0
    if keep_largest:
        comp, n = ndimage.label(mask, structure=_CUBE)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            keep = np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1
            kept, dropped = len(keep), n - len(keep)
            dropped_vox = int(sizes.sum() - sizes[keep - 1].sum())
            mask = np.isin(comp, keep)
            if dropped:
                log.info("canal: kept %d component(s), dropped %d small one(s) (%d voxels)", kept, dropped, dropped_vox)
    count = int(mask.sum())
    if count == 0:
        return Canal(0, 0.0, None)
    offset = [s.start for s in canal_slices]
    surface = VoxelSurface.from_mask(mask, geometry.spacing, offset)
    return Canal(count, count * geometry.voxel_volume_mm3 / 1000.0, surface, kept, dropped, dropped_vox)
