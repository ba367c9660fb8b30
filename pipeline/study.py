"""run_study(): the one study function that the CLI, batch, Ray and PACS paths all call.

Volume -> Segmentation -> Lesions -> Recommendations -> writers. Results are written into a
temporary folder beside the final one and renamed into place, so a killed run never leaves a
half-written study folder.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pipeline.config import InferenceConfig, load_inference_config
from pipeline.errors import InputError
from pipeline.logs import anon
from pipeline.types import CanalSummary, Lesion, Recommendation, Segmentation, Volume

if TYPE_CHECKING:
    from pipeline.report.background import BackgroundCall
    from pipeline.report.seg import SourcePrefetch

log = logging.getLogger("osteoplan.study")

ALL_FORMATS = ("json", "csv", "nifti", "seg", "sr", "html")


@dataclass
class StudyOptions:
    device: str = "auto"
    fast: bool = False
    intent: str = "palliative"
    model: str | None = None  # bundle name/folder; None = the inference config's
    inference_config: Path | None = None
    rules_config: Path | None = None
    series_uid: str | None = None
    formats: tuple[str, ...] = ALL_FORMATS
    deidentify: bool = False


@dataclass
class StudyResult:
    study_dir: Path
    report: dict[str, Any]
    volume: Volume | None = None
    segmentation: Segmentation | None = None
    lesions: list[Lesion] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)


class Timer:
    """Collects wall time per stage (report.json ``timings_s``)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


class StudyRunner:
    """Holds what is expensive to set up (model weights, configs) across studies.

    Batch workers, Ray actors and the PACS worker create one runner and call ``run`` per study,
    so weights are loaded once per process, never per case.
    """

    def __init__(self, options: StudyOptions | None = None) -> None:
        from pipeline.plan.engine import load_rules
        from pipeline.segment.segmenter import Segmenter

        self.options = options or StudyOptions()
        self.config: InferenceConfig = load_inference_config(self.options.inference_config)
        self.rules = load_rules(self.options.rules_config)
        self.segmenter = Segmenter.from_bundle(
            self.options.model or self.config.model, device=self.options.device, config=self.config
        )
        self.studies_started = 0
        freeze_long_lived()

    def _before_study(self) -> None:
        """The first study imports and caches what later studies reuse (highdicom's tables, the
        writers...): from the second on, those are frozen too (``freeze_long_lived``)."""
        self.studies_started += 1
        if self.studies_started == 2:
            freeze_long_lived()

    def run(self, input_path: Path, output_root: Path, options: StudyOptions | None = None,
            volume: Volume | None = None, preload: BackgroundCall | None = None) -> StudyResult:
        """Analyse one study. ``volume`` may be pre-loaded (batch prefetch), or be loading in the
        background (``preload``, a call of ``_read_timed``: its wait is the "load" stage, its own
        duration "load_read"); else it is read here."""
        from pipeline.io.load import load_input
        from pipeline.measure.lesions import measure_lesions
        from pipeline.plan.engine import plan_study
        from pipeline.report.json_report import build_report

        opts = options or self.options
        self._before_study()
        timer = Timer()
        t_start = time.perf_counter()
        input_path = Path(input_path)
        if volume is None and preload is not None:
            with timer.stage("load"):  # what the study waited for: the rest overlapped the model's start
                volume, read_s = preload.result()
            timer.timings["load_read"] = round(read_s, 4)
        elif volume is None:
            with timer.stage("load"):
                volume = load_input(input_path, series_uid=opts.series_uid,
                                    max_voxels=self.config.memory.max_input_voxels)
        log.info("study %s: volume %s spacing %s", anon(volume.dicom.study_instance_uid if volume.dicom else None),
                 volume.geometry.shape, tuple(round(s, 3) for s in volume.geometry.spacing))
        from pipeline.report.writers import start_source_prefetch

        # SEG source headers (and highdicom's tables, first study) are read while the model runs
        sources = start_source_prefetch(volume, opts.formats, opts.deidentify)
        seg = self.segmenter.segment(volume, fast=opts.fast, timer=timer)
        with timer.stage("measure"):
            lesions, canal = measure_lesions(volume, seg, self.config.postprocess, self.rules)
        with timer.stage("plan"):
            recs = plan_study(lesions, self.rules, intent=opts.intent)
        if not canal.found:
            volume.warnings.append("spinal canal not found: distances to the canal could not be measured")
        if opts.fast:
            volume.warnings.append(fast_mode_warning(seg.model.spacing_mm, self.segmenter.spacing))
        report = build_report(volume, seg, lesions, recs, canal, intent=opts.intent, timings=timer.timings,
                              fast=opts.fast, deidentify=opts.deidentify, rules=self.rules)
        key = volume.study_key
        if opts.deidentify and volume.dicom is not None and volume.dicom.study_instance_uid:
            key = anon(volume.dicom.study_instance_uid)  # stable pseudonym: resume still works
        study_dir = Path(output_root) / _safe_name(key)
        with timer.stage("write"):
            _write_outputs(study_dir, volume, seg, lesions, recs, canal, report, opts, timer, t_start, sources)
        return StudyResult(study_dir, report, volume, seg, lesions, recs)


