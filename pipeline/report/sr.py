"""sr.dcm: per-lesion measurements as a Comprehensive 3D SR, TID 1500 (highdicom).

Per lesion (report.json order), sharing one tracking identifier ``lesion <id>`` and one tracking
UID, so a reader joins them:

1. a TID 1411 volumetric ROI measurement group that references the metastasis segment of
   seg.dcm and the source CT images of the lesion's slices (a SEG frame-number reference is
   not allowed together with a segment number: dciodvfy error), with
   Volume (SCT 118565006, ``ml``), Diameter (SCT 81827009, derivation Maximum, ``mm``),
   Attenuation Coefficient (DCM 112031, derivation Mean, ``[hnsf'U]``) and the qualitative
   evaluations below;
2. when the canal was found, a TID 1501 measurement group holding Distance (DCM 121206,
   derivation Minimum, ``mm``, distance uncertainty as upper/lower measurement uncertainty),
   inferred from a SCOORD3D POLYLINE of two points in the frame of reference:
   [closest lesion point, closest canal point], LPS mm. (TID 1419, which a volumetric group
   uses, does not allow spatial coordinates as a measurement's source, hence the second group.)

Qualitative evaluations (private scheme ``99OSTEOPLAN``, declared in the Coding Scheme
Identification Sequence, since SNOMED CT/DCM have no codes for these planning terms): metastasis
type (lytic/mixed/blastic), spinal canal contact (SCT Yes/No), Recommendation (DCM 121075) =
the primary procedure, one "Alternative option" per option, one "Planning flag" per flag,
and borderline (SCT Yes/No). Private values: code = the report.json term upper-cased.

Values are exactly those of report.json (already rounded). The observer is the algorithm
(device observer, UID derived from the model name, version and sha256). A ``--fast`` result says
so in the series description, which PACS study lists show ("osteoplan FAST-mode measurements,
preview only").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes as dc
from pydicom.uid import generate_uid

from pipeline import __version__
from pipeline.report.seg import (MANUFACTURER, aligned_to_grid, is_multiframe, multiframe_frame_of_slice,
                                 result_series_description)
from pipeline.types import LESION, Geometry, Segmentation, Volume

SR_SERIES_NUMBER = 9902
CHECKED_HIGHDICOM = "0.28"  # the constructor behaviour build_sr relies on (tests compare both paths)
PRIVATE_SCHEME = "99OSTEOPLAN"


def private(code: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


NAME_TYPE = private("LESTYPE", "Metastasis radiographic type")
NAME_CONTACT = private("CANALCONTACT", "Spinal canal contact")
NAME_OPTION = private("OPTION", "Alternative option")
NAME_FLAG = private("FLAG", "Planning flag")
NAME_BORDERLINE = private("BORDERLINE", "Borderline recommendation")
NAME_RECOMMENDATION = hd.sr.CodedConcept("121075", "DCM", "Recommendation")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
TYPE_CODES = {"lytic": "LYTIC", "mixed": "MIXED", "blastic": "BLASTIC"}
UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
UNIT_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
SPINAL_CANAL = hd.sr.CodedConcept("61853006", "SCT", "Spinal canal")
UNIT_HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")


def term(value: str) -> hd.sr.CodedConcept:
    """A report.json term (procedure, flag, type) as a private code: code = upper-cased term."""
    v = str(value)
    return private(v.upper()[:64], v.replace("_", " "))


def build_sr(volume: Volume, seg: Segmentation, seg_ds: pydicom.Dataset, report: dict[str, Any],
             source_headers: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    """The SR dataset. ``source_headers`` in slice (k) order, as used for the SEG.

    With the highdicom version it was checked against, highdicom's typed view of the content
    (``.content``) is not kept on the returned object: read the written file back for it.
    """
    assert volume.dicom is not None
    frame_uid = volume.dicom.frame_of_reference_uid or str(seg_ds.FrameOfReferenceUID)
    aligned = aligned_to_grid(source_headers, volume.geometry)
    frames_by_k = _seg_frames_by_slice(seg_ds, source_headers, volume.geometry) if aligned else None
    algo = hd.sr.AlgorithmIdentification(name=seg.model.name, version=seg.model.version or "unknown")
    groups = [g for les in report.get("lesions", [])
              for g in _lesion_group(les, seg_ds, source_headers, frames_by_k, frame_uid, algo, volume)]
    if not groups:  # TID 1500 needs a group: say explicitly that nothing was found (the PACS still gets an SR)
        groups = [_no_lesion_group(report, algo)]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[seg.model.name, seg.model.version, seg.model.sha256]),
        name=seg.model.name[:64],
        manufacturer_name=MANUFACTURER,
        model_name=seg.model.name[:64],
        serial_number=(seg.model.sha256 or "none")[:16],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=dc.cid270.Device,
                                                      observer_identifying_attributes=device))

    def measurement_report(imaging_measurements: list[Any]) -> pydicom.Dataset:
        return hd.sr.MeasurementReport(observation_context=context, procedure_reported=dc.LN.CTUnspecifiedBodyRegion,
                                       imaging_measurements=imaging_measurements)[0]

    content = measurement_report(groups)
    if not hd.__version__.startswith(CHECKED_HIGHDICOM):
        return _sr_document(content, report, seg, seg_ds, source_headers)
    # highdicom's constructor deep-copies the content, converts the copy to its typed classes and
    # searches it twice for references (~40 ms a lesion here; the SR of 8 lesions took 0.62 s, 0.34 s
    # this way, 16 lesions 1.21 -> 0.63 s, BENCHMARKS.md): it gets a
    # one-group report instead, then the document takes the real content as the constructor would
    # (``for tag, value in content.items(): self[tag] = value``). The evidence lists the same
    # instances (they come from ``evidence``; every image and segment the content references is in
    # it by construction). The tests compare both documents element by element.
    skeleton = measurement_report([_no_lesion_group(report, algo)])
    sr = _sr_document(skeleton, report, seg, seg_ds, source_headers)
    for tag in skeleton.keys() - content.keys():
        del sr[tag]
    for tag, value in content.items():
        sr[tag] = value
    sr._content = None  # highdicom's typed copy of the content was not made: read the file back for it
    return sr


def _sr_document(content: pydicom.Dataset, report: dict[str, Any], seg: Segmentation, seg_ds: pydicom.Dataset,
                 source_headers: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    src = source_headers[0]
    return hd.sr.Comprehensive3DSR(
        evidence=[*source_headers, seg_ds],
        content=content,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(report, seg.model.name),
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME, name="osteoplan planning terms",
            responsible_organization="osteoplan project", version=__version__)],
        specific_character_set=getattr(src, "SpecificCharacterSet", None) or "ISO_IR 192",
    )


def series_description(report: dict[str, Any], model_name: str) -> str:
    """What a PACS list shows for the SR (``seg.result_series_description``)."""
    return result_series_description("measurements", bool(report.get("fast")), model_name)


def _no_lesion_group(report: dict[str, Any], algo: hd.sr.AlgorithmIdentification
                     ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that no metastasis was found (and whether the canal was)."""
    finding = hd.sr.CodedConcept("121071", "DCM", "Finding")
    evaluations = [hd.sr.QualitativeEvaluation(finding, private("NO_METASTASIS", "no bone metastasis detected"))]
    canal_found = bool(report.get("canal", {}).get("found"))
    evaluations.append(hd.sr.QualitativeEvaluation(
        private("CANAL_FOUND", "spinal canal segmented"),
        private("YES" if canal_found else "NO", "yes" if canal_found else "no")))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="study: no lesion"),
        qualitative_evaluations=evaluations, algorithm_id=algo)


