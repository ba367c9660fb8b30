"""Lytic lesion refinement: under-segmented dark lesions grow back to their edge, nothing else moves."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from measure_helpers import DIRECTIONS, MODEL, centred_geometry, cylinder_s, flip_storage, lps_grid, sphere
from pipeline.config import LesionRefine, Postprocess, load_inference_config
from pipeline.measure.lesions import measure_lesions
from pipeline.plan.engine import load_rules
from pipeline.segment.lesion_refine import grow_lytic_lesions
from pipeline.types import BONE, CANAL, LESION, Segmentation, Volume

RULES = load_rules()
CANAL_LP = (0.0, 14.0)  # the canal runs along S, posterior of the body
CANAL_R = 6.0
BODY_P = (-22.0, 6.0)  # vertebral body: P from -22 to 6 mm, |L| <= 20 mm
LESION_C = (0.0, -2.0, 0.0)  # true lesion centre; radius 6 mm: its canal-side edge is 4 mm from the body's back
TRUE_R = 6.0
SEG_R = 3.5  # the network's (under-segmented) lesion


def _post(**refine) -> Postprocess:
    return Postprocess(require_bone_contact=True, lesion_refine=LesionRefine(**refine))


class Spine:
    """Vertebral body of trabecular bone, cortex at its back wall, canal behind it, one true lesion."""

    def __init__(self, lesion_hu: float = 90.0, bone_hu: float = 220.0, spacing=(0.8, 0.8, 2.0),
                 direction=np.eye(3), noise_hu: float = 15.0, seed: int = 0):
        self.geom = centred_geometry((90, 80, 24), spacing, direction, centre_lps=(0.0, 0.0, 0.0))
        pts = lps_grid(self.geom)
        L, P = pts[..., 0], pts[..., 1]
        body = (np.abs(L) <= 20) & (P >= BODY_P[0]) & (P <= BODY_P[1])
        cortex = body & (P >= BODY_P[1] - 1.6)
        self.canal = cylinder_s(self.geom, CANAL_LP, CANAL_R, pts)
        self.truth_lesion = sphere(self.geom, LESION_C, TRUE_R, pts)
        hu = np.full(self.geom.shape, 40.0)  # soft tissue
        hu[body] = bone_hu
        hu[cortex] = 900.0
        hu[self.canal] = 10.0
        hu[self.truth_lesion] = lesion_hu
        hu += np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape)
        self.hu = np.round(hu).astype(np.int16)
        self.labels = np.zeros(self.geom.shape, np.uint8)
        self.labels[body] = BONE
        self.labels[self.canal] = CANAL
        self.labels[sphere(self.geom, LESION_C, SEG_R, pts)] = LESION  # what the network drew
        self.truth = self.labels.copy()
        self.truth[self.truth_lesion] = LESION

    def distance(self, labels: np.ndarray) -> float:
        vol = Volume(array=self.hu, geometry=self.geom)
        lesions, _ = measure_lesions(vol, Segmentation(labels=labels, geometry=self.geom, model=MODEL), _post(),
                                     RULES)
        assert len(lesions) == 1
        return lesions[0].min_distance_to_canal_mm


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_an_under_segmented_lytic_lesion_grows_back_to_its_edge():
    s = Spine()
    before = s.labels == LESION
    out = s.labels.copy()
    summary = grow_lytic_lesions(out, s.hu, s.geom, _post())
    after = out == LESION
    assert _dice(before, s.truth_lesion) < 0.35
    assert _dice(after, s.truth_lesion) > 0.9
    assert summary.as_dict() == {"enabled": True, "lesions_examined": 1, "lesions_grown": 1,
                                 "voxels_added": int(after.sum() - before.sum())}
    added = np.zeros(s.geom.shape, bool)
    added[tuple(summary.added.T)] = True
    assert len(summary.added) == int(added.sum())  # each voxel once
    assert np.array_equal(added, out != s.labels)  # exactly the voxels that became lesion
    edge = summary.lesions[0]
    assert edge.lesion_hu == pytest.approx(90.0, abs=10) and edge.threshold_hu < edge.bone_hu
    # the distance the plan rests on comes back to the truth (within one voxel diagonal)
    true_mm, before_mm, after_mm = s.distance(s.truth), s.distance(s.labels), s.distance(out)
    assert before_mm - true_mm > 2.0
    assert abs(after_mm - true_mm) <= float(np.linalg.norm(s.geom.spacing))


def test_only_bone_becomes_lesion_and_nothing_else_changes():
    s = Spine(lesion_hu=5.0)  # as dark as the canal's CSF, which lies within the growth reach (8 mm)
    pts = lps_grid(s.geom)
    breach = (np.abs(pts[..., 0]) <= 3) & (np.abs(pts[..., 2]) <= 3) & (pts[..., 1] >= 0) & (pts[..., 1] <= 9)
    s.hu[breach] = 5  # the lesion breaks through the back wall: dark bone, then soft tissue, up to the canal
    out = s.labels.copy()
    grow_lytic_lesions(out, s.hu, s.geom, _post(grow_mm=8.0))
    assert np.any(out[breach & (s.labels == BONE)] == LESION)  # the dark wall became lesion
    changed = out != s.labels
    assert changed.any()
    assert np.all(s.labels[changed] == BONE) and np.all(out[changed] == LESION)
    assert np.array_equal(out == CANAL, s.labels == CANAL)
    assert np.array_equal(out == 0, s.labels == 0)


@pytest.mark.parametrize("lesion_hu", [700.0, 230.0])  # blastic; iso-dense to the bone
def test_lesions_not_darker_than_their_bone_are_left_alone(lesion_hu):
    s = Spine(lesion_hu=lesion_hu)
    out = s.labels.copy()
    summary = grow_lytic_lesions(out, s.hu, s.geom, _post())
    assert np.array_equal(out, s.labels)
    assert summary.lesions[0].reason == "not darker than the bone around it"


def test_disabled_changes_nothing():
    s = Spine()
    out = s.labels.copy()
    summary = grow_lytic_lesions(out, s.hu, s.geom, _post(enabled=False))
    assert np.array_equal(out, s.labels)
    assert summary.as_dict()["enabled"] is False and summary.lesions == []


@pytest.mark.parametrize("spacing", [(0.8, 0.8, 2.0), (2.0, 0.6, 0.9)])
def test_growth_stops_at_grow_mm_in_true_millimetres(spacing):
    """A dark channel runs from the lesion far through the bone: growth follows it only grow_mm."""
    s = Spine(spacing=spacing, noise_hu=0.0)
    pts = lps_grid(s.geom)
    channel = (np.abs(pts[..., 1] - LESION_C[1]) <= 1.5) & (np.abs(pts[..., 2]) <= 1.5) & (s.labels == BONE)
    s.hu[channel] = 90
    grow = 3.0
    out = s.labels.copy()
    grow_lytic_lesions(out, s.hu, s.geom, _post(grow_mm=grow, sigma_mm=0.0))
    seg = s.labels == LESION
    added = (out == LESION) & ~seg
    assert added.any()
    # exact: the farthest added voxel centre lies within grow_mm of a segmented lesion voxel centre
    a, b = np.argwhere(added) * np.asarray(spacing), np.argwhere(seg) * np.asarray(spacing)
    nearest = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert nearest.max() <= grow + 1e-9
    assert nearest.max() > grow - max(spacing)  # and it did follow the channel that far


def test_small_and_boneless_lesions_are_not_grown():
    s = Spine()
    small = s.labels.copy()
    small[small == LESION] = BONE
    small[tuple(int(n) // 2 for n in s.geom.shape)] = LESION  # one voxel: under min_lesion_volume_ml
    out = small.copy()
    summary = grow_lytic_lesions(out, s.hu, s.geom, _post())
    assert np.array_equal(out, small) and summary.lesions == []
    floating = np.zeros_like(s.labels)
    floating[s.labels == LESION] = LESION  # a lesion touching no bone: measurement drops it too
    out = floating.copy()
    assert grow_lytic_lesions(out, s.hu, s.geom, _post()).lesions == []
    assert np.array_equal(out, floating)


@pytest.mark.parametrize("name", ["k_flipped", "ffs", "prone"])
def test_same_voxels_grow_in_any_storage_order(name):
    # noise-free: the same scene sampled at the same points, only stored in another order
    s = Spine(direction=DIRECTIONS[name], noise_hu=0.0)
    out = s.labels.copy()
    grow_lytic_lesions(out, s.hu, s.geom, _post())
    ref = Spine(noise_hu=0.0)
    ref_out = ref.labels.copy()
    grow_lytic_lesions(ref_out, ref.hu, ref.geom, _post())
    assert int((out == LESION).sum()) == int((ref_out == LESION).sum()) > int((ref.labels == LESION).sum())
    assert s.distance(out) == pytest.approx(ref.distance(ref_out), abs=1e-6)
    flipped_hu, g = flip_storage(s.hu, s.geom, 0)
    flipped, _ = flip_storage(s.labels, s.geom, 0)
    out2 = flipped.copy()
    grow_lytic_lesions(out2, flipped_hu, g, _post())
    assert np.array_equal(np.flip(out2, 0), out)  # exactly the same voxels when only the storage flips


def test_settings_are_validated_and_shipped_on():
    with pytest.raises(ValidationError):
        LesionRefine(reference_shell_mm=(8.0, 2.0))
    with pytest.raises(ValidationError):
        LesionRefine(grow_mm=0.0)
    shipped = load_inference_config().postprocess.lesion_refine
    assert shipped.enabled and shipped == LesionRefine()  # configs/inference.yaml states the defaults


def test_type_is_judged_without_the_added_voxels():
    """A mixed lesion stays mixed when dark voxels are added around it (they are dark by construction)."""
    s = Spine(noise_hu=0.0)
    pts = lps_grid(s.geom)
    seg = s.labels == LESION
    checker = (np.indices(s.geom.shape).sum(axis=0) % 2).astype(bool)
    s.hu[seg & checker] = 700  # half dense, half dark: mixed
    s.hu[seg & ~checker] = 60
    ring = sphere(s.geom, LESION_C, TRUE_R, pts) & ~seg
    s.hu[ring] = 60
    labels = s.labels.copy()
    labels[ring] = LESION
    vol = Volume(array=s.hu, geometry=s.geom)
    ring_ijk = np.argwhere(ring)

    def measure(refined):
        seg_ = Segmentation(labels=labels, geometry=s.geom, model=MODEL, refined_voxels=refined)
        (lesion,), _ = measure_lesions(vol, seg_, _post(), RULES)
        return lesion

    with_record, without = measure(ring_ijk), measure(None)
    assert without.type == "lytic" and "refined_voxels_added" not in without.features
    assert with_record.type == "mixed"
    assert with_record.features["refined_voxels_added"] == int(ring.sum())
    assert with_record.voxel_count == without.voxel_count == int((labels == LESION).sum())  # the shape is the grown one
    assert with_record.min_distance_to_canal_mm == without.min_distance_to_canal_mm
