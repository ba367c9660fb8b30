"""HTML report and key images: content, display orientation, aspect ratio, and a real browser render."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import report_helpers as rh
from pipeline import DISCLAIMER
from pipeline.report import codes
from pipeline.report.html import write_html
from pipeline.report.json_report import build_report
from pipeline.report.keyimages import PLANES, key_image, sample_plane
from pipeline.types import LESION

CHROMIUM = "/usr/bin/chromium"


def _report(case, deidentify=False):
    return build_report(case.volume, case.seg, case.lesions, case.recs, case.canal, intent="curative",
                        timings={"load": 0.25}, fast=False, deidentify=deidentify)


@pytest.mark.parametrize("kind", ["HFS", "FFS", "FLIPPED", "OBLIQUE"])
def test_plane_orientation_is_radiological(kind):
    """Markers placed in patient space land on the conventional side of each panel, for any grid."""
    geom, _ = rh.make_geometry(kind, shape=(64, 60, 40), spacing=(0.8, 0.9, 2.0))
    centre = geom.index_to_lps([[32, 30, 20]])[0]
    offsets = {"left": (15, 0, 0), "anterior": (0, -15, 0), "superior": (0, 0, 15)}
    for name, off in offsets.items():
        labels = np.zeros(geom.shape, np.uint8)
        idx = np.rint(geom.lps_to_index(centre + np.array(off))[0]).astype(int)
        labels[tuple(slice(max(0, v - 1), v + 2) for v in idx)] = LESION
        hu = np.zeros(geom.shape, np.float32)
        for plane_name, (u, v, _) in PLANES.items():
            p = sample_plane(hu, labels, geom, geom.index_to_lps([idx])[0] - np.array(off), u, v, 80.0, 200)
            rows, cols = np.nonzero(p.labels == LESION)
            if plane_name == "axial" and name == "superior" or plane_name == "sagittal" and name == "left":
                continue  # out of plane
            assert rows.size, (kind, plane_name, name)
            r, c = rows.mean() - 99.5, cols.mean() - 99.5
            if plane_name == "axial":
                expect = {"left": c > 10 and abs(r) < 5, "anterior": r < -10 and abs(c) < 5}[name]
            else:
                expect = {"anterior": c < -10 and abs(r) < 5, "superior": r < -10 and abs(c) < 5}[name]
            assert expect, (kind, plane_name, name, r, c)


def test_plane_true_aspect_ratio_on_anisotropic_oblique_grid():
    geom, _ = rh.make_geometry("OBLIQUE", shape=(64, 60, 40), spacing=(0.7, 0.7, 2.5))
    i, j, k = np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij")
    lps = geom.index_to_lps(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*geom.shape, 3)
    centre = geom.index_to_lps([[32, 30, 20]])[0]
    labels = (np.linalg.norm(lps - centre, axis=-1) <= 12.0).astype(np.uint8) * LESION
    hu = np.zeros(geom.shape, np.float32)
    for plane_name, (u, v, _) in PLANES.items():
        p = sample_plane(hu, labels, geom, centre, u, v, 60.0, 240)
        rows, cols = np.nonzero(p.labels == LESION)
        h, w = (rows.max() - rows.min() + 1) * p.mm_per_px, (cols.max() - cols.min() + 1) * p.mm_per_px
        assert abs(h - 24.0) < 3.0 and abs(w - 24.0) < 3.0, (plane_name, h, w)


def test_key_image_shows_outlines_and_distance_line(tmp_path):
    case = rh.nifti_like_case("FFS")
    rep = _report(case)
    img = np.asarray(key_image(np.asarray(case.volume.array), case.labels, case.volume.geometry, rep["lesions"][0]))
    assert img.shape[1] > img.shape[0] * 1.8  # axial | sagittal side by side
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    meta = codes.label_meta(None)
    assert codes.rgb(meta[1]) in colours and codes.rgb(meta[2]) in colours
    from pipeline.report.keyimages import LINE_RGB
    assert LINE_RGB in colours


def test_html_page_content(tmp_path):
    case = rh.nifti_like_case("HFS")
    case.volume.warnings.append("slice thickness <b>varies</b>")
    rep = _report(case)
    page = write_html(tmp_path, case.volume, case.seg, rep)
    text = page.read_text()
    assert html.escape(DISCLAIMER) in text and "class='disclaimer'" in text
    assert "<b>varies</b>" not in text and "&lt;b&gt;varies&lt;/b&gt;" in text  # escaped
    for les in rep["lesions"]:
        assert f"key_lesion{les['id']}.png" in text
        assert (tmp_path / f"key_lesion{les['id']}.png").exists()
        assert les["recommendation"]["primary"] in text
    for rule in ("R-CONSOLIDATE", "R-HEAT", "Nakatsuka, CVIR 2009", "Borderline", "<th>if below</th>", rh.MODEL.name):
        assert rule in text
    # offline: no external resources
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", text)
    assert "<script" not in text


def test_html_deidentified_has_no_uid(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(32, 28, 10))
    rep = _report(case, deidentify=True)
    out = tmp_path / "out"
    out.mkdir()
    text = write_html(out, case.volume, case.seg, rep).read_text()
    assert case.volume.dicom.study_instance_uid not in text
    assert case.volume.dicom.series_instance_uid not in text
    assert str(case.series_dir) not in text


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed")
def test_html_renders_in_headless_chromium(tmp_path):
    case = rh.nifti_like_case("OBLIQUE")
    rep = _report(case)
    out = tmp_path / "study"
    out.mkdir()
    page = write_html(out, case.volume, case.seg, rep)
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    non_white = (img.min(axis=2) < 235).mean()
    assert non_white > 0.05, non_white
    colours = {tuple(c) for c in img[::2, ::2].reshape(-1, 3)}
    assert len(colours) > 200
    # the key images were loaded (their outline colours appear) and the disclaimer box is drawn
    meta = codes.label_meta(None)
    lesion_rgb = np.array(codes.rgb(meta[LESION]))
    assert (np.abs(img.astype(int) - lesion_rgb).sum(axis=2) < 30).sum() > 50
    assert (np.abs(img.astype(int) - np.array([198, 40, 40])).sum(axis=2) < 30).sum() > 200
    shutil.copy(shot, Path(os.environ.get("OSTEOPLAN_KEEP_SCREENSHOT", tmp_path / "keep.png")))


def test_series_selection_row_says_what_was_chosen_and_passed_over():
    from pipeline.report.html import _selection_text

    sel = {"chosen": {"series_number": 3, "series_description": "Body 1.0", "n_slices": 56, "slice_spacing_mm": 2.0,
                      "orientation": "axial", "reason": "the only CT series that can form a volume",
                      "resampled": None},
           "passed_over": [{"modality": "CT", "n_files": 1, "reason": "localizer/scout image"}]}
    text = _selection_text(sel)
    assert text == ("chosen series 3 (Body 1.0) [56 slices, 2.0 mm apart, axial]: the only CT series that can form "
                    "a volume; passed over a CT series (1 file): localizer/scout image")
    assert _selection_text(None) == "" and _selection_text({"chosen": None}) == ""


def test_lesion_edges_row_says_what_the_lytic_refinement_did(tmp_path):
    from pipeline.report.html import _refine_text

    assert _refine_text(None) == ""
    assert _refine_text({"enabled": False, "lesions_examined": 0, "lesions_grown": 0,
                         "voxels_added": 0}) == "as segmented (lytic refinement off)"
    assert _refine_text({"enabled": True, "lesions_examined": 2, "lesions_grown": 0,
                         "voxels_added": 0}) == "as segmented (no lytic lesion grew)"
    text = _refine_text({"enabled": True, "lesions_examined": 3, "lesions_grown": 1, "voxels_added": 32})
    assert text.startswith("1 lytic lesion(s) grown") and "32 voxel(s) added" in text
    case = rh.nifti_like_case("HFS")
    case.seg.postprocess = {"lesion_refine": {"enabled": True, "lesions_examined": 2, "lesions_grown": 2,
                                              "voxels_added": 140}}
    page = write_html(tmp_path, case.volume, case.seg, _report(case)).read_text()
    assert "Lesion edges" in page and "140 voxel(s) added" in page
