"""Bad and awkward input: junk files, gaps, duplicates, tilt, size limits -- one clear error or a warning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.errors import InputError, NoCTSeriesError
from pipeline.io.dicom_write import write_ct_series
from pipeline.io.load import load_input
from pipeline.types import Geometry

from io_helpers import assert_same_patient_content, geometry, random_hu, write_mr_series


def _linear_hu(geom: Geometry) -> tuple[np.ndarray, callable]:
    """HU = a linear function of LPS position, so interpolation can be checked exactly."""
    coef = np.array([3.0, -2.0, 5.0])

    def f(lps: np.ndarray) -> np.ndarray:
        return lps @ coef

    idx = np.indices(geom.shape).reshape(3, -1).T
    hu = np.rint(f(geom.index_to_lps(idx))).reshape(geom.shape).astype(np.int16)
    return hu, f


def test_missing_path():
    with pytest.raises(InputError, match="does not exist"):
        load_input(Path("/nonexistent/osteoplan/input"))


def test_empty_folder(tmp_path):
    with pytest.raises(NoCTSeriesError, match="0 files"):
        load_input(tmp_path)


def test_only_non_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(NoCTSeriesError, match="3 files") as info:
        load_input(tmp_path)
    assert "2 non-DICOM files" in str(info.value) and "1 empty files" in str(info.value)


def test_junk_among_a_good_series_is_skipped_with_a_warning(tmp_path):
    g = geometry(shape=(8, 7, 5))
    hu = random_hu(g.shape, 1)
    src = write_ct_series(hu, g, tmp_path / "s")
    (tmp_path / "s" / "DOE_JOHN.txt").write_text("not dicom")
    (tmp_path / "s" / "zero").write_bytes(b"")
    data = src.files[2].read_bytes()
    (tmp_path / "s" / "cut.dcm").write_bytes(data[: len(data) - 40])  # truncated copy of slice 2
    (tmp_path / "s" / "head_only.dcm").write_bytes(data[:300])
    vol = load_input(tmp_path / "s")
    assert_same_patient_content(vol, hu, g)
    assert len(vol.warnings) == 1
    w = vol.warnings[0]
    assert "4 file(s) skipped" in w and "truncated" in w and "non-DICOM" in w and "empty" in w
    assert "DOE" not in w


def test_single_slice_is_refused(tmp_path):
    g = geometry(shape=(8, 7, 1))
    write_ct_series(random_hu(g.shape, 1), g, tmp_path)
    with pytest.raises(InputError, match="only 1 slice position"):
        load_input(tmp_path)


def test_two_slices_are_refused(tmp_path):
    g = geometry(shape=(8, 7, 2))
    write_ct_series(random_hu(g.shape, 1), g, tmp_path)
    with pytest.raises(InputError, match="at least 3"):
        load_input(tmp_path)


def test_one_missing_slice_is_filled_with_a_warning(tmp_path):
    g = geometry(shape=(6, 5, 8), spacing=(1.0, 1.0, 2.0))
    hu, _ = _linear_hu(g)
    src = write_ct_series(hu, g, tmp_path)
    src.files[4].unlink()
    vol = load_input(tmp_path)
    assert vol.geometry.shape == g.shape and np.allclose(vol.geometry.spacing, g.spacing)
    assert any("1 missing slice(s) filled" in w for w in vol.warnings)
    assert vol.selection["chosen"]["resampled"] == "missing slices filled"
    keep = [k for k in range(8) if k != 4]
    np.testing.assert_array_equal(vol.array[:, :, keep], hu[:, :, keep])
    expected = np.rint((hu[:, :, 3].astype(float) + hu[:, :, 5]) / 2)
    np.testing.assert_allclose(vol.array[:, :, 4], expected, atol=1)
    assert len(vol.dicom.files) == 7  # source images, not one per k


def test_three_missing_slices_are_refused(tmp_path):
    g = geometry(shape=(6, 5, 9), spacing=(1.0, 1.0, 2.0))
    src = write_ct_series(random_hu(g.shape, 2), g, tmp_path)
    for k in (3, 4, 5):
        src.files[k].unlink()
    with pytest.raises(InputError, match=r"gap of 8\.0 mm"):
        load_input(tmp_path)


def test_uneven_spacing_is_resampled(tmp_path):
    g = geometry(shape=(5, 4, 7), spacing=(1.0, 1.0, 1.0))
    hu, f = _linear_hu(g)
    src = write_ct_series(hu, g, tmp_path)
    for k, dz in ((3, 0.4), (5, -0.3)):  # move two slices off the regular grid
        ds = pydicom.dcmread(src.files[k])
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + dz]
        stored = (np.rint(f(g.index_to_lps(np.indices(g.shape[:2] + (1,)).reshape(3, -1).T * [1, 1, 0])
                             + np.array([0, 0, k + dz]))) + 1024).reshape(g.shape[0], g.shape[1])
        ds.PixelData = stored.T.astype("<i2").tobytes()
        ds.save_as(src.files[k])
    vol = load_input(tmp_path)
    assert any("uneven slice spacing" in w for w in vol.warnings)
    assert vol.geometry.shape[2] == 7
    idx = np.indices(vol.geometry.shape).reshape(3, -1).T
    want = f(vol.geometry.index_to_lps(idx)).reshape(vol.geometry.shape)
    assert np.abs(vol.array - want).max() <= 1.0


def test_identical_duplicate_slices_are_dropped(tmp_path):
    g = geometry(shape=(6, 5, 5))
    hu = random_hu(g.shape, 3)
    src = write_ct_series(hu, g, tmp_path)
    shutil.copy(src.files[2], tmp_path / "copy_of_slice.dcm")
    vol = load_input(tmp_path)
    assert_same_patient_content(vol, hu, g)
    assert any("1 duplicate slice(s)" in w for w in vol.warnings)


def _second_acquisition(tmp: Path, g: Geometry, src, ks, acq: int, seed: int) -> None:
    other = random_hu(g.shape, seed)
    extra = write_ct_series(other, g, tmp / f"acq{acq}", series_uid=src.series_instance_uid,
                            study_uid=src.study_instance_uid, frame_of_reference_uid=src.frame_of_reference_uid)
    for k, f in enumerate(extra.files):
        if k in ks:
            ds = pydicom.dcmread(f)
            ds.AcquisitionNumber = acq
            ds.save_as(f)
        else:
            f.unlink()


def test_conflicting_duplicates_keep_the_larger_acquisition(tmp_path):
    g = geometry(shape=(6, 5, 6))
    hu = random_hu(g.shape, 4)
    src = write_ct_series(hu, g, tmp_path / "main")  # AcquisitionNumber 1
    _second_acquisition(tmp_path, g, src, {1, 2}, acq=2, seed=9)
    vol = load_input(tmp_path)
    assert_same_patient_content(vol, hu, g)
    assert any("kept acquisition 1" in w for w in vol.warnings)


def test_conflicting_duplicates_without_acquisition_numbers_are_refused(tmp_path):
    g = geometry(shape=(6, 5, 6))
    src = write_ct_series(random_hu(g.shape, 4), g, tmp_path / "main")
    _second_acquisition(tmp_path, g, src, {1, 2}, acq=1, seed=9)
    with pytest.raises(InputError, match="different images at 2 slice position"):
        load_input(tmp_path)


@pytest.mark.parametrize("tilt_deg", [12.0, -18.5])
def test_gantry_tilt_is_corrected_onto_an_orthogonal_grid(tmp_path, tilt_deg):
    t = np.radians(tilt_deg)
    # rows along +L, columns tilted in the y-z plane, slices stacked straight along +S (sheared stack)
    direction = np.array([[1.0, 0, 0], [0, np.cos(t), 0], [0, -np.sin(t), 1.0]])
    g = Geometry(shape=(12, 16, 9), spacing=(1.0, 1.0, 2.0), origin=(0, 0, 0), direction=direction)
    hu, f = _linear_hu(g)
    write_ct_series(hu, g, tmp_path)
    vol = load_input(tmp_path)
    assert any(f"gantry tilt of {abs(tilt_deg):.1f} degrees corrected" in w for w in vol.warnings)
    d = vol.geometry.direction
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
    idx = np.indices(vol.geometry.shape).reshape(3, -1).T
    want = f(vol.geometry.index_to_lps(idx)).reshape(vol.geometry.shape)
    inside = vol.array != -1024
    assert inside.mean() > 0.6
    assert np.abs(vol.array[inside] - want[inside]).max() <= 1.0
    assert np.allclose(vol.geometry.spacing[2], 2.0 * np.cos(t), atol=1e-3)


def test_too_large_is_refused_with_size_and_limit(tmp_path):
    g = geometry(shape=(10, 10, 5))
    write_ct_series(random_hu(g.shape, 1), g, tmp_path)
    with pytest.raises(InputError, match=r"10 x 10 x 5 = 500 voxels exceeds the limit of 400"):
        load_input(tmp_path, max_voxels=400)


def test_non_orthogonal_orientation_is_refused(tmp_path):
    g = geometry(shape=(6, 5, 4))
    src = write_ct_series(random_hu(g.shape, 1), g, tmp_path)
    for f in src.files:
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0.5, 0.866, 0]
        ds.save_as(f)
    with pytest.raises(InputError, match="not orthogonal"):
        load_input(tmp_path)


def test_undecodable_slice_counts_as_missing(tmp_path):
    g = geometry(shape=(40, 36, 6), spacing=(1, 1, 1.0))
    hu, _ = _linear_hu(g)
    src = write_ct_series(hu, g, tmp_path, transfer_syntax="jpeg2000")
    data = bytearray(src.files[3].read_bytes())
    soc = data.index(b"\xff\x4f\xff\x51")  # start of the JPEG 2000 code stream
    data[soc: soc + 4] = b"\0\0\0\0"  # the header pass cannot see this; the decoder must fail
    src.files[3].write_bytes(bytes(data))
    vol = load_input(tmp_path)
    assert vol.geometry.shape == g.shape
    assert any("could not be decoded" in w for w in vol.warnings)
    assert any("missing slice" in w for w in vol.warnings)


def test_series_without_uids_still_loads(tmp_path):
    g = geometry(shape=(6, 5, 4))
    hu = random_hu(g.shape, 1)
    src = write_ct_series(hu, g, tmp_path)
    for f in src.files:  # badly anonymised export: UIDs blanked
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.SOPInstanceUID = ""
        ds.save_as(f)
    vol = load_input(tmp_path)
    assert_same_patient_content(vol, hu, g)
    assert vol.dicom.series_instance_uid == ""


def test_two_series_mixed_in_one_folder_with_same_positions(tmp_path):
    g = geometry(shape=(6, 5, 4))
    hu1, hu2 = random_hu(g.shape, 1), random_hu(g.shape, 2)
    a = write_ct_series(hu1, g, tmp_path, series_description="one", file_names="random", seed=1)
    write_ct_series(hu2, g, tmp_path, series_description="two", study_uid=a.study_instance_uid,
                    file_names="random", seed=2)
    vol = load_input(tmp_path, series_uid=a.series_instance_uid)
    assert_same_patient_content(vol, hu1, g)
    assert vol.selection["passed_over"][0]["reason"] == "not the requested series"


def test_only_broken_dicom_is_an_input_error(tmp_path):
    g = geometry(shape=(8, 7, 4))
    src = write_ct_series(random_hu(g.shape, 1), g, tmp_path / "s")
    for f in src.files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2 + 200])
    with pytest.raises(InputError, match="cannot be read.*4 truncated files"):
        load_input(tmp_path / "s")


def test_mr_with_a_broken_file_is_still_no_ct(tmp_path):
    src = write_mr_series(tmp_path)
    data = src.files[0].read_bytes()
    src.files[0].write_bytes(data[:-30])
    with pytest.raises(NoCTSeriesError, match="3 MR images"):
        load_input(tmp_path)
