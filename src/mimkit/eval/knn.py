"""Weighted cosine k-NN on frozen features (k=20, T=0.07 by default; docs/methods/mae.md).

``encoder`` is anything with ``forward_features(imgs) -> (B, 1+L, D)`` tokens after the final
norm: a :class:`~mimkit.models.mae.MaskedAutoencoderViT`, or a timm ``VisionTransformer`` with
``global_pool='token'`` (which gives the same tokens).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimkit.eval.common import (
    InputPixels,
    autocast_context,
    knn_features,
    labelled_dataset,
    pool_tokens,
    token_parts,
)


@torch.no_grad()
def extract_features(encoder, loader: DataLoader, device: torch.device, feature: str = "cls",
                     desc: str = "features", normalize: bool = True,
                     autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, on the CPU) and labels of every sample in ``loader``.

    ``feature``: cls | mean | both. With ``normalize`` (k-NN) each part is ℓ2-normalised before
    concatenation and the result again; without (linear probe) the raw pooled tokens are
    returned. ``autocast``: an optional autocast context (bf16 on GPU).
    """
    from contextlib import nullcontext

    feats, labels = [], []
    was_training = encoder.training
    encoder.eval()
    for imgs, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with autocast or nullcontext():
            tokens = encoder.forward_features(imgs.to(device, non_blocking=True))
        tokens = tokens.float()
        f = knn_features(token_parts(tokens, feature)) if normalize else pool_tokens(tokens, feature)
        feats.append(f.cpu().clone())  # a copy: a view would keep every batch's tokens alive
        labels.append(torch.as_tensor(y))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    """Predicted labels: votes ``exp(sim/T)`` of the k most similar bank entries.

    Features must be ℓ2-normalised (cosine similarity = dot product); the weights are computed
    relative to each query's nearest similarity, so a small T cannot overflow. Queries are processed in
    chunks of ``chunk`` so memory is ``chunk × bank`` whatever the number of queries.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    train_feats = train_feats.to(test_feats.device)
    train_labels = train_labels.to(test_feats.device)
    preds = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T
        top_sim, top_idx = sim.topk(k, dim=1)
        preds.append(_vote(top_sim, train_labels[top_idx], temperature, num_classes))
    return torch.cat(preds)


def _vote(top_sim: torch.Tensor, top_labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """The class with the most ``exp(sim / T)`` votes among each row's (sorted) neighbours.

    The weights are ``exp((sim - nearest sim) / T)``: the same shares as ``exp(sim / T)``, which
    overflows float32 (to inf, and every class ties) once 1 / T passes ~88, e.g. T = 0.01."""
    weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
    votes = torch.zeros(top_sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, top_labels, weights).argmax(1)


@torch.no_grad()
def knn_grid(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, ks: list[int], temperatures: list[float],
             num_classes: int | None = None, chunk: int = 1024) -> list[dict]:
    """Top-1 of :func:`knn_classify` for every ``(k, T)`` in ``ks × temperatures``, from one
    similarity search (the ``max(ks)`` nearest neighbours of each query): the settings are chosen
    on a validation split for the price of one k-NN. Records ``{"k", "temperature", "top1",
    "kth_similarity"}``, the last the mean cosine similarity of each query's k-th neighbour (with
    the first's, ``first_similarity``: how crowded the neighbours are, which sets the useful T)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    kmax = min(max(ks), train_feats.shape[0])
    train_feats = train_feats.to(test_feats.device)
    train_labels = train_labels.to(test_feats.device)
    correct = torch.zeros(len(ks), len(temperatures), dtype=torch.long)
    sim_sum = torch.zeros(kmax, dtype=torch.float64)
    for i in range(0, test_feats.shape[0], chunk):
        top_sim, top_idx = (test_feats[i:i + chunk] @ train_feats.T).topk(kmax, dim=1)  # sorted
        top_labels, truth = train_labels[top_idx], test_labels[i:i + chunk].to(top_sim.device)
        sim_sum += top_sim.sum(0).double().cpu()
        for a, k in enumerate(ks):
            for b, t in enumerate(temperatures):
                correct[a, b] += (_vote(top_sim[:, :k], top_labels[:, :k], t, num_classes) == truth).sum().cpu()
    n = test_feats.shape[0]
    sim = sim_sum / n
    return [{"k": k, "temperature": t, "top1": correct[a, b].item() / n, "kth_similarity": sim[min(k, kmax) - 1].item(),
             "first_similarity": sim[0].item()} for a, k in enumerate(ks) for b, t in enumerate(temperatures)]


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, **kwargs) -> float:
    """Top-1 accuracy of :func:`knn_classify` (keyword arguments are passed on)."""
    pred = knn_classify(train_feats, train_labels, test_feats, **kwargs)
    return (pred.cpu() == test_labels.cpu()).float().mean().item()


