"""Real-CT training source: lesion insertion physics and labels, canal derivation, noise estimate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.train import real_insert as ri
from pipeline.types import BONE, CANAL, LESION


def _toy_spine(spacing=(1.5, 1.5, 1.5), shape=(64, 64, 48), seed=0):
    """Two cylindrical 'vertebrae' (body + ring arch around a canal) in soft tissue, with noise."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    idx = np.indices(shape).astype(float)
    x = (idx[0] - shape[0] / 2) * sp[0]
    y = (idx[1] - shape[1] / 2) * sp[1]
    z = idx[2] * sp[2]
    body = (x / 18) ** 2 + ((y + 20) / 14) ** 2 <= 1
    r = np.sqrt((x / 8) ** 2 + ((y - 4) / 7) ** 2)
    ring = (r > 1) & (r <= 1.7) & (y > -2)
    canal = r <= 1
    level = np.where(z < 0.5 * shape[2] * sp[2], 1, 2)
    in_level = (np.abs(z - 18) < 14) | (np.abs(z - 52) < 14)
    vert = np.where((body | ring) & in_level, level, 0).astype(np.uint8)
    hu = np.full(shape, 40.0, np.float32)
    hu[vert > 0] = 200.0
    hu[canal] = 15.0
    hu += ndimage.gaussian_filter(rng.normal(0, 1, shape), 0.7).astype(np.float32) * 20 / 0.23
    labels = np.zeros(shape, np.uint8)
    labels[vert > 0] = BONE
    labels[canal & ~(vert > 0)] = CANAL
    return hu, labels, vert, canal


@pytest.mark.parametrize("kind", ["lytic", "blastic", "mixed"])
def test_inserted_lesions_lie_in_bone_and_have_the_right_density(kind):
    hu, labels, vert, _ = _toy_spine()
    bone_ref = float(np.median(hu[labels == BONE]))
    rng = np.random.default_rng(7)
    n_ok = 0
    for _ in range(6):
        img, lab = hu.copy(), labels.copy()
        les = ri.insert_lesion(img, lab, vert, None, (1.5, 1.5, 1.5), rng, 20.0, 0.7, kind=kind, site="body")
        if les is None:
            continue
        n_ok += 1
        m = lab == LESION
        assert m.sum() == les.voxels > 0
        # inside the (dilated: lytic may breach the cortex by a few mm) bone
        near_bone = ndimage.binary_dilation(labels == BONE, iterations=3)
        assert (m & ~near_bone).sum() == 0
        if kind == "blastic":
            assert (m & (labels != BONE)).sum() == 0
            assert img[m].mean() > bone_ref + 300
        elif kind == "lytic":
            assert img[m].mean() < bone_ref - 80
            assert 0.0 < img[m].mean() < 110.0  # soft-tissue HU (20..60 + texture, edges blend with bone)
        else:
            assert img[m].min() < bone_ref and img[m].max() > bone_ref + 300
        # the image changed only near the lesion
        changed = np.abs(img - hu) > 1e-3
        assert (changed & ~ndimage.binary_dilation(m, iterations=4)).sum() == 0
    assert n_ok >= 4


def test_derive_canal_finds_the_foramen_and_bridges_gaps():
    _, labels, vert, canal = _toy_spine()
    derived = ri.derive_canal(vert > 0, (1.5, 1.5, 1.5))
    assert not (derived & (vert > 0)).any()
    # between the two levels (no bone, no foramen) the canal is interpolated: continuous along S
    ks = np.flatnonzero(derived.any(axis=(0, 1)))
    assert ks.size and np.all(np.diff(ks) == 1)
    covered = canal[:, :, ks.min():ks.max() + 1]
    inter = derived[:, :, ks.min():ks.max() + 1] & covered
    assert inter.sum() / covered.sum() > 0.8
    assert derived.sum() < 1.5 * covered.sum()


def test_noise_estimate_recovers_known_noise():
    rng = np.random.default_rng(3)
    base = np.full((64, 64, 64), 40.0, np.float32)
    noisy = base + ri.smooth_noise(base.shape, 0.9, rng) * 25.0
    sigma, corr = ri.estimate_noise(noisy)
    assert sigma == pytest.approx(25.0, rel=0.15)
    assert corr == pytest.approx(0.9, abs=0.25)


@pytest.mark.slow
def test_totalseg_background_canal_contains_the_cord(real_data):
    ct = ri.load_totalseg(real_data, (1.5, 1.5, 1.5))
    # bone-derived canal alone (before the cord is united in) holds most of TotalSegmentator's cord
    assert ct.cord_share is not None and ct.cord_share >= 0.9, ct.cord_share
    canal = ct.labels == CANAL
    assert canal.sum() > 0 and not (canal & (ct.labels == BONE)).any()
    assert 5.0 < ct.noise_hu < 60.0


def test_real_insert_cases_are_canonical_and_seeded(real_data):
    a = ri.real_insert_cases(real_data, 2, seed=11, spacing=(1.5, 1.5, 1.5), sources=("tptbox",), max_lesions=2)
    b = ri.real_insert_cases(real_data, 2, seed=11, spacing=(1.5, 1.5, 1.5), sources=("tptbox",), max_lesions=2)
    assert len(a) == 2
    for ca, cb in zip(a, b):
        assert ca.image.dtype == np.float32 and ca.labels.dtype == np.uint8
        assert ca.image.shape == ca.labels.shape
        assert set(np.unique(ca.labels)) <= {0, CANAL, LESION, BONE}
        assert np.array_equal(ca.labels, cb.labels) and np.allclose(ca.image, cb.image)
    assert any((c.labels == LESION).any() for c in a)
