"""The training augmentation: the elastic deformation costs nothing on the patches it skips."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")


def _cfg():
    from pipeline.train.trainer import load_train_config

    cfg = load_train_config("configs/train_gpu_ft5.yaml")
    cfg.patch_size = [24, 24, 24]
    return cfg


def test_elastic_runs_only_on_its_share_of_patches(monkeypatch):
    """MONAI's Rand3DElasticd resamples through an identity grid even when its prob says skip, so
    the pipeline gates it: over 300 seeded patches it runs on about ELASTIC_PROB of them, never on all."""
    from monai.transforms import Rand3DElasticd

    from pipeline.train import trainer

    calls = []
    real = Rand3DElasticd.__call__

    def counting(self, data):
        calls.append(1)
        return real(self, data)

    monkeypatch.setattr(Rand3DElasticd, "__call__", counting)
    tf = trainer._transforms(_cfg())
    tf.set_random_state(seed=3)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(1, 40, 36, 30)).astype(np.float32)
    lab = np.zeros((1, 40, 36, 30), np.uint8)
    lab[0, 10:30, 10:26, 5:25] = 3
    lab[0, 18:22, 16:20, 10:20] = 1
    lab[0, 12:16, 12:15, 8:12] = 2
    n = 300
    for _ in range(n):
        out = tf({"image": img, "label": lab})
        out = out[0] if isinstance(out, list) else out
        assert tuple(out["image"].shape) == (1, 24, 24, 24) and tuple(out["label"].shape) == (1, 24, 24, 24)
    expected = n * trainer.ELASTIC_PROB
    assert 0 < len(calls) < 3 * expected  # ~15 of 300 (binomial sd ~3.8); ungated it would be 300


def test_elastic_still_deforms_when_chosen():
    """The gated branch is a real deformation: with the share at 1 the patch's voxels move."""
    from pipeline.train import trainer

    cfg = _cfg()
    rng = np.random.default_rng(1)
    img = rng.normal(size=(1, 24, 24, 24)).astype(np.float32)
    lab = np.zeros((1, 24, 24, 24), np.uint8)
    lab[0, 6:18, 6:18, 6:18] = 3
    import monai.transforms as T

    elastic = [t for t in trainer._transforms(cfg).transforms if isinstance(t, T.OneOf)]
    assert len(elastic) == 1
    branch = elastic[0].transforms[0]
    assert isinstance(branch, T.Rand3DElasticd) and branch.prob == 1.0
    branch.set_random_state(seed=0)
    out = branch({"image": img, "label": lab})
    assert not np.allclose(np.asarray(out["image"]), img)


def test_stage5_config_never_overwrites_the_shipped_bundle():
    """configs/train_gpu_ft5.yaml (the not-shipped stage 5) starts from the shipped bundle and exports beside it."""
    import json

    from pipeline.train.trainer import REPO_ROOT, load_train_config

    cfg = load_train_config("configs/train_gpu_ft5.yaml")
    stage4 = load_train_config("configs/train_gpu_ft.yaml")
    shipped = json.loads((REPO_ROOT / "models/osteoplan-spine/metadata.json").read_text())
    assert cfg.init_from == "models/osteoplan-spine" and cfg.export_name != shipped["name"]
    assert cfg.version != shipped["version"] and cfg.workdir != stage4.workdir
    assert cfg.network == stage4.network and cfg.intensity == stage4.intensity  # same bundle contract
    assert cfg.data.phantom.diversity == stage4.data.phantom.diversity  # the stage-4 generator, longer


def test_stage6_config_is_stage5_with_half_the_pool_plain():
    from pipeline.train.trainer import load_train_config

    ft5 = load_train_config("configs/train_gpu_ft5.yaml")
    ft6 = load_train_config("configs/train_gpu_ft6.yaml")
    assert ft6.data.phantom.diversity_share == 0.5 and ft5.data.phantom.diversity_share == 1.0
    assert ft6.data.phantom.diversity == ft5.data.phantom.diversity
    assert ft6.init_from == ft5.init_from == "models/osteoplan-spine"
    assert ft6.export_name != ft5.export_name and ft6.workdir != ft5.workdir
