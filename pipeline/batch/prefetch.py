"""Bounded prefetch: read and decode the next studies while the current one is in inference.

A background thread pulls items from a source iterator, loads each one and puts the result
into a ``queue.Queue(maxsize=depth)``. The thread blocks when the queue is full, so at most
``depth`` loaded volumes wait, plus one being loaded and one in inference: memory stays
bounded whatever the number of studies.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
V = TypeVar("V")

_END = object()


@dataclass
class Loaded(Generic[T, V]):
    item: T
    value: V | None
    error: BaseException | None
    seconds: float  # wall time of the load


class Prefetcher(Generic[T, V]):
    """Iterate over ``Loaded`` results in source order; use as a context manager."""

    def __init__(self, source: Iterable[T], load: Callable[[T], V], depth: int = 2,
                 on_take: Callable[[T], None] | None = None) -> None:
        if depth < 1:
            raise ValueError("prefetch depth must be >= 1")
        self._source = iter(source)
        self._load = load
        self._on_take = on_take
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="osteoplan-prefetch", daemon=True)
        self._started = False

    def __enter__(self) -> "Prefetcher[T, V]":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def __iter__(self) -> Iterator[Loaded[T, V]]:
        self.start()
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Crash):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the thread (it finishes at most the load in progress) and drop what is queued."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set():
                    return
                if self._on_take is not None:
                    self._on_take(item)
                t0 = time.perf_counter()
                try:
                    value, error = self._load(item), None
                except Exception as exc:  # noqa: BLE001 - a bad study is a result, not a crash
                    value, error = None, exc
                if not self._put(Loaded(item, value, error, time.perf_counter() - t0)):
                    return
        except BaseException as exc:  # the source itself failed: hand it to the consumer
            self._put(_Crash(exc))
            return
        self._put(_END)


@dataclass
class _Crash:
    error: BaseException
