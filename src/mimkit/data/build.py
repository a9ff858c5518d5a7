"""From a config to data: splits, statistics, a batch that fits, and the start-up summary.

* :func:`dataset_from_config` — one split (``train`` | ``val`` | ``test``) of ``cfg.data``.
* :func:`pretrain_dataset` — the seeded pre-training set; it also resolves ``data.stats=compute``
  and fits the batch to the data (both written into ``cfg``, so the saved config, resume and
  evaluation use the same values).
* :func:`log_run_summary` — what the run is about to do, printed before the first step.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter

import numpy as np
import torch

from mimkit.errors import DataError

from .datasets import DataSplit, ImageFolderDataset, SeededDataset, build_dataset, split_folder

log = logging.getLogger("mimkit")

STATS_SAMPLES = 1000  # images in the seeded sample behind data.stats=compute


class WithNoise:
    """Transform wrapper that also draws the masking noise, inside the per-sample seeded scope,
    so masks depend only on (seed, epoch, sample index) like the augmentation does."""

    def __init__(self, transform, num_patches: int) -> None:
        self.transform, self.num_patches = transform, num_patches

    def __call__(self, img):
        return self.transform(img), torch.rand(self.num_patches)


def has_test_split(name: str, root: str | None) -> bool:
    """Whether the data set brings its own test split (folders and shards need a ``test/``)."""
    from pathlib import Path

    key = name.strip().lower().replace("-", "_")
    if key == "folder":
        return root is not None and Path(root).expanduser().is_dir() and \
            split_folder(Path(root).expanduser().absolute(), "test") is not None
    if key == "shards":
        from .shards import has_split

        return root is not None and has_split(root, "test")
    return True


def val_fraction(cfg) -> float:
    """``data.val_fraction``; when unset (None): 0 if the data set has its own test split, else 0.1."""
    if cfg.data.val_fraction is not None:
        return float(cfg.data.val_fraction)
    return 0.0 if has_test_split(cfg.data.name, cfg.data.root) else 0.1


def dataset_from_config(cfg, split: str, transform=None) -> DataSplit:
    """``split`` ("train" | "val" | "test") of ``cfg.data`` with ``transform``.

    ``train`` excludes the validation images (``data.val_fraction``, ``data.split_seed``), so
    pre-training and evaluation training never see them.
    """
    d = cfg.data
    return build_dataset(d.name, d.root, split, transform, on_corrupt=d.on_corrupt, val_fraction=val_fraction(cfg),
                         split_seed=d.split_seed, synthetic_size=d.synthetic_size, img_size=cfg.model.img_size,
                         in_chans=cfg.model.in_chans, seed=cfg.train.seed)


def num_patches_of(cfg) -> int:
    from mimkit.models.mae import ARCHS

    patch = cfg.model.patch_size or ARCHS[cfg.model.arch]["patch_size"]
    return (cfg.model.img_size // patch) ** 2


def compute_stats(cfg, samples: int = STATS_SAMPLES) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of the training split, at the model's size.

    The sample is ``randperm(n)[:samples]`` seeded with ``data.split_seed``; images are resized
    to ``model.img_size`` squared (bicubic) before pixels are pooled.
    """
    from torchvision import transforms as T

    from .transforms import BICUBIC, ConvertChannels

    size = cfg.model.img_size
    tf = T.Compose([ConvertChannels(cfg.model.in_chans), T.Resize((size, size), interpolation=BICUBIC),
                    T.ToTensor()])
    ds = dataset_from_config(cfg, "train", tf)
    g = torch.Generator().manual_seed(cfg.data.split_seed)
    picked = torch.randperm(len(ds), generator=g)[:samples].tolist()
    total = torch.zeros(cfg.model.in_chans, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in picked:
        x = ds[i][0].double().flatten(1)
        total += x.mean(1)
        total_sq += (x * x).mean(1)
    mean = total / len(picked)
    std = (total_sq / len(picked) - mean * mean).clamp_min(1e-12).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(max(v, 1e-3), 4) for v in std.tolist()]


