"""Writer work beside the main thread: how many CPUs this process may use, and one call run in a
thread whose result (or error) is collected later."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux; a batch worker may be pinned)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class BackgroundCall(threading.Thread):
    """``fn(*args)`` in a daemon thread (``start``) or in place (``run``); ``result`` waits for it,
    re-raises its error or returns its value."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "osteoplan-writer") -> None:
        super().__init__(name=name, daemon=True)
        self._call = (fn, args)
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        fn, args = self._call
        try:
            self._value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self._error = exc

    def result(self) -> Any:
        if self.ident is not None:
            self.join()
        if self._error is not None:
            raise self._error
        return self._value
