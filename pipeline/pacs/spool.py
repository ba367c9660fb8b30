"""The spool: the listener's durable folder. Every acknowledged instance lives here.

Layout (one listener per spool, enforced by ``listener.lock``)::

    SPOOL/listener.lock           flock held by the running listener
    SPOOL/queue.sqlite            job queue + outbox (pipeline.pacs.queue), WAL mode
    SPOOL/osteoplan.log           the listener's log (no patient identity)
    SPOOL/tmp/                    C-STORE data being received; emptied at start-up
    SPOOL/incoming/<study>/<sop>.dcm   acknowledged instances of studies still arriving
    SPOOL/jobs/<job>/job.json     job identity (study UID, base job for late instances)
    SPOOL/jobs/<job>/input/       the job's instances (moved from incoming/, immutable after)
    SPOOL/jobs/<job>/results/     ``StudyRunner.run`` output (report.json, seg.dcm, sr.dcm, ...)
    SPOOL/failed/<job>/           a failed job: REASON.txt + input/ (+ partial results), kept
    SPOOL/rejected/               instances refused for their content, with <name>.reason.txt

Durability: an instance is written to ``tmp/``, fsync'd, renamed into ``incoming/<study>/`` and
the directory fsync'd before the C-STORE response says success. Folder moves are renames on one
file system followed by an fsync of both parent directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_key(uid: str) -> str:
    """A file-name-safe key for a UID: the UID itself when it is well formed, else a hash."""
    uid = (uid or "").strip().rstrip("\x00")
    if _UID.match(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename (and fsync the folder)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def make_dirs(path: Path) -> None:
    """mkdir -p with the new entries made durable (each created level's parent is fsync'd)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def durable_move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same file system) and fsync both parent folders."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


@dataclass
class PendingStudy:
    """A study still receiving instances. ``last_arrival`` is time.monotonic() seconds.

    ``open_assocs``: the associations that delivered instances of it and are still open;
    ``closed_assocs``: how many such associations have closed (released or aborted).
    """

    study_uid: str
    last_arrival: float
    instances: int
    open_assocs: set[int] = field(default_factory=set)
    closed_assocs: int = 0

    def due(self, now: float, timeout_s: float, release_s: float | None = None) -> bool:
        """Complete: quiet for ``timeout_s``; or, with ``release_s``, every association that
        delivered to it has closed and it has been quiet for ``release_s``."""
        quiet = now - self.last_arrival
        if quiet >= timeout_s:
            return True
        return release_s is not None and self.closed_assocs > 0 and not self.open_assocs and quiet >= release_s


