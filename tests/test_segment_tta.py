"""Mirror test-time augmentation and class offsets (pipeline/segment/tta.py, configs/inference.yaml)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import InferenceConfig, load_inference_config
from pipeline.errors import InputError
from pipeline.segment.tta import add_class_offsets, flip_dims, mirrored_logits, refine_logits


def _asymmetric(x: torch.Tensor) -> torch.Tensor:
    """A 'network' that is not mirror-equivariant: 2 channels, x and a ramp along each axis."""
    ramp = torch.zeros_like(x)
    for d, n in zip((2, 3, 4), x.shape[2:]):
        shape = [1, 1, 1, 1, 1]
        shape[d] = n
        ramp = ramp + torch.arange(n, dtype=x.dtype).reshape(shape) * (d - 1)
    return torch.cat([x, ramp], dim=1)


def test_flip_dims_maps_axis_names_to_tensor_dims_and_drops_duplicates():
    assert flip_dims([["lr"], ["si"], ["si", "lr"], ["lr", "si"]]) == [(2,), (4,), (2, 4)]
    assert flip_dims([]) == []
    with pytest.raises(KeyError):
        flip_dims([["up"]])


def test_no_flips_is_the_plain_prediction():
    x = torch.rand(1, 1, 6, 5, 4)
    torch.testing.assert_close(mirrored_logits(_asymmetric, x, []), _asymmetric(x))


def test_mirrored_outputs_are_flipped_back_before_averaging():
    x = torch.rand(1, 1, 6, 5, 4)
    out = mirrored_logits(_asymmetric, x, [["lr"]])
    # channel 0 follows the image: flip(f(flip(x))) == f(x), so the mean is x itself (not mirrored)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    # channel 1 is the ramp i + 2j + 3k; the mirrored pass, flipped back, gives (n-1-i) + 2j + 3k
    i, j, k = torch.meshgrid(torch.arange(6.0), torch.arange(5.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(out[0, 1], (6 - 1) / 2 + 2 * j + 3 * k)
    out2 = mirrored_logits(_asymmetric, x, [["lr", "si"]])
    torch.testing.assert_close(out2[0, 1], (6 - 1) / 2 + 2 * j + 3 * (4 - 1) / 2 + 0 * k)


def test_softmax_combine_averages_probabilities():
    x = torch.rand(1, 1, 4, 4, 4)
    a = torch.softmax(_asymmetric(x), dim=1)
    b = torch.softmax(torch.flip(_asymmetric(torch.flip(x, dims=(4,))), dims=(4,)), dim=1)
    out = mirrored_logits(_asymmetric, x, [["si"]], combine="softmax")
    torch.testing.assert_close(torch.exp(out), (a + b) / 2)
    with pytest.raises(ValueError):
        mirrored_logits(_asymmetric, x, [["si"]], combine="median")


def test_a_mirror_equivariant_network_is_unchanged_by_tta():
    x = torch.rand(1, 1, 5, 6, 7)
    net = torch.nn.Conv3d(1, 4, 3, padding=1, bias=True)
    with torch.no_grad():  # a symmetric kernel commutes with every flip
        w = torch.rand(4, 1, 3, 3, 3)
        for d in (2, 3, 4):
            w = w + torch.flip(w, dims=(d,))
        net.weight.copy_(w)
    with torch.inference_mode():
        plain = net(x)
        tta = mirrored_logits(net, x, [["lr"], ["si"], ["lr", "ap", "si"]])
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)


def test_class_offsets_shift_the_argmax():
    logits = torch.tensor([0.0, 1.0, 0.8, 0.0]).reshape(1, 4, 1, 1, 1).repeat(1, 1, 2, 2, 2)
    assert int(logits.argmax(1).unique()) == 1
    add_class_offsets(logits, {2: 0.5})
    assert int(logits.argmax(1).unique()) == 2
    with pytest.raises(ValueError):
        add_class_offsets(logits, {7: 1.0})


def test_refine_logits_follows_the_config_and_skips_mirrors_in_fast_mode():
    calls = []

    def predict(x):
        calls.append(x.clone())
        return _asymmetric(x)

    x = torch.rand(1, 1, 4, 5, 6)
    cfg = InferenceConfig.model_validate({"tta": {"flips": [["lr"], ["si"]]}})
    out = refine_logits(predict, x, cfg, fast=False)
    assert len(calls) == 3
    torch.testing.assert_close(calls[1], torch.flip(x, dims=(2,)))
    torch.testing.assert_close(calls[2], torch.flip(x, dims=(4,)))
    torch.testing.assert_close(out, mirrored_logits(_asymmetric, x, [["lr"], ["si"]]))
    calls.clear()
    refine_logits(predict, x, InferenceConfig.model_validate({"tta": {"flips": [["lr"]]}}), fast=True)
    assert len(calls) == 1  # --fast: no mirrors unless tta.in_fast
    calls.clear()
    refine_logits(predict, x, InferenceConfig.model_validate({"tta": {"flips": [["lr"]], "in_fast": True}}), fast=True)
    assert len(calls) == 2


def test_refine_logits_applies_offsets_to_four_class_logits():
    def predict(x):
        return torch.zeros(1, 4, *x.shape[2:])

    cfg = InferenceConfig.model_validate({"tta": {"flips": []}, "class_offsets": {"canal": 1.5, "lesion": -2.0}})
    out = refine_logits(predict, torch.rand(1, 1, 3, 3, 3), cfg)
    assert out[0, :, 0, 0, 0].tolist() == [0.0, 1.5, -2.0, 0.0]


def test_shipped_config_has_no_mirrors_by_default_and_none_in_fast_mode():
    cfg = load_inference_config()
    assert cfg.tta.flips == [] and not cfg.tta.in_fast and cfg.tta.combine == "logits"
    assert cfg.class_offsets.by_label() == {1: 0.0, 2: 0.0, 3: 0.0}
    assert InferenceConfig().tta == cfg.tta  # the code default is the shipped setting


@pytest.mark.parametrize("tta", [
    {"flips": [["up"]]},
    {"flips": [[]]},
    {"flips": [["lr", "lr"]]},
    {"flips": [["lr"], ["lr"]]},
    {"combine": "max"},
    {"mirrors": 2},
])
def test_invalid_tta_settings_are_refused(tmp_path, tta):
    import yaml

    path = tmp_path / "inference.yaml"
    path.write_text(yaml.safe_dump({"tta": tta}))
    with pytest.raises(InputError, match="invalid inference config"):
        load_inference_config(path)


def test_invalid_class_offsets_are_refused(tmp_path):
    path = tmp_path / "inference.yaml"
    path.write_text("class_offsets: {tumour: 1.0}\n")
    with pytest.raises(InputError):
        load_inference_config(path)
    path.write_text("class_offsets: {lesion: 100}\n")
    with pytest.raises(InputError):
        load_inference_config(path)
