"""Evaluation metrics: Dice/HD95 against analytic shapes, detection counting, and a phantom run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.train.evaluate import (align_labels, detect, dice, evaluate_folder, hd95,
                                     label_map_from_dataset_json, lesion_instances)
from pipeline.types import Geometry


def _ball(shape, centre, radius_mm, spacing):
    idx = np.indices(shape).astype(float)
    d2 = sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return d2 <= radius_mm ** 2


def test_dice_of_shifted_cubes_is_exact():
    a = np.zeros((40, 40, 40), bool)
    b = np.zeros_like(a)
    a[10:30, 10:30, 10:30] = True
    b[14:34, 10:30, 10:30] = True  # shifted by 4 of 20 voxels
    assert dice(a, b) == pytest.approx(16 / 20)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros_like(a), np.zeros_like(a)))
    assert dice(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.0)])
def test_hd95_of_concentric_balls_is_radius_difference(spacing):
    shape = (80, 80, 40)
    c = (40, 40, 20)
    inner, outer = _ball(shape, c, 10.0, spacing), _ball(shape, c, 16.0, spacing)
    # every surface point of one lies ~6 mm from the other's surface; voxelisation adds < 1 voxel
    assert hd95(inner, outer, spacing) == pytest.approx(6.0, abs=max(spacing) + 0.01)
    assert hd95(inner, inner, spacing) == 0.0
    # symmetric, and in mm: twice the spacing doubles the distance
    assert hd95(outer, inner, spacing) == hd95(inner, outer, spacing)
    assert hd95(inner, outer, tuple(2 * s for s in spacing)) == pytest.approx(2 * hd95(inner, outer, spacing))
    assert hd95(inner, np.zeros_like(inner), spacing) == math.inf
    assert math.isnan(hd95(np.zeros_like(inner), np.zeros_like(inner), spacing))


def test_hd95_sees_an_outlier_blob_only_when_it_is_large():
    sp = (1.0, 1.0, 1.0)
    truth = _ball((96, 64, 64), (30, 32, 32), 12.0, sp)
    pred = truth.copy()
    pred[85:87, 31:33, 31:33] = True  # a speck 40 mm away: few surface points, under the 5 % tail
    assert hd95(pred, truth, sp) < 1.5
    big = truth.copy()
    big |= _ball((96, 64, 64), (80, 32, 32), 8.0, sp)  # a large false blob moves the 95th percentile
    assert hd95(big, truth, sp) > 20.0


def test_detection_counts_hits_misses_and_false_positives():
    truth = np.zeros((60, 60, 30), np.uint16)
    pred = np.zeros_like(truth)
    truth[5:10, 5:10, 5:10] = 1
    truth[20:26, 20:26, 5:10] = 2
    truth[40:45, 40:45, 20:25] = 3  # missed
    pred[8:12, 8:12, 8:12] = 1  # overlaps true 1
    pred[21:23, 21:23, 6:8] = 2  # overlaps true 2
    pred[24:28, 24:28, 8:12] = 3  # also overlaps true 2: no false positive, no double count
    pred[50:55, 5:10, 5:10] = 4  # overlaps nothing: false positive
    d = detect(pred, truth)
    assert (d.n_true, d.n_pred, d.detected, d.false_positives) == (3, 4, 2, 1)
    assert d.sensitivity == pytest.approx(2 / 3)
    assert set(d.matches) == {1, 2}
    empty = detect(np.zeros_like(pred), truth)
    assert (empty.detected, empty.false_positives) == (0, 0)


def test_lesion_instances_follow_the_min_volume_rule():
    g = Geometry((40, 40, 20), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    lab = np.zeros(g.shape, np.uint8)
    lab[2:8, 2:8, 2:8] = 2  # 216 mm3
    lab[20:22, 20:22, 2:4] = 2  # 8 mm3 < 0.05 mL: dropped
    inst = lesion_instances(lab, g, 0.05)
    assert int(inst.max()) == 1 and int((inst == 1).sum()) == 216


def test_align_labels_reindexes_a_flipped_grid_exactly():
    g = Geometry((6, 5, 4), (1.0, 2.0, 3.0), (10.0, -5.0, 7.0), np.eye(3))
    lab = np.arange(120, dtype=np.uint8).reshape(6, 5, 4)
    flipped_dir = np.diag([-1.0, 1.0, 1.0])
    g2 = Geometry(g.shape, g.spacing, (15.0, -5.0, 7.0), flipped_dir)  # same voxel centres, i reversed
    out = align_labels(lab, g.affine_lps, g2)
    assert np.array_equal(out, lab[::-1])


def test_label_map_from_dataset_json_both_styles():
    v2 = {"labels": {"background": 0, "spinal_canal": 1, "metastasis": 2, "vertebra": 3}}
    msd = {"labels": {"0": "background", "1": "Bone", "2": "Tumour", "5": "cord"}}
    assert label_map_from_dataset_json(v2) == {1: 1, 2: 2, 3: 3}
    assert label_map_from_dataset_json(msd) == {1: 3, 2: 2, 5: 1}


@pytest.mark.slow
def test_evaluate_folder_on_a_phantom_gives_sane_metrics(tmp_path, shipped_model):
    import torch

    from pipeline.train.samples import write_samples

    torch.set_num_threads(1)
    write_samples(tmp_path / "data", n=1, seed=4242)
    res = evaluate_folder(tmp_path / "data", model=str(shipped_model), device="cpu", fast=True,
                          output=tmp_path / "out", quiet=True)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["kind"] == "phantom" and m["summary"]["n_cases"] == 1
    case = res["cases"][0]
    assert case["detection"]["n_true"] >= 2  # write_samples designs 2-3 lesions
    for name in ("canal", "bone"):
        d = case["classes"][name]["dice"]
        assert d is not None and 0.3 < d <= 1.0, (name, d)  # even the early phantom checkpoint finds spine
        assert 0.0 <= case["classes"][name]["hd95_mm"] < 60.0
    assert 0 <= case["detection"]["detected"] <= case["detection"]["n_true"]
    for row in case.get("distance", []):
        assert row["true_mm"] is not None and row["true_mm"] >= 0.0
