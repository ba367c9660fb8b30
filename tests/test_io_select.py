"""Series selection: localizers, several CT series, forced series, MR only, nested folders, zip input."""

from __future__ import annotations

import gc
import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.errors import InputError, NoCTSeriesError
from pipeline.io.dicom_write import write_ct_series, write_localizer
from pipeline.io.load import load_dicom_files, load_input
from pipeline.io.discover import list_files

from io_helpers import assert_same_patient_content, geometry, random_hu, rotation, write_enhanced_ct, write_mr_series


def _study(tmp: Path, thick=2.0, thin=1.0):
    """One study: a localizer, a thick and a thin axial CT series, each in its own sub-folder."""
    study, for_uid = generate_uid(), generate_uid()
    g_thick = geometry(shape=(10, 8, 5), spacing=(0.9, 0.9, thick))
    g_thin = geometry(shape=(10, 8, 9), spacing=(0.9, 0.9, thin))
    hu_thick, hu_thin = random_hu(g_thick.shape, 1), random_hu(g_thin.shape, 2)
    a = write_ct_series(hu_thick, g_thick, tmp / "a" / "deep" / "er", study_uid=study,
                        frame_of_reference_uid=for_uid, series_number=2, series_description="thick")
    b = write_ct_series(hu_thin, g_thin, tmp / "b", study_uid=study, frame_of_reference_uid=for_uid,
                        series_number=3, series_description="thin", file_names="random", seed=5)
    loc = write_localizer(tmp / "c", study, for_uid)
    return (a, hu_thick, g_thick), (b, hu_thin, g_thin), loc


def test_thinnest_series_wins_and_others_are_listed(tmp_path):
    (a, _, _), (b, hu_thin, g_thin), _ = _study(tmp_path)
    vol = load_input(tmp_path)
    chosen = vol.selection["chosen"]
    assert chosen["series_instance_uid"] == b.series_instance_uid
    assert chosen["n_slices"] == 9 and chosen["slice_spacing_mm"] == pytest.approx(1.0)
    assert chosen["series_description"] == "thin" and chosen["series_number"] == 3
    reasons = {p["series_instance_uid"]: p for p in vol.selection["passed_over"]}
    assert "thicker slices" in reasons[a.series_instance_uid]["reason"]
    loc = [p for p in vol.selection["passed_over"] if "localizer" in p["reason"]]
    assert len(loc) == 1 and loc[0]["modality"] == "CT" and loc[0]["n_files"] == 1
    assert_same_patient_content(vol, hu_thin, g_thin)
    assert vol.dicom.study_instance_uid == b.study_instance_uid
    assert vol.dicom.frame_of_reference_uid == b.frame_of_reference_uid


def test_series_uid_forces_the_other_series(tmp_path):
    (a, hu_thick, g_thick), (b, _, _), _ = _study(tmp_path)
    vol = load_input(tmp_path, series_uid=a.series_instance_uid)
    assert vol.selection["chosen"]["series_instance_uid"] == a.series_instance_uid
    assert vol.selection["chosen"]["reason"] == "requested series"
    assert_same_patient_content(vol, hu_thick, g_thick)
    with pytest.raises(InputError, match="not found"):
        load_input(tmp_path, series_uid="1.2.3.4.5")


def test_forcing_the_localizer_is_refused(tmp_path):
    _, _, loc = _study(tmp_path)
    uid = pydicom.dcmread(loc).SeriesInstanceUID
    with pytest.raises(InputError):
        load_input(tmp_path, series_uid=uid)


def test_equal_slices_tie_breaks_on_slice_count(tmp_path):
    g1 = geometry(shape=(6, 6, 4), spacing=(1, 1, 1.5))
    g2 = geometry(shape=(6, 6, 7), spacing=(1, 1, 1.5), origin=(0, 0, 100))
    write_ct_series(random_hu(g1.shape, 1), g1, tmp_path / "x")
    b = write_ct_series(random_hu(g2.shape, 2), g2, tmp_path / "y")
    vol = load_input(tmp_path)
    assert vol.selection["chosen"]["series_instance_uid"] == b.series_instance_uid
    assert "fewer slices" in vol.selection["passed_over"][0]["reason"]


def test_axial_preferred_over_thinner_sagittal(tmp_path):
    sag = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
    g_ax = geometry(shape=(6, 6, 5), spacing=(1, 1, 3.0))
    g_sag = geometry(shape=(6, 6, 8), spacing=(1, 1, 0.5), direction=sag)
    a = write_ct_series(random_hu(g_ax.shape, 1), g_ax, tmp_path / "ax")
    write_ct_series(random_hu(g_sag.shape, 2), g_sag, tmp_path / "sag")
    vol = load_input(tmp_path)
    assert vol.selection["chosen"]["series_instance_uid"] == a.series_instance_uid
    assert "sagittal acquisition" in vol.selection["passed_over"][0]["reason"]


