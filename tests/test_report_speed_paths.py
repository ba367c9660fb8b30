"""The writers' fast paths give the same results as the straightforward ways they replace."""

from __future__ import annotations

import random

import numpy as np
import pytest

import report_helpers as rh
from pipeline.report import seg as seg_mod
from pipeline.report.seg import SourceHeaders, aligned_to_grid, read_source_headers
from pipeline.types import Geometry


def _shifted(g: Geometry, dz: float) -> Geometry:
    return Geometry(g.shape, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + dz), g.direction)


@pytest.mark.parametrize("kind", ["HFS", "FFS", "OBLIQUE"])
def test_source_headers_remember_the_grid_check(tmp_path, kind):
    """read_source_headers' alignment is reused for its own grid and recomputed for any other one."""
    case = rh.dicom_case(tmp_path, kind, shape=(20, 16, 10))
    g = case.volume.geometry
    headers = read_source_headers(case.volume)
    assert isinstance(headers, SourceHeaders) and headers.aligned
    assert aligned_to_grid(headers, g)
    assert aligned_to_grid(list(headers), g)  # a plain list is checked from scratch
    same = Geometry(g.shape, g.spacing, g.origin, g.direction.copy())
    assert aligned_to_grid(headers, same)
    moved = _shifted(g, 0.5 * g.spacing[2])
    assert not aligned_to_grid(headers, moved)
    assert not aligned_to_grid(list(headers), moved)


def test_order_single_frame_matches_one_by_one_matching(tmp_path):
    """Blocked nearest-position matching gives the order (and the errors) of the slice-by-slice loop."""
    case = rh.dicom_case(tmp_path, "FFS", shape=(20, 16, 12))
    g = case.volume.geometry
    headers = list(read_source_headers(case.volume))
    random.Random(5).shuffle(headers)

    def one_by_one(hs, geom):
        nk = geom.shape[2]
        expected = geom.index_to_lps(np.stack([np.zeros(nk), np.zeros(nk), np.arange(nk)], axis=1))
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in hs])
        order = []
        for k in range(nk):
            dist = np.linalg.norm(pos - expected[k], axis=1)
            best = int(np.argmin(dist))
            if dist[best] > seg_mod.POSITION_TOL_MM:
                raise ValueError(f"no source image at the position of slice {k} (nearest {dist[best]:.3f} mm)")
            order.append(best)
        return [hs[i] for i in order]

    fast = seg_mod._order_single_frame(headers, g)
    assert all(a is b for a, b in zip(fast, one_by_one(headers, g)))
    for block in (1, 5, 256):
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        exp = g.index_to_lps(np.stack([np.zeros(12), np.zeros(12), np.arange(12)], axis=1))
        assert [headers[i] for i in seg_mod._nearest_positions(pos, exp, block)] == fast
    moved = _shifted(g, 0.3 * g.spacing[2])
    with pytest.raises(ValueError) as fast_err:
        seg_mod._order_single_frame(headers, moved)
    with pytest.raises(ValueError) as slow_err:
        one_by_one(headers, moved)
    assert str(fast_err.value) == str(slow_err.value)


def test_order_single_frame_rejects_wrong_orientation_or_size(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(20, 16, 8))
    headers = list(read_source_headers(case.volume))
    g = case.volume.geometry
    headers[3].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    headers[5].Rows = 99
    with pytest.raises(ValueError, match="orientation"):
        seg_mod._order_single_frame(headers, g)
    headers[3].ImageOrientationPatient = [float(v) for v in np.r_[g.direction[:, 0], g.direction[:, 1]]]
    with pytest.raises(ValueError, match="size"):
        seg_mod._order_single_frame(headers, g)


def _reference_sample_plane(hu, labels, geom, center, u, v, fov_mm, n_px):
    """sample_plane as first written: one lps_to_index over the whole plane, (N, 3) reductions."""
    from scipy import ndimage

    from pipeline.report.keyimages import AIR_HU

    mm = fov_mm / n_px
    offs = (np.arange(n_px) - (n_px - 1) / 2.0) * mm
    rr, cc = np.meshgrid(offs, offs, indexing="ij")
    lps = center[None, None, :] + cc[..., None] * u[None, None, :] + rr[..., None] * v[None, None, :]
    idx = geom.lps_to_index(lps.reshape(-1, 3))
    shape = np.array(geom.shape)
    lo = np.clip(np.floor(idx.min(0)).astype(int) - 1, 0, shape - 1)
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + 2, 1, shape)
    if np.any(hi <= lo):
        return np.full((n_px, n_px), AIR_HU), np.zeros((n_px, n_px), np.uint8)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = (idx - lo).T
    img = ndimage.map_coordinates(np.asarray(hu[crop], dtype=np.float32), local, order=1, mode="constant",
                                  cval=AIR_HU)
    lab = ndimage.map_coordinates(np.asarray(labels[crop], dtype=np.uint8), local, order=0, mode="constant", cval=0)
    outside = np.any((idx < -0.5) | (idx > shape - 0.5), axis=1)
    img[outside] = AIR_HU
    lab[outside] = 0
    return img.reshape(n_px, n_px), lab.reshape(n_px, n_px)


