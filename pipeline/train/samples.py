"""`osteoplan samples`: phantom studies written as DICOM CT series, with exact truth.

Each study folder ``<out>/phantomNN/`` holds ``ct/`` (the CT series, shuffled file names and instance
numbers) and ``localizer/`` (a scout in the same study, which the loader must pass over);
``<out>/truth/phantomNN/`` holds ``labels.npz``
(the exact label map on the CT grid with its LPS affine; not NIfTI, so that batch discovery does
not mistake it for a study) and ``truth.json`` (the lesions as designed: type, site,
designed surface gap to the canal, radius, centre in LPS).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.train.phantom import LesionSpec, make_phantom

SIZES = {
    # shape (i, j, k), spacing (mm)
    "small": ((176, 160, 56), (1.2, 1.2, 2.0)),
    "full": ((512, 512, 300), (0.7, 0.7, 1.0)),
    "bench400": ((512, 512, 400), (0.7, 0.7, 1.0)),
}
ORIENTATIONS = ("HFS", "FFS", "HFP", "HFS+flipx")


def designed_lesions(rng: np.random.Generator) -> list[LesionSpec]:
    """Lesions that exercise the rule table: contact, near (< 5 mm), 5-10 mm and far, each type."""
    specs = [
        LesionSpec(type="lytic", site="body", radius_mm=float(rng.uniform(7, 10)), gap_mm=float(rng.uniform(6, 8.5)),
                   lateral_mm=float(rng.uniform(-4, 4))),
        LesionSpec(type="blastic", site="body", radius_mm=float(rng.uniform(5, 7)), gap_mm=float(rng.uniform(12, 16)),
                   lateral_mm=float(rng.uniform(-6, 6))),
        LesionSpec(type="mixed", site="body", radius_mm=float(rng.uniform(6, 9)), gap_mm=float(rng.uniform(-1.5, 0)),
                   lateral_mm=float(rng.uniform(-3, 3))),
    ]
    rng.shuffle(specs)
    return specs[: int(rng.integers(2, 4))]


def write_samples(outdir: Path, n: int = 3, seed: int = 0, size: str = "small") -> list[Path]:
    from pipeline.io.dicom_write import write_ct_series, write_localizer

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    shape, spacing = SIZES[size]
    outdir = Path(outdir)
    paths = []
    for idx in range(n):
        rng = np.random.default_rng(seed * 7919 + idx)
        orientation = ORIENTATIONS[idx % len(ORIENTATIONS)] if size == "small" else "HFS"
        lesions = designed_lesions(rng)
        for ls, level in zip(lesions, (2, 3, 4)):  # one lesion per vertebra: designed lesions never merge
            ls.level = level
        ph = make_phantom(int(rng.integers(0, 2**31 - 1)), shape=shape, spacing=spacing, orientation=orientation,
                          lesions=lesions)
        study = outdir / f"phantom{idx + 1:02d}"
        src = write_ct_series(np.round(ph.hu).astype(np.int16), ph.geometry, study / "ct", file_names="random",
                              instance_numbers="shuffled", patient_position=orientation.split("+")[0],
                              series_description=f"osteoplan phantom {orientation}")
        write_localizer(study / "localizer", study_uid=src.study_instance_uid,
                        frame_of_reference_uid=src.frame_of_reference_uid)
        truth_dir = outdir / "truth" / study.name
        truth_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(truth_dir / "labels.npz", labels=ph.labels, instances=ph.instances,
                            affine_lps=ph.geometry.affine_lps)
        truth = {"orientation": orientation, "shape": list(shape), "spacing_mm": list(spacing),
                 "study_instance_uid": src.study_instance_uid, "lesions": ph.lesions}
        (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2))
        paths.append(study)
    return paths
