"""report.json and lesions.csv: fields, rounding, de-identification, JSON-serialisability."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import report_helpers as rh
from pipeline import DISCLAIMER
from pipeline.logs import anon
from pipeline.report.csv_out import CSV_COLUMNS, lesion_rows
from pipeline.report.json_report import build_report, to_jsonable
from pipeline.report.writers import write_all
from pipeline.study import Timer
from pipeline.types import DicomSource

LESION_KEYS = {"id", "volume_ml", "max_diameter_mm", "mean_hu", "type", "location", "bone_reference_hu",
               "centroid_lps_mm", "min_distance_to_canal_mm", "distance_uncertainty_mm",
               "closest_point_lesion_lps_mm", "closest_point_canal_lps_mm", "canal_contact", "solitary",
               "recommendation"}


def _dicom_like_case():
    case = rh.nifti_like_case("FFS")
    case.volume.dicom = DicomSource(study_instance_uid="1.2.3.4.5", series_instance_uid="1.2.3.4.6",
                                    frame_of_reference_uid="1.2.3.4.7", sop_instance_uids=["1.2.3.4.8"],
                                    files=[Path("/secret/site/Doe_John/IM0001.dcm")], series_description="BONE 1.0",
                                    series_number=3)
    case.volume.input_path = "/secret/site/Doe_John"
    case.volume.input_kind = "dicom"
    case.volume.selection = {"series_instance_uid": "1.2.3.4.6", "reason": "largest axial CT",
                             "chosen": {"series_description": "Doe John thorax"},
                             "passed_over": [{"series_instance_uid": "1.2.3.9", "why": "localizer"}],
                             "path": "/secret/site/Doe_John"}
    case.volume.warnings.append("slice spacing irregular (max deviation 0.02 mm)")
    return case


def _report(case, deidentify=False, timings=None):
    return build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                        timings={} if timings is None else timings, fast=True, deidentify=deidentify)


def test_report_has_contract_fields_and_is_plain_json():
    case = _dicom_like_case()
    timings = {"load": 0.5}
    rep = _report(case, timings=timings)
    text = json.dumps(rep, allow_nan=False)  # plain types only, no NaN
    assert json.loads(text)["schema_version"] == "1.0"
    assert rep["timings_s"] is timings  # the caller keeps adding stages
    timings["write"] = 1.0
    assert rep["timings_s"]["write"] == 1.0
    assert rep["disclaimer"] == DISCLAIMER
    assert rep["input"] == {"path": "/secret/site/Doe_John", "kind": "dicom"}
    s = rep["series"]
    assert s["study_instance_uid"] == "1.2.3.4.5" and s["series_instance_uid"] == "1.2.3.4.6"
    assert s["frame_of_reference_uid"] == "1.2.3.4.7"
    assert s["size"] == list(case.volume.geometry.shape)
    assert s["spacing_mm"] == [0.8, 0.9, 2.0]
    assert np.allclose(s["direction"], case.volume.geometry.direction)
    assert s["selection"]["reason"] == "largest axial CT"
    assert rep["model"] == {"name": rh.MODEL.name, "version": rh.MODEL.version, "sha256": rh.MODEL.sha256,
                            "spacing_mm": [1.5, 1.5, 1.5]}
    assert rep["device"] == "cpu" and rep["intent"] == "palliative" and rep["fast"] is True
    assert rep["canal"]["found"] is True and rep["canal"]["volume_ml"] == round(case.canal.volume_ml, 3)
    assert rep["warnings"] == case.volume.warnings
    assert len(rep["lesions"]) == len(case.lesions) == 2
    for entry, les, rec in zip(rep["lesions"], case.lesions, case.recs):
        assert LESION_KEYS <= set(entry)
        assert entry["id"] == les.id
        assert entry["volume_ml"] == round(les.volume_ml, 3)
        assert entry["max_diameter_mm"] == round(les.max_diameter_mm, 2)
        assert entry["min_distance_to_canal_mm"] == round(les.min_distance_to_canal_mm, 2)
        assert entry["closest_point_lesion_lps_mm"] == [round(v, 2) for v in les.closest_point_lesion_lps_mm]
        assert entry["closest_point_canal_lps_mm"] == [round(v, 2) for v in les.closest_point_canal_lps_mm]
        assert all(isinstance(v, float) for v in entry["centroid_lps_mm"])
        r = entry["recommendation"]
        assert r["primary"] == rec.primary and r["options"] == rec.options and r["flags"] == rec.flags
        assert r["rationale"][0] == {"rule": rec.rationale[0].rule, "text": rec.rationale[0].text,
                                     "source": rec.rationale[0].source}
        assert r["borderline"] == rec.borderline


def test_deidentified_report_has_no_uids_paths_or_names():
    case = _dicom_like_case()
    rep = _report(case, deidentify=True)
    text = json.dumps(rep)
    for secret in ("1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7", "1.2.3.9", "Doe_John/", "/secret", "Doe John"):
        assert secret not in text, secret
    assert rep["series"]["study_instance_uid"] == anon("1.2.3.4.5")
    assert rep["series"]["selection"]["series_instance_uid"] == anon("1.2.3.4.6")
    assert rep["series"]["selection"]["passed_over"][0]["series_instance_uid"] == anon("1.2.3.9")
    assert rep["input"]["path"] == "Doe_John"
    assert rep["deidentified"] is True
    assert "series_description" not in json.dumps(rep["series"]["selection"])  # free text, dropped like the top level


def test_missing_canal_gives_nulls_not_nan():
    case = rh.nifti_like_case()
    les = case.lesions[0]
    les.min_distance_to_canal_mm = float("inf")
    les.closest_point_canal_lps_mm = None
    les.closest_point_lesion_lps_mm = None
    les.mean_hu = np.float32(123.456)
    rep = _report(case)
    entry = rep["lesions"][0]
    assert entry["min_distance_to_canal_mm"] is None and entry["closest_point_canal_lps_mm"] is None
    assert entry["mean_hu"] == 123.5 and type(entry["mean_hu"]) is float
    json.dumps(rep, allow_nan=False)


def test_to_jsonable_converts_numpy():
    out = to_jsonable({"a": np.int64(3), "b": np.array([1.5, np.nan]), "c": (np.bool_(True),), 4: Path("/x")})
    assert out == {"a": 3, "b": [1.5, None], "c": [True], "4": "/x"}
    json.dumps(out)


def test_csv_rows_match_lesions(tmp_path):
    case = rh.nifti_like_case()
    rep = _report(case)
    timer = Timer()
    write_all(tmp_path, case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
              formats=("json", "csv"), deidentify=False, timer=timer)
    assert "write_csv" in timer.timings
    with open(tmp_path / "lesions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(case.lesions)
    for row, les, rec in zip(rows, case.lesions, case.recs):
        assert row["study"] == "case7"
        assert int(row["lesion_id"]) == les.id
        assert float(row["volume_ml"]) == pytest.approx(les.volume_ml, abs=5e-4)
        assert float(row["max_diameter_mm"]) == pytest.approx(les.max_diameter_mm, abs=5e-3)
        assert float(row["min_distance_to_canal_mm"]) == pytest.approx(les.min_distance_to_canal_mm, abs=5e-3)
        assert row["type"] == les.type and row["location"] == les.location
        assert row["canal_contact"] == ("true" if les.canal_contact else "false")
        assert row["primary"] == rec.primary
        assert row["options"] == ";".join(rec.options) and row["flags"] == ";".join(rec.flags)
        assert row["borderline"] == ("true" if rec.borderline["value"] else "false")
    assert lesion_rows(rep, study="S9")[0]["study"] == "S9"


def test_nifti_input_skips_seg_and_sr_with_warning(tmp_path):
    case = rh.nifti_like_case()
    rep = _report(case)
    write_all(tmp_path, case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
              formats=("seg", "sr"), deidentify=False, timer=Timer())
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "sr.dcm").exists()
    assert any("seg.dcm and sr.dcm not written" in w and "not DICOM" in w for w in rep["warnings"])


def test_deidentify_skips_seg_and_sr_with_warning(tmp_path):
    case = _dicom_like_case()
    rep = _report(case, deidentify=True)
    write_all(tmp_path, case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
              formats=("seg", "sr", "csv"), deidentify=True, timer=Timer())
    assert not (tmp_path / "seg.dcm").exists() and not (tmp_path / "sr.dcm").exists()
    assert any("deidentify" in w for w in rep["warnings"])
    with open(tmp_path / "lesions.csv") as fh:
        assert "1.2.3.4.5" not in fh.read()
