"""The plain types that flow between stages.

Volume -> Segmentation -> list[Lesion] -> list[LesionPlan] -> writers.

Array convention, everywhere in the project: a volume's array is indexed ``[i, j, k]`` where
``i`` runs along a DICOM row (the first ImageOrientationPatient vector, i.e. the column index),
``j`` runs down the columns (the second vector, the row index) and ``k`` is the slice index
(sorted along the slice normal). ``spacing[a]`` is the step in mm along array axis ``a`` and
``direction[:, a]`` is the unit vector of axis ``a`` in DICOM patient space (LPS). So the
LPS position of voxel ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))`` — the same
convention as ITK, with the array in (x, y, z) order like nibabel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LABELS: dict[int, str] = {0: "background", 1: "spinal_canal", 2: "metastasis", 3: "vertebra_bone"}
CANAL, LESION, BONE = 1, 2, 3


@dataclass(frozen=True, eq=False)
class Geometry:
    """Voxel grid in DICOM patient space (LPS, millimetres)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # 3x3, column a = LPS unit vector of array axis a

    def __post_init__(self) -> None:
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", d)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to (L, P, S, 1)."""
        a = np.eye(4)
        a[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to (R, A, S, 1), as NIfTI wants."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (may be fractional) -> (N, 3) LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk * np.asarray(self.spacing) @ self.direction.T + np.asarray(self.origin)

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) fractional voxel indices."""
        lps = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
        return (lps - np.asarray(self.origin)) @ np.linalg.inv(self.direction).T / np.asarray(self.spacing)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing) * abs(np.linalg.det(self.direction)))

    @property
    def voxel_diagonal_mm(self) -> float:
        return float(np.linalg.norm(self.spacing))

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass
class DicomSource:
    """Where a volume came from in DICOM terms; the writers reference it (SEG/SR)."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    sop_instance_uids: list[str]  # in slice (k) order
    files: list[Path]  # in slice (k) order, one per k (single-frame) or one file (multi-frame)
    modality: str = "CT"
    series_description: str = ""
    series_number: int | None = None


@dataclass
class Volume:
    """A CT volume in Hounsfield units with exact geometry."""

    array: np.ndarray  # HU, shape == geometry.shape, axes (i, j, k)
    geometry: Geometry
    dicom: DicomSource | None = None
    input_path: str = ""
    input_kind: str = "dicom"  # dicom | nifti | zip
    selection: dict[str, Any] = field(default_factory=dict)  # which series and why, others passed over
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise ValueError(f"array shape {self.array.shape} != geometry shape {self.geometry.shape}")

    @property
    def study_key(self) -> str:
        """Output folder name: StudyInstanceUID, or the input's stem."""
        if self.dicom is not None and self.dicom.study_instance_uid:
            return self.dicom.study_instance_uid
        name = Path(self.input_path).name
        for suffix in (".nii.gz", ".nii", ".zip"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name or "study"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    spacing_mm: tuple[float, float, float]


@dataclass
class Segmentation:
    """Label map on the Volume's grid: 0 background, 1 canal, 2 metastasis, 3 bone."""

    labels: np.ndarray  # uint8, shape == geometry.shape
    geometry: Geometry
    model: ModelInfo
    device: str = "cpu"
    # label value -> {"name", "color" [r,g,b], "category" {code, scheme, meaning}, "type" {...}}
    # from the model bundle's metadata.json (None: the writers' defaults in pipeline/report/codes.py)
    label_meta: dict[int, dict[str, Any]] | None = None
    # what postprocessing on the input grid changed, for the report (e.g. {"lesion_refine": {...}})
    postprocess: dict[str, Any] = field(default_factory=dict)
    # (n, 3) voxel indices (i, j, k) the lytic refinement made lesion (None: no refinement ran);
    # lesion types are judged without them (pipeline/segment/lesion_refine.py)
    refined_voxels: np.ndarray | None = None


@dataclass
class Lesion:
    """One metastasis instance with its features and its relation to the canal."""

    id: int  # 1-based, ordered by volume (largest first)
    voxel_count: int
    volume_ml: float
    max_diameter_mm: float
    mean_hu: float
    type: str  # lytic | mixed | blastic
    bone_reference_hu: float | None
    location: str  # vertebral_body | posterior_elements | other_bone | unknown
    centroid_lps_mm: tuple[float, float, float]
    bbox_ijk: tuple[tuple[int, int, int], tuple[int, int, int]]  # inclusive min, exclusive max
    min_distance_to_canal_mm: float | None
    closest_point_lesion_lps_mm: tuple[float, float, float] | None
    closest_point_canal_lps_mm: tuple[float, float, float] | None
    canal_contact: bool
    distance_uncertainty_mm: float
    solitary: bool = False
    features: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleCitation:
    rule: str
    text: str
    source: str


@dataclass
class Recommendation:
    primary: str
    options: list[str]
    flags: list[str]
    rationale: list[RuleCitation]
    borderline: dict[str, Any]  # {"value": bool, "rules": [...], "alternatives": [...]}


@dataclass
class CanalSummary:
    found: bool
    volume_ml: float
