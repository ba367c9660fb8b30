"""`osteoplan train`: MONAI training of the 4-class network, checkpoints/resume, TensorBoard, export.

CPU or CUDA (autocast bf16/fp16 on GPU); several GPUs with ``torchrun --nproc_per_node N -m
pipeline train ...`` (DDP: each rank draws its own phantoms, gradients are averaged).
Seeded: the same config and seed reproduce the same weights on the same hardware and thread count.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import REPO_ROOT, read_yaml
from pipeline.errors import InputError

log = logging.getLogger("osteoplan.train")


class PhantomDiversity(BaseModel):
    """Extra domain randomisation of the phantom generator (``pipeline.train.phantom.Diversity``).

    All off by default; off, the pool is exactly the one made before these options existed."""

    model_config = ConfigDict(extra="forbid")
    small_lesion_prob: float = Field(0.0, ge=0.0, le=1.0, description="per lesion: radius 3-5 mm, often touching")
    low_contrast_lytic_prob: float = Field(0.0, ge=0.0, le=1.0,
                                           description="per phantom: lytic 20-80 HU below 100-220 HU trabecular bone")
    canal_shapes: tuple[Literal["ellipse", "triangle", "trefoil"], ...] = Field(
        ("ellipse",), min_length=1, description="canal cross-sections, drawn uniformly")
    csf_like_tissue_prob: float = Field(0.0, ge=0.0, le=1.0, description="per phantom: CSF HU = soft tissue -15..+5")

    def is_off(self) -> bool:
        return self == PhantomDiversity()


class RealInsertDiversity(BaseModel):
    """Small and low-contrast inserted lesions in real CT (off by default: the same cases as before)."""

    model_config = ConfigDict(extra="forbid")
    small_lesion_prob: float = Field(0.0, ge=0.0, le=1.0, description="per lesion: radius 3-5 mm")
    low_contrast_lytic_prob: float = Field(0.0, ge=0.0, le=1.0,
                                           description="per lytic part: 20-80 HU below the vertebra's bone reference")


class PhantomSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_train: int = Field(96, ge=0)
    n_val: int = Field(4, ge=0)
    shape: tuple[int, int, int] = (176, 144, 96)
    domain_randomise_prob: float = 0.4
    fast_share: float = 0.25
    diversity: PhantomDiversity = PhantomDiversity()
    diversity_share: float = Field(1.0, ge=0.0, le=1.0, description="share of the training phantoms drawn with "
                                   "`diversity` (a seeded subset); the rest are the plain generator's")


class NnunetSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    label_map: dict[int, int] = Field(default_factory=dict)
    derive_canal: bool = True
    repeat: int = Field(1, ge=1, description="how many times each case enters the training pool")


class RealInsertSource(BaseModel):
    """Real CT backgrounds with synthetic metastases inserted (``pipeline.train.real_insert``)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    n_cases: int = Field(24, ge=0, description="cases drawn round robin over the available backgrounds")
    data_root: str = Field("../shared/data/real", description="relative paths are relative to the repository")
    sources: tuple[str, ...] = ("totalseg", "tptbox")
    max_lesions: int = Field(4, ge=0)
    crop_mm: tuple[float, float, float] = (180.0, 180.0, 160.0)
    repeat: int = Field(1, ge=1, description="how many times each case enters the training pool")
    diversity: RealInsertDiversity = RealInsertDiversity()


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phantom: PhantomSource = PhantomSource()
    nnunet: NnunetSource = NnunetSource()
    real_insert: RealInsertSource = RealInsertSource()
    refresh_every: int = Field(0, ge=0, description="regenerate this many phantoms... 0 = never")
    pool_workers: int = Field(0, ge=0, description="processes that build the training pool. 0: this process, "
                              "with one sequential random stream (how stages 1-2 were made); N > 0: N processes, "
                              "each real-CT case seeded on its own (the same pool for any N > 0)")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    workdir: str = "runs/osteoplan-spine"
    export_name: str = "osteoplan-spine"
    version: str = "0.1.0"
    network: dict[str, Any]
    target_spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    fast_spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)  # the coarse share of the training phantoms
    inference_fast_spacing_mm: tuple[float, float, float] | None = Field(
        None, description="the bundle's --fast grid (metadata fast_spacing_mm); None = fast_spacing_mm")
    intensity: dict[str, Any] = Field(default_factory=lambda: {"clip": [-1000, 2000], "scale": 1000.0})
    patch_size: tuple[int, int, int] = (96, 96, 96)
    inference_roi: tuple[int, int, int] = (160, 160, 160)
    batch_size: int = 2
    max_steps: int = 3000
    stop_at_step: int | None = Field(None, ge=1, description="end the run at this step; the learning-rate "
                                     "schedule still spans max_steps (a shortened run stays reproducible)")
    lr: float = 2e-3
    weight_decay: float = 1e-5
    class_ratios: tuple[float, float, float, float] = (1.0, 1.0, 3.0, 1.0)
    val_every: int = 250
    ckpt_every: int = 100
    threads: int = 0
    num_workers: int = Field(0, ge=0, description="DataLoader processes that crop and augment patches (0: in the "
                             "training loop, as stages 1-2 were made; on a GPU use most CPU cores)")
    time_limit_s: float | None = Field(None, gt=0, description="wall-time budget of the training loop: after 60 "
                                       "steps the schedule is shortened to the steps that fit (recorded in the "
                                       "bundle; reproduce with max_steps set to it)")
    amp: bool = True
    init_from: str | None = Field(None, description="start from these weights: a bundle folder, a state dict "
                                  "(.pt) or a run's checkpoint.pt (fine-tuning); relative to the repo")
    init_weight_share: float = Field(0.0, ge=0.0, lt=1.0, description="export init_weight_share x init_from's "
                                     "weights + (1 - init_weight_share) x the trained weights (WiSE-FT weight-space "
                                     "ensembling, pipeline.train.wise); 0 exports the trained weights; needs init_from")
    data: DataConfig = DataConfig()

    @model_validator(mode="after")
    def _share_needs_init(self) -> "TrainConfig":
        if self.init_weight_share > 0.0 and not self.init_from:
            raise ValueError("init_weight_share > 0 needs init_from (the weights to interpolate with)")
        return self


