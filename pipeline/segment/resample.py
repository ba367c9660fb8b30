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
        t = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
        t = t.permute(*axis_for_lps)
        flips = [d for d in range(3) if sign[d] < 0]
        if flips:
            t = torch.flip(t, dims=flips)
        t = t[None, None]
        if tuple(t.shape[2:]) != canon.shape:
            t = F.interpolate(t, size=canon.shape, mode="trilinear", align_corners=True)
        return t.contiguous()
    # oblique: general affine sampling
    src = torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)[None, None]
    out = torch.empty((1, 1) + canon.shape, dtype=torch.float32)
    for k0, k1, grid in _slab_grids(canon, geom, slab=max(1, int(4e6 // (canon.shape[0] * canon.shape[1])))):
        out[0, 0, :, :, k0:k1] = _sample(src, grid, "bilinear").permute(0, 1, 4, 3, 2)[0, 0]
    return out


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


def logits_to_labels(logits: torch.Tensor, canon: Geometry, geom: Geometry, slab_voxels: int = 8_000_000,
                     roi_ijk: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Trilinear-sample canonical logits (1, C, X, Y, Z) at ``geom``'s voxel centres; argmax -> uint8.

    Works slab by slab along the input's k axis. ``roi_ijk`` (lo, hi inclusive input indices)
    restricts the work to a box; voxels outside it are background (0).
    """
    labels = np.zeros(geom.shape, np.uint8)
    if roi_ijk is None:
        lo, hi = np.zeros(3, int), np.asarray(geom.shape) - 1
    else:
        lo, hi = roi_ijk
    sub_shape = tuple(int(v) for v in hi - lo + 1)
    if min(sub_shape) <= 0:
        return labels
    sub_origin = geom.index_to_lps(lo[None])[0]
    sub = Geometry(shape=sub_shape, spacing=geom.spacing, origin=tuple(sub_origin), direction=geom.direction)
    slab = max(1, int(slab_voxels // (sub_shape[0] * sub_shape[1])))
    src = logits.float()
    for k0, k1, grid in _slab_grids(sub, canon, slab):
        out = _sample(src, grid, "bilinear")  # (1, C, K, J, I)
        lab = out[0].argmax(dim=0).to(torch.uint8).permute(2, 1, 0).numpy()  # (I, J, K)
        labels[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2] + k0:lo[2] + k1] = lab
    return labels


def foreground_roi(coarse_labels: np.ndarray, canon: Geometry, geom: Geometry, margin_vox: int = 2
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Input-index box (lo, hi inclusive) covering the canonical foreground plus a margin; None if empty."""
    fg = np.argwhere(coarse_labels > 0)
    if fg.size == 0:
        return None
    clo = np.maximum(fg.min(axis=0) - margin_vox, 0)
    chi = np.minimum(fg.max(axis=0) + margin_vox, np.asarray(canon.shape) - 1)
    corners = np.array([[a, b, c] for a in (clo[0], chi[0]) for b in (clo[1], chi[1]) for c in (clo[2], chi[2])], float)
    idx = geom.lps_to_index(canon.index_to_lps(corners))
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.asarray(geom.shape) - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int), 0, np.asarray(geom.shape) - 1)
    return lo, hi
