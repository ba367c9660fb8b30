"""Geometry round trips: written DICOM/NIfTI must read back with every HU at the same LPS position."""

from __future__ import annotations

import numpy as np
import nibabel as nib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.io.dicom_write import write_ct_series
from pipeline.io.geometry import plan_spacing, slice_axes
from pipeline.io.load import load_input
from pipeline.io.nifti import read_nifti, write_label_nifti, write_volume_nifti
from pipeline.types import Geometry

from io_helpers import assert_same_patient_content, geometry, random_hu, rotation

# direction columns = LPS unit vectors of array axes i, j, k
ORIENTATIONS = {
    "hfs": np.eye(3),
    "flipped_cols": np.diag([-1.0, 1.0, 1.0]),  # i runs right-to-left: k against the row x col normal
    "flipped_rows": np.diag([1.0, -1.0, 1.0]),
    "ffs": np.diag([-1.0, 1.0, -1.0]),  # feet first supine: rows flipped, slices run towards the feet
    "hfp": np.diag([-1.0, -1.0, 1.0]),  # head first prone: rows and columns reversed
    "left_handed_k": np.diag([1.0, 1.0, -1.0]),
    "oblique": rotation((1, 2, 3), 27.0),
    "sagittal": np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]),
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_round_trip(tmp_path, name):
    geom = geometry(shape=(11, 9, 5), spacing=(0.7, 1.3, 2.5), origin=(-20.5, 7.25, 101.0),
                    direction=ORIENTATIONS[name])
    hu = random_hu(geom.shape, seed=1)
    write_ct_series(hu, geom, tmp_path / "s", file_names="random", instance_numbers="shuffled", seed=3)
    vol = load_input(tmp_path / "s")
    assert vol.array.dtype == np.int16
    assert_same_patient_content(vol, hu, geom)
    # the k axis is the slice normal, so the direction matrix is orthonormal and right-handed
    assert np.allclose(vol.geometry.direction.T @ vol.geometry.direction, np.eye(3), atol=1e-6)
    assert np.linalg.det(vol.geometry.direction) > 0
    assert vol.warnings == []


def test_anisotropic_spacing_read_from_positions_not_thickness(tmp_path):
    geom = geometry(shape=(8, 6, 7), spacing=(0.5, 1.7, 3.3))
    hu = random_hu(geom.shape, seed=2)
    src = write_ct_series(hu, geom, tmp_path / "s")
    import pydicom

    for f in src.files:  # a wrong SliceThickness must not matter
        ds = pydicom.dcmread(f)
        ds.SliceThickness = "9.9"
        ds.SpacingBetweenSlices = "9.9"
        ds.save_as(f)
    vol = load_input(tmp_path / "s")
    assert np.allclose(vol.geometry.spacing, (0.5, 1.7, 3.3), atol=1e-6)
    assert_same_patient_content(vol, hu, geom)


def test_shuffled_names_and_instance_numbers_do_not_drive_the_order(tmp_path):
    geom = geometry(shape=(6, 5, 9))
    hu = random_hu(geom.shape, seed=4)
    src = write_ct_series(hu, geom, tmp_path / "s", file_names="random", instance_numbers="shuffled", seed=11)
    names = [f.name for f in src.files]
    assert names != sorted(names), "test set-up: names must not sort in k order"
    vol = load_input(tmp_path / "s")
    assert_same_patient_content(vol, hu, geom)
    assert [str(p) for p in vol.dicom.files] == [str(p) for p in src.files]
    assert vol.dicom.sop_instance_uids == src.sop_instance_uids


@pytest.mark.parametrize("ts", ["implicit", "rle", "jpeg2000"])
def test_transfer_syntaxes_decode_exactly(tmp_path, ts):
    geom = geometry(shape=(40, 34, 3))
    hu = random_hu(geom.shape, seed=5)
    write_ct_series(hu, geom, tmp_path / "s", transfer_syntax=ts)
    assert_same_patient_content(load_input(tmp_path / "s"), hu, geom)