def load_train_config(path: Path) -> TrainConfig:
    try:
        return TrainConfig.model_validate(read_yaml(Path(path)))
    except InputError:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "config"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(f"invalid training config {path}: {where}: {err.get('msg', exc)}{more}") from None
    except Exception as exc:
        raise InputError(f"invalid training config {path}: {str(exc).splitlines()[0]}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


ELASTIC_PROB = 0.05  # share of training patches given an elastic deformation


def _transforms(cfg: TrainConfig):
    from monai import transforms as T

    keys = ["image", "label"]
    return T.Compose([
        T.RandCropByLabelClassesd(keys, label_key="label", spatial_size=cfg.patch_size, ratios=list(cfg.class_ratios),
                                  num_classes=4, num_samples=1, allow_smaller=True),
        T.SpatialPadd(keys, spatial_size=cfg.patch_size, mode="constant", value=0),
        T.RandFlipd(keys, prob=0.5, spatial_axis=0),
        T.RandFlipd(keys, prob=0.3, spatial_axis=2),
        T.RandAffined(keys, prob=0.2, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.12, 0.12, 0.12),
                      mode=("bilinear", "nearest"), padding_mode="border"),
        # MONAI 1.6's Rand3DElasticd draws its full-size offset field and resamples both keys through an
        # identity grid even when its own prob says "skip" (~80 ms of a 96^3 patch's ~270 ms on one core);
        # OneOf applies it with the same 5 % share and costs nothing the other 95 % (tests/test_train_augment.py).
        T.OneOf([T.Rand3DElasticd(keys, prob=1.0, sigma_range=(5, 8), magnitude_range=(20, 60),
                                  mode=("bilinear", "nearest"), padding_mode="border"),
                 T.Identityd(keys)], weights=[ELASTIC_PROB, 1.0 - ELASTIC_PROB]),
        T.RandScaleIntensityd("image", factors=0.15, prob=0.5),
        T.RandShiftIntensityd("image", offsets=0.08, prob=0.5),
        T.RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.2),
        T.RandGaussianSmoothd("image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0), prob=0.2),
        T.RandGaussianNoised("image", std=0.03, prob=0.4),
    ])


