"""Generator diversity (``data.phantom.diversity``): off = the phantoms as before; each option does what it says."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from pipeline.train.data import phantom_cases
from pipeline.train.phantom import Diversity, LesionSpec, canal_rho, make_phantom
from pipeline.types import BONE, CANAL, LESION

SHAPE, SP = (96, 80, 48), (1.5, 1.5, 1.5)

# sha256 (first 16 hex) of hu + labels + instances made by the generator on main before Diversity existed
# (commit 2ec7ade); with the options off the generator must give exactly these arrays.
BEFORE = {(5, False, 3): "520bf0ae713ccff9", (11, True, 4): "b968ad0f42d18e19", (123, False, None): "315f572688d91ea9"}
BEFORE_CASES = "a16e70ac954bf43b"  # phantom_cases(3, 7, ...) below


def _sha(*arrays) -> str:
    m = hashlib.sha256()
    for a in arrays:
        m.update(np.ascontiguousarray(a).tobytes())
    return m.hexdigest()[:16]


@pytest.mark.parametrize("key", sorted(BEFORE, key=str))
@pytest.mark.parametrize("diversity", [None, Diversity()])
def test_options_off_reproduce_the_generator_byte_for_byte(key, diversity):
    seed, dr, n = key
    ph = make_phantom(seed, shape=(64, 56, 40), spacing=SP, domain_randomise=dr, n_lesions=n, diversity=diversity)
    assert _sha(ph.hu, ph.labels, ph.instances) == BEFORE[key]


def test_pool_with_options_off_is_the_pool_as_before():
    args = (3, 7, (1.5, 1.5, 1.5), (3.0, 3.0, 3.0), (64, 56, 40), 0.5, 0.3)
    for div in (None, {}):
        cs = phantom_cases(*args, diversity=div)
        assert _sha(*[c.image for c in cs], *[c.labels for c in cs]) == BEFORE_CASES


def test_shipped_configs_keep_the_options_off():
    from pipeline.train.trainer import load_train_config

    for name in ("train", "train_real", "train_gpu"):
        cfg = load_train_config(f"configs/{name}.yaml")
        assert cfg.data.phantom.diversity.is_off()
        assert cfg.data.real_insert.diversity.small_lesion_prob == cfg.data.real_insert.diversity.low_contrast_lytic_prob == 0


@pytest.mark.parametrize("bad", [{"small_lesion_prob": 1.5}, {"canal_shapes": ["square"]}, {"canal_shapes": []},
                                 {"csf_like": 0.2}])
def test_bad_diversity_options_are_refused(tmp_path, bad):
    from pipeline.errors import InputError
    from pipeline.train.trainer import load_train_config

    base = yaml.safe_load(open("configs/train.yaml"))
    base["data"]["phantom"]["diversity"] = bad
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(InputError):
        load_train_config(p)


def test_small_lesions_have_the_requested_radius_and_touch_bone():
    radii, contacts = [], 0
    for seed in range(6):
        ph = make_phantom(seed, shape=SHAPE, spacing=SP, n_lesions=3, diversity=Diversity(small_lesion_prob=1.0))
        for les in ph.lesions:
            radii.append(les["radius_mm"])
            m = ph.instances == les["index"]
            if not m.any():
                continue
            vol_mm3 = m.sum() * np.prod(SP)
            assert vol_mm3 <= 4 / 3 * np.pi * (5.0 * 1.2 * 1.1) ** 3  # never a big lesion
            from scipy import ndimage

            shell = ndimage.binary_dilation(m) & ~m
            assert ((ph.labels[shell] == BONE) | (ph.labels[shell] == LESION)).any()  # in / on a vertebra
            contacts += bool((ph.labels[shell] == CANAL).any())
    assert radii and all(3.0 <= r <= 5.0 for r in radii)
    assert contacts >= 1  # some touch the canal


def test_rim_mixed_lesion_has_a_lytic_core_and_dense_rim():
    les = LesionSpec(type="mixed", radius_mm=4.5, gap_mm=0.0, irregularity=0.0, mix_pattern="rim")
    ph = make_phantom(3, shape=SHAPE, spacing=SP, lesions=[les])
    m = ph.instances == 1
    assert m.sum() > 20
    c = np.argwhere(m).mean(axis=0).round().astype(int)
    assert ph.params.hu["trab"] < ph.hu[m].max()
    dist = np.linalg.norm((np.argwhere(m) - c) * SP, axis=1)
    vals = ph.hu[m]
    assert vals[dist <= 1.6].mean() < vals[dist >= 3.0].mean() - 150  # core darker than the rim


def test_low_contrast_lytic_lesions_are_close_to_their_trabecular_bone():
    n = 0
    for seed in range(20, 26):
        ph = make_phantom(seed, shape=SHAPE, spacing=SP, n_lesions=2, diversity=Diversity(low_contrast_lytic_prob=1.0))
        h = ph.params.hu
        assert 100 <= h["trab"] <= 220 and ph.params.lytic_hu is not None
        assert 20 <= h["trab"] - ph.params.lytic_hu <= 80
        assert any(ls.type == "lytic" for ls in ph.params.lesions)
        for les in ph.lesions:
            m = ph.instances == les["index"]
            if les["type"] != "lytic" or m.sum() < 30:
                continue
            from scipy import ndimage

            core = ndimage.binary_erosion(m)
            trab = ph.labels == BONE
            trab &= ph.hu < h["trab"] + 150
            assert abs(float(np.median(ph.hu[core if core.any() else m])) - float(np.median(ph.hu[trab]))) < 100
            n += 1
    assert n >= 2
    # without the option the lytic HU comes from the wide default range (-20..90), trab from 90..300
    ph = make_phantom(20, shape=SHAPE, spacing=SP, n_lesions=2)
    assert ph.params.lytic_hu is None


def _width_profile(mask2d: np.ndarray) -> np.ndarray:
    """Canal width (L-R, voxels) per AP row, anterior -> posterior (axis 1 is +P)."""
    w = mask2d.sum(axis=0)
    return w[w > 0]


@pytest.mark.parametrize("shape", ["triangle", "trefoil"])
def test_shaped_canals_are_not_ellipses(shape):
    ph = make_phantom(40, shape=SHAPE, spacing=SP, n_lesions=0, diversity=Diversity(canal_shapes=(shape,)))
    ref = make_phantom(40, shape=SHAPE, spacing=SP, n_lesions=0)
    assert ph.params.canal_shape == shape and ph.params.canal_shape_k > 0
    k = SHAPE[2] // 2
    w = _width_profile(ph.labels[:, :, k] == CANAL).astype(float)
    w0 = _width_profile(ref.labels[:, :, k] == CANAL).astype(float)
    # an ellipse is widest in the middle and symmetric front/back; the triangle is widest in front
    # and narrows to a posterior apex
    half = len(w) // 2
    assert w[:half].mean() > w[-half:].mean() + 2
    assert abs(w0[: len(w0) // 2].mean() - w0[-(len(w0) // 2):].mean()) <= 1.5
    assert int(np.argmax(w)) < len(w) / 2 - 1


def test_canal_rho_ellipse_is_unchanged_and_shapes_keep_the_anterior_wall():
    u, v = np.array([0.0, 5.0, 0.0]), np.array([-8.0, 0.0, 8.0])
    assert np.allclose(canal_rho(u, v, (10.0, 8.0)), np.sqrt((u / 10) ** 2 + (v / 8) ** 2))
    tri = canal_rho(u, v, (10.0, 8.0), "triangle", 0.2)
    assert np.isclose(tri[0], 1.0)  # the anterior wall stays where the ellipse has it
    assert tri[2] < 1.0 - 0.2  # the posterior apex reaches further back


@pytest.mark.parametrize("shape", ["ellipse", "triangle", "trefoil"])
def test_shaped_canal_labels_stay_consistent(shape):
    ph = make_phantom(41, shape=SHAPE, spacing=SP, n_lesions=2,
                      diversity=Diversity(canal_shapes=(shape,), small_lesion_prob=0.5))
    canal, bone = ph.labels == CANAL, ph.labels == BONE
    assert canal.any() and bone.any() and set(np.unique(ph.labels)) <= {0, CANAL, LESION, BONE}
    # in the middle of a vertebra the canal is enclosed by bone behind it (arch) and in front (body)
    for z0, z1 in ph.params.level_z:
        zc = 0.5 * (z0 + z1)
        k = int(round((zc - (ph.params.origin_lps[2] - (SHAPE[2] - 1) * SP[2] / 2)) / SP[2]))
        if not 4 <= k < SHAPE[2] - 4:
            continue
        sl = canal[:, :, k]
        if not sl.any():
            continue
        i = int(round(np.argwhere(sl)[:, 0].mean()))
        col = ph.labels[i, :, k]
        jj = np.flatnonzero(col == CANAL)
        assert (col[jj.max() + 1: jj.max() + 1 + int(10 / SP[1])] == BONE).any()  # arch behind
        assert (col[max(jj.min() - int(6 / SP[1]), 0): jj.min()] == BONE).any()  # body in front
    # CSF option: the canal is as dense as the soft tissue
    d = make_phantom(41, shape=SHAPE, spacing=SP, n_lesions=0, diversity=Diversity(csf_like_tissue_prob=1.0))
    assert -15 <= d.params.hu["csf"] - d.params.hu["soft"] <= 5


def test_diversity_leaves_the_callers_lesion_specs_alone():
    specs = [LesionSpec(type="blastic", radius_mm=8.0)]
    make_phantom(1, shape=(64, 56, 40), spacing=SP, lesions=specs, diversity=Diversity(low_contrast_lytic_prob=1.0))
    assert specs[0].type == "blastic"


def test_real_insert_options_off_keep_the_cases_and_on_make_small_low_contrast_lesions(real_data):
    from pipeline.train import real_insert as ri

    kw = dict(spacing=(1.5, 1.5, 1.5), sources=("tptbox",), max_lesions=3, workers=1)
    off = ri.real_insert_cases(real_data, 2, seed=4, **kw)
    assert _sha(*[c.image for c in off], *[c.labels for c in off]) == "06e8776ad745f68b"  # as on main
    cts = ri.load_backgrounds(real_data, (1.5, 1.5, 1.5), ("tptbox",))
    rng = np.random.default_rng(0)
    small, low = [], []
    for i in range(8):
        _, lesions = ri.make_case(cts[0], rng, 3, index=i, small_lesion_prob=1.0, low_contrast_lytic_prob=1.0)
        small += [le.radius_mm for le in lesions]
        low += [le.bone_reference_hu - le.target_hu for le in lesions if le.type == "lytic"]
    assert small and all(3.0 <= r <= 5.0 for r in small)
    assert low and all(d <= 80.0 + 1e-6 for d in low)


def test_shipped_bundle_is_stage_6_from_stage_4_from_stage_3():
    """0.4.0 = configs/train_gpu_ft6.yaml started from the bundle stage 4 exports (0.3.0), which
    started from stage 3's run; the metadata records the run and both weights' hashes."""
    import json

    import torch

    from pipeline.train.trainer import REPO_ROOT, _state_sha256, load_train_config

    shipped = json.loads((REPO_ROOT / "models/osteoplan-spine/metadata.json").read_text())
    ft6 = load_train_config("configs/train_gpu_ft6.yaml")
    assert ft6.export_name == shipped["name"] == "osteoplan-spine" and ft6.version == shipped["version"] == "0.4.0"
    t = shipped["training"]
    assert (t["init_from"], t["init_weight_share"], t["seed"], t["lr"]) == (ft6.init_from, ft6.init_weight_share,
                                                                           ft6.seed, ft6.lr)
    assert t["init_weight_share"] == 0.5 and t["data"]["phantom"]["diversity_share"] == 0.5
    stage4 = load_train_config("configs/train_gpu_ft.yaml")
    assert REPO_ROOT / ft6.init_from == REPO_ROOT / "models" / stage4.export_name  # stage 6 starts from stage 4's export
    assert stage4.version == "0.3.0" and not stage4.data.phantom.diversity.is_off()
    stage3 = load_train_config("configs/train_gpu.yaml")
    assert stage4.init_from == f"{stage3.workdir}/checkpoint.pt"  # stage 3's run
    for cfg in (stage3, stage4, ft6):  # same bundle contract
        assert cfg.network == ft6.network and cfg.intensity == ft6.intensity
    # the shipped weights are the export, not the unmixed fine-tune nor the start weights
    weights = _state_sha256(torch.load(REPO_ROOT / "models/osteoplan-spine/model.pt", map_location="cpu",
                                       weights_only=False))
    assert weights not in (t["init_weights_sha256"], t["trained_weights_sha256"])


def test_fine_tune_config_smoke_trains_and_exports(tmp_path, monkeypatch):
    """configs/train_gpu_ft.yaml shrunk: the shipped weights, diverse phantoms, 3 steps, a bundle in tmp."""
    import json

    import torch

    import pipeline.train.export as export
    from pipeline.segment.bundle import load_bundle
    from pipeline.train.trainer import REPO_ROOT, train_from_config

    torch.set_num_threads(1)
    cfg = yaml.safe_load(open("configs/train_gpu_ft.yaml"))
    cfg.update(workdir=str(tmp_path / "work"), init_from=str(REPO_ROOT / "models/osteoplan-spine/model.pt"),
               patch_size=[32, 32, 32], inference_roi=[48, 48, 48], batch_size=1, max_steps=3, time_limit_s=None,
               val_every=3, ckpt_every=3, threads=1, num_workers=0, amp=False)
    cfg["data"]["pool_workers"] = 0
    cfg["data"]["phantom"].update(n_train=3, n_val=1, shape=[64, 56, 40])
    cfg["data"]["phantom"]["diversity"] = {"small_lesion_prob": 1.0, "low_contrast_lytic_prob": 1.0,
                                           "canal_shapes": ["triangle", "trefoil"], "csf_like_tissue_prob": 1.0}
    cfg["data"]["real_insert"]["enabled"] = False
    p = tmp_path / "ft.yaml"
    p.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(export, "MODELS_DIR", tmp_path / "models")
    bundle = train_from_config(p, resume=False)
    assert bundle == tmp_path / "models" / "osteoplan-spine"
    md = json.loads((bundle / "metadata.json").read_text())
    assert md["version"] == "0.3.0" and md["training"]["steps"] == 3
    assert md["training"]["data"]["phantom"]["diversity"]["canal_shapes"] == ["triangle", "trefoil"]
    assert load_bundle(bundle).metadata["name"] == "osteoplan-spine"
    # the export is the WiSE-FT mix of the start weights and the trained ones (kept as trained.pt)
    start = torch.load(REPO_ROOT / "models/osteoplan-spine/model.pt", map_location="cpu", weights_only=False)
    trained = torch.load(tmp_path / "work" / "trained.pt", map_location="cpu", weights_only=False)
    shipped = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], trained[k])]
    assert moved  # three steps changed the weights
    for k in moved:
        torch.testing.assert_close(shipped[k], 0.5 * start[k] + 0.5 * trained[k])
    assert md["training"]["init_weight_share"] == 0.5


def test_diversity_share_mixes_plain_and_diverse_phantoms():
    """diversity_share 0.5: half the pool is the plain generator's (the same phantoms as with the options
    off, case for case), the other half differs; share 1 is the pool as before the option existed."""
    args = (6, 7, (1.5, 1.5, 1.5), (3.0, 3.0, 3.0), (64, 56, 40), 0.5, 0.3)
    div = {"canal_shapes": ["triangle"], "csf_like_tissue_prob": 1.0}
    plain = phantom_cases(*args)
    full = phantom_cases(*args, diversity=div)
    assert _sha(*[c.image for c in full]) == _sha(*[c.image for c in phantom_cases(*args, diversity=div,
                                                                                     diversity_share=1.0)])
    half = phantom_cases(*args, diversity=div, diversity_share=0.5)
    same_as_plain = [np.array_equal(h.image, p.image) for h, p in zip(half, plain)]
    same_as_full = [np.array_equal(h.image, f.image) for h, f in zip(half, full)]
    assert sum(same_as_plain) == 3 and all(a != b for a, b in zip(same_as_plain, same_as_full))
    none = phantom_cases(*args, diversity=div, diversity_share=0.0)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(none, plain))


def test_diversity_share_is_validated(tmp_path):
    from pipeline.errors import InputError
    from pipeline.train.trainer import load_train_config

    cfg = yaml.safe_load(open("configs/train_gpu_ft6.yaml"))
    cfg["data"]["phantom"]["diversity_share"] = 1.5
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputError, match="diversity_share"):
        load_train_config(p)
