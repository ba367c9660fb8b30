"""Helpers for the batch tests: tiny DICOM/NIfTI studies and a fast stand-in for StudyRunner.

The stand-in ("FakeRunner") does what the batch layer relies on StudyRunner for — one output
folder per study, written into a temp folder and renamed into place, report.json with lesions —
but its "segmentation" is a threshold, so orchestration tests take milliseconds. The end-to-end
tests use the real StudyRunner and model bundle where they exist.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import weakref
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipeline.errors import InputError, NoCTSeriesError
from pipeline.types import DicomSource, Geometry, Volume

REPO = Path(__file__).resolve().parent.parent


def write_series(outdir: Path, study_uid: str, hu: np.ndarray, *, series_uid: str | None = None,
                 modality: str = "CT", spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
                 prefix: str = "IM", names: list[str] | None = None) -> list[Path]:
    """Write ``hu`` (i, j, k) as single-frame slices; returns the file paths (k order)."""
    outdir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "PH0001"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0.0, 1.0
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T.astype(np.int16)).tobytes()
        name = names[k] if names else f"{prefix}{k:04d}.dcm"
        path = outdir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_hu(seed: int, shape: tuple[int, int, int] = (24, 24, 6)) -> np.ndarray:
    """Soft tissue with a bright 'bone' block whose size depends on the seed."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 5, shape)
    r = 2 + seed % 5
    c = np.array(shape) // 2
    hu[c[0] - r:c[0] + r, c[1] - r:c[1] + r, :] = 900
    return hu


def make_study(root: Path, seed: int, *, study_uid: str | None = None, n_slices: int = 6, **kw: Any) -> tuple[str, list[Path]]:
    uid = study_uid or generate_uid()
    files = write_series(root, uid, phantom_hu(seed, (24, 24, n_slices)), **kw)
    return uid, files


def make_nifti(path: Path, seed: int) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(seed).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([-1.0, -1.0, 2.0, 1.0])), str(path))
    return path


