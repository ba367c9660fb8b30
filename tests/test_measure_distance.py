"""Lesion <-> canal distance: analytic shapes, exactness against brute force and EDT, invariance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from measure_helpers import (DIRECTIONS, brute_force_gap, centred_geometry, cylinder_s, flip_storage, lps_grid,
                             sphere, transpose_storage)
from pipeline.measure.distance import (VoxelSurface, box_closest_points, box_gap_mm, distance_uncertainty_mm,
                                       mask_distance, min_box_distance, min_centre_distance, surface_indices)
from pipeline.types import Geometry

SPACING = (0.7, 0.7, 2.5)
SPHERE_R, CANAL_R = 6.0, 5.0


def _scene(gap: float, direction: np.ndarray, spacing=SPACING, shape=(80, 48, 16)):
    """A sphere whose surface is ``gap`` mm from an S-axis cylinder, on a grid of any direction."""
    geom = centred_geometry(shape, spacing, direction)
    pts = lps_grid(geom)
    canal_axis = np.array([-(CANAL_R + gap + SPHERE_R) / 2, 0.0])
    centre = np.array([canal_axis[0] + CANAL_R + gap + SPHERE_R, 0.0, 0.0])
    return geom, sphere(geom, centre, SPHERE_R, pts), cylinder_s(geom, canal_axis, CANAL_R, pts), centre, canal_axis


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("gap", [0.0, 3.0, 7.5, 12.0])
def test_sphere_beside_cylinder_matches_analytic_gap(gap, direction):
    geom, les, canal, centre, axis = _scene(gap, DIRECTIONS[direction])
    les &= ~canal  # one label per voxel, as in a label map
    pair = mask_distance(les, canal, geom)
    diag = geom.voxel_diagonal_mm
    assert abs(pair.distance_mm - gap) <= diag, (pair.distance_mm, gap)
    pl, pc = map(np.asarray, pair.points_lps(geom))
    assert np.linalg.norm(pl - pc) == pytest.approx(pair.distance_mm, abs=1e-6)
    # the lesion point lies on the sphere's surface, the canal point on the cylinder's, to a voxel
    assert abs(np.linalg.norm(pl - centre) - SPHERE_R) <= diag
    assert abs(np.linalg.norm(pc[:2] - axis) - CANAL_R) <= diag
    # and they face each other: the canal point is on the sphere's side of the canal
    assert pc[0] > axis[0] and pl[0] < centre[0]
    assert pair.distance_mm == 0.0 or pair.distance_mm > gap - diag


def test_zero_when_touching_and_gap_formula():
    sp = (0.7, 0.9, 2.5)
    assert box_gap_mm(np.array([1, -1, 1]), sp) == 0.0  # 26-adjacent boxes touch
    assert box_gap_mm(np.array([2, 0, 0]), sp) == pytest.approx(0.7)
    assert box_gap_mm(np.array([3, -2, 4]), sp) == pytest.approx(np.sqrt((2 * 0.7) ** 2 + 0.9 ** 2 + (3 * 2.5) ** 2))
    pa, pb = box_closest_points(np.array([0, 0, 0]), np.array([3, 1, 0]))
    assert np.allclose(pa, [0.5, 0.5, 0.0]) and np.allclose(pb, [2.5, 0.5, 0.0])
    geom = Geometry((6, 6, 6), sp, (0, 0, 0), np.eye(3))
    a = np.zeros(geom.shape, bool)
    b = np.zeros(geom.shape, bool)
    a[1, 1, 1] = True
    b[2, 2, 2] = True
    pair = mask_distance(a, b, geom)
    assert pair.distance_mm == 0.0
    assert np.allclose(pair.point_a_ijk, pair.point_b_ijk) and np.allclose(pair.point_a_ijk, [1.5, 1.5, 1.5])


def test_overlapping_masks_give_zero():
    geom = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    a = np.zeros(geom.shape, bool)
    a[1:7, 1:7, 1:7] = True
    b = np.zeros(geom.shape, bool)
    b[4, 4, 4] = True  # deep inside a: surfaces alone would miss the overlap
    assert mask_distance(a, b, geom).distance_mm == 0.0


def _random_pair(seed: int):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(6, 12, size=3))
    spacing = tuple(float(x) for x in rng.uniform(0.4, 3.0, size=3))
    a = ndimage.binary_dilation(rng.random(shape) < 0.04, iterations=1) & (rng.random(shape) < 0.8)
    b = (rng.random(shape) < 0.12) & ~ndimage.binary_dilation(a, iterations=int(rng.integers(0, 3)))
    if not a.any():
        a[0, 0, 0] = True
        b[0, 0, 0] = False
    if not b.any():
        b[-1, -1, -1] = True
        a[-1, -1, -1] = False
    return a, b, spacing


@pytest.mark.parametrize("seed", range(25))
def test_kdtree_equals_brute_force_and_centre_equals_edt(seed):
    a, b, spacing = _random_pair(seed)
    geom = Geometry(a.shape, spacing, (0, 0, 0), np.eye(3))
    pair = mask_distance(a, b, geom)
    assert pair.distance_mm == pytest.approx(brute_force_gap(a, b, spacing), abs=1e-9)
    assert a[pair.voxel_a] and b[pair.voxel_b]
    assert np.linalg.norm((pair.point_a_ijk - pair.point_b_ijk) * spacing) == pytest.approx(pair.distance_mm, abs=1e-9)
    edt = ndimage.distance_transform_edt(~b, sampling=spacing)
    centre = mask_distance(a, b, geom, centre=True)
    assert centre.distance_mm == pytest.approx(float(edt[a].min()), abs=1e-6)
    assert centre.distance_mm >= pair.distance_mm


def test_kdtree_exact_on_large_flat_faces_with_many_near_ties():
    # two parallel slabs at an oblique offset: thousands of pairs within a voxel diagonal of the minimum
    sp = (0.6, 0.6, 3.0)
    shape = (22, 24, 10)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[2:20, 2:8, 1:9] = True
    b[3:21, 13:19, 2:10] = True
    geom = Geometry(shape, sp, (0, 0, 0), np.eye(3))
    assert mask_distance(a, b, geom).distance_mm == pytest.approx(brute_force_gap(a, b, sp), abs=1e-9)


def test_surface_indices_are_the_boundary_only():
    m = np.zeros((7, 7, 7), bool)
    m[1:6, 1:6, 1:6] = True
    surf = surface_indices(m, offset=(10, 0, 0))
    assert len(surf) == 5 ** 3 - 3 ** 3
    assert surf[:, 0].min() == 11
    full = np.ones((3, 3, 3), bool)  # touching the array border: border voxels are surface
    assert len(surface_indices(full)) == 26


@pytest.mark.parametrize("seed", range(6))
def test_storage_flips_and_transposes_do_not_change_distance_or_points(seed):
    a, b, spacing = _random_pair(100 + seed)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    geom = Geometry(a.shape, spacing, tuple(rng.uniform(-100, 100, 3)), q)
    ref = mask_distance(a, b, geom)
    ref_pts = np.asarray(ref.points_lps(geom))
    ref_c = mask_distance(a, b, geom, centre=True)
    variants = []
    for axis in range(3):
        fa, g2 = flip_storage(a, geom, axis)
        fb, _ = flip_storage(b, geom, axis)
        variants.append((fa, fb, g2))
    for perm in ([1, 0, 2], [2, 0, 1], [0, 2, 1]):
        ta, g2 = transpose_storage(a, geom, perm)
        tb, _ = transpose_storage(b, geom, perm)
        variants.append((ta, tb, g2))
    fa, g2 = flip_storage(*transpose_storage(a, geom, [2, 1, 0]), 1)
    fb, _ = flip_storage(*transpose_storage(b, geom, [2, 1, 0]), 1)
    variants.append((fa, fb, g2))
    for va, vb, g in variants:
        pair = mask_distance(va, vb, g)
        assert pair.distance_mm == pytest.approx(ref.distance_mm, abs=1e-9)
        assert np.allclose(np.asarray(pair.points_lps(g)), ref_pts, atol=1e-6)
        c = mask_distance(va, vb, g, centre=True)
        assert c.distance_mm == pytest.approx(ref_c.distance_mm, abs=1e-9)
        assert np.allclose(np.asarray(c.points_lps(g)), np.asarray(ref_c.points_lps(geom)), atol=1e-6)


def test_surface_tree_reused_and_same_grid_required():
    sp = (1.0, 1.0, 2.0)
    a = VoxelSurface.from_indices(np.array([[0, 0, 0]]), sp)
    b = VoxelSurface.from_indices(np.array([[5, 0, 0], [0, 0, 4]]), sp)
    assert min_box_distance(a, b).distance_mm == pytest.approx(4.0)  # (5-1)*1 vs (4-1)*2
    assert min_centre_distance(a, b).distance_mm == pytest.approx(5.0)
    with pytest.raises(ValueError):
        min_box_distance(a, VoxelSurface.from_indices(np.array([[3, 3, 3]]), (1.0, 1.0, 1.0)))
    with pytest.raises(ValueError):
        VoxelSurface.from_indices(np.zeros((0, 3)), sp)


def test_uncertainty_is_diagonal_of_coarser_grid_per_axis():
    assert distance_uncertainty_mm((0.7, 0.7, 2.5), (1.5, 1.5, 1.5)) == pytest.approx(np.sqrt(1.5 ** 2 * 2 + 2.5 ** 2))
    assert distance_uncertainty_mm((2.0, 2.0, 2.0), (1.5, 1.5, 1.5)) == pytest.approx(np.sqrt(12.0))
    assert distance_uncertainty_mm((1.0, 1.0, 1.0), None) == pytest.approx(np.sqrt(3.0))
