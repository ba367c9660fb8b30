"""The fast resampling paths (issue 7) give the same result as the plain reference algorithms.

References, written out here on purpose: ``F.interpolate`` (trilinear, align_corners=True) after
permute/flip for the canonical image; ``F.grid_sample`` at every input voxel centre followed by
``argmax`` for the label map; ``torch.argmax`` for the channel argmax. Small grids only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.segment.resample import (
    _sample,
    _slab_grids,
    argmax_channels,
    canonical_geometry,
    foreground_roi,
    logits_to_labels,
    signed_permutation,
    to_canonical,
)
from pipeline.segment.segmenter import _window_count, plan_windows
from pipeline.types import Geometry
from test_segment_resample import DIRECTIONS  # the same orientations, oblique included




def _reference_labels(logits: torch.Tensor, canon: Geometry, geom: Geometry) -> np.ndarray:
    """grid_sample every input voxel centre, first-index argmax (the pre-issue-7 algorithm)."""
    labels = np.zeros(geom.shape, np.uint8)
    for k0, k1, grid in _slab_grids(geom, canon, slab=3):
        out = _sample(logits.float(), grid, "bilinear")
        labels[:, :, k0:k1] = out[0].argmax(dim=0).to(torch.uint8).permute(2, 1, 0).numpy()
    return labels


def _reference_canonical(array: np.ndarray, geom: Geometry, canon: Geometry) -> torch.Tensor:
    axis_for_lps, sign = signed_permutation(geom.direction)
    t = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).permute(*axis_for_lps)
    flips = [d for d in range(3) if sign[d] < 0]
    if flips:
        t = torch.flip(t, dims=flips)
    return F.interpolate(t[None, None], size=canon.shape, mode="trilinear", align_corners=True)


def _logits(canon: Geometry, seed: int, quantised: bool) -> torch.Tensor:
    """Smooth blobs per class plus noise; ``quantised`` rounds to 0.5 so exact ties occur."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in canon.shape], indexing="ij")
    chans = []
    for _ in range(4):
        c = rng.uniform(0.2, 0.8, 3)
        r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
        chans.append(3.0 - 25.0 * r2 + rng.normal(0, 0.3, r2.shape))
    x = np.stack(chans)
    if quantised:
        x = np.round(x * 2) / 2
    return torch.from_numpy(x.astype(np.float32))[None]


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("quantised", [False, True])
def test_logits_to_labels_equals_sampling_every_voxel(name, quantised):
    geom = Geometry(shape=(23, 19, 11), spacing=(0.7, 0.8, 1.6), origin=(-5.0, 12.0, 30.0),
                    direction=DIRECTIONS[name])
    canon = canonical_geometry(geom, (1.3, 1.1, 1.7))
    logits = _logits(canon, seed=len(name), quantised=quantised)
    ref = _reference_labels(logits, canon, geom)
    assert len(np.unique(ref)) >= 3  # the test has boundaries to get right
    for order in ("C", "F"):
        got = logits_to_labels(logits, canon, geom, slab_voxels=97, order=order)
        assert got.flags[f"{order}_CONTIGUOUS"]
        assert np.array_equal(got, ref), f"{(got != ref).sum()} voxels differ ({order})"
    roi = foreground_roi(argmax_channels(logits[0]).numpy(), canon, geom)
    assert roi is not None
    lo, hi = roi
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    restricted = logits_to_labels(logits, canon, geom, roi_ijk=roi, order="F")
    assert np.array_equal(restricted[box], ref[box])
    outside = np.ones(geom.shape, bool)
    outside[box] = False
    assert not restricted[outside].any()


def test_argmax_channels_matches_torch_argmax_with_ties():
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 3, (4, 9, 8, 7)).astype(np.float32))
    assert torch.equal(argmax_channels(x), x.argmax(dim=0).to(torch.uint8))


@pytest.mark.parametrize("name", ["HFS", "FFS", "HFP", "permuted"])
@pytest.mark.parametrize("fortran", [False, True])
def test_to_canonical_matches_interpolate(name, fortran):
    geom = Geometry(shape=(37, 29, 13), spacing=(0.7, 0.9, 1.3), origin=(1.0, 2.0, 3.0), direction=DIRECTIONS[name])
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    hu = np.random.default_rng(2).integers(-1000, 2000, geom.shape).astype(np.int16)
    if fortran:
        hu = np.asfortranarray(hu)
    got = to_canonical(hu, geom, canon)
    ref = _reference_canonical(hu, geom, canon)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert float((got - ref).abs().max()) < 0.05  # HU; float32 position rounding in the reference


def test_plan_windows_covers_within_budget_and_beats_the_bundle_window():
    roi, batch = plan_windows((239, 239, 200), (160, 160, 160), 2, 0.25, 8)
    assert all(w % 8 == 0 and 96 <= w <= 160 for w in roi) and batch == 2
    counts = [_window_count(s, w, 0.25) for s, w in zip((239, 239, 200), roi)]
    assert counts == [_window_count(s, 160, 0.25) for s in (239, 239, 200)]  # same tiling, smaller windows
    assert np.prod(counts) * np.prod(roi) < 0.65 * np.prod(counts) * 160 ** 3
    assert roi == (144, 144, 120)
    # a small volume is one window, rounded up to the divisor
    assert plan_windows((120, 120, 101), (160, 160, 160), 2, 0.25, 8)[0] == (120, 120, 104)
