"""Key images: an axial and a sagittal plane through a lesion's closest point (Pillow only).

Planes are sampled in patient space (LPS mm) with ``scipy.ndimage.map_coordinates`` on a crop
of the volume around the plane, never on the whole volume, so any grid (anisotropic, oblique,
flipped, feet-first) is shown with a true aspect ratio and the right orientation.

Display convention (radiological):
- axial: patient right on the image's left (screen x = +L), anterior up (screen y = +P);
- sagittal: anterior on the image's left (screen x = +P), head up (screen y = -S).
Bone window (level 400 HU, width 1800 HU). Canal and lesion outlined in their label colours;
the shortest lesion-to-canal distance is drawn between the two closest points (projected
onto the plane) with its 3-D value in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from pipeline.report import codes
from pipeline.types import BONE, CANAL, LESION, Geometry

WINDOW_LEVEL, WINDOW_WIDTH = 400.0, 1800.0
PANEL_PX = 360
LINE_RGB = (0, 230, 118)
AIR_HU = -1024.0

# plane name -> (screen-x unit vector, screen-y unit vector) in LPS, plus the edge letters
PLANES: dict[str, tuple[np.ndarray, np.ndarray, tuple[str, str, str, str]]] = {
    "axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), ("R", "L", "A", "P")),
    "sagittal": (np.array([0, 1.0, 0]), np.array([0, 0, -1.0]), ("A", "P", "S", "I")),
}


@dataclass
class Plane:
    hu: np.ndarray  # (rows, cols) HU
    labels: np.ndarray  # (rows, cols) uint8
    center: np.ndarray  # LPS of the panel centre
    u: np.ndarray  # LPS direction of +column
    v: np.ndarray  # LPS direction of +row
    mm_per_px: float

    def to_pixel(self, lps: Any) -> tuple[float, float]:
        d = np.asarray(lps, dtype=np.float64) - self.center
        n = self.hu.shape[0]
        return (float(d @ self.u) / self.mm_per_px + (n - 1) / 2.0,
                float(d @ self.v) / self.mm_per_px + (n - 1) / 2.0)


def field_of_view_mm(lesion: dict[str, Any]) -> float:
    """Square field of view: the lesion and its canal point with margin, 60..200 mm."""
    need = 2.2 * float(lesion.get("max_diameter_mm") or 0.0)
    p, q = lesion.get("closest_point_lesion_lps_mm"), lesion.get("closest_point_canal_lps_mm")
    if p is not None and q is not None:
        need = max(need, 2.0 * float(np.linalg.norm(np.subtract(p, q))) + 30.0)
    return float(np.clip(need, 60.0, 200.0))


def sample_plane(hu: np.ndarray, labels: np.ndarray, geom: Geometry, center: np.ndarray, u: np.ndarray,
                 v: np.ndarray, fov_mm: float, n_px: int = PANEL_PX) -> Plane:
    """Sample HU (linear) and labels (nearest) on an n_px x n_px plane centred on ``center``."""
    mm = fov_mm / n_px
    offs = (np.arange(n_px) - (n_px - 1) / 2.0) * mm
    rr, cc = np.meshgrid(offs, offs, indexing="ij")
    lps = center[None, None, :] + cc[..., None] * u[None, None, :] + rr[..., None] * v[None, None, :]
    # (3, N): one contiguous row per axis, so the min/max and the crop offset run along memory
    idx = np.ascontiguousarray(lps_to_index_by_rows(geom, lps.reshape(-1, 3)).T)
    shape = np.array(geom.shape)
    idx_min, idx_max = idx.min(axis=1), idx.max(axis=1)
    lo = np.clip(np.floor(idx_min).astype(int) - 1, 0, shape - 1)
    hi = np.clip(np.ceil(idx_max).astype(int) + 2, 1, shape)
    if np.any(hi <= lo):
        return Plane(np.full((n_px, n_px), AIR_HU), np.zeros((n_px, n_px), np.uint8), center, u, v, mm)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = idx - lo[:, None]
    img = ndimage.map_coordinates(np.asarray(hu[crop], dtype=np.float32), local, order=1, mode="constant",
                                  cval=AIR_HU)
    lab = ndimage.map_coordinates(np.asarray(labels[crop], dtype=np.uint8), local, order=0, mode="constant", cval=0)
    # points that fall outside the volume (beyond half a voxel) are air, not edge-extended
    if np.any(idx_min < -0.5) or np.any(idx_max > shape - 0.5):
        outside = np.any((idx < -0.5) | (idx > (shape - 0.5)[:, None]), axis=0)
        img[outside] = AIR_HU
        lab[outside] = 0
    return Plane(img.reshape(n_px, n_px), lab.reshape(n_px, n_px).astype(np.uint8), center, u, v, mm)


def lps_to_index_by_rows(geom: Geometry, lps: np.ndarray, rows: int = 16384) -> np.ndarray:
    """``geom.lps_to_index(lps)`` computed on blocks of rows: the same numbers, without the cost.

    One (N, 3) @ (3, 3) product over a whole 360x360 plane goes to multi-threaded OpenBLAS,
    which took 35-40 ms on a busy 2-core machine; blocks of 16384 rows stay single-threaded
    (~1 ms in all). Every row is computed by the same kernel either way, so the values are
    identical (tests/test_report_speed_paths.py checks it).
    """
    lps = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
    if len(lps) <= rows:
        return geom.lps_to_index(lps)
    return np.concatenate([geom.lps_to_index(lps[r:r + rows]) for r in range(0, len(lps), rows)])


def _outline(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=2, border_value=0)
    return mask & ~inner


def render_panel(plane: Plane, lesion: dict[str, Any], title: str, letters: tuple[str, str, str, str],
                 label_meta: dict[int, dict[str, Any]]) -> Image.Image:
    """One windowed panel with outlines, the distance line, edge letters and a 10 mm scale bar."""
    g = np.clip((plane.hu - (WINDOW_LEVEL - WINDOW_WIDTH / 2)) / WINDOW_WIDTH, 0.0, 1.0)
    rgb = np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)
    bone_edge = _outline(plane.labels == BONE)
    rgb[bone_edge] = (0.6 * rgb[bone_edge] + 0.4 * np.array(codes.rgb(label_meta[BONE]))).astype(np.uint8)
    for label in (CANAL, LESION):
        rgb[_outline(plane.labels == label)] = codes.rgb(label_meta[label])
    img = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    n = img.width
    p, q = lesion.get("closest_point_lesion_lps_mm"), lesion.get("closest_point_canal_lps_mm")
    if p is not None and q is not None:
        a, b = plane.to_pixel(p), plane.to_pixel(q)
        draw.line([a, b], fill=LINE_RGB, width=2)
        for x, y in (a, b):
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=LINE_RGB, width=2)
        dist = lesion.get("min_distance_to_canal_mm")
        text = f"{dist:.1f} mm" if dist is not None else ""
        tx, ty = (a[0] + b[0]) / 2 + 6, (a[1] + b[1]) / 2 - 16
        tx, ty = float(np.clip(tx, 2, n - 70)), float(np.clip(ty, 2, n - 18))
        draw.rectangle([tx - 2, ty - 1, tx + 8 * len(text), ty + 15], fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=LINE_RGB, font=font)
    left, right, top, bottom = letters
    draw.text((4, n / 2 - 7), left, fill=(255, 255, 255), font=font)
    draw.text((n - 12, n / 2 - 7), right, fill=(255, 255, 255), font=font)
    draw.text((n / 2 - 4, 2), top, fill=(255, 255, 255), font=font)
    draw.text((n / 2 - 4, n - 16), bottom, fill=(255, 255, 255), font=font)
    bar = 10.0 / plane.mm_per_px
    draw.line([(n - 10 - bar, n - 8), (n - 10, n - 8)], fill=(255, 255, 255), width=2)
    draw.text((n - 10 - bar, n - 24), "10 mm", fill=(255, 255, 255), font=font)
    draw.text((4, 2), title, fill=(255, 255, 255), font=font)
    return img


def key_image(hu: np.ndarray, labels: np.ndarray, geom: Geometry, lesion: dict[str, Any],
              label_meta: dict[int, dict[str, Any]] | None = None) -> Image.Image:
    """Axial | sagittal panels through the lesion's closest point (centroid if no canal)."""
    meta = codes.label_meta(label_meta)
    center = lesion.get("closest_point_lesion_lps_mm") or lesion.get("centroid_lps_mm")
    center = np.asarray(center, dtype=np.float64)
    fov = field_of_view_mm(lesion)
    panels = []
    for name, (u, v, letters) in PLANES.items():
        plane = sample_plane(hu, labels, geom, center, u, v, fov)
        panels.append(render_panel(plane, lesion, f"lesion {lesion['id']} {name}", letters, meta))
    gap = 6
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out
