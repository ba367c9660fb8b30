"""Discovery: studies found by StudyInstanceUID whatever the folder layout; non-DICOM skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batch_helpers import make_nifti, make_study, make_zip, write_series, phantom_hu
from pipeline.batch.discover import discover_studies
from pipeline.errors import InputError


def _by_key(studies):
    return {s.key: s for s in studies}


def test_nested_layout_patient_study_series(tmp_path):
    """PATIENT/STUDY/SERIES folders; a study with two series is one study with two series."""
    root = tmp_path / "in"
    uid_a, files_a = make_study(root / "p1" / "s1" / "ser1", 1, n_slices=4)
    _, more_a = make_study(root / "p1" / "s1" / "ser2", 2, study_uid=uid_a, n_slices=3)
    uid_b, files_b = make_study(root / "p2" / "deep" / "er" / "s", 3, n_slices=5)
    studies, stats = discover_studies(root)
    by = _by_key(studies)
    assert set(by) == {uid_a, uid_b}
    assert set(by[uid_a].files) == set(files_a + more_a)
    assert len(by[uid_a].series) == 2 and sorted(s.n_files for s in by[uid_a].series) == [3, 4]
    assert by[uid_a].rel == "p1/s1"  # the deepest folder holding all its files
    assert set(by[uid_b].files) == set(files_b)
    assert stats.dicom_files == 12


def test_two_studies_mixed_in_one_folder_are_separated(tmp_path):
    root = tmp_path / "flat"
    uid_a, files_a = make_study(root, 1, n_slices=4, prefix="A")
    uid_b, files_b = make_study(root, 2, n_slices=3, prefix="B")
    # interleave by renaming to meaningless names, as PACS exports do
    for i, f in enumerate(sorted(files_a + files_b, key=lambda p: p.name[::-1])):
        f.rename(root / f"{i:08d}")
    studies, _ = discover_studies(root)
    by = _by_key(studies)
    assert set(by) == {uid_a, uid_b}
    assert len(by[uid_a].files) == 4 and len(by[uid_b].files) == 3
    assert all(f.parent == root for s in studies for f in s.files)


def test_one_study_scattered_over_folders_is_one_study(tmp_path):
    root = tmp_path / "in"
    uid, files = make_study(root / "x", 1, n_slices=6)
    for f in files[3:]:
        (root / "y" / "z").mkdir(parents=True, exist_ok=True)
        f.rename(root / "y" / "z" / f.name)
    studies, _ = discover_studies(root)
    assert [s.key for s in studies] == [uid]
    assert len(studies[0].files) == 6 and studies[0].rel == "."


def test_mixed_dicom_nifti_zip_and_junk(tmp_path):
    root = tmp_path / "in"
    uid_a, _ = make_study(root / "dicom", 1)
    uid_z, zfiles = make_study(tmp_path / "forzip", 2)
    make_zip(root / "archive" / "study.zip", zfiles)
    make_nifti(root / "nifti" / "case01.nii.gz", 3)
    make_nifti(root / "case02.nii", 4)
    (root / "notes.txt").write_text("hello")
    (root / "dicom" / "README").write_text("not dicom at all, no preamble " * 20)
    (root / "dicom" / "garbage.dcm").write_bytes(b"\x00" * 50)
    (root / ".hidden").mkdir()
    make_study(root / ".hidden", 9)  # hidden folders (temp outputs) are never studies
    (root / "DICOMDIR").write_bytes(b"\x00" * 200)
    studies, stats = discover_studies(root)
    kinds = {s.key: s.kind for s in studies}
    assert kinds == {uid_a: "dicom", uid_z: "zip", "case01": "nifti", "case02": "nifti"}
    assert stats.non_dicom_skipped >= 3


def test_duplicate_instances_are_counted_once(tmp_path):
    root = tmp_path / "in"
    uid, files = make_study(root / "a", 1, n_slices=4)
    shutil.copytree(root / "a", root / "copy_of_a")
    studies, stats = discover_studies(root)
    assert [s.key for s in studies] == [uid]
    assert len(studies[0].files) == 4 and stats.duplicate_instances == 4


def test_output_folder_inside_root_is_skipped(tmp_path):
    root = tmp_path / "in"
    uid, _ = make_study(root / "a", 1)
    make_study(root / "out" / "x", 2)
    studies, _ = discover_studies(root, exclude=[root / "out"])
    assert [s.key for s in studies] == [uid]


def test_unreadable_headers_become_a_failed_study(tmp_path):
    root = tmp_path / "in"
    uid, _ = make_study(root / "good", 1)
    _, bad = make_study(root / "bad", 2, n_slices=3)
    for f in bad:  # keep the preamble and a few bytes of the header only
        f.write_bytes(f.read_bytes()[:150])
    studies, stats = discover_studies(root)
    kinds = {s.kind for s in studies}
    assert kinds == {"dicom", "unreadable"}
    bad_study = next(s for s in studies if s.kind == "unreadable")
    assert bad_study.rel == "bad" and "cannot be read" in bad_study.error
    assert stats.unreadable_headers == 3


def test_files_without_preamble_are_read(tmp_path):
    """Old DICOM files without the 128-byte preamble are still found (no suffix, or .dcm)."""
    root = tmp_path / "in"
    uid, files = make_study(root, 1, n_slices=3)
    for f in files:
        f.write_bytes(f.read_bytes()[132:])  # drop preamble + "DICM"
        f.rename(f.with_suffix(""))
    studies, _ = discover_studies(root)
    assert [s.key for s in studies] == [uid] and len(studies[0].files) == 3


def test_missing_root_is_an_input_error(tmp_path):
    with pytest.raises(InputError):
        discover_studies(tmp_path / "nope")


def test_single_file_root(tmp_path):
    path = make_nifti(tmp_path / "one.nii.gz", 1)
    studies, _ = discover_studies(path)
    assert [(s.key, s.kind, s.rel) for s in studies] == [("one", "nifti", "one.nii.gz")]


def test_files_without_study_and_sop_uids_form_one_study_per_folder(tmp_path):
    """Real scanners write empty Study/SOP Instance UIDs (the Siemens slab): still one study per folder."""
    import numpy as np
    import pydicom

    from pipeline.batch.discover import discover_studies as discover
    from pipeline.io.dicom_write import write_ct_series
    from pipeline.types import Geometry

    geom = Geometry(shape=(16, 16, 5), spacing=(1.0, 1.0, 2.0), origin=(0, 0, 0), direction=np.eye(3))
    write_ct_series(np.zeros(geom.shape, np.int16), geom, tmp_path / "in" / "scan")
    for f in (tmp_path / "in" / "scan").iterdir():
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = ""
        ds.SOPInstanceUID = ""
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
        ds.save_as(f)
    studies, _ = discover(tmp_path / "in")
    assert [(s.kind, s.key, len(s.files)) for s in studies] == [("dicom", "scan", 5)]
