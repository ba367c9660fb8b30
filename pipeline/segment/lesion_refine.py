"""Lytic lesion edges from the image: grow each lytic lesion into adjacent bone that is as dark as it.

Why: the network under-segments lesion edges, most of all lytic lesions whose density is close to
the trabecular bone around them. Their canal side is then labelled bone, and the lesion-to-canal
distance comes out too long, the unsafe direction for thermal ablation (MODEL_CARD.md, "Lytic
lesion refinement"). The image itself still shows the darker tissue.

For each lesion the measurement keeps (``_components``: size and bone contact as in
``measure_lesions``), on a crop around it:

1. smooth the HU with a Gaussian of ``sigma_mm`` (noise);
2. lesion intensity: median and MAD-sigma of the smoothed HU in the lesion's core (the lesion
   eroded by one voxel, or the lesion itself when that is empty);
3. bone intensity: the same over bone voxels (label 3) between ``reference_shell_mm[0]`` and
   ``[1]`` millimetres from the lesion;
4. only a lesion darker than that bone by at least ``min_separation`` (in units of the mean of
   the two sigmas) is grown. Lesions that are not clearly darker (blastic, iso-dense and most
   mixed ones) are left as they are: growing towards denser bone would take cortex;
5. threshold ``t`` where the two intensity distributions are equally far in their own sigmas;
   bone voxels darker than ``t`` and within ``grow_mm`` (true anisotropic spacing) of the lesion
   join it, if they connect to it (26-neighbours) through such voxels.

Only voxels labelled bone can change, and only to lesion: the canal, background and other labels
are untouched, no new lesion appears and none shrinks (two lesions within reach of each other can
merge). Everything works on crops.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipeline.config import LesionRefine, Postprocess
from pipeline.measure.lesions import _CUBE, _components, _label_slices
from pipeline.types import BONE, LESION, Geometry

log = logging.getLogger("osteoplan.segment")

_MAD_TO_SIGMA = 1.4826
_MIN_VOXELS = 8  # a core or a bone shell with fewer voxels gives no usable intensity estimate


@dataclass(frozen=True)
class LesionEdge:
    """What the refinement found for one lesion (``grown`` False: left as it was, ``reason`` says why)."""

    offset: tuple[int, int, int]
    voxels_before: int
    voxels_added: int
    lesion_hu: float | None = None
    bone_hu: float | None = None
    threshold_hu: float | None = None
    separation: float | None = None
    reason: str = ""

    @property
    def grown(self) -> bool:
        return self.voxels_added > 0


@dataclass
class RefineSummary:
    """Per-study summary, for the report: how many lesions grew and by how many voxels.

    ``added`` holds the (i, j, k) index of every voxel that became lesion, one row each: the
    measurement types each lesion on the voxels the network segmented, not on the added ones,
    which are dark by construction and would push a mixed lesion towards lytic.
    """

    enabled: bool
    lesions: list[LesionEdge] = field(default_factory=list)
    added: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    def as_dict(self) -> dict:
        return {"enabled": self.enabled,
                "lesions_examined": len(self.lesions),
                "lesions_grown": sum(e.grown for e in self.lesions),
                "voxels_added": int(sum(e.voxels_added for e in self.lesions))}


def _robust(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based sigma (plus 1 HU, so that a flat region never gives sigma 0)."""
    med = float(np.median(values))
    return med, _MAD_TO_SIGMA * float(np.median(np.abs(values - med))) + 1.0


