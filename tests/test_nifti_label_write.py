"""NIfTI writing: a .nii.gz reaches zlib in large chunks and holds exactly the bytes nib.save writes."""

from __future__ import annotations

import gzip
import math

import nibabel as nib
import numpy as np
import pytest

from pipeline.io import nifti
from pipeline.io.nifti import write_label_nifti, write_volume_nifti
from pipeline.types import Geometry, Volume

DIRS = {
    "axial": np.eye(3),
    "feet_first_prone": np.diag([-1.0, -1.0, -1.0]),
    "permuted": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
}
CHUNK = 16384


def _geom(shape, direction) -> Geometry:
    return Geometry(shape=shape, spacing=(0.7, 0.85, 2.5), origin=(12.5, -40.0, 301.25), direction=direction)


@pytest.fixture
def zlib_writes(monkeypatch):
    """The sizes of the non-empty writes that reach gzip (and so zlib), with CHUNK as the chunk size
    (nibabel's seek to the voxel offset flushes the header as a write of its own)."""
    monkeypatch.setattr(nifti, "GZIP_CHUNK_BYTES", CHUNK)
    sizes: list[int] = []
    real = gzip.GzipFile.write

    def spy(self, data):
        if memoryview(data).nbytes:
            sizes.append(memoryview(data).nbytes)
        return real(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", spy)
    return sizes


def _same_as_nib_save(ours, img, tmp_path) -> None:
    ref = tmp_path / "ref.nii"
    nib.save(img, str(ref))
    assert gzip.decompress(ours.read_bytes()) == ref.read_bytes()


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("name", sorted(DIRS))
@pytest.mark.parametrize("shape", [(9, 7, 5), (64, 48, 40), (1, 3, 2)])
def test_label_gz_equals_nibabel_save_in_few_writes(tmp_path, zlib_writes, order, name, shape):
    geom = _geom(shape, DIRS[name])
    rng = np.random.default_rng(sum(shape))
    labels = np.array(rng.integers(0, 4, size=shape).astype(np.uint8), order=order)
    ours = tmp_path / "ours.nii.gz"
    write_label_nifti(labels, geom, ours)
    total = sum(zlib_writes)
    # nibabel alone writes the header, then one piece per slice; here the pieces are gathered
    assert len(zlib_writes) <= math.ceil(total / CHUNK) + 1 < 1 + shape[2]
    _same_as_nib_save(ours, nifti._nifti_image(labels, geom), tmp_path)
    back = nib.load(str(ours))
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, geom.affine_ras)
    assert back.header.get_slope_inter() in ((1.0, 0.0), (None, None))


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_gz_equals_nibabel_save(tmp_path, zlib_writes, dtype):
    geom = _geom((40, 32, 24), DIRS["feet_first_prone"])
    arr = np.asfortranarray(np.random.default_rng(3).integers(-1024, 2000, size=geom.shape).astype(dtype))
    ours = tmp_path / "ct.nii.gz"
    write_volume_nifti(Volume(array=arr, geometry=geom), ours)
    assert len(zlib_writes) <= math.ceil(sum(zlib_writes) / CHUNK) + 1 < 1 + geom.shape[2]
    _same_as_nib_save(ours, nifti._nifti_image(arr, geom), tmp_path)


def test_plain_nii_is_nibabel_save(tmp_path, zlib_writes):
    geom = _geom((6, 5, 4), DIRS["axial"])
    labels = np.arange(120, dtype=np.uint8).reshape(6, 5, 4) % 4
    write_label_nifti(labels, geom, tmp_path / "f.nii")
    assert zlib_writes == []
    ref = tmp_path / "ref.nii"
    nib.save(nifti._nifti_image(labels, geom), str(ref))
    assert (tmp_path / "f.nii").read_bytes() == ref.read_bytes()
