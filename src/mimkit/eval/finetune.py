"""End-to-end fine-tuning, MAE protocol (docs/methods/mae.md), on timm's ``VisionTransformer``.

The MAE encoder becomes ``VisionTransformer(global_pool='avg', fc_norm=True, class_token=True)``
(:func:`mimkit.load_encoder`), head trunc-normal(std 2e-5). AdamW with layer-wise lr decay from
``timm.optim.create_optimizer_v2(layer_decay=...)`` — timm's ViT ``group_matcher`` gives layer id
0 to patch_embed/cls_token/pos_embed, i+1 to block i and depth+1 to fc_norm/head, scale
``decay^(depth+1-id)`` as docs/methods/mae.md — drop-path, label smoothing, timm ``Mixup``/CutMix,
``timm.data.create_transform`` augmentation (RandAugment and random erasing where configured),
warm-up + cosine per iteration, bf16 autocast on GPU.

Small images (≤ 64 px): RandAugment is off by default (``eval.finetune.auto_augment: null``) —
its geometric ops were tuned for 224 px ImageNet crops — and the random-resized-crop scale is
``[0.35, 1]`` instead of ``[0.08, 1]``; mixup/cutmix are off by default for short CPU budgets.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.eval.common import labelled_dataset, num_classes_of, timm_encoder

log = logging.getLogger("mimkit")


def finetune_transforms(cfg) -> tuple:
    """(training, evaluation) transforms: timm ``create_transform(is_training=True)`` with the
    ``eval.finetune`` settings, and mimkit's deterministic evaluation transform."""
    from torchvision import transforms as T

    from mimkit.data import ConvertChannels, eval_transform, stats_for

    f = cfg.eval.finetune
    mean, std = stats_for(cfg)  # one value per model input channel
    c = cfg.model.in_chans
    train = create_transform(
        input_size=(c, cfg.model.img_size, cfg.model.img_size), is_training=True,
        scale=tuple(f.crop_scale), hflip=f.hflip, color_jitter=f.color_jitter,
        auto_augment=f.auto_augment, interpolation="bicubic", mean=tuple(mean), std=tuple(std),
        re_prob=f.reprob, re_mode=f.remode, re_count=f.recount,
    )
    _fix_posterize(train)
    return T.Compose([ConvertChannels(c), train]), eval_transform(cfg.model.img_size, mean, std, c)


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize, with 0 bits meaning a black image (old Pillow) instead of an error:
    Pillow ≥ 12 rejects ``bits=0``, which RandAugment ``inc1`` draws at magnitude 10."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    """Swap in :func:`_posterize` for the posterize ops of any timm RandAugment in ``transform``."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def build_classifier(cfg, num_classes: int, source=None, weights: str = "auto") -> nn.Module:
    """The timm ViT to fine-tune, from ``source``: a path (any format ``mimkit.load_encoder``
    reads), already-read :class:`~mimkit.interop.convert.Weights`, or ``None`` — from scratch: a
    freshly initialised MAE of cfg's architecture (MAE init: sin-cos positions, xavier), seeded
    by ``train.seed``. The new head's initialisation is seeded by ``train.seed`` too, so a config
    builds the same classifier in every process (and a resumed fine-tuning run matches)."""
    from mimkit.interop.convert import Weights, read_weights

    f = cfg.eval.finetune
    w = source if source is None or isinstance(source, Weights) else read_weights(source, weights)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # manual_seed reseeds CUDA too
        torch.manual_seed(cfg.train.seed)
        return timm_encoder(cfg, w, num_classes=num_classes, global_pool=f.global_pool,
                            drop_path_rate=f.drop_path)


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW with layer-wise lr decay (each group carries ``lr_scale``) via timm."""
    f = cfg.eval.finetune
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=f.weight_decay, layer_decay=f.layer_decay)


def lr_scales(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
    """Parameter name → lr scale of its group (for inspection and tests)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g.get("lr_scale", 1.0) for g in optimizer.param_groups for p in g["params"]}


@torch.no_grad()
def confusion_matrix(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                     autocast=None) -> torch.Tensor:
    """(num_classes, num_classes) counts of ``model`` on ``loader``: row = true class, column =
    predicted class."""
    from contextlib import nullcontext

    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for imgs, y in tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True):
        with autocast or nullcontext():
            logits = model(imgs.to(device, non_blocking=True))
        counts += torch.bincount(y * num_classes + logits.argmax(1).cpu(), minlength=num_classes * num_classes)
    model.train(was_training)
    return counts.view(num_classes, num_classes)


