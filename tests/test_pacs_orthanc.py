"""The listener as a real process between real DICOM peers: dcmtk storescu/echoscu as the scanner,
Orthanc as the PACS (receiver of SEG/SR, and as a sender). Fault tests kill -9 the listener.

The study function is the stand-in FakeAnalyser (tests/pacs_helpers.py runs the same
``osteoplan listen`` CLI with it), so these tests are about transport and durability;
test_pacs_e2e.py runs the real model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pacs_helpers import (  # noqa: E402
    ORTHANC, STORESCU, ListenerProcess, Orthanc, dicom_env, echo, free_port, storescu, wait_for, write_ct_series,
)
from pipeline.pacs.queue import JobQueue  # noqa: E402
from pipeline.pacs.spool import uid_key  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not Path(ORTHANC).exists(), reason="Orthanc not installed (Debian package orthanc)"),
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk not installed (Debian package dcmtk)"),
]


@pytest.fixture
def pacs(tmp_path):
    """An Orthanc that knows our listener's port; started by the test when it wants it up."""
    port = free_port()
    server = Orthanc(tmp_path / "orthanc", {"osteoplan": ("OSTEOPLAN", "127.0.0.1", port)})
    server.listener_port = port  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fast_retry(tmp_path) -> Path:
    cfg = tmp_path / "pacs.yaml"
    cfg.write_text("outbox:\n  retry_base_s: 0.3\n  retry_max_s: 1.0\n")
    return cfg


def jobs(spool: Path, state: str | None = None):
    return JobQueue(spool / "queue.sqlite").jobs(state)


def results_in(server: Orthanc, study_uid: str) -> dict[str, int]:
    return wait_for(lambda: (m := server.study_modalities(study_uid)).get("SEG") and m.get("SR") and m, 30,
                    what="SEG and SR in Orthanc")


def test_storescu_study_comes_back_to_orthanc_as_seg_and_sr(pacs, tmp_path):
    pacs.start()
    study = write_ct_series(tmp_path / "ct", shape=(64, 64, 20))
    spool = tmp_path / "spool"
    with ListenerProcess(spool, pacs.listener_port, pacs.address) as lp:
        assert echo(lp.port) == 0
        r = storescu(lp.port, study.folder)
        assert r.returncode == 0, r.stderr
        found = results_in(pacs, study.study_uid)
        assert found == {"SEG": 1, "SR": 1}
        assert len(pacs.get("/instances")) == 2  # the results only: the CT never went to the PACS
        (job,) = jobs(spool, "done")
        # Orthanc shows an instance before the sender has recorded its C-STORE response: wait for that
        wait_for(lambda: all(o.state == "sent" for o in JobQueue(spool / "queue.sqlite").outbox()), 10,
                 what="outbox entries marked sent")
        lp.stop()  # SIGTERM: a clean shutdown
        assert lp.proc.returncode == 0
    log = (spool / "osteoplan.log").read_text()
    assert "uid-" in log
    for secret in [study.study_uid, study.series_uid, *study.sop_uids, "PHANTOM", "PACS0001"]:
        assert secret not in log


def test_orthanc_as_sender(pacs, tmp_path):
    pacs.start()
    study = write_ct_series(tmp_path / "ct", shape=(64, 64, 12))
    pacs.upload(sorted(study.folder.glob("*.dcm")))
    with ListenerProcess(tmp_path / "spool", pacs.listener_port, pacs.address):
        oid = pacs.find_study(study.study_uid)
        pacs.post("/modalities/osteoplan/store", {"Resources": [oid], "Synchronous": True})
        assert results_in(pacs, study.study_uid) == {"CT": 12, "SEG": 1, "SR": 1}