def _normalise_np(hu: np.ndarray, intensity: dict[str, Any]) -> np.ndarray:
    lo, hi = intensity.get("clip", [-1000, 2000])
    return ((np.clip(hu, lo, hi) - float(intensity.get("shift", 0.0))) / float(intensity.get("scale", 1000.0))).astype(np.float32)


def _build_pool(cfg: TrainConfig, rank: int, cache_dir: Path):
    from pipeline.train.data import nnunet_cases, phantom_cases

    pc = cfg.data.phantom
    cache = cache_dir / f"pool-rank{rank}.npz"
    if cache.is_file():
        z = np.load(cache)
        n = int(z["n"])
        train = [(z[f"i{i}"], z[f"l{i}"]) for i in range(n)]
        nv = int(z["nv"])
        val = [(z[f"vi{i}"], z[f"vl{i}"]) for i in range(nv)]
        log.info("training pool loaded from cache: %d train, %d val", n, nv)
    else:
        t0 = time.time()
        tr = phantom_cases(pc.n_train, cfg.seed * 1000 + rank, cfg.target_spacing_mm, cfg.fast_spacing_mm, pc.shape,
                           pc.domain_randomise_prob, pc.fast_share, workers=cfg.data.pool_workers,
                           diversity=None if pc.diversity.is_off() else pc.diversity.model_dump(),
                           diversity_share=pc.diversity_share)
        va = phantom_cases(pc.n_val, 10_000_000 + cfg.seed, cfg.target_spacing_mm, cfg.fast_spacing_mm, pc.shape,
                           0.0, 0.0)
        train = [(_normalise_np(c.image, cfg.intensity), c.labels) for c in tr]
        val = [(_normalise_np(c.image, cfg.intensity), c.labels) for c in va]
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"n": len(train), "nv": len(val)}
        for i, (a, b) in enumerate(train):
            arrays[f"i{i}"], arrays[f"l{i}"] = a.astype(np.float16), b
        for i, (a, b) in enumerate(val):
            arrays[f"vi{i}"], arrays[f"vl{i}"] = a.astype(np.float16), b
        np.savez(cache, **arrays)
        log.info("generated %d phantoms in %.0f s", len(train) + len(val), time.time() - t0)
    if cfg.data.nnunet.path:
        ns = cfg.data.nnunet
        user = nnunet_cases(Path(ns.path), ns.label_map, cfg.target_spacing_mm, ns.derive_canal)
        if not user:
            raise InputError(f"no labelled cases found in {ns.path} (expected imagesTr/, labelsTr/)")
        train += [(_normalise_np(c.image, cfg.intensity), c.labels) for c in user] * ns.repeat
        log.info("added %d nnU-Net cases (x%d)", len(user), ns.repeat)
    if cfg.data.real_insert.enabled:
        train += _real_insert_pool(cfg, rank)
    return train, val


