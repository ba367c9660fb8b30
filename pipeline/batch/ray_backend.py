"""The Ray backend (``--ray ADDRESS|auto|local``): the same work spread over a Ray cluster.

Actors each hold one StudyRunner (one actor per GPU when the cluster has GPUs, else one per
CPU slot, or ``--workers N``); each study is one actor call. An actor runs two calls at a time
(``max_concurrency=2``): the load of the next study overlaps the inference of the current one,
which a lock keeps to one at a time. Outputs go to OUT with the same atomic writes, so OUT must
be storage that every node sees at the same path, and so must INPUT_ROOT. A failed study (or a
lost actor) is retried once, then recorded. Ray is an optional extra: ``osteoplan[ray]``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import asdict, replace
from typing import Any

from pipeline.batch.local import OnResult, OnStart, WorkerStartError
from pipeline.batch.manifest import ManifestEntry, now_iso, safe_reason
from pipeline.batch.worker import BatchSettings, Task, make_loader, make_runner, process
from pipeline.errors import InputError, OsteoplanError

log = logging.getLogger("osteoplan.batch")

MAX_ATTEMPTS = 2  # a failed study is retried once
IN_FLIGHT_PER_ACTOR = 2


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, an optional extra: pip install 'osteoplan[ray]'") from None
    return ray


class StudyActor:
    """Ray actor body: one runner (model loaded once), studies run one at a time."""

    def __init__(self, settings: BatchSettings, device: str | None, threads: int) -> None:
        self.settings = settings
        self.options = replace(settings.options, device=device) if device else settings.options
        self.error: tuple[str, int] | None = None
        self.lock = threading.Lock()
        self.name = f"ray-{os.uname().nodename}-pid{os.getpid()}"
        try:
            import torch

            self.runner = make_runner(settings, self.options)
            if threads > 0:  # after the runner: the Segmenter sets all cores for itself
                torch.set_num_threads(threads)
            self.load = make_loader(settings, self.runner)
        except OsteoplanError as exc:
            self.error = (str(exc), exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            self.error = (f"Ray actor could not start ({type(exc).__name__}: {safe_reason(exc)})", 4)

    def ready(self) -> tuple[str, int] | None:
        return self.error

    def run(self, task: Task, attempt: int) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        try:
            volume, error = self.load(task), None
        except Exception as exc:  # noqa: BLE001 - becomes a failed entry
            volume, error = None, exc
        load_s = time.perf_counter() - t0
        with self.lock:
            entry = process(self.runner, task, self.settings, volume, error, load_s, self.name, self.options,
                            attempts=attempt)
        return asdict(entry)


def run_ray(tasks: list[Task], settings: BatchSettings, address: str, workers: int | None,
            on_result: OnResult, on_start: OnStart | None = None) -> None:
    if not tasks:
        return
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address != "local":
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - e.g. no cluster at that address
            raise InputError(f"cannot connect to Ray at {address!r}: {safe_reason(exc)}") from None
        started_here = True
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        n_gpu, n_cpu = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if n_gpu and settings.options.device != "cpu":
            n = min(workers or n_gpu, n_gpu, len(tasks))
            opts, device, threads = {"num_gpus": 1, "num_cpus": 1}, (
                "cuda" if settings.options.device == "auto" else None), 0
        else:
            n = min(workers or n_cpu, len(tasks))
            cpus = max(1, n_cpu // n) if workers else 1
            opts, device, threads = {"num_cpus": cpus}, None, cpus
        actor_cls = ray.remote(StudyActor)
        actors = [actor_cls.options(max_concurrency=IN_FLIGHT_PER_ACTOR, **opts).remote(settings, device, threads)
                  for _ in range(n)]
        log.info("ray: %d actor(s) (%s)", n, opts)
        for err in ray.get([a.ready.remote() for a in actors]):
            if err is not None:
                raise WorkerStartError(*err)
        _dispatch(ray, actors, tasks, settings, on_result, on_start)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if started_here:
            ray.shutdown()


def _dispatch(ray: Any, actors: list[Any], tasks: list[Task], settings: BatchSettings, on_result: OnResult,
              on_start: OnStart | None) -> None:
    pending = deque(range(len(tasks)))
    attempts = [0] * len(tasks)
    inflight: dict[Any, tuple[int, int]] = {}  # object ref -> (actor index, task id)
    load = [0] * len(actors)
    alive = [True] * len(actors)
    while pending or inflight:
        for ai in range(len(actors)):
            while alive[ai] and pending and load[ai] < IN_FLIGHT_PER_ACTOR:
                tid = pending.popleft()
                attempts[tid] += 1
                if on_start is not None and attempts[tid] == 1:
                    on_start(tasks[tid])
                inflight[actors[ai].run.remote(tasks[tid], attempts[tid])] = (ai, tid)
                load[ai] += 1
        if not inflight:
            for tid in pending:  # no actor left alive
                on_result(_lost_entry(tasks[tid], settings, "no Ray actor left", attempts[tid]))
            return
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        ai, tid = inflight.pop(ref)
        load[ai] -= 1
        try:
            entry = ManifestEntry(**ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - the actor died (node lost, out of memory...)
            entry = _lost_entry(tasks[tid], settings, f"Ray actor lost: {safe_reason(exc)}", attempts[tid])
            if isinstance(exc, ray.exceptions.RayActorError) and alive[ai]:
                alive[ai] = False
                log.warning("ray actor %d lost; %d left", ai, sum(alive))
        if entry.status != "ok" and attempts[tid] < MAX_ATTEMPTS:
            log.info("retrying a failed study (attempt %d)", attempts[tid] + 1)
            pending.append(tid)
            continue
        on_result(entry)


def _lost_entry(task: Task, settings: BatchSettings, reason: str, attempts: int) -> ManifestEntry:
    s = task.study
    return ManifestEntry(study=s.key, kind=s.kind, input=s.rel, fingerprint=task.fingerprint,
                         options=settings.options_digest, status="failed", reason=reason[:300], attempts=attempts,
                         worker="ray", run_id=settings.run_id, finished_at=now_iso())
