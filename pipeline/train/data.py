"""Training data sources, each yielding (image HU, labels) on the canonical LPS grid at the model spacing.

- ``phantom``: this project's generator (``pipeline.train.phantom``), heavily randomised; a share
  is drawn with SynthSeg-style contrasts and a share at the coarse (fast) spacing.
- ``nnunet``: a user's labelled data in the nnU-Net / Medical Segmentation Decathlon layout:
  ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``, ``dataset.json``. Their label values
  are mapped to ours by ``label_map`` (source value -> 0..3), e.g. for VerSe / CTSpine1K every
  vertebra id -> 3; for Spine-Mets-CT-SEG the lesion labels -> 2. If the source has no canal label
  and ``derive_canal`` is set, the canal is derived from the vertebra masks (the vertebral foramen,
  see ``pipeline.train.real_insert.derive_canal``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.segment.resample import canonical_geometry, to_canonical
from pipeline.train.phantom import Diversity, make_phantom
from pipeline.types import BONE, CANAL, LESION, Geometry

log = logging.getLogger("osteoplan.train.data")


@dataclass
class Case:
    image: np.ndarray  # HU float32 (X, Y, Z) on the canonical grid
    labels: np.ndarray  # uint8 0..3
    name: str


def phantom_cases(n: int, seed: int, spacing: tuple[float, float, float], fast_spacing: tuple[float, float, float],
                  shape: tuple[int, int, int], domain_randomise_prob: float, fast_share: float,
                  workers: int = 0, diversity: dict | None = None, diversity_share: float = 1.0) -> list[Case]:
    """``n`` randomised phantoms. The draws are made here in one stream, so ``workers`` (processes)
    changes the speed, never the result. ``diversity``: ``pipeline.train.phantom.Diversity`` fields
    (None or all off: the phantoms are exactly those made before the option existed).
    ``diversity_share``: the share of the ``n`` phantoms drawn with ``diversity`` (a seeded subset,
    from a stream of its own); the others are the plain generator's, the same phantoms as without it."""
    rng = np.random.default_rng(seed)
    diverse = _diverse_subset(n, seed, diversity_share) if diversity else set()
    jobs = []
    for idx in range(n):
        s = int(rng.integers(0, 2**31 - 1))
        coarse = rng.random() < fast_share
        sp = np.asarray(fast_spacing if coarse else spacing) * rng.uniform(0.9, 1.1, 3)
        dr = bool(rng.random() < domain_randomise_prob)
        n_les = int(rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.25, 0.3, 0.2, 0.15]))
        jobs.append((s, tuple(shape), tuple(float(v) for v in sp), dr, n_les, f"phantom-{seed}-{idx}",
                     diversity if idx in diverse else None))
    return parallel_map(_phantom_case, jobs, workers)


def _diverse_subset(n: int, seed: int, share: float) -> set[int]:
    """Which of ``n`` phantoms get the diversity options: all at share 1, else round(share * n) of
    them chosen by a stream of their own (the phantoms' own draws are untouched)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"diversity_share must be in [0, 1], got {share}")
    if share >= 1.0:
        return set(range(n))
    k = int(round(share * n))
    pick = np.random.default_rng([seed, 0xD5A7E]).choice(n, size=k, replace=False)
    return {int(i) for i in pick}


def _phantom_case(job: tuple) -> Case:
    s, shape, sp, dr, n_les, name, diversity = job
    div = Diversity(**diversity) if diversity else None
    ph = make_phantom(s, shape=shape, spacing=sp, orientation="HFS", domain_randomise=dr, n_lesions=n_les,
                      diversity=div)
    return Case(ph.hu.astype(np.float32), ph.labels, name)


def parallel_map(fn, jobs: list, workers: int) -> list:
    """``[fn(j) for j in jobs]``, in ``workers`` forked processes when ``workers > 1`` (order kept)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


def nnunet_cases(root: Path, label_map: dict[int, int], spacing: tuple[float, float, float],
                 derive_canal: bool = False) -> list[Case]:
    """Read an nnU-Net/MSD folder and resample each case to the canonical grid."""
    import nibabel as nib
    import torch

    from pipeline.io.nifti import read_nifti

    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    suffix = meta.get("file_ending", ".nii.gz")
    cases = []
    for lab_path in sorted((root / "labelsTr").glob(f"*{suffix}")):
        case = lab_path.name[: -len(suffix)]
        img_path = root / "imagesTr" / f"{case}_0000{suffix}"
        if not img_path.exists():
            img_path = root / "imagesTr" / f"{case}{suffix}"
        if not img_path.exists():
            log.warning("nnU-Net case %s has no image; skipped", case)
            continue
        vol = read_nifti(img_path)
        lab = np.asarray(nib.load(str(lab_path)).dataobj).astype(np.int32)
        lut = np.zeros(max(int(lab.max()), max(label_map) if label_map else 0) + 1, np.uint8)
        for src, dst in label_map.items():
            if src < len(lut):
                lut[src] = dst
        mapped = lut[lab]
        canon = canonical_geometry(vol.geometry, spacing)
        img = to_canonical(vol.array, vol.geometry, canon)[0, 0].numpy()
        onehot = torch.from_numpy(np.stack([mapped == c for c in range(4)]).astype(np.float32))[None]
        lab_c = _resample_onehot(onehot, vol.geometry, canon)
        if derive_canal and not (lab_c == CANAL).any():
            from pipeline.train.real_insert import derive_canal as derive

            canal = derive((lab_c == BONE) | (lab_c == LESION), canon.spacing)  # lesions are bone, not holes
            lab_c[canal & (lab_c == 0)] = CANAL
        cases.append(Case(img.astype(np.float32), lab_c, case))
    return cases


def _resample_onehot(onehot, geom: Geometry, canon: Geometry) -> np.ndarray:
    """Resample per-class masks trilinearly and take the argmax (smooth, no aliasing of labels)."""
    import torch

    out = [to_canonical(onehot[0, c].numpy(), geom, canon)[0, 0] for c in range(onehot.shape[1])]
    return torch.stack(out).argmax(dim=0).numpy().astype(np.uint8)