def grow_lytic_lesions(labels: np.ndarray, hu: np.ndarray, geometry: Geometry, post: Postprocess) -> RefineSummary:
    """Grow lytic lesions of ``labels`` (modified in place) into adjacent dark bone; see the module doc."""
    params = post.lesion_refine
    summary = RefineSummary(enabled=params.enabled)
    if not params.enabled:
        return summary
    if labels.shape != hu.shape:
        raise ValueError(f"label map shape {labels.shape} != image shape {hu.shape}")
    region = _label_slices(labels)[LESION]
    kept = _components(labels, region, geometry, post.min_lesion_volume_ml, post.require_bone_contact)
    added: list[np.ndarray] = []
    for mask, offset in kept:  # masks and offsets come from the labels before any growth
        edge, ijk = _grow_one(labels, hu, geometry, mask, offset, params)
        summary.lesions.append(edge)
        added.append(ijk)
    if added:  # no voxel is added twice: a grown lesion's voxels are no longer bone for the next one
        summary.added = np.concatenate(added)
    grown = [e for e in summary.lesions if e.grown]
    if grown:
        log.info("lesion refine: %d of %d lytic lesion(s) grown into adjacent dark bone, %d voxel(s) added",
                 len(grown), len(summary.lesions), sum(e.voxels_added for e in grown))
    return summary


def _grow_one(labels: np.ndarray, hu: np.ndarray, geometry: Geometry, mask: np.ndarray,
              offset: tuple[int, int, int], params: LesionRefine) -> tuple[LesionEdge, np.ndarray]:
    """Grow one lesion; returns what was found and the (i, j, k) indices of the voxels added."""
    none = np.zeros((0, 3), np.int64)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    before = int(mask.sum())
    reach_mm = max(params.grow_mm, params.reference_shell_mm[1])
    # +1 voxel: the Gaussian and the distance need a little context beyond the reach
    pad = [math.ceil(reach_mm / s) + 1 for s in spacing]
    lo = [max(0, o - p) for o, p in zip(offset, pad)]
    hi = [min(n, o + m + p) for o, m, p, n in zip(offset, mask.shape, pad, labels.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    lesion = np.zeros([b - a for a, b in zip(lo, hi)], dtype=bool)
    lesion[tuple(slice(o - a, o - a + m) for o, a, m in zip(offset, lo, mask.shape))] = mask
    lab = labels[crop]
    image = hu[crop].astype(np.float32)
    if params.sigma_mm > 0:
        image = ndimage.gaussian_filter(image, params.sigma_mm / spacing, truncate=3.0)
    core = ndimage.binary_erosion(lesion, structure=_CUBE)
    if int(core.sum()) < _MIN_VOXELS:
        core = lesion
    if int(core.sum()) < _MIN_VOXELS:
        return LesionEdge(tuple(offset), before, 0, reason="too small to estimate its intensity"), none
    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    bone = lab == BONE
    shell = bone & (dist > params.reference_shell_mm[0]) & (dist <= params.reference_shell_mm[1])
    if int(shell.sum()) < _MIN_VOXELS:
        return LesionEdge(tuple(offset), before, 0, reason="too little bone around it"), none
    mu_l, sd_l = _robust(image[core])
    mu_b, sd_b = _robust(image[shell])
    separation = (mu_b - mu_l) / (0.5 * (sd_l + sd_b))
    threshold = mu_l + (mu_b - mu_l) * sd_l / (sd_l + sd_b)
    edge = dict(lesion_hu=round(mu_l, 1), bone_hu=round(mu_b, 1), threshold_hu=round(threshold, 1),
                separation=round(separation, 2))
    if separation < params.min_separation:
        return LesionEdge(tuple(offset), before, 0, reason="not darker than the bone around it", **edge), none
    candidate = bone & (image < threshold) & (dist <= params.grow_mm)
    if not candidate.any():
        return LesionEdge(tuple(offset), before, 0, reason="no dark bone next to it", **edge), none
    comp, _ = ndimage.label(candidate | lesion, structure=_CUBE)
    touching = np.unique(comp[lesion])
    added = np.isin(comp, touching[touching > 0]) & candidate
    n_added = int(added.sum())
    lab[added] = LESION  # ``lab`` is a view into ``labels``
    ijk = np.argwhere(added) + np.asarray(lo, dtype=np.int64)
    reason = "" if n_added else "no dark bone connected to it"
    return LesionEdge(tuple(offset), before, n_added, reason=reason, **edge), ijk
