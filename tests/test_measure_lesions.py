"""measure_lesions: instances, size, HU, type, location, canal handling, distances in a label map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from measure_helpers import (DIRECTIONS, MODEL, centred_geometry, cylinder_s, flip_storage, lps_grid, sphere,
                             transpose_storage, volume_seg)
from pipeline.config import Postprocess
from pipeline.measure.distance import distance_uncertainty_mm
from pipeline.measure.lesions import measure_lesions
from pipeline.plan.engine import load_rules
from pipeline.types import BONE, CANAL, LESION, Lesion

RULES = load_rules()
POST = Postprocess(require_bone_contact=False)  # scenes test measurements, not the bone-contact filter
SPACING = (0.8, 0.8, 2.0)
CANAL_AXIS = (0.0, 10.0)  # (L, P): the canal runs along S, posterior of the vertebral body
CANAL_R = 6.0


class Scene:
    """A schematic spine in LPS: canal, vertebral body (anterior), posterior arch, a lateral 'rib'."""

    def __init__(self, direction=np.eye(3), spacing=SPACING, shape=(160, 80, 20), bone_hu=200.0,
                 canal=True, bone=True, seed=0):
        self.geom = centred_geometry(shape, spacing, direction, centre_lps=(0.0, 3.0, 0.0))
        self.pts = lps_grid(self.geom)
        L, P = self.pts[..., 0], self.pts[..., 1]
        self.labels = np.zeros(shape, np.uint8)
        if bone:
            self.labels[(np.abs(L) <= 20) & (P >= -25) & (P <= 3)] = BONE  # vertebral body
            self.labels[(np.abs(L) <= 15) & (P >= 17) & (P <= 32)] = BONE  # posterior arch
            self.labels[(L >= 45) & (L <= 62) & (P >= -10) & (P <= 10)] = BONE  # other bone (rib/pelvis)
        if canal:
            self.labels[cylinder_s(self.geom, CANAL_AXIS, CANAL_R, self.pts)] = CANAL
        rng = np.random.default_rng(seed)
        self.hu = np.where(self.labels == BONE, bone_hu, 0.0) + rng.normal(0, 8, shape)
        self.hu[self.labels == CANAL] = 15.0
        self.bone_hu = bone_hu

    def add_sphere(self, centre, radius, hu):
        m = sphere(self.geom, centre, radius, self.pts)
        self.labels[m] = LESION
        self.hu[m] = hu if np.isscalar(hu) else np.asarray(hu)[m]
        return m

    def measure(self, post=POST, rules=RULES, model=MODEL):
        vol, seg = volume_seg(self.labels, self.hu.astype(np.float32), self.geom, model)
        return measure_lesions(vol, seg, post, rules)


def test_instances_ordered_by_volume_small_ones_dropped_and_volumes_exact():
    s = Scene()
    small = s.add_sphere((0, -8, -4), 4.0, 50.0)
    big = s.add_sphere((-8, 25, 4), 5.5, 50.0)
    s.labels[100, 10, 10] = LESION  # 1.3 uL speck < min_lesion_volume_ml
    lesions, canal = s.measure()
    assert canal.found and canal.volume_ml > 0
    assert [l.id for l in lesions] == [1, 2]
    vox_ml = np.prod(SPACING) / 1000.0
    assert lesions[0].voxel_count == int(big.sum()) and lesions[1].voxel_count == int(small.sum())
    assert lesions[0].volume_ml == pytest.approx(big.sum() * vox_ml)
    assert not any(l.solitary for l in lesions)
    lesions2, _ = s.measure(post=Postprocess(min_lesion_volume_ml=0.0))
    assert len(lesions2) == 3


@pytest.mark.parametrize("direction", ["identity", "oblique", "ffs"])
def test_sphere_size_hu_centroid_and_distance(direction):
    s = Scene(direction=DIRECTIONS[direction], shape=(120, 110, 24))
    centre = np.array([0.0, -11.0, 1.0])
    r = 7.0
    m = s.add_sphere(centre, r, 60.0)
    (les,), canal = s.measure()
    assert les.solitary and les.type == "lytic"
    assert abs(les.max_diameter_mm - 2 * r) <= s.geom.voxel_diagonal_mm
    assert les.volume_ml == pytest.approx(4 / 3 * np.pi * r ** 3 / 1000, rel=0.12)
    assert np.linalg.norm(np.asarray(les.centroid_lps_mm) - centre) < 0.5
    assert les.mean_hu == pytest.approx(float(s.hu[m].mean()), abs=1e-3)
    gap = (CANAL_AXIS[1] - centre[1]) - CANAL_R - r  # 21 - 6 - 7 = 8 mm
    assert abs(les.min_distance_to_canal_mm - gap) <= s.geom.voxel_diagonal_mm
    pl, pc = np.asarray(les.closest_point_lesion_lps_mm), np.asarray(les.closest_point_canal_lps_mm)
    assert np.linalg.norm(pl - pc) == pytest.approx(les.min_distance_to_canal_mm, abs=1e-6)
    assert pc[1] < CANAL_AXIS[1] and pl[1] > centre[1]  # facing each other across the gap
    assert les.distance_uncertainty_mm == pytest.approx(distance_uncertainty_mm(SPACING, MODEL.spacing_mm))
    assert not les.canal_contact and les.location == "vertebral_body"
    lo, hi = les.bbox_ijk
    assert all(0 <= a < b <= n for a, b, n in zip(lo, hi, s.geom.shape))
    json.dumps(les.features)


@pytest.mark.parametrize("r", [1.0, 4.0, 10.0, 15.5])
def test_feret_diameter_of_spheres_and_flat_lesions(r):
    from pipeline.measure.shape import max_feret_diameter
    from pipeline.measure.distance import surface_indices
    n = int(2 * r + 5)
    idx = np.indices((n, n, n)).reshape(3, -1).T - n // 2 + 0.3
    ball = ((idx ** 2).sum(1) <= r * r).reshape(n, n, n)
    f = max_feret_diameter(surface_indices(ball), (1.0, 1.0, 1.0))
    assert abs(f.diameter_mm - 2 * r) <= 1.0
    slab = np.zeros((40, 30, 3), bool)
    slab[5:35, 10:12, 1] = True  # one slice thick: a flat hull
    f = max_feret_diameter(surface_indices(slab), (0.5, 0.5, 3.0))
    assert f.diameter_mm == pytest.approx(np.hypot(29 * 0.5, 0.5) + 0.5)
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert max_feret_diameter(surface_indices(single), (0.5, 0.5, 3.0)).diameter_mm == pytest.approx(3.0)


def test_contact_gives_zero_and_shared_point():
    s = Scene()
    s.add_sphere((0.0, 10.0 - CANAL_R - 4.0, 0.0), 4.5, 40.0)  # overlaps the canal wall: the lesion label wins
    (les,), _ = s.measure()
    assert les.min_distance_to_canal_mm == 0.0 and les.canal_contact
    assert np.allclose(les.closest_point_lesion_lps_mm, les.closest_point_canal_lps_mm)


def test_no_canal():
    s = Scene(canal=False)
    s.add_sphere((0, -10, 0), 5.0, 40.0)
    (les,), canal = s.measure()
    assert not canal.found and canal.volume_ml == 0.0
    assert les.min_distance_to_canal_mm is None and les.closest_point_canal_lps_mm is None
    assert les.closest_point_lesion_lps_mm is None
    assert not les.canal_contact and les.location == "unknown"


def test_canal_split_by_lesion_keeps_both_parts_but_drops_specks():
    s = Scene()
    S = s.pts[..., 2]
    gap_slices = (S > 6) & (S < 14)
    s.labels[(s.labels == CANAL) & gap_slices] = 0  # canal interrupted: lower part is ~40% of the whole
    s.add_sphere((-CANAL_R - 5.0, 10.0, -12.0), 4.0, 40.0)  # beside the lower part only
    s.labels[150, 70, 2] = CANAL  # a one-voxel speck of false canal
    (les,), canal = s.measure()
    assert les.min_distance_to_canal_mm < 2.0  # measured to the lower (smaller) part
    canal_vox = int(((s.labels == CANAL).sum() - 1))
    assert canal.volume_ml == pytest.approx(canal_vox * np.prod(SPACING) / 1000, abs=1e-4)
    _, canal_all = s.measure(post=Postprocess(keep_largest_canal_component=False))
    assert canal_all.volume_ml > canal.volume_ml


@pytest.mark.parametrize("bone_hu", [226.0, 89.0])  # young vs old trabecular bone
def test_type_is_relative_to_the_patients_bone(bone_hu):
    s = Scene(bone_hu=bone_hu)
    m1 = s.add_sphere((-10, -12, -8), 4.5, bone_hu - 150.0)  # lytic contrast
    m2 = s.add_sphere((10, -12, -8), 4.0, bone_hu + 300.0)  # blastic contrast
    half = np.where(s.pts[..., 0] < 0, bone_hu - 150.0, bone_hu + 300.0)
    m3 = s.add_sphere((0, 24, 8), 3.5, half)  # mixed: half each
    lesions, _ = s.measure()
    by_vox = {l.voxel_count: l for l in lesions}
    types = [by_vox[int(m.sum())].type for m in (m1, m2, m3)]
    assert types == ["lytic", "blastic", "mixed"]
    for l in lesions:
        assert l.bone_reference_hu == pytest.approx(bone_hu, abs=5.0)
        assert l.features["bone_reference_source"] == "local"
    assert by_vox[int(m1.sum())].features["lytic_fraction"] > 0.9


def test_same_absolute_hu_differs_with_age():
    types = {}
    for bone_hu in (226.0, 89.0):
        s = Scene(bone_hu=bone_hu)
        s.add_sphere((0, -12, 0), 4.5, 120.0)
        (les,), _ = s.measure()
        types[bone_hu] = les.type
    assert types[226.0] == "lytic" and types[89.0] != "lytic"


def test_bone_reference_fallbacks():
    s = Scene(bone_hu=180.0)
    s.add_sphere((-40, -20, 0), 3.0, 20.0)  # in soft tissue, > margin from any bone
    (les,), _ = s.measure(post=Postprocess(bone_reference_margin_mm=3.0, require_bone_contact=False))
    assert les.features["bone_reference_source"] == "all_bone"
    assert les.bone_reference_hu == pytest.approx(180.0, abs=5.0)
    s = Scene(bone=False)
    s.add_sphere((0, -12, 0), 3.0, 20.0)
    (les,), _ = s.measure()
    assert les.features["bone_reference_source"] == "default"
    assert les.bone_reference_hu == RULES.measurement.lesion_type.default_bone_reference_hu
    assert "bone_reference_note" in les.features


@pytest.mark.parametrize("direction", ["identity", "prone", "ffs", "k_flipped"])
def test_location_from_geometry_in_lps(direction):
    s = Scene(direction=DIRECTIONS[direction])
    s.add_sphere((5, -12, -10), 4.0, 40.0)  # vertebral body
    s.add_sphere((0, 25, 0), 3.5, 40.0)  # posterior arch
    s.add_sphere((55, 0, 10), 3.0, 40.0)  # lateral bone, far from the canal
    lesions, _ = s.measure()
    where = {round(l.centroid_lps_mm[1]): l.location for l in lesions}
    assert where == {-12: "vertebral_body", 25: "posterior_elements", 0: "other_bone"}


def _key(l: Lesion):
    return (l.voxel_count, round(l.min_distance_to_canal_mm, 9), np.round(l.closest_point_lesion_lps_mm, 6).tolist(),
            np.round(l.closest_point_canal_lps_mm, 6).tolist(), np.round(l.centroid_lps_mm, 6).tolist(),
            round(l.max_diameter_mm, 6), l.type, l.location, round(l.volume_ml, 9))


def test_measurements_do_not_depend_on_array_storage():
    s = Scene(shape=(100, 80, 16))
    s.add_sphere((-4, -12, -3), 4.0, 40.0)
    s.add_sphere((3, 22, 5), 3.0, 400.0)
    ref = [_key(l) for l in s.measure()[0]]
    for how in ("flip0", "flip2", "transpose"):
        if how == "transpose":
            lab, g = transpose_storage(s.labels, s.geom, [2, 0, 1])
            hu, _ = transpose_storage(s.hu, s.geom, [2, 0, 1])
        else:
            lab, g = flip_storage(s.labels, s.geom, int(how[-1]))
            hu, _ = flip_storage(s.hu, s.geom, int(how[-1]))
        vol, seg = volume_seg(lab, hu.astype(np.float32), g)
        got = [_key(l) for l in measure_lesions(vol, seg, POST, RULES)[0]]
        assert got == ref, how


def test_mismatched_segmentation_is_refused():
    s = Scene(shape=(40, 40, 8))
    vol, seg = volume_seg(s.labels, s.hu, s.geom)
    seg.labels = seg.labels[:-1]
    with pytest.raises(ValueError):
        measure_lesions(vol, seg, POST, RULES)


def test_local_bone_reference_excludes_lesion_shell_and_stays_in_margin():
    from pipeline.measure.lesion_type import local_bone_reference
    labels = np.full((30, 30, 12), BONE, np.uint8)
    hu = np.full(labels.shape, 200.0)
    labels[10:13, 10:13, 5:8] = LESION
    hu[9:14, 9:14, 4:9] = 1000.0  # partial-volume shell: must not count
    hu[labels == LESION] = 0.0
    mask = np.ones((3, 3, 3), bool)
    med, n = local_bone_reference(labels, hu, mask, ((10, 10, 5), (13, 13, 8)), (1.0, 1.0, 2.0), 4.0)
    assert med == 200.0
    region = (3 + 4 + 4) * (3 + 4 + 4) * (3 + 2 + 2)
    assert n == region - 5 ** 3
    # a lesion at the array corner: the shell is clipped, not wrapped
    labels2 = np.full((10, 10, 10), BONE, np.uint8)
    labels2[0:2, 0:2, 0:2] = LESION
    med, n = local_bone_reference(labels2, np.full(labels2.shape, 150.0), np.ones((2, 2, 2), bool),
                                  ((0, 0, 0), (2, 2, 2)), (1.0, 1.0, 1.0), 3.0)
    assert med == 150.0 and n == 5 ** 3 - 3 ** 3


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
@pytest.mark.parametrize("order", ["C", "F", "T"])  # T: a transposed view (neither C nor F)
@pytest.mark.parametrize("chunk_bytes", [1, 700, 4 << 20])  # planes taken one, a few, or all at a time
def test_label_boxes_match_find_objects(dtype, order, chunk_bytes):
    from scipy import ndimage
    from pipeline.measure.lesions import _label_slices

    def arrange(a: np.ndarray) -> np.ndarray:
        if order == "T":
            return np.ascontiguousarray(a.transpose(1, 2, 0)).transpose(2, 0, 1)
        return np.asarray(a, order=order)

    rng = np.random.default_rng(3)
    labels = np.zeros((40, 30, 20), dtype)
    labels[5:9, 3:25, 2:4] = CANAL
    labels[30, 29, 19] = LESION
    labels[0, 7, 11] = LESION
    boxes = _label_slices(arrange(labels), chunk_bytes=chunk_bytes)
    objs = ndimage.find_objects(labels.astype(np.int32), max_label=3)
    assert boxes == {CANAL: objs[0], LESION: objs[1], BONE: None}
    labels[rng.random(labels.shape) < 0.01] = BONE
    objs = ndimage.find_objects(labels.astype(np.int32), max_label=3)
    assert _label_slices(arrange(labels), chunk_bytes=chunk_bytes)[BONE] == objs[2]
    assert _label_slices(np.zeros((4, 4, 4), dtype)) == {CANAL: None, LESION: None, BONE: None}


def test_centre_distance_feature_matches_scipy_edt():
    from scipy import ndimage
    s = Scene(shape=(100, 80, 16))
    masks = [s.add_sphere((-4, -12, -3), 4.0, 40.0), s.add_sphere((3, 22, 5), 3.0, 400.0)]
    lesions, _ = s.measure()
    edt = ndimage.distance_transform_edt(s.labels != CANAL, sampling=s.geom.spacing)
    by_vox = {l.voxel_count: l for l in lesions}
    for m in masks:
        assert by_vox[int(m.sum())].features["centre_distance_to_canal_mm"] == pytest.approx(float(edt[m].min()),
                                                                                              abs=1e-4)


def test_lesion_touching_no_bone_is_dropped_when_required():
    """A bone metastasis lies in bone: a 'lesion' floating in soft tissue is dropped (configurable)."""
    import numpy as np

    from pipeline.config import Postprocess
    from pipeline.measure.lesions import measure_lesions
    from pipeline.plan.engine import load_rules
    from pipeline.types import Geometry, ModelInfo, Segmentation, Volume

    geom = Geometry(shape=(40, 40, 20), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), direction=np.eye(3))
    labels = np.zeros(geom.shape, np.uint8)
    labels[5:15, 5:15, 5:15] = 3
    labels[8:12, 8:12, 8:12] = 2  # inside bone
    labels[28:33, 28:33, 8:12] = 2  # far from any bone
    vol = Volume(np.zeros(geom.shape, np.int16), geom)
    seg = Segmentation(labels, geom, ModelInfo("t", "0", "", (1.0, 1.0, 1.0)))
    rules = load_rules()
    kept, _ = measure_lesions(vol, seg, Postprocess(require_bone_contact=True), rules)
    both, _ = measure_lesions(vol, seg, Postprocess(require_bone_contact=False), rules)
    assert len(kept) == 1 and len(both) == 2
    assert kept[0].bbox_ijk[0] == (8, 8, 8)
