"""Lesion type (lytic / mixed / blastic) relative to the same patient's healthy bone.

A fixed HU cut-off is unsafe (normal trabecular bone falls from ~226 HU at 30 to ~89 HU at 90
years), so each lesion is compared with a reference: the median HU of bone voxels (label 3) near
the lesion. A lesion voxel below ``reference - lytic_delta_hu`` counts as lytic, one above
``reference + blastic_delta_hu`` as blastic (numbers in configs/rules.yaml, ``measurement.
lesion_type``). Both fractions >= ``mixed_fraction`` -> mixed; otherwise the larger fraction wins;
a lesion with neither (iso-dense to bone, an equal split) is called mixed, with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from pipeline.plan.rules import LesionTypeParams
from pipeline.types import BONE, LESION

_CUBE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class BoneReference:
    hu: float
    source: str  # local | all_bone | default
    voxels: int


@dataclass(frozen=True)
class TypeResult:
    type: str
    lytic_fraction: float
    blastic_fraction: float
    lytic_below_hu: float
    blastic_above_hu: float
    note: str = ""


def classify_hu(hu: np.ndarray, reference_hu: float, params: LesionTypeParams) -> TypeResult:
    """Type of a lesion from its voxels' HU and the bone reference HU."""
    values = np.asarray(hu, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("a lesion needs at least one voxel")
    low = reference_hu - params.lytic_delta_hu
    high = reference_hu + params.blastic_delta_hu
    f_lytic = float(np.mean(values < low))
    f_blastic = float(np.mean(values > high))
    note = ""
    if f_lytic >= params.mixed_fraction and f_blastic >= params.mixed_fraction:
        kind = "mixed"
    elif f_lytic > f_blastic:
        kind = "lytic"
    elif f_blastic > f_lytic:
        kind = "blastic"
    else:
        kind = "mixed"
        note = "indeterminate: as many voxels below as above the bone reference thresholds"
    return TypeResult(kind, f_lytic, f_blastic, low, high, note)


def local_bone_reference(labels: np.ndarray, hu: np.ndarray, mask: np.ndarray,
                         bbox: tuple[tuple[int, int, int], tuple[int, int, int]],
                         spacing: tuple[float, float, float], margin_mm: float) -> tuple[float | None, int]:
    """Median HU of bone within ``margin_mm`` (per axis) of a lesion's bounding box ``bbox``.

    ``mask`` is the lesion's crop (its bounding box). The lesion and a one-voxel shell around it
    (26-neighbours, partial volume) are excluded; other lesions are not bone anyway. Works on the
    crop only. Returns (median or None, number of voxels used).
    """
    lo = [max(0, int(b) - math.ceil(margin_mm / s)) for b, s in zip(bbox[0], spacing)]
    hi = [min(n, int(b) + math.ceil(margin_mm / s)) for b, s, n in zip(bbox[1], spacing, labels.shape)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    bone = labels[region] == BONE
    if not bone.any():
        return None, 0
    shell = ndimage.binary_dilation(np.pad(mask, 1), structure=_CUBE)
    # the padded shell starts one voxel before the lesion box; clip it to the region
    start = [int(b) - 1 - a for b, a in zip(bbox[0], lo)]
    src = tuple(slice(max(0, -s0), min(sh, r - s0)) for s0, sh, r in zip(start, shell.shape, bone.shape))
    dst = tuple(slice(s0 + x.start, s0 + x.stop) for s0, x in zip(start, src))
    bone[dst] &= ~shell[src]
    n = int(bone.sum())
    if n == 0:
        return None, 0
    return float(np.median(hu[region][bone])), n


def bone_reference(labels: np.ndarray, hu: np.ndarray, mask: np.ndarray,
                   bbox: tuple[tuple[int, int, int], tuple[int, int, int]],
                   spacing: tuple[float, float, float], margin_mm: float, params: LesionTypeParams,
                   all_bone: Callable[[], tuple[float | None, int]]) -> BoneReference:
    """Local reference, else all bone in the scan (``all_bone``, computed once by the caller), else default."""
    median, n = local_bone_reference(labels, hu, mask, bbox, spacing, margin_mm)
    if median is not None and n >= params.min_reference_voxels:
        return BoneReference(median, "local", n)
    median, n = all_bone()
    if median is not None and n >= params.min_reference_voxels:
        return BoneReference(median, "all_bone", n)
    return BoneReference(params.default_bone_reference_hu, "default", 0)


def all_bone_reference(labels: np.ndarray, hu: np.ndarray,
                       bone_slices: tuple[slice, ...] | None) -> tuple[float | None, int]:
    """Median HU of every bone voxel (inside the bone bounding box ``bone_slices``)."""
    if bone_slices is None:
        return None, 0
    lab = labels[bone_slices]
    bone = (lab == BONE) & ~ndimage.binary_dilation(lab == LESION, structure=_CUBE)
    n = int(bone.sum())
    if n == 0:
        return None, 0
    return float(np.median(hu[bone_slices][bone])), n
