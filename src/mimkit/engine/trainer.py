"""The pre-training loop, explicit from top to bottom.

One iteration = one optimizer step: schedule → forward/backward over the step's micro-batches →
clip → step → EMA → log → checkpoint → side work (k-NN monitor, reconstruction grid).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from timm.optim import param_groups_weight_decay
from tqdm import tqdm

from mimkit.config import Config, config_from_dict, config_yaml, to_dict
from mimkit.data.build import device_augmentation, pretrain_dataset
from mimkit.data.decode import collate_device
from mimkit.data.sampler import step_loaders
from mimkit.engine import parallel
from mimkit.engine.checkpoint import (
    atomic_write_text,
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mimkit.engine.distributed import all_mean, any_rank, barrier, cleanup, init_distributed
from mimkit.engine.logging import MetricLogger, setup_logging
from mimkit.engine.precision import adamw_kernel, autocast_for, grad_scaler_for
from mimkit.engine.rundir import RunLock, check_resume_compatible
from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.engine.signals import Preempted, StopSignal, ignore_stop_signals  # noqa: F401 (Preempted: API)
from mimkit.engine.summary import log_run_summary
from mimkit.errors import DataError, MimkitError, RunError
from mimkit.eval.knn import knn_monitor
from mimkit.models import model_from_config
from mimkit.objectives import build_objective, parse_method

log = logging.getLogger("mimkit")


class NonFiniteLossError(MimkitError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


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


def resolve_config(cfg: Config | None, run: Path, resume: bool, overrides) -> tuple[Config, dict | None]:
    """The run's config and, when resuming from a checkpoint, its state.

    ``resume`` continues the newest readable checkpoint; a run killed before its first checkpoint
    starts again from step 0 with its saved ``config.yaml``; an empty folder starts from ``cfg``
    (so a preemptible job can always pass ``--resume`` with its config). A run that has begun uses
    its saved config plus ``overrides``; an override of a key other than run length, bookkeeping
    or evaluation is refused, naming the key.
    """
    if not resume:
        if cfg is None:
            raise ValueError("a config is needed to start a new run")
        if list_checkpoints(run):
            raise RunError(f"{run} already holds checkpoints; pass --resume to continue it, or choose another --out")
        return cfg, None
    if list_checkpoints(run):
        state, path = load_latest(run)
        saved = state["config"]
        log.info("resuming %s from %s (step %d)", run, path.name, state["step"])
    elif (run / "config.yaml").is_file():
        state, saved = None, yaml.safe_load((run / "config.yaml").read_text())
        log.info("resuming %s: no checkpoint was written yet, so starting from step 0 with its saved config", run)
    elif cfg is not None:
        log.info("--resume: %s holds no run yet; starting a new one", run)
        return cfg, None
    else:
        raise RunError(f"--resume: {run} holds no run to continue (no checkpoint, no config.yaml); "
                       "start it with --config")
    # A run that has begun continues with its saved config (which holds what it derived: computed
    # statistics, a fitted batch) plus the overrides; ``cfg`` only starts a run.
    new = config_from_dict(saved, overrides)
    check_resume_compatible(saved, to_dict(new), run)
    return new, state


def log_knn(logger: MetricLogger, step: int, objective, cfg: Config, device: torch.device) -> None:
    """Online k-NN monitor (solo-learn style, any method), logged as ``knn_top1`` of ``step``."""
    logger.log(step, {"knn_top1": knn_monitor(objective, cfg, device)})


def log_reconstructions(logger: MetricLogger, step: int, objective, cfg: Config, run: Path) -> None:
    """``reconstructions-STEP.png`` in the run folder, also sent to the loggers (TensorBoard, ...)."""
    png = save_reconstructions(objective.eval_model(), cfg, run / f"reconstructions-{step:08d}.png")
    logger.log_image(step, "reconstructions", png)


def side_work(name: str, fn, *args) -> None:
    """Run a reconstruction grid or monitor; a failure is a warning, never the end of the run."""
    try:
        fn(*args)
    except Exception as e:  # side work must never cost the run
        log.warning("%s failed at this step (training continues): %s: %s", name, type(e).__name__, e)


def pretrain(cfg: Config | None, run_dir: str | Path, resume: bool = False,
             overrides: list[str] | tuple = ()) -> Path:
    """Pre-train into ``run_dir``; with ``resume`` continue its last checkpoint exactly
    (with the run's saved config, plus ``overrides`` such as a longer ``train.max_steps``).

    Under ``torchrun`` every process runs this; rank 0 alone logs, writes checkpoints and holds
    the run folder's lock (a second run into the same folder is refused while this one lives).
    """
    setup_logging()
    run = Path(run_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run) if is_main else nullcontext():
        if is_main:  # half-written files of a killed writer (we hold the lock: nobody else writes)
            for tmp in run.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        cfg, state = resolve_config(cfg, run, resume, overrides)
        return _train(cfg, run, state)


def _train(cfg: Config, run: Path, state: dict | None) -> Path:
    t = cfg.train
    info, device = init_distributed(t.device)
    parse_method(cfg.method)  # a misspelt method fails now, not after scanning a large folder
    # Before the config is saved: it may fill data.mean/std (data.stats=compute) and fit the batch.
    dataset = pretrain_dataset(cfg, info.world_size)
    on_device = device_augmentation(cfg)  # data.decode=device: decode and crop on the device
    torch.manual_seed(t.seed)
    model = model_from_config(cfg)
    if t.init_from and state is None:  # a resumed run has its own weights
        from mimkit.interop.convert import init_from

        w = init_from(model, t.init_from)
        log.info("init: weights from %s (%s%s)", t.init_from, w.source,
                 ", encoder only: the decoder starts from train.seed" if w.encoder_only else "")
    objective = build_objective(cfg, model).to(device)  # a bad method or shape fails before anything is saved
    if info.is_main:
        atomic_write_text(run / "config.yaml", config_yaml(cfg))

    global_batch = t.batch_size * info.world_size
    steps_per_epoch = len(dataset) // global_batch // t.accum_iter
    if steps_per_epoch < 1:
        raise DataError(
            f"the data set has {len(dataset)} samples, fewer than one optimizer step "
            f"(train.batch_size {t.batch_size} x {info.world_size} processes x train.accum_iter {t.accum_iter}); "
            "lower train.batch_size or train.accum_iter"
        )
    total_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    eff_batch = global_batch * t.accum_iter
    base_lr = scaled_lr(t.lr, t.blr, eff_batch)
    warmup_steps = t.warmup_epochs * steps_per_epoch
    if warmup_steps >= total_steps:
        log.warning("warm-up (%d steps) is not shorter than the run (%d steps)", warmup_steps, total_steps)

    if info.is_main:  # before sharding: the summary times a copy of the model
        log_run_summary(cfg, dataset, objective, device, info.world_size, steps_per_epoch, total_steps,
                        state["step"] if state is not None else 0)
    net = parallel.wrap(objective, t.strategy, info, device)  # before the optimizer: FSDP2 swaps parameters
    params = param_groups_weight_decay(objective, t.weight_decay)
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=tuple(t.betas), **adamw_kernel(device))

    scaler = grad_scaler_for(t.amp, device)  # fp16 only
    step = 0
    if state is not None:
        parallel.load_full_state(objective, optimizer, state, t.strategy, info)
        set_rng_state(state["rng"])
        step = state["step"]
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    step_fn = torch.compile(net) if t.compile else net
    autocast = autocast_for(t.amp, device)
    log.info("%s: %d samples, %d steps/epoch, %d steps, effective batch %d (%d x %d processes x %d), "
             "lr %.3g, device %s", cfg.method, len(dataset), steps_per_epoch, total_steps, eff_batch,
             t.batch_size, info.world_size, t.accum_iter, base_lr, device)
    logger = MetricLogger(run, step, cfg=cfg) if info.is_main else None
    bad_loss = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", dynamic_ncols=True,
               mininterval=1.0, disable=not info.is_main)
    last_ckpt = list_checkpoints(run)[-1][1] if state is not None and info.is_main else None
    data_time, last_log_step, t_prev = 0.0, step, time.perf_counter()

    def make_state() -> dict:
        """The checkpoint: full state dicts (gathered from the shards under FSDP2, on every rank)."""
        full, optim = parallel.full_state(objective, optimizer, t.strategy, info)
        state = {
            "step": step, "config": to_dict(cfg), "objective": full,
            "model": parallel.submodule_state(full, objective, objective.eval_model()), "optimizer": optim,
            "rng": rng_state(), "arch": model.arch, "norm_pix_loss": cfg.norm_pix_loss,
            "method": cfg.method, "format": "mimkit-v1",
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        for name, module in objective.extra_state().items():  # e.g. RC-MAE's student and teacher
            state[name] = parallel.submodule_state(full, objective, module)
        return state

    side = info.is_main and t.strategy != "fsdp"  # side work needs the whole model on one rank
    if info.is_main and not side:
        log.info("train.strategy=fsdp: no online k-NN monitor or reconstruction grids (the weights are sharded); "
                 "the checkpoints hold the whole model for mimkit eval and mimkit visualize")
    objective.train()
    steps = step_loaders(dataset, t.batch_size, t.seed, step, steps_per_epoch, total_steps, accum_iter=t.accum_iter,
                         rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                         pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                         collate_fn=collate_device if cfg.data.decode == "device" else None,
                         prefetch_factor=4 if cfg.data.num_workers else None)
    try:
        with StopSignal() as stop:
            for loader in steps:
                # --- schedule (per optimizer step, from the fractional epoch)
                lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, t.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # --- forward / backward over the micro-batches of this step
                sums: dict[str, torch.Tensor] = {}
                for micro in range(t.accum_iter):
                    t_data = time.perf_counter()
                    try:
                        (imgs, noise), _ = next(loader)
                    except RuntimeError:
                        # A SIGTERM to the whole process group (SLURM) can reach a loader worker that
                        # a new epoch has just started, before ignore_stop_signals runs in it: that
                        # worker's death is the stop itself. Step `step` is complete: save it.
                        if stop.received is None or info.enabled:
                            raise
                        save_checkpoint(run, step, make_state(), t.keep_checkpoints)
                        raise Preempted(f"{stop.received} received: checkpoint at step {step} written to {run}",
                                        "continue with resume=True") from None
                    data_time += time.perf_counter() - t_data
                    if on_device:  # data.decode=device: decode, crop and draw the masks here
                        imgs, noise = on_device(imgs, device)
                    else:
                        imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
                    with parallel.grad_sync(net, t.strategy, info, sync=micro + 1 == t.accum_iter):
                        with autocast:
                            out = step_fn(imgs, noise, step / total_steps)
                        loss = out.loss / t.accum_iter
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    bad_loss |= ~torch.isfinite(out.loss.detach())
                    for k, v in {"loss": out.loss, **out.terms}.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float() / t.accum_iter

                # --- clip, step
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip and log the true gradient norm
                max_norm = t.clip_grad if t.clip_grad is not None else math.inf
                grad_norm = parallel.local_value(torch.nn.utils.clip_grad_norm_(objective.parameters(), max_norm))
                if scaler is not None:  # skips the step when fp16 gradients overflowed
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                # --- EMA (teacher wrappers) and other per-step updates
                objective.after_step((step + 1) / total_steps)
                step += 1
                bar.update(1)

                # --- log (host syncs only here: NaN check, loss means)
                is_ckpt = step % t.checkpoint_every == 0 or step == total_steps
                is_knn = bool(t.knn_every) and step % (t.knn_every * steps_per_epoch) == 0
                is_log = step % t.log_every == 0 or is_ckpt or is_knn
                if is_log:
                    if any_rank(bool(bad_loss.item()), info, device):
                        raise NonFiniteLossError(
                            f"non-finite loss at or before step {step}; stopping. The last good "
                            f"checkpoint is {last_ckpt or 'none (no checkpoint yet)'}. Try a lower "
                            "train.blr, train.clip_grad=1.0, or train.amp=off."
                        )
                    names = sorted(sums)
                    means = all_mean(torch.stack([sums[k] for k in names]), info).tolist()
                    now = time.perf_counter()
                    row = dict(zip(names, means, strict=True))
                    row.update(lr=lr, epoch=step / steps_per_epoch, grad_norm=float(grad_norm),
                               data_time=data_time,
                               images_per_s=eff_batch * (step - last_log_step) / max(now - t_prev, 1e-9))
                    if device.type == "cuda":
                        row["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    if logger is not None:
                        logger.log(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{row['images_per_s']:.0f}", refresh=False)
                    data_time = 0.0

                # --- checkpoint (before any side work, so side work can never cost the run)
                preempted = stop.received is not None if not info.enabled else \
                    (is_log and any_rank(stop.received is not None, info, device))
                if is_ckpt or preempted:
                    if info.is_main or t.strategy == "fsdp":  # FSDP2 gathers on every rank
                        ckpt_state = make_state()
                        if info.is_main:
                            last_ckpt = save_checkpoint(run, step, ckpt_state, t.keep_checkpoints)
                        del ckpt_state
                    barrier(info)
                if preempted:
                    raise Preempted(f"{stop.received or 'a stop signal'} received: checkpoint at step "
                                    f"{step} written to {run}", "continue with resume=True")

                # --- side work: online k-NN monitor (solo-learn style), reconstruction grid
                if side:
                    if is_knn:
                        side_work("online k-NN monitor", log_knn, logger, step, objective, cfg, device)
                    if step == total_steps or (t.vis_every and step % t.vis_every == 0):
                        side_work("reconstruction grid", log_reconstructions, logger, step, objective, cfg, run)
                if is_log:  # images/s excludes the checkpoint and side work
                    t_prev, last_log_step = time.perf_counter(), step
    finally:  # loader workers stop, the progress bar ends its line, the logs are flushed
        steps.close()
        bar.close()
        if logger is not None:
            logger.close()
    log.info("finished at step %d; last checkpoint %s", step, last_ckpt)
    barrier(info)  # no rank tears the process group down while another still works (rank 0's side work)
    cleanup(info)
    return run
