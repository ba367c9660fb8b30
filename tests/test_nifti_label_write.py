"""Label maps to .nii.gz: the chunked gzip path writes exactly the bytes nibabel's save writes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from pipeline.io import nifti
from pipeline.io.nifti import write_label_nifti
from pipeline.types import Geometry

DIRS = {
    "axial": np.eye(3),
    "feet_first_prone": np.diag([-1.0, -1.0, -1.0]),
    "permuted": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
}


def _geom(shape, direction) -> Geometry:
    return Geometry(shape=shape, spacing=(0.7, 0.85, 2.5), origin=(12.5, -40.0, 301.25), direction=direction)


@pytest.mark.parametrize("name", sorted(DIRS))
@pytest.mark.parametrize("shape", [(9, 7, 5), (64, 48, 40), (1, 3, 2)])
def test_chunked_gzip_equals_nibabel_save(tmp_path, monkeypatch, name, shape):
    geom = _geom(shape, DIRS[name])
    rng = np.random.default_rng(sum(shape))
    labels = np.asfortranarray(rng.integers(0, 4, size=shape).astype(np.uint8))  # slice-major, as the pipeline's
    monkeypatch.setattr(nifti, "GZIP_CHUNK_BYTES", 1000)  # several chunks, one ending mid-slice
    calls = []
    real = nifti._save_label_gz_chunked
    monkeypatch.setattr(nifti, "_save_label_gz_chunked", lambda *a: (calls.append(1), real(*a)))
    ours = tmp_path / "ours.nii.gz"
    write_label_nifti(labels, geom, ours)
    assert calls, "a slice-major map takes the chunked path"
    ref = tmp_path / "ref.nii"
    nib.save(nifti._nifti_image(labels, geom), str(ref))
    assert gzip.decompress(ours.read_bytes()) == ref.read_bytes()
    back = nib.load(str(ours))
    assert np.array_equal(np.asarray(back.dataobj), labels)
    assert np.allclose(back.affine, geom.affine_ras)
    assert back.header.get_slope_inter() in ((1.0, 0.0), (None, None))


def test_c_ordered_map_and_plain_nii_keep_nibabel(tmp_path, monkeypatch):
    geom = _geom((6, 5, 4), DIRS["axial"])
    labels = np.arange(120, dtype=np.uint8).reshape(6, 5, 4) % 4  # C order: nibabel's own writer
    monkeypatch.setattr(nifti, "_save_label_gz_chunked", lambda *a: pytest.fail("chunked path taken"))
    write_label_nifti(labels, geom, tmp_path / "c.nii.gz")
    write_label_nifti(np.asfortranarray(labels), geom, tmp_path / "f.nii")
    for f in ("c.nii.gz", "f.nii"):
        assert np.array_equal(np.asarray(nib.load(str(tmp_path / f)).dataobj), labels)