def freeze_long_lived() -> None:
    """Keep the objects alive now (modules, the model, configs) out of the cyclic garbage collector.

    A runner holds ~0.5M Python objects (PyTorch, MONAI, pydicom, highdicom) that live as long as
    the process. Without this, every few studies a full collection walks all of them: 0.3-0.4 s on
    the 2-core CPU, and the likely cause of the 0.5-0.7 s outliers seen on the GPU hosts, in
    whichever stage it lands (BENCHMARKS.md). Unreachable cycles are collected first
    (``gc.collect``), then the survivors go to the permanent generation (``gc.freeze``): later
    collections skip them, reference counting still frees them. A frozen object that later becomes
    part of a garbage cycle is never collected, so this runs only at two points (a runner's start
    and the start of its second study), never on the objects of later studies.
    """
    gc.collect()
    gc.freeze()


def fast_mode_warning(fast_mm: tuple[float, ...], default_mm: tuple[float, ...]) -> str:
    """The report's note on a --fast run: what the coarser grid costs, and what to do."""
    return (f"fast mode: segmented on a {_mm(fast_mm)} mm grid instead of {_mm(default_mm)} mm; small lesions can be "
            "missed and distances are less exact (MODEL_CARD.md, 'Fast mode'); run without --fast before planning")


def _mm(spacing: tuple[float, ...]) -> str:
    values = sorted({round(float(s), 2) for s in spacing})
    return "/".join(f"{v:g}" for v in values)


def run_study(input_path: Path, output_root: Path, options: StudyOptions | None = None,
              runner: StudyRunner | None = None) -> StudyResult:
    """Analyse one study end to end. Pass ``runner`` to reuse loaded weights across studies.

    Without a runner (``osteoplan run``), the study is read in a background thread while the
    runner starts (imports, model weights: seconds), so a study on slow storage costs little more
    than one already in memory. Its errors are raised as they would be when read in ``run``.
    """
    if runner is not None:
        return runner.run(input_path, output_root, options)
    from pipeline.report.background import BackgroundCall

    opts = options or StudyOptions()
    max_voxels = load_inference_config(opts.inference_config).memory.max_input_voxels
    preload = BackgroundCall(_read_timed, Path(input_path), opts.series_uid, max_voxels, name="osteoplan-preload")
    preload.start()
    runner = StudyRunner(opts)  # should it fail, the process ends with its error; the read is a daemon
    return runner.run(input_path, output_root, opts, preload=preload)


def _read_timed(input_path: Path, series_uid: str | None, max_voxels: int) -> tuple[Volume, float]:
    """``load_input``, and how long it took (the preload's "load_read")."""
    from pipeline.io.load import load_input

    t = time.perf_counter()
    volume = load_input(input_path, series_uid=series_uid, max_voxels=max_voxels)
    return volume, time.perf_counter() - t


def _safe_name(name: str) -> str:
    keep = "".join(c if (c.isalnum() or c in ".-_") else "_" for c in name)
    if not keep.strip("._"):
        raise InputError("cannot derive an output folder name from the input")
    return keep[:128]


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_outputs(study_dir: Path, volume: Volume, seg: Segmentation, lesions: list[Lesion],
                   recs: list[Recommendation], canal: CanalSummary, report: dict[str, Any],
                   opts: StudyOptions, timer: Timer, t_start: float,
                   sources: SourcePrefetch | None = None) -> None:
    """Write every requested output into a temp folder, then swap it into place.

    report.json is written once, last, with the write stage and the total time in it (the
    microseconds of the final rename are not counted); the report keeps that copy of the timings.
    """
    from pipeline.report import writers

    t_write = time.perf_counter()
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = study_dir.parent / f".{study_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writers.write_all(tmp, volume, seg, lesions, recs, canal, report, formats=opts.formats,
                          deidentify=opts.deidentify, timer=timer, sources=sources)
        now = time.perf_counter()
        report["timings_s"] = {**timer.timings, "write": round(timer.timings.get("write", 0.0) + now - t_write, 4),
                               "total": round(now - t_start, 4)}
        _atomic_json(tmp / "report.json", report)
        if study_dir.exists():
            old = study_dir.parent / f".{study_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(study_dir, old)
            os.replace(tmp, study_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, study_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
