"""Training data source (b): real CT backgrounds with synthetic metastases inserted into real vertebrae.

Allowed backgrounds (``/work/shared/data/README.md``: the rest is evaluation-only and is never read
here): ``totalseg_example/ct.nii.gz`` + ``seg_total_fast.nii.gz`` (vertebrae 25..33 -> bone, 79
spinal cord) and ``tptbox_lumbar`` (vertebrae 21..23 -> bone, subregions 49/50 = vertebral body).
``dcmqi_3slice`` is not used: three 1 mm slices give two slices on the 1.5 mm model grid, far too
thin for 64-voxel 3-D training patches, and its label has no canal.

Each background is resampled once to the canonical LPS grid at the model spacing
(``canonical_geometry`` / ``to_canonical``, labels by per-class trilinear + argmax as in
``pipeline.train.data``). The canal is derived from the vertebra masks (``derive_canal``: the
vertebral foramen per axial slice after a small 2-D closing of the arch, gaps along S bridged by
shape interpolation) and, where a cord label exists, the cord is checked against it and united in.

Every case is a random crop with 1..``max_lesions`` metastases inserted into vertebral bodies or
posterior elements at a range of distances from the canal:

- lytic: soft-tissue HU (20..60) with a smooth texture; may breach the cortex by a few mm;
- blastic: the patient's own bone reference (median HU of that vertebra) + 500..1200 HU, capped
  at 1800 HU, inside bone only;
- mixed: a smooth random partition of the lesion into lytic and blastic parts.

Shapes are ellipsoids deformed by a smooth random field (irregular), with a soft edge (partial
volume ramp of about one voxel). The background noise of the real CT (std and correlation length,
estimated in soft tissue) is added to the inserted intensities so lesions are not unnaturally
smooth. Lesion voxels (soft weight >= 0.5) are labelled 2. A global intensity jitter (scale and
offset) is applied per case. All randomness comes from the seed.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.errors import InputError
from pipeline.segment.resample import canonical_geometry, to_canonical
from pipeline.train.data import Case
from pipeline.types import BONE, CANAL, LESION, Geometry

log = logging.getLogger("osteoplan.train.real_insert")

TOTALSEG_VERTEBRAE = tuple(range(25, 34))  # 25 sacrum, 26 S1, 27..31 L5..L1, 32 T12, 33 T11
TOTALSEG_CORD = 79
TPTBOX_VERTEBRAE = (21, 22, 23)
TPTBOX_BODY = (49, 50)  # corpus border, corpus
SOURCES = ("totalseg", "tptbox")
MIN_LESION_MM3 = 50.0  # the inference postprocess drops components under 0.05 mL


@dataclass
class RealCT:
    """A labelled real CT on the canonical LPS grid (axes +L, +P, +S) at the model spacing."""

    name: str
    image: np.ndarray  # HU float32
    labels: np.ndarray  # uint8: 0, 1 canal, 3 bone
    vertebrae: np.ndarray  # uint8 vertebra instance ids (0 = none)
    body: np.ndarray | None  # bool: vertebral body voxels where the source says so, else None
    geometry: Geometry
    cord_share: float | None = None  # share of cord voxels inside the bone-derived canal (before union)
    noise_hu: float = 0.0
    noise_sigma_vox: float = 0.0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- canal


def _disk(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.asarray(radius_vox, float), 0.5)
    n = np.ceil(r).astype(int)
    x, y = np.mgrid[-n[0]:n[0] + 1, -n[1]:n[1] + 1]
    return (x / r[0]) ** 2 + (y / r[1]) ** 2 <= 1.0


def _slice_candidates(sl: np.ndarray, enclosed: np.ndarray, disk: np.ndarray, min_vox: int, max_vox: int
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Foramen candidates in one axial slice: (component map, count, closed-hole mask or None).

    Candidates are the holes enclosed by bone after a 2-D closing with ``disk`` (bridges small arch
    gaps) united with the non-bone pixels that most in-plane rays leave through bone (``enclosed``:
    open arches at coarse resolution), after a 1-pixel opening (drops slivers between touching
    bone masks). The largest closed hole of plausible area is returned too: a confident foramen.
    """
    pad = disk.shape[0]
    closed = ndimage.binary_closing(np.pad(sl, pad), structure=disk)[pad:-pad, pad:-pad] | sl
    holes = ndimage.binary_fill_holes(closed) & ~closed
    confident = None
    if holes.any():  # give back the rim the closing took from the hole
        holes = ndimage.binary_dilation(holes, structure=disk) & ~sl & ndimage.binary_fill_holes(closed)
        hc, hn = ndimage.label(holes)
        hs = np.bincount(hc.ravel(), minlength=hn + 1)
        hs[0] = 0
        best = int(np.argmax(hs))
        if min_vox <= hs[best] <= max_vox:
            confident = hc == best
    comp, n = ndimage.label(ndimage.binary_opening((holes | enclosed) & ~sl))
    return comp, n, confident