def _acked_files(storescu_log: str) -> list[str]:
    """Files for which dcmtk storescu -v received a success response."""
    acked, current = [], None
    for line in storescu_log.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_during_transfer_loses_no_acknowledged_instance(pacs, tmp_path):
    pacs.start()
    study = write_ct_series(tmp_path / "ct", shape=(96, 96, 120))
    sop_of = {f"CT{k:04d}.dcm": uid for k, uid in enumerate(study.sop_uids)}
    spool = tmp_path / "spool"
    incoming = spool / "incoming" / uid_key(study.study_uid)
    lp = ListenerProcess(spool, pacs.listener_port, pacs.address, study_timeout=1.5)
    with lp:
        log_path = tmp_path / "storescu.log"
        with open(log_path, "w") as log:
            sender = subprocess.Popen(
                [STORESCU, "-v", "-aet", "SCANNER", "-aec", "OSTEOPLAN", "+sd", "127.0.0.1", str(lp.port),
                 str(study.folder)], stdout=log, stderr=subprocess.STDOUT, env=dicom_env())
            try:
                wait_for(lambda: incoming.is_dir() and len(list(incoming.glob("*.dcm"))) >= 30, 60, interval=0.01,
                         what="30 instances in the spool")
                lp.kill()  # kill -9 in the middle of the association
                sender.wait(30)
            finally:
                if sender.poll() is None:
                    sender.kill()
                    sender.wait()
        acked = {sop_of[Path(f).name] for f in _acked_files(log_path.read_text())}
        assert 20 <= len(acked) < 120, "the transfer was not interrupted; the test proves nothing"
        on_disk = {p.stem for p in incoming.glob("*.dcm")}
        assert acked <= on_disk

    with ListenerProcess(spool, pacs.listener_port, pacs.address, study_timeout=1.5) as lp2:
        assert acked <= {p.stem for p in incoming.glob("*.dcm")}  # still there after restart
        assert list((spool / "tmp").iterdir()) == []  # the half-received instance was discarded
        r = storescu(lp2.port, study.folder)  # the scanner sends the study again
        assert r.returncode == 0, r.stderr
        assert results_in(pacs, study.study_uid) == {"SEG": 1, "SR": 1}
        (job,) = jobs(spool)
        assert job.state == "done" and job.attempts == 1
        assert {p.stem for p in (spool / "jobs" / job.id / "input").glob("*.dcm")} == set(study.sop_uids)


def test_kill_during_job_reruns_it_exactly_once(pacs, tmp_path):
    pacs.start()
    study = write_ct_series(tmp_path / "ct", shape=(64, 64, 10))
    spool = tmp_path / "spool"
    with ListenerProcess(spool, pacs.listener_port, pacs.address, study_timeout=0.5, fake_delay=30) as lp:
        assert storescu(lp.port, study.folder).returncode == 0
        wait_for(lambda: jobs(spool, "running"), 20, what="the job to start")
        time.sleep(0.3)
        lp.kill()
    (job,) = jobs(spool)
    assert job.state == "running" and not (spool / "fake_runs.log").exists()
    with ListenerProcess(spool, pacs.listener_port, pacs.address, study_timeout=0.5, fake_delay=0.5):
        assert results_in(pacs, study.study_uid) == {"SEG": 1, "SR": 1}
        (job,) = jobs(spool)
        assert job.state == "done" and job.attempts == 2
        time.sleep(1.0)
        assert pacs.study_modalities(study.study_uid) == {"SEG": 1, "SR": 1}
    assert (spool / "fake_runs.log").read_text().split() == [job.id]


def test_destination_down_results_delivered_when_back_even_across_restart(pacs, tmp_path, fast_retry):
    study = write_ct_series(tmp_path / "ct", shape=(64, 64, 8))
    spool = tmp_path / "spool"
    extra = ["--config", str(fast_retry)]
    with ListenerProcess(spool, pacs.listener_port, pacs.address, extra=extra) as lp:  # PACS not started
        assert storescu(lp.port, study.folder).returncode == 0
        queue = JobQueue(spool / "queue.sqlite")
        wait_for(lambda: (rows := queue.outbox()) and all(r.attempts >= 2 for r in rows), 30,
                 what="failed send attempts")
        assert all(r.state == "pending" and r.last_error for r in queue.outbox())
        lp.kill()
    pacs.start()
    with ListenerProcess(spool, pacs.listener_port, pacs.address, extra=extra):
        assert results_in(pacs, study.study_uid) == {"SEG": 1, "SR": 1}
        wait_for(lambda: all(r.state == "sent" for r in JobQueue(spool / "queue.sqlite").outbox()), 10,
                 what="outbox marked sent")


def test_bad_study_fails_with_reason_while_others_are_delivered(pacs, tmp_path):
    pacs.start()
    bad = write_ct_series(tmp_path / "bad", shape=(64, 64, 6), corrupt=3)
    good = write_ct_series(tmp_path / "good", shape=(64, 64, 6))
    spool = tmp_path / "spool"
    with ListenerProcess(spool, pacs.listener_port, pacs.address) as lp:
        assert storescu(lp.port, bad.folder).returncode == 0
        assert storescu(lp.port, good.folder).returncode == 0
        assert results_in(pacs, good.study_uid) == {"SEG": 1, "SR": 1}
        (failed,) = wait_for(lambda: jobs(spool, "failed"), 20, what="the bad job to fail")
        assert failed.study_uid == bad.study_uid
        folder = spool / "failed" / failed.id
        assert "pixel data" in (folder / "REASON.txt").read_text()
        assert len(list((folder / "input").glob("*.dcm"))) == 6
        assert pacs.find_study(bad.study_uid) is None
