"""The CT series writer: DICOM attributes follow the project's array convention and pass dciodvfy."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from pipeline.io.dicom_write import write_ct_series, write_localizer

from io_helpers import geometry, random_hu, rotation


def test_attributes_follow_the_array_convention(tmp_path):
    g = geometry(shape=(7, 5, 4), spacing=(0.6, 1.4, 2.5), origin=(1.0, 2.0, 3.0), direction=rotation((1, 1, 0), 20))
    hu = random_hu(g.shape, 1)
    src = write_ct_series(hu, g, tmp_path, series_number=4, series_description="x", patient_position="FFS")
    for k, f in enumerate(src.files):
        ds = pydicom.dcmread(f)
        assert (ds.Rows, ds.Columns) == (5, 7)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.4, 0.6])  # row spacing first
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   np.r_[g.direction[:, 0], g.direction[:, 1]], atol=1e-8)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], g.index_to_lps([0, 0, k])[0],
                                   atol=1e-6)
        hu_k = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu_k, hu[:, :, k].T)
        assert ds.SOPInstanceUID == src.sop_instance_uids[k]
        assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.Manufacturer == "osteoplan" and ds.PatientPosition == "FFS" and ds.SeriesNumber == 4
        assert float(ds.SliceThickness) == pytest.approx(2.5)


def test_shuffled_instance_numbers_are_a_permutation(tmp_path):
    g = geometry(shape=(4, 4, 12))
    src = write_ct_series(random_hu(g.shape, 2), g, tmp_path, instance_numbers="shuffled", seed=3)
    numbers = [int(pydicom.dcmread(f).InstanceNumber) for f in src.files]
    assert sorted(numbers) == list(range(1, 13)) and numbers != sorted(numbers)


def test_bad_arguments_are_rejected(tmp_path):
    g = geometry(shape=(4, 4, 3))
    with pytest.raises(ValueError):
        write_ct_series(np.zeros((4, 4, 2)), g, tmp_path)
    with pytest.raises(ValueError):
        write_ct_series(np.full(g.shape, 40000), g, tmp_path)
    with pytest.raises(ValueError):
        write_ct_series(np.zeros(g.shape), g, tmp_path, transfer_syntax="jpeg2000")  # too small for J2K


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed")
@pytest.mark.parametrize("ts", ["explicit", "implicit", "jpeg2000"])
def test_dciodvfy_is_clean(tmp_path, ts):
    g = geometry(shape=(40, 36, 2))
    src = write_ct_series(random_hu(g.shape, 3), g, tmp_path, transfer_syntax=ts)
    loc = write_localizer(tmp_path, src.study_instance_uid, src.frame_of_reference_uid)
    for f in (src.files[0], loc):
        r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        assert "Error" not in out, out
        assert "CTImage" in out
