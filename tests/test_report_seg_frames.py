"""The directly encoded SEG frames (pipeline/report/seg_frames.py) give highdicom's SEG.

Both builders run on the same study; the two written files are read back and compared element
by element, nested sequences and pixel data included. Only what is new per SEG may differ:
instance/series/tracking UIDs and creation times.
"""

from __future__ import annotations

import os
import struct

import highdicom as hd
import numpy as np
import pydicom
import pytest

import report_helpers as rh
from pipeline.report import seg_frames
from pipeline.report.seg import build_seg, read_source_headers, write_seg
from pipeline.report.sr import _seg_frames_by_slice
from pipeline.types import LESION, Segmentation

FRESH = {"SOPInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID", "InstanceCreationDate",
         "InstanceCreationTime", "ContentDate", "ContentTime", "DimensionOrganizationUID", "TrackingUID",
         "ContributionDateTime"}


def _differences(a: pydicom.Dataset, b: pydicom.Dataset) -> list[str]:
    return rh.dataset_differences(a, b, FRESH)


def _both(tmp_path, case: rh.Case, seg: Segmentation) -> tuple[pydicom.Dataset, pydicom.Dataset, object, object]:
    headers = read_source_headers(case.volume)
    slow = build_seg(case.volume, seg, headers, fast=False)
    fast = build_seg(case.volume, seg, headers, fast=True)
    assert "osteoplan_frame_sources" in fast.__dict__, "the fast path was not taken"
    slow.save_as(str(tmp_path / "slow.dcm"), enforce_file_format=True)
    seg_frames.save(fast, tmp_path / "fast.dcm")
    return (pydicom.dcmread(tmp_path / "slow.dcm"), pydicom.dcmread(tmp_path / "fast.dcm"), slow, fast)


@pytest.mark.parametrize("kind", ["HFS", "FFS", "FLIPPED", "OBLIQUE"])
def test_fast_seg_equals_highdicom_element_by_element(tmp_path, kind):
    case = rh.dicom_case(tmp_path, kind)
    a, b, slow, fast = _both(tmp_path, case, case.seg)
    assert int(b.NumberOfFrames) > 10
    assert _differences(a, b) == []
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    # the SR finds the same lesion frames through the frame table as through the parsed sequence
    headers = read_source_headers(case.volume)
    assert _seg_frames_by_slice(fast, headers, case.volume.geometry) == \
        _seg_frames_by_slice(slow, headers, case.volume.geometry) != {}


