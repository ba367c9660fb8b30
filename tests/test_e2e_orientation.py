"""Issue 8 item 3: the same anatomy stored in any orientation gives the same answers.

One foreign phantom is rendered once on an HFS grid; each variant stores exactly the same voxels
(same LPS lattice) with other in-plane directions (FFS, HFP, flipped rows/columns, rows and
columns exchanged) and slice orders, as DICOM with random file names, shuffled instance numbers
and a localizer. Each variant must give the same lesion distances (within one voxel diagonal),
the same closest points in patient space, and the same label content in patient space, in both
segmentation.nii.gz and seg.dcm.

Two layers: the whole pipeline with the shipped model (few examples: each runs the model), and
the loader + measurement with the true labels as the segmentation (more examples, no model).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_helpers as ev  # noqa: E402
import foreign_phantom as fp  # noqa: E402
from pipeline.types import Geometry  # noqa: E402

SHAPE = (96, 96, 40)
SPACING = (1.4, 1.4, 2.0)


@dataclass
class Stored:
    geometry: Geometry  # the loaded volume's grid
    labels: np.ndarray  # the pipeline's label map on that grid
    report: dict[str, Any]
    study_dir: Path | None


@pytest.fixture(scope="module")
def anatomy():
    return fp.make_foreign(424, shape=SHAPE, spacing=SPACING, position="HFS",
                           lesions=[("lytic", "contact"), ("blastic", "mid")])


@pytest.fixture(scope="module")
def runner(shipped_model):
    import torch

    from pipeline.study import StudyOptions, StudyRunner

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return StudyRunner(StudyOptions(device="cpu", formats=("json", "nifti", "seg")))


def _write(anatomy, swap: bool, flips: tuple[bool, bool, bool], folder: Path) -> Geometry:
    (hu,), geom = fp.reorient([anatomy.hu], anatomy.geometry, swap, flips)
    ph = fp.ForeignPhantom(hu, anatomy.labels, anatomy.instances, geom, anatomy.spec, anatomy.lesions)
    fp.write_study(ph, folder, seed=7)
    return geom


def _run(runner, anatomy, swap: bool, flips: tuple[bool, bool, bool], root: Path) -> Stored:
    _write(anatomy, swap, flips, root / "study")
    res = runner.run(root / "study", root / "out")
    assert res.segmentation is not None and res.volume is not None
    return Stored(res.volume.geometry, res.segmentation.labels, res.report, res.study_dir)


@pytest.fixture(scope="module")
def reference(runner, anatomy, tmp_path_factory) -> Stored:
    return _run(runner, anatomy, False, (False, False, False), tmp_path_factory.mktemp("ref"))


def _match(ref_lesions: list[dict], lesions: list[dict]) -> list[tuple[dict, dict]]:
    pairs = []
    for a in ref_lesions:
        b = min(lesions, key=lambda x: np.linalg.norm(np.subtract(x["centroid_lps_mm"], a["centroid_lps_mm"])))
        pairs.append((a, b))
    return pairs


def _assert_same_answers(ref: Stored, got: Stored, diag: float) -> None:
    # label content in patient space: the label map mapped onto the reference grid
    on_ref = ev.map_to_grid(got.labels, got.geometry, ref.geometry)
    differ = int((on_ref != ref.labels).sum())
    assert differ <= 1e-4 * max(1, int((ref.labels > 0).sum())), f"{differ} voxels carry another label"
    # lesions: same count, same distances and closest points (LPS) within one voxel diagonal
    assert len(got.report["lesions"]) == len(ref.report["lesions"])
    for a, b in _match(ref.report["lesions"], got.report["lesions"]):
        assert np.linalg.norm(np.subtract(a["centroid_lps_mm"], b["centroid_lps_mm"])) <= diag
        da, db = a["min_distance_to_canal_mm"], b["min_distance_to_canal_mm"]
        assert (da is None) == (db is None)
        if da is not None:
            assert abs(da - db) <= diag
            for key in ("closest_point_lesion_lps_mm", "closest_point_canal_lps_mm"):
                assert np.linalg.norm(np.subtract(a[key], b[key])) <= diag, key
        assert a["recommendation"]["primary"] == b["recommendation"]["primary"]
    assert abs(got.report["canal"]["volume_ml"] - ref.report["canal"]["volume_ml"]) <= \
        1e-3 * max(ref.report["canal"]["volume_ml"], 1.0) + 1e-3


def _assert_seg_matches(run: Stored, ref: Stored) -> None:
    """seg.dcm holds, in patient space, exactly the label map's voxels, and the reference's."""
    assert run.study_dir is not None and ref.study_dir is not None
    seg = ev.seg_points_by_label(run.study_dir / "seg.dcm")
    ref_seg = ev.seg_points_by_label(ref.study_dir / "seg.dcm")
    own = ev.points_of_labels(run.labels, run.geometry)
    assert sorted(k for k in seg if k > 0) == sorted(own), (sorted(seg), sorted(own))
    for label, pts in own.items():
        keys = ev.lattice_keys(seg[label], ref.geometry)
        assert keys == ev.lattice_keys(pts, ref.geometry), f"seg.dcm label {label} differs from the label map"
        ref_keys = ev.lattice_keys(ref_seg[label], ref.geometry)
        assert len(keys ^ ref_keys) <= 1e-4 * max(1, len(ref_keys)), f"seg.dcm label {label} differs from HFS"


VARIANTS = {
    "FFS (rows -L, slices toward the feet)": (False, (True, False, True)),
    "HFP (prone: rows -L, columns -P)": (False, (True, True, False)),
    "HFS columns flipped": (False, (False, True, False)),
    "rows along P (in-plane axes exchanged)": (True, (False, False, False)),
}


@pytest.mark.slow
def test_reference_has_content(reference):
    """The comparisons below are only meaningful when the reference finds canal and bone."""
    assert reference.report["canal"]["found"]
    assert (reference.labels == 3).any()
    assert (reference.study_dir / "seg.dcm").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_answers_in_every_orientation(variant, runner, anatomy, reference, tmp_path):
    swap, flips = VARIANTS[variant]
    got = _run(runner, anatomy, swap, flips, tmp_path)
    _assert_same_answers(reference, got, anatomy.geometry.voxel_diagonal_mm)
    _assert_seg_matches(got, reference)


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(swap=st.booleans(), flips=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_same_answers_random_storage(swap, flips, runner, anatomy, reference):
    with tempfile.TemporaryDirectory(prefix="osteoplan-orient-") as tmp:
        got = _run(runner, anatomy, swap, flips, Path(tmp))
        _assert_same_answers(reference, got, anatomy.geometry.voxel_diagonal_mm)
        _assert_seg_matches(got, reference)


# ---- no model: the loader and the measurement with the true labels as the segmentation ----------


def _oracle(anatomy, swap: bool, flips: tuple[bool, bool, bool], root: Path) -> Stored:
    from pipeline.io.load import load_input

    _write(anatomy, swap, flips, root / "study")
    vol = load_input(root / "study")
    labels = ev.map_to_grid(anatomy.labels, anatomy.geometry, vol.geometry)
    assert int((labels > 0).sum()) == int((anatomy.labels > 0).sum()), "the loaded grid lost voxels"
    return Stored(vol.geometry, labels, ev.oracle_report(vol, labels), None)


@pytest.fixture(scope="module")
def oracle_reference(anatomy, tmp_path_factory) -> Stored:
    return _oracle(anatomy, False, (False, False, False), tmp_path_factory.mktemp("oracle-ref"))


def test_oracle_reference_matches_truth(oracle_reference, anatomy):
    truth = fp.truth_measurements(anatomy)
    got = oracle_reference.report["lesions"]
    assert len(got) == len(truth) == 2
    for t in truth:
        les = min(got, key=lambda x: np.linalg.norm(np.subtract(x["centroid_lps_mm"],
                                                                 anatomy.geometry.index_to_lps(
                                                                     np.argwhere(anatomy.instances == t["index"])
                                                                     .mean(axis=0))[0])))
        assert les["min_distance_to_canal_mm"] == pytest.approx(t["distance_mm"], abs=0.01)
        assert np.allclose(les["closest_point_lesion_lps_mm"], t["closest_point_lesion_lps_mm"], atol=0.01)
        assert les["type"] == t["kind"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(swap=st.booleans(), flips=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_oracle_same_answers_any_storage(swap, flips, anatomy, oracle_reference):
    """Exact invariance of the loader + measurement: distances and closest points to 0.01 mm."""
    with tempfile.TemporaryDirectory(prefix="osteoplan-oracle-") as tmp:
        got = _oracle(anatomy, swap, flips, Path(tmp))
    _assert_same_answers(oracle_reference, got, 0.011)
