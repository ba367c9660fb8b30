"""Model bundles: ``models/<name>/{metadata.json, model.pt, MODEL_CARD.md}`` (MONAI-bundle-like).

metadata.json keys: ``name``, ``version``, ``network`` ({"class": "monai.networks.nets.UNet",
"args": {...}}), ``labels`` ({"0": {...}, "1": {"name", "color", "category", "type"}, ...}),
``target_spacing_mm``, ``fast_spacing_mm``, ``orientation`` ("LPS": array axes along +L, +P, +S),
``intensity`` ({"clip": [lo, hi], "scale": s} -> x = clip(HU) / s), ``patch_size`` (training),
``inference_roi`` (sliding-window size), ``weights`` ("model.pt"), ``sha256`` (of the weights),
``training`` and ``metrics``. Weights are a plain state dict. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT
from pipeline.errors import ModelError
from pipeline.types import ModelInfo

MODELS_DIR = REPO_ROOT / "models"
ALLOWED_NETWORKS = ("monai.networks.nets.UNet", "monai.networks.nets.DynUNet", "monai.networks.nets.SegResNet",
                    "monai.networks.nets.BasicUNet")


@dataclass
class Bundle:
    path: Path
    metadata: dict[str, Any]
    network: torch.nn.Module

    @property
    def info(self) -> ModelInfo:
        m = self.metadata
        return ModelInfo(name=m["name"], version=str(m["version"]), sha256=m["sha256"],
                         spacing_mm=tuple(float(s) for s in m["target_spacing_mm"]))

    @property
    def label_meta(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self.metadata.get("labels", {}).items()}


def resolve_bundle_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if (p / "metadata.json").is_file():
        return p
    q = MODELS_DIR / str(name_or_path)
    if (q / "metadata.json").is_file():
        return q
    known = sorted(d.name for d in MODELS_DIR.glob("*") if (d / "metadata.json").is_file()) if MODELS_DIR.is_dir() else []
    raise ModelError(f"model bundle '{name_or_path}' not found (bundles in {MODELS_DIR}: {', '.join(known) or 'none'})")


def build_network(spec: dict[str, Any]) -> torch.nn.Module:
    cls_path = spec.get("class", "")
    if cls_path not in ALLOWED_NETWORKS:
        raise ModelError(f"network class {cls_path!r} is not one of {ALLOWED_NETWORKS}")
    module, _, name = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = dict(spec.get("args", {}))
    for key in ("channels", "strides", "kernel_size", "upsample_kernel_size", "blocks_down", "blocks_up", "features"):
        if key in args and isinstance(args[key], list):
            args[key] = tuple(tuple(v) if isinstance(v, list) else v for v in args[key])
    return cls(**args)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(name_or_path: str | Path, verify: bool = True) -> Bundle:
    """Load metadata and weights (CPU tensors). Refuses a bundle whose weights do not match sha256."""
    path = resolve_bundle_path(name_or_path)
    try:
        metadata = json.loads((path / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model bundle {path.name}: unreadable metadata.json ({exc.__class__.__name__})") from None
    for key in ("name", "version", "network", "target_spacing_mm", "intensity", "weights", "sha256"):
        if key not in metadata:
            raise ModelError(f"model bundle {path.name}: metadata.json lacks '{key}'")
    weights = path / metadata["weights"]
    if not weights.is_file():
        raise ModelError(f"model bundle {path.name}: weights file {metadata['weights']} is missing")
    if verify and sha256_file(weights) != metadata["sha256"]:
        raise ModelError(f"model bundle {path.name}: weights do not match the sha256 in metadata.json")
    net = build_network(metadata["network"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"model bundle {path.name}: weights do not fit the network ({str(exc).splitlines()[0]})") from None
    net.eval()
    return Bundle(path=path, metadata=metadata, network=net)
