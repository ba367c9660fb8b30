"""A foreign spine CT phantom generator, written independently of ``pipeline/train/phantom.py``.

Purpose: check that the pipeline generalises beyond the project's own generator (issue 2,
acceptance). Nothing here is imported from ``pipeline.train``; only the plain ``Geometry`` type,
the DICOM writers and (for the *truth*) the project's distance definition and rule engine are used.

How it differs from the project's generator
- Anatomy in a spine-local frame (u: left, v: posterior, w: along the canal), tilted rigidly
  (lordosis / lateral tilt) but straight: no sinusoidal curve.
- Canal: a circle or a *rounded triangle* (apex posterior, flat anterior wall), with a cord inside.
- Vertebral bodies: *superellipses* (exponent 2.3-3.6) with *concave endplates*; a cortical shell
  from an inner superellipse; pedicles as separate *cylinders*; laminae as an annular *arc*;
  a spinous process as a slab; transverse processes as rods; discs (label 0) between bodies.
- Soft tissue: a superellipse trunk with a fat layer, paraspinal and psoas muscles, aorta and IVC.
- HU: trabecular 120-250 with a cosine-lattice texture, cortex 600-1000, canal 10-35.
- Image formation: partial volume by supersampling along the slice axis (a box slice profile),
  a small in-plane Gaussian blur, and *coloured* (band-pass) noise whose amplitude grows with
  attenuation (Poisson-like), not white/Gaussian-smoothed noise of constant level.

Lesions (label 2): ellipsoids inside a vertebral body, anterior of the canal, at a designed
surface gap to the canal; ``gap_mm < 0`` intrudes into the canal (epidural extension; those canal
voxels become lesion). Types: lytic (HU 20-70), blastic (HU 600-1000), mixed (lytic core with a
sclerotic rim, about 45 % / 55 % of the volume).

Labels: 0 background (discs included), 1 spinal canal content, 2 metastasis, 3 bone.
Arrays follow the project convention: indexed [i, j, k], ``Geometry`` in LPS millimetres.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from pipeline.types import BONE, CANAL, LESION, Geometry

# material codes (index into the HU table)
(M_AIR, M_FAT, M_SOFT, M_MUSCLE, M_VESSEL, M_DISC, M_TRAB, M_CORTEX, M_POST, M_CANAL, M_CORD,
 M_LYTIC, M_BLASTIC) = range(13)
N_MATERIALS = 13

LESION_KINDS = ("lytic", "blastic", "mixed")
# designed surface-gap bands (mm): away from the rule thresholds 1, 5 and 10 mm
GAP_BANDS = {"contact": (-2.0, -0.8), "near": (2.8, 3.4), "mid": (7.0, 8.3), "far": (12.5, 19.0)}
MIXED_CORE_FRACTION = 0.77  # radius fraction of the lytic core of a mixed lesion (0.77**3 ~ 45 % of volume)


@dataclass(frozen=True)
class ForeignLesion:
    """A designed metastasis. Semi-axes in the spine frame: (lateral, AP, vertical) in mm."""

    kind: str
    band: str
    gap_mm: float
    level: int
    semi_axes_mm: tuple[float, float, float]
    lateral_mm: float = 0.0
    hu: float = 0.0  # lytic or blastic HU (mixed: the core's); the rim of a mixed lesion uses rim_hu
    rim_hu: float = 0.0

    @property
    def diameter_mm(self) -> float:
        return 2.0 * max(self.semi_axes_mm)


@dataclass
class ForeignSpec:
    """Everything that defines one foreign patient (mm, HU, degrees)."""

    seed: int
    centre_lps: tuple[float, float, float]  # canal axis point at the middle level
    tilt_deg: tuple[float, float]  # about L (lordosis) and about P (lateral tilt)
    canal_shape: str  # circle | triangle
    canal_radius: float  # circle radius, or rounding radius of the triangle
    tri_half_base: float  # triangle: half-length of the flat anterior base
    tri_base_v: float  # triangle: v of the (inner) base (negative: anterior)
    tri_apex_v: float  # triangle: v of the (inner) apex (positive: posterior)
    wall_gap: float  # body posterior boundary sits this far anterior of the canal's anterior wall
    body_half: tuple[float, float]  # (lateral, AP) half-axes of the body superellipse
    body_exp: float
    endplate_depth: float
    cortex: float
    levels: list[tuple[float, float]]  # (w0, w1) of each vertebral body
    pedicle_r: float
    lamina_thick: float
    spinous_len: float
    transverse_len: float
    trunk_half: tuple[float, float]
    trunk_exp: float
    back_v: float  # v of the posterior skin
    fat: float
    hu: dict[str, float]
    texture_hu: float
    noise_hu: float
    noise_band_mm: tuple[float, float]
    blur_mm: float
    supersample: int
    lesions: list[ForeignLesion] = field(default_factory=list)

    @property
    def canal_anterior_v(self) -> float:
        """v of the canal's anterior wall (the flat base for a triangle)."""
        if self.canal_shape == "circle":
            return -self.canal_radius
        return self.tri_base_v - self.canal_radius

    @property
    def canal_posterior_v(self) -> float:
        """v of the canal's most posterior point (the rounded apex for a triangle)."""
        if self.canal_shape == "circle":
            return self.canal_radius
        return self.tri_apex_v + self.canal_radius

    @property
    def canal_half_width(self) -> float:
        if self.canal_shape == "circle":
            return self.canal_radius
        return self.tri_half_base + self.canal_radius

    @property
    def body_centre_v(self) -> float:
        return self.canal_anterior_v - self.wall_gap - self.body_half[1]


