"""--fast: its model grid comes from the bundle (or the site's inference config), and every fast
report says what the coarser grid costs (MODEL_CARD.md, "Fast mode")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import InferenceConfig, load_inference_config
from pipeline.study import fast_mode_warning

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_samples" / "phantom01"


def test_warning_text():
    text = fast_mode_warning((2.0, 2.0, 2.0), (1.5, 1.5, 1.5))
    assert text.startswith("fast mode: segmented on a 2 mm grid instead of 1.5 mm;")
    assert "run without --fast before planning" in text
    assert "2/2.5 mm grid" in fast_mode_warning((2.5, 2.0, 2.0), (1.5, 1.5, 1.5))


def test_shipped_bundle_fast_grid_matches_its_training_config(shipped_model):
    md = json.loads((shipped_model / "metadata.json").read_text())
    cfg = yaml.safe_load((REPO / "configs" / "train_gpu_ft.yaml").read_text())  # made the shipped weights
    assert md["fast_spacing_mm"] == cfg["inference_fast_spacing_mm"] == [2.0, 2.0, 2.0]
    assert load_inference_config().fast_spacing_mm is None  # the default config defers to the bundle


def test_fast_grid_from_bundle_or_config(shipped_model):
    from pipeline.segment.bundle import load_bundle
    from pipeline.segment.segmenter import Segmenter

    bundle = load_bundle(shipped_model)
    assert Segmenter(bundle, device="cpu").fast_spacing == (2.0, 2.0, 2.0)
    site = Segmenter(bundle, device="cpu", config=InferenceConfig(fast_spacing_mm=2.5))
    assert site.fast_spacing == (2.5, 2.5, 2.5) and site.spacing == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError):
        InferenceConfig(fast_spacing_mm=0)


def test_export_writes_the_inference_fast_grid(tmp_path):
    from pipeline.segment.bundle import build_network, load_bundle
    from pipeline.train.export import export_bundle
    from pipeline.train.trainer import TrainConfig

    network = {"class": "monai.networks.nets.UNet",
               "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                        "strides": [2], "num_res_units": 0}}
    state = build_network(network).state_dict()
    for fast, want in ((None, [3.0, 3.0, 3.0]), ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])):
        cfg = TrainConfig.model_validate({"network": network, "export_name": "fast-test",
                                          "inference_fast_spacing_mm": fast})
        out = export_bundle(cfg, state, [], tmp_path / "work", 0.0, "cpu", models_dir=tmp_path / str(fast))
        assert json.loads((out / "metadata.json").read_text())["fast_spacing_mm"] == want
        assert load_bundle(out).metadata["fast_spacing_mm"] == want


@pytest.mark.skipif(not (SAMPLE / "ct").is_dir(), reason="data_samples/phantom01 is missing")
def test_fast_report_says_what_it_costs(shipped_model, tmp_path):
    import torch

    from pipeline.study import StudyOptions, StudyRunner

    torch.set_num_threads(min(2, torch.get_num_threads()))
    runner = StudyRunner(StudyOptions(device="cpu", formats=("json",)))
    result = runner.run(SAMPLE, tmp_path / "fast", StudyOptions(device="cpu", formats=("json", "seg", "sr"), fast=True))
    fast = result.report
    assert fast["fast"] is True
    assert fast_mode_warning((2.0, 2.0, 2.0), (1.5, 1.5, 1.5)) in fast["warnings"]
    # what a PACS list shows
    import pydicom

    assert "FAST-mode" in pydicom.dcmread(result.study_dir / "seg.dcm", stop_before_pixels=True).SeriesDescription
    assert "FAST-mode" in pydicom.dcmread(result.study_dir / "sr.dcm").SeriesDescription
    default = runner.run(SAMPLE, tmp_path / "default", StudyOptions(device="cpu", formats=("json",))).report
    assert not any(w.startswith("fast mode") for w in default["warnings"])
