"""The pre-training loop, explicit from top to bottom (STYLE §5).

forward → backward → (accumulate) → clip → step → schedule → EMA → log → checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.config import Config, config_from_dict, save_config, to_dict
from mimkit.data.sampler import ShardedEpochSampler
from mimkit.engine.checkpoint import (
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.engine.logging import MetricLogger, setup_logging
from mimkit.engine.schedule import warmup_cosine
from mimkit.models import model_from_config
from mimkit.objectives import build_objective

log = logging.getLogger("mimkit")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class WithNoise:
    """Transform wrapper that also draws the masking noise, inside the per-sample seeded scope,
    so masks depend only on (seed, epoch, sample index) like the augmentation does."""

    def __init__(self, transform, num_patches: int) -> None:
        self.transform, self.num_patches = transform, num_patches

    def __call__(self, img):
        return self.transform(img), torch.rand(self.num_patches)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def adamw_kernel(device: torch.device) -> dict:
    """Fused AdamW on CUDA and CPU (on CPU ~4x faster than foreach, which loops per tensor)."""
    return {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}


def autocast_for(amp: str, device: torch.device):
    """bf16 autocast where supported ('auto'), fp32 on CPU by default."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def pretrain_dataset(cfg: Config, num_patches: int):
    """The seeded pre-training dataset: (image, noise), label per sample."""
    from mimkit.data import SeededDataset, build_dataset, dataset_stats, pretrain_transform

    mean, std = cfg.data.mean, cfg.data.std
    if mean is None or std is None:
        mean, std = dataset_stats(cfg.data.name)
    transform = pretrain_transform(
        cfg.model.img_size, mean, std, cfg.model.in_chans,
        scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
    )
    base = build_dataset(
        cfg.data.name, cfg.data.root, "train", WithNoise(transform, num_patches),
        on_corrupt=cfg.data.on_corrupt, synthetic_size=cfg.data.synthetic_size,
        img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, seed=cfg.train.seed,
    )
    return SeededDataset(base, cfg.train.seed)


def pretrain(cfg: Config | None, run_dir: str | Path, resume: bool = False,
             overrides: list[str] | tuple = ()) -> Path:
    """Pre-train into ``run_dir``; with ``resume`` continue its last checkpoint exactly
    (with the run's saved config, plus ``overrides`` such as a longer ``train.max_steps``)."""
    setup_logging()
    run = Path(run_dir)
    state = None
    if resume:
        state, ckpt_path = load_latest(run)
        cfg = config_from_dict(state["config"], overrides) if cfg is None else cfg
        log.info("resuming %s from %s (step %d)", run, ckpt_path.name, state["step"])
    else:
        if cfg is None:
            raise ValueError("a config is needed to start a new run")
        if list_checkpoints(run):
            raise FileExistsError(f"{run} already holds checkpoints; pass --resume to continue it")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")

    t = cfg.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    model = model_from_config(cfg)
    objective = build_objective(cfg, model).to(device)
    dataset = pretrain_dataset(cfg, model.num_patches)

    world_size, rank = 1, 0
    global_batch = t.batch_size * world_size
    micro_per_epoch = len(dataset) // global_batch
    steps_per_epoch = micro_per_epoch // t.accum_iter
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data set has {len(dataset)} samples, fewer than one optimizer step "
            f"(batch {t.batch_size} x {world_size} devices x accum {t.accum_iter})"
        )
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    eff_batch = global_batch * t.accum_iter
    base_lr = t.lr if t.lr is not None else t.blr * eff_batch / 256
    warmup_steps = t.warmup_epochs * steps_per_epoch
    if warmup_steps >= total_steps:
        log.warning("warm-up (%d steps) is not shorter than the run (%d steps)", warmup_steps, total_steps)

    params = param_groups_weight_decay(objective, t.weight_decay)
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=tuple(t.betas), **adamw_kernel(device))

    step = 0
    if state is not None:
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        step = state["step"]

    log.info("%s: %d samples, %d steps/epoch, %d steps, effective batch %d, lr %.3g, device %s",
             cfg.method, len(dataset), steps_per_epoch, total_steps, eff_batch, base_lr, device)
    logger = MetricLogger(run, step)
    autocast = autocast_for(t.amp, device)
    step_fn = torch.compile(objective) if t.compile else objective
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=1.0)
    last_ckpt = None

    def make_state() -> dict:
        state = {
            "step": step, "config": to_dict(cfg), "objective": objective.state_dict(),
            "model": objective.eval_model().state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "arch": model.arch, "norm_pix_loss": cfg.norm_pix_loss,
            "method": cfg.method, "format": "mimkit-v1",
        }
        teacher = getattr(objective, "teacher", None)
        if teacher is not None:  # RC-MAE-style: keep both; "model" holds the eval weights
            state["student"] = objective.model.state_dict()
            state["teacher"] = teacher.state_dict()
        return state

    objective.train()
    while step < total_steps:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler = ShardedEpochSampler(len(dataset), t.batch_size, t.seed, epoch,
                                      batch_in_epoch * t.accum_iter, rank, world_size)
        loader = DataLoader(
            dataset, batch_size=t.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda", drop_last=True,
            persistent_workers=False, prefetch_factor=4 if cfg.data.num_workers else None,
        )
        loss_sum, parts_sum, micro = 0.0, {}, 0
        t_data = t_prev = time.perf_counter()
        data_time = 0.0
        for (imgs, noise), _ in loader:
            data_time += time.perf_counter() - t_data
            imgs = imgs.to(device, non_blocking=True)
            noise = noise.to(device, non_blocking=True)
            lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, t.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                out = step_fn(imgs, noise, step / total_steps)
            loss = out["loss"]
            (loss / t.accum_iter).backward()
            bad_loss |= ~torch.isfinite(loss.detach())
            loss_sum = loss_sum + loss.detach()
            for k, v in out.items():
                if k.startswith(("loss_", "acc_")):
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.detach()
            micro += 1
            if micro < t.accum_iter:
                t_data = time.perf_counter()
                continue
            max_norm = t.clip_grad if t.clip_grad is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step((step + 1) / total_steps)
            step += 1
            bar.update(1)

            is_ckpt = step % t.checkpoint_every == 0 or step == total_steps
            if step % t.log_every == 0 or is_ckpt:
                if bad_loss.item():
                    raise NonFiniteLossError(
                        f"non-finite loss at or before step {step}; stopping. The last good "
                        f"checkpoint is {last_ckpt or 'none (no checkpoint yet)'}. Try a lower "
                        "train.blr, train.clip_grad=1.0, or train.amp=off."
                    )
                now = time.perf_counter()
                elapsed = now - t_prev
                t_prev = now
                row = {"loss": float(loss_sum) / micro, "lr": lr, "epoch": step / steps_per_epoch,
                       "grad_norm": float(grad_norm),
                       "images_per_s": eff_batch * t.log_every / max(elapsed, 1e-9) if
                       step % t.log_every == 0 else None,
                       "data_time": data_time}
                row.update({k: float(v) / micro for k, v in parts_sum.items()})
                if device.type == "cuda":
                    row["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                logger.log(step, {k: v for k, v in row.items() if v is not None})
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{row['images_per_s'] or 0:.0f}", refresh=False)
                data_time = 0.0
            if is_ckpt:
                last_ckpt = save_checkpoint(run, step, make_state(), t.keep_checkpoints)
            loss_sum, parts_sum, micro = 0.0, {}, 0
            if step >= total_steps:
                break
            t_data = time.perf_counter()
    bar.close()
    logger.close()
    log.info("finished %d steps; last checkpoint %s", step, last_ckpt)
    return run
