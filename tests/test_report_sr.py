"""DICOM SR (TID 1500): every value read back equals report.json; dciodvfy has no errors."""

from __future__ import annotations

import os

import highdicom as hd
import numpy as np
import pytest

import report_helpers as rh
from pipeline.report.json_report import build_report
from pipeline.report.seg import read_source_headers, write_seg
from pipeline.report.sr import PRIVATE_SCHEME, write_sr
from pipeline.types import LESION


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    case = rh.dicom_case(tmp, "FFS")
    # make lesion 2 touch-free but give lesion 1 flags/options, and one lesion without a canal distance
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    rep["lesions"][1]["min_distance_to_canal_mm"] = None
    rep["lesions"][1]["closest_point_lesion_lps_mm"] = None
    rep["lesions"][1]["closest_point_canal_lps_mm"] = None
    headers = read_source_headers(case.volume)
    seg_ds = write_seg(tmp / "seg.dcm", case.volume, case.seg, headers)
    write_sr(tmp / "sr.dcm", case.volume, case.seg, seg_ds, rep, headers)
    return case, rep, seg_ds, tmp


def _measurements(group) -> dict[str, tuple[float, str, str | None]]:
    return {m.name.meaning: (m.value, m.unit.value, m.derivation.meaning if m.derivation else None)
            for m in group.get_measurements()}


def test_sr_values_equal_report(written):
    case, rep, seg_ds, tmp = written
    sr = hd.sr.srread(tmp / "sr.dcm")
    content = sr.content
    vol_groups = content.get_volumetric_roi_measurement_groups()
    assert len(vol_groups) == len(rep["lesions"])
    for group, les in zip(vol_groups, rep["lesions"]):
        assert group.tracking_identifier == f"lesion {les['id']}"
        assert group.finding_type.value == "14799000"
        m = _measurements(group)
        assert m["Volume"] == (les["volume_ml"], "ml", None)
        assert m["Diameter"] == (les["max_diameter_mm"], "mm", "Maximum")
        assert m["Attenuation Coefficient"] == (les["mean_hu"], "[hnsf'U]", "Mean")
        q = {}
        for e in group.get_qualitative_evaluations():
            q.setdefault(e.name.meaning, []).append(e.value)
        rec = les["recommendation"]
        assert [c.meaning for c in q["Metastasis radiographic type"]] == [les["type"]]
        assert [c.meaning for c in q["Spinal canal contact"]] == ["Yes" if les["canal_contact"] else "No"]
        assert [c.value for c in q["Recommendation"]] == [rec["primary"].upper()]
        assert all(c.scheme_designator == PRIVATE_SCHEME for c in q["Recommendation"])
        assert [c.value for c in q.get("Planning flag", [])] == [f.upper() for f in rec["flags"]]
        assert [c.value for c in q.get("Alternative option", [])] == [o.upper() for o in rec["options"]]
        assert [c.meaning for c in q["Borderline recommendation"]] == ["Yes" if rec["borderline"]["value"] else "No"]
        seg_ref = group.referenced_segment
        assert seg_ref[0].referenced_sop_instance_uid == seg_ds.SOPInstanceUID
        assert int(seg_ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) == LESION
        # source images of the lesion's slices
        k0, k1 = les["bbox_ijk"][0][2], les["bbox_ijk"][1][2]
        src = {str(i.referenced_sop_instance_uid) for i in seg_ref[1:]}
        assert src and src <= set(case.volume.dicom.sop_instance_uids[k0:k1])


def test_sr_distance_and_closest_points(written):
    case, rep, _, tmp = written
    content = hd.sr.srread(tmp / "sr.dcm").content
    vol_groups = content.get_volumetric_roi_measurement_groups()
    dist_groups = content.get_image_measurement_groups()
    with_distance = [les for les in rep["lesions"] if les["min_distance_to_canal_mm"] is not None]
    assert len(dist_groups) == len(with_distance) == 1
    les = with_distance[0]
    g = dist_groups[0]
    assert g.tracking_uid == vol_groups[0].tracking_uid  # same finding
    (m,) = g.get_measurements()
    assert m.name.meaning == "Distance" and m.derivation.meaning == "Minimum" and m.unit.value == "mm"
    assert m.value == les["min_distance_to_canal_mm"]
    (coords,) = m.referenced_coordinates
    assert coords.value_type.value == "SCOORD3D" and coords.graphic_type.value == "POLYLINE"
    assert coords.frame_of_reference_uid == case.volume.dicom.frame_of_reference_uid
    pts = coords.value
    np.testing.assert_allclose(pts[0], les["closest_point_lesion_lps_mm"], atol=1e-4)
    np.testing.assert_allclose(pts[1], les["closest_point_canal_lps_mm"], atol=1e-4)
    uncertainties = [(float(i.MeasuredValueSequence[0].NumericValue),
                      str(i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue))
                     for i in _walk(m[0]) if "measurement uncertainty" in str(i.ConceptNameCodeSequence[0].CodeMeaning)]
    assert uncertainties == [(les["distance_uncertainty_mm"], "mm")] * 2