def _enclosure(bone: np.ndarray, spacing: np.ndarray, radius_mm: float, n_dir: int = 16) -> np.ndarray:
    """Per voxel: in how many of ``n_dir`` in-plane directions bone lies within ``radius_mm`` (uint8)."""
    count = np.zeros(bone.shape, np.uint8)
    step = float(min(spacing[0], spacing[1]))
    ni, nj = bone.shape[:2]
    for a in np.arange(n_dir) * 2 * np.pi / n_dir:
        hit = np.zeros(bone.shape, bool)
        seen = set()
        for r in np.arange(step, radius_mm + 1e-6, step):
            di, dj = int(round(r * np.cos(a) / spacing[0])), int(round(r * np.sin(a) / spacing[1]))
            if (di, dj) in seen or abs(di) >= ni or abs(dj) >= nj:
                continue
            seen.add((di, dj))  # hit[i, j] |= bone[i + di, j + dj]
            hit[max(-di, 0):ni - max(di, 0), max(-dj, 0):nj - max(dj, 0)] |= \
                bone[max(di, 0):ni - max(-di, 0), max(dj, 0):nj - max(-dj, 0)]
        count += hit
    return count


def _interpolate_gap(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Shape interpolation between two 2-D masks (``t`` = 0 -> a, 1 -> b).

    Both shapes are moved to the linearly interpolated centroid, then their signed distances are
    blended, so a canal that drifts sideways or backwards along S stays one tube.
    """
    ca, cb = np.argwhere(a).mean(axis=0), np.argwhere(b).mean(axis=0)
    c = (1.0 - t) * ca + t * cb

    def moved_sdf(m: np.ndarray, shift: np.ndarray) -> np.ndarray:
        m = ndimage.shift(m.astype(np.uint8), np.round(shift), order=0, mode="constant") > 0
        return ndimage.distance_transform_edt(~m) - ndimage.distance_transform_edt(m)

    return ((1.0 - t) * moved_sdf(a, c - ca) + t * moved_sdf(b, c - cb)) <= 0.0


def derive_canal(bone: np.ndarray, spacing: tuple[float, float, float], close_mm: float = 4.0,
                 ray_mm: float = 25.0, enclosed_share: float = 0.625, max_gap_mm: float = 80.0,
                 min_area_mm2: float = 25.0, max_area_mm2: float = 900.0) -> np.ndarray:
    """Spinal canal from a bone mask on an LPS-aligned grid (axis 2 = S): the vertebral foramen.

    Per axial slice (``_slice_foramen``): holes enclosed by bone after a 2-D closing with a disk of
    ``close_mm``, plus non-bone pixels from which at least ``enclosed_share`` of 16 in-plane rays
    of ``ray_mm`` meet bone (the arch is often open at coarse resolution or in automatic masks);
    the largest candidate of plausible area (``min_area_mm2``..``max_area_mm2``) is the foramen.
    The foramen exists only at the level of the arches: slices between canal slices (discs,
    ligamenta flava; up to ``max_gap_mm`` apart) get a shape interpolated (signed distances) from
    the nearest canal slices above and below. Only the largest 3-D component (and components of at
    least 20 % of its size) is kept. Returns a bool mask that never overlaps ``bone``.
    """
    bone = np.asarray(bone, bool)
    sp = np.asarray(spacing, float)
    disk = _disk(close_mm / sp[:2])
    px = sp[0] * sp[1]
    lo, hi = max(1, int(min_area_mm2 / px)), int(np.ceil(max_area_mm2 / px))
    canal = np.zeros_like(bone)
    if not bone.any():
        return canal
    box = ndimage.find_objects(bone.astype(np.uint8))[0]
    pad = max(disk.shape[0], int(ray_mm / sp[:2].min())) + 2
    i0, i1 = max(box[0].start - pad, 0), min(box[0].stop + pad, bone.shape[0])
    j0, j1 = max(box[1].start - pad, 0), min(box[1].stop + pad, bone.shape[1])
    sub = bone[i0:i1, j0:j1]
    enclosed = _enclosure(sub, sp, ray_mm) >= int(np.ceil(enclosed_share * 16))
    ks = np.flatnonzero(sub.any(axis=(0, 1)))
    slices = {int(k): _slice_candidates(sub[:, :, k], enclosed[:, :, k], disk, lo, hi) for k in ks}
    sure = {k: c for k, (_, _, c) in slices.items() if c is not None}
    if sure:  # the canal's track along S from the confident (closed) foramina; candidates must lie on it
        kk = np.array(sorted(sure))
        cen = np.array([np.argwhere(sure[k]).mean(axis=0) for k in kk])
        area = float(np.median([sure[k].sum() for k in kk]))
        for k, (comp, n, conf) in slices.items():
            if conf is not None:
                canal[i0:i1, j0:j1, k] = conf
                continue
            if n == 0:
                continue
            c = np.array([np.interp(k, kk, cen[:, 0]), np.interp(k, kk, cen[:, 1])])
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            cents = ndimage.center_of_mass(np.ones_like(comp), comp, range(1, n + 1))
            ok = [m + 1 for m, ce in enumerate(cents)
                  if np.linalg.norm((np.asarray(ce) - c) * sp[:2]) <= 8.0 and sizes[m + 1] >= 0.4 * area]
            if ok:
                canal[i0:i1, j0:j1, k] = np.isin(comp, ok)
    else:  # no closed foramen anywhere: the largest plausible candidate per slice
        for k, (comp, n, _) in slices.items():
            if n:
                sizes = np.bincount(comp.ravel(), minlength=n + 1)
                sizes[0] = 0
                best = int(np.argmax(sizes))
                if lo <= sizes[best] <= hi:
                    canal[i0:i1, j0:j1, k] = comp == best
    comp, n = ndimage.label(canal, structure=np.ones((3, 3, 3), bool))
    if n > 1:  # drop isolated slices before bridging (spurious holes)
        sizes = np.bincount(comp.ravel())[1:]
        canal = np.isin(comp, np.flatnonzero(sizes >= max(3 * lo, 0.1 * sizes.max())) + 1)
    have = np.flatnonzero(canal.any(axis=(0, 1)))
    max_gap = int(np.floor(max_gap_mm / sp[2]))
    for ka, kb in zip(have[:-1], have[1:]):
        if 1 < kb - ka <= max_gap:
            a, b = canal[i0:i1, j0:j1, ka], canal[i0:i1, j0:j1, kb]
            shift = (np.argwhere(a).mean(axis=0) - np.argwhere(b).mean(axis=0)) * sp[:2]
            if np.linalg.norm(shift) > 20.0:
                continue  # not the same canal
            for k in range(ka + 1, kb):
                canal[i0:i1, j0:j1, k] = _interpolate_gap(a, b, (k - ka) / (kb - ka)) & ~sub[:, :, k]
    comp, n = ndimage.label(canal, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(comp.ravel())[1:]
        canal = np.isin(comp, np.flatnonzero(sizes >= 0.2 * sizes.max()) + 1)
    return canal & ~bone


def cord_share(canal: np.ndarray, cord: np.ndarray) -> float | None:
    """Share of cord voxels inside the canal (None when there is no cord)."""
    n = int(cord.sum())
    return float((canal & cord).sum() / n) if n else None


# ---------------------------------------------------------------------------------------------- noise


def _residual(img: np.ndarray) -> np.ndarray:
    return img - ndimage.gaussian_filter(img, 1.5)


def _lag1(r: np.ndarray, mask: np.ndarray) -> float:
    vals = []
    for ax in range(r.ndim):
        a = np.moveaxis(r, ax, 0)
        m = np.moveaxis(mask, ax, 0)
        both = m[1:] & m[:-1]
        if both.sum() > 50:
            x, y = a[1:][both], a[:-1][both]
            vals.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(vals)) if vals else 0.0


@functools.lru_cache(maxsize=32)
def _noise_calibration(sigma_vox: float, seed: int = 0) -> tuple[float, float]:
    """(residual std / noise std, residual lag-1 correlation) for unit noise smoothed by ``sigma_vox``."""
    g = np.random.default_rng(seed)
    n = g.normal(size=(48, 48, 48)).astype(np.float32)
    if sigma_vox > 0.05:
        n = ndimage.gaussian_filter(n, sigma_vox)
    n /= n.std()
    r = _residual(n)[8:-8, 8:-8, 8:-8]
    return float(r.std()), _lag1(r, np.ones_like(r, bool))


def estimate_noise(hu: np.ndarray, body_mask: np.ndarray | None = None) -> tuple[float, float]:
    """Background noise of a CT: (std in HU, Gaussian correlation length in voxels).

    Measured in homogeneous soft tissue (-150..150 HU, eroded twice so edges stay out) on the
    high-pass residual ``hu - gaussian(hu, 1.5 vox)``: robust std (MAD) and mean lag-1
    correlation along the axes, both calibrated against smoothed white noise so that
    ``smooth_noise(shape, sigma_vox) * std`` reproduces them.
    """
    img = np.asarray(hu, np.float32)
    soft = (img > -150) & (img < 150)
    if body_mask is not None:
        soft &= body_mask
    soft = ndimage.binary_erosion(soft, iterations=2)
    if soft.sum() < 500:
        return 10.0, 0.5
    r = _residual(img)
    vals = r[soft]
    mad = 1.4826 * float(np.median(np.abs(vals - np.median(vals))))
    rho = _lag1(r, soft)
    grid = [0.0, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8]
    cal = [_noise_calibration(s) for s in grid]
    best = int(np.argmin([abs(c[1] - rho) for c in cal]))
    return mad / max(cal[best][0], 1e-3), grid[best]


def smooth_noise(shape: tuple[int, ...], sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-std Gaussian noise with a Gaussian correlation of ``sigma_vox`` voxels."""
    n = rng.normal(size=shape).astype(np.float32)
    if sigma_vox > 0.05:
        n = ndimage.gaussian_filter(n, sigma_vox)
        n /= max(float(n.std()), 1e-6)
    return n


# -------------------------------------------------------------------------------------------- loading


def _resample_labels(lab: np.ndarray, values: list[int], geom: Geometry, canon: Geometry) -> np.ndarray:
    """Map source label values to 1..len(values) on ``canon`` by per-class trilinear + argmax."""
    chans = [np.isin(lab, values, invert=True).astype(np.float32)] + [(lab == v).astype(np.float32) for v in values]
    out = np.stack([to_canonical(c, geom, canon)[0, 0].numpy() for c in chans])
    return out.argmax(axis=0).astype(np.uint8)


def _read_pair(img_path: Path, lab_path: Path) -> tuple[np.ndarray, Geometry, np.ndarray]:
    import nibabel as nib

    from pipeline.io.nifti import read_nifti

    if not img_path.is_file() or not lab_path.is_file():
        raise InputError(f"real CT training source missing: {img_path.name} / {lab_path.name}")
    vol = read_nifti(img_path)
    lab_img = nib.load(str(lab_path))
    if not np.allclose(lab_img.affine, nib.load(str(img_path)).affine, atol=1e-3) or lab_img.shape[:3] != vol.array.shape:
        raise InputError(f"{lab_path.name} is not on the grid of {img_path.name}")
    return np.asarray(vol.array, np.float32), vol.geometry, np.asarray(lab_img.dataobj).astype(np.int32)


def _finish(name: str, image: np.ndarray, vert: np.ndarray, body: np.ndarray | None, canon: Geometry,
            cord: np.ndarray | None) -> RealCT:
    bone = vert > 0
    canal = derive_canal(bone, canon.spacing)
    notes = []
    share = None
    if cord is not None and cord.any():
        share = cord_share(canal, cord)
        notes.append(f"bone-derived canal holds {share:.3f} of the cord voxels; cord united in")
        canal |= cord & ~bone
    labels = np.zeros(image.shape, np.uint8)
    labels[bone] = BONE
    labels[canal] = CANAL
    body_mask = ndimage.binary_fill_holes(ndimage.binary_closing(image > -300, iterations=2))
    sigma, corr = estimate_noise(image, body_mask)
    notes.append(f"background noise {sigma:.1f} HU, correlation {corr:.2f} vox")
    return RealCT(name, image, labels, vert, body, canon, share, sigma, corr, notes)


def load_totalseg(root: Path, spacing: tuple[float, float, float]) -> RealCT:
    """``totalseg_example/ct.nii.gz`` with TotalSegmentator's vertebrae and cord, on the canonical grid."""
    d = Path(root) / "totalseg_example"
    img, geom, lab = _read_pair(d / "ct.nii.gz", d / "seg_total_fast.nii.gz")
    canon = canonical_geometry(geom, spacing)
    image = to_canonical(img, geom, canon)[0, 0].numpy()
    values = list(TOTALSEG_VERTEBRAE) + [TOTALSEG_CORD]
    mapped = _resample_labels(lab, values, geom, canon)
    cord = mapped == len(values)
    vert = np.where(mapped < len(values), mapped, 0).astype(np.uint8)  # 1..9 vertebra ids
    return _finish("totalseg", image, vert, None, canon, cord)


def load_tptbox(root: Path, spacing: tuple[float, float, float]) -> RealCT:
    """``tptbox_lumbar`` (L2..L4, PIR) with its vertebra and subregion masks, on the canonical grid."""
    d = Path(root) / "tptbox_lumbar"
    img, geom, lab = _read_pair(d / "sub-ct_label-22_ct.nii.gz", d / "sub-ct_seg-vert_label-22_msk.nii.gz")
    canon = canonical_geometry(geom, spacing)
    image = to_canonical(img, geom, canon)[0, 0].numpy()
    vert = _resample_labels(lab, list(TPTBOX_VERTEBRAE), geom, canon)
    body = None
    sub_path = d / "sub-ct_seg-subreg_label-22_msk.nii.gz"
    if sub_path.is_file():
        import nibabel as nib

        sub = np.asarray(nib.load(str(sub_path)).dataobj).astype(np.int32)
        body = (_resample_labels(np.isin(sub, TPTBOX_BODY).astype(np.int32), [1], geom, canon) == 1) & (vert > 0)
    return _finish("tptbox", image, vert, body, canon, None)


LOADERS = {"totalseg": load_totalseg, "tptbox": load_tptbox}


def load_backgrounds(data_root: Path, spacing: tuple[float, float, float],
                     sources: tuple[str, ...] = SOURCES) -> list[RealCT]:
    """The allowed real CT backgrounds that exist under ``data_root`` (others are logged and skipped)."""
    out = []
    for name in sources:
        if name not in LOADERS:
            raise InputError(f"real_insert: unknown source {name!r} (known: {', '.join(SOURCES)})")
        try:
            ct = LOADERS[name](Path(data_root), spacing)
        except InputError as exc:
            log.warning("real_insert: %s skipped (%s)", name, exc)
            continue
        for note in ct.notes:
            log.info("real_insert %s: %s", name, note)
        out.append(ct)
    return out


# ------------------------------------------------------------------------------------------ insertion


@dataclass
class InsertedLesion:
    type: str
    site: str
    radius_mm: float
    centre_ijk: tuple[int, int, int]
    target_gap_mm: float
    voxels: int
    bone_reference_hu: float
    target_hu: float


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _site_masks(ct_vert: np.ndarray, labels: np.ndarray, body: np.ndarray | None, vid: int) -> tuple[np.ndarray, np.ndarray]:
    """(body, posterior) voxels of vertebra ``vid``: from subregions if known, else by position vs the canal.

    On the LPS grid, anterior is -P (smaller j): per axial slice, bone anterior of the canal's
    front wall is the body, bone behind the canal's centre is the posterior elements.
    """
    v = ct_vert == vid
    if body is not None:
        b = v & body
        return b, v & ~b
    b = np.zeros_like(v)
    p = np.zeros_like(v)
    canal = labels == CANAL
    j = np.arange(v.shape[1])[None, :]
    for k in np.flatnonzero(v.any(axis=(0, 1))):
        c = canal[:, :, k]
        if not c.any():
            continue
        jj = np.flatnonzero(c.any(axis=0))
        front, centre = jj.min(), 0.5 * (jj.min() + jj.max())
        b[:, :, k] = v[:, :, k] & (j < front)
        p[:, :, k] = v[:, :, k] & (j > centre)
    return b, p


def insert_lesion(image: np.ndarray, labels: np.ndarray, vert: np.ndarray, body: np.ndarray | None,
                  spacing: tuple[float, float, float], rng: np.random.Generator, noise_hu: float,
                  noise_sigma_vox: float, kind: str | None = None, site: str | None = None,
                  canal_edt: np.ndarray | None = None, small_lesion_prob: float = 0.0,
                  low_contrast_lytic_prob: float = 0.0) -> InsertedLesion | None:
    """Insert one metastasis in place into ``image`` (HU) and ``labels``; None if no room was found.

    ``small_lesion_prob`` / ``low_contrast_lytic_prob`` (0: the random stream is as before they existed):
    radius 3-5 mm; lytic HU 20-80 HU below the vertebra's bone reference (at least 20 HU).
    """
    sp = np.asarray(spacing, float)
    ids = [int(v) for v in np.unique(vert) if v and (vert == v).sum() * np.prod(sp) > 3000.0]
    if not ids:
        return None
    vid = int(rng.choice(ids))
    site = site or ("body" if rng.random() < 0.7 else "posterior")
    kind = kind or str(rng.choice(["lytic", "mixed", "blastic"]))
    bmask, pmask = _site_masks(vert, labels, body, vid)
    region = (bmask if site == "body" else pmask) & (labels == BONE)
    if region.sum() < 30:
        region = (vert == vid) & (labels == BONE)
        site = "vertebra"
    radius = float(rng.uniform(3.0, 11.0) if site == "body" else rng.uniform(2.5, 6.5))
    if small_lesion_prob > 0 and rng.random() < small_lesion_prob:
        radius = float(rng.uniform(3.0, 5.0))
    # choose a centre: deep enough in the region for a radius-sized core, at a random distance band
    inner = ndimage.distance_transform_edt(region, sampling=sp)
    cand = np.argwhere(inner >= min(0.5 * radius, float(inner.max()) * 0.8))
    if len(cand) == 0:
        return None
    gap = float("nan")
    if canal_edt is not None:
        d = canal_edt[tuple(cand.T)] - radius
        lo, hi = [(-3.0, 1.0), (1.0, 4.0), (4.0, 10.0), (10.0, 40.0)][int(rng.integers(4))]
        band = (d >= lo) & (d < hi)
        if band.any():
            cand = cand[band]
            d = d[band]
        pick = int(rng.integers(len(cand)))
        gap = float(d[pick])
    else:
        pick = int(rng.integers(len(cand)))
    centre = cand[pick]
    elong = rng.uniform(0.7, 1.35, 3)
    half = np.ceil(radius * elong.max() * 1.6 / sp).astype(int) + 3
    lo_i = np.maximum(centre - half, 0)
    hi_i = np.minimum(centre + half + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(lo_i, hi_i))
    shape = tuple(int(b - a) for a, b in zip(lo_i, hi_i))
    grid = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo_i, hi_i, centre)], indexing="ij"), -1)
    mm = (grid * sp) @ _random_rotation(rng)
    rr = np.sqrt(((mm / (radius * elong)) ** 2).sum(-1))
    irregular = float(rng.uniform(0.05, 0.3))
    wobble = smooth_noise(shape, max(radius / sp.mean() / 2.5, 0.8), rng)
    level = rr + irregular * np.clip(wobble, -2.5, 2.5) / 2.5
    edge_mm = float(rng.uniform(0.6, 1.6))  # partial-volume ramp width
    w = np.clip(0.5 + (1.0 - level) * radius / edge_mm, 0.0, 1.0)
    lab_box, vert_box = labels[box], vert[box]
    allowed = (vert_box == vid) & (lab_box == BONE)
    if kind in ("lytic", "mixed") and rng.random() < 0.5:  # cortical breach into the soft tissue around
        breach = ndimage.binary_dilation(allowed, iterations=max(1, int(round(rng.uniform(1.5, 4.0) / sp.mean()))))
        allowed |= breach & (lab_box == 0)
        if rng.random() < 0.3:  # epidural extension into the canal
            allowed |= breach & (lab_box == CANAL)
    allowed_soft = ndimage.gaussian_filter(allowed.astype(np.float32), 0.6)
    wt = w * np.where(allowed, np.maximum(allowed_soft, 0.5), allowed_soft)
    bone_ref = float(np.median(image[(vert == vid) & (labels == BONE)]))
    lytic_hu = float(rng.uniform(20.0, 60.0))
    if low_contrast_lytic_prob > 0 and rng.random() < low_contrast_lytic_prob:
        lytic_hu = float(max(bone_ref - rng.uniform(20.0, 80.0), 20.0))
    blastic_hu = float(min(bone_ref + rng.uniform(500.0, 1200.0), 1800.0))
    texture = smooth_noise(shape, float(rng.uniform(0.8, 2.0)), rng)
    if kind == "lytic":
        target = lytic_hu + texture * rng.uniform(4.0, 12.0)
        tgt = lytic_hu
    elif kind == "blastic":
        target = blastic_hu + texture * rng.uniform(30.0, 90.0)
        tgt = blastic_hu
    else:
        part = smooth_noise(shape, max(radius / sp.mean() / 3.0, 0.8), rng) > rng.uniform(-0.4, 0.4)
        target = np.where(part, blastic_hu + texture * 50.0, lytic_hu + texture * 8.0)
        tgt = float(np.mean(np.where(part, blastic_hu, lytic_hu)[wt >= 0.5])) if (wt >= 0.5).any() else lytic_hu
    target = target + smooth_noise(shape, noise_sigma_vox, rng) * noise_hu
    mask = wt >= 0.5
    if mask.sum() * np.prod(sp) < MIN_LESION_MM3:
        return None
    image[box] = ((1.0 - wt) * image[box] + wt * target).astype(np.float32)
    lab_box[mask] = LESION
    return InsertedLesion(kind, site, radius, tuple(int(c) for c in centre), gap, int(mask.sum()), bone_ref, tgt)


