"""The listener in-process (SCP + spool + queue + worker) with a stand-in study function.

Covers the SCP's safety rules (allow-list, association limit, size limit, SOP classes), what
"acknowledged" means, completion detection, late instances, non-CT studies, bad studies, and
start-up recovery of each crash point.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage, RTPlanStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pacs_helpers import FakeAnalyser, free_port, wait_for, write_ct_series  # noqa: E402
from pipeline.pacs.config import load_pacs_config  # noqa: E402
from pipeline.pacs.listener import Listener  # noqa: E402
from pipeline.pacs.queue import JobQueue  # noqa: E402
from pipeline.pacs.sender import set_nodelay  # noqa: E402
from pipeline.pacs.spool import Spool, atomic_write_text, uid_key  # noqa: E402


@pytest.fixture
def make_listener(tmp_path):
    made: list[Listener] = []

    def make(spool: Path | None = None, analyser=None, **over) -> Listener:
        settings = {"spool": str(spool or tmp_path / "spool"), "port": free_port(), "bind_address": "127.0.0.1",
                    "study_timeout_s": 0.5, **over}
        cfg = load_pacs_config(None, settings)
        listener = Listener(cfg, analyser_factory=lambda: analyser or FakeAnalyser())
        listener.start()
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.stop(grace_s=5)
    tempfile.tempdir = None


def associate(port: int, calling: str = "SCANNER", classes=(CTImageStorage,), **kw):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    for c in classes:
        ae.add_requested_context(c)
    return ae.associate("127.0.0.1", port, ae_title="OSTEOPLAN", **kw)


def send(port: int, files: list[Path], calling: str = "SCANNER") -> list[int]:
    datasets = [pydicom.dcmread(f) for f in files]
    assoc = associate(port, calling, classes=sorted({str(d.SOPClassUID) for d in datasets}))
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def wait_job(listener: Listener, state: str, n: int = 1, timeout: float = 20.0):
    return wait_for(lambda: (jobs := listener.queue.jobs(state)) and len(jobs) >= n and jobs, timeout,
                    what=f"{n} job(s) {state}")


def test_echo_store_acknowledged_means_on_disk_then_one_job(make_listener):
    listener = make_listener(study_timeout_s=1.0)
    with_ct = write_ct_series(listener.spool.root.parent / "ct", shape=(32, 32, 6))
    assoc = associate(listener.cfg.port)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    folder = listener.spool.incoming / uid_key(with_ct.study_uid)
    for i, f in enumerate(sorted(with_ct.folder.glob("*.dcm"))):
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        assert len(list(folder.glob("*.dcm"))) == i + 1  # on disk when the success came back
    assoc.release()
    assert listener.queue.jobs() == []  # not complete until 1 s of quiet
    (job,) = wait_job(listener, "done")
    input_dir = listener.spool.jobs / job.id / "input"
    assert sorted(p.stem for p in input_dir.glob("*.dcm")) == sorted(with_ct.sop_uids)
    assert (Path(job.result_dir) / "seg.dcm").exists() and not folder.exists()
    assert list(listener.spool.tmp.iterdir()) == []


def test_unsupported_sop_class_is_refused_politely(make_listener):
    listener = make_listener()
    assoc = associate(listener.cfg.port, classes=(CTImageStorage, RTPlanStorage))
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    assoc.release()
    assert CTImageStorage in accepted and RTPlanStorage in rejected


def test_calling_ae_allow_list(make_listener):
    listener = make_listener(allow_ae=["SCANNER", "PACS"])
    bad = associate(listener.cfg.port, calling="INTRUDER")
    assert bad.is_rejected
    good = associate(listener.cfg.port, calling="PACS")
    assert good.is_established
    good.release()


def test_association_limit(make_listener):
    listener = make_listener(max_associations=1)
    first = associate(listener.cfg.port)
    assert first.is_established
    second = associate(listener.cfg.port)
    assert second.is_rejected
    first.release()
    third = wait_for(lambda: (a := associate(listener.cfg.port)).is_established and a, 5, what="a free slot")
    third.release()


def test_oversized_instance_refused_and_not_stored(make_listener, tmp_path):
    listener = make_listener(max_instance_mb=0.004)  # ~4 KB; a 64x64 16-bit slice is 8 KB
    small = write_ct_series(tmp_path / "small", shape=(16, 16, 1))
    big = write_ct_series(tmp_path / "big", shape=(64, 64, 1))
    assert send(listener.cfg.port, list(big.folder.glob("*.dcm"))) == [0xA700]
    assert send(listener.cfg.port, list(small.folder.glob("*.dcm"))) == [0x0000]
    assert not (listener.spool.incoming / uid_key(big.study_uid)).exists()
    assert (listener.spool.incoming / uid_key(small.study_uid)).exists()


def test_instance_without_study_uid_is_refused_and_kept_with_reason(make_listener, tmp_path):
    listener = make_listener()
    study = write_ct_series(tmp_path / "ct", shape=(16, 16, 1))
    f = next(study.folder.glob("*.dcm"))
    ds = pydicom.dcmread(f)
    del ds.StudyInstanceUID
    ds.save_as(f)
    assert send(listener.cfg.port, [f]) == [0xC210]
    reasons = list(listener.spool.rejected.glob("*.reason.txt"))
    assert len(reasons) == 1 and "header unreadable" in reasons[0].read_text()
    assert len(list(listener.spool.rejected.glob("*.dcm"))) == 1


def test_tcp_nodelay_on_both_ends(make_listener):
    listener = make_listener()
    assoc = associate(listener.cfg.port, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established
    try:
        ours = assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        theirs = wait_for(lambda: listener.server.active_associations, 5, what="server association")[0]
        server_side = theirs.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()
    assert ours and server_side


def test_late_instances_make_a_new_version_and_retransmissions_are_not_rerun(make_listener, tmp_path):
    listener = make_listener()
    study = write_ct_series(tmp_path / "ct", shape=(16, 16, 8))
    files = sorted(study.folder.glob("*.dcm"))
    assert send(listener.cfg.port, files[:5]) == [0] * 5
    (v1,) = wait_job(listener, "done")
    assert send(listener.cfg.port, files[5:]) == [0] * 3  # late instances
    done = wait_job(listener, "done", n=2)
    v2 = done[1]
    assert (v2.version, v2.base_job) == (2, v1.id)
    assert len(list((listener.spool.jobs / v2.id / "input").glob("*.dcm"))) == 8
    assert len(list((listener.spool.jobs / v1.id / "input").glob("*.dcm"))) == 5
    assert send(listener.cfg.port, files[:2]) == [0, 0]  # a retransmission
    (skipped,) = wait_job(listener, "skipped")
    assert skipped.version == 3 and "retransmission" in skipped.reason
    assert len(listener.queue.jobs("done")) == 2


def test_study_without_ct_is_stored_not_analysed(make_listener, tmp_path):
    listener = make_listener()
    study = write_ct_series(tmp_path / "mr", shape=(16, 16, 2))
    for f in study.folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"
        ds.save_as(f)
    assert send(listener.cfg.port, sorted(study.folder.glob("*.dcm"))) == [0, 0]
    (job,) = wait_job(listener, "skipped")
    assert "no CT image instances (modalities: MR)" in job.reason
    assert len(list((listener.spool.jobs / job.id / "input").glob("*.dcm"))) == 2


def test_bad_study_fails_with_reason_and_others_go_on(make_listener, tmp_path):
    listener = make_listener()
    bad = write_ct_series(tmp_path / "bad", shape=(16, 16, 4), corrupt=2)
    good = write_ct_series(tmp_path / "good", shape=(16, 16, 4))
    assert send(listener.cfg.port, sorted(bad.folder.glob("*.dcm"))) == [0] * 4
    assert send(listener.cfg.port, sorted(good.folder.glob("*.dcm"))) == [0] * 4
    (failed,) = wait_job(listener, "failed")
    (done,) = wait_job(listener, "done")
    assert failed.study_uid == bad.study_uid and done.study_uid == good.study_uid
    fdir = listener.spool.failed / failed.id
    assert "pixel data" in (fdir / "REASON.txt").read_text() and "InputError" in failed.reason
    assert len(list((fdir / "input").glob("*.dcm"))) == 4  # kept, not deleted


def test_logs_carry_no_patient_identity(make_listener, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    listener = make_listener()
    study = write_ct_series(tmp_path / "ct", shape=(16, 16, 3))
    send(listener.cfg.port, sorted(study.folder.glob("*.dcm")))
    wait_job(listener, "done")
    # ours at every level; third-party loggers at WARNING and up (setup_logging's setting)
    text = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith("osteoplan") or r.levelno >= logging.WARNING)
    assert "uid-" in text
    for secret in [study.study_uid, study.series_uid, *study.sop_uids, "PHANTOM", "PACS0001"]:
        assert secret not in text


def test_startup_recovers_every_crash_point(tmp_path, make_listener):
    """Build the on-disk state a kill -9 can leave, then start a listener on it."""
    spool = Spool(tmp_path / "spool")
    spool.create()
    queue = JobQueue(spool.db_path)
    a = write_ct_series(tmp_path / "a", shape=(16, 16, 2))
    b = write_ct_series(tmp_path / "b", shape=(16, 16, 2))
    c = write_ct_series(tmp_path / "c", shape=(16, 16, 2))
    # 1. partial C-STORE data (never acknowledged)
    (spool.tmp / "tmpabc.dcm").write_bytes(b"partial")
    # 2. a study still arriving in incoming/
    for f, sop in zip(sorted(a.folder.glob("*.dcm")), a.sop_uids):
        tmp = spool.tmp / "x"
        tmp.write_bytes(f.read_bytes())
        spool.store_instance(tmp, a.study_uid, sop)
    # 3. a job folder moved into place but its row not yet written
    jb = spool.jobs / "jobB"
    (jb / "input").mkdir(parents=True)
    for f in b.folder.glob("*.dcm"):
        (jb / "input" / f.name).write_bytes(f.read_bytes())
    atomic_write_text(jb / "job.json", json.dumps({"study_uid": b.study_uid, "base_job": None, "version": 1}))
    # 4. a job folder created but the study not yet moved into it
    (spool.jobs / "jobEmpty").mkdir()
    # 5. a job that was running when the process died
    jc = spool.jobs / "jobC"
    (jc / "input").mkdir(parents=True)
    for f in c.folder.glob("*.dcm"):
        (jc / "input" / f.name).write_bytes(f.read_bytes())
    (jc / "results" / ".half-written").mkdir(parents=True)
    queue.add_job("jobC", c.study_uid, 1, None)
    assert queue.claim().id == "jobC"

    listener = make_listener(spool=spool.root)
    assert not (spool.tmp / "tmpabc.dcm").exists() and not (spool.jobs / "jobEmpty").exists()
    done = wait_job(listener, "done", n=3)
    by_study = {j.study_uid: j for j in done}
    assert set(by_study) == {a.study_uid, b.study_uid, c.study_uid}
    assert by_study[c.study_uid].id == "jobC" and by_study[c.study_uid].attempts == 2
    assert by_study[b.study_uid].id == "jobB"
    assert not (jc / "results" / ".half-written").exists()
    runs = (spool.root / "fake_runs.log").read_text().split()
    assert sorted(runs) == sorted(j.id for j in done)  # each job completed exactly once


def test_second_listener_on_same_spool_is_refused(make_listener, tmp_path):
    from pipeline.errors import InputError

    first = make_listener()
    with pytest.raises(InputError, match="another listener"):
        Listener(first.cfg.model_copy(update={"port": free_port()}),
                 analyser_factory=FakeAnalyser).start()


def test_interrupted_too_often_goes_to_failed(tmp_path, make_listener):
    spool = Spool(tmp_path / "spool")
    spool.create()
    queue = JobQueue(spool.db_path)
    (spool.jobs / "jobX" / "input").mkdir(parents=True)
    queue.add_job("jobX", "1.2.3", 1, None)
    for _ in range(2):
        queue.claim()
        queue.recover_running(max_attempts=99)
    queue.claim()  # attempt 3, "killed" again
    make_listener(spool=spool.root)
    job = queue.get_job("jobX")
    assert job.state == "failed" and "interrupted 3 times" in job.reason
    assert (spool.failed / "jobX" / "REASON.txt").exists()
    time.sleep(0.2)
    assert queue.get_job("jobX").state == "failed"


def test_finished_job_inputs_are_purged_after_retention_failed_ones_kept(make_listener, tmp_path):
    listener = make_listener(jobs={"keep_done_days": 0})
    good = write_ct_series(tmp_path / "good", shape=(16, 16, 2))
    bad = write_ct_series(tmp_path / "bad", shape=(16, 16, 2), corrupt=1)
    send(listener.cfg.port, sorted(good.folder.glob("*.dcm")))
    send(listener.cfg.port, sorted(bad.folder.glob("*.dcm")))
    (done,) = wait_job(listener, "done")
    (failed,) = wait_job(listener, "failed")
    listener.purge_old()
    assert not (listener.spool.jobs / done.id / "input").exists()
    assert (Path(done.result_dir) / "seg.dcm").exists()  # results stay
    assert listener.queue.get_job(done.id).purged == 1
    assert len(list((listener.spool.failed / failed.id / "input").glob("*.dcm"))) == 2


def test_release_timeout_completes_a_study_when_its_association_closes(make_listener):
    """With release_timeout_s, a study sent over one association becomes a job soon after the
    association is released, not after study_timeout_s of quiet."""
    listener = make_listener(study_timeout_s=60.0, release_timeout_s=0.3)
    ct = write_ct_series(listener.spool.root.parent / "ct", shape=(32, 32, 6))
    t0 = time.monotonic()
    assert send(listener.cfg.port, sorted(ct.folder.glob("*.dcm"))) == [0] * 6
    (job,) = wait_job(listener, "done", timeout=20.0)
    assert time.monotonic() - t0 < 20.0  # study_timeout_s (60 s) was not waited for
    input_dir = listener.spool.jobs / job.id / "input"
    assert sorted(p.stem for p in input_dir.glob("*.dcm")) == sorted(ct.sop_uids)


def test_release_timeout_waits_while_another_association_of_the_study_is_open(make_listener):
    listener = make_listener(study_timeout_s=60.0, release_timeout_s=0.2)
    ct = write_ct_series(listener.spool.root.parent / "ct", shape=(32, 32, 6))
    files = sorted(ct.folder.glob("*.dcm"))
    first = associate(listener.cfg.port)
    assert first.is_established
    assert [first.send_c_store(pydicom.dcmread(f)).Status for f in files[:3]] == [0] * 3
    assert send(listener.cfg.port, files[3:]) == [0] * 3  # a second association, released
    time.sleep(1.5)
    assert listener.queue.jobs() == []  # the first association is still open
    first.release()
    (job,) = wait_job(listener, "done", timeout=20.0)
    input_dir = listener.spool.jobs / job.id / "input"
    assert sorted(p.stem for p in input_dir.glob("*.dcm")) == sorted(ct.sop_uids)  # one job, all of it


def test_without_release_timeout_a_released_study_still_waits_for_quiet(make_listener):
    listener = make_listener(study_timeout_s=3.0)
    ct = write_ct_series(listener.spool.root.parent / "ct", shape=(32, 32, 4))
    assert send(listener.cfg.port, sorted(ct.folder.glob("*.dcm"))) == [0] * 4
    time.sleep(1.0)
    assert listener.queue.jobs() == []
    wait_job(listener, "done", timeout=20.0)