@pytest.mark.parametrize("kind", ["HFS", "FFS", "FLIPPED", "OBLIQUE"])
def test_lps_to_index_by_rows_equals_whole_product(kind):
    from pipeline.report.keyimages import lps_to_index_by_rows

    geom, _ = rh.make_geometry(kind, shape=(64, 60, 40))
    pts = np.random.default_rng(1).uniform(-150, 150, size=(360 * 360 + 17, 3))
    np.testing.assert_array_equal(lps_to_index_by_rows(geom, pts), geom.lps_to_index(pts))
    np.testing.assert_array_equal(lps_to_index_by_rows(geom, pts, rows=1000), geom.lps_to_index(pts))
    np.testing.assert_array_equal(lps_to_index_by_rows(geom, pts[:10]), geom.lps_to_index(pts[:10]))


@pytest.mark.parametrize("kind", ["HFS", "FFS", "FLIPPED", "OBLIQUE"])
def test_sample_plane_equals_reference(kind):
    """Same HU and labels, bit for bit, inside, across and outside the volume."""
    from pipeline.report.keyimages import PANEL_PX, PLANES, sample_plane

    geom, _ = rh.make_geometry(kind, shape=(64, 60, 40))
    labels = rh.phantom_labels(geom)
    hu = rh.phantom_hu(labels)
    inside = geom.index_to_lps([[32, 30, 20]])[0]
    corner = geom.index_to_lps([[1, 2, 3]])[0]
    far = inside + 5000.0
    for center, fov in ((inside, 20.0), (inside, 60.0), (corner, 120.0), (far, 60.0)):
        for u, v, _ in PLANES.values():
            p = sample_plane(hu, labels, geom, center, u, v, fov)
            ref_hu, ref_lab = _reference_sample_plane(hu, labels, geom, center, u, v, fov, PANEL_PX)
            np.testing.assert_array_equal(p.hu, ref_hu)
            np.testing.assert_array_equal(p.labels, ref_lab)


def test_key_pngs_keep_their_pixels(tmp_path):
    """Compression level only: the PNG written by write_html decodes to the rendered image."""
    from PIL import Image

    from pipeline.report.html import write_html
    from pipeline.report.json_report import build_report
    from pipeline.report.keyimages import key_image

    case = rh.dicom_case(tmp_path, "OBLIQUE", shape=(30, 26, 12))
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    out = tmp_path / "html"
    out.mkdir()
    write_html(out, case.volume, case.seg, rep)
    for les in rep["lesions"]:
        expected = np.asarray(key_image(np.asarray(case.volume.array), case.seg.labels, case.seg.geometry, les))
        written = np.asarray(Image.open(out / f"key_lesion{les['id']}.png").convert("RGB"))
        np.testing.assert_array_equal(written, expected)


def test_warm_dicom_writers_loads_highdicom_tables_once():
    from highdicom import _standard_utils as su

    from pipeline.report import warmup

    assert warmup.warm_dicom_writers(("json", "csv", "html"), deidentify=False) is None
    assert warmup.warm_dicom_writers(("seg", "sr"), deidentify=True) is None
    thread = warmup.warm_dicom_writers(("seg",), deidentify=False)
    assert thread is not None and thread.daemon
    assert warmup.warm_dicom_writers(("sr",), deidentify=False) is thread  # once per process
    warmup.wait_for_warmup()
    assert not thread.is_alive()
    for table in (su.get_sop_class_iod_map, su.get_iod_module_map, su.get_module_attribute_map):
        assert table.cache_info().currsize == 1


def test_source_prefetch_gives_the_headers_read_source_headers_gives(tmp_path):
    from pipeline.report.seg import SourcePrefetch

    case = rh.dicom_case(tmp_path, "FFS", shape=(20, 16, 10))
    pre = SourcePrefetch(case.volume)
    got = pre.result(case.volume)
    assert isinstance(got, SourceHeaders) and got.aligned
    assert [str(h.SOPInstanceUID) for h in got] == list(case.volume.dicom.sop_instance_uids)
    # files re-ordered or grid moved after the start: read again, never stale headers
    case.volume.dicom.files = list(reversed(case.volume.dicom.files))
    again = pre.result(case.volume)
    assert again is not got and [h.SOPInstanceUID for h in again] == [h.SOPInstanceUID for h in got]
    g = case.volume.geometry
    case.volume.geometry = _shifted(g, 0.5 * g.spacing[2])
    assert not pre.result(case.volume).aligned


def test_source_prefetch_hands_over_read_errors(tmp_path):
    from pipeline.report.seg import SourcePrefetch

    case = rh.dicom_case(tmp_path, "HFS", shape=(20, 16, 6))
    case.volume.dicom.files[2].unlink()
    pre = SourcePrefetch(case.volume)
    with pytest.raises(FileNotFoundError):
        pre.result(case.volume)


