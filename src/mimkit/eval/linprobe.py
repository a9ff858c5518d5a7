"""Linear probe, MAE protocol (docs/methods/mae.md): frozen encoder, BatchNorm(affine=False) + Linear head.

Two ways to feed the head:

- ``cached_features=True`` (default for small data): features of the training subset are
  extracted once with the evaluation transform (no augmentation), and the head trains on the
  tensors — a Fashion-MNIST probe then takes seconds;
- ``cached_features=False`` (the ImageNet recipe): every step runs the frozen encoder on
  RandomResizedCrop + flip views.

Optimizers: ``lars`` (timm's ``Lars``, momentum 0.9, no weight decay, trust ratio on weight
matrices only, as MAE's LARS) for large batches, ``sgd`` (momentum 0.9) for small data.
The learning rate warms up linearly then follows a half-cycle cosine, set every iteration.
"""

from __future__ import annotations

import logging
import time

import torch
from timm.optim import Lars
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.engine.schedule import scaled_lr, warmup_cosine
from mimkit.eval.common import autocast_context, labelled_dataset, num_classes_of, pool_tokens
from mimkit.eval.knn import extract_features

log = logging.getLogger("mimkit")


class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (trunc-normal std 0.01, zero bias)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def build_optimizer(head: nn.Module, name: str, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``lars``: timm ``Lars`` with the trust ratio on ≥2-D weights only (biases plain SGD), as in
    MAE's LARS; ``sgd``: ``torch.optim.SGD`` with momentum."""
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name != "lars":
        raise ValueError(f"linear-probe optimizer must be sgd or lars, got {name!r}")
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    groups = [{"params": matrices, "always_adapt": True},
              {"params": vectors, "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum,
                weight_decay=weight_decay, trust_coeff=0.001)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; the last short batch is dropped unless it is the only one
    (BatchNorm needs more than one sample)."""
    perm = torch.randperm(n, generator=generator)
    if n <= batch_size:
        return [perm]
    return list(perm[: n - n % batch_size].split(batch_size))


def train_head_on_features(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, p,
                           seed: int = 0, device: torch.device | str = "cpu") -> tuple[LinearProbe, dict]:
    """Train a :class:`LinearProbe` on cached ``feats`` (N, D) with config ``p``
    (:class:`~mimkit.config.LinprobeConfig`); returns the head (eval mode) and training stats."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # (256 x D) @ (D x C) steps: thread hand-offs cost more than they save
        torch.set_num_threads(1)
    try:
        return _train_head(feats, labels, num_classes, p, seed, device)
    finally:
        torch.set_num_threads(threads)


def _train_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, p, seed: int,
                device: torch.device) -> tuple[LinearProbe, dict]:
    torch.manual_seed(seed)
    feats, labels = feats.to(device), labels.to(device)
    head = LinearProbe(feats.shape[1], num_classes).to(device)
    batch = min(p.batch_size * p.accum_iter, feats.shape[0])  # tensors: no need to accumulate
    lr = scaled_lr(p.lr, p.blr, batch)
    opt = build_optimizer(head, p.optimizer, lr, p.momentum, p.weight_decay)
    steps_per_epoch = max(1, feats.shape[0] // batch)
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    step, loss = 0, torch.zeros(())
    for _ in tqdm(range(p.epochs), desc="linprobe", leave=False, dynamic_ncols=True):
        for idx in _batches(feats.shape[0], batch, g):
            idx = idx.to(device)
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, warmup, lr, p.min_lr)
            loss = loss_fn(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    return head, {"lr": lr, "batch_size": batch, "steps": step, "final_loss": loss.item()}


@torch.no_grad()
def head_accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> float:
    """Top-1 of ``head`` on cached features."""
    device = next(head.parameters()).device
    correct = 0
    for i in range(0, feats.shape[0], chunk):
        pred = head(feats[i:i + chunk].to(device)).argmax(1).cpu()
        correct += int((pred == labels[i:i + chunk]).sum())
    return correct / max(feats.shape[0], 1)


def _train_head_online(encoder, cfg, train_ds, num_classes: int, device: torch.device) -> tuple[LinearProbe, dict]:
    """The ImageNet recipe: the frozen encoder runs on augmented views every step."""
    from mimkit.engine.precision import autocast_for

    p = cfg.eval.linprobe
    torch.manual_seed(cfg.train.seed)
    encoder.eval().requires_grad_(False)
    width = getattr(encoder, "embed_dim", None) or encoder.arch["embed_dim"]
    dim = width * (2 if p.feature == "both" else 1)
    head = LinearProbe(dim, num_classes).to(device)
    batch, accum = min(p.batch_size, len(train_ds)), p.accum_iter
    lr = scaled_lr(p.lr, p.blr, batch * accum)
    opt = build_optimizer(head, p.optimizer, lr, p.momentum, p.weight_decay)
    loader = DataLoader(train_ds, batch_size=batch, shuffle=True, drop_last=len(train_ds) > batch,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    steps_per_epoch = max(1, len(loader) // accum)
    total, warmup = p.epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch
    autocast = autocast_for(cfg.train.amp, device)
    loss_fn = nn.CrossEntropyLoss()
    step, micro, loss = 0, 0, torch.zeros(())
    bar = tqdm(total=total, desc="linprobe", dynamic_ncols=True, mininterval=1.0)
    head.train()
    opt.zero_grad(set_to_none=True)
    while step < total:
        for imgs, y in loader:
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, warmup, lr, p.min_lr)
            with torch.no_grad(), autocast:
                tokens = encoder.forward_features(imgs.to(device, non_blocking=True))
            loss = loss_fn(head(pool_tokens(tokens.float(), p.feature)), y.to(device))
            (loss / accum).backward()
            micro += 1
            if micro % accum:
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step >= total:
                break
    bar.close()
    head.eval()
    return head, {"lr": lr, "batch_size": batch, "accum_iter": accum, "steps": step,
                  "final_loss": loss.item()}


def run_linprobe(encoder, cfg, device: torch.device) -> dict:
    """Linear-probe top-1 on the test split of cfg's data set (``eval.linprobe`` settings).

    The head trains on the ``data.label_fraction`` class-balanced subset of the training split.
    """
    from mimkit.data import pretrain_transform, stats_for

    p = cfg.eval.linprobe
    encoder = encoder.to(device)
    t0 = time.perf_counter()
    kw = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
    test_ds = labelled_dataset(cfg, cfg.eval.split)
    if p.cached_features:
        train_ds = labelled_dataset(cfg, "train", None, cfg.data.label_fraction)
        num_classes = num_classes_of(train_ds)
        ftr, ltr = extract_features(encoder, DataLoader(train_ds, **kw), device, p.feature,
                                    "train features", normalize=False, autocast=autocast_context(cfg, device))
        fte, lte = extract_features(encoder, DataLoader(test_ds, **kw), device, p.feature,
                                    "test features", normalize=False, autocast=autocast_context(cfg, device))
        t1 = time.perf_counter()
        head, stats = train_head_on_features(ftr, ltr, num_classes, p, cfg.train.seed, device)
        t2 = time.perf_counter()
        train_acc = head_accuracy(head, ftr, ltr)
    else:
        mean, std = stats_for(cfg)
        aug = pretrain_transform(cfg.model.img_size, mean, std, cfg.model.in_chans,
                                 scale=tuple(p.crop_scale), hflip=cfg.data.hflip)
        train_ds = labelled_dataset(cfg, "train", aug, cfg.data.label_fraction)
        num_classes = num_classes_of(train_ds)
        t1 = time.perf_counter()
        head, stats = _train_head_online(encoder, cfg, train_ds, num_classes, device)
        t2 = time.perf_counter()
        fte, lte = extract_features(encoder, DataLoader(test_ds, **kw), device, p.feature,
                                    "test features", normalize=False, autocast=autocast_context(cfg, device))
        train_acc = None
    acc = head_accuracy(head, fte, lte)
    return {"metric": "linprobe_top1", "value": acc, "train_top1": train_acc,
            "feature": getattr(encoder, "feature_name", p.feature),
            "optimizer": p.optimizer, "epochs": p.epochs, "cached_features": p.cached_features,
            "train_size": len(train_ds), "test_size": len(lte), "num_classes": num_classes, **stats,
            "timings": {"features_s": t1 - t0, "train_s": t2 - t1, "total_s": time.perf_counter() - t0}}