def make_zip(path: Path, files: list[Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for f in files:
            zf.write(f, f"DICOM/{f.name}")
    return path


# ---- stand-ins for the loader and StudyRunner -------------------------------------------------

def fake_load(study: Any, options: Any, max_voxels: int | None = None) -> Volume:
    """Full pydicom read of a study's CT slices (or nibabel for NIfTI); test-only loader."""
    if study.kind == "unreadable":
        raise InputError(study.error)
    if study.kind == "nifti":
        import nibabel as nib

        img = nib.load(str(study.input_path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        geo = Geometry(arr.shape, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
        return Volume(arr, geo, None, input_path=str(study.input_path), input_kind="nifti")
    if study.kind != "zip":
        return _read_slices(study, list(study.files))
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="batchzip-"))
    try:
        try:
            with zipfile.ZipFile(study.input_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            raise InputError("the zip file is corrupt") from None
        vol = _read_slices(study, sorted(p for p in tmp.rglob("*") if p.is_file()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(vol, shutil.rmtree, str(tmp), True)  # as the real loader does
    return vol


def _read_slices(study: Any, files: list[Path]) -> Volume:
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        if ds.Modality != "CT":
            continue
        try:
            px = ds.pixel_array
        except Exception:
            raise InputError("a CT slice cannot be decoded (truncated file?)") from None
        slices.append((float(ds.ImagePositionPatient[2]), px.T.astype(np.float32) * float(ds.RescaleSlope)
                       + float(ds.RescaleIntercept), ds))
    if not slices:
        raise NoCTSeriesError("no CT series in the input")
    slices.sort(key=lambda s: s[0])
    arr = np.stack([s[1] for s in slices], axis=2)
    ds0 = slices[0][2]
    geo = Geometry(arr.shape, (1.0, 1.0, 2.0), (0.0, 0.0, slices[0][0]), np.eye(3))
    src = DicomSource(str(ds0.StudyInstanceUID), str(ds0.SeriesInstanceUID), None,
                      [str(s[2].SOPInstanceUID) for s in slices], [Path(f) for f in files])
    return Volume(arr, geo, src, input_path=str(study.input_path), input_kind=study.kind)


class _Result:
    def __init__(self, study_dir: Path, report: dict) -> None:
        self.study_dir = study_dir
        self.report = report


class _Cfg:
    class memory:
        max_input_voxels = 10_000_000


class FakeRunner:
    """Threshold 'segmentation'; same folder/atomic-write behaviour as StudyRunner.

    ``OSTEOPLAN_FAKE_DELAY_S`` (seconds per study) slows it down for the kill test;
    a study whose volume holds HU == -777 raises, to test failures inside the runner, and one
    holding -999 kills the worker process, to test worker death.
    """

    config = _Cfg()

    def __init__(self, options: Any = None) -> None:
        self.options = options
        self.delay = float(os.environ.get("OSTEOPLAN_FAKE_DELAY_S", "0"))
        self.pid = os.getpid()

    def run(self, input_path: Path, output_root: Path, options: Any = None, volume: Volume | None = None) -> _Result:
        from pipeline.study import _safe_name

        if volume is None:
            raise AssertionError("batch must pass the prefetched volume")
        if np.any(volume.array == -999):
            os._exit(9)  # a worker that dies (segfault, OOM kill)
        if np.any(volume.array == -777):
            raise RuntimeError(f"synthetic failure while reading {input_path}")
        bright = volume.array > 500
        n = int(bright.sum())
        report = {
            "schema_version": "1.0",
            "input": {"path": str(input_path)},
            "series": {"study_instance_uid": volume.dicom.study_instance_uid if volume.dicom else None,
                       "size": list(volume.geometry.shape)},
            "device": "cpu",
            "lesions": [] if n == 0 else [{
                "id": 1, "volume_ml": round(n * volume.geometry.voxel_volume_mm3 / 1000, 3),
                "max_diameter_mm": 1.0, "mean_hu": round(float(volume.array[bright].mean()), 1),
                "type": "blastic", "location": "vertebral_body", "min_distance_to_canal_mm": 3.0,
                "canal_contact": False,
                "recommendation": {"primary": "refer", "options": ["refer"], "flags": [], "borderline": {"value": False}},
            }],
            "timings_s": {"total": 0.0},
            "worker_pid": self.pid,
        }
        if self.delay:
            time.sleep(self.delay)
        study_dir = Path(output_root) / _safe_name(volume.study_key)
        study_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = study_dir.parent / f".{study_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        (tmp / "report.json").write_text(json.dumps(report))
        if self.delay:
            (tmp / "segmentation.nii.gz").write_bytes(b"x" * 1000)
            time.sleep(self.delay)
        if study_dir.exists():
            shutil.rmtree(study_dir)
        os.replace(tmp, study_dir)
        return _Result(study_dir, report)


FAKE = {"runner_factory": "batch_helpers:FakeRunner", "loader": "batch_helpers:fake_load"}


def model_available() -> bool:
    return (REPO / "models" / "osteoplan-spine" / "model.pt").is_file() and \
        (REPO / "models" / "osteoplan-spine" / "metadata.json").is_file()


def read_manifest(out: Path) -> list[dict]:
    lines = []
    for p in sorted(out.glob("manifest*.jsonl")):
        lines += [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    return lines


def tiny_bundle(folder: Path, seed: int = 0, background_bias: float = 50.0) -> Path:
    """An untrained, seeded, very small UNet bundle in the models/ format, for plumbing tests of
    the real StudyRunner where the trained model is absent. Its last layer's background bias is
    raised so it predicts (nearly) all background: zero lesions, so a study takes seconds."""
    import torch

    from pipeline.segment.bundle import build_network, sha256_file
    from pipeline.train.export import default_label_meta

    folder.mkdir(parents=True, exist_ok=True)
    network = {"class": "monai.networks.nets.UNet",
               "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8],
                        "strides": [2], "num_res_units": 0}}
    torch.manual_seed(seed)
    net = build_network(network)
    state = net.state_dict()
    last_bias = [k for k, v in state.items() if k.endswith("bias") and tuple(v.shape) == (4,)][-1]
    state[last_bias][0] += background_bias
    torch.save(state, folder / "model.pt")
    meta = {"name": "batch-test-tiny", "version": "0.0.0", "network": network, "labels": default_label_meta(),
            "target_spacing_mm": [3.0, 3.0, 3.0], "fast_spacing_mm": [4.0, 4.0, 4.0], "orientation": "LPS",
            "intensity": {"clip": [-1000, 2000], "scale": 1000.0}, "patch_size": [32, 32, 32],
            "inference_roi": [32, 32, 32], "weights": "model.pt", "sha256": sha256_file(folder / "model.pt")}
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    return folder
