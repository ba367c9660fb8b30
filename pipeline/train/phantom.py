"""Synthetic spine CT phantoms with exact label maps.

The anatomy is defined by implicit shapes in *patient space* (LPS, mm) and sampled on any voxel
grid (any spacing, origin and orthonormal direction), so the same patient can be stored
head-first, feet-first, prone or flipped and must give the same answers. Shapes:
soft-tissue body with a fat layer, optional lungs and bowel gas, a curved spinal canal (label 1),
vertebrae (label 3: body with cortical shell and endplates, pedicles/laminae, spinous and
transverse processes, optional ribs), intervertebral discs (label 0), and metastases (label 2):
lytic (soft-tissue HU, may breach the cortex), blastic (dense) or mixed, with irregular
boundaries, placed at a chosen surface gap from the canal.

Randomised per phantom (``PhantomParams``): anatomy sizes and curvature, tissue HU (bone HU
varies with "age"), blur (partial volume), noise and its texture. With ``domain_randomise`` the
tissue HU ranges are widened SynthSeg-style so a network learns shape and context, not one look.

``Diversity`` (all off by default; off = the same random stream and the same arrays as before it
existed) adds domain randomisation drawn from its own stream (``[params.seed, 0xD1CE]``), so the
base patient is the same with it on or off: small lesions (radius 3-5 mm, often touching the canal,
mixed ones with a lytic core and a dense rim), low-contrast lytic lesions in low-density trabecular
bone, non-elliptic canal cross-sections (rounded triangle / trefoil, apex posterior) and CSF as
dense as the surrounding soft tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from pipeline.types import BONE, CANAL, LESION, Geometry

LESION_TYPES = ("lytic", "mixed", "blastic")
CANAL_SHAPES = ("ellipse", "triangle", "trefoil")
SMALL_LESION_RADIUS_MM = (3.0, 5.0)
LOW_CONTRAST_TRAB_HU = (100.0, 220.0)
LOW_CONTRAST_DELTA_HU = (20.0, 80.0)  # trabecular HU minus lytic HU
CANAL_SHAPE_K = {"ellipse": (0.0, 0.0), "triangle": (0.12, 0.22), "trefoil": (0.26, 0.36)}


@dataclass
class Diversity:
    """Extra domain randomisation of the generator (``data.phantom.diversity``); all off by default.

    - ``small_lesion_prob``: per lesion, make it small (radius 3-5 mm, little irregularity; half of
      them touch or nearly touch the canal; mixed ones get a lytic core with a dense rim half the time);
    - ``low_contrast_lytic_prob``: per phantom, trabecular bone 100-220 HU and lytic tissue 20-80 HU
      below it (at least one lesion, if any, becomes lytic);
    - ``canal_shapes``: canal cross-sections drawn uniformly from these (``ellipse``, ``triangle``,
      ``trefoil``: apex posterior, flat anterior wall at the ellipse's place);
    - ``csf_like_tissue_prob``: per phantom, CSF HU = soft tissue HU -15..+5.
    """

    small_lesion_prob: float = 0.0
    low_contrast_lytic_prob: float = 0.0
    canal_shapes: tuple[str, ...] = ("ellipse",)
    csf_like_tissue_prob: float = 0.0

    def __post_init__(self) -> None:
        self.canal_shapes = tuple(self.canal_shapes)
        bad = set(self.canal_shapes) - set(CANAL_SHAPES)
        if bad or not self.canal_shapes:
            raise ValueError(f"canal_shapes must be a non-empty subset of {CANAL_SHAPES}, got {self.canal_shapes}")
        for name in ("small_lesion_prob", "low_contrast_lytic_prob", "csf_like_tissue_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    @property
    def active(self) -> bool:
        return bool(self.small_lesion_prob or self.low_contrast_lytic_prob or self.csf_like_tissue_prob
                    or self.canal_shapes != ("ellipse",))


@dataclass
class LesionSpec:
    """A metastasis to insert. ``gap_mm``: designed surface gap to the canal (<= 0 intrudes)."""

    type: str = "lytic"
    site: str = "body"  # body | posterior
    level: int | None = None  # vertebra index; None = random
    radius_mm: float = 8.0
    gap_mm: float = 6.0
    lateral_mm: float = 0.0  # offset left/right of the midline
    elongation: tuple[float, float, float] = (1.0, 1.0, 1.0)
    irregularity: float = 0.15
    mix_pattern: str = "random"  # mixed lesions: random partition | rim (lytic core, dense rim)


@dataclass
class PhantomParams:
    """Everything random about a phantom, drawn by ``draw_params``."""

    origin_lps: tuple[float, float, float]
    tilt_deg: tuple[float, float]
    canal_radii: tuple[float, float]
    curve: tuple[float, float, float, float, float, float]  # amp_x, lam_x, ph_x, amp_y, lam_y, ph_y
    level_z: list[tuple[float, float]]  # (z_start, z_end) of each vertebra, mm along S
    body_radii: tuple[float, float]
    body_gap: float
    cortex_mm: float
    arch_mm: float
    spinous_len: float
    transverse_len: float
    ribs: bool
    trunk_radii: tuple[float, float]
    trunk_centre_y: float
    fat_mm: float
    lungs: bool
    gas_blobs: int
    table: bool
    hu: dict[str, float]
    blur_mm: float
    noise_hu: float
    noise_corr: float
    lesions: list[LesionSpec] = field(default_factory=list)
    seed: int = 0
    lesion_zone_mm: float = 60.0  # lesions go in levels whose middle lies within +-this of the centre
    canal_shape: str = "ellipse"  # ellipse | triangle | trefoil (Diversity)
    canal_shape_k: float = 0.0  # strength of the 3-fold term of triangle / trefoil canals
    lytic_hu: float | None = None  # fixed lytic HU (low-contrast lesions, Diversity); None: drawn in tissue_hu


def draw_params(rng: np.random.Generator, n_lesions: int | None = None, lesions: list[LesionSpec] | None = None,
                domain_randomise: bool = False, z_extent_mm: float = 200.0,
                diversity: Diversity | None = None) -> PhantomParams:
    """Draw a random patient. ``z_extent_mm`` is the cranio-caudal length of spine to build."""
    u = rng.uniform
    levels = []
    z = -z_extent_mm / 2 - u(0, 20)
    while z < z_extent_mm / 2 + 20:
        h = u(17, 30)
        levels.append((z, z + h))
        z += h + u(5, 10)
    bone_trab = u(90, 300)
    hu = {
        "air": -1000 + u(-20, 20), "fat": u(-130, -70), "soft": u(20, 60), "muscle": u(35, 65),
        "organ": u(20, 70), "lung": u(-900, -750), "csf": u(0, 40), "disc": u(60, 110),
        "trab": bone_trab, "cortex": u(max(450, bone_trab + 250), 1300), "arch": 0.0,
        "table": u(-200, 300),
    }
    hu["arch"] = 0.5 * (hu["trab"] + hu["cortex"]) + u(-80, 80)
    if domain_randomise:  # SynthSeg-style: wide, partly unphysical contrasts keep ordering of bone
        hu.update(csf=u(-60, 120), disc=u(0, 200), soft=u(-50, 120), muscle=u(-20, 140), organ=u(-100, 200),
                  fat=u(-250, 0), trab=u(60, 420))
        hu["cortex"] = u(max(300, hu["trab"] + 150), 1600)
        hu["arch"] = 0.5 * (hu["trab"] + hu["cortex"]) + u(-120, 120)
    canal = (u(6.5, 12.0), u(6.0, 10.0))
    params = PhantomParams(
        origin_lps=(u(-30, 30), u(40, 110), u(-200, 200)),
        tilt_deg=(u(-6, 6), u(-6, 6)),
        canal_radii=canal,
        curve=(u(0, 6), u(250, 600), u(0, 6.3), u(0, 12), u(300, 700), u(0, 6.3)),
        level_z=levels,
        body_radii=(u(16, 28), u(12, 20)),
        body_gap=u(0.5, 2.5),
        cortex_mm=u(0.8, 2.0),
        arch_mm=u(4.0, 8.0),
        spinous_len=u(22, 45),
        transverse_len=u(18, 35),
        ribs=bool(rng.random() < 0.5),
        trunk_radii=(u(120, 185), u(85, 135)),
        trunk_centre_y=u(-70, -35),
        fat_mm=u(4, 28),
        lungs=bool(rng.random() < 0.4),
        gas_blobs=int(rng.integers(0, 5)),
        table=bool(rng.random() < 0.6),
        hu=hu,
        blur_mm=u(0.3, 1.2),
        noise_hu=u(4, 45) if not domain_randomise else u(0, 80),
        noise_corr=u(0.0, 1.2),
        seed=int(rng.integers(0, 2**31 - 1)),
        lesion_zone_mm=max(8.0, z_extent_mm / 2 - 32.0),
    )
    if lesions is None:
        n = int(rng.integers(0, 5)) if n_lesions is None else n_lesions
        lesions = [random_lesion(rng) for _ in range(n)]
    params.lesions = lesions
    if diversity is not None and diversity.active:
        diversify(params, diversity)
    return params


def diversify(params: PhantomParams, d: Diversity) -> None:
    """Apply ``Diversity`` in place, from a stream of its own (the base draws are untouched)."""
    g = np.random.default_rng([params.seed, 0xD1CE])
    u = g.uniform
    hu = params.hu
    params.lesions = list(params.lesions)  # a copy: specs are replaced, never edited (the caller's list stays)
    for i, ls in enumerate(params.lesions):
        if g.random() < d.small_lesion_prob:
            r = u(*SMALL_LESION_RADIUS_MM)
            gap = u(-1.5, 1.0) if g.random() < 0.5 else ls.gap_mm
            kind = str(g.choice(LESION_TYPES))
            pattern = "rim" if kind == "mixed" and g.random() < 0.5 else "random"
            params.lesions[i] = LesionSpec(type=kind, site=ls.site, level=ls.level, radius_mm=r, gap_mm=gap,
                                           lateral_mm=ls.lateral_mm * 0.5,
                                           elongation=(u(0.85, 1.2), u(0.85, 1.2), u(0.85, 1.2)),
                                           irregularity=u(0.0, 0.1), mix_pattern=pattern)
    if g.random() < d.low_contrast_lytic_prob:
        trab = u(*LOW_CONTRAST_TRAB_HU)
        hu["arch"] += 0.5 * (trab - hu["trab"])
        hu["trab"] = trab
        hu["cortex"] = max(hu["cortex"], trab + 250.0)
        params.lytic_hu = trab - u(*LOW_CONTRAST_DELTA_HU)
        if params.lesions and not any(ls.type == "lytic" for ls in params.lesions):
            params.lesions[0] = replace(params.lesions[0], type="lytic")  # never edit the caller's spec
    shape = str(g.choice(d.canal_shapes))
    params.canal_shape = shape
    params.canal_shape_k = float(u(*CANAL_SHAPE_K[shape])) if shape != "ellipse" else 0.0
    if g.random() < d.csf_like_tissue_prob:
        hu["csf"] = hu["soft"] + u(-15.0, 5.0)


def canal_rho(u: np.ndarray, v: np.ndarray, radii: tuple[float, float], shape: str = "ellipse",
              k: float = 0.0) -> np.ndarray:
    """Normalised radial coordinate of the canal cross-section (<= 1 inside); ``v`` points posterior.

    Ellipse: ``sqrt((u/rx)^2 + (v/ry)^2)``. Triangle / trefoil: the ellipse's polar radius is
    modulated by ``1 + k cos(3 (theta - 90 deg))`` (apex posterior, flat anterior wall), scaled so the
    anterior wall stays where the ellipse has it.
    """
    rx, ry = radii
    a, b = u / rx, v / ry
    r = np.sqrt(a**2 + b**2)
    if shape == "ellipse" or k == 0.0:
        return r
    theta = np.arctan2(b, a)
    return r * (1.0 - k) / (1.0 + k * np.cos(3.0 * theta - 1.5 * np.pi))


def canal_posterior_extent(p: PhantomParams) -> float:
    """How far (mm, along +P) the canal reaches behind its centre."""
    if p.canal_shape == "ellipse" or p.canal_shape_k == 0.0:
        return p.canal_radii[1]
    return p.canal_radii[1] * (1.0 + p.canal_shape_k) / (1.0 - p.canal_shape_k)


def random_lesion(rng: np.random.Generator) -> LesionSpec:
    u = rng.uniform
    site = "body" if rng.random() < 0.75 else "posterior"
    r = u(2.5, 14.0) if site == "body" else u(2.5, 8.0)
    gap = float(rng.choice([u(-3, 0), u(0, 3), u(3, 12), u(8, 25)], p=[0.15, 0.25, 0.35, 0.25]))
    return LesionSpec(
        type=str(rng.choice(LESION_TYPES)), site=site, radius_mm=r, gap_mm=gap,
        lateral_mm=u(-8, 8), elongation=(u(0.75, 1.3), u(0.75, 1.3), u(0.75, 1.3)), irregularity=u(0.0, 0.3),
    )


@dataclass
class Phantom:
    hu: np.ndarray  # float32 HU on the grid, axes (i, j, k)
    labels: np.ndarray  # uint8 0..3
    instances: np.ndarray  # uint8 lesion instance ids (0 = none), same order as ``lesions``
    geometry: Geometry
    lesions: list[dict]  # per inserted lesion: spec + centre (LPS) + voxel count
    params: PhantomParams


def _rotation(tilt_deg: tuple[float, float]) -> np.ndarray:
    a, b = np.deg2rad(tilt_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


class _Anatomy:
    """Evaluates tissue classes at patient-space points, in the anatomy's local frame."""

    def __init__(self, p: PhantomParams):
        self.p = p
        self.rot = _rotation(p.tilt_deg)
        self.origin = np.asarray(p.origin_lps)
        starts = np.array([a for a, _ in p.level_z])
        ends = np.array([b for _, b in p.level_z])
        self.starts, self.ends = starts, ends
        self.lesion_centres = [self._lesion_centre(ls, i) for i, ls in enumerate(p.lesions)]

    def local(self, lps: np.ndarray) -> np.ndarray:
        return (lps - self.origin) @ self.rot  # row-vector form of R^T (p - o)

    def centreline(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ax, lx, px, ay, ly, py = self.p.curve
        return ax * np.sin(2 * np.pi * z / lx + px), ay * np.sin(2 * np.pi * z / ly + py)

    def _lesion_centre(self, ls: LesionSpec, index: int) -> np.ndarray:
        rng = np.random.default_rng(self.p.seed + 1000 + index)
        n = len(self.p.level_z)
        zone = self.p.lesion_zone_mm
        central = [i for i, (a, b) in enumerate(self.p.level_z) if abs(0.5 * (a + b)) <= zone]
        central = central or [int(np.argmin([abs(0.5 * (a + b)) for a, b in self.p.level_z]))]
        level = ls.level if ls.level is not None else int(rng.choice(central))
        level = int(np.clip(level, 0, n - 1))
        z0, z1 = self.p.level_z[level]
        zc = 0.5 * (z0 + z1) + rng.uniform(-0.15, 0.15) * (z1 - z0)
        cx, cy = self.centreline(np.array([zc]))
        rcx, rcy = self.p.canal_radii
        r_ap = ls.radius_mm * ls.elongation[1]
        if ls.site == "body":  # anterior of the canal (-P)
            v = -(rcy + ls.gap_mm + r_ap)
            u_off = ls.lateral_mm
        else:  # posterior arch (+P), beside the midline in a lamina
            v = canal_posterior_extent(self.p) + ls.gap_mm + r_ap
            u_off = ls.lateral_mm
        return np.array([cx[0] + u_off, cy[0] + v, zc])

    def classify(self, lps: np.ndarray, rng_field: "_NoiseField") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (tissue code, label, lesion instance) for (N, 3) points."""
        p = self.p
        q = self.local(lps)
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        cx, cy = self.centreline(z)
        u, v = x - cx, y - cy
        n = len(x)
        tissue = np.zeros(n, np.uint8)  # 0 air
        label = np.zeros(n, np.uint8)
        inst = np.zeros(n, np.uint8)
        # trunk
        tr_a, tr_b = p.trunk_radii
        rho_t = np.sqrt((x / tr_a) ** 2 + ((y - p.trunk_centre_y) / tr_b) ** 2)
        inside = rho_t <= 1.0
        tissue[inside] = T_FAT
        inner = rho_t <= 1.0 - p.fat_mm / min(tr_a, tr_b)
        tissue[inner] = T_SOFT
        # paraspinal muscles
        musc = inner & (((np.abs(u) - 30) / 22) ** 2 + ((v - 25) / 28) ** 2 <= 1)
        tissue[musc] = T_MUSCLE
        # organs / lungs / gas
        org = inner & (((x - 0.25 * tr_a * np.sin(p.seed)) / (0.5 * tr_a)) ** 2 + ((y + 0.6 * tr_b) / (0.35 * tr_b)) ** 2 <= 1)
        tissue[org] = T_ORGAN
        if p.lungs:
            for side in (-1, 1):
                lung = inner & (((x - side * 0.45 * tr_a) / (0.33 * tr_a)) ** 2 + ((y + 0.1 * tr_b) / (0.55 * tr_b)) ** 2 <= 1)
                tissue[lung] = T_LUNG
        g = np.random.default_rng(p.seed + 7)
        for _ in range(p.gas_blobs):
            gx, gy, gz = g.uniform(-0.5 * tr_a, 0.5 * tr_a), g.uniform(-0.9 * tr_b, -0.2 * tr_b), g.uniform(-120, 120)
            gr = g.uniform(6, 25)
            tissue[inner & ((x - gx) ** 2 + (y - gy - p.trunk_centre_y * 0) ** 2 + (z - gz) ** 2 <= gr**2)] = T_AIR
        if p.table:
            ty = p.trunk_centre_y + tr_b + 8
            tissue[(~inside) & (np.abs(y - ty) <= 3) & (np.abs(x) <= 220)] = T_TABLE
        # vertebral levels
        lev = np.searchsorted(self.starts, z, side="right") - 1
        lev_ok = lev >= 0
        levc = np.clip(lev, 0, len(self.starts) - 1)
        z0, z1 = self.starts[levc], self.ends[levc]
        in_vert = lev_ok & (z >= z0) & (z <= z1)
        in_disc = lev_ok & (z > z1) & (lev < len(self.starts) - 1)
        frac = np.where(in_vert, (z - z0) / np.maximum(z1 - z0, 1e-6), -1.0)
        rcx, rcy = p.canal_radii
        bx, by = p.body_radii
        vb = -(rcy + p.body_gap + by)
        rho_b = np.sqrt((u / bx) ** 2 + ((v - vb) / by) ** 2)
        body = rho_b <= 1.0
        disc = body & in_disc
        tissue[disc] = T_DISC
        vbody = body & in_vert
        cortex_n = p.cortex_mm / min(bx, by)
        endplate = (np.minimum(z - z0, z1 - z) <= p.cortex_mm)
        tissue[vbody] = T_TRAB
        tissue[vbody & ((rho_b > 1 - cortex_n) | endplate)] = T_CORTEX
        # posterior arch: ring around the canal, posterior/lateral half, middle of the level
        rho_c = canal_rho(u, v, (rcx, rcy), p.canal_shape, p.canal_shape_k)
        mid = in_vert & (frac > 0.15) & (frac < 0.85)
        arch = mid & (rho_c > 1.0) & (rho_c <= 1.0 + p.arch_mm / min(rcx, rcy)) & (v > -0.35 * rcy)
        spin = (in_vert & (frac > 0.2) & (frac < 0.8) & (np.abs(u) <= 2.5 + 0.08 * (v - rcy))
                & (v >= rcy) & (v <= rcy + p.spinous_len))
        trans = (in_vert & (frac > 0.3) & (frac < 0.7) & (np.abs(v - 0.2 * rcy) <= 4.0)
                 & (np.abs(u) >= rcx) & (np.abs(u) <= rcx + p.transverse_len))
        post = (arch | spin | trans) & ~vbody
        tissue[post] = T_ARCH
        bone = vbody | post
        if p.ribs:
            ribz = in_vert & (np.abs(frac - 0.5) <= 0.18)
            rr = np.sqrt((u / (0.55 * tr_a)) ** 2 + ((v + 0.45 * tr_b) / (0.55 * tr_b)) ** 2)
            rib = ribz & (np.abs(rr - 1.0) <= 0.035) & (np.abs(u) > rcx + p.transverse_len - 6) & inner
            tissue[rib & ~bone] = T_ARCH
            bone = bone | rib
        label[bone] = BONE
        # canal: runs through every level
        canal = rho_c <= 1.0
        tissue[canal] = T_CSF
        label[canal] = CANAL
        bone &= ~canal
        # lesions
        for idx, (ls, c) in enumerate(zip(p.lesions, self.lesion_centres), start=1):
            d = q - c
            e = np.asarray(ls.elongation) * ls.radius_mm
            rr = np.sqrt(((d / e) ** 2).sum(axis=1))
            near = rr <= 1.0 + 2 * ls.irregularity + 0.05
            if not near.any():
                continue
            wob = 1.0 + ls.irregularity * rng_field.sample(d[near] / max(ls.radius_mm, 1.0), idx)
            shape = np.zeros(n, bool)
            shape[near] = rr[near] <= wob
            allowed = bone.copy()
            if ls.type in ("lytic", "mixed"):  # lytic may breach the cortex into soft tissue
                allowed |= (rho_b <= 1.0 + 2.5 / min(bx, by)) & in_vert
                allowed |= post
            if ls.gap_mm <= 0:
                allowed |= canal  # epidural extension
            m = shape & allowed & (inst == 0)
            label[m] = LESION
            inst[m] = idx
            if ls.type == "lytic":
                tissue[m] = T_LYTIC
            elif ls.type == "blastic":
                tissue[m] = T_BLASTIC
            elif ls.mix_pattern == "rim":  # lytic core, dense rim
                core = rr[m] < 0.6
                tissue[np.flatnonzero(m)[~core]] = T_BLASTIC
                tissue[np.flatnonzero(m)[core]] = T_LYTIC
            else:
                mix = rng_field.sample(d[m] / max(ls.radius_mm * 0.5, 1.0), idx + 50) > 0.0
                tissue[np.flatnonzero(m)[mix]] = T_BLASTIC
                tissue[np.flatnonzero(m)[~mix]] = T_LYTIC
        return tissue, label, inst


(T_AIR, T_FAT, T_SOFT, T_MUSCLE, T_ORGAN, T_LUNG, T_TABLE, T_DISC, T_TRAB, T_CORTEX, T_ARCH, T_CSF,
 T_LYTIC, T_BLASTIC) = range(14)


class _NoiseField:
    """Smooth pseudo-random scalar fields in [-1, 1] (sums of random sinusoids), per key."""

    def __init__(self, seed: int):
        self.seed = seed
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def sample(self, pts: np.ndarray, key: int) -> np.ndarray:
        if key not in self.cache:
            g = np.random.default_rng(self.seed * 97 + key)
            k = g.normal(size=(6, 3)) * 1.2
            ph = g.uniform(0, 2 * np.pi, 6)
            self.cache[key] = (k, ph)
        k, ph = self.cache[key]
        return np.sin(pts @ k.T + ph).mean(axis=1) * np.sqrt(2)


def tissue_hu(p: PhantomParams, rng: np.random.Generator) -> np.ndarray:
    """HU per tissue code (index = code)."""
    h = p.hu
    lytic = rng.uniform(-20, 90)
    if p.lytic_hu is not None:  # drawn above all the same: the stream stays as it was
        lytic = p.lytic_hu
    blastic = rng.uniform(max(450, h["trab"] + 250), 1150)
    return np.array([h["air"], h["fat"], h["soft"], h["muscle"], h["organ"], h["lung"], h["table"], h["disc"],
                     h["trab"], h["cortex"], h["arch"], h["csf"], lytic, blastic], np.float32)


def render(params: PhantomParams, geometry: Geometry, slab: int = 8) -> Phantom:
    """Sample the phantom on ``geometry``: HU (blurred, noisy), labels and lesion instances."""
    anat = _Anatomy(params)
    field = _NoiseField(params.seed)
    rng = np.random.default_rng(params.seed)
    hu_of = tissue_hu(params, rng)
    ni, nj, nk = geometry.shape
    hu = np.empty(geometry.shape, np.float32)
    labels = np.empty(geometry.shape, np.uint8)
    inst = np.empty(geometry.shape, np.uint8)
    ii, jj = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        kk = np.arange(k0, k1)
        ijk = np.stack([np.repeat(ii[..., None], len(kk), 2), np.repeat(jj[..., None], len(kk), 2),
                        np.broadcast_to(kk, (ni, nj, len(kk)))], axis=-1).reshape(-1, 3)
        lps = geometry.index_to_lps(ijk)
        t, lab, ins = anat.classify(lps, field)
        hu[:, :, k0:k1] = hu_of[t].reshape(ni, nj, len(kk))
        labels[:, :, k0:k1] = lab.reshape(ni, nj, len(kk))
        inst[:, :, k0:k1] = ins.reshape(ni, nj, len(kk))
    # texture inside trabecular bone, then partial volume (blur) and noise, in mm
    sp = np.asarray(geometry.spacing)
    tex = ndimage.gaussian_filter(rng.normal(0, 1, geometry.shape).astype(np.float32), 1.0 / sp * 1.2)
    hu += (labels == BONE) * tex * float(rng.uniform(10, 60)) * (hu < params.hu["cortex"] - 1)
    hu = ndimage.gaussian_filter(hu, params.blur_mm / sp, truncate=3.0)
    noise = rng.normal(0, 1, geometry.shape).astype(np.float32)
    if params.noise_corr > 0.05:
        noise = ndimage.gaussian_filter(noise, params.noise_corr / sp)
        noise /= max(float(noise.std()), 1e-6)
    hu += noise * params.noise_hu
    lesions = []
    for idx, (ls, c) in enumerate(zip(params.lesions, anat.lesion_centres), start=1):
        centre_lps = anat.origin + anat.rot @ c
        lesions.append({"index": idx, "type": ls.type, "site": ls.site, "designed_gap_mm": ls.gap_mm,
                        "radius_mm": ls.radius_mm, "centre_lps_mm": [float(v) for v in centre_lps],
                        "voxels": int((inst == idx).sum())})
    return Phantom(hu, labels, inst, geometry, lesions, params)


def patient_geometry(params: PhantomParams, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                     orientation: str = "HFS", centre_offset_mm: tuple[float, float, float] = (0, 0, 0)) -> Geometry:
    """A grid centred on the phantom's spine. ``orientation``: HFS, FFS, HFP, FFP, or with '+flipx'/'+flipy'.

    Directions follow the DICOM conventions for axial scans: HFS rows run toward patient left (+L),
    columns toward posterior (+P); FFS mirrors left-right; prone (HFP) mirrors both in-plane axes.
    The slice axis is always +S here (loaders sort along the normal anyway).
    """
    base = orientation.split("+")[0].upper()
    dirs = {"HFS": ([1, 0, 0], [0, 1, 0]), "FFS": ([-1, 0, 0], [0, 1, 0]),
            "HFP": ([-1, 0, 0], [0, -1, 0]), "FFP": ([1, 0, 0], [0, -1, 0])}
    if base not in dirs:
        raise ValueError(f"unknown orientation {orientation}")
    row, col = (np.array(v, float) for v in dirs[base])
    if "flipx" in orientation:
        row = -row
    if "flipy" in orientation:
        col = -col
    normal = np.cross(row, col)
    if normal[2] < 0:  # keep k along +S so that the same extents are covered
        normal = -normal
    direction = np.stack([row, col, normal], axis=1)
    centre = np.asarray(params.origin_lps) + np.array([0.0, -25.0, 0.0]) + np.asarray(centre_offset_mm)
    extent = (np.asarray(shape) - 1) * np.asarray(spacing)
    origin = centre - direction @ (extent / 2)
    return Geometry(shape=shape, spacing=spacing, origin=tuple(origin), direction=direction)


def make_phantom(seed: int, shape: tuple[int, int, int] = (128, 128, 64),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), orientation: str = "HFS",
                 lesions: list[LesionSpec] | None = None, n_lesions: int | None = None,
                 domain_randomise: bool = False, diversity: Diversity | None = None) -> Phantom:
    rng = np.random.default_rng(seed)
    z_ext = shape[2] * spacing[2]
    params = draw_params(rng, n_lesions=n_lesions, lesions=lesions, domain_randomise=domain_randomise,
                         z_extent_mm=z_ext + 40, diversity=diversity)
    geom = patient_geometry(params, shape, spacing, orientation)
    return render(params, geom)