def _walk(item):
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _walk(child)


def test_sr_observer_is_the_algorithm(written):
    case, rep, _, tmp = written
    sr = hd.sr.srread(tmp / "sr.dcm")
    assert sr.StudyInstanceUID == case.volume.dicom.study_instance_uid
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    text = str(sr)
    assert "Observer Type" in text and "Device" in text
    assert rh.MODEL.name in text
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert set(case.volume.dicom.sop_instance_uids) <= evidence


def test_sr_series_description_says_fast_mode(written):
    from pipeline.report.sr import series_description

    case, rep, _, tmp = written
    assert hd.sr.srread(tmp / "sr.dcm").SeriesDescription == f"osteoplan measurements ({rh.MODEL.name})"
    fast = series_description({**rep, "fast": True}, rh.MODEL.name)
    assert fast.startswith("osteoplan FAST-mode measurements, preview only") and len(fast) <= 64


@pytest.mark.skipif(not os.path.exists(rh.DCIODVFY), reason="dciodvfy (Debian dicom3tools) not installed")
def test_sr_dciodvfy_no_errors(written):
    _, _, _, tmp = written
    errors, warnings = rh.dciodvfy(tmp / "sr.dcm")
    assert errors == []
    # the only expected warnings concern the (declared) private coding scheme
    assert all("99OSTEOPLAN" in w for w in warnings), warnings


def test_sr_and_seg_for_multiframe_source(tmp_path):
    case = rh.multiframe_case(tmp_path, "FFS")
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    headers = read_source_headers(case.volume)
    seg_ds = write_seg(tmp_path / "seg.dcm", case.volume, case.seg, headers)
    write_sr(tmp_path / "sr.dcm", case.volume, case.seg, seg_ds, rep, headers)
    content = hd.sr.srread(tmp_path / "sr.dcm").content
    from pipeline.report.seg import multiframe_frame_of_slice
    frame_of_k = multiframe_frame_of_slice(headers[0], case.volume.geometry)
    for group, les in zip(content.get_volumetric_roi_measurement_groups(), rep["lesions"]):
        (src,) = group.referenced_segment[1:]
        k0, k1 = les["bbox_ijk"][0][2], les["bbox_ijk"][1][2]
        assert set(src.referenced_frame_numbers) == {frame_of_k[k] for k in range(k0, k1)}
    if os.path.exists(rh.DCIODVFY):
        for name in ("seg.dcm", "sr.dcm"):
            errors, _ = rh.dciodvfy(tmp_path / name)
            assert errors == [], name


def test_sr_on_a_resampled_grid_references_the_source_series(tmp_path):
    from pipeline.types import Geometry, Segmentation

    case = rh.dicom_case(tmp_path, "HFS")
    g = case.volume.geometry
    shifted = Geometry(g.shape, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + 0.5 * g.spacing[2]), g.direction)
    case.volume.geometry = shifted
    case.seg = Segmentation(case.labels, shifted, rh.MODEL)
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    headers = read_source_headers(case.volume)
    seg_ds = write_seg(tmp_path / "seg.dcm", case.volume, case.seg, headers)
    write_sr(tmp_path / "sr.dcm", case.volume, case.seg, seg_ds, rep, headers)
    content = hd.sr.srread(tmp_path / "sr.dcm").content
    for group in content.get_volumetric_roi_measurement_groups():
        ref = group.referenced_segment
        assert ref[1].name.value == "121232"  # Source Series for Segmentation
        assert ref[1].value == case.volume.dicom.series_instance_uid
    if os.path.exists(rh.DCIODVFY):
        assert rh.dciodvfy(tmp_path / "sr.dcm")[0] == []


FRESH = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID", "ContentDate", "ContentTime",
         "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime", "UID"}  # UID: the groups' tracking UIDs (new each build)


@pytest.mark.parametrize("lesions", ["all", "none"])
def test_sr_built_around_a_skeleton_equals_highdicoms_own(written, monkeypatch, lesions):
    """build_sr gives highdicom's constructor a one-group report and then the real content; the
    document is the one the constructor makes from the real content, element by element (and
    both are what dciodvfy accepts, see above)."""
    import pydicom

    import pipeline.report.sr as sr_mod

    case, rep, seg_ds, tmp = written
    rep = dict(rep, lesions=rep["lesions"] if lesions == "all" else [])
    headers = read_source_headers(case.volume)
    files = {}
    for path in ("skeleton", "constructor"):
        if path == "constructor":
            monkeypatch.setattr(sr_mod, "CHECKED_HIGHDICOM", "no such highdicom")
        files[path] = tmp / f"sr-{path}-{lesions}.dcm"
        write_sr(files[path], case.volume, case.seg, seg_ds, rep, headers)
    a, b = (pydicom.dcmread(files[p]) for p in ("skeleton", "constructor"))
    assert rh.dataset_differences(a, b, FRESH) == []
    assert len(a.ContentSequence) == len(b.ContentSequence) > 1