def eval_dataset(cfg, split: str, max_samples: int = 0, seed: int = 0, label_fraction: float = 1.0,
                 require_labels: bool = False):
    """``split`` with the deterministic evaluation transform (optionally subsampled); unlabeled
    data is allowed (reconstruction grids) unless ``require_labels``."""
    return labelled_dataset(cfg, split, None, label_fraction, max_samples, seed, require_labels)


def knn_loaders(cfg, max_test_samples: int = 0) -> tuple[DataLoader, DataLoader]:
    """The bank (the training split's ``data.label_fraction`` subset, capped by
    ``eval.max_train_samples``) and the queries (``eval.split``) of :func:`run_knn`."""
    e = cfg.eval
    kw = dict(batch_size=e.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
    bank = DataLoader(eval_dataset(cfg, "train", e.max_train_samples, cfg.train.seed,
                                   cfg.data.label_fraction, require_labels=True), **kw)
    queries = DataLoader(eval_dataset(cfg, cfg.eval.split, max_test_samples, cfg.train.seed,
                                      require_labels=True), **kw)
    return bank, queries


def run_knn(encoder, cfg, device: torch.device, desc: str = "", max_test_samples: int = 0,
            grid: tuple[list[int], list[float]] | None = None) -> dict:
    """k-NN accuracy of ``encoder`` on cfg's data set: the training split (``data.label_fraction``
    class-balanced subset, capped by ``eval.max_train_samples``) is the bank, ``eval.split``
    (test by default, or val) the queries. ``grid`` (ks, temperatures) adds the top-1 of every
    setting (:func:`knn_grid`) under ``"grid"``; choosing among them is for a validation split."""
    e = cfg.eval
    bank, queries = knn_loaders(cfg, max_test_samples)
    encoder = encoder.to(device)
    amp = autocast_context(cfg, device)
    fb, lb = extract_features(encoder, bank, device, e.feature, f"{desc} bank".strip(), autocast=amp)
    fq, lq = extract_features(encoder, queries, device, e.feature, f"{desc} {cfg.eval.split}".strip(), autocast=amp)
    num_classes = int(max(lb.max(), lq.max())) + 1
    result = {"metric": "knn_top1", "k": e.knn_k, "temperature": e.knn_temperature,
              "feature": getattr(encoder, "feature_name", e.feature), "bank_size": len(lb), "test_size": len(lq)}
    if grid is None:
        result["value"] = knn_accuracy(fb.to(device), lb, fq.to(device), lq, k=e.knn_k,
                                       temperature=e.knn_temperature, num_classes=num_classes)
        return result
    # one neighbour search for the grid and the configured setting, which may lie outside it
    ks, temps = grid
    cells = knn_grid(fb.to(device), lb, fq.to(device), lq, sorted({*ks, e.knn_k}),
                     sorted({*temps, e.knn_temperature}), num_classes=num_classes)
    result["value"] = next(c["top1"] for c in cells if c["k"] == e.knn_k and c["temperature"] == e.knn_temperature)
    result["grid"] = [c for c in cells if c["k"] in ks and c["temperature"] in temps]
    return result


def run_pixel_knn(cfg, max_test_samples: int = 0) -> dict:
    """:func:`run_knn`'s protocol on the input pixels themselves (:class:`InputPixels`: each image
    as the evaluation transform gives it, flattened): the yardstick an encoder's k-NN is read against."""
    return run_knn(InputPixels(), cfg, torch.device("cpu"), "pixels", max_test_samples)


def knn_monitor(objective_or_model, cfg, device: torch.device) -> float:
    """Online k-NN top-1 for the pre-training loop (``train.knn_every``).

    Takes the objective (its ``eval_model()`` is used, e.g. RC-MAE's teacher) or a model, caps
    bank and queries at ``eval.monitor_samples`` (seeded subsets) so it stays cheap, restores the
    module's train/eval mode, and returns the accuracy in [0, 1].
    """
    model = objective_or_model.eval_model() if hasattr(objective_or_model, "eval_model") else objective_or_model
    was_training = model.training
    cap = cfg.eval.monitor_samples
    cap_cfg = cfg
    if cap and (not cfg.eval.max_train_samples or cfg.eval.max_train_samples > cap):
        import copy

        cap_cfg = copy.deepcopy(cfg)
        cap_cfg.eval.max_train_samples = cap
    try:
        return run_knn(model, cap_cfg, device, "knn monitor", max_test_samples=cap)["value"]
    finally:
        model.train(was_training)
