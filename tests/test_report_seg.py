"""DICOM SEG: voxel-exact round trips for several orientations, codes, and dciodvfy."""

from __future__ import annotations

import os
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

import report_helpers as rh
from pipeline.report import codes
from pipeline.report.seg import aligned_to_grid, read_source_headers, write_seg
from pipeline.types import CANAL, LESION, Geometry, Segmentation


def _roundtrip_by_instance(seg_path: Path, case: rh.Case) -> np.ndarray:
    """Read the SEG back per referenced source SOPInstanceUID, as an (i, j, k) label map."""
    seg = hd.seg.segread(seg_path)
    uids = case.volume.dicom.sop_instance_uids
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                               skip_overlap_checks=True)
    return np.asarray(frames).transpose(2, 1, 0)


def _roundtrip_by_volume(seg_path: Path, case: rh.Case) -> np.ndarray:
    """Read the SEG back as a highdicom Volume and resample it onto the source grid by LPS position."""
    vol = hd.seg.segread(seg_path).get_volume(combine_segments=True, skip_overlap_checks=True)
    g = case.volume.geometry
    ijk = np.argwhere(np.ones(g.shape, bool))
    lps = g.index_to_lps(ijk)
    idx = (np.linalg.inv(vol.affine) @ np.c_[lps, np.ones(len(lps))].T)[:3].T
    rounded = np.rint(idx)
    assert np.abs(idx - rounded).max() < 1e-3, "SEG grid is not the source grid"
    rounded = rounded.astype(int)
    out = np.zeros(g.shape, np.uint8)
    inside = np.all((rounded >= 0) & (rounded < np.array(vol.array.shape)), axis=1)
    out.reshape(-1)[inside] = vol.array[tuple(rounded[inside].T)]
    return out


@pytest.mark.parametrize("kind", ["HFS", "FFS", "FLIPPED", "OBLIQUE"])
def test_seg_roundtrip_voxel_exact(tmp_path, kind):
    case = rh.dicom_case(tmp_path, kind)
    assert case.labels[case.labels == LESION].size > 0
    path = tmp_path / "seg.dcm"
    ds = write_seg(path, case.volume, case.seg)
    assert ds.SegmentationType == "BINARY"
    np.testing.assert_array_equal(_roundtrip_by_instance(path, case), case.labels)
    np.testing.assert_array_equal(_roundtrip_by_volume(path, case), case.labels)
    # empty frames are left out: only slices with a label carry frames
    n_expected = sum(int((case.labels[:, :, k] == s).any()) for k in range(case.labels.shape[2]) for s in (1, 2, 3))
    assert int(ds.NumberOfFrames) == n_expected


def test_seg_source_list_order_does_not_matter(tmp_path):
    """A DicomSource whose files are not in k order still gives an exact SEG (matched by position)."""
    case = rh.dicom_case(tmp_path, "FFS")
    src = case.volume.dicom
    in_k_order = list(src.sop_instance_uids)
    order = list(range(len(src.files)))
    random.Random(3).shuffle(order)
    src.files = [src.files[i] for i in order]
    src.sop_instance_uids = [src.sop_instance_uids[i] for i in order]
    headers = read_source_headers(case.volume)
    assert order != sorted(order)
    assert [str(h.SOPInstanceUID) for h in headers] == in_k_order
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, case.seg)
    np.testing.assert_array_equal(_roundtrip_by_volume(path, case), case.labels)


def test_seg_on_a_resampled_grid_places_frames_by_position(tmp_path):
    """A grid that is not the source slices (as after gap filling / tilt correction) still gives an exact SEG."""
    case = rh.dicom_case(tmp_path, "HFS", shape=(32, 28, 12))
    g = case.volume.geometry
    shifted = Geometry(g.shape, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + 0.5 * g.spacing[2]),
                       g.direction)
    case.volume.geometry = shifted
    case.seg = Segmentation(case.labels, shifted, rh.MODEL)
    headers = read_source_headers(case.volume)
    assert not aligned_to_grid(headers, shifted)
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, case.seg, headers)
    np.testing.assert_array_equal(_roundtrip_by_volume(path, case), case.labels)
    if os.path.exists(rh.DCIODVFY):
        assert rh.dciodvfy(path)[0] == []


def test_seg_segments_codes_and_algorithm(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS")
    case.seg.label_meta = {"2": {"name": "bone_metastasis", "color": [255, 0, 255],
                                 "type": {"code": "94222008", "scheme": "SCT", "meaning": "Bony metastasis"}}}
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, case.seg)
    seg = hd.seg.segread(path)
    assert seg.segment_numbers == [1, 2, 3]
    meta = codes.label_meta(case.seg.label_meta)
    for n in (1, 2, 3):
        d = seg.get_segment_description(n)
        assert d.segmented_property_category.value == meta[n]["category"]["code"]
        assert d.segmented_property_type.value == meta[n]["type"]["code"]
        assert d.segment_label == meta[n]["name"]
        assert d.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algo = d.algorithm_identification[0]
        assert algo.AlgorithmName == rh.MODEL.name and algo.AlgorithmVersion == rh.MODEL.version
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.get_segment_description(2).segment_label == "bone_metastasis"
    assert seg.get_segment_description(2).segmented_property_type.value == "94222008"
    assert seg.get_segment_description(CANAL).segmented_property_type.value == "61853006"
    # references the source series and patient/study of the CT
    assert seg.StudyInstanceUID == case.volume.dicom.study_instance_uid
    assert seg.FrameOfReferenceUID == case.volume.dicom.frame_of_reference_uid
    refs = {str(i.ReferencedSOPInstanceUID) for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert refs == set(case.volume.dicom.sop_instance_uids)


@pytest.mark.skipif(not os.path.exists(rh.DCIODVFY), reason="dciodvfy (Debian dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["HFS", "OBLIQUE"])
def test_seg_dciodvfy_clean(tmp_path, kind):
    case = rh.dicom_case(tmp_path, kind)
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, case.seg)
    errors, _ = rh.dciodvfy(path)
    assert errors == []


def test_seg_all_empty_labels(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(24, 20, 6))
    empty = Segmentation(np.zeros_like(case.labels), case.volume.geometry, rh.MODEL)
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, empty)
    np.testing.assert_array_equal(_roundtrip_by_instance(path, case), 0)


def test_seg_roundtrip_multiframe_source(tmp_path):
    case = rh.multiframe_case(tmp_path, "FFS")
    assert len(case.volume.dicom.files) == 1
    path = tmp_path / "seg.dcm"
    write_seg(path, case.volume, case.seg)
    np.testing.assert_array_equal(_roundtrip_by_volume(path, case), case.labels)
    # per source frame: SEG frames reference the right frame of the enhanced CT
    from pipeline.report.seg import multiframe_frame_of_slice, read_source_headers
    header = read_source_headers(case.volume)[0]
    frame_of_k = multiframe_frame_of_slice(header, case.volume.geometry)
    assert frame_of_k != sorted(frame_of_k)  # frames are not in k order: a real test of the mapping
    seg = hd.seg.segread(path)
    frames = seg.get_pixels_by_source_frame(source_sop_instance_uid=header.SOPInstanceUID,
                                            source_frame_numbers=frame_of_k, combine_segments=True,
                                            skip_overlap_checks=True)
    np.testing.assert_array_equal(np.asarray(frames).transpose(2, 1, 0), case.labels)
