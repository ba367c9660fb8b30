"""The local backend: one worker in this process, or ``--workers N`` worker processes.

Each worker builds one runner (model loaded once) and overlaps loading the next studies with
inference through a bounded prefetch. With N > 1 the workers are separate processes, each fed
through its own queue by the driver; the driver alone writes the manifest. Where the platform
has it, workers are forked from a fork server that has imported torch, MONAI and the pipeline
once (``WORKER_PRELOAD``), so N workers do not pay N imports; elsewhere they are spawned.
A worker that dies (killed, out of memory) fails only the study it was running: the studies it
had prefetched go back to the queue and a fresh worker takes its place.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections import deque
from dataclasses import asdict, replace
from typing import Any, Callable, Iterator

from pipeline.batch.manifest import ManifestEntry, now_iso
from pipeline.batch.prefetch import Prefetcher
from pipeline.batch.worker import BatchSettings, Task, make_loader, make_runner, process
from pipeline.errors import OsteoplanError
from pipeline.logs import anon

log = logging.getLogger("osteoplan.batch")

OnResult = Callable[[ManifestEntry], None]
OnStart = Callable[[Task], None]


# Imported once by the fork server; every worker forked from it starts with them. No CUDA is
# touched at import, so each worker still makes its own CUDA context.
WORKER_PRELOAD = ("torch", "pipeline.segment.segmenter", "pipeline.study", "pipeline.batch.worker",
                  "pipeline.batch.preload_frozen")  # last: freezes what the others imported


WORKER_START_ENV = "OSTEOPLAN_WORKER_START"  # "spawn" turns the fork server off (e.g. a platform where it misbehaves)


def worker_context() -> Any:
    """The multiprocessing context for batch workers: a preloading fork server, else spawn.

    ``OSTEOPLAN_WORKER_START=spawn`` in the environment asks for spawn (each worker imports
    everything itself, slower to start, as before the fork server).
    """
    wanted = os.environ.get(WORKER_START_ENV, "forkserver").strip().lower()
    if wanted not in ("forkserver", "spawn"):
        log.warning("%s=%r is neither forkserver nor spawn: using forkserver", WORKER_START_ENV, wanted)
        wanted = "forkserver"
    if wanted == "spawn" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(WORKER_PRELOAD))  # takes effect when the server first starts
    return ctx


class WorkerStartError(OsteoplanError):
    """A worker could not start (e.g. the model bundle is missing): nothing can run."""

    def __init__(self, message: str, exit_code: int = 4) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_local(tasks: list[Task], settings: BatchSettings, workers: int, on_result: OnResult,
              on_start: OnStart | None = None) -> None:
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        run_inprocess(tasks, settings, on_result, on_start)
    else:
        run_pool(tasks, settings, min(workers, len(tasks)), on_result, on_start)


def run_inprocess(tasks: list[Task], settings: BatchSettings, on_result: OnResult,
                  on_start: OnStart | None = None) -> None:
    runner = make_runner(settings)
    worker = f"pid{os.getpid()}"
    with Prefetcher(tasks, make_loader(settings, runner), depth=settings.prefetch) as pf:
        for loaded in pf:
            if on_start is not None:
                on_start(loaded.item)
            on_result(process(runner, loaded.item, settings, loaded.value, loaded.error, loaded.seconds, worker))


# ---- worker processes -------------------------------------------------------------------------

def run_pool(tasks: list[Task], settings: BatchSettings, workers: int, on_result: OnResult,
             on_start: OnStart | None = None) -> None:
    """Driver of N worker processes.

    The driver assigns every task to one worker through that worker's own queue and remembers the
    order, keeping at most ``prefetch + 1`` tasks per worker. A worker handles its tasks in that
    order, so when it dies the first of its unfinished tasks is the one it was running (recorded
    as failed) and the rest go back to the pending list. No task can be lost in a queue, whatever
    messages a dying process failed to flush.
    """
    ctx = worker_context()
    # SimpleQueue: put() writes to the pipe before returning (no feeder thread), so a message a
    # worker sent survives that worker dying right after (a Queue could lose its "done").
    result_q: Any = ctx.SimpleQueue()

    def receive(timeout: float) -> tuple:
        if not result_q._reader.poll(timeout):
            raise queue.Empty
        return result_q.get()
    pending: deque[int] = deque(range(len(tasks)))
    procs: dict[int, Any] = {}
    inbox: dict[int, Any] = {}
    assigned: dict[int, deque[int]] = {}
    done: set[int] = set()
    capacity = max(1, settings.prefetch) + 1
    next_wid = 0
    respawns_left = 2 * workers

    def spawn() -> None:
        nonlocal next_wid
        wid = next_wid
        next_wid += 1
        inbox[wid] = ctx.Queue()
        p = ctx.Process(target=_worker_main, args=(wid, workers, settings, inbox[wid], result_q, os.getpid()),
                        name=f"osteoplan-batch-{wid}", daemon=True)
        p.start()
        procs[wid], assigned[wid] = p, deque()

    def refill() -> None:
        for wid in procs:
            while pending and len(assigned[wid]) < capacity:
                tid = pending.popleft()
                assigned[wid].append(tid)
                inbox[wid].put((tid, tasks[tid]))

    def finish(tid: int, entry: ManifestEntry) -> None:
        if tid not in done:
            done.add(tid)
            on_result(entry)

    def handle(msg: tuple) -> None:
        kind, wid = msg[0], msg[1]
        if kind == "start":
            if on_start is not None:
                on_start(tasks[msg[2]])
        elif kind == "done":
            tid = msg[2]
            if wid in assigned and tid in assigned[wid]:
                assigned[wid].remove(tid)
            finish(tid, ManifestEntry(**msg[3]))
        elif kind == "fatal":
            raise WorkerStartError(msg[2], msg[3])

    def drain() -> None:
        while True:
            try:
                handle(receive(0.0))
            except queue.Empty:
                return

    for _ in range(workers):
        spawn()
    try:
        while len(done) < len(tasks):
            refill()
            try:
                handle(receive(0.5))
            except queue.Empty:
                pass
            dead = [wid for wid, p in procs.items() if p.exitcode is not None]
            if not dead:
                continue
            drain()
            for wid in dead:
                p = procs.pop(wid)
                inbox.pop(wid).cancel_join_thread()
                left = [t for t in assigned.pop(wid) if t not in done]
                if left:  # FIFO: the first unfinished task is the one the worker was running
                    finish(left[0], _died_entry(tasks[left[0]], settings, p.exitcode, wid))
                    pending.extendleft(reversed(left[1:]))
                log.warning("batch worker %d exited with code %s", wid, p.exitcode)
                if len(done) < len(tasks) and respawns_left > 0:
                    respawns_left -= 1
                    spawn()
            if not procs and len(done) < len(tasks):
                for tid in range(len(tasks)):
                    finish(tid, _died_entry(tasks[tid], settings, None, -1, "no batch worker left"))
    finally:
        for wid in procs:
            inbox[wid].put(None)
        for p in procs.values():
            p.join(timeout=10)
            if p.exitcode is None:
                p.terminate()
                p.join(timeout=5)
        for q in inbox.values():
            q.cancel_join_thread()
        result_q.close()


def _died_entry(task: Task, settings: BatchSettings, exitcode: int | None, wid: int,
                reason: str | None = None) -> ManifestEntry:
    s = task.study
    return ManifestEntry(study=s.key, kind=s.kind, input=s.rel, fingerprint=task.fingerprint,
                         options=settings.options_digest, status="failed",
                         reason=reason or f"batch worker process died (exit code {exitcode})",
                         worker=f"w{wid}", run_id=settings.run_id, finished_at=now_iso())


def _worker_main(wid: int, workers: int, settings: BatchSettings, task_q: Any, result_q: Any,
                 parent_pid: int) -> None:
    """Body of one worker process: one runner, bounded prefetch, results to the driver."""
    options, threads = _worker_options(settings, wid, workers)
    try:
        runner = make_runner(settings, options)
        if threads:  # after the runner: the Segmenter sets all cores for itself
            import torch

            torch.set_num_threads(threads)
    except OsteoplanError as exc:
        result_q.put(("fatal", wid, str(exc), exc.exit_code))
        return
    except Exception as exc:  # noqa: BLE001
        log.error("batch worker %d could not start", wid, exc_info=exc)
        result_q.put(("fatal", wid, f"batch worker could not start ({type(exc).__name__})", 4))
        return

    def source() -> Iterator[tuple[int, Task]]:
        while True:
            try:
                item = task_q.get(timeout=1.0)
            except queue.Empty:
                if not _alive(parent_pid):  # the driver is gone (killed): stop
                    return
                continue
            if item is None:
                return
            yield item

    load_task = make_loader(settings, runner)
    name = f"w{wid}/pid{os.getpid()}"
    with Prefetcher(source(), lambda item: load_task(item[1]), depth=settings.prefetch) as pf:
        for loaded in pf:
            tid, task = loaded.item
            result_q.put(("start", wid, tid))
            entry = process(runner, task, settings, loaded.value, loaded.error, loaded.seconds, name, options)
            result_q.put(("done", wid, tid, asdict(entry)))
            log.info("worker %s finished study %s: %s", name, anon(task.study.key), entry.status)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (the driver; a forked worker's parent is the fork server)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_options(settings: BatchSettings, wid: int, workers: int) -> tuple[Any, int | None]:
    """Spread workers over GPUs when there are several; share the CPU cores otherwise.

    Returns (options for this worker, torch CPU threads or None to leave as is)."""
    options = settings.options
    import torch

    n_gpu = torch.cuda.device_count() if options.device in ("auto", "cuda") else 0
    if n_gpu > 1:
        return replace(options, device=f"cuda:{wid % n_gpu}"), None
    if n_gpu == 0:
        return options, max(1, (os.cpu_count() or 1) // workers)
    return options, None
