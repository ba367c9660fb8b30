"""Fixtures for the report tests: small CT series with a known label map, lesions and plans.

Built from the plain types in pipeline/types.py, so the report tests never need the model.
Series are written with pipeline.io.dicom_write.write_ct_series and read back with
pipeline.io.load.load_input, so the SEG geometry tests also cover the loader's conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.types import (BONE, CANAL, LESION, CanalSummary, Geometry, Lesion, ModelInfo, Recommendation,
                            RuleCitation, Segmentation, Volume)

MODEL = ModelInfo(name="osteoplan-test", version="0.0.1", sha256="ab" * 32, spacing_mm=(1.5, 1.5, 1.5))

# name -> (direction columns as (row vector, column vector, slice vector), patient position)
ORIENTATIONS: dict[str, tuple[np.ndarray, str]] = {
    "HFS": (np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]).T, "HFS"),
    # feet first: slices stacked towards the feet, rows towards patient right
    "FFS": (np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]]).T, "FFS"),
    # rows running right-to-left and columns bottom-to-top (a mirrored reconstruction)
    "FLIPPED": (np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T, "HFS"),
    # oblique (gantry-tilt-like, 12 deg about the L axis) with anisotropic pixels
    "OBLIQUE": (None, "HFS"),  # type: ignore[dict-item]
}


def _oblique() -> np.ndarray:
    a = np.deg2rad(12.0)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(a), -np.sin(a)])
    return np.stack([row, col, np.cross(row, col)], axis=1)


def make_geometry(kind: str = "HFS", shape: tuple[int, int, int] = (48, 40, 24),
                  spacing: tuple[float, float, float] = (0.8, 0.9, 2.0)) -> tuple[Geometry, str]:
    direction, position = ORIENTATIONS[kind]
    if direction is None:
        direction = _oblique()
    origin = (-20.5, -17.25, 100.0)
    return Geometry(shape=shape, spacing=spacing, origin=origin, direction=direction), position


def phantom_labels(geom: Geometry) -> np.ndarray:
    """Bone box, a canal tube through it along k and an asymmetric lesion (sphere + tail) in the bone."""
    ni, nj, nk = geom.shape
    i, j, k = np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij")
    labels = np.zeros(geom.shape, np.uint8)
    labels[(i >= 6) & (i < ni - 6) & (j >= 4) & (j < nj - 4) & (k >= 1) & (k < nk - 1)] = BONE
    ci, cj = ni * 0.5, nj * 0.7
    labels[((i - ci) ** 2 + (j - cj) ** 2 <= 5.0 ** 2) & (k >= 0)] = CANAL
    li, lj, lk = ni * 0.35, nj * 0.3, nk * 0.5
    sphere = (i - li) ** 2 + (j - lj) ** 2 + ((k - lk) * 2) ** 2 <= 6.0 ** 2
    tail = (i >= li) & (i < li + 12) & (np.abs(j - lj) <= 1) & (np.abs(k - lk) <= 1)  # breaks symmetry
    labels[sphere | tail] = LESION
    # a second, small lesion at the other side
    labels[(i - ni * 0.75) ** 2 + (j - nj * 0.25) ** 2 + ((k - nk * 0.3) * 2) ** 2 <= 3.0 ** 2] = LESION
    return labels


def phantom_hu(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = np.full(labels.shape, -50.0) + rng.normal(0, 10, labels.shape)
    hu[labels == BONE] += 350
    hu[labels == CANAL] += 70
    hu[labels == LESION] += 160
    return hu.astype(np.int16)


def lesions_from_labels(labels: np.ndarray, geom: Geometry, hu: np.ndarray) -> tuple[list[Lesion], CanalSummary]:
    """Lesions measured by brute force (fine for these small grids): volume, diameter, closest points."""
    from scipy import ndimage

    comp, n = ndimage.label(labels == LESION)
    canal_idx = np.argwhere(labels == CANAL)
    canal_lps = geom.index_to_lps(canal_idx)
    vox_ml = geom.voxel_volume_mm3 / 1000.0
    out = []
    for c in range(1, n + 1):
        idx = np.argwhere(comp == c)
        lps = geom.index_to_lps(idx)
        d2 = ((lps[:, None, :] - canal_lps[None, :, :]) ** 2).sum(-1)
        a, b = np.unravel_index(int(np.argmin(d2)), d2.shape)
        dist = float(np.sqrt(d2[a, b]))
        diam = float(np.sqrt(((lps[:, None, :] - lps[None, :, :]) ** 2).sum(-1).max()))
        mean_hu = float(hu[comp == c].mean())
        out.append(Lesion(
            id=0, voxel_count=len(idx), volume_ml=len(idx) * vox_ml, max_diameter_mm=diam, mean_hu=mean_hu,
            type="lytic" if mean_hu < 200 else "blastic", bone_reference_hu=300.0, location="vertebral_body",
            centroid_lps_mm=tuple(lps.mean(0)), bbox_ijk=(tuple(idx.min(0)), tuple(idx.max(0) + 1)),
            min_distance_to_canal_mm=dist, closest_point_lesion_lps_mm=tuple(lps[a]),
            closest_point_canal_lps_mm=tuple(canal_lps[b]), canal_contact=dist <= 1.0,
            distance_uncertainty_mm=geom.voxel_diagonal_mm, solitary=n == 1,
        ))
    out.sort(key=lambda les: -les.voxel_count)
    for n_id, les in enumerate(out, 1):
        les.id = n_id
    canal = CanalSummary(found=len(canal_idx) > 0, volume_ml=len(canal_idx) * vox_ml)
    return out, canal


def recommendation_for(les: Lesion) -> Recommendation:
    near = les.min_distance_to_canal_mm is not None and les.min_distance_to_canal_mm < 10
    return Recommendation(
        primary="cementoplasty" if les.type != "blastic" else "cryoablation",
        options=["rfa_plus_cementoplasty"] if les.type != "blastic" else [],
        flags=["thermoprotection_required"] if near else [],
        rationale=[
            RuleCitation("R-CONSOLIDATE", "Lytic lesion in a weight-bearing site: cementoplasty.", "seed"),
            RuleCitation("R-HEAT", "RFA within 10 mm of the canal needs thermoprotection.", "Nakatsuka, CVIR 2009"),
        ],
        borderline=({"value": True, "rules": ["R-HEAT"], "alternatives": [{
            "rule": "R-HEAT", "quantity": "distance", "threshold": 10.0, "if_below": "cementoplasty",
            "if_above": "cementoplasty", "options_if_below": ["rfa_plus_cementoplasty"],
            "options_if_above": ["rfa_plus_cementoplasty"], "flags_if_below": ["thermoprotection_required"],
            "flags_if_above": []}]} if near else {"value": False, "rules": [], "alternatives": []}),
    )


@dataclass
class Case:
    volume: Volume
    seg: Segmentation
    lesions: list[Lesion]
    recs: list[Recommendation]
    canal: CanalSummary
    labels: np.ndarray  # on the loaded volume's grid
    series_dir: Path | None


def dicom_case(tmp: Path, kind: str = "HFS", shape=(48, 40, 24), spacing=(0.8, 0.9, 2.0),
               file_names: str = "random") -> Case:
    """Write a CT series, load it with the project's loader, segment it with the phantom labels.

    ``file_names="random"`` also shuffles InstanceNumbers, so neither names nor numbers give the order.
    """
    from pipeline.io.dicom_write import write_ct_series
    from pipeline.io.load import load_input

    geom, position = make_geometry(kind, shape, spacing)
    labels = phantom_labels(geom)
    hu = phantom_hu(labels)
    series_dir = tmp / f"ct_{kind}"
    write_ct_series(hu, geom, series_dir, patient_position=position, file_names=file_names,
                    instance_numbers="shuffled" if file_names == "random" else "ordered", seed=7)
    volume = load_input(series_dir)
    # the label map must be expressed on the LOADED grid (the loader may order slices differently)
    labels_loaded = resample_nearest(labels, geom, volume.geometry)
    return _finish(volume, labels_loaded, series_dir)


def nifti_like_case(kind: str = "HFS") -> Case:
    """A Volume without DICOM source (as from a NIfTI input)."""
    geom, _ = make_geometry(kind)
    labels = phantom_labels(geom)
    volume = Volume(array=phantom_hu(labels).astype(np.float32), geometry=geom, dicom=None,
                    input_path="/data/in/case7.nii.gz", input_kind="nifti",
                    selection={"reason": "single NIfTI"}, warnings=[])
    return _finish(volume, labels, None)


def _finish(volume: Volume, labels: np.ndarray, series_dir: Path | None) -> Case:
    seg = Segmentation(labels=labels, geometry=volume.geometry, model=MODEL, device="cpu")
    lesions, canal = lesions_from_labels(labels, volume.geometry, np.asarray(volume.array))
    recs = [recommendation_for(les) for les in lesions]
    return Case(volume, seg, lesions, recs, canal, labels, series_dir)


def resample_nearest(labels: np.ndarray, src: Geometry, dst: Geometry) -> np.ndarray:
    """Exact re-indexing of a label map between two grids that share voxel centres."""
    if src.same_grid(dst):
        return labels.copy()
    ijk = np.argwhere(np.ones(dst.shape, bool))
    src_idx = np.rint(src.lps_to_index(dst.index_to_lps(ijk))).astype(int)
    assert np.all(src_idx >= 0) and np.all(src_idx < np.array(src.shape)), "grids do not overlap exactly"
    out = labels[src_idx[:, 0], src_idx[:, 1], src_idx[:, 2]].reshape(dst.shape)
    return out


DCIODVFY = "/usr/bin/dciodvfy"


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) that dciodvfy prints for a file."""
    import subprocess

    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def multiframe_case(tmp: Path, kind: str = "FFS") -> Case:
    """An enhanced (multi-frame) CT made by highdicom's legacy converter from a written series.

    Its frames are stored in ascending z, which for FFS is the reverse of the loaded k order.
    """
    import highdicom as hd
    import pydicom

    from pipeline.io.dicom_write import write_ct_series
    from pipeline.io.load import load_input

    geom, position = make_geometry(kind)
    labels = phantom_labels(geom)
    src = write_ct_series(phantom_hu(labels), geom, tmp / "mf_src", patient_position=position)
    legacy = [pydicom.dcmread(f) for f in src.files]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(legacy_datasets=legacy, series_instance_uid=hd.UID(),
                                                  series_number=5, sop_instance_uid=hd.UID(), instance_number=1)
    folder = tmp / "mf"
    folder.mkdir()
    mf.save_as(folder / "enhanced.dcm")
    volume = load_input(folder)
    return _finish(volume, resample_nearest(labels, geom, volume.geometry), folder)