def test_a_fast_mode_seg_says_so_on_both_paths(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS")
    headers = read_source_headers(case.volume)
    slow = build_seg(case.volume, case.seg, headers, fast=False, preview=True)
    quick = build_seg(case.volume, case.seg, headers, fast=True, preview=True)
    assert "osteoplan_frame_sources" in quick.__dict__
    assert slow.SeriesDescription == quick.SeriesDescription == f"osteoplan FAST-mode SEG, preview only ({rh.MODEL.name})"
    assert build_seg(case.volume, case.seg, headers).SeriesDescription == f"osteoplan SEG ({rh.MODEL.name})"


def test_fast_seg_odd_frame_size_missing_segment_and_gaps(tmp_path):
    """Frames of 23x19 pixels (bits run across bytes), no canal at all, empty slices between."""
    case = rh.dicom_case(tmp_path, "FFS", shape=(23, 19, 9))
    labels = np.zeros_like(case.labels)
    labels[3:9, 4:7, 1] = LESION
    labels[10:20, 2:15, 4:6] = 3
    labels[5, 5, 8] = LESION
    seg = Segmentation(labels, case.volume.geometry, rh.MODEL)
    a, b, _, _ = _both(tmp_path, case, seg)
    assert int(b.NumberOfFrames) == 2 + 2  # lesion on slices 1 and 8, bone on 4 and 5
    assert _differences(a, b) == []


def test_fast_seg_falls_back_when_the_map_is_empty(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(24, 20, 6))
    empty = Segmentation(np.zeros_like(case.labels), case.volume.geometry, rh.MODEL)
    ds = build_seg(case.volume, empty)
    assert "osteoplan_frame_sources" not in ds.__dict__
    assert int(ds.NumberOfFrames) == 6 * 3  # highdicom keeps the empty frames of an empty map


def test_plan_frames_orders_by_segment_then_position():
    frames = np.zeros((4, 2, 2), np.uint8)
    frames[0, 0, 0] = 2
    frames[2, 1, 1] = 1
    frames[3, 0, 1] = 2
    frames[3, 1, 1] = 1
    plan, present = seg_frames.plan_frames(frames, 3, np.array([3, 2, 1, 0]))  # reverse along the normal
    assert plan.segments.tolist() == [1, 1, 2, 2]
    assert plan.planes.tolist() == [3, 2, 3, 0]
    assert plan.position_index.tolist() == [1, 2, 1, 3]  # plane 1 is empty: not counted
    assert present[3].sum() == 0


@pytest.mark.skipif(not os.path.exists(rh.DCIODVFY), reason="dciodvfy (Debian dicom3tools) not installed")
@pytest.mark.parametrize("kind", ["FFS", "FLIPPED"])
def test_fast_seg_dciodvfy_clean(tmp_path, kind):
    case = rh.dicom_case(tmp_path, kind)
    path = tmp_path / "seg.dcm"
    ds = write_seg(path, case.volume, case.seg)
    assert "osteoplan_frame_sources" in ds.__dict__
    errors, _ = rh.dciodvfy(path)
    assert errors == []


def test_a_surprise_in_the_fast_path_falls_back_to_highdicom(tmp_path, monkeypatch):
    case = rh.dicom_case(tmp_path, "HFS", shape=(24, 20, 6))

    def broken(*args, **kwargs):
        raise KeyError("an unexpected template")

    monkeypatch.setattr(seg_frames, "replace_frames", broken)
    ds = build_seg(case.volume, case.seg)
    assert "osteoplan_frame_sources" not in ds.__dict__ and int(ds.NumberOfFrames) > 0


@pytest.mark.parametrize("shape", [(7, 16, 8), (5, 9, 7), (40, 3, 5), (0, 4, 4)])
def test_planes_with_segments_is_the_per_label_any(shape):
    """The one-pass presence masks equal ``(frames == s).any(axis=(1, 2))``, whole 64-bit words
    per plane or not, planes in blocks or not."""
    rng = np.random.default_rng(sum(shape))
    frames = (rng.random(shape) < 0.02).astype(np.uint8) * rng.integers(1, 4, shape, dtype=np.uint8)
    if shape[0] > 3:
        frames[1] = 0  # an empty plane
        frames[2] = 3  # a plane of one label only
    for chunk in (1, 3, 16):
        got = seg_frames.planes_with_segments(frames, 3, chunk=chunk)
        assert [g.tolist() for g in got] == [(frames == s).any(axis=(1, 2)).tolist() for s in (1, 2, 3)]
    many = seg_frames.planes_with_segments(frames, 9)  # labels up to 9: one byte of bits is not enough
    assert [m.tolist() for m in many] == [(frames == s).any(axis=(1, 2)).tolist() for s in range(1, 10)]


@pytest.mark.parametrize("shape", [(7, 16, 8), (6, 24, 16), (5, 9, 7), (4, 12, 12), (40, 3, 5)])
def test_frames_packed_within_the_segment_rows_are_the_same_bytes(shape):
    """``segment_extent``'s rows are each segment's row bounds over all planes, and packing only
    those rows gives the bytes of packing whole frames (rows of whole bytes or not)."""
    rng = np.random.default_rng(7 + sum(shape))
    frames = np.zeros(shape, np.uint8)
    body = (slice(None), slice(shape[1] // 4, shape[1] // 4 + max(1, shape[1] // 3)), slice(None))
    frames[body] = (rng.random(frames[body].shape) < 0.3) * rng.integers(1, 4, frames[body].shape, dtype=np.uint8)
    frames[0, -1, 0] = 2  # segment 2 also on the last row of one plane
    masks, rows = seg_frames.segment_extent(frames, 3)
    for s in (1, 2, 3):
        held = np.flatnonzero((frames == s).any(axis=(0, 2)))
        assert rows.get(s) == ((int(held[0]), int(held[-1]) + 1) if held.size else None)
    assert [m.tolist() for m in masks] == [m.tolist() for m in seg_frames.planes_with_segments(frames, 3)]
    plan, _ = seg_frames.plan_frames(frames, 3, np.arange(shape[0]), masks)
    assert seg_frames.pack_frames(frames, plan, rows) == seg_frames.pack_frames(frames, plan)
    _, many_rows = seg_frames.segment_extent(frames, 9)  # one byte of bits is not enough: whole planes
    assert seg_frames.pack_frames(frames, plan, many_rows) == seg_frames.pack_frames(frames, plan)


@pytest.mark.parametrize("ipp", [
    ["-123.456789", "45.5", "-1234.25"], ["0", "-0.0", "1e-5"], ["-250.123456789012", "99999.99999", "7"],
    ["12345678.9", "-0.000001234", "3.14159265358979"], [1.5, -2.25, 1e20], ["+1.0", " 2.5 ", "-3"]])
def test_frame_position_bytes_are_highdicoms(ipp):
    """A frame's Image Position (Patient) element, encoded directly, has the bytes pydicom writes
    for highdicom's Plane Position Sequence of the same source position."""
    values = [pydicom.valuerep.DSfloat(v) for v in ipp]
    expected = seg_frames._encode(hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, values)[0]
                                  [seg_frames.POS_TAG])
    assert seg_frames._encode_position(values) == expected


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567",
                                 "2.25.1", "1.2.3.4 ", "1.2.x.4", ""])
def test_frame_source_uid_bytes_are_pydicoms(uid):
    elem = pydicom.dataelem.DataElement(seg_frames.UID_TAG, "UI", uid)
    assert seg_frames._uid_element(seg_frames.UID_TAG, uid) == seg_frames._encode(elem)


