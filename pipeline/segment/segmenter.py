"""Segmenter: a loaded bundle on a device; Volume in, Segmentation (on the Volume's grid) out.

preprocess: resample HU to the canonical LPS grid at the model's spacing, normalise.
inference: MONAI sliding-window inference (gaussian blending; autocast on CUDA). The windows are
planned per volume (``plan_windows``): no larger than the bundle's ``inference_roi``, but shrunk
to just cover the volume with the same number of windows (on a 239x239x200 grid: 8 windows of
144x144x120 instead of 8 of 160^3, 1.65x fewer voxels through the network).
postprocess: logits back to the input grid (trilinear + argmax, exact; only cells near a label
boundary are actually sampled), only inside the box where the coarse result has foreground.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from pipeline.config import InferenceConfig
from pipeline.errors import InputError
from pipeline.segment.bundle import Bundle, load_bundle
from pipeline.segment.lesion_refine import grow_lytic_lesions
from pipeline.segment.resample import (
    argmax_channels,
    canonical_geometry,
    foreground_roi,
    logits_to_labels,
    sample_labels,
    to_canonical,
    to_canonical_on_device,
)
from pipeline.segment.tta import refine_logits
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


def _window_count(size: int, window: int, overlap: float) -> int:
    """Windows MONAI's ``sliding_window_inference`` places along an axis of ``size`` voxels."""
    if window >= size:
        return 1  # the image is padded up to the window
    step = max(int(window * (1 - overlap)), 1)
    d = 0
    while d * step + window < size:
        d += 1
    return d + 1


