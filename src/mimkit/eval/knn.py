"""Weighted cosine k-NN on frozen features (k=20, T=0.07 by default; METHODS §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm


@torch.no_grad()
def extract_features(encoder, loader: DataLoader, device: torch.device, feature: str = "cls",
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ2-normalised features and labels. ``feature``: cls | mean (of patch tokens) | both."""
    feats, labels = [], []
    encoder.eval()
    for imgs, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        tokens = encoder.forward_features(imgs.to(device, non_blocking=True)).float()
        parts = {"cls": [tokens[:, 0]], "mean": [tokens[:, 1:].mean(1)],
                 "both": [tokens[:, 0], tokens[:, 1:].mean(1)]}[feature]
        f = torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)
        feats.append(F.normalize(f, dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    """Predicted labels: votes ``exp(sim/T)`` of the k most similar bank entries, in chunks."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    preds = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, **kwargs) -> float:
    pred = knn_classify(train_feats, train_labels, test_feats, **kwargs)
    return (pred == test_labels).float().mean().item()


def eval_dataset(cfg, split: str, max_samples: int = 0, seed: int = 0):
    """The labelled split with the deterministic evaluation transform (optionally subsampled)."""
    from torch.utils.data import Subset

    from mimkit.data import build_dataset, eval_transform, stats_for

    mean, std = stats_for(cfg)
    tf = eval_transform(cfg.model.img_size, mean, std, cfg.model.in_chans)
    ds = build_dataset(cfg.data.name, cfg.data.root, split, tf, on_corrupt=cfg.data.on_corrupt,
                       synthetic_size=cfg.data.synthetic_size, img_size=cfg.model.img_size,
                       in_chans=cfg.model.in_chans, seed=cfg.train.seed)
    if max_samples and max_samples < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:max_samples].tolist())
    return ds


def run_knn(encoder, cfg, device: torch.device, desc: str = "") -> dict:
    """k-NN accuracy of ``encoder`` on cfg's data set: train split as bank, test split as queries."""
    e = cfg.eval
    kw = dict(batch_size=e.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
    bank = DataLoader(eval_dataset(cfg, "train", e.max_train_samples, cfg.train.seed), **kw)
    queries = DataLoader(eval_dataset(cfg, "test"), **kw)
    encoder = encoder.to(device)
    fb, lb = extract_features(encoder, bank, device, e.feature, f"{desc} bank".strip())
    fq, lq = extract_features(encoder, queries, device, e.feature, f"{desc} test".strip())
    acc = knn_accuracy(fb, lb, fq, lq, k=e.knn_k, temperature=e.knn_temperature)
    return {"metric": "knn_top1", "value": acc, "k": e.knn_k, "temperature": e.knn_temperature,
            "feature": e.feature, "bank_size": len(lb), "test_size": len(lq)}
