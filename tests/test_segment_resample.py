"""Resampling to the model's canonical grid and back keeps patient-space geometry exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.segment.resample import (
    canonical_geometry,
    foreground_roi,
    logits_to_labels,
    signed_permutation,
    to_canonical,
)
from pipeline.types import Geometry


def _rot(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rx @ ry @ rz


DIRECTIONS = {
    "HFS": np.eye(3),
    "FFS": np.diag([-1.0, 1.0, -1.0]),
    "HFP": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]),
    "oblique": _rot(0.2, -0.15, 0.3),
}


def _field(lps: np.ndarray) -> np.ndarray:
    """A smooth linear function of patient position: trilinear resampling reproduces it exactly."""
    return 3.0 * lps[..., 0] - 2.0 * lps[..., 1] + 0.5 * lps[..., 2] + 7.0


def _grid(direction: np.ndarray, shape=(20, 18, 12), spacing=(0.8, 0.9, 2.5)) -> Geometry:
    return Geometry(shape=shape, spacing=spacing, origin=(-5.0, 12.0, 30.0), direction=direction)


def test_signed_permutation_detects_axis_aligned_only():
    assert signed_permutation(np.eye(3)) == ([0, 1, 2], [1, 1, 1])
    assert signed_permutation(DIRECTIONS["FFS"]) == ([0, 1, 2], [-1, 1, -1])
    axes, signs = signed_permutation(DIRECTIONS["permuted"])
    assert axes == [1, 2, 0] and signs == [1, -1, -1]
    assert signed_permutation(DIRECTIONS["oblique"]) is None


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_to_canonical_preserves_patient_space_values(name):
    geom = _grid(DIRECTIONS[name])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), -1).reshape(-1, 3)
    values = _field(geom.index_to_lps(ijk)).reshape(geom.shape).astype(np.float32)
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    assert np.allclose(canon.direction, np.eye(3))
    out = to_canonical(values, geom, canon)[0, 0].numpy()
    cijk = np.stack(np.meshgrid(*[np.arange(n) for n in canon.shape], indexing="ij"), -1).reshape(-1, 3)
    clps = canon.index_to_lps(cijk)
    expected = _field(clps).reshape(canon.shape)
    # inside the input's extent the linear field is reproduced (border-clamped outside for oblique)
    inside = np.all((geom.lps_to_index(clps) >= -1e-6) & (geom.lps_to_index(clps) <= np.asarray(geom.shape) - 1 + 1e-6),
                    axis=1).reshape(canon.shape)
    assert inside.mean() > (0.999 if name != "oblique" else 0.2)
    assert np.abs(out - expected)[inside].max() < 1e-2


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_logits_back_to_input_grid_put_labels_in_the_right_place(name):
    """A sphere labelled in canonical space comes back as the same sphere on the input grid."""
    geom = _grid(DIRECTIONS[name], shape=(40, 36, 24), spacing=(0.7, 0.8, 1.6))
    canon = canonical_geometry(geom, (1.0, 1.0, 1.0))
    centre = geom.index_to_lps(np.array([[20, 17, 11]]))[0]
    cijk = np.stack(np.meshgrid(*[np.arange(n) for n in canon.shape], indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(canon.index_to_lps(cijk) - centre, axis=1).reshape(canon.shape)
    logits = torch.zeros((1, 4) + canon.shape)
    logits[0, 0] = torch.from_numpy(dist - 6.0).float()  # background wins outside 6 mm
    logits[0, 2] = torch.from_numpy(6.0 - dist).float()
    labels = logits_to_labels(logits, canon, geom, slab_voxels=5000)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), -1).reshape(-1, 3)
    d_in = np.linalg.norm(geom.index_to_lps(ijk) - centre, axis=1).reshape(geom.shape)
    assert set(np.unique(labels)) <= {0, 2}
    assert np.all(labels[d_in < 5.5] == 2)
    assert np.all(labels[d_in > 6.5] == 0)
    roi = foreground_roi(logits[0].argmax(0).numpy(), canon, geom, margin_vox=2)
    assert roi is not None
    lo, hi = roi
    restricted = logits_to_labels(logits, canon, geom, roi_ijk=(lo, hi))
    assert np.array_equal(restricted, labels)
