"""Which labels a label map holds at each index along an axis, from one pass over the map.

Behind the label bounding boxes of the measurement (``measure.lesions._label_slices``) and the
planes of the DICOM SEG (``report.seg_frames.planes_with_segments``). Each voxel becomes the bit
``1 << label``; the bits are OR-ed over the two other axes. Labels must be uint8 values 0..7
(callers with other maps use their own fallback).
"""

from __future__ import annotations

import numpy as np


def label_bits(labels: np.ndarray, axes: tuple[int, ...] = (0, 1, 2),
               chunk_bytes: int = 4 << 20) -> dict[int, np.ndarray]:
    """For each axis ``a`` in ``axes``: uint8 (labels.shape[a],), the OR of ``1 << label`` over
    the two other axes at each index along ``a``.

    The map is taken a few planes at a time along the axis outermost in memory (about
    ``chunk_bytes`` per block), shifted into one scratch block of the map's own memory order: no
    volume-sized temporary, whose pages the kernel would first have to fault in. Where a block's
    planes are contiguous, a plane's bits are OR-ed 8 voxels at a time as 64-bit words.
    """
    seen = {a: np.zeros(labels.shape[a], np.uint8) for a in axes}
    if labels.size == 0:
        return seen
    outer = int(np.argmax(np.abs(labels.strides)))
    others = tuple(a for a in range(3) if a != outer)
    step = max(1, chunk_bytes // (labels.size // labels.shape[outer]))
    scratch = None
    for a0 in range(0, labels.shape[outer], step):
        block = labels[tuple(slice(a0, a0 + step) if a == outer else slice(None) for a in range(3))]
        if scratch is None:
            scratch = np.empty_like(block)  # the labels' memory order: the shift is a straight pass
        bits = scratch[tuple(slice(0, block.shape[outer]) if a == outer else slice(None) for a in range(3))]
        np.left_shift(np.uint8(1), block, out=bits)
        if outer in seen:
            seen[outer][a0:a0 + block.shape[outer]] = _or_over_planes(bits, outer, others)
        if others[0] in seen or others[1] in seen:
            across = np.bitwise_or.reduce(bits, axis=outer)  # axes: others[0], others[1]
            for pos, a in enumerate(others):
                if a in seen:
                    seen[a] |= np.bitwise_or.reduce(across, axis=1 - pos)
    return seen


def _or_over_planes(bits: np.ndarray, outer: int, others: tuple[int, int]) -> np.ndarray:
    """Per index along ``outer``, the OR of ``bits`` over the other two axes."""
    inner = sorted(others, key=lambda a: -abs(bits.strides[a]))  # a plane's axes in memory order
    planes = bits.transpose((outer, *inner))
    n = planes.shape[0]
    size = planes.shape[1] * planes.shape[2]
    if planes.flags.c_contiguous and size % 8 == 0:
        words = np.bitwise_or.reduce(planes.reshape(n, size).view(np.uint64), axis=1)
        return np.bitwise_or.reduce(words.view(np.uint8).reshape(n, 8), axis=1)
    return np.bitwise_or.reduce(bits, axis=others)
