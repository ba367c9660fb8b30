#!/usr/bin/env python
"""osteoplan benchmark: every stage of one study, against a plain MONAI pipeline on the same model.

On a generated CT (default 512x512x300, cached in out/bench/<size>/) it measures, each part in its
own process so that memory peaks and one-time costs stay apart:

- ours, default and --fast mode: wall time, CPU time and peak RSS of each stage of
  ``StudyRunner.run`` (load, preprocess, inference, postprocess, measure, plan, write with its
  write_* parts), end to end, plus import and model-load time of a fresh process. On CUDA one
  warm-up run comes first, GPU memory peaks are reported and a small batch gives studies/s.
- the baseline a MONAI user would write by default: LoadImaged (PydicomReader on the series
  folder), EnsureChannelFirstd/Orientationd/Spacingd/ScaleIntensityRanged,
  ``sliding_window_inference`` (roi = the bundle's training patch size, sw_batch_size=1,
  overlap 0.25, constant blending), Activationsd(softmax) -> Invertd -> AsDiscreted(argmax) on the
  original grid, then lesion-canal distances from a whole-volume ``distance_transform_edt``.
- DICOM loading against reading the files' raw bytes (cold-ish: pages dropped with
  posix_fadvise(DONTNEED) first; warm, the volume's memory recycled from the previous load as in
  a batch worker or listener; and warm with fresh memory, as the first load of a process).
- the distance stage against a whole-volume EDT on the same label map (the phantom's true labels,
  and the model's own labels when they hold lesions and a canal): same centre-to-centre distance
  within 0.01 mm, and the speed ratio.

It prints a table with ratios and target checks, and writes the numbers to
out/bench/results/bench-<date>-<device>.json. Usage:

    python scripts/bench.py [--size full|bench400|small|512,512,300] [--device cpu|cuda|auto]
                            [--modes default,fast] [--repeat N] [--skip-baseline] [--batch N]

The baseline's MONAI reader orders slices by InstanceNumber, which the phantom shuffles on
purpose (our loader sorts by position), so the baseline reads an otherwise identical copy of the
series with ordered instance numbers (out/bench/<size>/baseline_ct/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = {"small": (176, 160, 56), "full": (512, 512, 300), "bench400": (512, 512, 400), "tiny": (80, 72, 28)}
TINY_SPACING = (2.2, 2.2, 3.0)  # "tiny" is for the smoke test only (generated here, not by `osteoplan samples`)
STAGES = ("load", "preprocess", "inference", "postprocess", "measure", "plan", "write")
TARGETS = {"e2e_default_s": 45.0, "e2e_fast_s": 15.0, "speedup_vs_baseline": 3.0, "peak_rss_gb": 4.0,
           "distance_speedup": 20.0, "distance_tol_mm": 0.01, "load_vs_bytes": 2.0}
IO_ROWS = ("cold", "warm", "warm_fresh")  # the bytes worker's rows (see worker_bytes)


# --------------------------------------------------------------------------------------------
# measurement helpers (used inside worker processes)
# --------------------------------------------------------------------------------------------

class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; attributes peaks to open stages.

    Stages nest (``write`` holds ``write_seg``...): a sample counts for every open stage. Each
    stage also gets a sample when it opens and when it closes, so short stages are not missed.
    """

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._open: list[str] = []
        self._lock = threading.Lock()
        self.peak: dict[str, int] = {}
        self.start_rss: dict[str, int] = {}
        self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        with self._lock:
            self.overall = max(self.overall, rss)
            for name in self._open:
                self.peak[name] = max(self.peak.get(name, 0), rss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def enter(self, name: str) -> None:
        with self._lock:
            self._open.append(name)
            self.start_rss.setdefault(name, self._proc.memory_info().rss)
        self._sample()

    def exit(self, name: str) -> None:
        self._sample()
        with self._lock:
            if name in self._open:
                self._open.remove(name)

    def reset(self) -> None:
        with self._lock:
            self.peak.clear()
            self.start_rss.clear()
            self.overall = self._proc.memory_info().rss

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


@dataclass
class StageLog:
    """Wall (s), CPU (s, all threads of the process) and peak RSS (bytes) per stage name."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    new_process_peak: dict[str, float] = field(default_factory=dict)  # GB, from getrusage (exact)

    def as_dict(self) -> dict[str, Any]:
        return {"wall_s": {k: round(v, 4) for k, v in self.wall.items()},
                "cpu_s": {k: round(v, 4) for k, v in self.cpu.items()},
                "peak_rss_gb": {k: round(v / 1e9, 3) for k, v in self.peak_rss.items()},
                "new_process_peak_gb": {k: round(v, 3) for k, v in self.new_process_peak.items()}}

    def close(self, name: str, peak_before: float, sampled: int) -> None:
        """Record the stage's sampled peak, and the kernel's process peak if the stage raised it."""
        self.peak_rss[name] = sampled
        after = maxrss_gb()
        if after > peak_before + 1e-3:
            self.new_process_peak[name] = after


class Probe:
    """Times stages (wall + CPU) and tracks their RSS peaks; optional CUDA synchronisation."""

    def __init__(self, cuda: bool = False) -> None:
        self.sampler = RssSampler()
        self.cuda = cuda
        self.log = StageLog()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        self.sampler.enter(name)
        peak0 = maxrss_gb()
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.log.wall[name] = self.log.wall.get(name, 0.0) + time.perf_counter() - w0
            self.log.cpu[name] = self.log.cpu.get(name, 0.0) + time.process_time() - c0
            self.sampler.exit(name)
            self.log.close(name, peak0, self.sampler.peak.get(name, 0))

    def new_run(self) -> StageLog:
        self.sampler.reset()
        self.log = StageLog()
        return self.log


def instrument_study_timer(probe: Probe) -> None:
    """Make ``pipeline.study.Timer.stage`` also record CPU time and RSS peaks into ``probe``.

    The study's own wall timings (report["timings_s"]) stay what they are; on CUDA the stage
    is synchronised before the study's timer stops, so GPU work is inside the stage.
    """
    from pipeline.study import Timer

    original = Timer.stage
    if getattr(original, "_bench", False):
        return

    @contextmanager
    def stage(self: Any, name: str) -> Iterator[None]:
        probe.sampler.enter(name)
        peak0 = maxrss_gb()
        c0 = time.process_time()
        try:
            with original(self, name):
                try:
                    yield
                finally:
                    probe.sync()
        finally:
            probe.log.cpu[name] = probe.log.cpu.get(name, 0.0) + time.process_time() - c0
            probe.sampler.exit(name)
            probe.log.close(name, peak0, probe.sampler.peak.get(name, 0))

    stage._bench = True  # type: ignore[attr-defined]
    Timer.stage = stage  # type: ignore[method-assign]


def maxrss_gb() -> float:
    """Peak RSS of this process so far (kernel's count; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def parse_size(text: str) -> str:
    """'full' | 'bench400' | 'small' | 'X,Y,Z' (one of their shapes) -> the size name."""
    if text in SIZES:
        return text
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    for name, s in SIZES.items():
        if s == shape:
            return name
    raise SystemExit(f"--size {text}: expected one of {', '.join(SIZES)} or "
                     f"{' | '.join(','.join(map(str, s)) for s in SIZES.values())}")


@dataclass(frozen=True)
class BenchData:
    root: Path
    study: Path  # the phantom study folder (shuffled file names and instance numbers)
    baseline_series: Path  # the same CT series with ordered instance numbers, for MONAI's reader
    truth: Path  # labels.npz on the CT grid


def ensure_data(cache: Path, size: str) -> BenchData:
    """Generate the benchmark study once into ``cache/size`` and reuse it afterwards."""
    root = cache / size
    data = BenchData(root, root / "phantom01", root / "baseline_ct", root / "truth" / "phantom01" / "labels.npz")
    if (root / ".complete").is_file():
        return data
    print(f"generating the {size} benchmark study into {root} (once; a few minutes)...", flush=True)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from pipeline.io.dicom_write import write_ct_series
    from pipeline.io.load import load_input
    from pipeline.train.samples import write_samples

    t0 = time.perf_counter()
    if size == "tiny":
        _write_tiny(root)
    else:
        write_samples(root, n=1, seed=0, size=size)
    vol = load_input(data.study)
    write_ct_series(vol.array, vol.geometry, data.baseline_series, file_names="instance",
                    instance_numbers="ordered", study_uid=vol.dicom.study_instance_uid if vol.dicom else None,
                    seed=0)
    (root / ".complete").write_text(json.dumps({"size": size, "seconds": round(time.perf_counter() - t0, 1)}))
    return data


def _write_tiny(root: Path) -> None:
    """A tiny phantom study laid out like ``write_samples``' (study folder + truth labels)."""
    import numpy as np

    from pipeline.io.dicom_write import write_ct_series
    from pipeline.train.phantom import make_phantom
    from pipeline.train.samples import designed_lesions

    rng = np.random.default_rng(0)
    ph = make_phantom(int(rng.integers(0, 2**31 - 1)), shape=SIZES["tiny"], spacing=TINY_SPACING,
                      orientation="HFS", lesions=designed_lesions(rng))
    write_ct_series(np.round(ph.hu).astype(np.int16), ph.geometry, root / "phantom01" / "ct", file_names="random",
                    instance_numbers="shuffled", seed=0)
    truth = root / "truth" / "phantom01"
    truth.mkdir(parents=True)
    np.savez_compressed(truth / "labels.npz", labels=ph.labels, affine_lps=ph.geometry.affine_lps)


# --------------------------------------------------------------------------------------------
# workers (each runs in its own process and writes one JSON file)
# --------------------------------------------------------------------------------------------

def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    """StudyRunner on the study, per-stage wall/CPU/RSS; warm-up and batch throughput on CUDA."""
    t0 = time.perf_counter()
    import torch

    from pipeline.study import StudyOptions, StudyRunner
    t_import = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    probe = Probe(cuda=cuda)
    instrument_study_timer(probe)
    opts = StudyOptions(device=args.device, fast=args.mode == "fast")
    t1 = time.perf_counter()
    runner = StudyRunner(opts)
    t_init = time.perf_counter() - t1
    data = BenchData(**{k: Path(v) for k, v in json.loads(args.data).items()})
    out_root = Path(args.workdir) / f"ours-{args.mode}"
    result: dict[str, Any] = {"mode": args.mode, "device": str(runner.segmenter.device),
                              "import_s": round(t_import, 3), "runner_init_s": round(t_init, 3),
                              "threads": torch.get_num_threads(), "runs": []}
    if cuda or args.warmup:
        w = time.perf_counter()
        runner.run(data.study, out_root / "warmup", opts)
        result["warmup_s"] = round(time.perf_counter() - w, 3)
    for r in range(args.repeat):
        log = probe.new_run()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        probe.sync()
        load0 = os.getloadavg()
        w, c = time.perf_counter(), time.process_time()
        res = runner.run(data.study, out_root / "runs", opts)
        probe.sync()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        run = {"run_wall_s": round(wall, 3), "run_cpu_s": round(cpu, 3), "timings_s": res.report["timings_s"],
               **log.as_dict(), "run_peak_rss_gb": round(probe.sampler.overall / 1e9, 3),
               "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "lesions": [{"id": les["id"], "min_distance_to_canal_mm": les.get("min_distance_to_canal_mm")}
                           for les in res.report.get("lesions", [])]}
        if cuda:
            run["cuda_max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        result["runs"].append(run)
        if r == 0:
            result["label_counts"] = [int(x) for x in _bincount(res.segmentation.labels)]
            if args.labels_out:
                import numpy as np

                np.save(args.labels_out, res.segmentation.labels)
    if args.batch > 0:
        w = time.perf_counter()
        for i in range(args.batch):
            runner.run(data.study, out_root / f"batch{i}", opts)
        probe.sync()
        wall = time.perf_counter() - w
        result["batch"] = {"studies": args.batch, "wall_s": round(wall, 3),
                           "studies_per_s": round(args.batch / wall, 4), "note": "one StudyRunner, same input"}
    result["process_maxrss_gb"] = round(maxrss_gb(), 3)
    return result


def _bincount(labels: Any) -> list[int]:
    """Voxels per label 0..3 without an int64 copy of the map (np.bincount would make one)."""
    import numpy as np

    labels = np.asarray(labels)
    return [int(np.count_nonzero(labels == v)) for v in range(4)]


def worker_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The plain MONAI pipeline, stage by stage, on the same bundle (see the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )
    from scipy import ndimage

    from pipeline.segment.bundle import load_bundle
    from pipeline.segment.segmenter import pick_device
    t_import = time.perf_counter() - t0
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    probe = Probe(cuda=cuda)
    data = BenchData(**{k: Path(v) for k, v in json.loads(args.data).items()})
    t1 = time.perf_counter()
    bundle = load_bundle("osteoplan-spine")
    net = bundle.network.to(device).eval()
    t_init = time.perf_counter() - t1
    md = bundle.metadata
    lo, hi = md["intensity"].get("clip", [-1000, 2000])
    scale = float(md["intensity"].get("scale", 1000.0))
    patch = tuple(int(s) for s in md["patch_size"])
    pre = Compose([
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="LPS"),
        Spacingd(keys="image", pixdim=tuple(md["target_spacing_mm"]), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=lo / scale, b_max=hi / scale, clip=True),
    ])
    post = Compose([
        Activationsd(keys="pred", softmax=True),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
    ])
    load = LoadImaged(keys="image", reader="PydicomReader")
    runs = []
    for _ in range(args.repeat):
        log = probe.new_run()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        load0 = os.getloadavg()
        w, c = time.perf_counter(), time.process_time()
        with probe.stage("load"):
            d = load({"image": str(data.baseline_series)})
        spacing = tuple(float(s) for s in d["image"].pixdim[:3])
        with probe.stage("preprocess"):
            d = pre(d)
        with probe.stage("inference"), torch.inference_mode():
            x = d["image"][None].to(device)
            pred = sliding_window_inference(x, roi_size=patch, sw_batch_size=1, predictor=net, overlap=0.25,
                                            mode="constant")
            d["pred"] = pred[0]
        with probe.stage("postprocess"):
            d = post(d)
            labels = d["pred"][0].cpu().numpy().astype(np.uint8)
        del d, x, pred
        with probe.stage("distance"):
            canal = labels == 1
            comp, n = ndimage.label(labels == 2, structure=np.ones((3, 3, 3), bool))
            dists = []
            if canal.any():  # the distance map is made whenever there is a canal, then read at lesions
                edt = ndimage.distance_transform_edt(~canal, sampling=spacing)
                if n:
                    mins = ndimage.minimum(edt, comp, index=np.arange(1, n + 1))
                    dists = [round(float(v), 4) for v in np.atleast_1d(mins)]
                del edt
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        run = {"run_wall_s": round(wall, 3), "run_cpu_s": round(cpu, 3), **log.as_dict(),
               "run_peak_rss_gb": round(probe.sampler.overall / 1e9, 3),
               "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "labels_shape": list(labels.shape), "label_counts": [int(v) for v in _bincount(labels)],
               "lesion_components": int(n), "edt_distances_mm": dists, "reader_spacing_mm": spacing}
        if cuda:
            run["cuda_max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        runs.append(run)
    return {"import_s": round(t_import, 3), "model_init_s": round(t_init, 3), "device": str(device),
            "roi": list(patch), "runs": runs, "process_maxrss_gb": round(maxrss_gb(), 3)}


def _drop_cache(path: Path) -> bool:
    """Ask the kernel to drop ``path``'s clean pages from the page cache (no root needed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False
    finally:
        os.close(fd)


def worker_bytes(args: argparse.Namespace) -> dict[str, Any]:
    """Raw bytes of every file vs our load stage, cold-ish (pages dropped first) and warm."""
    from pipeline.io.arena import ARENA, DEFAULT_SLOTS
    from pipeline.io.load import load_input

    data = BenchData(**{k: Path(v) for k, v in json.loads(args.data).items()})
    files = sorted(p for p in data.study.rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in files)

    def read_all() -> int:
        total = 0
        for p in files:
            with open(p, "rb", buffering=0) as fh:
                total += len(fh.read())
        return total

    def drop() -> bool:
        os.sync()  # dirty pages (a freshly generated study) cannot be dropped
        return all([_drop_cache(p) for p in files])

    out: dict[str, Any] = {"files": len(files), "bytes": nbytes}
    for label in IO_ROWS:
        results: dict[str, list[float]] = {"bytes_s": [], "load_s": [], "load_cpu_s": []}
        ARENA.slots = 0 if label == "warm_fresh" else DEFAULT_SLOTS  # fresh: as the first load of a process
        for _ in range(args.repeat_io):
            if label == "cold":
                out["dropped"] = drop()
            w = time.perf_counter()
            read_all()
            results["bytes_s"].append(time.perf_counter() - w)
            if label == "cold":
                drop()
            w, c = time.perf_counter(), time.process_time()
            vol = load_input(data.study)
            results["load_s"].append(time.perf_counter() - w)
            results["load_cpu_s"].append(time.process_time() - c)
            del vol
        ARENA.slots = DEFAULT_SLOTS
        out[label] = {k: round(min(v), 4) for k, v in results.items()}
        out[label]["ratio"] = round(out[label]["load_s"] / max(out[label]["bytes_s"], 1e-9), 2)
        # the spread on a shared machine: the ratio of the medians, and of each load to its own read
        out[label]["median_ratio"] = round(statistics.median(results["load_s"]) /
                                           max(statistics.median(results["bytes_s"]), 1e-9), 2)
        pairs = [ld / max(b, 1e-9) for ld, b in zip(results["load_s"], results["bytes_s"])]
        out[label]["pair_ratio_range"] = [round(min(pairs), 2), round(max(pairs), 2)]
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def worker_distance(args: argparse.Namespace) -> dict[str, Any]:
    """Our distance stage vs a whole-volume EDT on the same label maps (truth, and the model's)."""
    import numpy as np
    from scipy import ndimage

    from pipeline.config import load_inference_config
    from pipeline.io.load import load_input
    from pipeline.measure.canal import extract_canal
    from pipeline.measure.distance import VoxelSurface, min_box_distance, min_centre_distance
    from pipeline.measure.lesions import _components, _label_slices, measure_lesions
    from pipeline.plan.engine import load_rules
    from pipeline.types import CANAL, LESION, Geometry, ModelInfo, Segmentation

    data = BenchData(**{k: Path(v) for k, v in json.loads(args.data).items()})
    vol = load_input(data.study)
    rules = load_rules()
    post = load_inference_config().postprocess
    maps: dict[str, np.ndarray] = {}
    truth = np.load(data.truth)
    affine = truth["affine_lps"]
    tgeom = Geometry(shape=truth["labels"].shape, spacing=tuple(np.linalg.norm(affine[:3, :3], axis=0)),
                     origin=tuple(affine[:3, 3]),
                     direction=affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    if not tgeom.same_grid(vol.geometry):
        raise SystemExit("truth labels are not on the loaded volume's grid")
    maps["truth"] = np.asarray(truth["labels"], dtype=np.uint8)
    if args.labels_in and Path(args.labels_in).is_file():
        maps["model"] = np.load(args.labels_in)
    geom = vol.geometry
    out: dict[str, Any] = {}
    for name, labels in maps.items():
        seg = Segmentation(labels=labels, geometry=geom, model=ModelInfo("bench", "0", "", (1.5, 1.5, 1.5)))
        w, c = time.perf_counter(), time.process_time()
        lesions, canal_summary = measure_lesions(vol, seg, post, rules)
        t_measure, c_measure = time.perf_counter() - w, time.process_time() - c
        if not lesions or not canal_summary.found:
            out[name] = {"lesions": len(lesions), "canal": canal_summary.found,
                         "note": "no lesion or no canal: nothing to compare", "measure_s": round(t_measure, 4)}
            continue
        # the distance part alone: label boxes, canal surface + KD-tree, lesion components and queries
        w = time.perf_counter()
        boxes = _label_slices(labels)
        canal = extract_canal(labels, geom, boxes[CANAL], post.keep_largest_canal_component,
                              rules.measurement.canal.min_component_fraction)
        comps = _components(labels, boxes[LESION], geom, post.min_lesion_volume_ml)
        ours_centre, ours_box = [], []
        for mask, offset in comps:
            s = VoxelSurface.from_mask(mask, geom.spacing, offset)
            ours_box.append(min_box_distance(s, canal.surface, geom).distance_mm)
            ours_centre.append(min_centre_distance(s, canal.surface).distance_mm)
        t_distance = time.perf_counter() - w
        # the whole-volume EDT of the same canal voxels (the components the canal step keeps)
        w, c = time.perf_counter(), time.process_time()
        canal_mask = _kept_canal(labels, post.keep_largest_canal_component,
                                 rules.measurement.canal.min_component_fraction)
        edt = ndimage.distance_transform_edt(~canal_mask, sampling=geom.spacing)
        edt_min = []
        for mask, offset in comps:
            crop = tuple(slice(o, o + n) for o, n in zip(offset, mask.shape))
            edt_min.append(float(edt[crop][mask].min()))
        t_edt, c_edt = time.perf_counter() - w, time.process_time() - c
        del edt
        report_centre = [les.features.get("centre_distance_to_canal_mm") for les in lesions]
        diffs = [abs(a - b) for a, b in zip(ours_centre, edt_min)]
        out[name] = {
            "lesions": len(lesions), "canal_surface_voxels": len(canal.surface) if canal.surface else 0,
            "measure_s": round(t_measure, 4), "measure_cpu_s": round(c_measure, 4),
            "distance_s": round(t_distance, 4), "edt_s": round(t_edt, 4), "edt_cpu_s": round(c_edt, 4),
            "speedup_distance": round(t_edt / max(t_distance, 1e-9), 1),
            "speedup_measure": round(t_edt / max(t_measure, 1e-9), 1),
            "centre_mm": [round(v, 4) for v in ours_centre], "edt_mm": [round(v, 4) for v in edt_min],
            "report_centre_mm": report_centre, "box_gap_mm": [round(v, 4) for v in ours_box],
            "max_abs_diff_mm": round(max(diffs), 6),
            "report_matches": all(r is not None and abs(r - e) <= TARGETS["distance_tol_mm"]
                                  for r, e in zip(report_centre, edt_min)),
        }
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _kept_canal(labels: Any, keep_largest: bool, min_fraction: float) -> Any:
    """Full-grid mask of the canal voxels that ``extract_canal`` keeps (same rule)."""
    import numpy as np
    from scipy import ndimage

    mask = labels == 1
    if not keep_largest or not mask.any():
        return mask
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(comp, keep)


WORKERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ours": worker_ours, "baseline": worker_baseline, "bytes": worker_bytes, "distance": worker_distance}


# --------------------------------------------------------------------------------------------
# orchestration and report
# --------------------------------------------------------------------------------------------

def run_worker(kind: str, args: argparse.Namespace, data: BenchData, extra: list[str], timeout: float) -> dict[str, Any]:
    """Run one worker in a fresh Python process; its JSON result (or an error entry)."""
    out = Path(args.workdir) / f"{kind}-{'-'.join(e.lstrip('-') for e in extra if not e.startswith('/'))}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--json-out", str(out),
           "--data", json.dumps({k: str(v) for k, v in data.__dict__.items()}), "--device", args.device,
           "--repeat", str(args.repeat), "--workdir", str(args.workdir), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    w = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    result = json.loads(out.read_text())
    result["process_wall_s"] = round(time.perf_counter() - w, 3)
    return result


def machine_info() -> dict[str, Any]:
    import monai
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
        mem_gb = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        physical, mem_gb = None, None
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "host_cpu": cpu, "logical_cpus": os.cpu_count(),
        "physical_cores": physical, "memory_gb": mem_gb, "python": platform.python_version(),
        "torch": torch.__version__, "monai": monai.__version__, "commit": _git_commit(),
        "torch_threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _first(result: dict[str, Any]) -> dict[str, Any] | None:
    runs = result.get("runs") or []
    return runs[0] if runs else None


def _best(result: dict[str, Any], key: str, stage: str | None = None) -> float | None:
    """Smallest value over the repeats (wall/cpu of a stage, or of the whole run)."""
    vals = []
    for run in result.get("runs") or []:
        v = run.get(key) if stage is None else run.get(key, {}).get(stage)
        if v is not None:
            vals.append(float(v))
    return min(vals) if vals else None


def _fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if (a is None or b is None or a <= 0) else f"{b / a:.1f}x"


def build_report(results: dict[str, Any], args: argparse.Namespace) -> tuple[str, dict[str, bool]]:
    """Markdown tables (stages, I/O, distance, targets) and the target verdicts."""
    lines: list[str] = []
    m = results["machine"]
    lines.append(f"Machine: {m['host_cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores), "
                 f"{m['memory_gb']} GB; torch {m['torch']} ({m['torch_threads']} threads), monai {m['monai']}, "
                 f"Python {m['python']}{', GPU ' + m['gpu'] if m.get('gpu') else ''}")
    lines.append(f"Date {m['date']}, commit {m['commit']}, device {args.device}, size {args.size} "
                 f"{SIZES[args.size]}, repeats {args.repeat}; load average at start {m['loadavg']}")
    lines.append("")
    ours = {mode: results.get(f"ours_{mode}", {}) for mode in args.modes}
    base = results.get("baseline", {})
    cols = [mode for mode in args.modes if _first(ours[mode])]
    header = "| stage | " + " | ".join(f"ours {c}: wall s / CPU s / peak RSS GB" for c in cols)
    if _first(base):
        header += " | baseline: wall s / CPU s / peak RSS GB | speed-up (wall, default) |"
    else:
        header += " |"
    lines.append(header)
    lines.append("|" + "---|" * (header.count("|") - 1))
    base_map = {"load": "load", "preprocess": "preprocess", "inference": "inference", "postprocess": "postprocess",
                "measure": "distance"}
    for stage in STAGES + ("write_nifti", "write_seg", "write_sr", "write_html", "write_csv"):
        row = f"| {stage} |"
        present = False
        for c in cols:
            w = _best(ours[c], "timings_s", stage)
            cpu = _best(ours[c], "cpu_s", stage)
            rss = _best(ours[c], "peak_rss_gb", stage)
            present |= w is not None
            row += f" {_fmt(w)} / {_fmt(cpu)} / {_fmt(rss)} |"
        if _first(base):
            bs = base_map.get(stage)
            bw = _best(base, "wall_s", bs) if bs else None
            row += (f" {_fmt(bw)} / {_fmt(_best(base, 'cpu_s', bs) if bs else None)} / "
                    f"{_fmt(_best(base, 'peak_rss_gb', bs) if bs else None)} |")
            ow = _best(ours.get("default", {}), "timings_s", stage) if "default" in cols else None
            row += f" {_ratio(ow, bw)} |"
        if present:
            lines.append(row)
    row = "| **end to end** (run) |"
    for c in cols:
        row += (f" **{_fmt(_best(ours[c], 'timings_s', 'total'))}** / {_fmt(_best(ours[c], 'run_cpu_s'))} / "
                f"{_fmt(max(r['run_peak_rss_gb'] for r in ours[c]['runs']))} |")
    e2e_default = _best(ours.get("default", {}), "timings_s", "total") if "default" in cols else None
    base_e2e = _best(base, "run_wall_s") if _first(base) else None
    if _first(base):
        row += (f" **{_fmt(base_e2e)}** / {_fmt(_best(base, 'run_cpu_s'))} / "
                f"{_fmt(max(r['run_peak_rss_gb'] for r in base['runs']))} | **{_ratio(e2e_default, base_e2e)}** |")
    lines.append(row)
    row = "| process: imports + model load |"
    for c in cols:
        row += f" {_fmt(ours[c].get('import_s'))} + {_fmt(ours[c].get('runner_init_s'))} s |"
    if _first(base):
        row += f" {_fmt(base.get('import_s'))} + {_fmt(base.get('model_init_s'))} s | |"
    lines.append(row)
    lines.append("")
    lines.append("Stage peaks are sampled RSS (5 ms) while the stage runs, process-wide (the model, the"
                 " loaded volume and earlier stages' results included). CPU s = process CPU time (all"
                 " threads). The baseline writes no output files; ours writes all six formats.")
    for c in cols:
        r = _first(ours[c])
        peaks = ", ".join(f"{k} {v} GB" for k, v in r.get("new_process_peak_gb", {}).items()) or "none"
        lines.append(f"- ours {c}: process peak RSS {ours[c].get('process_maxrss_gb')} GB (stages that raised the"
                     f" kernel's process peak in the run: {peaks}); load average "
                     f"{r['loadavg_before']} -> {r['loadavg_after']}; lesions {r['lesions']}"
                     + (f"; warm-up {ours[c]['warmup_s']} s" if 'warmup_s' in ours[c] else "")
                     + (f"; CUDA max allocated {r['cuda_max_memory_allocated_gb']} GB"
                        if 'cuda_max_memory_allocated_gb' in r else ""))
        if "batch" in ours[c]:
            b = ours[c]["batch"]
            lines.append(f"  - batch: {b['studies']} studies in {b['wall_s']} s = **{b['studies_per_s']} studies/s**"
                         f" ({b['note']})")
    if _first(base):
        r = _first(base)
        peaks = ", ".join(f"{k} {v} GB" for k, v in r.get("new_process_peak_gb", {}).items()) or "none"
        lines.append(f"- baseline: process peak RSS {base.get('process_maxrss_gb')} GB (raised by: {peaks});"
                     f" roi {base.get('roi')}; load"
                     f" average {r['loadavg_before']} -> {r['loadavg_after']}; labels {r['labels_shape']}; "
                     f"EDT distances {r['edt_distances_mm']}")
    elif "baseline" in results:
        lines.append(f"- baseline: {base.get('error', 'skipped')}")
    io = results.get("bytes", {})
    if "cold" in io:
        lines.append("")
        lines.append(f"DICOM load vs raw bytes ({io['files']} files, {io['bytes'] / 1e6:.0f} MB; cold-ish = pages"
                     f" dropped with posix_fadvise first{'' if io.get('dropped') else ', drop NOT confirmed'}):")
        lines.append("")
        lines.append("(warm = files in the page cache, the volume's memory recycled from the previous load as in a"
                     " batch worker or listener; warm_fresh = the same with fresh memory, as the first load of a"
                     " process)")
        lines.append("")
        lines.append("| | read bytes s | our load s (CPU s) | ratio (best of each) | ratio of medians; per pair |")
        lines.append("|---|---|---|---|---|")
        for label in (x for x in IO_ROWS if x in io):
            d = io[label]
            spread = (f"{d['median_ratio']}x; {d['pair_ratio_range'][0]}-{d['pair_ratio_range'][1]}x"
                      if "median_ratio" in d else "-")
            lines.append(f"| {label} | {d['bytes_s']:.3f} | {d['load_s']:.3f} ({d['load_cpu_s']:.3f}) | {d['ratio']}x"
                         f" | {spread} |")
    elif "bytes" in results:
        lines.append(f"- bytes: {io.get('error')}")
    dist = results.get("distance", {})
    lines.append("")
    for name in ("truth", "model"):
        d = dist.get(name)
        if not d:
            continue
        if "edt_s" not in d:
            lines.append(f"- distance on {name} labels: {d.get('note')}")
            continue
        lines.append(f"- distance on {name} labels ({d['lesions']} lesions): our distance part {d['distance_s']:.3f} s"
                     f" (whole measure stage {d['measure_s']:.3f} s) vs whole-volume EDT {d['edt_s']:.3f} s ->"
                     f" **{d['speedup_distance']}x** ({d['speedup_measure']}x vs the whole measure stage); centre"
                     f" distances {d['centre_mm']} vs EDT {d['edt_mm']}, max |diff| {d['max_abs_diff_mm']} mm;"
                     f" report field matches: {d['report_matches']}")
    if "error" in dist:
        lines.append(f"- distance: {dist['error']}")

    verdict: dict[str, bool] = {}
    if "default" in cols and e2e_default is not None:
        verdict[f"end to end default <= {TARGETS['e2e_default_s']:.0f} s"] = e2e_default <= TARGETS["e2e_default_s"]
    if "fast" in cols:
        e2e_fast = _best(ours["fast"], "timings_s", "total")
        verdict[f"end to end --fast <= {TARGETS['e2e_fast_s']:.0f} s"] = (e2e_fast or 1e9) <= TARGETS["e2e_fast_s"]
    if e2e_default is not None and base_e2e is not None:
        verdict[f">= {TARGETS['speedup_vs_baseline']:.0f}x faster than the baseline"] = (
            base_e2e / e2e_default >= TARGETS["speedup_vs_baseline"])
    if cols:
        peak = max(max(r["run_peak_rss_gb"] for r in ours[c]["runs"]) for c in cols)
        peak = max([peak] + [ours[c].get("process_maxrss_gb", 0) for c in cols])
        verdict[f"peak RSS <= {TARGETS['peak_rss_gb']:.0f} GB"] = peak <= TARGETS["peak_rss_gb"]
    d = dist.get("truth")
    if d and "edt_s" in d:
        verdict[f"distance >= {TARGETS['distance_speedup']:.0f}x faster than EDT, same result +-0.01 mm"] = (
            d["speedup_distance"] >= TARGETS["distance_speedup"] and d["max_abs_diff_mm"] <= TARGETS["distance_tol_mm"]
            and d["report_matches"])
    if "cold" in io:
        verdict[f"DICOM load within {TARGETS['load_vs_bytes']:.0f}x of reading the bytes (cold-ish)"] = (
            io["cold"]["ratio"] <= TARGETS["load_vs_bytes"])
        verdict[f"DICOM load within {TARGETS['load_vs_bytes']:.0f}x of reading the bytes (warm)"] = (
            io["warm"]["ratio"] <= TARGETS["load_vs_bytes"])
        if "warm_fresh" in io:
            verdict[f"DICOM load within {TARGETS['load_vs_bytes']:.0f}x of reading the bytes (warm, fresh memory: "
                    "our stricter check, which also counts the kernel zeroing the volume's new pages)"] = (
                io["warm_fresh"]["ratio"] <= TARGETS["load_vs_bytes"])
    lines.append("")
    lines.append("Targets:" if args.size == "full" and not args.device.startswith("cuda") else
                 "Targets (defined for --size full on the CPU; shown for information only):")
    for k, ok in verdict.items():
        lines.append(f"- [{'x' if ok else ' '}] {k}: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), verdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size", default="full",
                    help="full (512x512x300), bench400 (512x512x400), small, tiny (smoke test), or X,Y,Z")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--modes", default="default,fast", help="comma list of default,fast")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (best is reported)")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the MONAI baseline")
    ap.add_argument("--skip-distance", action="store_true", help="do not run the distance comparison")
    ap.add_argument("--batch", type=int, default=None, help="studies for the throughput run (default 3 on CUDA, 0 on CPU)")
    ap.add_argument("--warmup", action="store_true", help="one untimed run first (always on CUDA)")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "bench", help="where the study is generated once")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    # internal (worker processes)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--labels-out", help=argparse.SUPPRESS)
    ap.add_argument("--labels-in", help=argparse.SUPPRESS)
    ap.add_argument("--repeat-io", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        logging_quiet()
        result = WORKERS[args.worker](args)
        args.json_out.write_text(json.dumps(result, indent=1, default=str))
        return 0

    args.size = parse_size(args.size)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in ("default", "fast") for m in args.modes):
        raise SystemExit("--modes: a comma list of default, fast")
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    cuda = args.device.startswith("cuda")
    if args.batch is None:
        args.batch = 3 if cuda else 0
    if cuda or args.device == "auto":
        import torch

        if cuda and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device is available (torch {torch.__version__})")
    data = ensure_data(Path(args.cache), args.size)
    args.workdir = Path(args.cache) / "work"
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    results: dict[str, Any] = {"machine": machine_info(), "size": args.size, "shape": SIZES[args.size],
                               "device": args.device, "modes": args.modes}
    t_all = time.perf_counter()
    out_dir = Path(args.cache) / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"bench-{stamp}-{args.device.replace(':', '')}-{args.size}"

    def step(name: str, kind: str, extra: list[str]) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f} s] {name}...", flush=True)
        results[name] = run_worker(kind, args, data, extra, args.timeout)
        if "error" in results[name]:
            print(f"    {name}: {results[name]['error']}", flush=True)
        # the parts measured so far survive an interrupted run
        (out_dir / f"{stem}.partial.json").write_text(json.dumps(results, indent=1, default=str))

    labels_path = args.workdir / "model_labels.npy"
    step("bytes", "bytes", [])
    for mode in args.modes:
        extra = ["--mode", mode, "--batch", str(args.batch)]
        if args.warmup:
            extra.append("--warmup")
        if mode == args.modes[0]:
            extra += ["--labels-out", str(labels_path)]
        step(f"ours_{mode}", "ours", extra)
    if not args.skip_baseline:
        step("baseline", "baseline", [])
    if not args.skip_distance:
        step("distance", "distance", ["--labels-in", str(labels_path)])
    results["bench_wall_s"] = round(time.perf_counter() - t_all, 1)
    text, verdict = build_report(results, args)
    results["targets"] = verdict
    print()
    print(text)
    print(f"\n(benchmark wall time {results['bench_wall_s']} s)")
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    (out_dir / f"{stem}.partial.json").unlink(missing_ok=True)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print(f"results: {path}")
    return 0


def logging_quiet() -> None:
    """Workers: only warnings of our own on stderr; library chatter off."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


if __name__ == "__main__":
    sys.exit(main())
