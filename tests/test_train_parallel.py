"""Training on a GPU machine: parallel pool building, DataLoader workers and the time budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from pipeline.train.data import phantom_cases
from pipeline.train.trainer import load_train_config


def test_phantom_pool_is_the_same_with_any_number_of_processes():
    args = (3, 5, (1.5, 1.5, 1.5), (3.0, 3.0, 3.0), (64, 56, 40), 0.5, 0.3)
    serial = phantom_cases(*args)
    parallel = phantom_cases(*args, workers=2)
    assert [c.name for c in serial] == [c.name for c in parallel]
    for a, b in zip(serial, parallel):
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.image, b.image)


def test_parallel_real_insert_is_seeded_per_case(real_data):
    from pipeline.train import real_insert as ri

    kw = dict(spacing=(1.5, 1.5, 1.5), sources=("tptbox",), max_lesions=2)
    one = ri.real_insert_cases(real_data, 3, seed=4, workers=1, **kw)
    two = ri.real_insert_cases(real_data, 3, seed=4, workers=2, **kw)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.image, b.image)
    assert not np.array_equal(one[0].image, one[1].image)  # each case draws its own crop and lesions


def test_gpu_stage_config_is_valid_and_fine_tunes_stage_two():
    cfg = load_train_config("configs/train_gpu.yaml")
    assert cfg.init_from == "runs/osteoplan-spine-real/checkpoint.pt"
    assert cfg.num_workers > 0 and cfg.data.pool_workers > 0
    assert (cfg.max_steps, cfg.stop_at_step, cfg.time_limit_s) == (6257, 1500, None)  # replays the shipped run
    assert not {"chest_ct_philips", "blds_lesion_patches"} & set(cfg.data.real_insert.sources)
    stage2 = load_train_config("configs/train_real.yaml")
    assert cfg.network == stage2.network and cfg.intensity == stage2.intensity  # same bundle contract


def test_loader_workers_and_time_limit_train_export(tmp_path, monkeypatch):
    import torch

    import pipeline.train.export as export
    from pipeline.train.trainer import train_from_config

    torch.set_num_threads(1)
    cfg = {
        "seed": 1, "workdir": str(tmp_path / "work"), "export_name": "tiny-par", "version": "0.0.1",
        "network": {"class": "monai.networks.nets.UNet",
                    "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                             "strides": [2], "num_res_units": 0}},
        "patch_size": [24, 24, 24], "inference_roi": [48, 48, 48], "batch_size": 2, "max_steps": 100000,
        "time_limit_s": 6.0, "num_workers": 2, "val_every": 100000, "ckpt_every": 100000, "threads": 1,
        "amp": False,
        "data": {"pool_workers": 2, "phantom": {"n_train": 2, "n_val": 1, "shape": [64, 56, 40]}},
    }
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(export, "MODELS_DIR", tmp_path / "models")
    bundle = train_from_config(p, resume=False)
    md = json.loads((bundle / "metadata.json").read_text())
    steps = md["training"]["steps"]
    state = torch.load(tmp_path / "work" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert 60 < steps < 100000 and state["step"] == steps  # stopped by the time budget, not max_steps
    assert state["schedule_steps"] == md["training"]["schedule_steps"] < 100000  # the schedule was fitted
    assert steps <= state["schedule_steps"]


@pytest.mark.parametrize("bad", [{"num_workers": -1}, {"time_limit_s": 0}, {"data": {"pool_workers": -2}}])
def test_bad_parallel_options_are_refused(tmp_path, bad):
    from pipeline.errors import InputError

    base = yaml.safe_load(open("configs/train.yaml"))
    for k, v in bad.items():
        base[k] = v if not isinstance(v, dict) else {**base[k], **v}
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(InputError):
        load_train_config(p)