def evaluate_classifier(model: nn.Module, loader: DataLoader, device: torch.device, autocast=None) -> float:
    """Top-1 accuracy of ``model`` (a classifier with ``num_classes``) on ``loader``."""
    counts = confusion_matrix(model, loader, device, model.num_classes, autocast)
    return float(counts.diag().sum()) / max(int(counts.sum()), 1)


def per_class(counts: torch.Tensor, names: list[str] | None = None, top: int = 10) -> dict:
    """Per-class top-1 and the ``top`` most frequent confusions of a :func:`confusion_matrix`
    (classes named by ``names``, else by index): where a classifier's errors are."""
    n = counts.shape[0]
    names = [str(c) for c in (range(n) if names is None or len(names) != n else names)]
    totals = counts.sum(1).clamp(min=1).tolist()
    off = counts.clone().fill_diagonal_(0).flatten()
    confusions = []
    for i in torch.argsort(off, descending=True, stable=True)[:top].tolist():
        true, pred = divmod(i, n)
        if off[i] > 0:
            confusions.append({"true": names[true], "predicted": names[pred], "count": int(off[i]),
                               "share_of_true": int(off[i]) / totals[true]})
    return {"per_class_top1": {names[c]: int(counts[c, c]) / totals[c] for c in range(n)},
            "top_confusions": confusions}


def save_classifier(model: nn.Module, cfg, out: str | Path, label_names: list[str] | None = None,
                    source: str | None = None) -> Path:
    """Write a fine-tuned timm ``VisionTransformer`` (with its head) to the folder ``out`` as
    ``config.json`` + ``model.safetensors``, with the run's input size, normalization and class
    names: ``timm.create_model('local-dir:OUT', pretrained=True)`` rebuilds it."""
    import json

    from mimkit.data import stats_for
    from mimkit.interop.timm import save_timm_folder, vit_arch

    mean, std = stats_for(cfg)
    arch = vit_arch(model)
    meta = {"format": "timm-vit-classifier", "arch": json.dumps(arch), "source": source or "from scratch"}
    return save_timm_folder(model.state_dict(), arch, out, mean, std, metadata=meta, num_classes=model.num_classes,
                            global_pool=model.global_pool, label_names=label_names)


def _seed_step(seed: int, step: int) -> None:
    """Seed the main process's RNGs (drop path, Mixup/CutMix) for optimizer step ``step``, so a run
    resumed at any step draws what an uninterrupted one would have."""
    words = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(int(words[0]))
    random.seed(int(words[1]))


SAVE_EVERY_S = 30.0  # fine-tuning saves its progress after an epoch at most this often (and at the end)


def _fingerprint(cfg, source: str | None, sizes: list[int]) -> dict:
    """What a resumed fine-tuning run must share with the saved one: the recipe, model, data and
    seed, the encoder (``source``) and the data sizes. Bookkeeping (workers, the data's location,
    the device, evaluation batch sizes, loggers) may change between sittings."""
    from mimkit.config import to_dict

    c = to_dict(cfg)
    data = {k: v for k, v in c["data"].items() if k not in ("num_workers", "root")}
    return {"model": c["model"], "finetune": c["eval"]["finetune"], "split": c["eval"]["split"], "data": data,
            "seed": c["train"]["seed"], "amp": c["train"]["amp"], "sizes": sizes, "source": source}


def _load_state(path: Path, fingerprint: dict) -> dict | None:
    """The saved progress at ``path`` if it belongs to this fine-tuning run, else an error."""
    from mimkit.engine.checkpoint import load_file
    from mimkit.errors import RunError

    if not path.is_file():
        return None
    state = load_file(path)
    if state.get("fingerprint") != fingerprint:
        raise RunError(f"{path} holds an unfinished fine-tuning run with another encoder or settings; "
                       "delete it to start this one, or choose another --out")
    return state


