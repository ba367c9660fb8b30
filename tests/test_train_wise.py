"""WiSE-FT weight interpolation (pipeline.train.wise) and its config option."""

from __future__ import annotations

import pytest
import torch
import yaml

from pipeline.errors import InputError
from pipeline.train.wise import interpolate_weights


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).half(),
            "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long)}


def test_interpolation_is_the_weighted_mean_of_float_tensors():
    a, b = _state(1), _state(2)
    out = interpolate_weights(a, b, 0.25)
    torch.testing.assert_close(out["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert out["b"].dtype == torch.float16
    torch.testing.assert_close(out["b"], (0.75 * a["b"].double() + 0.25 * b["b"].double()).half())
    assert out["bn.num_batches_tracked"].item() == 1  # integers come from the trained weights
    assert all(torch.equal(out[k], a[k]) for k in a) is False


def test_share_zero_returns_the_trained_weights_unchanged():
    a, b = _state(1), _state(2)
    out = interpolate_weights(a, b, 0.0)
    assert all(torch.equal(out[k], a[k]) for k in a)
    out["w"][0, 0] = 99.0
    assert a["w"][0, 0] != 99.0  # a copy, not the caller's tensors


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_shares_outside_zero_one_are_refused(share):
    with pytest.raises(InputError):
        interpolate_weights(_state(1), _state(2), share)


def test_different_networks_are_refused():
    a, b = _state(1), _state(2)
    with pytest.raises(InputError, match="keys differ"):
        interpolate_weights(a, {k: v for k, v in b.items() if k != "b"}, 0.5)
    b["w"] = torch.zeros(4, 3)
    with pytest.raises(InputError, match="w:"):
        interpolate_weights(a, b, 0.5)


def test_config_needs_init_from_for_a_share(tmp_path):
    from pipeline.train.trainer import load_train_config

    base = yaml.safe_load(open("configs/train.yaml"))
    base.update(init_weight_share=0.5, init_from=None)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(InputError, match="init_weight_share"):
        load_train_config(p)
    base.update(init_weight_share=1.0, init_from="models/osteoplan-spine")
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(InputError):
        load_train_config(p)
