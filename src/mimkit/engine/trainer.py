"""The pre-training loop, explicit from top to bottom (STYLE §5).

forward → backward → (accumulate) → clip → step → schedule → EMA → log → checkpoint.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.config import Config, config_from_dict, save_config, to_dict
from mimkit.data.build import WithNoise, log_run_summary, pretrain_dataset  # noqa: F401 (WithNoise: re-export)
from mimkit.data.sampler import ShardedEpochSampler
from mimkit.engine.checkpoint import (
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.engine.distributed import all_mean, any_rank, barrier, cleanup, init_distributed
from mimkit.engine.logging import MetricLogger, setup_logging
from mimkit.engine.schedule import warmup_cosine
from mimkit.errors import RunError
from mimkit.eval.knn import knn_monitor
from mimkit.models import model_from_config
from mimkit.objectives import build_objective

log = logging.getLogger("mimkit")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint."""


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


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption) set a flag; the loop checkpoints and exits cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and threading.current_thread() is threading.main_thread():
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the preemption signals, so a scheduler that
    signals the whole process group (SLURM, ``kill -TERM -PGID``) does not kill them before the
    main process has written its checkpoint (the main process shuts them down itself)."""
    for name in StopSignal.SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


@torch.no_grad()
def save_reconstructions(model, cfg: Config, path: Path, num: int = 8) -> Path:
    """Reconstruction grid of the first test images with fixed masks (see mimkit.viz)."""
    from mimkit.data import stats_for
    from mimkit.eval.knn import eval_dataset
    from mimkit.viz import save_reconstruction_grid

    data = eval_dataset(cfg, "test")
    device = next(model.parameters()).device
    imgs = torch.stack([data[i][0] for i in range(min(num, len(data)))]).to(device)
    noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0))
    mean, std = stats_for(cfg)
    return save_reconstruction_grid(model, imgs, path, mean, std, noise.to(device),
                                    upscale=max(1, 128 // cfg.model.img_size))


def pretrain(cfg: Config | None, run_dir: str | Path, resume: bool = False,
             overrides: list[str] | tuple = ()) -> Path:
    """Pre-train into ``run_dir``; with ``resume`` continue its last checkpoint exactly
    (with the run's saved config, plus ``overrides`` such as a longer ``train.max_steps``).

    Under ``torchrun`` every process runs this; rank 0 alone logs and writes checkpoints.
    """
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
            raise RunError(f"{run} already holds checkpoints; pass --resume to continue it, or choose another --out")
    t = cfg.train
    info, device = init_distributed(t.device)
    # Before the config is saved: it may fill data.mean/std (data.stats=compute) and fit the batch.
    dataset = pretrain_dataset(cfg, info.world_size)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")

    torch.manual_seed(t.seed)
    model = model_from_config(cfg)
    objective = build_objective(cfg, model).to(device)

    global_batch = t.batch_size * info.world_size
    steps_per_epoch = len(dataset) // global_batch // t.accum_iter
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data set has {len(dataset)} samples, fewer than one optimizer step "
            f"(batch {t.batch_size} x {info.world_size} processes x accum {t.accum_iter})"
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
    if info.is_main:
        log_run_summary(cfg, dataset, objective, device, info.world_size, steps_per_epoch, total_steps, step)

    # DDP averages gradients over ranks: with equal per-rank batches that is the gradient of
    # the global-batch loss, so N processes x batch b trains like 1 process x batch N*b.
    net = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else objective
    step_fn = torch.compile(net) if t.compile else net
    autocast = autocast_for(t.amp, device)
    log.info("%s: %d samples, %d steps/epoch, %d steps, effective batch %d (%d x %d processes x %d), "
             "lr %.3g, device %s", cfg.method, len(dataset), steps_per_epoch, total_steps, eff_batch,
             t.batch_size, info.world_size, t.accum_iter, base_lr, device)
    logger = MetricLogger(run, step) if info.is_main else None
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", dynamic_ncols=True,
               mininterval=1.0, disable=not info.is_main)
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

    def checkpoint() -> Path | None:
        path = save_checkpoint(run, step, make_state(), t.keep_checkpoints) if info.is_main else None
        barrier(info)
        return path

    objective.train()
    with StopSignal() as stop:
        while step < total_steps:
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            sampler = ShardedEpochSampler(len(dataset), t.batch_size, t.seed, epoch,
                                          batch_in_epoch * t.accum_iter, info.rank, info.world_size)
            loader = DataLoader(
                dataset, batch_size=t.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                pin_memory=device.type == "cuda", drop_last=True,
                prefetch_factor=4 if cfg.data.num_workers else None, worker_init_fn=ignore_stop_signals,
            )
            sums: dict[str, torch.Tensor] = {}
            micro, data_time, last_log_step = 0, 0.0, step
            t_data = t_prev = time.perf_counter()
            for (imgs, noise), _ in loader:
                data_time += time.perf_counter() - t_data
                imgs = imgs.to(device, non_blocking=True)
                noise = noise.to(device, non_blocking=True)
                lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, t.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # DDP syncs gradients only on the last micro-batch of an accumulation.
                last_micro = micro + 1 == t.accum_iter
                sync = net.no_sync() if info.enabled and not last_micro else nullcontext()
                with sync:
                    with autocast:
                        out = step_fn(imgs, noise, step / total_steps)
                        loss = out["loss"]
                    (loss / t.accum_iter).backward()
                bad_loss |= ~torch.isfinite(loss.detach())
                for k, v in out.items():
                    if k == "loss" or k.startswith(("loss_", "acc_")):
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
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
                is_log = step % t.log_every == 0
                # Online k-NN monitor every `knn_every` epochs (solo-learn style, any method).
                is_knn = bool(t.knn_every) and step % (t.knn_every * steps_per_epoch) == 0
                is_log = is_log or is_knn
                if is_log or is_ckpt:
                    if any_rank(bool(bad_loss.item()), info, device):
                        raise NonFiniteLossError(
                            f"non-finite loss at or before step {step}; stopping. The last good "
                            f"checkpoint is {last_ckpt or 'none (no checkpoint yet)'}. Try a lower "
                            "train.blr, train.clip_grad=1.0, or train.amp=off."
                        )
                    names = sorted(sums)
                    means = all_mean(torch.stack([sums[k] for k in names]) / micro, info).tolist()
                    now = time.perf_counter()
                    row = dict(zip(names, means, strict=True))
                    row.update(lr=lr, epoch=step / steps_per_epoch, grad_norm=float(grad_norm),
                               data_time=data_time)
                    row["images_per_s"] = eff_batch * (step - last_log_step) / max(now - t_prev, 1e-9)
                    if is_knn and info.is_main:
                        row["knn_top1"] = knn_monitor(objective, cfg, device)
                    t_prev, last_log_step = time.perf_counter(), step
                    if device.type == "cuda":
                        row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if logger is not None:
                        logger.log(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{row.get('images_per_s', 0):.0f}", refresh=False)
                    data_time = 0.0
                preempted = stop.received is not None if not info.enabled else \
                    (is_log and any_rank(stop.received is not None, info, device))
                if info.is_main and (step == total_steps or (t.vis_every and step % t.vis_every == 0)):
                    save_reconstructions(objective.eval_model(), cfg, run / f"reconstructions-{step:08d}.png")
                if is_ckpt or preempted:
                    last_ckpt = checkpoint()
                if preempted:
                    bar.close()
                    raise Preempted(f"{stop.received or 'a stop signal'} received: checkpoint at step "
                                    f"{step} written to {run}; continue with --resume")
                sums, micro = {}, 0
                if step >= total_steps:
                    break
                t_data = time.perf_counter()
    bar.close()
    if logger is not None:
        logger.close()
    log.info("finished at step %d; last checkpoint %s", step, last_ckpt)
    cleanup(info)
    return run

