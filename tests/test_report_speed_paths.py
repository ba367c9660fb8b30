"""The writers' fast paths give the same results as the straightforward ways they replace."""

from __future__ import annotations

import random

import numpy as np
import pytest

import report_helpers as rh
from pipeline.report import seg as seg_mod
from pipeline.report.seg import SourceHeaders, aligned_to_grid, read_source_headers
from pipeline.types import Geometry


def _shifted(g: Geometry, dz: float) -> Geometry:
    return Geometry(g.shape, g.spacing, (g.origin[0], g.origin[1], g.origin[2] + dz), g.direction)


@pytest.mark.parametrize("kind", ["HFS", "FFS", "OBLIQUE"])
def test_source_headers_remember_the_grid_check(tmp_path, kind):
    """read_source_headers' alignment is reused for its own grid and recomputed for any other one."""
    case = rh.dicom_case(tmp_path, kind, shape=(20, 16, 10))
    g = case.volume.geometry
    headers = read_source_headers(case.volume)
    assert isinstance(headers, SourceHeaders) and headers.aligned
    assert aligned_to_grid(headers, g)
    assert aligned_to_grid(list(headers), g)  # a plain list is checked from scratch
    same = Geometry(g.shape, g.spacing, g.origin, g.direction.copy())
    assert aligned_to_grid(headers, same)
    moved = _shifted(g, 0.5 * g.spacing[2])
    assert not aligned_to_grid(headers, moved)
    assert not aligned_to_grid(list(headers), moved)


def test_order_single_frame_matches_one_by_one_matching(tmp_path):
    """Blocked nearest-position matching gives the order (and the errors) of the slice-by-slice loop."""
    case = rh.dicom_case(tmp_path, "FFS", shape=(20, 16, 12))
    g = case.volume.geometry
    headers = list(read_source_headers(case.volume))
    random.Random(5).shuffle(headers)

    def one_by_one(hs, geom):
        nk = geom.shape[2]
        expected = geom.index_to_lps(np.stack([np.zeros(nk), np.zeros(nk), np.arange(nk)], axis=1))
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in hs])
        order = []
        for k in range(nk):
            dist = np.linalg.norm(pos - expected[k], axis=1)
            best = int(np.argmin(dist))
            if dist[best] > seg_mod.POSITION_TOL_MM:
                raise ValueError(f"no source image at the position of slice {k} (nearest {dist[best]:.3f} mm)")
            order.append(best)
        return [hs[i] for i in order]

    fast = seg_mod._order_single_frame(headers, g)
    assert all(a is b for a, b in zip(fast, one_by_one(headers, g)))
    for block in (1, 5, 256):
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        exp = g.index_to_lps(np.stack([np.zeros(12), np.zeros(12), np.arange(12)], axis=1))
        assert [headers[i] for i in seg_mod._nearest_positions(pos, exp, block)] == fast
    moved = _shifted(g, 0.3 * g.spacing[2])
    with pytest.raises(ValueError) as fast_err:
        seg_mod._order_single_frame(headers, moved)
    with pytest.raises(ValueError) as slow_err:
        one_by_one(headers, moved)
    assert str(fast_err.value) == str(slow_err.value)


def test_order_single_frame_rejects_wrong_orientation_or_size(tmp_path):
    case = rh.dicom_case(tmp_path, "HFS", shape=(20, 16, 8))
    headers = list(read_source_headers(case.volume))
    g = case.volume.geometry
    headers[3].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    headers[5].Rows = 99
    with pytest.raises(ValueError, match="orientation"):
        seg_mod._order_single_frame(headers, g)
    headers[3].ImageOrientationPatient = [float(v) for v in np.r_[g.direction[:, 0], g.direction[:, 1]]]
    with pytest.raises(ValueError, match="size"):
        seg_mod._order_single_frame(headers, g)
