"""The GPU resampling paths (issue 7) give the same result as the host paths.

They are plain torch code, so they run on the CPU here: ``to_canonical_on_device`` against
``to_canonical``, ``sample_labels`` against sampling every voxel with ``grid_sample`` (the
reference of test_bench_fastpaths), and a whole ``Segmenter.segment`` with resampling "on the
device" against the host path, on the shipped bundle with a small fixed network in place of the
UNet (the resampling, not the model, is under test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.segment.resample import (
    argmax_channels,
    canonical_geometry,
    foreground_roi,
    logits_to_labels,
    sample_labels,
    signed_permutation,
    to_canonical,
    to_canonical_on_device,
)
from pipeline.segment.segmenter import Segmenter
from pipeline.types import Geometry, Volume
from test_bench_fastpaths import _logits, _reference_labels
from test_segment_resample import DIRECTIONS

CPU = torch.device("cpu")


def _geom(name: str, shape=(23, 19, 17)) -> Geometry:
    return Geometry(shape=shape, spacing=(0.9, 1.1, 2.0), origin=(3.0, -2.0, 5.0),
                    direction=np.asarray(DIRECTIONS[name], float))


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("order", ["C", "F"])
def test_sample_labels_equals_sampling_every_voxel(name, quantised, order):
    geom = _geom(name)
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    logits = _logits(canon, 3, quantised)
    ref = _reference_labels(logits, canon, geom)
    got = sample_labels(logits, canon, geom, order=order, chunk_voxels=500)  # several chunks
    assert got.flags[f"{order}_CONTIGUOUS"]
    np.testing.assert_array_equal(got, ref)
    # with the foreground box: the same labels as the host path (outside the box: background)
    roi = foreground_roi(argmax_channels(logits[0]), canon, geom)
    np.testing.assert_array_equal(sample_labels(logits, canon, geom, roi_ijk=roi, order=order, chunk_voxels=300),
                                  logits_to_labels(logits, canon, geom, roi_ijk=roi, order=order))


def test_foreground_roi_reads_tensors_and_arrays_alike():
    geom = _geom("FFS")
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    coarse = np.zeros(canon.shape, np.uint8)
    assert foreground_roi(coarse, canon, geom) is None
    assert foreground_roi(torch.from_numpy(coarse), canon, geom) is None
    coarse[3:5, 2, 7:9] = 2
    a, b = foreground_roi(coarse, canon, geom), foreground_roi(torch.from_numpy(coarse), canon, geom)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.all(a[0] <= a[1])


@pytest.mark.parametrize("name", [n for n in DIRECTIONS if n != "oblique"])
@pytest.mark.parametrize("fortran", [False, True])
def test_to_canonical_on_device_equals_the_host_path(name, fortran):
    geom = _geom(name)
    assert signed_permutation(geom.direction) is not None
    canon = canonical_geometry(geom, (1.4, 1.7, 1.5))
    arr = np.random.default_rng(1).normal(0, 400, geom.shape).astype(np.int16)
    arr = np.asfortranarray(arr) if fortran else arr
    host = to_canonical(arr, geom, canon)
    dev = to_canonical_on_device(arr, geom, canon, CPU)
    assert dev.shape == host.shape == (1, 1) + canon.shape and dev.dtype == torch.float32
    torch.testing.assert_close(dev, host, atol=0, rtol=0)  # same float32 operations, same order


def test_to_canonical_on_device_oblique_uses_the_general_sampler():
    geom = _geom("oblique")
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    arr = np.random.default_rng(2).normal(0, 400, geom.shape).astype(np.int16)
    torch.testing.assert_close(to_canonical_on_device(arr, geom, canon, CPU), to_canonical(arr, geom, canon),
                               atol=0, rtol=0)


class _FixedNet(torch.nn.Module):
    """A deterministic 4-class network: smooth, with label boundaries everywhere (tests resampling)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv3d(1, 4, 5, padding=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.tensor([0.5, -0.2, 0.0, 0.1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * 4.0)


@pytest.mark.parametrize("name", ["HFS", "FFS", "permuted", "oblique"])
def test_segment_on_device_path_equals_host_path(name):
    seg = Segmenter.from_bundle("osteoplan-spine", device="cpu")
    seg.net = _FixedNet().eval()
    geom = Geometry(shape=(40, 36, 22), spacing=(0.8, 0.8, 2.0), origin=(-10.0, 4.0, 20.0),
                    direction=np.asarray(DIRECTIONS[name], float))
    rng = np.random.default_rng(3)
    hu = np.asfortranarray(rng.normal(200, 500, geom.shape).astype(np.int16))  # slice-major, like DICOM
    vol = Volume(array=hu, geometry=geom)
    host = seg.segment(vol)
    seg.resample_on_device = True
    dev = seg.segment(vol)
    assert dev.labels.flags.f_contiguous and host.labels.flags.f_contiguous
    assert len(np.unique(host.labels)) > 1  # boundaries exist: the comparison means something
    np.testing.assert_array_equal(dev.labels, host.labels)


def _reference_corner_labels(logits: torch.Tensor, canon: Geometry, geom: Geometry) -> np.ndarray:
    """grid_sample every voxel centre, then the arg-max among the labels of the (up to 8) model
    nodes around it that carry a trilinear weight."""
    from pipeline.segment.resample import _sample

    node = logits[0].argmax(0).numpy()
    cn = np.asarray(canon.shape)
    m = np.linalg.inv(canon.affine_lps) @ geom.affine_lps
    ijk = np.argwhere(np.ones(geom.shape, bool))
    pos = ijk @ m[:3, :3].T + m[:3, 3]
    norm = 2 * pos / np.maximum(cn - 1, 1) - 1
    grid = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1], dtype=np.float32)).view(1, 1, 1, -1, 3)
    scores = _sample(logits.float(), grid, "bilinear")[0, :, 0, 0].numpy()
    clamped = [np.clip(pos[:, d], 0, cn[d] - 1) for d in range(3)]
    lower = [np.clip(np.floor(clamped[d]).astype(int), 0, max(cn[d] - 2, 0)) for d in range(3)]
    ok = np.zeros((len(pos), scores.shape[0]), bool)
    for corner in np.ndindex(2, 2, 2):
        at = [np.minimum(lower[d] + corner[d], cn[d] - 1) for d in range(3)]
        # only nodes with a trilinear weight (above 1e-6 along every axis) count
        has = np.all([np.abs(1 - corner[d] - (clamped[d] - lower[d])) > 1e-6 for d in range(3)], axis=0)
        ok[np.arange(len(pos))[has], node[at[0], at[1], at[2]][has]] = True
    scores[~ok.T] = -np.inf
    out = np.zeros(geom.shape, np.uint8)
    out[tuple(ijk.T)] = scores.argmax(0)
    return out


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("quantised", [False, True])
def test_corner_labels_on_both_paths_equal_the_reference(name, quantised):
    geom = _geom(name)
    canon = canonical_geometry(geom, (1.5, 1.5, 1.5))
    logits = _logits(canon, 5, quantised)
    ref = _reference_corner_labels(logits, canon, geom)
    for order in ("C", "F"):
        np.testing.assert_array_equal(logits_to_labels(logits, canon, geom, order=order, corner_labels=True), ref)
        np.testing.assert_array_equal(
            sample_labels(logits, canon, geom, order=order, chunk_voxels=400, corner_labels=True), ref)


