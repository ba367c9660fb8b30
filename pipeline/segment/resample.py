"""Resampling between a volume's grid and the model's canonical grid.

The canonical grid has its array axes along +L, +P, +S (identity direction), covers the
input's bounding box in patient space, and has a spacing as close as possible to the model's
target spacing such that its corner voxels coincide with the input's corner voxel centres
(for axis-aligned inputs). Geometry stays exact: every grid carries its own Geometry.

Going back, logits are sampled at the input voxel centres slab by slab (trilinear on the
canonical logits, then argmax), so no full-resolution float volume per class is ever made.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.types import Geometry


def signed_permutation(direction: np.ndarray, tol: float = 1e-3) -> tuple[list[int], list[int]] | None:
    """If ``direction`` is a signed permutation: (axis_for_lps[3], sign[3]) else None.

    ``axis_for_lps[d]`` is the array axis that runs along LPS axis ``d``; ``sign[d]`` is +1/-1.
    """
    d = np.asarray(direction)
    axis_for_lps, sign = [], []
    for row in range(3):
        a = int(np.argmax(np.abs(d[row])))
        if abs(abs(d[row, a]) - 1.0) > tol:
            return None
        axis_for_lps.append(a)
        sign.append(int(np.sign(d[row, a])))
    if sorted(axis_for_lps) != [0, 1, 2]:
        return None
    return axis_for_lps, sign


def canonical_geometry(geom: Geometry, target_spacing: tuple[float, float, float]) -> Geometry:
    """LPS-aligned grid covering ``geom``'s voxel centres at about ``target_spacing``."""
    n = np.asarray(geom.shape) - 1
    corners = np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float)
    lps = geom.index_to_lps(corners)
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    extent = hi - lo
    t = np.asarray(target_spacing, float)
    shape = np.maximum(np.round(extent / t).astype(int) + 1, 1)
    spacing = np.where(shape > 1, extent / np.maximum(shape - 1, 1), t)
    return Geometry(shape=tuple(int(s) for s in shape), spacing=tuple(spacing), origin=tuple(lo), direction=np.eye(3))


