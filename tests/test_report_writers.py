"""write_all: every format written, timed, and one failing writer does not lose the others."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import report_helpers as rh
from pipeline.report.json_report import build_report
from pipeline.report import writers
from pipeline.report.writers import write_all
from pipeline.study import ALL_FORMATS, Timer


def _report(case, timings):
    return build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                        timings=timings, fast=False, deidentify=False)


@pytest.mark.parametrize("parallel", [False, True])
def test_write_all_formats(tmp_path, monkeypatch, parallel):
    # many-core machines compress the NIfTI in a thread beside the SEG and SR: same files
    monkeypatch.setattr(writers, "PARALLEL_NIFTI_MIN_CPUS", 1 if parallel else 10_000)
    case = rh.dicom_case(tmp_path, "FLIPPED")
    timer = Timer()
    rep = _report(case, timer.timings)
    out = tmp_path / "out"
    write_all(out, case.volume, case.seg, case.lesions, case.recs, case.canal, rep, formats=ALL_FORMATS,
              deidentify=False, timer=timer)
    names = {p.name for p in out.iterdir()}
    assert {"lesions.csv", "segmentation.nii.gz", "seg.dcm", "sr.dcm", "report.html"} <= names
    assert {f"key_lesion{les.id}.png" for les in case.lesions} <= names
    assert "report.json" not in names  # the caller writes it
    for fmt in ("csv", "nifti", "seg", "sr", "html"):
        assert rep["timings_s"][f"write_{fmt}"] >= 0.0
    assert rep["warnings"] == []
    json.dumps(rep, allow_nan=False)
    img = nib.load(out / "segmentation.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), case.labels)
    np.testing.assert_allclose(img.affine, case.volume.geometry.affine_ras, atol=1e-4)


def test_sr_alone_brings_its_seg(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(32, 28, 12))
    rep = _report(case, {})
    write_all(tmp_path / "o", case.volume, case.seg, case.lesions, case.recs, case.canal, rep, formats=("sr",),
              deidentify=False, timer=Timer())
    assert (tmp_path / "o" / "sr.dcm").exists() and (tmp_path / "o" / "seg.dcm").exists()
    assert any("references its segments" in w for w in rep["warnings"])


def test_failing_seg_is_a_warning_and_others_are_written(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(32, 28, 12))
    case.volume.dicom.files[3].unlink()  # a source image vanished after loading: the SEG cannot be made
    rep = _report(case, {})
    out = tmp_path / "o"
    write_all(out, case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
              formats=("csv", "seg", "sr", "html"), deidentify=False, timer=Timer())
    assert not (out / "seg.dcm").exists() and not (out / "sr.dcm").exists()
    assert (out / "lesions.csv").exists() and (out / "report.html").exists()
    assert any(w.startswith("seg.dcm not written") for w in rep["warnings"])
    assert any(w.startswith("sr.dcm not written") for w in rep["warnings"])


def test_a_failing_nifti_in_its_thread_still_fails_the_study(tmp_path, monkeypatch):
    case = rh.dicom_case(tmp_path, "HFS", shape=(32, 28, 12))
    monkeypatch.setattr(writers, "PARALLEL_NIFTI_MIN_CPUS", 1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.io.nifti.write_label_nifti", broken)
    with pytest.raises(OSError, match="disk full"):
        write_all(tmp_path / "o", case.volume, case.seg, case.lesions, case.recs, case.canal, _report(case, {}),
                  formats=("nifti", "csv"), deidentify=False, timer=Timer())
