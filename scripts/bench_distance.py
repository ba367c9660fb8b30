#!/usr/bin/env python
"""Time the lesion <-> canal distance against a whole-volume scipy EDT on a CT-sized grid.

A 512 x 512 x 300 label map (0.7 x 0.7 x 1.25 mm) with a synthetic canal (a cylinder along k),
a vertebral-body block and a few spherical lesions at known gaps. Prints:
- our path: find_objects + canal surface KD-tree (once per study) + per-lesion exact box distance
  and centre-to-centre distance, and the whole ``measure_lesions`` call;
- scipy: ``distance_transform_edt(~canal, sampling=spacing)`` on the whole volume, read at each
  lesion's voxels;
- the largest difference between our centre variant and the EDT (should be ~0).

Usage: python scripts/bench_distance.py [--slices 300] [--skip-edt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import Postprocess  # noqa: E402
from pipeline.measure.canal import extract_canal  # noqa: E402
from pipeline.measure.distance import VoxelSurface, min_box_distance, min_centre_distance  # noqa: E402
from pipeline.measure.lesions import _components, _label_slices, measure_lesions  # noqa: E402
from pipeline.plan.engine import load_rules  # noqa: E402
from pipeline.types import BONE, CANAL, LESION, Geometry, ModelInfo, Segmentation, Volume  # noqa: E402

SPACING = (0.7, 0.7, 1.25)
CANAL_CENTRE = (256, 330)  # (i, j)
CANAL_R_MM = 7.0
# (gap to the canal surface mm, radius mm, slice): anterior of the canal, in the vertebral body
LESIONS = [(0.0, 8.0, 60), (3.0, 6.0, 110), (8.0, 10.0, 160), (15.0, 5.0, 210), (25.0, 12.0, 260)]


def build(slices: int) -> tuple[Volume, Segmentation]:
    shape = (512, 512, slices)
    geom = Geometry(shape, SPACING, (-179.0, -200.0, -300.0), np.eye(3))
    labels = np.zeros(shape, np.uint8)
    ii, jj = np.meshgrid(np.arange(512) * SPACING[0], np.arange(512) * SPACING[1], indexing="ij")
    ci, cj = CANAL_CENTRE[0] * SPACING[0], CANAL_CENTRE[1] * SPACING[1]
    body = (np.abs(ii - ci) < 25) & (jj < cj - CANAL_R_MM - 1) & (jj > cj - CANAL_R_MM - 45)
    canal = (ii - ci) ** 2 + (jj - cj) ** 2 <= CANAL_R_MM ** 2
    labels[body] = BONE
    labels[canal] = CANAL
    hu = np.where(labels == BONE, np.int16(200), np.int16(20)).astype(np.int16)
    for gap, r, k in LESIONS:
        if k >= slices:
            continue
        c = np.array([ci, cj - CANAL_R_MM - gap - r, k * SPACING[2]])
        lo = np.maximum(((c - r) / SPACING).astype(int) - 1, 0)
        hi = np.minimum(((c + r) / SPACING).astype(int) + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        idx = np.indices(hi - lo).reshape(3, -1).T + lo
        inside = (((idx * SPACING - c) ** 2).sum(1) <= r * r).reshape(hi - lo)
        sub = labels[box]
        sub[inside] = LESION
        hu[box][inside] = 60
    model = ModelInfo("bench", "0", "", (1.5, 1.5, 1.5))
    return Volume(hu, geom), Segmentation(labels, geom, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--skip-edt", action="store_true")
    args = ap.parse_args()
    vol, seg = build(args.slices)
    geom, labels = vol.geometry, seg.labels
    rules = load_rules()
    print(f"grid {geom.shape} spacing {geom.spacing}, {len(LESIONS)} lesions")

    t = time.perf_counter()
    ndimage.find_objects(labels, max_label=3)
    t_fo = time.perf_counter() - t
    t0 = time.perf_counter()
    boxes = _label_slices(labels)
    t1 = time.perf_counter()
    canal = extract_canal(labels, geom, boxes[CANAL], True, rules.measurement.canal.min_component_fraction)
    t2 = time.perf_counter()
    comps = _components(labels, boxes[LESION], geom, 0.05)
    t3 = time.perf_counter()
    ours_box, ours_centre = [], []
    for mask, offset in comps:
        s = VoxelSurface.from_mask(mask, geom.spacing, offset)
        ours_box.append(min_box_distance(s, canal.surface, geom).distance_mm)
        ours_centre.append(min_centre_distance(s, canal.surface).distance_mm)
    t4 = time.perf_counter()
    print(f"(for reference: ndimage.find_objects on the label map {t_fo:.3f} s)")
    print(f"ours: label bounding boxes {t1 - t0:.3f} s, canal surface + KD-tree {t2 - t1:.3f} s "
          f"({len(canal.surface)} surface voxels), lesion components {t3 - t2:.3f} s, "
          f"{len(comps)} lesion distances {t4 - t3:.3f} s; total {t4 - t0:.3f} s")
    t5 = time.perf_counter()
    lesions, _ = measure_lesions(vol, seg, Postprocess(), rules)
    print(f"measure_lesions (all features): {time.perf_counter() - t5:.3f} s")
    for les, c in zip(lesions, ours_centre):
        print(f"  lesion {les.id}: {les.volume_ml:.2f} mL, box distance {les.min_distance_to_canal_mm:.3f} mm, "
              f"centre distance {c:.3f} mm, diameter {les.max_diameter_mm:.1f} mm, {les.type}, {les.location}")
    if args.skip_edt:
        return
    t6 = time.perf_counter()
    edt = ndimage.distance_transform_edt(labels != CANAL, sampling=geom.spacing)
    t7 = time.perf_counter()
    diffs = []
    for (mask, offset), c in zip(comps, ours_centre):
        crop = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape))
        diffs.append(abs(float(edt[crop][mask].min()) - c))
    print(f"scipy EDT whole volume: {t7 - t6:.3f} s; max |centre variant - EDT| = {max(diffs):.2e} mm")


if __name__ == "__main__":
    main()