@dataclass
class ForeignPhantom:
    hu: np.ndarray  # float32, (i, j, k)
    labels: np.ndarray  # uint8 0..3
    instances: np.ndarray  # uint8, lesion n -> n (1-based, order of spec.lesions)
    geometry: Geometry
    spec: ForeignSpec
    lesions: list[dict[str, Any]]  # per lesion: design, centre (LPS), analytic gap, voxels


# ----------------------------------------------------------------------------------------------
# random patients


def _rotation(tilt_deg: tuple[float, float]) -> np.ndarray:
    """Columns: the spine frame's u, v, w axes in LPS."""
    a, b = np.deg2rad(tilt_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rx @ ry


def draw_spec(seed: int, z_extent_mm: float, lesions: Sequence[tuple[str, str]] | None = None,
              n_lesions: int = 3) -> ForeignSpec:
    """A random foreign patient whose spine covers ``z_extent_mm`` (plus margins).

    ``lesions``: (kind, band) pairs to place (band in GAP_BANDS); default: ``n_lesions`` drawn so
    that a set of phantoms covers every band and kind.
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform
    shape = "triangle" if rng.random() < 0.5 else "circle"
    if shape == "circle":
        rc, half_base, base_v, apex_v = u(6.5, 8.5), 0.0, 0.0, 0.0
    else:
        rc, half_base = u(2.0, 3.0), u(5.0, 7.0)
        base_v, apex_v = -u(3.0, 4.5), u(4.0, 6.0)
    levels: list[tuple[float, float]] = []
    w = -z_extent_mm / 2 - 30 - u(0, 10)
    while w < z_extent_mm / 2 + 30:
        h = u(25.0, 30.0)
        levels.append((w, w + h))
        w += h + u(7.0, 10.0)
    trab = u(120, 250)
    hu = {"air": u(-1010, -990), "fat": u(-115, -80), "soft": u(25, 45), "muscle": u(40, 60),
          "vessel": u(35, 55), "disc": u(70, 100), "trab": trab, "cortex": u(600, 1000),
          "canal": u(10, 35), "cord": 0.0}
    hu["post"] = 0.45 * hu["trab"] + 0.55 * hu["cortex"]
    hu["cord"] = hu["canal"] + u(5, 12)
    spec = ForeignSpec(
        seed=seed,
        centre_lps=(u(-20, 20), u(20, 80), u(-300, 300)),
        tilt_deg=(u(-8, 8), u(-4, 4)),
        canal_shape=shape, canal_radius=rc, tri_half_base=half_base, tri_base_v=base_v, tri_apex_v=apex_v,
        wall_gap=u(0.0, 0.8),
        body_half=(u(20, 24), u(16, 18.5)),
        body_exp=u(2.3, 3.6),
        endplate_depth=u(1.0, 2.5),
        cortex=u(0.9, 1.5),
        levels=levels,
        pedicle_r=u(3.5, 5.0),
        lamina_thick=u(4.0, 6.0),
        spinous_len=u(25, 40),
        transverse_len=u(25, 40),
        trunk_half=(u(130, 170), u(95, 120)),
        trunk_exp=u(2.2, 3.0),
        back_v=u(55, 75),
        fat=u(8, 20),
        hu=hu,
        texture_hu=u(15, 35),
        noise_hu=u(8, 20),
        noise_band_mm=(u(0.4, 0.7), u(1.5, 3.0)),
        blur_mm=u(0.25, 0.5),
        supersample=3,
    )
    wanted = list(lesions) if lesions is not None else _default_lesion_mix(rng, n_lesions)
    spec.lesions = _place_lesions(spec, wanted, rng)
    return spec


def _default_lesion_mix(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    bands = list(GAP_BANDS)
    rng.shuffle(bands)
    kinds = list(LESION_KINDS)
    rng.shuffle(kinds)
    return [(kinds[i % 3], bands[i % 4]) for i in range(n)]


def _place_lesions(spec: ForeignSpec, wanted: Sequence[tuple[str, str]],
                   rng: np.random.Generator) -> list[ForeignLesion]:
    """One lesion per vertebra, central levels first, sized to fit inside the body."""
    mids = np.array([0.5 * (a + b) for a, b in spec.levels])
    order = [int(i) for i in np.argsort(np.abs(mids))]
    if len(wanted) > len(order):
        raise ValueError("more lesions than vertebrae")
    out: list[ForeignLesion] = []
    bx, by = spec.body_half
    depth = spec.wall_gap + 2 * by  # canal anterior wall -> body anterior boundary
    for (kind, band), level in zip(wanted, order):
        if kind not in LESION_KINDS or band not in GAP_BANDS:
            raise ValueError(f"unknown lesion {kind}/{band}")
        lo, hi = GAP_BANDS[band]
        gap = float(rng.uniform(lo, hi))
        w0, w1 = spec.levels[level]
        height = w1 - w0 - 2 * spec.endplate_depth - 2.0
        # room along AP: the lesion spans gap .. gap + 2 r_ap inside depth (1.5 mm anterior margin)
        max_ap = 0.5 * (depth - 1.5 - max(gap, 0.0))
        r_ap = float(min(12.5, max_ap, rng.uniform(4.0, 12.5)))
        if r_ap < 4.0:
            raise ValueError("vertebral body too small for the designed lesion")
        r_lat = float(np.clip(r_ap * rng.uniform(0.85, 1.15), 4.0, min(12.5, bx - 4.0)))
        r_w = float(np.clip(r_ap * rng.uniform(0.8, 1.1), 4.0, min(12.5, 0.5 * height)))
        if spec.canal_shape == "circle":  # a sphere on the midline: exact analytic gap to a cylinder
            r = min(r_ap, r_w, r_lat)
            lateral, axes = 0.0, (r, r, r)
        else:
            lateral = float(rng.uniform(-1, 1) * max(0.0, min(spec.tri_half_base, bx - 4.0 - r_lat) - 0.5))
            axes = (r_lat, r_ap, r_w)
        if kind == "lytic":
            h, rim = float(rng.uniform(20, 70)), 0.0
        elif kind == "blastic":
            h, rim = float(rng.uniform(600, 1000)), 0.0
        else:
            h, rim = float(rng.uniform(20, 60)), float(rng.uniform(650, 1000))
        out.append(ForeignLesion(kind=kind, band=band, gap_mm=gap, level=level,
                                 semi_axes_mm=tuple(float(a) for a in axes),  # type: ignore[arg-type]
                                 lateral_mm=lateral, hu=h, rim_hu=rim))
    return out


# ----------------------------------------------------------------------------------------------
# the anatomy


class _Body:
    """Evaluates materials, labels and lesion instances at LPS points."""

    def __init__(self, spec: ForeignSpec):
        self.s = spec
        self.rot = _rotation(spec.tilt_deg)
        self.centre = np.asarray(spec.centre_lps, float)
        self.w0 = np.array([a for a, _ in spec.levels])
        self.w1 = np.array([b for _, b in spec.levels])
        self.lesion_centres = [self._lesion_centre(ls) for ls in spec.lesions]
        g = np.random.default_rng(spec.seed + 17)
        self.tex_k = g.normal(size=(5, 3)) * (2 * np.pi / g.uniform(2.0, 4.0, size=(5, 1)))
        self.tex_ph = g.uniform(0, 2 * np.pi, 5)

    def to_local(self, lps: np.ndarray) -> np.ndarray:
        return (lps - self.centre) @ self.rot

    def to_lps(self, local: np.ndarray) -> np.ndarray:
        return local @ self.rot.T + self.centre

    def _lesion_centre(self, ls: ForeignLesion) -> np.ndarray:
        s = self.s
        w0, w1 = s.levels[ls.level]
        r_ap = ls.semi_axes_mm[1]
        if s.canal_shape == "circle":
            v = -(s.canal_radius + ls.gap_mm + r_ap)  # lateral 0: distance to the axis = Rc + gap + r
        else:
            v = s.canal_anterior_v - ls.gap_mm - r_ap
        return np.array([ls.lateral_mm, v, 0.5 * (w0 + w1)])

    def analytic_gap(self, index: int) -> float:
        """Exact surface gap of the continuous lesion to the continuous canal (mm, 0 if they meet)."""
        return max(0.0, self.s.lesions[index].gap_mm)

    def canal_distance(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Distance (mm, in the axial plane) from (u, v) to the canal's cross-section; <= 0 inside."""
        s = self.s
        if s.canal_shape == "circle":
            return np.sqrt(u * u + v * v) - s.canal_radius
        return _dist_to_triangle(u, v, s.tri_half_base, s.tri_base_v, s.tri_apex_v) - s.canal_radius

    def canal_mask(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.canal_distance(u, v) <= 0.0

    def classify(self, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(material, label, lesion instance) for (N, 3) LPS points."""
        q = self.to_local(np.asarray(lps, float).reshape(-1, 3))
        return self.classify_local(q[:, 0].copy(), q[:, 1].copy(), q[:, 2].copy())

    def classify_local(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(material, label, lesion instance) at spine-frame points (u, v, w), flat arrays in mm."""
        s = self.s
        n = len(u)
        mat = np.full(n, M_AIR, np.uint8)
        lab = np.zeros(n, np.uint8)
        inst = np.zeros(n, np.uint8)
        # trunk
        ta, tb = s.trunk_half
        tv = s.back_v - tb
        e = s.trunk_exp
        trunk = np.abs(u / ta) ** e + np.abs((v - tv) / tb) ** e <= 1.0
        inner = np.abs(u / (ta - s.fat)) ** e + np.abs((v - tv) / (tb - s.fat)) ** e <= 1.0
        mat[trunk] = M_FAT
        mat[inner] = M_SOFT
        bx, by = s.body_half
        vb = s.body_centre_v
        for side in (-1.0, 1.0):
            para = inner & (((u - side * 27.0) / 19.0) ** 2 + ((v - 33.0) / 24.0) ** 2 <= 1.0)
            psoas = inner & (((u - side * (bx + 13.0)) / 11.0) ** 2 + ((v - vb) / 15.0) ** 2 <= 1.0)
            mat[para | psoas] = M_MUSCLE
        aorta = ((u - 14.0) ** 2 + (v - (vb - by - 13.0)) ** 2) <= 11.0 ** 2
        ivc = ((u + 20.0) / 12.0) ** 2 + ((v - (vb - by - 10.0)) / 8.0) ** 2 <= 1.0
        mat[inner & (aorta | ivc)] = M_VESSEL
        # levels: which vertebra (or the disc above it) each point is in
        lev = np.clip(np.searchsorted(self.w0, w, side="right") - 1, 0, len(self.w0) - 1)
        w0, w1 = self.w0[lev], self.w1[lev]
        in_level = (w >= w0) & (w <= w1)
        # vertebral body: superellipse with concave endplates and a cortical shell
        pe = s.body_exp
        rho = np.abs(u / bx) ** pe + np.abs((v - vb) / by) ** pe
        outline = rho <= 1.0
        dip = s.endplate_depth * (1.0 - np.clip(rho, 0.0, 1.0))
        body = outline & (w >= w0 + dip) & (w <= w1 - dip)
        mat[outline & ~body] = M_DISC  # discs and the endplate concavities: label 0
        rho_in = np.abs(u / (bx - s.cortex)) ** pe + np.abs((v - vb) / (by - s.cortex)) ** pe
        endplate = (w < w0 + dip + s.cortex) | (w > w1 - dip - s.cortex)
        mat[body] = M_TRAB
        mat[body & ((rho_in > 1.0) | endplate)] = M_CORTEX
        # posterior elements, central part of each level. The neural arch hugs the canal (the canal
        # label is the whole content of the vertebral foramen): pedicle cylinders tangent to its
        # lateral walls, a lamina band along its posterior wall, then the spinous process.
        frac = np.where(in_level, (w - w0) / np.maximum(w1 - w0, 1e-6), -1.0)
        hw = s.canal_half_width
        pu = hw + s.pedicle_r - 0.3
        v_post = s.canal_posterior_v
        pedicle = np.zeros(n, bool)
        for side in (-1.0, 1.0):
            pedicle |= ((u - side * pu) ** 2 + ((w - 0.5 * (w0 + w1)) * 1.3) ** 2 <= s.pedicle_r ** 2) \
                & (v >= vb + by - 3.0) & (v <= 0.5 * v_post)
        pedicle &= in_level
        d_canal = self.canal_distance(u, v)
        lamina = (frac > 0.2) & (frac < 0.8) & (d_canal > 0) & (d_canal <= s.lamina_thick) & (v >= 0.0)
        spinous = (frac > 0.25) & (frac < 0.75) & (np.abs(u) <= 3.0) & (v >= v_post) \
            & (v <= v_post + s.lamina_thick + s.spinous_len)
        transverse = (frac > 0.35) & (frac < 0.65) & (np.abs(v - 0.3 * v_post) <= 3.5) \
            & (np.abs(u) >= pu) & (np.abs(u) <= pu + s.transverse_len)
        post = (pedicle | lamina | spinous | transverse) & ~body
        mat[post] = M_POST
        bone = body | post
        lab[bone] = BONE
        # canal (through every level) with a cord inside
        canal = self.canal_mask(u, v)
        mat[canal] = M_CANAL
        cord_v = 0.5 * (s.canal_anterior_v + s.canal_posterior_v)
        mat[canal & (u * u + (v - cord_v) ** 2 <= 3.5 ** 2)] = M_CORD
        lab[canal] = CANAL
        # lesions (full ellipsoids; inside the body by design, into the canal when gap < 0)
        for idx, (ls, c) in enumerate(zip(s.lesions, self.lesion_centres), start=1):
            au, av, aw = ls.semi_axes_mm
            rr = ((u - c[0]) / au) ** 2 + ((v - c[1]) / av) ** 2 + ((w - c[2]) / aw) ** 2
            m = rr <= 1.0
            if not m.any():
                continue
            lab[m] = LESION
            inst[m] = idx
            if ls.kind == "lytic":
                mat[m] = M_LYTIC
            elif ls.kind == "blastic":
                mat[m] = M_BLASTIC
            else:
                core = m & (rr <= MIXED_CORE_FRACTION ** 2)
                mat[m] = M_BLASTIC
                mat[core] = M_LYTIC
        return mat, lab, inst

    def texture(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Trabecular texture in [-1, 1]: a lattice of cosines in the spine frame (mm)."""
        k = self.tex_k
        phase = u[:, None] * k[:, 0] + v[:, None] * k[:, 1] + w[:, None] * k[:, 2] + self.tex_ph
        return np.cos(phase).mean(axis=1) * math.sqrt(2)


def _dist_to_triangle(u: np.ndarray, v: np.ndarray, half_base: float, base_v: float, apex_v: float) -> np.ndarray:
    """Distance (mm) from (u, v) to the filled triangle with base y=base_v, |u|<=half_base, apex (0, apex_v)."""
    verts = np.array([[-half_base, base_v], [half_base, base_v], [0.0, apex_v]])
    p = np.stack([u, v], axis=1)
    best = np.full(len(u), np.inf)
    inside = np.ones(len(u), bool)
    for a, b in ((verts[0], verts[1]), (verts[1], verts[2]), (verts[2], verts[0])):
        ab = b - a
        t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
        proj = a + t[:, None] * ab
        best = np.minimum(best, np.linalg.norm(p - proj, axis=1))
        cross = ab[0] * (p[:, 1] - a[1]) - ab[1] * (p[:, 0] - a[0])
        inside &= cross >= 0  # counter-clockwise vertices: inside is on the left of every edge
    return np.where(inside, 0.0, best)


def _hu_table(spec: ForeignSpec) -> np.ndarray:
    h = spec.hu
    return np.array([h["air"], h["fat"], h["soft"], h["muscle"], h["vessel"], h["disc"], h["trab"], h["cortex"],
                     h["post"], h["canal"], h["cord"], 0.0, 0.0], np.float64)


# ----------------------------------------------------------------------------------------------
# rendering


def render(spec: ForeignSpec, geometry: Geometry, slab: int = 6) -> ForeignPhantom:
    """Sample the patient on ``geometry``: HU with partial volume, blur and noise; exact labels.

    Labels are the class at each voxel centre. HU averages ``spec.supersample`` points spread
    over the slice thickness (array axis k), then an in-plane Gaussian blur and coloured noise.
    """
    body = _Body(spec)
    table = _hu_table(spec)
    ni, nj, nk = geometry.shape
    hu = np.empty(geometry.shape, np.float32)
    labels = np.empty(geometry.shape, np.uint8)
    inst = np.empty(geometry.shape, np.uint8)
    # spine-frame coordinates are affine in the voxel index: q = M (i, j, k) + b
    m = body.rot.T @ (np.asarray(geometry.direction) * np.asarray(geometry.spacing)[None, :])
    b = body.rot.T @ (np.asarray(geometry.origin) - body.centre)
    ii, jj = np.meshgrid(np.arange(ni, dtype=np.float64), np.arange(nj, dtype=np.float64), indexing="ij")
    plane = [m[r, 0] * ii + m[r, 1] * jj + b[r] for r in range(3)]  # (ni, nj) per local axis
    ns = max(1, int(spec.supersample))
    offsets = (np.arange(ns) + 0.5) / ns - 0.5
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        nkk = k1 - k0
        acc = np.zeros((ni, nj, nkk), np.float64)
        for off in [0.0] + [o for o in offsets if abs(o) > 1e-9]:
            kk = np.arange(k0, k1, dtype=np.float64) + off
            u, v, w = ((plane[r][..., None] + m[r, 2] * kk).ravel() for r in range(3))
            mat, lab, ins = body.classify_local(u, v, w)
            val = table[mat]
            for idx, ls in enumerate(spec.lesions, start=1):
                sel = ins == idx
                if sel.any():
                    val[sel & (mat == M_LYTIC)] = ls.hu
                    val[sel & (mat == M_BLASTIC)] = ls.rim_hu if ls.kind == "mixed" else ls.hu
            trab = (mat == M_TRAB) | (mat == M_POST)
            val[trab] += spec.texture_hu * body.texture(u[trab], v[trab], w[trab])
            if off == 0.0:
                labels[:, :, k0:k1] = lab.reshape(ni, nj, nkk)
                inst[:, :, k0:k1] = ins.reshape(ni, nj, nkk)
                if ns % 2 == 0:
                    continue  # even counts: the centre is not one of the supersamples
            acc += val.reshape(ni, nj, nkk)
        hu[:, :, k0:k1] = (acc / ns).astype(np.float32)
    sp = np.asarray(geometry.spacing)
    rng = np.random.default_rng(spec.seed + 99)
    sigma = np.array([spec.blur_mm / sp[0], spec.blur_mm / sp[1], 0.0])
    hu = ndimage.gaussian_filter(hu, sigma, truncate=3.0).astype(np.float32)
    white = rng.normal(0.0, 1.0, geometry.shape).astype(np.float32)
    lo, hi = spec.noise_band_mm
    band = ndimage.gaussian_filter(white, lo / sp) - ndimage.gaussian_filter(white, hi / sp)
    band /= max(float(band.std()), 1e-6)
    level = np.sqrt(np.clip((hu + 1000.0) / 1000.0, 0.05, 2.5))  # more photons absorbed, more noise
    hu += (spec.noise_hu * level * band).astype(np.float32)
    truth = []
    for idx, (ls, c) in enumerate(zip(spec.lesions, body.lesion_centres), start=1):
        truth.append({"index": idx, "kind": ls.kind, "band": ls.band, "designed_gap_mm": ls.gap_mm,
                      "analytic_gap_mm": body.analytic_gap(idx - 1), "diameter_mm": ls.diameter_mm,
                      "semi_axes_mm": list(ls.semi_axes_mm), "level": ls.level,
                      "centre_lps_mm": [float(x) for x in body.to_lps(c[None])[0]],
                      "voxels": int((inst == idx).sum())})
    return ForeignPhantom(hu, labels, inst, geometry, spec, truth)


# ----------------------------------------------------------------------------------------------
# grids and storage orientations

# in-plane (row, column) directions of axial CT for each patient position (DICOM conventions)
POSITIONS = {"HFS": ((1, 0, 0), (0, 1, 0)), "FFS": ((-1, 0, 0), (0, 1, 0)),
             "HFP": ((-1, 0, 0), (0, -1, 0)), "FFP": ((1, 0, 0), (0, -1, 0))}


def axial_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_lps: Sequence[float],
                   position: str = "HFS", flip_rows: bool = False, flip_cols: bool = False,
                   swap_inplane: bool = False, slices_up: bool | None = None) -> Geometry:
    """An axial grid centred on ``centre_lps``.

    ``position``: HFS/FFS/HFP/FFP in-plane directions; ``flip_rows``/``flip_cols`` reverse the row /
    column direction; ``swap_inplane`` exchanges them (rows along P); ``slices_up``: k along +S
    (True), -S (False) or the right-handed normal row x column (None).
    """
    row, col = (np.asarray(v, float) for v in POSITIONS[position])
    if flip_rows:
        row = -row
    if flip_cols:
        col = -col
    if swap_inplane:
        row, col = col, row
    normal = np.cross(row, col)
    if slices_up is not None and (normal[2] > 0) != slices_up:
        normal = -normal
    direction = np.stack([row, col, normal], axis=1)
    extent = (np.asarray(shape) - 1) * np.asarray(spacing)
    origin = np.asarray(centre_lps, float) - direction @ (extent / 2)
    return Geometry(shape=shape, spacing=spacing, origin=tuple(origin), direction=direction)


def grid_centre(spec: ForeignSpec) -> np.ndarray:
    """Where to centre a grid: on the spine, a little anterior of the canal, midway along the lesions."""
    body = _Body(spec)
    w = 0.0
    if spec.lesions:
        lo = min(c[2] - ls.semi_axes_mm[2] for ls, c in zip(spec.lesions, body.lesion_centres))
        hi = max(c[2] + ls.semi_axes_mm[2] for ls, c in zip(spec.lesions, body.lesion_centres))
        w = 0.5 * (lo + hi)
    return body.to_lps(np.array([[0.0, spec.body_centre_v * 0.45, w]]))[0]


def reorient(arrays: Sequence[np.ndarray], geometry: Geometry, swap_ij: bool = False,
             flips: tuple[bool, bool, bool] = (False, False, False)) -> tuple[list[np.ndarray], Geometry]:
    """The same voxels stored differently: exchange axes i/j, then reverse the flagged axes.

    Exact (no resampling): every voxel keeps its LPS position.
    """
    out = [np.asarray(a) for a in arrays]
    d = np.array(geometry.direction, float)
    sp = list(geometry.spacing)
    shape = list(geometry.shape)
    origin = np.asarray(geometry.origin, float)
    if swap_ij:
        out = [np.ascontiguousarray(np.swapaxes(a, 0, 1)) for a in out]
        d = d[:, [1, 0, 2]]
        sp = [sp[1], sp[0], sp[2]]
        shape = [shape[1], shape[0], shape[2]]
    for ax, f in enumerate(flips):
        if f:
            out = [np.ascontiguousarray(np.flip(a, axis=ax)) for a in out]
            origin = origin + d[:, ax] * sp[ax] * (shape[ax] - 1)
            d[:, ax] = -d[:, ax]
    return out, Geometry(shape=tuple(shape), spacing=tuple(sp), origin=tuple(origin), direction=d)


def patient_position_of(direction: np.ndarray) -> str:
    """A PatientPosition consistent with the in-plane directions (for the DICOM header)."""
    row = np.asarray(direction)[:, 0]
    col = np.asarray(direction)[:, 1]
    prone = (abs(col[1]) > 0.5 and col[1] < 0) or (abs(row[1]) > 0.5 and row[1] < 0)
    feet = (abs(row[0]) > 0.5 and (row[0] < 0) != prone)
    return ("FF" if feet else "HF") + ("P" if prone else "S")


def make_foreign(seed: int, shape: tuple[int, int, int] = (160, 160, 60),
                 spacing: tuple[float, float, float] = (0.9, 0.9, 2.0), position: str = "HFS",
                 flip_rows: bool = False, flip_cols: bool = False, swap_inplane: bool = False,
                 slices_up: bool | None = None, lesions: Sequence[tuple[str, str]] | None = None,
                 n_lesions: int = 3) -> ForeignPhantom:
    """Draw a foreign patient and render it on an axial grid of ``shape`` x ``spacing``."""
    spec = draw_spec(seed, z_extent_mm=shape[2] * spacing[2], lesions=lesions, n_lesions=n_lesions)
    geom = axial_geometry(shape, spacing, grid_centre(spec), position, flip_rows, flip_cols, swap_inplane,
                          slices_up)
    check_lesions_inside(spec, geom)
    return render(spec, geom)


def check_lesions_inside(spec: ForeignSpec, geom: Geometry, margin_vox: float = 2.0) -> None:
    """ValueError unless every lesion's bounding box lies inside the grid (``margin_vox`` voxels in)."""
    body = _Body(spec)
    for n, (ls, c) in enumerate(zip(spec.lesions, body.lesion_centres), start=1):
        corners = np.array([[c[0] + a * ls.semi_axes_mm[0], c[1] + b * ls.semi_axes_mm[1], c[2] + g * ls.semi_axes_mm[2]]
                            for a in (-1, 1) for b in (-1, 1) for g in (-1, 1)])
        idx = geom.lps_to_index(body.to_lps(corners))
        if (idx < margin_vox).any() or (idx > np.asarray(geom.shape) - 1 - margin_vox).any():
            raise ValueError(f"lesion {n} ({ls.kind}, {ls.band}) does not fit inside the grid; use more slices")


# ----------------------------------------------------------------------------------------------
# truth and storage


def truth_measurements(ph: ForeignPhantom, intent: str = "palliative", rules: Any = None) -> list[dict[str, Any]]:
    """Per lesion of a foreign phantom: its design plus :func:`truth_from_labels`."""
    return truth_from_labels(ph.labels, ph.instances, ph.geometry, ph.lesions, ph.hu, intent, rules)


def truth_from_labels(labels: np.ndarray, instances: np.ndarray, geom: Geometry, lesions: Sequence[dict[str, Any]],
                      hu: np.ndarray | None = None, intent: str = "palliative",
                      rules: Any = None) -> list[dict[str, Any]]:
    """The project's measurements on TRUE label maps, and the rule-table primary.

    ``lesions``: one dict per instance with ``index`` and ``kind`` (lytic/blastic/mixed, known by
    construction). Distance: box gap between the lesion's voxels and the canal's voxels
    (``mask_distance``), closest points in LPS; diameter: the project's Feret definition;
    location: vertebral body; solitary: exactly one lesion. The primary is ``plan_lesion`` on a
    ``Lesion`` built from these numbers.
    """
    from pipeline.measure.distance import VoxelSurface, mask_distance
    from pipeline.measure.shape import max_feret_diameter
    from pipeline.plan.engine import load_rules, plan_lesion
    from pipeline.types import Lesion

    rules = rules or load_rules(None)
    canal = labels == CANAL
    n = len(lesions)
    out = []
    for t in lesions:
        mask = instances == t["index"]
        if not mask.any():
            raise ValueError(f"lesion {t['index']} has no voxels on this grid")
        pair = mask_distance(mask, canal, geom)
        pa, pb = pair.points_lps(geom)
        surf = VoxelSurface.from_mask(mask, geom.spacing)
        diam = max_feret_diameter(surf.indices, geom.spacing).diameter_mm
        idx = np.argwhere(mask)
        lesion = Lesion(
            id=int(t["index"]), voxel_count=int(mask.sum()),
            volume_ml=float(mask.sum() * geom.voxel_volume_mm3 / 1000),
            max_diameter_mm=diam, mean_hu=float(hu[mask].mean()) if hu is not None else 0.0, type=t["kind"],
            bone_reference_hu=None, location="vertebral_body",
            centroid_lps_mm=tuple(float(x) for x in geom.index_to_lps(idx.mean(axis=0))[0]),  # type: ignore[arg-type]
            bbox_ijk=(tuple(idx.min(axis=0)), tuple(idx.max(axis=0) + 1)),  # type: ignore[arg-type]
            min_distance_to_canal_mm=pair.distance_mm, closest_point_lesion_lps_mm=tuple(pa),  # type: ignore[arg-type]
            closest_point_canal_lps_mm=tuple(pb), canal_contact=pair.distance_mm == 0.0,  # type: ignore[arg-type]
            distance_uncertainty_mm=0.0, solitary=n == 1)
        rec = plan_lesion(lesion, rules, intent, n == 1)
        out.append({**t, "distance_mm": float(pair.distance_mm), "closest_point_lesion_lps_mm": [float(x) for x in pa],
                    "closest_point_canal_lps_mm": [float(x) for x in pb], "max_diameter_mm": float(diam),
                    "primary": rec.primary, "intent": intent})
    return out


def write_study(ph: ForeignPhantom, study_dir: Path, truth_dir: Path | None = None, *,
                patient_name: str = "FOREIGN^PHANTOM", patient_id: str = "FOREIGN",
                study_date: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """Write the CT (random file names, shuffled instance numbers) and a localizer in ``study_dir``.

    With ``truth_dir``: ``labels.npz`` (labels, instances, affine_lps) and ``truth.json``.
    Returns the truth dictionary (UIDs, geometry, lesions with their true measurements).
    """
    from pipeline.io.dicom_write import write_ct_series, write_localizer

    study_dir = Path(study_dir)
    position = patient_position_of(ph.geometry.direction)
    src = write_ct_series(np.round(ph.hu).astype(np.int16), ph.geometry, study_dir / "ct", file_names="random",
                          instance_numbers="shuffled", patient_position=position,
                          series_description="foreign phantom", patient_name=patient_name,
                          patient_id=patient_id, study_date=study_date, seed=seed)
    write_localizer(study_dir / "scout", study_uid=src.study_instance_uid,
                    frame_of_reference_uid=src.frame_of_reference_uid, patient_name=patient_name,
                    patient_id=patient_id, study_date=study_date)
    truth = {
        "study_instance_uid": src.study_instance_uid, "series_instance_uid": src.series_instance_uid,
        "patient_position": position, "shape": list(ph.geometry.shape), "spacing_mm": list(ph.geometry.spacing),
        "direction": np.asarray(ph.geometry.direction).tolist(), "affine_lps": ph.geometry.affine_lps.tolist(),
        "spec": _jsonable(asdict(ph.spec)), "lesions": truth_measurements(ph),
    }
    if truth_dir is not None:
        truth_dir = Path(truth_dir)
        truth_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(truth_dir / "labels.npz", labels=ph.labels, instances=ph.instances,
                            affine_lps=ph.geometry.affine_lps)
        (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