def plan_windows(shape: tuple[int, ...], roi: tuple[int, ...], sw_batch_size: int, overlap: float,
                 divisor: int) -> tuple[tuple[int, int, int], int]:
    """(window size, windows per forward pass) for sliding-window inference over ``shape``.

    The bundle's ``roi`` is the largest window, as before; a window side is now the smallest
    multiple of ``divisor`` (at least 60% of ``roi``'s side, where the volume is that large) that
    still gives the same tiling count as the bundle's window. On a 239x239x200 grid: 8 windows of
    144x144x120 instead of 8 of 160^3, 1.65x fewer voxels through the network; a volume smaller
    than ``roi`` is one window just covering it. Windows are not made larger than ``roi``: the
    network uses instance normalisation, so its output depends on the window it sees, and larger
    windows than the bundle's scored worse on lesions (BENCHMARKS.md). Among the allowed sizes
    the tiling with the fewest voxels (as MONAI places windows with ``overlap``) wins; ties: fewer
    windows, then the larger smallest side. Windows per pass: as many as fit
    ``prod(roi) * sw_batch_size`` voxels, at most ``sw_batch_size``.
    """
    k = max(int(divisor), 1)
    budget = max(math.prod(int(r) for r in roi) * max(int(sw_batch_size), 1), k ** 3)
    per_axis: list[dict[int, int]] = []  # window count -> smallest window side giving it
    for size, r in zip(shape, roi):
        top = -(-int(size) // k) * k  # the volume's side rounded up: one window
        cap = top if top <= int(r) else max(k, (int(r) // k) * k)
        least = min(cap, -(-int(math.ceil(0.6 * int(r))) // k) * k)
        best: dict[int, int] = {}
        for w in range(least, cap + 1, k):
            best.setdefault(_window_count(int(size), w, overlap), w)
        per_axis.append(best)
    key_best: tuple[int, int, int] | None = None
    window: tuple[int, int, int] | None = None
    for n0, w0 in per_axis[0].items():
        for n1, w1 in per_axis[1].items():
            for n2, w2 in per_axis[2].items():
                vox = w0 * w1 * w2
                if vox > budget:
                    continue
                n = n0 * n1 * n2
                key = (n * vox, n, -min(w0, w1, w2))
                if key_best is None or key < key_best:
                    key_best, window = key, (w0, w1, w2)
    if window is None:  # the budget is below the smallest allowed window: the roi, one at a time
        window = tuple(min(int(r), -(-int(s) // k) * k) for r, s in zip(roi, shape))  # type: ignore[assignment]
        return window, 1  # type: ignore[return-value]
    return window, max(1, min(int(sw_batch_size), budget // math.prod(window)))


def _context_pads(shape: tuple[int, ...], min_vox: int) -> list[tuple[int, int]]:
    """(before, after) padding per axis that brings every axis to at least ``min_vox`` voxels."""
    out = []
    for n in shape:
        extra = max(int(min_vox) - int(n), 0)
        out.append((extra // 2, extra - extra // 2))
    return out


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
        # GPU: resampling both ways runs on the device (the CPU paths are tuned for the host)
        self.resample_on_device = self.device.type != "cpu"
        md = bundle.metadata
        self.spacing = tuple(float(s) for s in md["target_spacing_mm"])
        if self.config.fast_spacing_mm is not None:  # configs/inference.yaml: the site's choice
            self.fast_spacing = (float(self.config.fast_spacing_mm),) * 3
        else:
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
        """Canonical normalised image (1, 1, X, Y, Z) -> logits (1, C, X, Y, Z) float32.

        On the CPU the logits are on the CPU. On a GPU they stay there when the blended output
        fits comfortably in free device memory (``_output_device``), else they come back.

        An axis shorter than ``min_context_vox`` (a thin slab) is first extended by repeating its
        edge slices, then the logits are cropped back: the network, trained on patches of real
        anatomy, would otherwise see the slab floating in zero padding (water) and lose the canal.
        """
        pads = _context_pads(tuple(x.shape[2:]), self.config.sliding_window.min_context_vox)
        if any(p for pair in pads for p in pair):
            flat = [p for pair in reversed(pads) for p in pair]  # F.pad order: last axis first
            out = self._sliding_window(torch.nn.functional.pad(x, flat, mode="replicate"))
            (a0, _), (a1, _), (a2, _) = pads
            return out[:, :, a0:a0 + x.shape[2], a1:a1 + x.shape[3], a2:a2 + x.shape[4]].contiguous()
        return self._sliding_window(x)

    def _output_device(self, shape: tuple[int, ...]) -> torch.device:
        """Where sliding-window blending happens: the GPU when output + weight map (float32, one
        channel per class plus one) take under a quarter of its free memory, else the CPU."""
        if self.device.type == "cpu":
            return self.device
        classes = int(self.bundle.metadata.get("network", {}).get("args", {}).get("out_channels", 4))
        need = 4 * (classes + 1) * math.prod(int(n) for n in shape)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > free // 4:
                return torch.device("cpu")
        return self.device

    def _sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        sw = self.config.sliding_window
        roi, batch = plan_windows(tuple(x.shape[2:]), self.roi, sw.sw_batch_size, sw.overlap, self.size_divisor)
        with self._autocast():
            out = sliding_window_inference(
                x.to(self.device), roi_size=roi, sw_batch_size=batch, predictor=self.net,
                overlap=sw.overlap, mode=sw.mode, sw_device=self.device,
                device=self._output_device(tuple(x.shape[2:])),
            )
        return out.float()

    def _sync(self) -> None:
        """Wait for queued GPU work, so that each stage's wall time is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def segment(self, volume: Volume, fast: bool = False, timer: Any = None) -> Segmentation:
        from pipeline.study import Timer

        timer = timer or Timer()
        spacing = self.fast_spacing if fast else self.spacing
        with timer.stage("preprocess"):
            canon = canonical_geometry(volume.geometry, spacing)
            if self.resample_on_device:  # the int16 volume goes up once; resampling runs on the GPU
                x = to_canonical_on_device(volume.array, volume.geometry, canon, self.device)
            else:
                x = to_canonical(volume.array, volume.geometry, canon)
            x = normalise(x, self.bundle.metadata["intensity"])
            self._sync()
        with timer.stage("inference"):  # mirror TTA and class offsets (configs/inference.yaml): tta.py
            logits = refine_logits(self.predict_logits, x, self.config, fast)
            del x
            self._sync()
        with timer.stage("postprocess"):
            # same memory order as the image (the DICOM loader's is slice-major "F"): writers copy less
            order = "F" if (volume.array.flags.f_contiguous and not volume.array.flags.c_contiguous) else "C"
            slab = self.config.memory.upsample_slab_voxels
            corner = self.config.postprocess.corner_labels
            if self.resample_on_device and logits.device.type == self.device.type:  # only uint8 labels come back
                coarse = logits[0].argmax(dim=0)  # first index on ties, like argmax_channels
                roi = foreground_roi(coarse, canon, volume.geometry, margin_vox=2)
                labels = (np.zeros(volume.geometry.shape, np.uint8, order=order) if roi is None else
                          sample_labels(logits, canon, volume.geometry, roi_ijk=roi, order=order, chunk_voxels=slab,
                                        corner_labels=corner))
            else:
                coarse = argmax_channels(logits[0]).numpy()
                roi = foreground_roi(coarse, canon, volume.geometry, margin_vox=2)
                labels = (np.zeros(volume.geometry.shape, np.uint8, order=order) if roi is None else
                          logits_to_labels(logits, canon, volume.geometry, slab_voxels=slab, roi_ijk=roi, order=order,
                                           corner_labels=corner))
            del logits
            refined = grow_lytic_lesions(labels, volume.array, volume.geometry, self.config.postprocess)
        info = self.bundle.info
        if fast:
            info = type(info)(name=info.name, version=info.version, sha256=info.sha256, spacing_mm=spacing)
        return Segmentation(labels=labels, geometry=volume.geometry, model=info, device=str(self.device),
                            label_meta=self.bundle.label_meta or None,
                            postprocess={"lesion_refine": refined.as_dict()},
                            refined_voxels=refined.added if refined.enabled else None)
