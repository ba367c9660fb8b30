"""Validated configuration (pydantic). YAML files live in configs/; a site overrides them with --config."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class SlidingWindow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(2, ge=1)
    mode: str = "gaussian"
    min_context_vox: int = Field(64, ge=0, description="axes shorter than this (model voxels) are extended "
                                 "by repeating edge slices before inference (thin slabs); 0 = off")


class Postprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_lesion_volume_ml: float = Field(0.05, ge=0.0)
    require_bone_contact: bool = True
    keep_largest_canal_component: bool = True
    bone_reference_margin_mm: float = Field(20.0, gt=0.0)


class Memory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_input_voxels: int = Field(1_500_000_000, gt=0)
    upsample_slab_voxels: int = Field(8_000_000, gt=0)


class InferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "osteoplan-spine"
    amp: bool = True
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    sliding_window: SlidingWindow = SlidingWindow()
    postprocess: Postprocess = Postprocess()
    memory: Memory = Memory()


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping")
    return data


def load_inference_config(path: Path | None = None) -> InferenceConfig:
    path = path or CONFIG_DIR / "inference.yaml"
    data = read_yaml(path) if Path(path).exists() or path != CONFIG_DIR / "inference.yaml" else {}
    try:
        return InferenceConfig.model_validate(data)
    except Exception as exc:  # pydantic.ValidationError
        raise InputError(f"invalid inference config {path}: {str(exc).splitlines()[0]}") from None
