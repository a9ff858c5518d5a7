"""Prediction consistency: how much an MAE's prediction of a patch depends on the mask.

EMAE's self-consistency loss (docs/methods/emae.md) targets exactly this: the same masked patch predicted
from different visible sets should agree. The metric runs the model with ``num_masks``
independent random masks and, on every patch masked in at least two rounds, measures the
spread of its predictions across those rounds, in the model's target space (norm-pix or raw).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that building the CLI parser stays fast
    import torch

    from mimkit.models.mae import MaskedAutoencoderViT


def prediction_consistency(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    num_masks: int = 4,
    mask_ratio: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict:
    """Disagreement of predictions across ``num_masks`` random masks (lower = more consistent).

    Returns ``pairwise_mse``: for every pair of rounds and every patch masked in both,
    ``mean_d (pred_a − pred_b)²``, averaged over those (patch, pair) entries; ``variance``: the
    unbiased variance across the rounds that mask a patch, averaged over dimensions and over
    patches masked ≥ 2 times; ``rec_loss``: the MAE loss averaged over rounds; ``coverage``:
    fraction of patches masked in ≥ 2 rounds. Masks come from a generator seeded with
    ``seed`` (same seed, same masks), drawn per image in order, so results do not depend on
    ``batch_size``.
    """
    import torch

    with torch.no_grad():
        return _consistency(model, imgs, num_masks, mask_ratio, seed, batch_size)


def _consistency(model, imgs, num_masks, mask_ratio, seed, batch_size) -> dict:
    import torch

    from mimkit.masking import random_masking

    if num_masks < 2:
        raise ValueError(f"num_masks={num_masks}: at least two masks are needed to compare predictions")
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise_all = torch.rand(imgs.shape[0], num_masks, model.num_patches, generator=gen)
    sums = dict(pair_sq=0.0, pair_count=0.0, var=0.0, var_count=0.0, rec=0.0, covered=0.0, patches=0.0)
    for start in range(0, imgs.shape[0], batch_size):
        x = imgs[start:start + batch_size].to(device)
        target = model.target(x)
        preds, masks, rec = [], [], []
        for r in range(num_masks):
            m = random_masking(noise_all[start:start + batch_size, r].to(device), ratio)
            out = model(x, masks=m)
            preds.append(out.pred.float())
            masks.append(m.mask)
            rec.append(((out.pred - target) ** 2).mean(-1).mul(m.mask).sum() / m.mask.sum())
        pred = torch.stack(preds)  # (R, B, L, P)
        mask = torch.stack(masks)  # (R, B, L)
        for a in range(num_masks):
            for b in range(a + 1, num_masks):
                both = mask[a] * mask[b]
                sums["pair_sq"] += float((((pred[a] - pred[b]) ** 2).mean(-1) * both).sum())
                sums["pair_count"] += float(both.sum())
        count = mask.sum(0)  # rounds masking each patch
        mean = (pred * mask[..., None]).sum(0) / count.clamp(min=1)[..., None]
        sq = (((pred - mean) ** 2) * mask[..., None]).sum(0).mean(-1)  # (B, L)
        multi = count >= 2
        sums["var"] += float((sq / (count - 1).clamp(min=1))[multi].sum())
        sums["var_count"] += float(multi.sum())
        sums["rec"] += float(torch.stack(rec).mean()) * x.shape[0]
        sums["covered"] += float(multi.sum())
        sums["patches"] += float(count.numel())
    return {
        "pairwise_mse": sums["pair_sq"] / max(sums["pair_count"], 1.0),
        "variance": sums["var"] / max(sums["var_count"], 1.0),
        "rec_loss": sums["rec"] / imgs.shape[0],
        "coverage": sums["covered"] / sums["patches"],
        "num_images": int(imgs.shape[0]),
        "num_masks": num_masks,
        "mask_ratio": ratio,
        "seed": seed,
        "target": "norm_pix" if model.norm_pix_loss else "pixels",
    }


def add_consistency_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mimkit eval consistency`` (kept here so cli.py only wires the subcommand)."""
    p.add_argument("--checkpoint", required=True, help="mimkit or official MAE checkpoint (full, with decoder)")
    p.add_argument("--config", default=None,
                   help="preset or YAML for the data (default: the checkpoint's saved config, else fmnist_tiny)")
    p.add_argument("--weights", default="auto", choices=("auto", "student", "teacher"))
    p.add_argument("--num-images", type=int, default=1000, help="test images used (seeded subset)")
    p.add_argument("--num-masks", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.root=...)")


def run_consistency_cli(args: argparse.Namespace) -> dict:
    """``mimkit eval consistency``: load the checkpoint and its data, print the metrics as JSON."""
    import torch

    import mimkit
    from mimkit.config import config_from_dict, load_config
    from mimkit.engine.checkpoint import load_file
    from mimkit.eval.knn import eval_dataset

    model = mimkit.load_model(args.checkpoint, weights=args.weights)
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
    else:
        saved = load_file(args.checkpoint).get("config")
        cfg = config_from_dict(saved, args.overrides) if saved else load_config("fmnist_tiny", args.overrides)
    ds = eval_dataset(cfg, "test", max_samples=args.num_images, seed=args.seed)
    imgs = torch.stack([ds[i][0] for i in range(len(ds))])
    if torch.cuda.is_available():
        model = model.cuda()
    result = prediction_consistency(model, imgs, num_masks=args.num_masks, mask_ratio=args.mask_ratio,
                                    seed=args.seed, batch_size=cfg.eval.batch_size)
    result.update(checkpoint=str(args.checkpoint), weights=args.weights, data=cfg.data.name)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result