def test_source_references_are_the_bytes_pydicom_writes_for_highdicoms(tmp_path):
    """The two reference sequences are encoded here as pydicom encodes the ones highdicom's own
    ``_add_source_image_references`` makes (defined lengths, items in the images' order)."""
    from highdicom.image import _Image

    case = rh.dicom_case(tmp_path, "FFS", shape=(24, 20, 7))
    headers = read_source_headers(case.volume)
    ours, theirs = pydicom.Dataset(), pydicom.Dataset()
    seg_frames.reference_all_sources(ours, headers)
    _Image._add_source_image_references(theirs, headers, None)
    for tag in (seg_frames.SOURCE_IMAGES, seg_frames.REFERENCED_SERIES):
        raw = ours.get_item(tag)
        assert isinstance(raw, pydicom.dataelem.RawDataElement)
        header = struct.pack("<HH2sHI", tag.group, tag.elem, b"SQ", 0, len(raw.value))
        assert header + raw.value == seg_frames._encode(theirs[tag])
    assert [str(r.ReferencedSOPInstanceUID) for r in ours.SourceImageSequence] == \
        [str(h.SOPInstanceUID) for h in headers]  # and pydicom reads them back


def test_a_seg_pydicom_must_re_encode_is_written_the_same(tmp_path, monkeypatch):
    """When ``save`` cannot write the dataset as it is (another encoding, an ambiguous VR), pydicom's
    own writer parses the raw elements back: the same elements either way."""
    case = rh.dicom_case(tmp_path, "FLIPPED")
    headers = read_source_headers(case.volume)
    seg_frames.save(build_seg(case.volume, case.seg, headers, fast=True), tmp_path / "as_is.dcm")
    monkeypatch.setattr(seg_frames, "_writes_as_is", lambda ds: False)
    seg_frames.save(build_seg(case.volume, case.seg, headers, fast=True), tmp_path / "re_encoded.dcm")
    a, b = pydicom.dcmread(tmp_path / "as_is.dcm"), pydicom.dcmread(tmp_path / "re_encoded.dcm")
    assert _differences(a, b) == [] and len(a.SourceImageSequence) == len(headers)


def test_a_fast_seg_is_written_as_it_is_unless_a_raw_element_came_from_elsewhere(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(24, 20, 6))
    ds = build_seg(case.volume, case.seg, read_source_headers(case.volume), fast=True)
    assert seg_frames._writes_as_is(ds)  # the fast save: the references are not parsed back
    ds[0x00081030] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00081030), "LO", 4, b"abcd", 0, False, True)
    assert not seg_frames._writes_as_is(ds)


def test_a_template_source_from_another_series_falls_back_to_highdicom(tmp_path):
    """The references to all source images are only added when highdicom would accept them."""
    case = rh.dicom_case(tmp_path, "HFS", shape=(24, 20, 6))
    headers = read_source_headers(case.volume)
    template = pydicom.Dataset()
    seg_frames.reference_all_sources(template, headers)
    assert [str(r.ReferencedSOPInstanceUID) for r in template.SourceImageSequence] == \
        [str(h.SOPInstanceUID) for h in headers]
    assert len(template.ReferencedSeriesSequence) == 1
    odd = pydicom.Dataset()
    odd.update(headers[2])
    odd.Rows = int(headers[2].Rows) + 1
    with pytest.raises(seg_frames.NotApplicable):
        seg_frames.reference_all_sources(pydicom.Dataset(), [*headers[:2], odd, *headers[3:]])


def test_fast_seg_equals_highdicom_when_slices_differ_beyond_position(tmp_path):
    """Real series vary per slice in more than position and UIDs (times, window, comments, slice
    location): the fast SEG still equals highdicom's, whichever slice its template was built on."""
    import report_helpers as helpers

    case = rh.dicom_case(tmp_path, "FFS")
    files = sorted(p for p in (tmp_path / "ct_FFS").iterdir() if p.is_file())
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.AcquisitionTime = f"1200{n % 60:02d}.{n:03d}"
        ds.ContentTime = f"1201{n % 60:02d}"
        ds.WindowCenter = str(40 + n)
        ds.ImageComments = f"slice {n}"
        ds.save_as(path)
    from pipeline.io.load import load_input

    volume = load_input(tmp_path / "ct_FFS")
    labels = helpers.resample_nearest(case.labels, case.volume.geometry, volume.geometry)
    labels[:, :, :3] = 0  # the first planes empty: the first frame is not on the first image
    seg = Segmentation(labels, volume.geometry, rh.MODEL)
    headers = read_source_headers(volume)
    slow = build_seg(volume, seg, headers, fast=False)
    fast = build_seg(volume, seg, headers, fast=True)
    assert "osteoplan_frame_sources" in fast.__dict__
    slow.save_as(str(tmp_path / "slow.dcm"), enforce_file_format=True)
    seg_frames.save(fast, tmp_path / "fast.dcm")
    assert _differences(pydicom.dcmread(tmp_path / "slow.dcm"), pydicom.dcmread(tmp_path / "fast.dcm")) == []
