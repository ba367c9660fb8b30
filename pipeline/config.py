"""Validated configuration (pydantic). YAML files live in configs/; a site overrides them with --config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class LesionRefine(BaseModel):
    """Grow lytic lesions into adjacent bone as dark as they are (pipeline/segment/lesion_refine.py)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    sigma_mm: float = Field(0.75, ge=0.0, le=5.0, description="Gaussian smoothing of the HU before comparing (noise)")
    grow_mm: float = Field(4.0, gt=0.0, le=20.0, description="how far (mm) a lesion may grow beyond its segmented edge")
    reference_shell_mm: tuple[float, float] = Field(
        (2.0, 8.0), description="bone between these distances (mm) from the lesion is its intensity reference")
    min_separation: float = Field(1.0, ge=0.0, description="grow only lesions darker than that bone by at least this "
                                  "many (mean) robust standard deviations")

    @field_validator("reference_shell_mm")
    @classmethod
    def _shell(cls, shell: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= shell[0] < shell[1] <= 30.0:
            raise ValueError(f"reference_shell_mm must be [inner, outer] with 0 <= inner < outer <= 30, not {list(shell)}")
        return shell


class Postprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_lesion_volume_ml: float = Field(0.05, ge=0.0)
    require_bone_contact: bool = True
    keep_largest_canal_component: bool = True
    bone_reference_margin_mm: float = Field(20.0, gt=0.0)
    corner_labels: bool = Field(True, description="back on the input grid, a voxel takes only a label that one of the "
                                "8 model voxels around it has (no spurious layer between touching classes)")
    lesion_refine: LesionRefine = LesionRefine()


class TestTimeAugmentation(BaseModel):
    """Mirror test-time augmentation (pipeline/segment/tta.py)."""

    model_config = ConfigDict(extra="forbid")
    flips: list[list[Literal["lr", "ap", "si"]]] = Field(
        default_factory=list,
        description="extra network passes, each mirrored along these canonical axes (lr left-right, ap "
                    "anterior-posterior, si superior-inferior); outputs are mirrored back and averaged; [] = off")
    combine: Literal["logits", "softmax"] = Field("logits", description="average the logits or the probabilities")
    in_fast: bool = Field(False, description="also mirror with --fast")

    @field_validator("flips")
    @classmethod
    def _distinct(cls, flips: list[list[str]]) -> list[list[str]]:
        seen = set()
        for names in flips:
            key = frozenset(names)
            if not names or len(key) != len(names):
                raise ValueError(f"each flip is a non-empty list of distinct axes (lr, ap, si), not {names}")
            if key in seen:
                raise ValueError(f"flip {names} is listed twice")
            seen.add(key)
        return flips


class ClassOffsets(BaseModel):
    """Constants added to a class's logit before the arg-max (a decision-threshold shift)."""

    model_config = ConfigDict(extra="forbid")
    canal: float = Field(0.0, ge=-20.0, le=20.0)
    lesion: float = Field(0.0, ge=-20.0, le=20.0)
    bone: float = Field(0.0, ge=-20.0, le=20.0)

    def by_label(self) -> dict[int, float]:
        return {1: self.canal, 2: self.lesion, 3: self.bone}


class Memory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_input_voxels: int = Field(1_500_000_000, gt=0)
    upsample_slab_voxels: int = Field(8_000_000, gt=0)


class InferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "osteoplan-spine"
    amp: bool = True
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    fast_spacing_mm: float | None = Field(None, gt=0, le=10,
                                          description="--fast model grid (isotropic, mm); None = the bundle's fast_spacing_mm")
    sliding_window: SlidingWindow = SlidingWindow()
    tta: TestTimeAugmentation = TestTimeAugmentation()
    class_offsets: ClassOffsets = ClassOffsets()
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