def test_start_source_prefetch_only_when_seg_or_sr_is_written(tmp_path):
    from pipeline.report.writers import start_source_prefetch

    case = rh.dicom_case(tmp_path, "HFS", shape=(20, 16, 6))
    assert start_source_prefetch(case.volume, ("json", "html"), deidentify=False) is None
    assert start_source_prefetch(case.volume, ("seg", "sr"), deidentify=True) is None
    assert start_source_prefetch(rh.nifti_like_case().volume, ("seg", "sr"), deidentify=False) is None
    assert start_source_prefetch(case.volume, ("sr",), deidentify=False) is not None
    from pipeline.report import warmup

    assert warmup._thread is not None  # highdicom's tables are being (or have been) loaded


def test_write_all_with_prefetched_sources_writes_the_same_seg(tmp_path):
    import highdicom as hd

    from pipeline.report.json_report import build_report
    from pipeline.report.writers import start_source_prefetch, write_all
    from pipeline.study import Timer

    case = rh.dicom_case(tmp_path, "OBLIQUE", shape=(24, 20, 10))
    out = {}
    for name, sources in (("plain", None), ("prefetched", start_source_prefetch(case.volume, ("seg",), False))):
        rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                           timings={}, fast=False, deidentify=False)
        write_all(tmp_path / name, case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
                  formats=("seg", "sr"), deidentify=False, timer=Timer(), sources=sources)
        assert rep["warnings"] == []
        out[name] = hd.seg.segread(tmp_path / name / "seg.dcm")
    a, b = out["plain"], out["prefetched"]
    assert int(a.NumberOfFrames) == int(b.NumberOfFrames)
    assert a.PixelData == b.PixelData
    refs = [[str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
             [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]]
            for f in a.PerFrameFunctionalGroupsSequence]
    assert refs == [[str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
                     [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]]
                    for f in b.PerFrameFunctionalGroupsSequence]


def test_key_images_in_threads_equal_one_by_one(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.report import html as html_mod
    from pipeline.report.json_report import build_report

    case = rh.dicom_case(tmp_path, "FLIPPED", shape=(30, 26, 12))
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    rep["lesions"] = [dict(rep["lesions"][n % len(rep["lesions"])], id=n + 1) for n in range(5)]
    pages = {}
    for threads in (1, 4):
        monkeypatch.setattr(html_mod, "MAX_KEY_IMAGE_THREADS", threads)
        monkeypatch.setattr(html_mod, "_usable_cpus", lambda: 4)
        out = tmp_path / f"t{threads}"
        out.mkdir()
        pages[threads] = html_mod.write_html(out, case.volume, case.seg, rep).read_text()
    assert pages[1] == pages[4]
    for n in range(1, 6):
        a = np.asarray(Image.open(tmp_path / "t1" / f"key_lesion{n}.png"))
        b = np.asarray(Image.open(tmp_path / "t4" / f"key_lesion{n}.png"))
        np.testing.assert_array_equal(a, b)


def test_key_image_failure_still_fails_write_html(tmp_path, monkeypatch):
    from pipeline.report import html as html_mod
    from pipeline.report.json_report import build_report

    case = rh.dicom_case(tmp_path, "HFS", shape=(30, 26, 12))
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    rep["lesions"] = [dict(rep["lesions"][0], id=n + 1) for n in range(3)]
    rep["lesions"][1] = dict(rep["lesions"][1], closest_point_lesion_lps_mm=None, centroid_lps_mm=None)
    monkeypatch.setattr(html_mod, "_usable_cpus", lambda: 4)
    with pytest.raises(IndexError):  # no centre for lesion 2: the error of the one-by-one loop
        html_mod.write_html(tmp_path, case.volume, case.seg, rep)
    assert not (tmp_path / "report.html").exists()


def test_write_all_pauses_and_restores_the_cyclic_gc(tmp_path, monkeypatch):
    import gc

    from pipeline.report import writers
    from pipeline.report.json_report import build_report
    from pipeline.study import Timer

    case = rh.dicom_case(tmp_path, "HFS", shape=(20, 16, 6))
    rep = build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="palliative",
                       timings={}, fast=False, deidentify=False)
    seen = []
    real_csv = writers.csv_out.write_csv

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_csv(*args, **kwargs)

    monkeypatch.setattr(writers.csv_out, "write_csv", spy)
    assert gc.isenabled()
    writers.write_all(tmp_path / "a", case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
                      formats=("csv",), deidentify=False, timer=Timer())
    assert seen == [False] and gc.isenabled()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers.csv_out, "write_csv", boom)
    with pytest.raises(OSError):
        writers.write_all(tmp_path / "b", case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
                          formats=("csv",), deidentify=False, timer=Timer())
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that runs without the collector keeps it off
        writers.write_all(tmp_path / "c", case.volume, case.seg, case.lesions, case.recs, case.canal, rep,
                          formats=("json",), deidentify=False, timer=Timer())
        assert not gc.isenabled()
    finally:
        gc.enable()
