"""``osteoplan listen``: Storage SCP -> spool -> completed studies -> job queue -> worker -> outbox.

Threads: pynetdicom's server (one thread per association) stores instances; the *monitor* turns
studies idle for ``study_timeout_s`` into jobs (MONAI Deploy Informatics Gateway's model), or, with
``release_timeout_s``, studies whose sending associations have all closed and that have been idle
that long (a sender that sends a study per association: no 30 s wait); one
*worker* runs jobs with a StudyRunner created once; the *outbox* thread delivers SEG + SR.

Guarantees (see also spool.py and queue.py):

* Acknowledged = durable: the C-STORE success response is sent only after the instance is
  fsync'd and renamed into ``incoming/<study>/`` and that folder fsync'd.
* Start-up recovery, in order: take the spool lock; empty ``tmp/``; finish job folders created
  just before a crash (``jobs/<id>`` with ``job.json`` + ``input/`` but no row gets its row;
  without ``input/`` it is removed, as its instances are still in ``incoming/``); jobs left
  ``running`` go back to ``pending`` (or ``failed`` after ``jobs.max_attempts`` starts); studies
  in ``incoming/`` get a fresh completion timer (the sender may still be retrying).
* Exactly once: each job ends with one completed result set. A job interrupted mid-run is re-run
  from scratch (its partial results are discarded); results are queued for sending in the same
  transaction that marks the job done, so only a finished result set is ever sent, and a
  re-send carries the same SOP Instance UIDs.
* Late instances (a study that arrives after its job was created): they form a new version of
  the job, whose input is the new instances plus hard links to every instance of the previous
  version (newer copy of a SOP Instance UID wins). The new version supersedes a previous version
  that is still ``pending``; a ``running`` or finished one is not touched, so the PACS gets the
  new results as a new SEG/SR (new SOP Instance UIDs) in the same study. A late batch that holds
  no SOP Instance UID the previous version lacked (a retransmission) is stored as a ``skipped``
  job and not re-analysed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from pipeline.errors import InputError
from pipeline.logs import anon
from pipeline.pacs.config import PacsConfig
from pipeline.pacs.outbox import OutboxSender
from pipeline.pacs.queue import JobQueue
from pipeline.pacs.scp import start_scp
from pipeline.pacs.spool import Spool
from pipeline.pacs.worker import Analyser, StudyAnalyser, Worker

log = logging.getLogger("osteoplan.pacs.listener")

PURGE_EVERY_S = 600.0


def new_job_id() -> str:
    """Sortable, unique job id: UTC time + random suffix, e.g. ``20261126T101530Z-3fa2c1``."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