def fit_batch(cfg, n: int, world_size: int = 1) -> None:
    """Shrink ``train.accum_iter``, then ``train.batch_size``, so an epoch of ``n`` images has at
    least ``data.min_steps_per_epoch`` optimizer steps.

    Accumulation first (the per-device batch, hence memory and speed, stays), to the largest
    value that fits; then the batch, to the largest that fits (at least 1). The learning rate
    follows through ``train.blr`` x effective batch / 256. Runs that already fit are unchanged.
    """
    t, m = cfg.train, cfg.data.min_steps_per_epoch
    if m < 1 or n // (t.batch_size * world_size * t.accum_iter) >= m:
        return
    before = (t.batch_size, t.accum_iter)
    while t.accum_iter > 1 and n // (t.batch_size * world_size * t.accum_iter) < m:
        t.accum_iter -= 1
    if n // (t.batch_size * world_size) < m:
        t.batch_size = max(1, n // (world_size * m))
    if n // (t.batch_size * world_size * t.accum_iter) < 1:
        raise DataError(f"the training split has {n} images, fewer than the {world_size} processes; "
                        "add images or run fewer processes")
    log.warning("%d training images: batch %d x accum %d -> batch %d x accum %d per process, so an epoch has "
                "%d optimizer steps (data.min_steps_per_epoch=%d)", n, *before, t.batch_size, t.accum_iter,
                n // (t.batch_size * world_size * t.accum_iter), m)


def pretrain_dataset(cfg, world_size: int = 1, num_patches: int | None = None) -> SeededDataset:
    """The seeded pre-training set (``(image, noise), label`` per sample) of ``cfg``'s train split.

    Fills ``data.mean``/``data.std`` for ``data.stats=compute`` and fits the batch
    (:func:`fit_batch`), both in ``cfg``: call it before the config is saved.
    """
    from . import stats_for
    from .transforms import pretrain_transform

    d = cfg.data
    if val_fraction(cfg) == 0 and not has_test_split(d.name, d.root):
        # Fail now rather than after training: reconstruction grids and evaluation need held-out images.
        raise DataError(f"data.root: {d.root} has no test split and data.val_fraction is 0, so no image is held "
                        "out for reconstructions and evaluation; set data.val_fraction=0.1 or add a test/ folder")
    if d.stats == "compute" and (d.mean is None or d.std is None):
        t0 = time.perf_counter()
        d.mean, d.std = compute_stats(cfg)
        log.info("data.stats=compute: mean %s, std %s (seeded sample of up to %d training images, %.1f s; "
                 "saved in the run's config)", d.mean, d.std, STATS_SAMPLES, time.perf_counter() - t0)
    mean, std = stats_for(cfg)
    transform = pretrain_transform(cfg.model.img_size, mean, std, cfg.model.in_chans,
                                   scale=tuple(d.crop_scale), hflip=d.hflip)
    base = dataset_from_config(cfg, "train", WithNoise(transform, num_patches or num_patches_of(cfg)))
    fit_batch(cfg, len(base), world_size)
    return SeededDataset(base, cfg.train.seed)


# --------------------------------------------------------------------------------------------
# Start-up summary
# --------------------------------------------------------------------------------------------


def _survey(ds: DataSplit, k: int = 200) -> dict:
    """Sizes and modes of a seeded sample of a folder's images (headers only, no decoding)."""
    from PIL import Image

    base = ds.base
    if not isinstance(base, ImageFolderDataset):
        return {}
    picked = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:k].tolist()
    sizes, modes, bad = [], Counter(), 0
    for i in picked:
        try:
            with Image.open(base.samples[ds.indices[i]][0]) as im:
                sizes.append(im.size)
                modes[im.mode] += 1
        except Exception:  # unreadable header: counted, reported, handled by data.on_corrupt
            bad += 1
    return {"sizes": sizes, "modes": modes, "bad": bad, "checked": len(picked)}


def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _method_factor(cfg) -> float:
    """Rough cost of a method's step relative to MAE's: EMAE encodes K parts, RC-MAE adds a
    teacher forward (about a third of a forward + backward)."""
    from mimkit.config import method_parts

    parts = method_parts(cfg.method)
    factor = float(cfg.emae.num_parts or round(1 / (1 - cfg.mask_ratio))) if "emae" in parts else 1.0
    return factor + (1 / 3 if "rcmae" in parts else 0.0)


@torch.no_grad()
def _seconds_per_step(objective, cfg, device: torch.device) -> float:
    """One timed forward of a copy of the (MAE) model on random inputs, x3 for the backward pass
    (a rule of thumb), scaled to the batch, accumulation and method. The objective itself is
    not called and RNG states are restored, so the run is unaffected."""
    from mimkit.engine.trainer import autocast_for

    t, b = cfg.train, min(cfg.train.batch_size, 8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(objective.eval_model()).eval()
        imgs = torch.randn(b, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
        noise = torch.rand(b, num_patches_of(cfg), device=device)
        with autocast_for(t.amp, device):
            probe(imgs, noise=noise)  # warm-up (allocations, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            probe(imgs, noise=noise)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        del probe
    return 3 * elapsed * t.batch_size / b * t.accum_iter * _method_factor(cfg)


def log_run_summary(cfg, dataset, objective, device: torch.device, world_size: int, steps_per_epoch: int,
                    total_steps: int, start_step: int = 0, estimate: bool = True) -> dict:
    """Log what the run is about to do: images found and skipped, sizes, channels, model, steps,
    device and an estimated time. Returns the numbers (for tests and callers)."""
    ds = dataset.dataset if isinstance(dataset, SeededDataset) else dataset
    d, m, t = cfg.data, cfg.model, cfg.train
    info: dict = {"images": len(ds), "split": "train", "classes": getattr(ds, "num_classes", 0)}
    lines = []
    source = d.root or d.name
    held = val_fraction(cfg)
    lines.append(f"data: {d.name} {source}: {len(ds)} training images"
                 + (f" ({held:.0%} held out as val, data.split_seed={d.split_seed})" if held else "")
                 + (f", {info['classes']} classes" if info["classes"] else ", unlabeled"))
    skipped = list(getattr(ds, "skipped_files", []) or [])
    info["skipped_files"] = len(skipped)
    survey = _survey(ds) if isinstance(ds, DataSplit) else {}
    if skipped:
        exts = Counter(p.suffix.lower() or p.name for p in skipped)
        lines.append(f"skipped: {len(skipped)} files that are not images ("
                     + ", ".join(f"{k} x{v}" for k, v in exts.most_common(5)) + ")")
    if survey:
        ws, hs = zip(*survey["sizes"], strict=True) if survey["sizes"] else ((0,), (0,))
        info.update(unreadable_in_sample=survey["bad"], modes=dict(survey["modes"]))
        lines.append(f"images (sample of {survey['checked']}): {min(ws)}-{max(ws)} x {min(hs)}-{max(hs)} px, "
                     f"median {int(np.median(ws))}x{int(np.median(hs))}; modes "
                     + ", ".join(f"{k} {v}" for k, v in survey["modes"].most_common())
                     + (f"; {survey['bad']} unreadable (data.on_corrupt={d.on_corrupt})" if survey["bad"] else ""))
    mean, std = (d.mean, d.std) if d.mean is not None else ("usual", "")
    lines.append(f"input: {m.img_size}x{m.img_size} px, {m.in_chans} channel{'s' if m.in_chans > 1 else ''} "
                 f"({'RGB' if m.in_chans == 3 else 'gray'}), normalised with data.stats={d.stats}"
                 + (f" mean {mean} std {std}" if d.mean is not None else ""))
    params = sum(p.numel() for p in objective.parameters())
    lines.append(f"model: {cfg.method} {m.arch} patch {m.patch_size or '(arch)'}, {params / 1e6:.1f} M parameters")
    remaining = max(total_steps - start_step, 0)
    lines.append(f"steps: {remaining} of {total_steps} ({steps_per_epoch} per epoch = {len(ds)} // "
                 f"(batch {t.batch_size} x {world_size} processes x accum {t.accum_iter})), device {device}")
    info.update(total_steps=total_steps, steps_per_epoch=steps_per_epoch, device=str(device), params=params)
    if estimate and remaining:
        sec = _seconds_per_step(objective, cfg, device)
        info["estimated_s"] = sec * remaining
        lines.append(f"estimated time: ~{_fmt_time(sec * remaining)} ({sec:.2f} s/step, from one timed "
                     "forward pass; rough, data loading not included)")
    for line in lines:
        log.info("%s", line)
    return info