def write_sr(path: Path, volume: Volume, seg: Segmentation, seg_ds: pydicom.Dataset, report: dict[str, Any],
             source_headers: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    ds = build_sr(volume, seg, seg_ds, report, source_headers)
    ds.save_as(str(path), enforce_file_format=True)
    return ds


def _seg_frames_by_slice(seg_ds: pydicom.Dataset, headers: list[pydicom.Dataset],
                         geom: Geometry) -> dict[int, list[int]]:
    """slice k -> 1-based SEG frame numbers of the metastasis segment on that source image."""
    k_of_uid = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    multiframe = is_multiframe(headers)
    k_of_frame = ({f: k for k, f in enumerate(multiframe_frame_of_slice(headers[0], geom))} if multiframe else {})
    out: dict[int, list[int]] = {}
    table = getattr(seg_ds, "osteoplan_frame_sources", None)  # frames encoded by seg_frames (not parsed back)
    if table is not None and not multiframe:
        for n, (segment, uid) in enumerate(table, 1):
            k = k_of_uid.get(uid, -1)
            if segment == LESION and k >= 0:
                out.setdefault(k, []).append(n)
        return out
    for n, item in enumerate(seg_ds.PerFrameFunctionalGroupsSequence, 1):
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != LESION:
            continue
        try:
            ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        except (AttributeError, IndexError):
            continue
        if multiframe:
            k = k_of_frame.get(int(getattr(ref, "ReferencedFrameNumber", 0) or 0), -1)
        else:
            k = k_of_uid.get(str(ref.ReferencedSOPInstanceUID), -1)
        if k >= 0:
            out.setdefault(k, []).append(n)
    return out


def _lesion_group(les: dict[str, Any], seg_ds: pydicom.Dataset, headers: list[pydicom.Dataset],
                  frames_by_k: dict[int, list[int]] | None, frame_uid: str, algo: hd.sr.AlgorithmIdentification,
                  volume: Volume) -> list[Any]:
    """The lesion's TID 1411 group, plus its TID 1501 distance group when a distance exists."""
    (_, _, k0), (_, _, k1) = les["bbox_ijk"]
    ks = [k for k in range(int(k0), int(k1)) if frames_by_k is not None and k in frames_by_k]
    if frames_by_k is None:  # the grid was resampled from the source images: reference the series
        src_images = None
    elif is_multiframe(headers):
        frame_of_k = multiframe_frame_of_slice(headers[0], volume.geometry)
        src_images = [hd.sr.SourceImageForSegmentation.from_source_image(
            headers[0], referenced_frame_numbers=sorted(frame_of_k[k] for k in ks) or None)]
    else:
        src_images = [hd.sr.SourceImageForSegmentation.from_source_image(headers[k])
                      for k in (ks or range(int(k0), int(k1)))]
    referenced_segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg_ds.SOPClassUID, sop_instance_uid=seg_ds.SOPInstanceUID, segment_number=LESION,
        source_images=src_images,
        source_series=(hd.sr.SourceSeriesForSegmentation(str(headers[0].SeriesInstanceUID))
                       if src_images is None else None))
    measurements = [
        hd.sr.Measurement(name=dc.SCT.Volume, value=les["volume_ml"], unit=UNIT_ML, algorithm_id=algo),
        hd.sr.Measurement(name=dc.SCT.Diameter, value=les["max_diameter_mm"], unit=UNIT_MM,
                          derivation=dc.SCT.Maximum, algorithm_id=algo),
        hd.sr.Measurement(name=dc.DCM.AttenuationCoefficient, value=les["mean_hu"], unit=UNIT_HU,
                          derivation=dc.SCT.Mean, algorithm_id=algo),
    ]
    rec = les["recommendation"]
    borderline = rec.get("borderline")
    is_borderline = bool(borderline.get("value")) if isinstance(borderline, dict) else bool(borderline)
    evaluations = [
        hd.sr.QualitativeEvaluation(NAME_TYPE, private(TYPE_CODES.get(les["type"], str(les["type"]).upper()),
                                                       str(les["type"]))),
        hd.sr.QualitativeEvaluation(NAME_CONTACT, YES if les["canal_contact"] else NO),
        hd.sr.QualitativeEvaluation(NAME_RECOMMENDATION, term(rec["primary"])),
        *[hd.sr.QualitativeEvaluation(NAME_OPTION, term(o)) for o in rec.get("options", [])],
        *[hd.sr.QualitativeEvaluation(NAME_FLAG, term(f)) for f in rec.get("flags", [])],
        hd.sr.QualitativeEvaluation(NAME_BORDERLINE, YES if is_borderline else NO),
    ]
    tracking_uid = hd.UID()
    identifier = f"lesion {les['id']}"
    groups: list[Any] = [hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        referenced_segment=referenced_segment,
        finding_type=dc.SCT.NeoplasmMetastatic,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )]
    if les.get("min_distance_to_canal_mm") is not None and les.get("closest_point_lesion_lps_mm") is not None:
        pts = np.array([les["closest_point_lesion_lps_mm"], les["closest_point_canal_lps_mm"]], dtype=np.float64)
        unc = les.get("distance_uncertainty_mm")
        distance = hd.sr.Measurement(
            name=dc.DCM.Distance, value=les["min_distance_to_canal_mm"], unit=UNIT_MM,
            derivation=dc.SCT.Minimum, algorithm_id=algo,
            properties=(hd.sr.MeasurementProperties(upper_measurement_uncertainty=unc,
                                                    lower_measurement_uncertainty=unc) if unc is not None else None),
            referenced_coordinates=[hd.sr.CoordinatesForMeasurement3D(
                graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE, graphic_data=pts,
                frame_of_reference_uid=frame_uid)],
        )
        _uncertainty_in_mm(distance)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
            finding_type=dc.SCT.NeoplasmMetastatic,
            finding_sites=[hd.sr.FindingSite(anatomic_location=SPINAL_CANAL)],
            algorithm_id=algo,
            measurements=[distance],
        ))
    return groups


def _uncertainty_in_mm(measurement: hd.sr.Measurement) -> None:
    """highdicom writes TID 310 uncertainty ranges with unit "1"; they are millimetres here."""
    for item in getattr(measurement[0], "ContentSequence", []):
        if str(item.ConceptNameCodeSequence[0].CodeValue) in ("371886008", "371885007"):
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence = [UNIT_MM]