def test_sagittal_only_is_accepted(tmp_path):
    sag = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])
    g = geometry(shape=(6, 7, 5), spacing=(1, 1, 2.0), direction=sag)
    hu = random_hu(g.shape, 3)
    write_ct_series(hu, g, tmp_path)
    vol = load_input(tmp_path)
    assert vol.selection["chosen"]["orientation"] == "sagittal"
    assert_same_patient_content(vol, hu, g)


def test_mr_only_is_no_ct(tmp_path):
    write_mr_series(tmp_path)
    with pytest.raises(NoCTSeriesError, match="4 MR images"):
        load_input(tmp_path)


def test_only_localizer_is_no_ct(tmp_path):
    write_localizer(tmp_path, generate_uid(), generate_uid())
    with pytest.raises(NoCTSeriesError, match="localizer"):
        load_input(tmp_path)


def test_mixed_localizer_and_axial_in_one_series(tmp_path):
    g = geometry(shape=(8, 8, 4))
    hu = random_hu(g.shape, 4)
    src = write_ct_series(hu, g, tmp_path)
    write_localizer(tmp_path, src.study_instance_uid, src.frame_of_reference_uid,
                    series_uid=src.series_instance_uid)
    vol = load_input(tmp_path)
    assert_same_patient_content(vol, hu, g)
    assert vol.selection["passed_over"][0]["reason"] == "localizer/scout image"


def test_explicit_file_list(tmp_path):
    (a, hu_thick, g_thick), _, _ = _study(tmp_path)
    vol = load_dicom_files(list(a.files))
    assert_same_patient_content(vol, hu_thick, g_thick)
    assert vol.selection["passed_over"] == []


def test_single_dicom_file_input_is_refused_cleanly(tmp_path):
    g = geometry(shape=(6, 6, 3))
    src = write_ct_series(random_hu(g.shape, 1), g, tmp_path)
    with pytest.raises(InputError, match="only 1 slice"):
        load_input(src.files[0])


def test_enhanced_multiframe_ct_loads(tmp_path):
    g = geometry(shape=(9, 7, 6), spacing=(0.6, 0.7, 1.25), direction=rotation((0, 0, 1), 90))
    hu = random_hu(g.shape, 5)
    write_enhanced_ct(tmp_path / "e.dcm", hu, g, per_frame_rescale=True)
    vol = load_input(tmp_path / "e.dcm")
    assert_same_patient_content(vol, hu, g)
    assert len(vol.dicom.files) == 1 and len(vol.dicom.sop_instance_uids) == 1


def _zip_dir(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in list_files(src):
            zf.write(f, "export/" + str(f.relative_to(src)))
    return dest


def test_zip_input(tmp_path):
    _, (b, hu_thin, g_thin), _ = _study(tmp_path / "study")
    z = _zip_dir(tmp_path / "study", tmp_path / "study.zip")
    vol = load_input(z)
    assert vol.input_kind == "zip" and vol.input_path == str(z)
    assert_same_patient_content(vol, hu_thin, g_thin)
    files = list(vol.dicom.files)
    assert all(f.exists() for f in files), "extracted files must live as long as the volume"
    del vol
    gc.collect()
    assert not any(f.exists() for f in files), "the temporary folder is removed with the volume"


def test_zip_slip_is_refused(tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/a.txt", "x")
        zf.writestr("../../outside.dcm", "x")
    with pytest.raises(InputError, match="unsafe"):
        load_input(z)
    assert not (tmp_path.parent / "outside.dcm").exists()


def test_zip_bomb_is_refused(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (8 << 20))
    with pytest.raises(InputError, match="zip bomb"):
        load_input(z)
    with pytest.raises(InputError, match="expand"):
        load_input(z, max_voxels=1000)


def test_corrupt_zip_is_refused(tmp_path):
    z = tmp_path / "bad.zip"
    z.write_bytes(b"PK\x03\x04" + b"garbage" * 10)
    with pytest.raises(InputError):
        load_input(z)


def test_zip_of_an_unsupported_version_is_refused(tmp_path):
    """Found by the fuzzer: zipfile raises NotImplementedError for a central directory entry
    that needs a newer zip version ("zip file version 8.4")."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.dcm", b"x" * 100)
    data = bytearray(buf.getvalue())
    cd = data.index(b"PK\x01\x02")
    data[cd + 6:cd + 8] = (84).to_bytes(2, "little")  # version needed to extract: 8.4
    z = tmp_path / "new.zip"
    z.write_bytes(bytes(data))
    with pytest.raises(InputError, match="cannot be read"):
        load_input(z)


def test_zip_with_no_dicom_is_no_ct(tmp_path):
    z = tmp_path / "notes.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    z.write_bytes(buf.getvalue())
    with pytest.raises(NoCTSeriesError):
        load_input(z)