class Spool:
    """Paths, atomic storage of instances, and the arrival clock used for completion detection.

    Thread-safe: C-STORE handlers (one thread per association) call :meth:`store_instance`; the
    completion monitor calls :meth:`due_studies` and :meth:`take_study`. One lock orders them, so
    an instance is either in the study folder that becomes a job, or starts a new folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.jobs = self.root / "jobs"
        self.failed = self.root / "failed"
        self.rejected = self.root / "rejected"
        self.db_path = self.root / "queue.sqlite"
        self.lock_path = self.root / "listener.lock"
        self._lock = threading.Lock()
        self._pending: dict[str, PendingStudy] = {}

    def create(self) -> None:
        for d in (self.root, self.tmp, self.incoming, self.jobs, self.failed, self.rejected):
            make_dirs(d)

    # ---- start-up -------------------------------------------------------------------------
    def clear_tmp(self) -> int:
        """Remove partial C-STORE data left by a killed process (never acknowledged)."""
        n = 0
        for p in self.tmp.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    def recover_incoming(self) -> list[str]:
        """Re-arm completion timers for studies found in incoming/ (their clock restarts now)."""
        now = time.monotonic()
        keys = []
        with self._lock:
            for d in sorted(self.incoming.iterdir()):
                if not d.is_dir():
                    continue
                files = [f for f in d.iterdir() if f.suffix == ".dcm"]
                if not files:
                    d.rmdir()
                    continue
                uid = _read_study_uid(files[0]) or d.name
                self._pending[d.name] = PendingStudy(uid, now, len(files))
                keys.append(d.name)
        return keys

    # ---- receiving ------------------------------------------------------------------------
    def store_instance(self, src: Path, study_uid: str, sop_instance_uid: str, assoc: int | None = None) -> Path:
        """Durably move a received file (already in ``tmp/``) into ``incoming/<study>/``.

        Returns the final path. A repeated SOP Instance UID replaces the earlier copy.
        ``assoc`` identifies the association it came over (see :meth:`association_closed`).
        """
        fsync_file(src)
        key = uid_key(study_uid)
        folder = self.incoming / key
        dst = folder / f"{uid_key(sop_instance_uid)}.dcm"
        with self._lock:
            if not folder.exists():
                folder.mkdir()
                fsync_dir(self.incoming)
            os.replace(src, dst)
            fsync_dir(folder)
            st = self._pending.get(key)
            if st is None:
                st = self._pending[key] = PendingStudy(study_uid, time.monotonic(), 1)
            else:
                st.last_arrival = time.monotonic()
                st.instances += 1
            if assoc is not None:
                st.open_assocs.add(assoc)
        return dst

    def association_closed(self, assoc: int) -> None:
        """The association ``assoc`` closed: the pending studies it delivered instances of know."""
        with self._lock:
            for st in self._pending.values():
                if assoc in st.open_assocs:
                    st.open_assocs.discard(assoc)
                    st.closed_assocs += 1

    def reject(self, src: Path, name: str, reason: str) -> Path:
        """Keep an instance refused for its content in ``rejected/`` with its reason."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dst = self.rejected / f"{stamp}-{uid_key(name)}-{os.urandom(3).hex()}.dcm"
        fsync_file(src)
        os.replace(src, dst)
        atomic_write_text(dst.with_suffix(".reason.txt"), reason.rstrip() + "\n")
        return dst

    # ---- completion -----------------------------------------------------------------------
    def pending(self) -> dict[str, PendingStudy]:
        with self._lock:
            return {k: PendingStudy(v.study_uid, v.last_arrival, v.instances, set(v.open_assocs), v.closed_assocs)
                    for k, v in self._pending.items()}

    def due_studies(self, timeout_s: float, now: float | None = None, release_s: float | None = None) -> list[str]:
        """Keys of complete studies (:meth:`PendingStudy.due`)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [k for k, v in self._pending.items() if v.due(now, timeout_s, release_s)]

    def take_study(self, key: str, job_id: str, job_info: dict[str, Any], timeout_s: float,
                   release_s: float | None = None) -> bool:
        """Move ``incoming/<key>`` to ``jobs/<job_id>/input`` if the study is (still) complete.

        ``job.json`` is written first, so a crash between the steps leaves a job folder that
        start-up reconciliation can finish. Returns False when an instance arrived meanwhile.
        """
        job_dir = self.jobs / job_id
        with self._lock:
            st = self._pending.get(key)
            if st is None or not st.due(time.monotonic(), timeout_s, release_s):
                return False
            job_dir.mkdir()
            fsync_dir(self.jobs)
            atomic_write_text(job_dir / "job.json", json.dumps(job_info, indent=2))
            durable_move(self.incoming / key, job_dir / "input")
            del self._pending[key]
        return True

    # ---- jobs -----------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        """Where a job's folder is now: ``jobs/<id>`` or, once failed, ``failed/<id>``."""
        active = self.jobs / job_id
        return active if active.exists() else self.failed / job_id

    def link_instances(self, base_input: Path, target_input: Path) -> int:
        """Hard-link (copy across devices) instances of an earlier job that ``target_input`` lacks.

        Idempotent: existing names (SOP Instance UIDs) are kept, so the newer copy wins.
        """
        n = 0
        if not base_input.is_dir():
            return 0
        for f in sorted(base_input.iterdir()):
            dst = target_input / f.name
            if f.suffix != ".dcm" or dst.exists():
                continue
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy2(f, dst)
                fsync_file(dst)
            n += 1
        if n:
            fsync_dir(target_input)
        return n

    def fail_job_dir(self, job_id: str, reason: str) -> Path:
        """Write REASON.txt into the job folder and move it to ``failed/``. Idempotent."""
        src = self.jobs / job_id
        dst = self.failed / job_id
        if src.exists():
            atomic_write_text(src / "REASON.txt", reason.rstrip() + "\n")
            durable_move(src, dst)
        elif dst.exists() and not (dst / "REASON.txt").exists():
            atomic_write_text(dst / "REASON.txt", reason.rstrip() + "\n")
        return dst


def _read_study_uid(path: Path) -> str | None:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.StudyInstanceUID)
    except Exception:  # noqa: BLE001 - unreadable header: the folder name stands in
        return None
