"""Weight-space ensembling of a fine-tuned network with the weights it started from (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022: linearly interpolating the
weights of a fine-tuned model with those of the model it was fine-tuned from keeps most of the
fine-tune's gain on the new data while keeping more of the start model's robustness, at no
inference cost. Both must share one architecture and come from one training lineage (the
fine-tune starts from the other), otherwise the average means nothing.
"""

from __future__ import annotations

import torch

from pipeline.errors import InputError


def interpolate_weights(trained: dict[str, torch.Tensor], init: dict[str, torch.Tensor],
                        init_share: float) -> dict[str, torch.Tensor]:
    """``init_share * init + (1 - init_share) * trained`` for every floating-point tensor.

    Integer tensors (e.g. batch-norm step counters) are taken from ``trained``. The result is on the
    CPU, contiguous, in each tensor's own dtype. ``init_share`` 0 returns the trained weights.
    """
    if not 0.0 <= init_share < 1.0:
        raise InputError(f"init_weight_share must be in [0, 1), got {init_share}")
    if set(trained) != set(init):
        missing = sorted(set(trained) ^ set(init))[:3]
        raise InputError(f"cannot interpolate weights of different networks (keys differ: {missing})")
    out: dict[str, torch.Tensor] = {}
    for key, t in trained.items():
        t = t.detach().cpu()
        i = init[key].detach().cpu()
        if t.shape != i.shape:
            raise InputError(f"cannot interpolate weights of different networks ({key}: "
                             f"{tuple(t.shape)} vs {tuple(i.shape)})")
        if t.is_floating_point() and init_share > 0.0:
            mixed = init_share * i.double() + (1.0 - init_share) * t.double()
            out[key] = mixed.to(t.dtype).contiguous()
        else:
            out[key] = t.clone().contiguous()
    return out