class Listener:
    """The whole listener. ``start()`` recovers and starts threads; ``stop()`` shuts down."""

    def __init__(self, cfg: PacsConfig, analyser_factory: Callable[[], Analyser] | None = None) -> None:
        assert cfg.spool is not None
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.analyser_factory = analyser_factory or (lambda: StudyAnalyser(cfg.run))
        self.stop_event = threading.Event()
        self.job_wake = threading.Event()
        self.send_wake = threading.Event()
        self.server = None
        self.threads: list[threading.Thread] = []
        self._lock_fd: int | None = None
        self.queue: JobQueue | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.spool.create()
        self._take_lock()
        self.queue = JobQueue(self.spool.db_path)
        self.recover()
        analyser = self.analyser_factory()  # model weights loaded once, before accepting data
        worker = Worker(self.queue, self.spool, analyser, self.stop_event, self.job_wake, self.send_wake,
                        send_results=self.cfg.destination is not None)
        outbox = OutboxSender(self.queue, self.cfg, self.stop_event, self.send_wake)
        for name, target in (("osteoplan-worker", worker.run_forever), ("osteoplan-outbox", outbox.run_forever),
                             ("osteoplan-monitor", self.monitor_forever)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        try:
            self.server = start_scp(self.cfg, self.spool)
        except OSError as exc:
            self.stop()
            raise InputError(f"cannot listen on {self.cfg.bind_address}:{self.cfg.port}: {exc.strerror}") from None
        log.info("listening as %s on %s:%d, spool %s", self.cfg.ae_title, self.cfg.bind_address, self.cfg.port,
                 self.spool.root)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let the current job finish for up to ``grace_s``, release the lock.
        A job still running then is re-run at the next start (it stays ``running`` in the queue)."""
        self.stop_event.set()
        self.job_wake.set()
        self.send_wake.set()
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        deadline = time.monotonic() + grace_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.threads = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT."""
        self.start()
        previous = {s: signal.signal(s, lambda *_: self.stop_event.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.stop()

    def _take_lock(self) -> None:
        fd = os.open(self.spool.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"another listener is using the spool {self.spool.root}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    # ---- recovery -------------------------------------------------------------------------
    def recover(self) -> None:
        assert self.queue is not None
        n_tmp = self.spool.clear_tmp()
        for d in sorted(self.spool.jobs.iterdir()):
            if not d.is_dir() or self.queue.get_job(d.name) is not None:
                continue
            info_path = d / "job.json"
            if (d / "input").is_dir() and info_path.exists():
                self.register_job(d.name, json.loads(info_path.read_text()))
                log.info("recovered job folder %s created before a crash", d.name)
            else:
                shutil.rmtree(d)
        for job in self.queue.jobs("failed"):
            if (self.spool.jobs / job.id).exists():
                self.spool.fail_job_dir(job.id, job.reason or "failed")
        requeued, failed = self.queue.recover_running(self.cfg.jobs.max_attempts)
        for jid in failed:
            job = self.queue.get_job(jid)
            self.spool.fail_job_dir(jid, job.reason if job and job.reason else "interrupted")
            log.warning("job %s failed: interrupted too often", jid)
        pending = self.spool.recover_incoming()
        log.info("recovery: %d partial transfer(s) discarded, %d interrupted job(s) re-queued, %d failed, "
                 "%d incomplete stud(ies) waiting", n_tmp, len(requeued), len(failed), len(pending))
        self.purge_old()

    # ---- completion -> jobs ---------------------------------------------------------------
    def monitor_forever(self) -> None:
        release_s = self.cfg.release_timeout_s
        poll = max(0.05, min(1.0, min(self.cfg.study_timeout_s, release_s or self.cfg.study_timeout_s) / 5))
        last_purge = time.monotonic()
        while not self.stop_event.wait(poll):
            try:
                for key in self.spool.due_studies(self.cfg.study_timeout_s, release_s=release_s):
                    self.complete_study(key)
                if time.monotonic() - last_purge > PURGE_EVERY_S:
                    self.purge_old()
                    last_purge = time.monotonic()
            except Exception:  # noqa: BLE001 - keep watching; the data stays in the spool
                log.error("monitor loop error\n%s", traceback.format_exc())

    def complete_study(self, key: str) -> str | None:
        """Turn a complete study in ``incoming/<key>`` into a job. Returns the job id, or None."""
        assert self.queue is not None
        st = self.spool.pending().get(key)
        if st is None:
            return None
        base = self.queue.latest_job_for_study(st.study_uid)
        info = {"study_uid": st.study_uid, "base_job": base.id if base else None,
                "version": (base.version + 1) if base else 1, "created_utc": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        job_id = new_job_id()
        if not self.spool.take_study(key, job_id, info, self.cfg.study_timeout_s, self.cfg.release_timeout_s):
            return None
        self.register_job(job_id, info)
        return job_id

    def register_job(self, job_id: str, info: dict) -> None:
        """Complete a job folder (late-instance union) and insert its row. Idempotent."""
        assert self.queue is not None
        input_dir = self.spool.jobs / job_id / "input"
        base_id = info.get("base_job")
        state, reason = "pending", None
        if base_id:
            base_input = self.spool.job_dir(base_id) / "input"
            if base_input.is_dir():
                base_names = {f.name for f in base_input.glob("*.dcm")}
                new_names = {f.name for f in input_dir.glob("*.dcm")} - base_names
                if not new_names:
                    state, reason = "skipped", f"retransmission: no instance that job {base_id} lacked"
                linked = self.spool.link_instances(base_input, input_dir)
                log.info("job %s is version %d of study %s: %d new + %d earlier instance(s)", job_id,
                         info.get("version", 1), anon(info["study_uid"]), len(new_names), linked)
        self.queue.add_job(job_id, info["study_uid"], int(info.get("version", 1)), base_id, state, reason)
        n = sum(1 for _ in input_dir.glob("*.dcm"))
        log.info("job %s queued (%s): study %s, %d instance(s)", job_id, state, anon(info["study_uid"]), n)
        self.job_wake.set()

    def purge_old(self) -> None:
        """Remove inputs of finished jobs older than ``jobs.keep_done_days`` (failed jobs are kept)."""
        assert self.queue is not None
        days = self.cfg.jobs.keep_done_days
        if days is None:
            return
        for job in self.queue.purgeable(days * 86400.0):
            shutil.rmtree(self.spool.jobs / job.id / "input", ignore_errors=True)
            self.queue.mark_purged(job.id)
            log.info("purged input of job %s (%s, older than %g days)", job.id, job.state, days)