def dataset_differences(a, b, fresh: set[str], path: str = "") -> list[str]:
    """Where two DICOM datasets differ, element by element and into sequences; elements whose
    keyword is in ``fresh`` (UIDs, times made anew by each build) are not compared. Pixel data:
    the frames' bits only (a trailing pad byte is 00H here, 30H from highdicom 0.28)."""
    out = []
    ka, kb = {e.tag for e in a}, {e.tag for e in b}
    if ka != kb:
        out.append(f"{path}: elements differ {sorted(ka ^ kb)}")
    for ea in a:
        if ea.tag not in kb or ea.keyword in fresh:
            continue
        eb = b[ea.tag]
        if ea.VR != eb.VR:
            out.append(f"{path}{ea.keyword}: VR {ea.VR} != {eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{path}{ea.keyword}: {len(ea.value)} != {len(eb.value)} items")
                continue
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value)):
                out += dataset_differences(ia, ib, fresh, f"{path}{ea.keyword}[{i}].")
        elif ea.keyword == "PixelData":
            nbytes = (int(a.Rows) * int(a.Columns) * int(a.NumberOfFrames) + 7) // 8
            if len(ea.value) != len(eb.value) or ea.value[:nbytes] != eb.value[:nbytes]:
                out.append(f"{path}PixelData differs")
        elif ea.value != eb.value:
            out.append(f"{path}{ea.keyword}: {str(ea.value)[:60]} != {str(eb.value)[:60]}")
    return out