def test_non_integral_rescale_gives_float32(tmp_path):
    geom = geometry(shape=(6, 5, 4))
    hu = random_hu(geom.shape, seed=6).astype(np.float32) / 2.0
    write_ct_series(hu, geom, tmp_path / "s", rescale_slope=0.5, rescale_intercept=-1024)
    vol = load_input(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert_same_patient_content(vol, hu, geom)


def test_values_beyond_int16_after_rescale_give_float32(tmp_path):
    geom = geometry(shape=(6, 5, 3))
    hu = random_hu(geom.shape, seed=7).astype(np.int32) * 8
    hu[0, 0, 1] = 60000
    write_ct_series(hu, geom, tmp_path / "s", rescale_slope=8, rescale_intercept=0)
    vol = load_input(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert_same_patient_content(vol, hu, geom)


@st.composite
def _geometries(draw):
    q = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4).filter(
        lambda v: np.linalg.norm(v) > 0.2))
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    rot = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
    if draw(st.booleans()):
        rot = rot @ np.diag([1.0, 1.0, -1.0])
    spacing = tuple(draw(st.sampled_from([0.4, 0.75, 1.0, 1.6, 3.0])) for _ in range(3))
    shape = tuple(draw(st.integers(3, 7)) for _ in range(3))
    origin = tuple(draw(st.floats(-300, 300, allow_nan=False)) for _ in range(3))
    return Geometry(shape=shape, spacing=spacing, origin=origin, direction=rot)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geom=_geometries(), seed=st.integers(0, 1000))
def test_property_random_orientations_round_trip(tmp_path_factory, geom, seed):
    out = tmp_path_factory.mktemp("prop")
    hu = random_hu(geom.shape, seed=seed)
    write_ct_series(hu, geom, out, file_names="random", instance_numbers="shuffled", seed=seed)
    vol = load_input(out)
    assert_same_patient_content(vol, hu, geom)


def test_nifti_round_trip_keeps_lps_geometry(tmp_path):
    geom = geometry(shape=(7, 6, 5), spacing=(0.8, 1.1, 2.2), origin=(12.0, -30.0, 55.0),
                    direction=rotation((0.2, 1, 0.4), 33.0))
    labels = (random_hu(geom.shape, seed=8) % 4).astype(np.uint8)
    write_label_nifti(labels, geom, tmp_path / "seg.nii.gz")
    back = read_nifti(tmp_path / "seg.nii.gz")
    assert back.geometry.same_grid(geom)
    np.testing.assert_array_equal(back.array, labels)
    img = nib.load(str(tmp_path / "seg.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    # a known voxel: nibabel's RAS position is our LPS position with x and y negated
    ijk = np.array([3, 2, 4])
    ras = img.affine @ np.append(ijk, 1.0)
    lps = geom.index_to_lps(ijk)[0]
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-4)
    with open(tmp_path / "seg.nii.gz", "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"  # gzip


def test_nifti_volume_from_dicom_round_trip(tmp_path):
    geom = geometry(shape=(9, 8, 4), direction=ORIENTATIONS["ffs"])
    hu = random_hu(geom.shape, seed=9)
    write_ct_series(hu, geom, tmp_path / "s")
    vol = load_input(tmp_path / "s")
    write_volume_nifti(vol, tmp_path / "ct.nii.gz")
    back = load_input(tmp_path / "ct.nii.gz")
    assert back.input_kind == "nifti"
    assert back.geometry.same_grid(vol.geometry)
    assert_same_patient_content(back, hu, geom)


def test_nifti_pir_orientation_is_not_reoriented(tmp_path):
    # P-I-R: i runs posterior, j inferior, k right (RAS affine columns)
    affine = np.array([[0, 0, -1.5, 10], [-1.5, 0, 0, 20], [0, -1.5, 0, 30], [0, 0, 0, 1.0]])
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "pir.nii.gz"))
    vol = read_nifti(tmp_path / "pir.nii.gz")
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.geometry.affine_ras, affine, atol=1e-6)
    np.testing.assert_allclose(vol.geometry.direction[:, 0], [0, 1, 0], atol=1e-9)  # +P in LPS


def test_plan_spacing_classifies_steps():
    assert plan_spacing(np.arange(5) * 2.0).kind == "uniform"
    p = plan_spacing(np.array([0, 2, 4, 8, 10, 12.0]))
    assert p.kind == "missing" and p.n_out == 7 and p.missing == 1
    p = plan_spacing(np.array([0, 2, 4, 6, 14, 16, 18.0]))
    assert p.kind == "gap" and not p.fillable
    p = plan_spacing(np.array([0, 2, 4, 6, 7.1, 10, 12, 14]))
    assert p.kind == "uneven" and p.fillable


def test_slice_axes_rejects_non_orthogonal_vectors():
    with pytest.raises(ValueError):
        slice_axes(np.array([1, 0, 0]), np.array([0.3, 1, 0]))
    axes = slice_axes(np.array([1, 0, 0]), np.array([0.001, 1, 0]))
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-12)
