"""Recycled memory for decoded CT volumes.

A batch worker or a PACS listener loads study after study in one process. A new array of
~160 MB (512 x 512 x 300, int16) costs more than copying the pixels into it: the kernel
faults in and zeroes every page first (measured on the 2-core bench machine: 30-35 ms to fill
a fresh array, ~10 ms for one already in memory). :class:`VolumeArena` hands out the memory of
a volume that is no longer used instead.

Rules:

- A buffer is reused only when nothing but the arena refers to it: every array, view, tensor
  (``torch.from_numpy``) or memoryview made from a handed-out array holds a reference to the
  buffer, so a volume still in use is never handed out again.
- The smallest idle buffer that is large enough is taken; one more than twice the size asked
  for is not (a small volume would pin a large block).
- At most ``slots`` buffers are kept (a batch worker holds up to 4 volumes: one in inference,
  two prefetched, one loading). Idle ones beyond that are freed, largest first; ``clear()``
  frees every idle one.
- The contents of a reused buffer are undefined, exactly like ``np.empty``: the decoder writes
  every slice or reports it as failed.
- ``slots=0`` turns recycling off (every request is a fresh ``np.empty``).
"""

from __future__ import annotations

import sys
import threading

import numpy as np

DEFAULT_SLOTS = 4


class VolumeArena:
    """A small pool of large byte buffers; ``empty(shape, dtype)`` is ``np.empty`` that recycles."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self._bufs: list[np.ndarray] = []  # 1-D uint8 buffers owned by the arena
        self._lock = threading.Lock()
        self.reused = 0  # how many requests got recycled memory (for tests and benchmarks)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.slots <= 0 or nbytes == 0:
            return np.empty(shape, dtype)
        with self._lock:
            idle = [i for i in range(len(self._bufs)) if self._idle(i)]
            fits = [i for i in idle if nbytes <= self._bufs[i].nbytes <= 2 * nbytes]
            if fits:
                buf = self._bufs[min(fits, key=lambda i: self._bufs[i].nbytes)]
                self.reused += 1
            else:
                buf = np.empty(nbytes, np.uint8)
                self._bufs.append(buf)
                self._trim()
            return buf[:nbytes].view(dtype).reshape(shape)

    def clear(self) -> int:
        """Free every idle buffer; returns how many bytes were let go."""
        with self._lock:
            idle = [self._idle(i) for i in range(len(self._bufs))]  # before any other reference is taken
            freed = sum(b.nbytes for b, free in zip(self._bufs, idle) if free)
            self._bufs = [b for b, free in zip(self._bufs, idle) if not free]
            return freed

    def held_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._bufs)

    def _idle(self, i: int) -> bool:
        # references: the list, and getrefcount's own argument
        return sys.getrefcount(self._bufs[i]) <= 2

    def _trim(self) -> None:
        """Keep at most ``slots`` buffers: drop idle ones, largest first; then forget the oldest
        busy ones (their owners keep them alive; they are freed when those let go)."""
        while len(self._bufs) > self.slots:
            idle = [i for i in range(len(self._bufs) - 1) if self._idle(i)]  # never the newest
            drop = max(idle, key=lambda i: self._bufs[i].nbytes) if idle else 0
            del self._bufs[drop]


ARENA = VolumeArena()
