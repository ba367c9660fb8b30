"""Segmenter: a loaded bundle on a device; Volume in, Segmentation (on the Volume's grid) out.

preprocess: resample HU to the canonical LPS grid at the model's spacing, normalise.
inference: MONAI sliding-window inference (gaussian blending; autocast on CUDA).
postprocess: logits back to the input grid slab by slab (trilinear + argmax), only inside the
box where the coarse result has foreground.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from pipeline.config import InferenceConfig
from pipeline.errors import InputError
from pipeline.segment.bundle import Bundle, load_bundle
from pipeline.segment.resample import canonical_geometry, foreground_roi, logits_to_labels, to_canonical
from pipeline.types import Segmentation, Volume

log = logging.getLogger("osteoplan.segment")


def pick_device(requested: str = "auto") -> torch.device:
    """auto -> cuda if available, then mps, else cpu. Explicit requests are validated."""
    req = (requested or "auto").lower()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if req.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: no CUDA device is available (torch {torch.__version__})")
        dev = torch.device(req)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if req == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError("--device mps: MPS is not available")
        return torch.device("mps")
    if req == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {requested}: expected auto, cpu, cuda, cuda:N or mps")


def normalise(hu: torch.Tensor, intensity: dict[str, Any]) -> torch.Tensor:
    lo, hi = intensity.get("clip", [-1000.0, 2000.0])
    scale = float(intensity.get("scale", 1000.0))
    shift = float(intensity.get("shift", 0.0))
    return (hu.clamp_(lo, hi) - shift) / scale


def _size_divisor(network: dict[str, Any]) -> int:
    """Product of the network's strides: window sizes must be multiples of it."""
    strides = network.get("args", {}).get("strides", [2, 2, 2, 2])
    k = 1
    for s in strides:
        k *= int(max(s) if isinstance(s, (list, tuple)) else s)
    return max(k, 1)


class Segmenter:
    """Holds the network on its device. Create once per process, call ``segment`` per study."""

    def __init__(self, bundle: Bundle, device: str = "auto", config: InferenceConfig | None = None):
        self.bundle = bundle
        self.config = config or InferenceConfig()
        self.device = pick_device(device)
        # NB: never torch.set_flush_denormal(True) here: FTZ/DAZ makes scipy's cKDTree segfault.
        if self.device.type == "cpu" and self.config.threads > 0:  # 0: torch's default, or a batch worker's share
            torch.set_num_threads(self.config.threads)
        self.net = bundle.network.to(self.device).eval()
        md = bundle.metadata
        self.spacing = tuple(float(s) for s in md["target_spacing_mm"])
        self.fast_spacing = tuple(float(s) for s in md.get("fast_spacing_mm", [2 * s for s in self.spacing]))
        self.roi = tuple(int(s) for s in md.get("inference_roi", md.get("patch_size", [96, 96, 96])))
        self.size_divisor = int(md.get("size_divisor", _size_divisor(md["network"])))

    @classmethod
    def from_bundle(cls, name_or_path: str, device: str = "auto", config: InferenceConfig | None = None) -> "Segmenter":
        return cls(load_bundle(name_or_path), device=device, config=config)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    @torch.inference_mode()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical normalised image (1, 1, X, Y, Z) -> logits (1, C, X, Y, Z) float32 on CPU."""
        sw = self.config.sliding_window
        k = self.size_divisor  # small images: a window just covering them, rounded up to what the net divides by
        roi = tuple(min(r, -(-s // k) * k) for r, s in zip(self.roi, x.shape[2:]))
        with self._autocast():
            out = sliding_window_inference(
                x.to(self.device), roi_size=roi, sw_batch_size=sw.sw_batch_size, predictor=self.net,
                overlap=sw.overlap, mode=sw.mode, sw_device=self.device, device=torch.device("cpu"),
            )
        return out.float()

    def segment(self, volume: Volume, fast: bool = False, timer: Any = None) -> Segmentation:
        from pipeline.study import Timer

        timer = timer or Timer()
        spacing = self.fast_spacing if fast else self.spacing
        with timer.stage("preprocess"):
            canon = canonical_geometry(volume.geometry, spacing)
            x = to_canonical(volume.array, volume.geometry, canon)
            x = normalise(x, self.bundle.metadata["intensity"])
        with timer.stage("inference"):
            logits = self.predict_logits(x)
            del x
        with timer.stage("postprocess"):
            coarse = logits[0].argmax(dim=0).numpy()
            roi = foreground_roi(coarse, canon, volume.geometry, margin_vox=2)
            if roi is None:
                labels = np.zeros(volume.geometry.shape, np.uint8)
            else:
                labels = logits_to_labels(logits, canon, volume.geometry,
                                          slab_voxels=self.config.memory.upsample_slab_voxels, roi_ijk=roi)
        info = self.bundle.info
        if fast:
            info = type(info)(name=info.name, version=info.version, sha256=info.sha256, spacing_mm=spacing)
        return Segmentation(labels=labels, geometry=volume.geometry, model=info, device=str(self.device),
                            label_meta=self.bundle.label_meta or None)