def to_canonical(array: np.ndarray, geom: Geometry, canon: Geometry) -> torch.Tensor:
    """Resample ``array`` (HU, on ``geom``) onto ``canon``: float32 tensor (1, 1, X, Y, Z), trilinear."""
    perm = signed_permutation(geom.direction)
    if perm is not None:
        axis_for_lps, sign = perm
        return _separable_linear(array, axis_for_lps, sign, canon.shape)
    # oblique: general affine sampling
    src = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)[None, None]
    out = torch.empty((1, 1) + canon.shape, dtype=torch.float32)
    for k0, k1, grid in _slab_grids(canon, geom, slab=max(1, int(4e6 // (canon.shape[0] * canon.shape[1])))):
        out[0, 0, :, :, k0:k1] = _sample(src, grid, "bilinear").permute(0, 1, 4, 3, 2)[0, 0]
    return out


def _separable_linear(array: np.ndarray, axis_for_lps: list[int], sign: list[int],
                      out_shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling (align_corners=True) of an axis-aligned array, one axis at a time.

    Output axis ``d`` runs along LPS axis ``d``: it is the input's axis ``axis_for_lps[d]``,
    reversed where ``sign[d] < 0``. Same values as permute + flip + ``F.interpolate(...,
    mode="trilinear", align_corners=True)`` up to float rounding (sample positions are computed
    in float64 here), but each pass only reads the two input samples it needs along its axis and
    the most-shrinking axis goes first, so the full-resolution input is read once, as it is stored
    (int16, any memory order), and never converted to float as a whole.
    """
    x = np.asarray(array)
    mem, pos_of_input_axis, in_shape, order = _pass_plan(x, axis_for_lps, out_shape)
    v = x.transpose(mem)
    for d in order:
        ax = pos_of_input_axis[axis_for_lps[d]]
        n_in, n_out = in_shape[d], out_shape[d]
        if n_in == n_out:
            if sign[d] < 0:
                v = np.flip(v, axis=ax)
            continue
        i0, i1, w = _linear_taps(n_in, n_out, reverse=sign[d] < 0)
        shape = [1, 1, 1]
        shape[ax] = n_out
        lo = np.take(v, i0, axis=ax)
        hi = np.take(v, i1, axis=ax)
        if lo.dtype == np.float32:
            hi -= lo
            hi *= w.reshape(shape)
            lo += hi  # lo + w (hi - lo)
            v = lo
        else:  # the stored integers (first pass): the same float32 operations, without float copies of lo and hi
            diff = np.subtract(hi, lo, dtype=np.float32)  # float(hi) - float(lo)
            del hi
            diff *= w.reshape(shape)
            v = np.add(lo, diff, out=diff, dtype=np.float32)  # float(lo) + w (hi - lo)
    # v's axis p is input axis mem[p]; output axis d is input axis axis_for_lps[d]
    out = v.transpose([pos_of_input_axis[axis_for_lps[d]] for d in range(3)])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None, None]


def _pass_plan(x: np.ndarray, axis_for_lps: list[int], out_shape: tuple[int, ...]
               ) -> tuple[list[int], dict[int, int], list[int], list[int]]:
    """How the separable passes run over ``x``: its axes in memory order (outermost first, so
    that gathers copy contiguous runs), each input axis's position in that order, the input size
    along each LPS axis, and the LPS axes in pass order (most-shrinking first; ties: the outer
    axis in memory first)."""
    mem = sorted(range(3), key=lambda a: -abs(x.strides[a]))
    pos_of_input_axis = {a: mem.index(a) for a in range(3)}
    in_shape = [x.shape[axis_for_lps[d]] for d in range(3)]
    order = sorted(range(3), key=lambda d: (out_shape[d] / max(in_shape[d], 1),
                                             pos_of_input_axis[axis_for_lps[d]]))
    return mem, pos_of_input_axis, in_shape, order


def to_canonical_on_device(array: np.ndarray, geom: Geometry, canon: Geometry, device: torch.device) -> torch.Tensor:
    """``to_canonical`` computed on ``device`` (a GPU): float32 tensor (1, 1, X, Y, Z) there.

    The input goes up once as stored (int16, in its memory order, no float copy on the host);
    the separable passes are the same float32 operations in the same order as
    ``_separable_linear`` (gather left and right taps, ``hi -= lo; hi *= w; lo += hi``), so the
    values are the same. Oblique inputs use the host path and are then copied up. On the CPU it
    works too, but ``to_canonical`` is faster there.
    """
    perm = signed_permutation(geom.direction)
    if perm is None:
        return to_canonical(array, geom, canon).to(device)
    axis_for_lps, sign = perm
    x = np.asarray(array)
    out_shape = canon.shape
    mem, pos_of_input_axis, in_shape, order = _pass_plan(x, axis_for_lps, out_shape)
    v = torch.from_numpy(np.ascontiguousarray(x.transpose(mem))).to(device, non_blocking=False)
    for d in order:
        ax = pos_of_input_axis[axis_for_lps[d]]
        n_in, n_out = in_shape[d], out_shape[d]
        if n_in == n_out:
            if sign[d] < 0:
                v = torch.flip(v, dims=(ax,))
            continue
        i0, i1, w = _linear_taps(n_in, n_out, reverse=sign[d] < 0)
        lo = v.index_select(ax, torch.from_numpy(i0).to(device)).float()
        hi = v.index_select(ax, torch.from_numpy(i1).to(device)).float()
        shape = [1, 1, 1]
        shape[ax] = n_out
        hi -= lo
        hi *= torch.from_numpy(w).to(device).view(shape)
        lo += hi
        v = lo
    out = v.permute([pos_of_input_axis[axis_for_lps[d]] for d in range(3)])
    return out.to(torch.float32).contiguous()[None, None]


def _linear_taps(n_in: int, n_out: int, reverse: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left/right input indices and right weight (float32) for align_corners=True linear resampling."""
    if n_out == 1:
        pos = np.zeros(1)
    else:
        pos = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
    if reverse:
        pos = (n_in - 1) - pos
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _slab_grids(dst: Geometry, src: Geometry, slab: int):
    """Yield (k0, k1, grid) where grid holds normalised src coordinates of dst voxels k0..k1."""
    ni, nj, nk = dst.shape
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    m = np.linalg.inv(src.affine_lps) @ dst.affine_lps  # dst index -> src index
    size = np.asarray(src.shape, float)
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        kk = np.arange(k0, k1)
        ijk = np.stack(np.broadcast_arrays(ii[..., None], jj[..., None], kk[None, None, :]), axis=-1)
        s = ijk.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        norm = 2.0 * s / np.maximum(size - 1, 1) - 1.0  # align_corners=True
        # grid_sample wants (N, D, H, W, 3) with last dim (x=W, y=H, z=D) -> our (i, j, k) = (W, H, D)?
        # we index the source tensor as (1, C, I, J, K): D=I, H=J, W=K, so xyz = (k, j, i)
        g = norm[:, ::-1].reshape(ni, nj, k1 - k0, 3).transpose(2, 1, 0, 3)  # (K, J, I, 3)
        yield k0, k1, torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))[None]


def _sample(src: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """src (1, C, I, J, K); grid (1, K', J', I', 3) -> (1, C, K', J', I')."""
    return F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=True)


def argmax_channels(scores: torch.Tensor) -> torch.Tensor:
    """First-index argmax over dim 0 of (C, ...) scores as uint8; much faster than ``argmax(dim=0)`` on CPU.

    Ties go to the lowest channel index, as ``torch.argmax`` does.
    """
    best = scores[0].clone()
    lab = torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for c in range(1, scores.shape[0]):
        gt = scores[c] > best
        lab.masked_fill_(gt, c)
        torch.maximum(best, scores[c], out=best)
    return lab


MIXED = 255  # cell code: its corners disagree (or are near a tie); sample it exactly


def _uniform_cells(scores: torch.Tensor) -> np.ndarray:
    """Label of each grid cell (2x2x2 corner block) whose corners all have it as a clear winner.

    ``scores`` (C, X, Y, Z). Returns uint8 (X', Y', Z') with X' = max(X - 1, 1) etc.: cell
    (x, y, z) spans corners x..x+1 (only x when X == 1); its value is the corners' common
    argmax, or ``MIXED``. Why it is exact: trilinear interpolation inside a cell is a convex
    combination of its corners, so if label c beats every other label at all eight corners it
    beats them everywhere in the cell. "Clear" = top score ahead of the second by more than
    1e-3 of the largest score magnitude, far above float32 rounding of the interpolation and of
    the sample positions, so the argmax of the exactly sampled scores would be the same.
    """
    c = scores.shape[0]
    best = scores[0].clone()
    second = torch.full_like(best, -float("inf"))
    lab = torch.zeros(scores.shape[1:], dtype=torch.uint8)
    for ch in range(1, c):
        v = scores[ch]
        gt = v > best
        second = torch.maximum(second, torch.minimum(best, v))
        torch.maximum(best, v, out=best)
        lab.masked_fill_(gt, ch)
    tol = 1e-3 * max(1.0, float(scores.abs().max()))
    lab.masked_fill_((best - second) <= tol, MIXED)
    lo = hi = lab
    for ax in range(3):
        if lo.shape[ax] > 1:
            n = lo.shape[ax]
            lo = torch.minimum(lo.narrow(ax, 0, n - 1), lo.narrow(ax, 1, n - 1))
            hi = torch.maximum(hi.narrow(ax, 0, n - 1), hi.narrow(ax, 1, n - 1))
    cells = lo.clone()
    cells.masked_fill_(lo != hi, MIXED)
    return cells.numpy()


def _axis_map(m: np.ndarray, shape: tuple[int, ...], tol: float = 1e-6) -> list[int] | None:
    """If the index map ``m`` (4x4, input index -> canonical index) sends each input axis along one
    canonical axis (no shear, drift below ``tol`` voxel over the grid): canonical axis per input axis."""
    a = m[:3, :3]
    axes = [int(np.argmax(np.abs(a[:, col]))) for col in range(3)]
    if sorted(axes) != [0, 1, 2]:
        return None
    off = a.copy()
    for col, row in enumerate(axes):
        off[row, col] = 0.0
    if float(np.abs(off).max(initial=0.0)) * float(max(shape)) > tol:
        return None
    return axes


def logits_to_labels(logits: torch.Tensor, canon: Geometry, geom: Geometry, slab_voxels: int = 8_000_000,
                     roi_ijk: tuple[np.ndarray, np.ndarray] | None = None, order: str = "C",
                     corner_labels: bool = False) -> np.ndarray:
    """Trilinear-sample canonical logits (1, C, X, Y, Z) at ``geom``'s voxel centres; argmax -> uint8.

    ``roi_ijk`` (lo, hi inclusive input indices) restricts the work to a box; voxels outside it
    are background (0). Same labels as sampling every voxel with ``grid_sample`` (border
    padding, align_corners=True) and taking the first-index argmax, but only voxels whose
    canonical cell is not uniform (see ``_uniform_cells``: near label boundaries or near ties)
    are actually sampled; the rest take their cell's label. Sampling works in chunks of
    ``slab_voxels`` voxels. ``order`` ("C" or "F") is the memory order of the returned map: "F"
    (slice-major, like the DICOM loader's arrays) makes NIfTI and DICOM SEG writing copy-free.

    ``corner_labels``: a voxel may only take a label that one of the 8 model voxels around it has
    (the arg-max among those labels). Plain trilinear interpolation of logits can make a label
    that none of them has: between a lesion voxel and a canal voxel whose second-best class is
    bone, a one-voxel layer of bone appears, and a lesion that touches the canal on the model's
    grid is measured 1-2 voxels away from it. Uniform cells are unaffected.
    """
    labels, lo, hi, sub_shape = _label_box(geom, roi_ijk, order)
    if min(sub_shape) <= 0:
        return labels
    sub_origin = geom.index_to_lps(lo[None])[0]
    sub = Geometry(shape=sub_shape, spacing=geom.spacing, origin=tuple(sub_origin), direction=geom.direction)
    src = logits.float()
    m = np.linalg.inv(canon.affine_lps) @ sub.affine_lps  # sub index -> canonical index
    # the canonical box that the sub grid's voxel centres fall in (their cells, clamped)
    cn = np.asarray(canon.shape)
    corners = np.array([[a, b, c] for a in (0, sub_shape[0] - 1) for b in (0, sub_shape[1] - 1)
                        for c in (0, sub_shape[2] - 1)], float)
    cpos = corners @ m[:3, :3].T + m[:3, 3]
    c_lo = np.clip(np.floor(cpos.min(axis=0)).astype(int) - 1, 0, cn - 1)
    c_hi = np.clip(np.ceil(cpos.max(axis=0)).astype(int) + 1, 0, cn - 1)
    crop = src[0, :, c_lo[0]:c_hi[0] + 1, c_lo[1]:c_hi[1] + 1, c_lo[2]:c_hi[2] + 1]
    cells = _uniform_cells(crop)
    ncell = np.asarray(cells.shape)
    node_labels = argmax_channels(crop).numpy() if corner_labels else None

    axes = _axis_map(m, sub_shape)
    out = np.empty(sub_shape, np.uint8, order=order)
    if axes is not None:
        # separable: the cell of voxel (i, j, k) is a product of three 1-D lookups
        cell_idx = []
        for col, row in enumerate(axes):
            pos = np.arange(sub_shape[col], dtype=np.float64) * m[row, col] + m[row, 3]
            cell_idx.append(_cell_index(pos, cn[row], c_lo[row], ncell[row]))
        c_in = cells.transpose(axes)  # axis ``col`` of c_in = canonical axis axes[col]
        if order == "F":  # gather in (k, j, i) order: C order of the transposed view
            out.T[...] = c_in.T[cell_idx[2]][:, cell_idx[1]][:, :, cell_idx[0]]
        else:
            out[...] = c_in[cell_idx[0]][:, cell_idx[1]][:, :, cell_idx[2]]
    else:
        ii, jj = np.meshgrid(np.arange(sub_shape[0]), np.arange(sub_shape[1]), indexing="ij")
        slab = max(1, int(slab_voxels // (sub_shape[0] * sub_shape[1])))
        for k0 in range(0, sub_shape[2], slab):
            k1 = min(sub_shape[2], k0 + slab)
            ijk = np.stack(np.broadcast_arrays(ii[..., None], jj[..., None], np.arange(k0, k1)[None, None, :]), axis=-1)
            pos = ijk.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
            ci = [_cell_index(pos[:, d], cn[d], c_lo[d], ncell[d]) for d in range(3)]
            out[:, :, k0:k1] = cells[ci[0], ci[1], ci[2]].reshape(sub_shape[0], sub_shape[1], k1 - k0)
    mixed = np.flatnonzero(out.reshape(-1, order=order) == MIXED)  # a view: out is contiguous in ``order``
    flat_out = out.reshape(-1, order=order)
    size = np.maximum(cn - 1, 1)
    for start in range(0, len(mixed), max(1, slab_voxels)):
        flat = mixed[start:start + slab_voxels]
        ijk = np.stack(np.unravel_index(flat, sub_shape, order=order), axis=-1)
        pos = ijk @ m[:3, :3].T + m[:3, 3]  # same arithmetic as _slab_grids
        norm = 2.0 * pos / size - 1.0
        grid = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1], dtype=np.float32)).view(1, 1, 1, -1, 3)
        scores = _sample(src, grid, "bilinear")[0, :, 0, 0]  # (C, n)
        if node_labels is not None:
            lower = [_cell_index(pos[:, d], cn[d], c_lo[d], ncell[d]) for d in range(3)]
            frac = [np.clip(pos[:, d], 0, cn[d] - 1) - (lower[d] + c_lo[d]) for d in range(3)]
            scores = _keep_corner_labels(scores, node_labels, lower, frac)
        flat_out[flat] = argmax_channels(scores).numpy()  # scores.argmax(dim=0), ~10x faster on the CPU
    labels[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = out
    return labels


def sample_labels(logits: torch.Tensor, canon: Geometry, geom: Geometry,
                  roi_ijk: tuple[np.ndarray, np.ndarray] | None = None, order: str = "C",
                  chunk_voxels: int = 8_000_000, corner_labels: bool = False) -> np.ndarray:
    """``logits_to_labels`` for logits on a GPU: every voxel of the box is sampled there.

    On a GPU sampling every voxel of the box (``grid_sample``, border padding,
    align_corners=True, first-index argmax) costs less than finding the uniform cells, and only
    the uint8 labels come back to the host, chunk by chunk along the output's slowest memory
    axis. Sample positions are computed in float64 on the device, as the host path computes
    them, then cast to float32 for ``grid_sample``. Works on the CPU too (tests use it there).
    ``corner_labels``: as in ``logits_to_labels``.
    """
    labels, lo, hi, sub_shape = _label_box(geom, roi_ijk, order)
    if min(sub_shape) <= 0:
        return labels
    dev = logits.device
    src = logits.float()
    m = np.linalg.inv(canon.affine_lps) @ geom.affine_lps  # input index -> canonical index
    scale = 2.0 / np.maximum(np.asarray(canon.shape, float) - 1, 1)
    # normalised canonical coordinate c of input voxel (i, j, k): a[c] + sum_axis b[c, axis] * index
    a = torch.tensor((m[:3, :3] @ lo + m[:3, 3]) * scale - 1.0, dtype=torch.float64, device=dev)
    b = torch.tensor(m[:3, :3] * scale[:, None], dtype=torch.float64, device=dev)
    # the same in canonical index units (for the nodes around each sample)
    a_idx = torch.tensor(m[:3, :3] @ lo + m[:3, 3], dtype=torch.float64, device=dev)
    b_idx = torch.tensor(m[:3, :3], dtype=torch.float64, device=dev)
    node_labels = src[0].argmax(dim=0) if corner_labels else None
    cn = [int(v) for v in canon.shape]
    # output layout: slowest memory axis first ("F": k, j, i; "C": i, j, k)
    layout = (2, 1, 0) if order == "F" else (0, 1, 2)
    n_layout = [sub_shape[ax] for ax in layout]
    box = labels[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    plane = n_layout[1] * n_layout[2]
    step = max(1, int(chunk_voxels) // max(plane, 1))
    idx = [torch.arange(n, dtype=torch.float64, device=dev) for n in n_layout]
    tail = [None, None, None]  # per canonical coordinate: its part from the two fast layout axes
    for c in range(3):
        tail[c] = (b[c, layout[1]] * idx[1])[:, None] + (b[c, layout[2]] * idx[2])[None, :] + a[c]
    view = box.transpose(layout)  # numpy view, axes in layout order
    for s0 in range(0, n_layout[0], step):
        s1 = min(n_layout[0], s0 + step)
        first = idx[0][s0:s1]
        # grid_sample's last dim is (x, y, z) = (canonical axis 2, 1, 0) of the (1, C, X, Y, Z) source
        grid = torch.stack([(b[c, layout[0]] * first)[:, None, None] + tail[c][None] for c in (2, 1, 0)], dim=-1)
        scores = F.grid_sample(src, grid.to(torch.float32)[None], mode="bilinear", padding_mode="border",
                               align_corners=True)[0]  # (C, n0, n1, n2)
        if node_labels is not None:
            allowed = torch.zeros(scores.shape, dtype=torch.bool, device=dev)
            lower = []
            for c in range(3):
                pos = (b_idx[c, layout[0]] * first)[:, None, None] + ((b_idx[c, layout[1]] * idx[1])[:, None]
                                                                      + (b_idx[c, layout[2]] * idx[2])[None, :]
                                                                      + a_idx[c])[None]
                clamped = pos.clamp(0, cn[c] - 1)
                lo_c = torch.floor(clamped).long().clamp_(0, max(cn[c] - 2, 0))
                lower.append(_node_pair(lo_c, clamped - lo_c, cn[c], xp=torch))
            for i in lower[0]:
                for j in lower[1]:
                    for k in lower[2]:
                        allowed.scatter_(0, node_labels[i, j, k].long()[None], True)
            scores = scores.masked_fill(~allowed, -float("inf"))
        lab = scores.argmax(dim=0).to(torch.uint8)
        view[s0:s1] = lab.cpu().numpy()
    return labels


def _label_box(geom: Geometry, roi_ijk: tuple[np.ndarray, np.ndarray] | None, order: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """An all-background label map in memory ``order`` and the box to fill: (labels, lo, hi, box shape)."""
    if order not in ("C", "F"):
        raise ValueError("order must be 'C' or 'F'")
    labels = np.zeros(geom.shape, np.uint8, order=order)
    if roi_ijk is None:
        lo, hi = np.zeros(3, int), np.asarray(geom.shape) - 1
    else:
        lo, hi = np.asarray(roi_ijk[0], int), np.asarray(roi_ijk[1], int)
    return labels, lo, hi, tuple(int(v) for v in hi - lo + 1)


NODE_WEIGHT_EPS = 1e-6  # a node whose trilinear weight along an axis is below this does not count


def _node_pair(lower, frac, n: int, xp=np):
    """The nodes along one axis that carry weight for a sample: (first, second) index arrays.

    ``lower`` is the sample's lower node, ``frac`` its position above it (0..1). A node whose
    weight is below ``NODE_WEIGHT_EPS`` is replaced by the other one, so that a sample lying on a
    node (up to rounding) only sees that node, whichever side rounding put it on: the result
    does not depend on the storage orientation."""
    upper = (lower + 1).clip(max=n - 1)
    first = xp.where(1.0 - frac > NODE_WEIGHT_EPS, lower, upper)
    second = xp.where(frac > NODE_WEIGHT_EPS, upper, lower)
    return first, second


def _keep_corner_labels(scores: torch.Tensor, node_labels: np.ndarray, lower: list[np.ndarray],
                        frac: list[np.ndarray]) -> torch.Tensor:
    """``scores`` (C, n) with every class that none of the (up to 8) nodes around each sample with
    a trilinear weight has set to -inf. ``node_labels``: arg-max labels of the model-grid nodes
    (crop); ``lower``: per axis the crop index of each sample's lower node; ``frac``: the
    sample's position above it."""
    n_c = scores.shape[0]
    pairs = [_node_pair(lo, f, node_labels.shape[d]) for d, (lo, f) in enumerate(zip(lower, frac))]
    out = scores.clone()
    if n_c > 8:  # one bit per class no longer fits a byte
        allowed = np.zeros((len(lower[0]), n_c), bool)
        rows = np.arange(len(lower[0]))
        for a in pairs[0]:
            for b in pairs[1]:
                for c in pairs[2]:
                    allowed[rows, node_labels[a, b, c]] = True
        out[torch.from_numpy(~allowed.T)] = -float("inf")
        return out
    # the classes of the 8 nodes as bits (1 << label), nodes addressed by flat index
    flat = np.ascontiguousarray(node_labels).reshape(-1)
    s0, s1 = node_labels.shape[1] * node_labels.shape[2], node_labels.shape[2]
    bits = np.zeros(len(lower[0]), np.uint8)
    for a in pairs[0]:
        for b in pairs[1]:
            ab = a * s0 + b * s1
            for c in pairs[2]:
                bits |= np.left_shift(np.uint8(1), flat[ab + c])
    for ch in range(n_c):
        out[ch].masked_fill_(torch.from_numpy((bits & np.uint8(1 << ch)) == 0), -float("inf"))
    return out


def _cell_index(pos: np.ndarray, n: int, c_lo: int, ncell: int) -> np.ndarray:
    """Index (relative to a crop starting at ``c_lo`` with ``ncell`` cells) of the cell holding each
    canonical coordinate ``pos`` along an axis of ``n`` samples (border-clamped like grid_sample)."""
    p = np.clip(pos, 0.0, n - 1)
    return np.clip(np.floor(p).astype(np.int64) - c_lo, 0, ncell - 1)


def foreground_roi(coarse_labels: np.ndarray | torch.Tensor, canon: Geometry, geom: Geometry, margin_vox: int = 2
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Input-index box (lo, hi inclusive) covering the canonical foreground plus a margin; None if empty.

    ``coarse_labels`` may be a numpy array or a tensor on any device (only its bounding box is read).
    """
    box = _nonzero_box(coarse_labels)
    if box is None:
        return None
    clo = np.maximum(box[0] - margin_vox, 0)
    chi = np.minimum(box[1] + margin_vox, np.asarray(canon.shape) - 1)
    corners = np.array([[a, b, c] for a in (clo[0], chi[0]) for b in (clo[1], chi[1]) for c in (clo[2], chi[2])], float)
    idx = geom.lps_to_index(canon.index_to_lps(corners))
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.asarray(geom.shape) - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int), 0, np.asarray(geom.shape) - 1)
    return lo, hi


def _nonzero_box(labels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(lo, hi) inclusive index box of the non-zero voxels of a 3-D array or tensor; None if all zero.

    Axis projections (``any`` over the other two axes) instead of ``argwhere``: no index list of
    every foreground voxel is made, and a tensor stays on its device until three short vectors."""
    lo, hi = [], []
    for ax in range(3):
        others = tuple(a for a in range(3) if a != ax)
        if isinstance(labels, torch.Tensor):
            proj = (labels != 0).any(dim=others[1]).any(dim=others[0]).cpu().numpy()
        else:
            proj = np.asarray(labels != 0).any(axis=others)
        nz = np.flatnonzero(proj)
        if nz.size == 0:
            return None
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]))
    return np.asarray(lo), np.asarray(hi)