def run_finetune(model: nn.Module, cfg, device: torch.device, state_path: str | Path | None = None,
                 source: str | None = None, classifier_out: str | Path | None = None) -> dict:
    """Fine-tune ``model`` (a timm ViT with a head) with ``eval.finetune`` on the
    ``data.label_fraction`` subset of the training split; top-1 on ``eval.split`` (test, or val
    while choosing settings). Every ``eval_every`` epochs, and at the end, the history also gets
    ``val_top1``: the learning curve reads the val split (``data.val_fraction`` > 0; else
    ``eval.split``), so a run that publishes a test number reads the test split once, at the end.

    Batch order and augmentation are functions of (``train.seed``, epoch, image) and the other
    random draws of (``train.seed``, step), so with ``state_path`` the run is resumable exactly: its
    progress is saved there (atomically) after an epoch (at most every ``SAVE_EVERY_S`` seconds),
    after the last one, and on SIGTERM/SIGUSR1 (then :class:`~mimkit.engine.signals.Preempted` is
    raised), and a later call with the same settings and ``source`` (the encoder's identity, e.g.
    its checkpoint's sha256) continues from it. The caller removes the file once it has stored the
    result, so a kill at any moment loses at most the steps since the last save. With
    ``classifier_out`` the fine-tuned model is written there (:func:`save_classifier`). The record
    has the per-class top-1 and the most frequent confusions of the final evaluation (:func:`per_class`).
    """
    from mimkit.data.build import val_fraction
    from mimkit.data.datasets import SeededDataset
    from mimkit.data.sampler import step_loaders
    from mimkit.engine.checkpoint import atomic_save
    from mimkit.engine.precision import autocast_for
    from mimkit.engine.signals import Preempted, StopSignal, ignore_stop_signals

    f = cfg.eval.finetune
    seed = cfg.train.seed
    t0 = time.perf_counter()
    train_tf, eval_tf = finetune_transforms(cfg)
    labelled = labelled_dataset(cfg, "train", train_tf, cfg.data.label_fraction)
    num_classes = model.num_classes or num_classes_of(labelled)
    train_ds = SeededDataset(labelled, seed)
    test_ds = labelled_dataset(cfg, cfg.eval.split, eval_tf)
    mixup_on = f.mixup > 0 or f.cutmix > 0
    batch = min(f.batch_size, len(train_ds))
    if mixup_on and batch % 2:
        batch -= 1  # timm Mixup (batch mode) needs an even batch
    accum = f.accum_iter
    if len(train_ds) // batch < accum:
        from mimkit.config import ConfigError

        raise ConfigError(f"eval.finetune.accum_iter={accum} needs {accum} batches of {batch} images per step, "
                          f"but the labelled training set has {len(train_ds)}; lower eval.finetune.accum_iter "
                          "or eval.finetune.batch_size")
    steps_per_epoch = len(train_ds) // batch // accum
    total = f.max_steps if f.max_steps is not None else f.epochs * steps_per_epoch
    warmup = f.warmup_epochs * steps_per_epoch
    eff_batch = batch * accum
    lr = scaled_lr(f.lr, f.blr, eff_batch)

    model = model.to(device)
    optimizer = build_optimizer(model, cfg, lr)
    mixup = None
    if mixup_on:
        mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                      switch_prob=f.mixup_switch_prob, mode=f.mixup_mode,
                      label_smoothing=f.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif f.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=f.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    autocast = autocast_for(cfg.train.amp, device)
    test_loader = DataLoader(test_ds, batch_size=cfg.eval.batch_size, shuffle=False,
                             num_workers=cfg.data.num_workers, worker_init_fn=ignore_stop_signals)
    curve_split, curve_loader = cfg.eval.split, test_loader
    if f.eval_every and cfg.eval.split != "val" and val_fraction(cfg) > 0:
        curve_split, curve_loader = "val", DataLoader(labelled_dataset(cfg, "val", eval_tf), shuffle=False,
                                                      batch_size=cfg.eval.batch_size,
                                                      num_workers=cfg.data.num_workers,
                                                      worker_init_fn=ignore_stop_signals)

    history, step, loss_sum, loss_n, train_s = [], 0, 0.0, 0, 0.0
    state_path = Path(state_path) if state_path is not None else None
    fingerprint = _fingerprint(cfg, source, [len(train_ds), len(test_ds), num_classes])
    state = _load_state(state_path, fingerprint) if state_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, train_s = state["step"], state["history"], state["train_s"]
        loss_sum, loss_n = state["loss_sum"], state["loss_n"]
        log.info("finetune: resuming from %s at step %d of %d", state_path, step, total)

    def save() -> None:
        nonlocal last_save
        atomic_save({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "history": history, "train_s": train_s + time.perf_counter() - t_train,
                     "loss_sum": loss_sum, "loss_n": loss_n}, state_path)
        last_save = time.perf_counter()

    def stop_here(signal_name: str) -> Preempted:
        save()
        return Preempted(f"{signal_name} received: fine-tuning progress at step {step} saved to {state_path}",
                         "call again with the same settings and state_path to continue")

    log.info("finetune: %d images, %d steps (%d/epoch), batch %d x %d, lr %.3g, layer decay %s, device %s",
             len(train_ds), total, steps_per_epoch, batch, accum, lr, f.layer_decay, device)
    bar = tqdm(total=total, initial=step, desc="finetune", dynamic_ncols=True, mininterval=1.0)
    t_train = last_save = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with ExitStack() as stack:
        stack.callback(bar.close)
        # Without a place to save progress, a stop signal keeps its default meaning.
        stop = stack.enter_context(StopSignal()) if state_path is not None else StopSignal()
        steps = step_loaders(train_ds, batch, seed, step, steps_per_epoch, total, accum_iter=accum,
                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                             worker_init_fn=ignore_stop_signals)
        stack.callback(steps.close)  # stops the loader's workers
        for loader in steps:
            _seed_step(seed, step)
            lr_now = warmup_cosine(step, total, warmup, lr, f.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group.get("lr_scale", 1.0)
            step_loss = loss_sum, loss_n
            for _micro in range(accum):
                try:
                    imgs, y = next(loader)
                except RuntimeError:
                    # A SIGTERM to the whole process group can reach a loader worker that a new epoch
                    # has just started, before ignore_stop_signals runs in it: that death is the stop.
                    if stop.received is None:
                        raise
                    loss_sum, loss_n = step_loss  # this step is redone on resume
                    raise stop_here(stop.received) from None
                imgs, y = imgs.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup is not None:
                    imgs, y = mixup(imgs, y)
                with autocast:
                    loss = criterion(model(imgs), y)
                loss_value = loss.item()  # one host sync per micro-batch
                if not math.isfinite(loss_value):
                    saved = f" (and delete {state_path}, this run's saved progress)" \
                        if state_path is not None and state_path.exists() else ""
                    raise RuntimeError(f"non-finite fine-tuning loss at step {step}; "
                                       f"lower eval.finetune.blr{saved}")
                (loss / accum).backward()
                loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
            if f.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), f.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr_now:.2e}", refresh=False)
            if step % steps_per_epoch and step < total:  # mid-epoch
                if stop.received is not None:
                    raise stop_here(stop.received)
                continue
            epoch = (step - 1) // steps_per_epoch
            row = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(loss_n, 1)}
            if f.eval_every and ((epoch + 1) % f.eval_every == 0 or step == total) \
                    and not (step == total and curve_loader is test_loader):  # that one comes next
                row[f"{curve_split}_top1"] = evaluate_classifier(model, curve_loader, device, autocast)
            history.append(row)
            log.info("finetune epoch %d: %s", epoch + 1, row)
            loss_sum, loss_n = 0.0, 0
            if stop.received is not None:
                raise stop_here(stop.received)
            # after the last epoch too: a kill during the final evaluation then costs only that
            if state_path is not None and (step == total or time.perf_counter() - last_save >= SAVE_EVERY_S):
                save()
        train_s += time.perf_counter() - t_train
        counts = confusion_matrix(model, test_loader, device, num_classes, autocast)
    acc = float(counts.diag().sum()) / max(int(counts.sum()), 1)
    names = getattr(test_ds, "classes", None)
    if classifier_out is not None:
        save_classifier(model, cfg, classifier_out, names, source)
    if f.eval_every and curve_loader is test_loader and history:  # the curve's last point
        history[-1][f"{curve_split}_top1"] = acc
    return {"metric": "finetune_top1", "value": acc, "epochs_run": step / steps_per_epoch, "steps": step,
            "batch_size": batch, "accum_iter": accum, "lr": lr, "train_size": len(train_ds), "test_size": len(test_ds),
            "num_classes": num_classes, **per_class(counts, names), "history": history,
            "classifier": None if classifier_out is None else str(classifier_out),
            "timings": {"train_s": train_s, "total_s": time.perf_counter() - t0}}
