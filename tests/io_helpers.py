"""Shared helpers for the tests of pipeline.io (imported explicitly, not a conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pipeline.io.dicom_write import write_ct_series, write_enhanced_ct  # noqa: F401 (re-exported)
from pipeline.types import Geometry, Volume

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
if not REAL.exists():
    REAL = Path("/work/shared/data/real")


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def geometry(shape=(12, 10, 6), spacing=(0.8, 0.9, 2.0), origin=(-5.0, 12.0, 30.0), direction=None) -> Geometry:
    return Geometry(shape=shape, spacing=spacing, origin=origin,
                    direction=np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64))


def random_hu(shape, seed: int = 0) -> np.ndarray:
    """Distinct-ish integer HU values, so a voxel mix-up cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 3000, size=shape).astype(np.int16)


def write_series(tmp: Path, hu: np.ndarray, geom: Geometry, **kw):
    return write_ct_series(hu, geom, tmp, **kw)


def assert_same_patient_content(vol: Volume, hu: np.ndarray, geom: Geometry, atol_mm: float = 1e-3) -> None:
    """Every voxel of ``vol`` holds the HU of the voxel of (hu, geom) at the same LPS position."""
    assert int(np.prod(vol.geometry.shape)) == hu.size, (vol.geometry.shape, hu.shape)
    idx = np.indices(vol.geometry.shape).reshape(3, -1).T
    lps = vol.geometry.index_to_lps(idx)
    src = geom.lps_to_index(lps)
    rounded = np.rint(src)
    assert np.abs(src - rounded).max() * min(geom.spacing) < atol_mm, "grids do not coincide"
    r = rounded.astype(int)
    assert r.min() >= 0 and np.all(r.max(axis=0) < np.array(geom.shape)), "voxel outside the source grid"
    assert len({tuple(v) for v in r}) == hu.size, "not a one-to-one voxel mapping"
    got = vol.array[idx[:, 0], idx[:, 1], idx[:, 2]]
    want = hu[r[:, 0], r[:, 1], r[:, 2]]
    np.testing.assert_array_equal(got, want)


def set_tags(path: Path, **values) -> None:
    """Rewrite some attributes of a written file (keeps its transfer syntax)."""
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_mr_series(tmp: Path, shape=(6, 6, 4)):
    """A small series written as CT, then relabelled MR (Modality and SOP class): not a CT."""
    g = geometry(shape=shape)
    src = write_ct_series(random_hu(g.shape, 1), g, tmp)
    for f in src.files:
        set_tags(f, Modality="MR", SOPClassUID=MR_IMAGE_STORAGE)
    return src
