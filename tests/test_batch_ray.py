"""The Ray backend on a local cluster (one module-scoped cluster: Ray starts slowly)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from batch_helpers import FAKE, REPO, make_nifti, make_study, model_available, phantom_hu, read_manifest, \
    tiny_bundle, write_series
from pipeline.batch.run import BatchOptions, run_batch
from pipeline.errors import InputError, OsteoplanError
from pipeline.study import StudyOptions

pytestmark = pytest.mark.slow  # a Ray cluster takes ~30 s to start on 2 cores
ray = pytest.importorskip("ray", reason="ray (optional extra osteoplan[ray]) not installed")

VOLATILE = {"timings_s", "device", "worker_pid"}


@pytest.fixture(scope="module")
def cluster():
    paths = [str(REPO), str(REPO / "tests")]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ":".join(paths), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _reports(out: Path) -> dict[str, dict]:
    got = {}
    for line in read_manifest(out):
        if line["status"] == "ok":
            rep = json.loads((out / line["output"] / "report.json").read_text())
            got[line["output"]] = {k: v for k, v in rep.items() if k not in VOLATILE}
    return got


def _inputs(root: Path) -> None:
    for i in range(4):
        make_study(root / f"s{i}", i)
    make_nifti(root / "n" / "case.nii.gz", 9)
    hu = phantom_hu(3)
    hu[2, 2, 2] = -777  # fails inside the runner, every time
    write_series(root / "bad", "1.2.826.0.1.777", hu)


def test_ray_path_gives_the_same_reports_as_the_local_path(cluster, tmp_path):
    root = tmp_path / "in"
    _inputs(root)
    local = run_batch(root, tmp_path / "local", StudyOptions(), BatchOptions(quiet=True, **FAKE))
    on_ray = run_batch(root, tmp_path / "ray", StudyOptions(), BatchOptions(quiet=True, ray="local", **FAKE))
    assert (on_ray.ok, on_ray.failed, on_ray.exit_code) == (local.ok, local.failed, 1) == (5, 1, 1)
    assert _reports(tmp_path / "ray") == _reports(tmp_path / "local") and len(_reports(tmp_path / "ray")) == 5
    lines = {l["input"]: l for l in read_manifest(tmp_path / "ray")}
    assert lines["bad"]["attempts"] == 2 and lines["bad"]["status"] == "failed"  # retried once
    assert all(l["attempts"] == 1 for k, l in lines.items() if k != "bad")
    assert all(l["worker"].startswith("ray-") for l in lines.values())
    assert (tmp_path / "ray" / "summary.csv").read_text() == (tmp_path / "local" / "summary.csv").read_text()


def test_ray_resume_skips_finished(cluster, tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        make_study(root / f"s{i}", i)
    run_batch(root, out, StudyOptions(), BatchOptions(quiet=True, ray="local", **FAKE))
    again = run_batch(root, out, StudyOptions(), BatchOptions(quiet=True, ray="local", resume=True, **FAKE))
    assert (again.skipped, again.ok, again.failed) == (3, 0, 0)


def test_ray_actor_start_failure_is_one_clear_error(cluster, tmp_path):
    root = tmp_path / "in"
    make_study(root / "s", 1)
    opts = BatchOptions(quiet=True, ray="local", runner_factory="pipeline.study:StudyRunner",
                        loader=FAKE["loader"])
    with pytest.raises(OsteoplanError) as info:  # the CLI maps it to its exit code and one line
        run_batch(root, tmp_path / "out", StudyOptions(model=str(tmp_path / "no_such_bundle")), opts)
    assert "\n" not in str(info.value) and info.value.exit_code in (2, 4)


def test_ray_real_runner_same_reports_as_local(cluster, tmp_path):
    """The real StudyRunner (shipped model, else a tiny all-background bundle) on both paths."""
    try:
        from pipeline.train.samples import write_samples
    except ImportError:
        pytest.skip("phantom generator pipeline.train.samples not available yet")
    root = tmp_path / "in"
    write_samples(root, n=2, seed=11, size="small")
    model = "osteoplan-spine" if model_available() else str(tiny_bundle(tmp_path / "bundle"))
    opts = StudyOptions(device="cpu", formats=("json",), model=model)
    run_batch(root, tmp_path / "local", opts, BatchOptions(quiet=True))
    r = run_batch(root, tmp_path / "ray", opts, BatchOptions(quiet=True, ray="local"))
    assert r.exit_code == 0
    assert _reports(tmp_path / "ray") == _reports(tmp_path / "local") and len(_reports(tmp_path / "local")) == 2


def test_missing_ray_is_one_clear_error(monkeypatch):
    from pipeline.batch import ray_backend

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r"osteoplan\[ray\]"):
        ray_backend.import_ray()
