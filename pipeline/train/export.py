"""Export a trained network as a bundle: ``models/<name>/{model.pt, metadata.json, MODEL_CARD.md}``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT
from pipeline.segment.bundle import MODELS_DIR, sha256_file


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_label_meta() -> dict[str, Any]:
    try:
        from pipeline.report.codes import DEFAULT_LABELS
    except ImportError:  # report package absent: names only
        return {"1": {"name": "spinal_canal"}, "2": {"name": "metastasis"}, "3": {"name": "vertebra_bone"}}
    return {str(k): v for k, v in DEFAULT_LABELS.items()}


def export_bundle(cfg, state_dict: dict, history: list[dict], workdir: Path, elapsed_s: float, device: str,
                  models_dir: Path | None = None, extra_training: dict[str, Any] | None = None) -> Path:
    out = (models_dir or MODELS_DIR) / cfg.export_name
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.pt"
    tmp = weights.with_suffix(".tmp")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, weights)
    last = history[-1] if history else {}
    metadata = {
        "name": cfg.export_name,
        "version": cfg.version,
        "description": "Spinal canal, bone metastasis and vertebra/bone segmentation from CT (osteoplan)",
        "network": cfg.network,
        "labels": default_label_meta(),
        "target_spacing_mm": list(cfg.target_spacing_mm),
        "fast_spacing_mm": list(cfg.inference_fast_spacing_mm or cfg.fast_spacing_mm),
        "orientation": "LPS",
        "intensity": cfg.intensity,
        "patch_size": list(cfg.patch_size),
        "inference_roi": list(cfg.inference_roi),
        "weights": "model.pt",
        "sha256": sha256_file(weights),
        "training": {
            "data": cfg.data.model_dump(),
            "steps": int(last.get("step", 0)),
            "schedule_steps": cfg.max_steps,
            "init_from": cfg.init_from,
            "time_limit_s": cfg.time_limit_s,
            "num_workers": cfg.num_workers,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "device": device,
            "torch": torch.__version__,
            "host": platform.machine(),
            "threads": torch.get_num_threads(),
            "wall_time_s": round(elapsed_s, 1),
            "date": dt.date.today().isoformat(),
            "commit": _git_commit(),
            **(extra_training or {}),
        },
        "metrics": {"validation_phantom_dice": last.get("dice", {}), "history": history[-10:]},
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
    card = out / "MODEL_CARD.md"
    if not card.exists():
        card.write_text(_card_stub(metadata))
    return out


def _card_stub(md: dict[str, Any]) -> str:
    """First version of the model card: facts from this export. Curated afterwards by the team."""
    t = md["training"]
    d = md["metrics"]["validation_phantom_dice"]
    return f"""# Model card: {md['name']} {md['version']}

Decision support only, not a medical device.

- Network: `{md['network']['class']}` {md['network'].get('args', {})}
- Labels: 0 background, 1 spinal canal, 2 metastasis, 3 vertebra/bone
- Spacing: {md['target_spacing_mm']} mm (fast: {md['fast_spacing_mm']} mm), LPS-aligned grid
- Trained: {t['steps']} steps, batch {t['batch_size']}, seed {t['seed']}, on {t['device']} ({t['host']},
  {t['threads']} threads), {t['wall_time_s']} s wall, {t['date']}, commit {t['commit']}
- Validation Dice on held-out phantoms: {d}
"""
