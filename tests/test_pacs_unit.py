"""Unit tests of the PACS subsystem's parts: config, spool, job queue, outbox (no network)."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pacs_helpers import write_ct_series  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.pacs.config import Destination, load_pacs_config, parse_destination  # noqa: E402
from pipeline.pacs.outbox import OutboxSender  # noqa: E402
from pipeline.pacs.queue import JobQueue, backoff_s  # noqa: E402
from pipeline.pacs.sender import SendResult  # noqa: E402
from pipeline.pacs.spool import Spool, uid_key  # noqa: E402


# ---- config -------------------------------------------------------------------------------------
def test_flags_override_config_file(tmp_path):
    cfg_file = tmp_path / "pacs.yaml"
    cfg_file.write_text("ae_title: FROMFILE\nport: 4000\nspool: /nonexistent/spool\nstudy_timeout_s: 9\n"
                        "run:\n  device: cuda\n  intent: curative\n")
    cfg = load_pacs_config(cfg_file, {"port": 5000, "spool": str(tmp_path / "s"), "run.device": "cpu",
                                      "ae_title": None})
    assert cfg.ae_title == "FROMFILE" and cfg.port == 5000 and cfg.study_timeout_s == 9
    assert cfg.spool == tmp_path / "s"
    assert cfg.run.device == "cpu" and cfg.run.intent == "curative"
    assert "seg" in cfg.run.formats and "sr" in cfg.run.formats


def test_shipped_config_is_valid():
    cfg = load_pacs_config(None, {"spool": "/tmp/x"})
    assert "1.2.840.10008.5.1.4.1.1.2" in cfg.storage_uids()
    assert cfg.destination is None


@pytest.mark.parametrize("override, fragment", [
    ({"port": 70000}, "port"),
    ({"ae_title": "A" * 17}, "ae_title"),
    ({"send_to": "PACS@host"}, "send_to"),
    ({"allow_ae": ["OK", "BAD\\AE"]}, "allow_ae"),
    ({"storage_classes": ["CTImageStorage", "NoSuchStorage"]}, "storage_classes"),
    ({"study_timeout_s": 0}, "study_timeout_s"),
    ({"release_timeout_s": -1}, "release_timeout_s"),
    ({"run.intent": "cosmetic"}, "run.intent"),
    ({"bogus_key": 1}, "bogus_key"),
])
def test_invalid_config_is_one_clear_line(tmp_path, override, fragment):
    with pytest.raises(InputError) as exc:
        load_pacs_config(None, {"spool": str(tmp_path), **override})
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_spool_is_required():
    with pytest.raises(InputError, match="spool"):
        load_pacs_config(None, {})


def test_parse_destination():
    assert parse_destination("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert parse_destination("ORTHANC@[::1]:4242") == Destination("ORTHANC", "::1", 4242)
    for bad in ("PACS:104", "@host:1", "PACS@host:0", "PACS@host:99999", "TOOLONGAETITLE123@h:1"):
        with pytest.raises(ValueError):
            parse_destination(bad)


# ---- spool --------------------------------------------------------------------------------------
def test_uid_key_is_safe():
    assert uid_key("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    for nasty in ("../../etc/passwd", "1.2/3", "", "1..2", "9" * 80):
        key = uid_key(nasty)
        assert "/" not in key and key.startswith("x") and len(key) == 33


def test_store_instance_is_durable_and_completion_waits_for_quiet(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    study = write_ct_series(tmp_path / "ct", shape=(16, 16, 3))
    for f, sop in zip(sorted(study.folder.glob("*.dcm")), study.sop_uids):
        tmp = spool.tmp / f"{sop}.part"
        tmp.write_bytes(f.read_bytes())
        final = spool.store_instance(tmp, study.study_uid, sop)
        assert final.exists() and not tmp.exists()
    key = uid_key(study.study_uid)
    assert len(list((spool.incoming / key).glob("*.dcm"))) == 3
    now = time.monotonic()
    assert spool.due_studies(5.0, now=now) == []
    assert spool.due_studies(5.0, now=now + 5.1) == [key]
    assert not spool.take_study(key, "job1", {"study_uid": study.study_uid}, timeout_s=60)  # not quiet yet
    assert spool.take_study(key, "job1", {"study_uid": study.study_uid}, timeout_s=0)
    assert len(list((spool.jobs / "job1" / "input").glob("*.dcm"))) == 3
    assert not (spool.incoming / key).exists() and spool.pending() == {}


def test_repeated_sop_instance_replaces_copy(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    for payload in (b"first", b"second"):
        tmp = spool.tmp / "x.part"
        tmp.write_bytes(payload)
        final = spool.store_instance(tmp, "1.2.3", "1.2.3.4")
    assert final.read_bytes() == b"second"
    assert spool.pending()[uid_key("1.2.3")].instances == 2


def test_fail_job_dir_keeps_data_with_reason(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.create()
    (spool.jobs / "j1" / "input").mkdir(parents=True)
    (spool.jobs / "j1" / "input" / "a.dcm").write_bytes(b"x")
    dst = spool.fail_job_dir("j1", "no CT series")
    assert dst == spool.failed / "j1" and (dst / "input" / "a.dcm").exists()
    assert (dst / "REASON.txt").read_text().strip() == "no CT series"
    assert spool.job_dir("j1") == dst


# ---- queue --------------------------------------------------------------------------------------
def test_queue_is_wal_and_claims_each_job_once_across_threads(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    con = sqlite3.connect(tmp_path / "q.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    for i in range(30):
        q.add_job(f"j{i:02d}", f"1.2.{i}", 1, None)
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer():
        while (job := q.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"j{i:02d}" for i in range(30)]
    assert all(j.state == "running" and j.attempts == 1 for j in q.jobs())


def test_claim_order_and_crash_recovery(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    q.add_job("a", "1.1", 1, None)
    q.add_job("b", "1.2", 1, None)
    assert q.claim().id == "a"
    requeued, failed = q.recover_running(max_attempts=2)  # "a" was running when we "crashed"
    assert requeued == ["a"] and failed == []
    assert q.claim().id == "a"  # still first in line, second attempt
    assert q.get_job("a").attempts == 2
    requeued, failed = q.recover_running(max_attempts=2)
    assert failed == ["a"] and "interrupted 2 times" in q.get_job("a").reason
    assert q.claim().id == "b"


def test_done_and_outbox_rows_commit_together(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    q.add_job("a", "1.1", 1, None)
    q.claim()
    with pytest.raises(sqlite3.IntegrityError):
        q.finish_done("a", "/r", [("/r/seg.dcm", "1.5", "1.2.840.10008.5.1.4.1.1.66.4"),
                                  (None, "1.6", "x")])  # type: ignore[list-item]  (path NOT NULL)
    assert q.get_job("a").state == "running" and q.outbox() == []
    q.finish_done("a", "/r", [("/r/seg.dcm", "1.5", "c1"), ("/r/sr.dcm", "1.6", "c2")])
    q.finish_done("a", "/r", [("/r/seg.dcm", "1.5", "c1")])  # idempotent
    assert q.get_job("a").state == "done" and len(q.outbox("pending")) == 2


def test_new_version_supersedes_pending_one(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    q.add_job("v1", "1.9", 1, None)
    q.add_job("v2", "1.9", 2, "v1")
    assert q.get_job("v1").state == "superseded" and q.get_job("v2").state == "pending"
    assert q.latest_job_for_study("1.9").id == "v2"
    assert q.latest_job_for_study("1.9", before="v2").id == "v1"


def test_backoff_doubles_and_is_capped():
    delays = [backoff_s(n, 2.0, 30.0, jitter=0.0) for n in range(1, 8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(1.8 <= backoff_s(1, 2.0, 30.0) <= 2.2 for _ in range(50))


# ---- outbox -------------------------------------------------------------------------------------
def test_outbox_retries_until_delivered_never_drops(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    q.add_job("a", "1.1", 1, None)
    q.claim()
    q.finish_done("a", "/r", [("/r/seg.dcm", "1.5", "c1"), ("/r/sr.dcm", "1.6", "c2")])
    cfg = load_pacs_config(None, {"spool": str(tmp_path), "send_to": "PACS@127.0.0.1:1",
                                  "outbox": {"retry_base_s": 0.01, "retry_max_s": 0.05}})
    calls: list[list[Path]] = []
    up = {"ok": False}

    def fake_send(dest, paths):
        calls.append(paths)
        return [SendResult(p, up["ok"], "0x0000" if up["ok"] else "cannot connect") for p in paths]

    sender = OutboxSender(q, cfg, threading.Event(), threading.Event(), send=fake_send)
    for _ in range(4):
        assert sender.deliver_due() == 0
        time.sleep(0.06)
    rows = q.outbox()
    assert all(r.state == "pending" and r.attempts == 4 and r.last_error == "cannot connect" for r in rows)
    up["ok"] = True
    time.sleep(0.06)
    assert sender.deliver_due() == 2
    assert all(r.state == "sent" and r.sent_to == "PACS@127.0.0.1:1" for r in q.outbox())
    assert sender.deliver_due() == 0 and len(calls) == 5


def test_listen_with_bad_settings_exits_2_with_one_line(tmp_path, capsys):
    from pipeline.cli import main

    rc = main(["listen", "--spool", str(tmp_path / "s"), "--send-to", "nonsense"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "send_to" in err and "Traceback" not in err


def test_pending_study_due_rules():
    from pipeline.pacs.spool import PendingStudy

    st = PendingStudy("1.2.3", last_arrival=100.0, instances=3)
    assert not st.due(101.0, timeout_s=30.0, release_s=0.5)  # no association has closed yet
    assert st.due(130.0, timeout_s=30.0)
    st.open_assocs.add(7)
    st.open_assocs.discard(7)
    st.closed_assocs = 1
    assert not st.due(100.2, timeout_s=30.0, release_s=0.5)  # closed, but not quiet long enough
    assert st.due(100.6, timeout_s=30.0, release_s=0.5)
    assert not st.due(100.6, timeout_s=30.0)  # release rule off
    st.open_assocs.add(8)  # another association of the study is still open
    assert not st.due(100.6, timeout_s=30.0, release_s=0.5) and st.due(130.0, timeout_s=30.0, release_s=0.5)
