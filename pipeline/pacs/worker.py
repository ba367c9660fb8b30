"""The job worker: claims jobs from the queue and runs the study function on each.

The study function is the same one ``osteoplan run`` uses: :class:`StudyAnalyser` creates one
``pipeline.study.StudyRunner`` (weights loaded once) and calls ``runner.run(input, results)``
per job. Anything with the :class:`Analyser` signature can stand in (unit tests do).
"""

from __future__ import annotations

import logging
import shutil
import threading
import traceback
from pathlib import Path
from typing import Protocol

import pydicom

from pipeline.errors import OsteoplanError
from pipeline.logs import anon
from pipeline.pacs.config import RunConfig
from pipeline.pacs.queue import Job, JobQueue
from pipeline.pacs.spool import Spool, atomic_write_text

log = logging.getLogger("osteoplan.pacs.worker")

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image Storage
}
RESULT_FILES = ("seg.dcm", "sr.dcm")


class Analyser(Protocol):
    def __call__(self, input_dir: Path, output_root: Path) -> Path:
        """Analyse the study in ``input_dir``; write into ``output_root/<study>/``; return that folder."""


class StudyAnalyser:
    """``pipeline.study.StudyRunner`` created once, run per job (as ``osteoplan run`` does)."""

    def __init__(self, run: RunConfig) -> None:
        from pipeline.study import StudyOptions, StudyRunner

        self.options = StudyOptions(device=run.device, fast=run.fast, intent=run.intent, model=run.model,
                                    formats=tuple(run.formats))
        self.runner = StudyRunner(self.options)

    def __call__(self, input_dir: Path, output_root: Path) -> Path:
        return self.runner.run(input_dir, output_root, self.options).study_dir


def ct_instance_count(input_dir: Path) -> tuple[int, set[str]]:
    """(number of CT image instances, modalities seen) in a job's input folder."""
    n, modalities = 0, set()
    for f in input_dir.glob("*.dcm"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
        except Exception:  # noqa: BLE001 - an unreadable file counts as CT-unknown; the study run reports it
            modalities.add("unreadable")
            continue
        modalities.add(str(ds.get("Modality", "?")))
        if str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES:
            n += 1
    return n, modalities


def result_sends(study_dir: Path) -> list[tuple[str, str, str]]:
    """(path, SOPInstanceUID, SOPClassUID) of the result files that go to the PACS."""
    sends = []
    for name in RESULT_FILES:
        p = study_dir / name
        if p.exists():
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
            sends.append((str(p), str(ds.SOPInstanceUID), str(ds.SOPClassUID)))
    return sends


class Worker:
    """Runs jobs one at a time until ``stop`` is set. ``sent_wake`` is set when results are queued."""

    def __init__(self, queue: JobQueue, spool: Spool, analyser: Analyser, stop: threading.Event,
                 wake: threading.Event, sent_wake: threading.Event | None = None, send_results: bool = True) -> None:
        self.queue, self.spool, self.analyser = queue, spool, analyser
        self.stop, self.wake, self.sent_wake = stop, wake, sent_wake
        self.send_results = send_results

    def run_forever(self) -> None:
        while not self.stop.is_set():
            try:
                if not self.run_one():
                    self.wake.wait(1.0)
                    self.wake.clear()
            except Exception:  # noqa: BLE001 - the worker must outlive any single failure
                log.error("worker loop error\n%s", traceback.format_exc())
                self.stop.wait(2.0)

    def run_one(self) -> bool:
        """Claim and process one job. Returns False when the queue had none."""
        job = self.queue.claim()
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: Job) -> None:
        jdir = self.spool.jobs / job.id
        input_dir = jdir / "input"
        results = jdir / "results"
        log.info("job %s (study %s, version %d, attempt %d) started", job.id, anon(job.study_uid),
                 job.version, job.attempts)
        if not input_dir.is_dir():
            self._fail(job, "job input folder is missing from the spool")
            return
        try:
            (jdir / "REASON.txt").unlink(missing_ok=True)
            shutil.rmtree(results, ignore_errors=True)  # a re-run after a crash starts from scratch
            results.mkdir()
            n_ct, modalities = ct_instance_count(input_dir)
            if n_ct == 0:
                reason = f"no CT image instances (modalities: {', '.join(sorted(modalities)) or 'none'}); stored only"
                self.queue.finish(job.id, "skipped", reason)
                log.info("job %s skipped: %s", job.id, reason)
                return
            study_dir = Path(self.analyser(input_dir, results))
            sends = result_sends(study_dir) if self.send_results else []
        except OsteoplanError as exc:
            self._fail(job, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - recorded with the job; traceback in the log
            log.error("job %s internal error\n%s", job.id, traceback.format_exc())
            self._fail(job, f"internal error ({type(exc).__name__}: {str(exc)[:300]}); traceback in the log")
            return
        missing = [n for n in RESULT_FILES if not (study_dir / n).exists()]
        if missing:
            log.warning("job %s: result files missing: %s", job.id, ", ".join(missing))
        self.queue.finish_done(job.id, str(study_dir), sends)
        log.info("job %s done: %d result file(s) queued for sending", job.id, len(sends))
        if sends and self.sent_wake is not None:
            self.sent_wake.set()

    def _fail(self, job: Job, reason: str) -> None:
        """Record the reason in the job folder and the row, then move the folder to failed/."""
        jdir = self.spool.jobs / job.id
        if jdir.exists():
            atomic_write_text(jdir / "REASON.txt", reason + "\n")
        self.queue.finish(job.id, "failed", reason)
        dest = self.spool.fail_job_dir(job.id, reason)
        log.warning("job %s (study %s) failed: %s; data kept in %s", job.id, anon(job.study_uid),
                    reason.splitlines()[0], dest)
