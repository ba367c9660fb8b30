"""Durable job queue and outbox: SQLite (WAL, synchronous=FULL) inside the spool.

Job states::

    pending -> running -> done        results written, their SEG/SR queued in the outbox
                       -> failed      reason recorded; folder moved to SPOOL/failed/<job>/
                       -> skipped     nothing to analyse (no CT images, or a retransmission)
    pending -> superseded             a newer version of the same study was queued first

Claiming is one ``BEGIN IMMEDIATE`` transaction, so a job is handed to one worker only. A job
found ``running`` at start-up was interrupted by a crash: it goes back to ``pending`` (and is run
again from scratch) until it has been started ``max_attempts`` times, then it is ``failed``.
A job becomes ``done`` in the same transaction that queues its outbox rows, so either both
happened or neither did.

Outbox rows are ``pending`` until the destination answered success for that SOP Instance UID,
then ``sent``. Failed sends are retried with exponential backoff, forever, across restarts.
"""

from __future__ import annotations

import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    base_job TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result_dir TEXT,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL,
    sent_to TEXT,
    UNIQUE(job_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, next_attempt_at);
"""

JOB_STATES = ("pending", "running", "done", "failed", "skipped", "superseded")


@dataclass
class Job:
    id: str
    study_uid: str
    version: int
    base_job: str | None
    state: str
    attempts: int
    reason: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_dir: str | None
    purged: int


@dataclass
class OutboxItem:
    id: int
    job_id: str
    path: str
    sop_instance_uid: str
    sop_class_uid: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    sent_at: float | None
    sent_to: str | None


def backoff_s(attempts: int, base_s: float, max_s: float, jitter: float = 0.1) -> float:
    """Delay before retry number ``attempts`` (1 = first retry): base * 2**(n-1), capped, +-10%."""
    delay = min(max_s, base_s * (2 ** max(0, attempts - 1)))
    return delay * (1.0 + random.uniform(-jitter, jitter))


class JobQueue:
    """SQLite-backed queue. One short-lived connection per call, so any thread may use it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self._connect() as con:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode for {self.path} (got {mode})")
            con.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` .. ``COMMIT`` (rolled back on any exception)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ---- jobs -----------------------------------------------------------------------------
    def add_job(self, job_id: str, study_uid: str, version: int, base_job: str | None,
                state: str = "pending", reason: str | None = None) -> None:
        """Insert a job (no-op if the id exists). A new version supersedes pending older ones."""
        now = time.time()
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
                return
            if state == "pending":
                con.execute(
                    "UPDATE jobs SET state='superseded', reason=?, finished_at=? "
                    "WHERE study_uid=? AND state='pending'",
                    (f"superseded by job {job_id}", now, study_uid),
                )
            con.execute(
                "INSERT INTO jobs(id, study_uid, version, base_job, state, reason, created_at, finished_at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, study_uid, version, base_job, state, reason, now,
                 None if state == "pending" else now),
            )

    def get_job(self, job_id: str) -> Job | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(**dict(row)) if row else None

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._connect() as con:
            if state is None:
                rows = con.execute("SELECT * FROM jobs ORDER BY rowid").fetchall()
            else:
                rows = con.execute("SELECT * FROM jobs WHERE state=? ORDER BY rowid", (state,)).fetchall()
        return [Job(**dict(r)) for r in rows]

    def latest_job_for_study(self, study_uid: str, before: str | None = None) -> Job | None:
        """The newest job of a study (optionally: inserted before job ``before``)."""
        with self._connect() as con:
            if before is None:
                row = con.execute("SELECT * FROM jobs WHERE study_uid=? ORDER BY rowid DESC LIMIT 1",
                                  (study_uid,)).fetchone()
            else:
                row = con.execute(
                    "SELECT * FROM jobs WHERE study_uid=? AND rowid < (SELECT rowid FROM jobs WHERE id=?) "
                    "ORDER BY rowid DESC LIMIT 1", (study_uid, before)).fetchone()
        return Job(**dict(row)) if row else None

    def claim(self) -> Job | None:
        """Atomically take the oldest pending job: state running, attempts + 1."""
        with self.transaction() as con:
            row = con.execute("SELECT id FROM jobs WHERE state='pending' ORDER BY rowid LIMIT 1").fetchone()
            if row is None:
                return None
            con.execute("UPDATE jobs SET state='running', attempts=attempts+1, started_at=?, reason=NULL "
                        "WHERE id=?", (time.time(), row["id"]))
            job = con.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return Job(**dict(job))

    def recover_running(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start-up: jobs left ``running`` by a crash go back to ``pending``, or to ``failed``
        once started ``max_attempts`` times. Returns (requeued ids, failed ids)."""
        requeued, failed = [], []
        now = time.time()
        with self.transaction() as con:
            for row in con.execute("SELECT id, attempts FROM jobs WHERE state='running'").fetchall():
                if row["attempts"] >= max_attempts:
                    con.execute("UPDATE jobs SET state='failed', finished_at=?, reason=? WHERE id=?",
                                (now, f"interrupted {row['attempts']} times while processing "
                                      "(listener crashed or was killed); not retried again", row["id"]))
                    failed.append(row["id"])
                else:
                    con.execute("UPDATE jobs SET state='pending' WHERE id=?", (row["id"],))
                    requeued.append(row["id"])
        return requeued, failed

    def finish_done(self, job_id: str, result_dir: str, sends: list[tuple[str, str, str]]) -> None:
        """Mark a job done and queue its result files, in one transaction.

        ``sends``: (path, SOPInstanceUID, SOPClassUID) per file.
        """
        with self.transaction() as con:
            for path, sop_uid, sop_class in sends:
                con.execute("INSERT INTO outbox(job_id, path, sop_instance_uid, sop_class_uid) VALUES (?,?,?,?) "
                            "ON CONFLICT(job_id, sop_instance_uid) DO NOTHING", (job_id, path, sop_uid, sop_class))
            con.execute("UPDATE jobs SET state='done', finished_at=?, result_dir=?, reason=NULL WHERE id=?",
                        (time.time(), result_dir, job_id))

    def finish(self, job_id: str, state: str, reason: str) -> None:
        """Mark a job ``failed`` or ``skipped`` with its reason."""
        if state not in ("failed", "skipped"):
            raise ValueError(state)
        with self.transaction() as con:
            con.execute("UPDATE jobs SET state=?, finished_at=?, reason=? WHERE id=?",
                        (state, time.time(), reason, job_id))

    def purgeable(self, older_than_s: float) -> list[Job]:
        """Finished (done/skipped/superseded) jobs older than ``older_than_s`` whose outbox is empty."""
        cutoff = time.time() - older_than_s
        with self._connect() as con:
            rows = con.execute(
                "SELECT * FROM jobs j WHERE state IN ('done','skipped','superseded') AND purged=0 "
                "AND finished_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id=j.id "
                "AND o.state='pending')", (cutoff,)).fetchall()
        return [Job(**dict(r)) for r in rows]

    def mark_purged(self, job_id: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE jobs SET purged=1 WHERE id=?", (job_id,))

    # ---- outbox ---------------------------------------------------------------------------
    def due_sends(self, now: float | None = None, limit: int = 100) -> list[OutboxItem]:
        now = time.time() if now is None else now
        with self._connect() as con:
            rows = con.execute("SELECT * FROM outbox WHERE state='pending' AND next_attempt_at <= ? "
                               "ORDER BY id LIMIT ?", (now, limit)).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def outbox(self, state: str | None = None) -> list[OutboxItem]:
        with self._connect() as con:
            if state is None:
                rows = con.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = con.execute("SELECT * FROM outbox WHERE state=? ORDER BY id", (state,)).fetchall()
        return [OutboxItem(**dict(r)) for r in rows]

    def next_send_time(self) -> float | None:
        with self._connect() as con:
            row = con.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'").fetchone()
        return row[0]

    def mark_sent(self, item_id: int, destination: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE outbox SET state='sent', sent_at=?, sent_to=?, attempts=attempts+1, "
                        "last_error=NULL WHERE id=?", (time.time(), destination, item_id))

    def mark_send_failed(self, item_id: int, error: str, base_s: float, max_s: float) -> float:
        """Record a failed send; returns the delay (s) until the next attempt."""
        with self.transaction() as con:
            row = con.execute("SELECT attempts FROM outbox WHERE id=?", (item_id,)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            delay = backoff_s(attempts, base_s, max_s)
            con.execute("UPDATE outbox SET attempts=?, last_error=?, next_attempt_at=? WHERE id=?",
                        (attempts, error[:500], time.time() + delay, item_id))
        return delay
