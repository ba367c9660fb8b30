"""run_batch end to end with a fast stand-in runner: failure isolation, resume, kill -9, workers.

The stand-in (tests/batch_helpers.FakeRunner) keeps these tests to seconds; the model-backed
path is covered at the end (skipped, with the reason, while no model bundle is installed).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from batch_helpers import FAKE, REPO, make_nifti, make_study, make_zip, model_available, phantom_hu, \
    read_manifest, tiny_bundle, write_series
from pipeline.batch.run import BatchOptions, run_batch
from pipeline.report.csv_out import CSV_COLUMNS
from pipeline.study import StudyOptions


def _opts(**kw):
    return BatchOptions(quiet=True, **FAKE, **kw)


def _good_root(root: Path, n: int = 3) -> list[str]:
    return [make_study(root / f"good{i}", i)[0] for i in range(n)]


def _study_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


@pytest.mark.parametrize("loader", [FAKE["loader"], "pipeline.batch.worker:load_study"], ids=["fake_io", "real_io"])
def test_bad_studies_are_recorded_and_the_rest_finish(tmp_path, loader):
    root, out = tmp_path / "in", tmp_path / "out"
    good = _good_root(root)
    _, trunc = make_study(root / "truncated", 10)
    for f in trunc:  # headers intact, pixel data cut
        f.write_bytes(f.read_bytes()[:-300])
    mr_uid, _ = make_study(root / "mr", 11, modality="MR")
    (root / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    hu = phantom_hu(12)
    hu[0, 0, 0] = -777  # the runner raises on this one
    boom_uid = "1.2.826.0.1.777"
    write_series(root / "boom", boom_uid, hu)

    opts = BatchOptions(quiet=True, runner_factory=FAKE["runner_factory"], loader=loader)
    result = run_batch(root, out, StudyOptions(), opts)
    assert (result.ok, result.failed, result.exit_code) == (3, 4, 1)
    lines = read_manifest(out)
    assert len(lines) == 7 and len({l["fingerprint"] for l in lines}) == 7
    by_input = {l["input"]: l for l in lines}
    assert {by_input[f"good{i}"]["status"] for i in range(3)} == {"ok"}
    assert "truncated" in by_input["truncated"]["reason"]
    assert "no CT series" in by_input["mr"]["reason"]
    assert "zip" in by_input["broken.zip"]["reason"]
    assert by_input["boom"]["reason"].startswith("RuntimeError") and str(root) not in by_input["boom"]["reason"]
    assert "<path>" in by_input["boom"]["reason"]
    for l in lines:
        assert set(l["timings_s"]) == {"load", "run", "total"}
        assert "\n" not in (l["reason"] or "")
        assert (l["output"] is None) == (l["status"] == "failed")
    assert sorted(p.name for p in _study_dirs(out)) == sorted(good)
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == CSV_COLUMNS
    assert sorted(r["study"] for r in rows) == sorted(good)  # one lesion per good phantom
    vols = {r["study"]: float(r["volume_ml"]) for r in rows}
    assert len(set(vols.values())) == 3  # from the data, not a constant


def test_resume_skips_finished_and_redoes_failed_and_changed_options(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    good = _good_root(root)
    hu = phantom_hu(5)
    hu[0, 0, 0] = -777
    bad_dir = root / "bad"
    write_series(bad_dir, "1.2.826.0.1.5", hu)
    r1 = run_batch(root, out, StudyOptions(), _opts())
    assert (r1.ok, r1.failed) == (3, 1)
    mtimes = {d.name: (d / "report.json").stat().st_mtime_ns for d in _study_dirs(out)}

    r2 = run_batch(root, out, StudyOptions(), _opts(resume=True))
    assert (r2.skipped, r2.ok, r2.failed) == (3, 0, 1)  # only the failed one is tried again
    assert {d.name: (d / "report.json").stat().st_mtime_ns for d in _study_dirs(out)} == mtimes

    for f in bad_dir.iterdir():  # the site fixes the bad study (same instances, new content)
        f.unlink()
    write_series(bad_dir, "1.2.826.0.1.5", phantom_hu(5))
    r3 = run_batch(root, out, StudyOptions(), _opts(resume=True))
    assert (r3.skipped, r3.ok, r3.failed, r3.exit_code) == (3, 1, 0, 0)
    lines = read_manifest(out)
    assert len(lines) == 5 and sum(l["status"] == "ok" for l in lines) == 4  # old failed line is kept
    # ... under its old fingerprint; the fixed study has a new one
    r4 = run_batch(root, out, StudyOptions(fast=True), _opts(resume=True))
    assert r4.skipped == 0 and r4.ok == 4  # other options, other results: redone
    r5 = run_batch(root, out, StudyOptions(), _opts())
    assert r5.skipped == 0 and r5.ok == 4  # without --resume everything is redone


def test_resume_redoes_a_study_whose_output_was_deleted(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    good = _good_root(root, 2)
    run_batch(root, out, StudyOptions(), _opts())
    import shutil

    shutil.rmtree(out / good[0])
    r = run_batch(root, out, StudyOptions(), _opts(resume=True))
    assert (r.skipped, r.ok) == (1, 1) and (out / good[0] / "report.json").is_file()


def test_resume_recognises_moved_inputs_by_fingerprint(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    uid, files = make_study(root / "site_a" / "folder1", 1)
    run_batch(root, out, StudyOptions(), _opts())
    (root / "renamed" / "x").mkdir(parents=True)
    for i, f in enumerate(files):
        f.rename(root / "renamed" / "x" / f"slice{i}")
    r = run_batch(root, out, StudyOptions(), _opts(resume=True))
    assert (r.skipped, r.ok) == (1, 0)


def test_shards_write_their_own_manifests_and_together_cover_everything(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    uids = [make_study(root / f"s{i}", i, n_slices=2)[0] for i in range(9)]
    make_nifti(root / "n" / "case.nii.gz", 1)
    totals = [run_batch(root, out, StudyOptions(), _opts(shard=__import__("pipeline.batch.shard", fromlist=["x"])
                                                        .Shard(k, 3))).selected for k in (1, 2, 3)]
    assert sum(totals) == 10
    assert sorted(p.name for p in out.glob("manifest*.jsonl")) == [f"manifest.shard-{k}-of-3.jsonl" for k in (1, 2, 3)]
    lines = read_manifest(out)
    assert sorted(l["study"] for l in lines) == sorted(uids + ["case"])
    with open(out / "summary.csv") as fh:  # the last shard's summary covers all shards
        assert len(list(csv.DictReader(fh))) == 10


def test_a_shard_that_owns_no_study_leaves_an_empty_manifest(tmp_path):
    from pipeline.batch.shard import Shard, shard_of

    root, out = tmp_path / "in", tmp_path / "out"
    uid, _ = make_study(root / "s0", 0, n_slices=2)
    empty = next(k for k in (1, 2) if k != shard_of(f"dicom:{uid}", 2))
    r = run_batch(root, out, StudyOptions(), _opts(shard=Shard(empty, 2)))
    assert (r.selected, r.ok, r.failed) == (0, 0, 0)
    assert (out / f"manifest.shard-{empty}-of-2.jsonl").read_text() == ""
    assert read_manifest(out) == []


def test_worker_processes_share_the_work_and_survive_a_dying_worker(tmp_path):
    root, out = tmp_path / "in", tmp_path / "out"
    good = _good_root(root, 5)
    hu = phantom_hu(7)
    hu[1, 1, 1] = -999  # kills the worker process that runs it
    write_series(root / "killer", "1.2.826.0.1.999", hu)
    r = run_batch(root, out, StudyOptions(), _opts(workers=2))
    assert (r.ok, r.failed, r.exit_code) == (5, 1, 1)
    lines = {l["input"]: l for l in read_manifest(out)}
    assert "worker process died" in lines["killer"]["reason"]
    pids = {json.loads((out / u / "report.json").read_text())["worker_pid"] for u in good}
    assert os.getpid() not in pids  # done in worker processes, by the survivors/replacement


def _wait_for(cond, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"batch ended (rc {proc.returncode}) before the kill point:\n"
                                 + proc.stderr.read().decode()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.01)


def _kill_then_resume_checks(out: Path, resume) -> None:
    first = read_manifest(out)
    done_before = {l["fingerprint"]: l for l in first if l["status"] == "ok"}
    assert done_before, "nothing finished before the kill"
    # no half-written study folder: every visible folder is complete
    for d in _study_dirs(out):
        assert (d / "report.json").is_file(), f"half-written study folder {d.name}"
    mtimes = {l["fingerprint"]: (out / l["output"] / "report.json").stat().st_mtime_ns for l in done_before.values()}
    result_lines = resume()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name], "stale temp folder left"
    latest = {l["fingerprint"]: l for l in result_lines}
    assert all(l["status"] == "ok" for l in latest.values())
    for fp, before in done_before.items():  # nothing that finished was redone
        assert latest[fp]["run_id"] == before["run_id"]
        assert (out / latest[fp]["output"] / "report.json").stat().st_mtime_ns == mtimes[fp]
    return latest


def test_kill_minus_9_then_resume(tmp_path):
    """A batch killed mid-study leaves no half-written folder; --resume finishes the rest only."""
    root, out = tmp_path / "in", tmp_path / "out"
    uids = _good_root(root, 5)
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
            "from pipeline.batch.run import BatchOptions, run_batch; from pipeline.study import StudyOptions;"
            "from batch_helpers import FAKE;"
            "r = run_batch(Path(sys.argv[1]), Path(sys.argv[2]), StudyOptions(), BatchOptions(quiet=True, **FAKE));"
            "sys.exit(r.exit_code)")
    env = {**os.environ, "OSTEOPLAN_FAKE_DELAY_S": "0.4"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(out), str(REPO / "tests")], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    _wait_for(lambda: manifest.exists() and manifest.read_text().count("\n") >= 1, 60, proc)
    # ... and the next study is half-written in its temp folder
    _wait_for(lambda: any(".tmp-" in p.name for p in out.iterdir()), 30, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(".tmp-" in p.name for p in out.iterdir())  # the kill really hit mid-write

    def resume():
        r = run_batch(root, out, StudyOptions(), _opts(resume=True))
        assert r.exit_code == 0 and r.skipped >= 1 and r.skipped + r.ok == 5
        return read_manifest(out)

    latest = _kill_then_resume_checks(out, resume)
    assert sorted(l["study"] for l in latest.values()) == sorted(uids)
    assert len(read_manifest(out)) == 5  # compacted: one line per study


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", "batch", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    (tmp_path / "empty").mkdir()
    r = cli(tmp_path / "empty", "-o", tmp_path / "o1", "--quiet")
    assert r.returncode == 2 and "no studies found" in r.stderr and "Traceback" not in r.stderr
    r = cli(tmp_path / "empty", "-o", tmp_path / "o2", "--shard", "0/3")
    assert r.returncode == 2 and "--shard" in r.stderr and "Traceback" not in r.stderr


# ---- with the real StudyRunner --------------------------------------------------------------

def _samples(root: Path, n: int) -> list[Path]:
    try:
        from pipeline.train.samples import write_samples
    except ImportError:
        pytest.skip("phantom generator pipeline.train.samples not available yet")
    return write_samples(root, n=n, seed=3, size="small")


def model_arg(tmp_path: Path) -> str:
    """The shipped model when installed, else a tiny all-background bundle (plumbing only)."""
    if model_available():
        return "osteoplan-spine"
    return str(tiny_bundle(tmp_path / "tiny_bundle"))


@pytest.mark.slow
def test_real_cli_kill_minus_9_then_resume(tmp_path):
    """`python -m pipeline batch` killed -9 after its first study; `--resume` finishes the rest only."""
    root, out = tmp_path / "in", tmp_path / "out"
    _samples(root, 3)
    args = [sys.executable, "-m", "pipeline", "batch", str(root), "-o", str(out), "--quiet", "--device", "cpu",
            "--format", "json,nifti,html", "--model", model_arg(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    _wait_for(lambda: manifest.exists() and manifest.read_text().count("\n") >= 1, 600, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    def resume():
        r = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        return read_manifest(out)

    latest = _kill_then_resume_checks(out, resume)
    assert len(latest) == 3 and len(read_manifest(out)) == 3
    for line in latest.values():
        rep = json.loads((out / line["output"] / "report.json").read_text())
        assert rep["series"]["study_instance_uid"] == line["study"]
        assert (out / line["output"] / "segmentation.nii.gz").is_file()
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(l["n_lesions"] for l in latest.values())