def _real_insert_pool(cfg: TrainConfig, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real CT backgrounds with inserted metastases (seeded per rank), normalised like the phantoms."""
    from pipeline.train.real_insert import real_insert_cases

    ri = cfg.data.real_insert
    root = Path(ri.data_root)
    root = root if root.is_absolute() else (REPO_ROOT / root).resolve()
    if not root.is_dir():
        raise InputError(f"data.real_insert: data_root {root} does not exist")
    cases = real_insert_cases(root, ri.n_cases, cfg.seed * 1000 + rank + 555, cfg.target_spacing_mm, ri.sources,
                              ri.max_lesions, ri.crop_mm, workers=cfg.data.pool_workers,
                              small_lesion_prob=ri.diversity.small_lesion_prob,
                              low_contrast_lytic_prob=ri.diversity.low_contrast_lytic_prob)
    if not cases:
        raise InputError(f"data.real_insert: no allowed real CT background found under {root}")
    log.info("added %d real-CT cases with inserted lesions (x%d)", len(cases), ri.repeat)
    return [(_normalise_np(c.image, cfg.intensity), c.labels) for c in cases] * ri.repeat


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes=(1, 2, 3)) -> dict[int, float]:
    out = {}
    for c in classes:
        p, t = pred == c, truth == c
        denom = p.sum() + t.sum()
        out[c] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out


def export_checkpoint(config_path: Path, workdir: Path | None = None, export_name: str | None = None) -> Path:
    """Export the newest checkpoint of a run as a bundle without training (e.g. a run still going)."""
    from pipeline.train.export import export_bundle

    cfg, work = _resolve(config_path, None, workdir, export_name)
    ckpt = work / "checkpoint.pt"
    if not ckpt.is_file():
        raise InputError(f"no checkpoint in {work}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hist = state.get("history", [])
    hist = hist + [{"step": state["step"], "dice": hist[-1]["dice"] if hist else {}, "note": "exported checkpoint"}]
    init = _initial_weights(cfg.init_from) if cfg.init_weight_share > 0 else None
    weights, extra = _export_weights(cfg, state["model"], init)
    return export_bundle(cfg, weights, hist, work, elapsed_s=0.0, device="checkpoint", extra_training=extra)


def _export_weights(cfg: TrainConfig, trained: dict, init: dict | None) -> tuple[dict, dict[str, Any]]:
    """The weights a bundle ships: the trained ones, or their WiSE-FT mix with ``init`` (``init_weight_share``).

    Returns them with what the bundle's metadata records about the mix (the trained weights'
    sha256 among it, so the unmixed weights stay identifiable).
    """
    if cfg.init_weight_share <= 0 or init is None:
        return trained, {}
    from pipeline.train.wise import interpolate_weights

    mixed = interpolate_weights(trained, init, cfg.init_weight_share)
    return mixed, {"init_weight_share": cfg.init_weight_share, "trained_weights_sha256": _state_sha256(trained),
                   "init_weights_sha256": _state_sha256(init)}


def _state_sha256(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (independent of torch.save's framing)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _resolve(config_path: Path, max_steps: int | None, workdir: Path | None, export_name: str | None):
    cfg = load_train_config(config_path)
    if max_steps is not None:
        cfg.max_steps = max_steps
    if export_name:
        cfg.export_name = export_name
    work = Path(workdir) if workdir else (REPO_ROOT / cfg.workdir if not Path(cfg.workdir).is_absolute() else Path(cfg.workdir))
    work.mkdir(parents=True, exist_ok=True)
    return cfg, work


def train_from_config(config_path: Path, resume: bool = True, max_steps: int | None = None,
                      workdir: Path | None = None, export_name: str | None = None) -> Path:
    """Train, validate, checkpoint and export a bundle. Returns the bundle folder."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    from pipeline.segment.bundle import build_network

    cfg, work = _resolve(config_path, max_steps, workdir, export_name)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick its fastest kernels
    seed_everything(cfg.seed + rank)
    train_pool, val_pool = _build_pool(cfg, rank, work / "cache")
    net = build_network(cfg.network).to(device)
    resuming = resume and (work / "checkpoint.pt").is_file()
    # the start weights: to begin from, and (init_weight_share > 0) for the export's WiSE-FT mix
    init_state = (_initial_weights(cfg.init_from)
                  if cfg.init_from and (not resuming or cfg.init_weight_share > 0) else None)
    if init_state is not None and not resuming:
        net.load_state_dict(init_state)
        log.info("initialised from %s", cfg.init_from)
    if cfg.init_weight_share <= 0:
        init_state = None
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_len = [cfg.max_steps]  # the cosine schedule's length; time_limit_s may shorten it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, sched_len[0]) / max(sched_len[0], 1))))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    ckpt = work / "checkpoint.pt"
    step, best, history = 0, -1.0, []
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best, history = state["step"], state.get("best", -1.0), state.get("history", [])
        sched_len[0] = int(state.get("schedule_steps", cfg.max_steps))
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["np_rng"])
        random.setstate(state["py_rng"])
        log.info("resumed from step %d", step)
    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(work / "tb"))
        except ImportError:
            log.warning("tensorboard not installed: no TensorBoard logs")
    tf = _transforms(cfg)
    tf.set_random_state(seed=cfg.seed + rank + step)
    rng = np.random.default_rng(cfg.seed + rank + step)
    batches = _loader(train_pool, cfg, seed=cfg.seed + 100_003 * rank + step, pin=device.type == "cuda")
    t0, t_log = time.time(), time.time()
    model.train()
    last_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    t_rate: dict[int, float] = {}
    while step < last_step:
        if batches is not None:
            x, y = next(batches)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True).long()
        else:
            x, y = _batch(train_pool, tf, rng, cfg.batch_size)
            x, y = x.to(device), y.to(device).long()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        if cfg.time_limit_s:
            last_step = _fit_to_time(cfg, step, last_step, t0, t_rate, sched_len)
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
        if rank == 0 and (step % 10 == 0 or step == 1):
            log.info("step %d/%d loss %.4f (%.2f s/step)", step, cfg.max_steps, loss.item(), (time.time() - t_log) / 10)
            print(f"step {step}/{cfg.max_steps} loss {loss.item():.4f} {(time.time() - t_log) / 10:.2f}s/step", flush=True)
            t_log = time.time()
        if rank == 0 and (step % cfg.val_every == 0 or step == last_step) and val_pool:
            dices = _validate(net, val_pool, cfg, device, sliding_window_inference)
            mean = float(np.nanmean(list(dices.values())))
            history.append({"step": step, "dice": dices, "mean": mean, "elapsed_s": time.time() - t0})
            if writer is not None:
                for c, v in dices.items():
                    writer.add_scalar(f"val/dice_{c}", v, step)
            print(f"validation step {step}: dice canal {dices[1]:.3f} lesion {dices[2]:.3f} bone {dices[3]:.3f}", flush=True)
            if mean > best:
                best = mean
                torch.save(net.state_dict(), work / "best.pt")
            model.train()
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == last_step):
            _save_ckpt(ckpt, net, opt, sched, step, best, history, sched_len[0])
    if distributed:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return work
    from pipeline.train.export import export_bundle

    final_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    cfg.max_steps = sched_len[0]  # what reproduces this run (a time limit may have shortened it)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights, extra = _export_weights(cfg, final_state, init_state)
    if extra:
        torch.save(final_state, work / "trained.pt")  # the unmixed weights, beside the run's checkpoint
    return export_bundle(cfg, weights, history, work, elapsed_s=time.time() - t0, device=f"{device} ({name})",
                         extra_training=extra)


