"""Batch progress: a rich progress bar (ETA, studies/hour, failures), or plain log lines.

``--quiet`` (or a non-terminal stdout) gives one plain line per finished study, for cluster
logs. Study names are pseudonymised with ``anon()``: lines never carry patient identity.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from pipeline.batch.manifest import ManifestEntry
from pipeline.logs import anon


class BatchProgress:
    """Counts finished studies and reports them; subclasses decide how."""

    def __init__(self, total: int, skipped: int = 0) -> None:
        self.total = total
        self.skipped = skipped
        self.ok = 0
        self.failed = 0
        self.t0 = time.monotonic()

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def rate_per_hour(self) -> float:
        elapsed = time.monotonic() - self.t0
        return self.done / elapsed * 3600.0 if elapsed > 0 and self.done else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate_per_hour()
        return (self.total - self.done) / rate * 3600.0 if rate > 0 else None

    def update(self, entry: ManifestEntry) -> None:
        if entry.status == "ok":
            self.ok += 1
        else:
            self.failed += 1

    def __enter__(self) -> "BatchProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class PlainProgress(BatchProgress):
    """One line per finished study: counts, rate, ETA, and the reason of a failure."""

    def __init__(self, total: int, skipped: int = 0, stream: TextIO | None = None) -> None:
        super().__init__(total, skipped)
        self.stream = stream or sys.stdout
        self._line(f"batch: {total} studies to do" + (f", {skipped} already done (resume)" if skipped else ""))

    def update(self, entry: ManifestEntry) -> None:
        super().update(entry)
        eta = self.eta_s()
        msg = (f"batch: {self.done}/{self.total} ok={self.ok} failed={self.failed} "
               f"rate={self.rate_per_hour():.1f}/h eta={_fmt(eta)} study={anon(entry.study)} {entry.status}")
        if entry.status != "ok" and entry.reason:
            msg += f": {entry.reason}"
        self._line(msg)

    def close(self) -> None:
        self._line(f"batch: finished {self.done}/{self.total}: ok={self.ok} failed={self.failed} "
                   f"in {_fmt(time.monotonic() - self.t0)}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichProgress(BatchProgress):
    """A live bar: done/total, studies/hour, failures so far, elapsed and ETA."""

    def __init__(self, total: int, skipped: int = 0) -> None:
        super().__init__(total, skipped)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} studies/h"),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._task: Any = self._progress.add_task("batch", total=total, rate=0.0, failed=0)
        if skipped:
            self.console.print(f"resume: {skipped} studies already done, skipped")

    def update(self, entry: ManifestEntry) -> None:
        super().update(entry)  # failures are also logged as warnings (stderr and the log file)
        self._progress.update(self._task, completed=self.done, rate=self.rate_per_hour(), failed=self.failed)

    def close(self) -> None:
        self._progress.stop()
        self.console.print(f"batch: ok={self.ok} failed={self.failed} "
                           f"in {_fmt(time.monotonic() - self.t0)}", highlight=False)


def make_progress(total: int, skipped: int, quiet: bool) -> BatchProgress:
    if quiet:
        return PlainProgress(total, skipped)
    return RichProgress(total, skipped)


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return str(timedelta(seconds=int(seconds)))
