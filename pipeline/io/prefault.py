"""The CT volume's memory, faulted in on the idle core while the header pass runs.

A fresh 512x512x300 int16 array is 157 MB of pages the kernel must zero on first touch: ~15 ms
of the pixel stage on the 2-core bench machine. The header pass before it is single-threaded
Python, so the second core is idle then. :class:`Prefault` reserves the volume's array as soon as
the first CT image header is read (virtual memory only: one slice per listed file) and a
background thread touches the slices of that series as their headers arrive (never more slices
than headers seen, so no memory is faulted in for nothing when the series is chosen). The pixel
stage then takes the array (:meth:`Prefault.take`) if it fits the chosen stack: same series,
rows, columns and int16 HU; otherwise it is dropped and the pixel stage allocates its own. The
values are the same either way; only where the page faults happen changes.
"""

from __future__ import annotations

import threading

import numpy as np

from pipeline.io.discover import SliceHeader

CHUNK_SLICES = 16  # slices touched per step of the background thread (~8 MB at 512x512)
MIN_SLICES = 32  # smaller series: not worth a thread
PAGE_ITEMS = 2048  # int16 values per 4 KB page: one write per page faults it in


class Prefault:
    """Reserves and faults in the output array of the first CT series met by the header pass."""

    def __init__(self, n_files: int) -> None:
        self.n_files = n_files
        self.key: tuple[str, int, int] | None = None  # (series key, rows, cols) of the reserved array
        self.buf: np.ndarray | None = None
        self.seen = 0  # headers of that series so far: the thread touches at most this many slices
        self.touched = 0
        self.done = False
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def saw(self, s: SliceHeader) -> None:
        """The header pass read ``s`` (called for every image slice, in reading order)."""
        if self.key is None:
            if s.modality != "CT" or s.frame is not None or s.is_localizer or self.n_files < MIN_SLICES:
                return
            self.key = (s.series_key, s.rows, s.cols)
            self.buf = np.empty((self.n_files, s.rows, s.cols), dtype=np.int16)  # virtual until touched
            self.thread = threading.Thread(target=self._touch, name="osteoplan-prefault", daemon=True)
            self.thread.start()
        if (s.series_key, s.rows, s.cols) == self.key and s.frame is None and self.seen < self.n_files:
            self.seen += 1
            if self.seen - self.touched >= CHUNK_SLICES:
                self.wake.set()

    def _touch(self) -> None:
        assert self.buf is not None
        flat = self.buf.reshape(len(self.buf), -1)
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.done:
                return
            while self.touched < self.seen and not self.done:
                end = min(self.seen, self.touched + CHUNK_SLICES)
                flat[self.touched:end, ::PAGE_ITEMS] = 0  # numpy releases the GIL: page faults off the main core
                self.touched = end

    def stop(self) -> None:
        """End the background thread (what it touched stays touched)."""
        self.done = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join()

    def take(self, slices: list[SliceHeader], dtype: np.dtype) -> np.ndarray | None:
        """The reserved array's first ``len(slices)`` slices if it fits that stack, else None (and
        it is released)."""
        self.stop()
        buf, self.buf = self.buf, None
        if buf is None or not slices or np.dtype(dtype) != np.int16 or len(slices) > len(buf):
            return None
        first = slices[0]
        if (first.series_key, first.rows, first.cols) != self.key or first.frame is not None:
            return None
        return buf[:len(slices)]