def test_corner_labels_keep_touching_classes_in_contact():
    """Lesion and canal nodes side by side, bone second-best in both: plain trilinear interpolation
    puts bone between them on a finer grid; with corner labels they stay in contact."""
    canon = Geometry(shape=(2, 3, 3), spacing=(3.0, 3.0, 3.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    logits = torch.zeros((1, 4) + canon.shape)
    logits[0, 1, 0] = 10.0  # canal at i = 0
    logits[0, 3, 0] = 8.0
    logits[0, 2, 1] = 10.0  # lesion at i = 1
    logits[0, 3, 1] = 8.0
    geom = Geometry(shape=(7, 3, 3), spacing=(0.5, 3.0, 3.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    plain = logits_to_labels(logits, canon, geom)[:, 1, 1].tolist()
    assert 3 in plain  # the artefact: a bone layer between canal and lesion
    for fn in (logits_to_labels, sample_labels):
        got = fn(logits, canon, geom, corner_labels=True)[:, 1, 1].tolist()
        assert set(got) == {1, 2} and got == sorted(got)  # canal, then lesion, touching


def test_keep_corner_labels_bit_path_equals_the_boolean_path():
    """Up to 8 classes the node classes are OR-ed as bits; beyond, a boolean table is filled.
    Both give the same masked scores."""
    from pipeline.segment.resample import _keep_corner_labels

    rng = np.random.default_rng(5)
    nodes = rng.integers(0, 4, (5, 6, 7)).astype(np.uint8)
    n = 500
    lower = [rng.integers(0, s, n) for s in nodes.shape]
    frac = [rng.choice([0.0, 1e-9, 0.3, 1.0 - 1e-9], n) for _ in range(3)]
    scores4 = torch.from_numpy(rng.normal(size=(4, n)).astype(np.float32))
    scores9 = torch.cat([scores4, torch.zeros(5, n)])
    bit = _keep_corner_labels(scores4, nodes, lower, frac)
    table = _keep_corner_labels(scores9, nodes, lower, frac)
    assert torch.equal(bit, table[:4])
    assert bool(torch.isinf(table[4:]).all())  # classes no node has
    assert bool(torch.isinf(bit).any()) and bool(torch.isfinite(bit).any(dim=0).all())
