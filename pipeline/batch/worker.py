"""What one batch worker does per study: load (in the prefetch thread), run, make a manifest line.

The same functions serve the in-process worker, the worker processes of ``--workers N`` and
the Ray actors. A study's failure becomes a ``failed`` manifest entry, never an exception.
Factories are given as ``"module:attribute"`` strings so settings pickle to other processes.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.batch.discover import Study
from pipeline.batch.manifest import ManifestEntry, now_iso, safe_reason
from pipeline.errors import InputError
from pipeline.logs import anon
from pipeline.study import StudyOptions

log = logging.getLogger("osteoplan.batch")


@dataclass(frozen=True)
class Task:
    """One study to do, with its input fingerprint (computed by the driver)."""

    study: Study
    fingerprint: str


@dataclass(frozen=True)
class BatchSettings:
    """Everything a worker needs; picklable (for worker processes and Ray actors)."""

    out: Path
    options: StudyOptions
    options_digest: str
    run_id: str
    prefetch: int = 2
    runner_factory: str = "pipeline.study:StudyRunner"
    loader: str = "pipeline.batch.worker:load_study"
    extra: dict[str, Any] = field(default_factory=dict)


def resolve(ref: str) -> Callable[..., Any]:
    """``"pkg.module:name"`` -> the object."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def make_runner(settings: BatchSettings, options: StudyOptions | None = None) -> Any:
    """Build the (expensive) runner once per worker: model weights, configs."""
    return resolve(settings.runner_factory)(options or settings.options)


def max_voxels(runner: Any) -> int | None:
    try:
        return int(runner.config.memory.max_input_voxels)
    except AttributeError:
        return None


def load_study(study: Study, options: StudyOptions, max_voxels: int | None = None) -> Any:
    """Read and decode one study into a Volume (HU + geometry)."""
    if study.kind == "unreadable":
        raise InputError(study.error or "input cannot be read")
    limit = {"max_voxels": max_voxels} if max_voxels else {}
    if study.kind == "dicom":
        from pipeline.io.load import load_dicom_files

        return load_dicom_files(list(study.files), series_uid=options.series_uid, **limit)
    from pipeline.io.load import load_input

    return load_input(Path(study.input_path), series_uid=options.series_uid, **limit)


def make_loader(settings: BatchSettings, runner: Any) -> Callable[[Task], Any]:
    loader = resolve(settings.loader)
    limit = max_voxels(runner)

    def load(task: Task) -> Any:
        return loader(task.study, settings.options, limit)

    return load


def process(runner: Any, task: Task, settings: BatchSettings, volume: Any = None,
            load_error: BaseException | None = None, load_s: float = 0.0, worker: str = "",
            options: StudyOptions | None = None, attempts: int = 1) -> ManifestEntry:
    """Run one loaded study; any failure becomes a ``failed`` entry (reason without identity)."""
    study = task.study
    entry = ManifestEntry(study=study.key, kind=study.kind, input=study.rel, fingerprint=task.fingerprint,
                          options=settings.options_digest, status="failed", attempts=attempts,
                          worker=worker or f"pid{os.getpid()}", run_id=settings.run_id)
    t0 = time.perf_counter()
    if load_error is None and volume is None and study.kind == "unreadable":
        load_error = InputError(study.error or "input cannot be read")
    if load_error is not None:
        entry.reason = safe_reason(load_error)
        _log_failure(study, load_error)
    else:
        try:
            result = runner.run(Path(study.input_path), Path(settings.out) / study.out_subdir,
                                options or settings.options, volume=volume)
            entry.status = "ok"
            entry.study = Path(result.study_dir).name
            entry.output = _relative(Path(result.study_dir), Path(settings.out))
            entry.n_lesions = len(result.report.get("lesions", []))
        except Exception as exc:  # noqa: BLE001 - failure isolation: record and go on
            entry.reason = safe_reason(exc)
            _log_failure(study, exc)
    run_s = time.perf_counter() - t0
    entry.timings_s = {"load": round(load_s, 3), "run": round(run_s, 3), "total": round(load_s + run_s, 3)}
    entry.finished_at = now_iso()
    return entry


def _log_failure(study: Study, exc: BaseException) -> None:
    from pipeline.errors import OsteoplanError

    log.warning("study %s (%s) failed: %s", anon(study.key), study.kind, safe_reason(exc))
    if not isinstance(exc, OsteoplanError):
        log.info("traceback for study %s", anon(study.key), exc_info=exc)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