def _crop_box(ct: RealCT, rng: np.random.Generator, crop_mm: tuple[float, float, float]) -> tuple[slice, ...]:
    sp = np.asarray(ct.geometry.spacing)
    size = np.minimum(np.round(np.asarray(crop_mm) / sp).astype(int), ct.image.shape)
    bone = np.argwhere(ct.labels == BONE)
    c = bone[int(rng.integers(len(bone)))] + rng.integers(-8, 9, 3)
    lo = np.clip(c - size // 2, 0, np.asarray(ct.image.shape) - size)
    return tuple(slice(int(a), int(a + s)) for a, s in zip(lo, size))


def make_case(ct: RealCT, rng: np.random.Generator, max_lesions: int = 4,
              crop_mm: tuple[float, float, float] = (180.0, 180.0, 160.0), index: int = 0,
              small_lesion_prob: float = 0.0, low_contrast_lytic_prob: float = 0.0
              ) -> tuple[Case, list[InsertedLesion]]:
    """One randomised training case (crop, lesion set, intensity jitter) from a real background."""
    box = _crop_box(ct, rng, crop_mm)
    image = ct.image[box].astype(np.float32, copy=True)
    labels = ct.labels[box].copy()
    vert = ct.vertebrae[box]
    body = ct.body[box] if ct.body is not None else None
    canal = labels == CANAL
    edt = ndimage.distance_transform_edt(~canal, sampling=ct.geometry.spacing) if canal.any() else None
    n = int(rng.integers(1, max_lesions + 1)) if max_lesions > 0 else 0
    inserted = []
    for _ in range(n):
        les = insert_lesion(image, labels, vert, body, ct.geometry.spacing, rng, ct.noise_hu, ct.noise_sigma_vox,
                            canal_edt=edt, small_lesion_prob=small_lesion_prob,
                            low_contrast_lytic_prob=low_contrast_lytic_prob)
        if les is not None:
            inserted.append(les)
    image = image * float(rng.uniform(0.97, 1.03)) + float(rng.uniform(-15.0, 15.0))
    return Case(image.astype(np.float32), labels, f"real-{ct.name}-{index}"), inserted


def real_insert_cases(data_root: Path, n_cases: int, seed: int, spacing: tuple[float, float, float],
                      sources: tuple[str, ...] = SOURCES, max_lesions: int = 4,
                      crop_mm: tuple[float, float, float] = (180.0, 180.0, 160.0), workers: int = 0,
                      small_lesion_prob: float = 0.0, low_contrast_lytic_prob: float = 0.0) -> list[Case]:
    """``n_cases`` cases spread over the available backgrounds (round robin). Empty if none exist.

    ``workers == 0``: one random stream over all cases in this process (how the stage-2 pool was made).
    ``workers >= 1``: each case has its own seed ``(seed, i)`` and cases are made in ``workers``
    processes; the result is the same for any ``workers >= 1``.
    """
    cts = load_backgrounds(Path(data_root), spacing, tuple(sources))
    if not cts:
        return []
    if workers <= 0:
        rng = np.random.default_rng(seed)
        return [make_case(cts[i % len(cts)], rng, max_lesions, crop_mm, index=i, small_lesion_prob=small_lesion_prob,
                          low_contrast_lytic_prob=low_contrast_lytic_prob)[0] for i in range(n_cases)]
    from pipeline.train.data import parallel_map

    _WORKER_CTS[:] = cts  # forked workers inherit them
    jobs = [(i, seed, max_lesions, tuple(crop_mm), small_lesion_prob, low_contrast_lytic_prob) for i in range(n_cases)]
    try:
        return parallel_map(_seeded_case, jobs, workers)
    finally:
        _WORKER_CTS.clear()


_WORKER_CTS: list[RealCT] = []


def _seeded_case(job: tuple) -> Case:
    i, seed, max_lesions, crop_mm, small_p, low_p = job
    rng = np.random.default_rng([seed, i])
    return make_case(_WORKER_CTS[i % len(_WORKER_CTS)], rng, max_lesions, crop_mm, index=i, small_lesion_prob=small_p,
                     low_contrast_lytic_prob=low_p)[0]


# ------------------------------------------------------------------------------------------- previews


def _window(hu: np.ndarray, lo: float = -250.0, hi: float = 1250.0) -> np.ndarray:
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def preview_png(case: Case, lesions: list[InsertedLesion], path: Path, tile: int = 192) -> Path | None:
    """A montage per inserted lesion: axial and sagittal through its centre, image | image + labels."""
    from PIL import Image

    if not lesions:
        return None
    colours = np.array([[0, 0, 0], [255, 215, 0], [230, 25, 75], [70, 140, 240]], np.float32)
    rows = []
    for les in lesions:
        i, j, k = les.centre_ijk
        views = [(case.image[:, :, k].T, case.labels[:, :, k].T),  # axial: rows = P, cols = L
                 (case.image[i, :, :].T[::-1], case.labels[i, :, :].T[::-1])]  # sagittal: rows = S (up), cols = P
        tiles = []
        for hu, lab in views:
            g = np.repeat(_window(hu)[..., None], 3, -1).astype(np.float32)
            over = g.copy()
            m = lab > 0
            over[m] = 0.55 * g[m] + 0.45 * colours[lab[m]]
            for arr in (g, over):
                im = Image.fromarray(arr.astype(np.uint8))
                scale = tile / max(im.size)
                tiles.append(im.resize((max(1, int(im.size[0] * scale)), max(1, int(im.size[1] * scale)))))
        w = sum(t.size[0] for t in tiles) + 4 * len(tiles)
        row = Image.new("RGB", (w, tile), (20, 20, 20))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.size[0] + 4
        rows.append(row)
    out = Image.new("RGB", (max(r.size[0] for r in rows), sum(r.size[1] + 4 for r in rows)), (20, 20, 20))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.size[1] + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path
