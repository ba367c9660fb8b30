"""`osteoplan run` end to end: exit codes, stderr, report.json contract, --format, --intent.

Through ``pipeline.cli.main`` in process (stdout/stderr captured) and through a subprocess
``python -m pipeline run ...``. Contract: DESIGN.md (CLI, exit codes, output contract).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_helpers as ev  # noqa: E402
import foreign_phantom as fp  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TOP_KEYS = ("schema_version", "input", "series", "model", "device", "canal", "lesions", "warnings", "timings_s",
            "disclaimer")
SERIES_KEYS = ("study_instance_uid", "series_instance_uid", "size", "spacing_mm")
MODEL_KEYS = ("name", "version", "sha256")
CANAL_KEYS = ("found", "volume_ml")
LESION_KEYS = ("id", "volume_ml", "max_diameter_mm", "mean_hu", "type", "centroid_lps_mm", "min_distance_to_canal_mm",
               "closest_point_lesion_lps_mm", "closest_point_canal_lps_mm", "canal_contact", "recommendation")
REC_KEYS = ("primary", "options", "flags", "rationale", "borderline")
PRIMARIES = {"cementoplasty", "rfa_plus_cementoplasty", "rfa", "cryoablation", "cryoablation_plus_cementoplasty",
             "refer"}


def run_main(args: list[str]) -> tuple[int, str, str]:
    """``pipeline.cli.main(args)`` with stdout and stderr captured."""
    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_clean_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict, fp.ForeignPhantom]:
    """A small foreign study with two lytic lesions (mid and far from the canal) and a localizer."""
    root = tmp_path_factory.mktemp("cli-study")
    ph = fp.make_foreign(2718, shape=(144, 144, 64), spacing=(1.0, 1.0, 1.5), position="HFS",
                         lesions=[("lytic", "mid"), ("lytic", "far")])
    truth = fp.write_study(ph, root / "study", seed=1)
    return root / "study", truth, ph


@pytest.fixture(scope="module")
def palliative_run(study, tmp_path_factory, shipped_model):
    out = tmp_path_factory.mktemp("cli-out")
    rc, stdout, stderr = run_main(["run", str(study[0]), "-o", str(out), "--device", "cpu"])
    return rc, stdout, stderr, out, out / study[1]["study_instance_uid"]


# ---- errors: exit codes, one line on stderr, no traceback ------------------------------------------


def test_empty_folder_exits_3_with_one_line(tmp_path, shipped_model):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(["run", str(tmp_path / "empty"), "-o", str(tmp_path / "out")])
    assert rc == 3
    assert "no CT series" in assert_one_clean_line(err)


def test_missing_input_exits_2(tmp_path, shipped_model):
    rc, _, err = run_main(["run", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert rc == 2
    assert "does not exist" in assert_one_clean_line(err)


def test_unknown_cuda_device_exits_2(study, tmp_path, shipped_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda is valid here")
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert rc == 2
    assert "cuda" in assert_one_clean_line(err).lower()
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path / "out"), "--device", "tpu"])
    assert rc == 2
    assert "tpu" in assert_one_clean_line(err)


def test_bad_intent_exits_2_without_traceback(study, tmp_path):
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path / "out"), "--intent", "aggressive"])
    assert rc == 2
    assert "Traceback" not in err
    assert "intent" in err and "palliative" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*/report.json"))


def test_missing_model_exits_2(study, tmp_path):
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path / "out"), "--model", "no-such-model"])
    assert rc == 2
    assert "no-such-model" in assert_one_clean_line(err)


def test_bad_format_exits_2(study, tmp_path):
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path / "out"), "--format", "json,pdf"])
    assert rc == 2
    assert "Traceback" not in err and "pdf" in err


@pytest.mark.slow
def test_subprocess_good_study(study, tmp_path, shipped_model):
    """`python -m pipeline run ... --format json`: exit 0, only report.json, nothing alarming on stderr."""
    good = run_subprocess(["run", str(study[0]), "-o", str(tmp_path / "o2"), "--device", "cpu", "--format", "json",
                           "--quiet"], cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "Traceback" not in good.stderr and "error" not in good.stderr.lower(), good.stderr
    out = tmp_path / "o2" / study[1]["study_instance_uid"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert json.loads((out / "report.json").read_text())["schema_version"]


# ---- a good study: outputs and the report.json contract ---------------------------------------------


def check_report_contract(rep: dict) -> None:
    """Every key DESIGN.md lists for report.json, with its type."""
    for k in TOP_KEYS:
        assert k in rep, k
    for k in SERIES_KEYS:
        assert k in rep["series"], k
    for k in MODEL_KEYS:
        assert isinstance(rep["model"][k], str) and rep["model"][k], k
    for k in CANAL_KEYS:
        assert k in rep["canal"], k
    assert isinstance(rep["lesions"], list) and isinstance(rep["warnings"], list)
    assert isinstance(rep["timings_s"], dict) and "total" in rep["timings_s"]
    assert isinstance(rep["postprocess"], dict)
    assert "not a medical device" in rep["disclaimer"]
    assert len(rep["series"]["size"]) == 3 and len(rep["series"]["spacing_mm"]) == 3
    for les in rep["lesions"]:
        for k in LESION_KEYS:
            assert k in les, k
        assert les["type"] in ("lytic", "mixed", "blastic")
        for k in ("centroid_lps_mm", "closest_point_lesion_lps_mm", "closest_point_canal_lps_mm"):
            assert les[k] is None or (len(les[k]) == 3 and all(isinstance(x, float) for x in les[k])), k
        rec = les["recommendation"]
        for k in REC_KEYS:
            assert k in rec, k
        assert rec["primary"] in PRIMARIES
        assert rec["rationale"] and all(set(c) >= {"rule", "text", "source"} for c in rec["rationale"])
        assert isinstance(rec["borderline"], dict) and isinstance(rec["borderline"].get("value"), bool)
        if les["min_distance_to_canal_mm"] is not None:
            d = np.linalg.norm(np.subtract(les["closest_point_lesion_lps_mm"], les["closest_point_canal_lps_mm"]))
            assert abs(d - les["min_distance_to_canal_mm"]) <= 0.02  # the two points realise the distance
            assert les["canal_contact"] == (les["min_distance_to_canal_mm"] == 0.0)


def test_report_contract_lesion_fields_on_oracle_segmentation(study):
    """The lesion part of the contract, independent of model quality: the true labels as the segmentation."""
    from pipeline.io.load import load_input

    vol = load_input(study[0])
    ph = study[2]
    rep = ev.oracle_report(vol, ev.map_to_grid(ph.labels, ph.geometry, vol.geometry))
    assert len(rep["lesions"]) == 2
    check_report_contract(rep)


@pytest.mark.slow
def test_good_study_exit_0_and_outputs(palliative_run, study):
    rc, stdout, stderr, out, study_dir = palliative_run
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    assert "report.json" in stdout
    assert (out / "osteoplan.log").is_file()
    rep = json.loads((study_dir / "report.json").read_text())
    check_report_contract(rep)
    refine = rep["postprocess"]["lesion_refine"]  # what the lytic refinement did (on by default)
    assert refine["enabled"] is True and 0 <= refine["lesions_grown"] <= refine["lesions_examined"]
    assert refine["voxels_added"] >= 0 and (refine["voxels_added"] > 0) == (refine["lesions_grown"] > 0)
    assert rep["series"]["study_instance_uid"] == study[1]["study_instance_uid"]
    assert rep["series"]["series_instance_uid"] == study[1]["series_instance_uid"]
    assert rep["series"]["size"] == study[1]["shape"]
    assert rep["intent"] == "palliative" and rep["device"] == "cpu"
    assert rep["timings_s"]["total"] > 0 and {"load", "inference", "measure", "plan"} <= set(rep["timings_s"])
    names = {p.name for p in study_dir.iterdir()}
    # SEG and SR always (an SR with a no-lesion finding group when nothing is found)
    assert {"report.json", "lesions.csv", "segmentation.nii.gz", "seg.dcm", "sr.dcm", "report.html"} <= names
    for les in rep["lesions"]:
        assert any(n.startswith(f"key_lesion{les['id']}") and n.endswith(".png") for n in names), names
    # the label map is on the input's grid and geometry
    labels, geom = ev.read_label_nifti(study_dir / "segmentation.nii.gz")
    truth_geom = ev.geometry_from_affine_lps(np.array(study[1]["affine_lps"]), tuple(study[1]["shape"]))
    assert labels.shape == tuple(rep["series"]["size"])
    lattice = ev.lattice_keys(geom.index_to_lps(np.argwhere(np.ones(labels.shape, bool))[::997]), truth_geom)
    assert all(0 <= i < n for key in lattice for i, n in zip(key, truth_geom.shape))
    csv_lines = (study_dir / "lesions.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rep["lesions"])


def _replan(les: dict, intent: str, solitary: bool):
    from pipeline.plan.engine import load_rules, plan_lesion
    from pipeline.types import Lesion

    lesion = Lesion(
        id=les["id"], voxel_count=les.get("voxel_count", 1), volume_ml=les["volume_ml"],
        max_diameter_mm=les["max_diameter_mm"], mean_hu=les["mean_hu"], type=les["type"],
        bone_reference_hu=les.get("bone_reference_hu"), location=les.get("location", "unknown"),
        centroid_lps_mm=tuple(les["centroid_lps_mm"]), bbox_ijk=tuple(map(tuple, les["bbox_ijk"])),
        min_distance_to_canal_mm=les["min_distance_to_canal_mm"],
        closest_point_lesion_lps_mm=les["closest_point_lesion_lps_mm"],
        closest_point_canal_lps_mm=les["closest_point_canal_lps_mm"], canal_contact=les["canal_contact"],
        distance_uncertainty_mm=les["distance_uncertainty_mm"], solitary=solitary, features=les["features"])
    return plan_lesion(lesion, load_rules(None), intent, solitary)


@pytest.mark.slow
def test_curative_intent_and_format_selection(palliative_run, study, tmp_path):
    """--intent curative --format json,nifti: only those files; lytic lesions >= 5 mm from the canal
    switch from cementoplasty to RFA + cementoplasty, as the rule table says; the rest as before."""
    _, _, _, _, pal_dir = palliative_run
    rc, _, err = run_main(["run", str(study[0]), "-o", str(tmp_path), "--device", "cpu", "--intent", "curative",
                           "--format", "json,nifti", "--quiet"])
    assert rc == 0, err
    cur_dir = tmp_path / study[1]["study_instance_uid"]
    assert sorted(p.name for p in cur_dir.iterdir()) == ["report.json", "segmentation.nii.gz"]
    cur = json.loads((cur_dir / "report.json").read_text())
    pal = json.loads((pal_dir / "report.json").read_text())
    assert cur["intent"] == "curative" and pal["intent"] == "palliative"
    assert len(cur["lesions"]) == len(pal["lesions"])
    solitary = len(cur["lesions"]) == 1
    changed = 0
    for a, b in zip(pal["lesions"], cur["lesions"]):
        assert a["min_distance_to_canal_mm"] == b["min_distance_to_canal_mm"]  # same model, same input
        for les, intent in ((a, "palliative"), (b, "curative")):
            rec = _replan(les, intent, solitary)
            assert les["recommendation"]["primary"] == rec.primary
            assert les["recommendation"]["flags"] == rec.flags
        d, diam = b["min_distance_to_canal_mm"], b["max_diameter_mm"]
        if b["type"] in ("lytic", "mixed") and d is not None and d >= 5.0 and diam <= 30.0 and not solitary:
            assert a["recommendation"]["primary"] == "cementoplasty"
            assert b["recommendation"]["primary"] == "rfa_plus_cementoplasty"
            assert any(c["rule"] == "R-SOLITARY" for c in b["recommendation"]["rationale"])
            changed += 1
    # the study holds two lytic lesions 7-19 mm from the canal: the change must be visible
    assert changed >= 1, f"no lytic lesion >= 5 mm from the canal was reported ({len(cur['lesions'])} lesions)"