def _sample(pool, tf, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented patch (image float32, label) from a random pool case."""
    img, lab = pool[int(rng.integers(len(pool)))]
    d = tf({"image": img[None].astype(np.float32), "label": lab[None]})
    d = d[0] if isinstance(d, list) else d
    return torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32), torch.as_tensor(np.asarray(d["label"]))


def _batch(pool, tf, rng, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_sample(pool, tf, rng) for _ in range(batch_size)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class _PatchStream(torch.utils.data.IterableDataset):
    """Endless augmented patches; each DataLoader worker has its own seeded random streams."""

    def __init__(self, pool, cfg: TrainConfig, seed: int) -> None:
        self.pool, self.cfg, self.seed = pool, cfg, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        torch.set_num_threads(1)
        tf = _transforms(self.cfg)
        tf.set_random_state(seed=(self.seed * 7919 + wid) % (2**32))
        rng = np.random.default_rng([self.seed, wid])
        while True:
            yield _sample(self.pool, tf, rng)


def _loader(pool, cfg: TrainConfig, seed: int, pin: bool):
    """Batches from ``cfg.num_workers`` processes (None: sample in the training loop)."""
    if cfg.num_workers <= 0:
        return None
    import multiprocessing as mp

    dl = torch.utils.data.DataLoader(_PatchStream(pool, cfg, seed), batch_size=cfg.batch_size,
                                     num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=True,
                                     prefetch_factor=4, multiprocessing_context=mp.get_context("fork"))
    return iter(dl)


REFIT_EVERY = 50  # steps between schedule re-fits under a time limit


def _fit_to_time(cfg: TrainConfig, step: int, last_step: int, t0: float, t_rate: dict[int, float],
                 sched_len: list[int]) -> int:
    """With ``time_limit_s``: fit the schedule to the steps that fit in the budget; stop at the limit.

    First fit at step 60 (from the rate of steps 20-60), then again every ``REFIT_EVERY`` steps
    from the rate of the last ``2 * REFIT_EVERY`` steps: the first steps often run from the
    loader's prefetch and are several times faster than the steady state (0.03 against ~0.15
    s/step on an H100 with 13 augmentation workers), and a schedule fitted to them alone ends
    far beyond the limit with the learning rate still high. The schedule may grow again, never
    beyond ``max_steps``.
    """
    now = time.time()
    if step == 20 or (step >= 60 and step % REFIT_EVERY in (0, 10)):
        t_rate[step] = now
    ref = 20 if step == 60 else step - 2 * REFIT_EVERY
    if (step == 60 or (step > 60 and step % REFIT_EVERY == 10)) and ref in t_rate:
        per_step = (now - t_rate[ref]) / max(step - ref, 1)
        fit = step + int((cfg.time_limit_s - (now - t0)) / per_step * 0.97)
        fit = min(max(step + 1, fit), cfg.max_steps)
        if abs(fit - last_step) > 0.02 * last_step:
            last_step = fit
            sched_len[0] = last_step
            log.info("time limit %.0f s: %.3f s/step, schedule set to %d steps", cfg.time_limit_s, per_step, last_step)
            print(f"time limit {cfg.time_limit_s:.0f} s at {per_step:.3f} s/step: schedule set to {last_step} steps",
                  flush=True)
    if now - t0 > cfg.time_limit_s and step < last_step:
        print(f"time limit reached at step {step}", flush=True)
        return step
    return last_step


def _initial_weights(spec: str) -> dict:
    path = Path(spec) if Path(spec).is_absolute() else REPO_ROOT / spec
    if (path / "metadata.json").is_file():
        from pipeline.segment.bundle import load_bundle

        return load_bundle(path).network.state_dict()
    if not path.is_file():
        raise InputError(f"init_from: {spec} not found")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def _validate(net, val_pool, cfg: TrainConfig, device, swi) -> dict[int, float]:
    net.eval()
    scores: dict[int, list[float]] = {1: [], 2: [], 3: []}
    with torch.inference_mode():
        for img, lab in val_pool:
            x = torch.from_numpy(img.astype(np.float32))[None, None].to(device)
            out = swi(x, roi_size=cfg.inference_roi, sw_batch_size=1, predictor=net, overlap=0.25, mode="gaussian")
            pred = out[0].argmax(0).cpu().numpy()
            for c, v in dice_per_class(pred, lab).items():
                if not np.isnan(v):
                    scores[c].append(v)
    return {c: float(np.mean(v)) if v else float("nan") for c, v in scores.items()}


def _save_ckpt(path: Path, net, opt, sched, step: int, best: float, history: list, schedule_steps: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                "schedule_steps": schedule_steps,
                "best": best, "history": history, "torch_rng": torch.get_rng_state(),
                "np_rng": np.random.get_state(), "py_rng": random.getstate()}, tmp)
    os.replace(tmp, path)
    (path.parent / "history.json").write_text(json.dumps(history, indent=1))
