"""Thin slabs: axes shorter than the model's context are extended by edge replication, then cropped."""

from __future__ import annotations

import torch

from pipeline.config import InferenceConfig
from pipeline.segment.segmenter import Segmenter, _context_pads


class _Probe(torch.nn.Module):
    """Channel 0 = the input; channel 1 = how many voxels the network saw along each axis (z only)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[2:]))
        return torch.cat([x, torch.full_like(x, float(x.shape[4]))], dim=1)


def _segmenter(min_context: int) -> tuple[Segmenter, _Probe]:
    seg = Segmenter.__new__(Segmenter)
    cfg = InferenceConfig()
    cfg.sliding_window.min_context_vox = min_context
    probe = _Probe()
    seg.config, seg.net, seg.device, seg.roi, seg.size_divisor = cfg, probe, torch.device("cpu"), (160, 160, 160), 8
    return seg, probe


def test_context_pads_are_split_around_short_axes_only():
    assert _context_pads((100, 27, 64), 64) == [(0, 0), (18, 19), (0, 0)]
    assert _context_pads((10, 10, 10), 0) == [(0, 0)] * 3


def test_thin_slab_is_extended_by_its_edge_slices_and_cropped_back_exactly():
    x = torch.arange(40 * 36 * 9, dtype=torch.float32).reshape(1, 1, 40, 36, 9) / 1000.0
    seg, probe = _segmenter(64)
    out = seg.predict_logits(x)
    assert out.shape == (1, 2, 40, 36, 9)
    assert all(s[2] >= 64 and s[1] >= 64 and s[0] >= 64 for s in probe.seen)  # the network saw >= 64 voxels
    torch.testing.assert_close(out[:, :1], x, atol=1e-5, rtol=0)  # cropped back to the same voxels


def test_no_padding_when_the_volume_is_large_enough_or_it_is_off():
    x = torch.rand(1, 1, 40, 36, 9)
    seg, probe = _segmenter(0)
    out = seg.predict_logits(x)
    assert out.shape == (1, 2, 40, 36, 9) and probe.seen[0][2] < 64
    torch.testing.assert_close(out[:, :1], x, atol=1e-5, rtol=0)
