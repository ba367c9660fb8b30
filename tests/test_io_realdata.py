"""Real CT from public repositories (../shared/data/real): geometry, decoding and clean refusals."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pydicom
import pytest

from pipeline.errors import InputError, OsteoplanError
from pipeline.io.load import load_input

from io_helpers import REAL

pytestmark = pytest.mark.realdata


def _need(rel: str):
    path = REAL / rel
    if not path.exists():
        pytest.skip(f"real test data absent: {path} (see ../shared/data/README.md)")
    return path


def _check_against_pydicom(vol, n_check: int = 3) -> None:
    """Slices decoded by our fast path equal pydicom's pixel_array * slope + intercept."""
    for k in np.linspace(0, vol.geometry.shape[2] - 1, n_check).astype(int):
        ds = pydicom.dcmread(vol.dicom.files[k])
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[:, :, k], hu.T)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(vol.geometry.index_to_lps([0, 0, k])[0], ipp, atol=1e-3)


def test_dicom_slab_jpeg2000_matches_totalsegmentator_grid():
    vol = load_input(_need("totalseg_example/dicom_slab"))
    seg = nib.load(str(_need("totalseg_example/dicom_slab_seg_total.nii.gz")))
    assert vol.geometry.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-5)
    assert vol.array.dtype == np.int16
    _check_against_pydicom(vol)
    # same LPS grid as the NIfTI label map: the sets of voxel-centre corners coincide
    assert seg.shape[:3] == vol.geometry.shape
    corners = np.array([[i, j, k] for i in (0, 511) for j in (0, 511) for k in (0, 19)], dtype=float)
    ours = vol.geometry.index_to_lps(corners)
    theirs = (seg.affine @ np.c_[corners, np.ones(8)].T).T[:, :3] * np.array([-1, -1, 1])
    d = np.linalg.norm(ours[:, None, :] - theirs[None, :, :], axis=2)
    assert d.min(axis=1).max() < 0.01, "the DICOM grid and the NIfTI grid differ"


def test_chest_ct_philips_loads_141_slices():
    vol = load_input(_need("chest_ct_philips/dicom"))
    assert vol.geometry.shape == (512, 512, 141)
    np.testing.assert_allclose(vol.geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-5)
    assert vol.array.dtype == np.int16 and vol.array.nbytes == 512 * 512 * 141 * 2
    assert vol.warnings == []
    _check_against_pydicom(vol)
    assert -1100 < vol.array.min() and vol.array.max() < 4000


def test_gantry_tilt_is_corrected():
    vol = load_input(_need("robustness/gantry_tilt_head_ct"))
    assert any("gantry tilt of 18.5 degrees corrected" in w for w in vol.warnings)
    d = vol.geometry.direction
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
    # the volume's k axis is the slice normal of the tilted acquisition
    ds = pydicom.dcmread(sorted(_need("robustness/gantry_tilt_head_ct").iterdir())[0], stop_before_pixels=True)
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    np.testing.assert_allclose(d[:, 2], np.cross(iop[:3], iop[3:]), atol=1e-6)
    assert vol.selection["chosen"]["resampled"]
    # head CT: brain tissue (0..80 HU) present, values plausible
    assert ((vol.array > 0) & (vol.array < 80)).sum() > 100_000


def test_enhanced_ct_with_two_frames_is_refused_cleanly():
    with pytest.raises(InputError, match="only 2 slice positions"):
        load_input(_need("robustness/eCT_Supplemental.dcm"))


def test_lone_acr_nema_slice_is_refused_cleanly():
    with pytest.raises(InputError):
        load_input(_need("robustness/CT-MONO2-12-lomb-an2.dcm"))


def test_dcmqi_three_slices_load():
    vol = load_input(_need("dcmqi_3slice/ct-3slice"))
    assert vol.geometry.shape == (512, 512, 3)
    np.testing.assert_allclose(vol.geometry.spacing[2], 1.0, atol=1e-4)
    _check_against_pydicom(vol)


def test_dcmqi_seg_object_is_not_ct():
    with pytest.raises(OsteoplanError) as info:
        load_input(_need("dcmqi_3slice/liver.dcm"))
    assert info.value.exit_code == 3


def test_whole_totalseg_folder_skips_the_nifti_files():
    vol = load_input(_need("totalseg_example"))
    assert vol.geometry.shape == (512, 512, 20)
    assert any("non-DICOM" in w for w in vol.warnings)


@pytest.mark.parametrize("rel", ["totalseg_example/ct.nii.gz", "tptbox_lumbar/sub-ct_label-22_ct.nii.gz",
                                 "blds_lesion_patches/1.nii.gz", "blds_lesion_patches/7.nii.gz"])
def test_real_nifti_geometry_matches_nibabel(rel):
    path = _need(rel)
    vol = load_input(path)
    img = nib.load(str(path))
    assert vol.input_kind == "nifti" and vol.dicom is None
    np.testing.assert_allclose(vol.geometry.affine_ras, img.affine, atol=1e-4)
    np.testing.assert_allclose(vol.array, np.asanyarray(img.dataobj).reshape(vol.geometry.shape), atol=0.5)
    assert vol.array.dtype in (np.int16, np.float32)


def test_tptbox_is_pir():
    vol = load_input(_need("tptbox_lumbar/sub-ct_label-22_ct.nii.gz"))
    axes = "".join("LPS"[int(np.argmax(np.abs(c)))] if c[int(np.argmax(np.abs(c)))] > 0 else "RAI"[int(np.argmax(np.abs(c)))]
                   for c in vol.geometry.direction.T)
    assert axes == "PIR"
