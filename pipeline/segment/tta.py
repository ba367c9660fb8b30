"""Inference-time refinements that need no retraining: mirror test-time augmentation and
per-class logit offsets.

Both act on the network's logits on the canonical grid (``Segmenter.predict_logits``), before
the logits go back to the input grid, so everything downstream (trilinear resampling + argmax,
lesion components, the exact voxel-grid distances) is unchanged.

- **Mirror TTA** (``tta.flips`` in configs/inference.yaml): the normalised image is also run
  mirrored along the listed canonical axes (``lr`` = left-right, ``si`` = superior-inferior,
  ``ap`` = anterior-posterior), each output is mirrored back and the outputs are averaged
  (``tta.combine``: ``logits``, the mean of the logits, or ``softmax``, the log of the mean
  class probabilities). The model was trained with L-R and S-I flips, so those mirrors are in its
  training distribution. Each mirror costs one more sliding-window pass.
- **Class offsets** (``class_offsets``): a constant added to one class's logit everywhere, i.e.
  a change of that class's decision threshold (a prior shift). Adding a constant commutes with
  the trilinear resampling (its weights sum to 1), so the offset is applied once, here.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Sequence

import torch

# axes of the canonical grid (pipeline.segment.resample.canonical_geometry: LPS-aligned, i along
# L, j along P, k along S) -> array axis of a (N, C, X, Y, Z) tensor
AXES = {"lr": 2, "ap": 3, "si": 4}
COMBINE = ("logits", "softmax")


def flip_dims(flips: Iterable[Sequence[str]]) -> list[tuple[int, ...]]:
    """Config flips (each a list of axis names, e.g. ``[["lr"], ["si"], ["lr", "si"]]``) -> tensor
    dims per extra pass; the identity pass is always run and is not listed. Duplicates collapse."""
    out: list[tuple[int, ...]] = []
    for names in flips:
        dims = tuple(sorted({AXES[n] for n in names}))
        if dims and dims not in out:
            out.append(dims)
    return out


def mirrored_logits(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    flips: Iterable[Sequence[str]], combine: str = "logits") -> torch.Tensor:
    """``predict(x)`` averaged with ``flip(predict(flip(x)))`` over the mirrors in ``flips``.

    ``predict`` maps (1, 1, X, Y, Z) to (1, C, X, Y, Z) float32. ``combine='logits'`` averages
    the logits; ``'softmax'`` averages the class probabilities and returns their log (a valid
    logit for argmax and for trilinear resampling). Without flips, ``predict(x)`` unchanged.
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, not {combine!r}")
    dims = flip_dims(flips)
    out = predict(x)
    if not dims:
        return out
    mirrored = (torch.flip(predict(torch.flip(x, dims=d)), dims=d) for d in dims)  # one pass at a time
    return average_outputs(itertools.chain([out], mirrored), combine)


def average_outputs(outputs: Iterable[torch.Tensor], combine: str = "logits") -> torch.Tensor:
    """The mean of (N, C, ...) network outputs, accumulated one at a time: of the logits
    (``combine='logits'``), or the log of the mean class probabilities (``'softmax'``)."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, not {combine!r}")
    acc, n = None, 0
    for y in outputs:
        y = y.float() if combine == "logits" else torch.softmax(y.float(), dim=1)
        acc = y if acc is None else acc.add_(y)
        n += 1
    if acc is None:
        raise ValueError("no outputs to average")
    acc /= n
    if combine == "softmax":
        acc = torch.log(acc.clamp_min_(1e-12))
    return acc


def add_class_offsets(logits: torch.Tensor, offsets: dict[int, float]) -> torch.Tensor:
    """Add ``offsets[c]`` to channel ``c`` of (N, C, ...) logits, in place; returns ``logits``."""
    for c, v in offsets.items():
        if v:
            if not 0 <= int(c) < logits.shape[1]:
                raise ValueError(f"class offset for class {c}: the model has {logits.shape[1]} classes")
            logits[:, int(c)] += float(v)
    return logits




def refine_logits(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, config,
                  fast: bool = False) -> torch.Tensor:
    """``predict(x)`` with the configured mirror TTA (``config.tta``, skipped with ``fast`` unless
    ``tta.in_fast``) and class offsets (``config.class_offsets``); ``config`` is an InferenceConfig."""
    flips = config.tta.flips if (not fast or config.tta.in_fast) else []
    with torch.inference_mode():
        out = mirrored_logits(predict, x, flips, config.tta.combine)
        offsets = {c: v for c, v in config.class_offsets.by_label().items() if v}
        if offsets:
            out = add_class_offsets(out, offsets)
    return out
