"""The start-up summary of a pre-training run: images found and skipped, sizes, channels, model,
steps, device and an estimated time, printed before the first step."""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mimkit.data.build import num_patches_of, val_fraction
from mimkit.data.datasets import DataSplit, ImageFolderDataset, SeededDataset
from mimkit.engine.precision import autocast_for

log = logging.getLogger("mimkit")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


@torch.no_grad()
def _seconds_per_step(objective, cfg, device: torch.device, budget_s: float = 0.25) -> float:
    """Timed forwards of a copy of the (MAE) model on random inputs, x3 for the backward pass (a
    rule of thumb), scaled to the batch, accumulation and method. The probe batch doubles from 8
    while a forward takes under ``budget_s`` (up to the real batch): a small batch's per-call
    overhead, scaled up to the real batch, would overstate the time several-fold on a CPU. The
    objective itself is not called and RNG states are restored, so the run is unaffected."""

    t = cfg.train

    def fastest(probe, b: int) -> float:  # a warm-up (allocations, kernels), then the fastest of three
        imgs = torch.randn(b, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
        noise = torch.rand(b, num_patches_of(cfg), device=device)
        times = []
        with autocast_for(t.amp, device):
            for _ in range(4):
                t0 = time.perf_counter()
                probe(imgs, noise=noise)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        return min(times[1:])  # a busy machine inflates single timings

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(objective.eval_model()).eval()
        b = min(t.batch_size, 8)
        elapsed = fastest(probe, b)
        while b < t.batch_size and elapsed < budget_s:
            b = min(2 * b, t.batch_size)
            elapsed = fastest(probe, b)
        del probe
    return 3 * elapsed * t.batch_size / b * t.accum_iter * objective.step_cost()


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
        lines.append(f"estimated time: ~{_fmt_time(sec * remaining)} ({sec:.2f} s/step, from timed "
                     "forward passes; rough, data loading not included)")
    for line in lines:
        log.info("%s", line)
    return info

