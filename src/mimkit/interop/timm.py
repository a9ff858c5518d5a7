"""MAE encoder <-> ``timm.models.VisionTransformer``.

The MAE encoder already uses timm's names (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.*``, ``norm``), so its state dict loads into a timm ViT with ``class_token=True`` and
``global_pool='token'`` under ``strict=True``. For fine-tuning (docs/methods/mae.md) the ViT uses
``global_pool='avg'`` with ``fc_norm``: timm then has no per-token ``norm``, so the pre-trained
``norm`` is dropped and ``fc_norm`` starts fresh, as the official MAE fine-tuning code does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.models import VisionTransformer
from torch import nn

from mimkit.models.vit import resize_pos_embed

# (embed_dim, depth, num_heads) -> timm's size name
_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
          (1024, 24, 16): "large", (1280, 32, 16): "huge"}
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder entries of an MAE state dict (official names), detached, contiguous, on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()
            if k.startswith(_ENCODER_PREFIXES)}


def _square(img_size) -> int | tuple[int, int]:
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    return int(h) if h == w else (int(h), int(w))


def timm_kwargs(arch: dict, **overrides) -> dict:
    """``VisionTransformer`` keyword arguments for an MAE ``arch`` dict (encoder part).

    Defaults give a feature extractor (``num_classes=0``, ``global_pool='token'``) whose
    ``forward_features`` equals the MAE encoder on unmasked input; ``overrides`` win.
    """
    kwargs = dict(
        img_size=_square(arch["img_size"]), patch_size=int(arch["patch_size"]),
        in_chans=int(arch["in_chans"]), embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
        num_heads=int(arch["num_heads"]), mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
        qkv_bias=True, class_token=True, num_classes=0, global_pool="token",
    )
    kwargs.update(overrides)
    return kwargs


def timm_model_name(arch: dict) -> str | None:
    """timm's registered name for exactly this architecture (e.g. ``vit_base_patch16_224``)."""
    import timm

    size = _SIZES.get((int(arch["embed_dim"]), int(arch["depth"]), int(arch["num_heads"])))
    img = _square(arch["img_size"])
    if size is None or not isinstance(img, int) or arch["in_chans"] != 3 or arch.get("mlp_ratio", 4.0) != 4.0:
        return None
    name = f"vit_{size}_patch{arch['patch_size']}_{img}"
    return name if timm.is_model(name) else None


def create_model_call(arch: dict, num_classes: int = 0, global_pool: str = "token") -> str:
    """The ``timm.create_model(...)`` call whose model loads an exported encoder strictly."""
    name = timm_model_name(arch)
    extra = f"num_classes={num_classes}, global_pool='{global_pool}'"
    if name is not None:
        return f"timm.create_model('{name}', {extra})"
    kw = timm_kwargs(arch)
    args = ", ".join(f"{k}={kw[k]!r}" for k in ("img_size", "patch_size", "in_chans", "embed_dim",
                                               "depth", "num_heads", "mlp_ratio"))
    # Any registered ViT works as the base: keyword arguments override its architecture.
    return f"timm.create_model('vit_base_patch16_224', {args}, {extra})"


def to_timm_vit(state: dict[str, torch.Tensor], arch: dict, **overrides) -> VisionTransformer:
    """A timm ``VisionTransformer`` holding an MAE encoder's weights.

    ``overrides`` are ``VisionTransformer`` arguments (``num_classes``, ``global_pool``,
    ``fc_norm``, ``drop_path_rate``, ``img_size``, ...). A new ``img_size`` resizes the position
    table (bicubic). A head (``num_classes > 0``) is initialised trunc-normal(std 2e-5) with zero
    bias (MAE fine-tuning); with ``global_pool='avg'`` ``fc_norm`` starts at (1, 0). Every
    encoder weight must fit, otherwise a ``ValueError`` names the keys.
    """
    vit = VisionTransformer(**timm_kwargs(arch, **overrides))
    state = encoder_state_dict(state)
    if isinstance(vit.norm, nn.Identity):  # fc_norm replaces the per-token norm (official MAE)
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        old = math.isqrt(state["pos_embed"].shape[1] - 1)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (old, old), vit.patch_embed.grid_size)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the timm ViT: missing {missing}, unexpected {unexpected}")
    if isinstance(vit.head, nn.Linear):
        nn.init.trunc_normal_(vit.head.weight, std=2e-5)
        nn.init.zeros_(vit.head.bias)
    return vit


def eval_crop(img_size: int) -> tuple[float, str]:
    """timm's ``(crop_pct, crop_mode)`` for mimkit's evaluation transform at ``img_size``
    (:func:`mimkit.data.transforms.eval_transform`): small images are resized (squashed) to the
    square, larger ones resized to ``img_size / 0.875`` and center-cropped, as in MAE."""
    return (1.0, "squash") if img_size <= 64 else (0.875, "center")


def timm_config(arch: dict, mean: Sequence[float], std: Sequence[float], num_classes: int = 0,
                global_pool: str = "token", label_names: Sequence[str] | None = None) -> dict:
    """The ``config.json`` of a timm hub folder: an MAE encoder (no classifier) by default, or a
    fine-tuned classifier with ``num_classes``, its ``global_pool`` and ``label_names``.

    ``pretrained_cfg`` carries the model's own input size, channel count, normalization and
    crop, so ``timm.data.resolve_data_config(model=m)`` returns them, and no registry source
    (``hf_hub_id``, ``url``) of the base architecture name.
    """
    kwargs = timm_kwargs(arch, num_classes=num_classes, global_pool=global_pool)
    size = kwargs["img_size"]
    h, w = (size, size) if isinstance(size, int) else size
    crop_pct, crop_mode = eval_crop(min(h, w))
    pretrained_cfg = {
        "input_size": [kwargs["in_chans"], h, w], "fixed_input_size": True,
        "interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": crop_mode,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
    }
    if label_names is not None:
        pretrained_cfg["label_names"] = [str(n) for n in label_names]
    return {
        "architecture": timm_model_name(arch) or "vit_base_patch16_224",  # model_args set the rest
        "num_classes": num_classes,
        "num_features": kwargs["embed_dim"],
        "global_pool": kwargs["global_pool"],
        "model_args": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "pretrained_cfg": pretrained_cfg,
    }


def vit_arch(vit: VisionTransformer) -> dict:
    """The MAE ``arch`` dict (encoder part) of a timm ``VisionTransformer``: the inverse of
    :func:`timm_kwargs` for the architectures mimkit builds."""
    block = vit.blocks[0]
    return {"img_size": _square(vit.patch_embed.img_size), "patch_size": int(vit.patch_embed.patch_size[0]),
            "in_chans": int(vit.patch_embed.proj.in_channels), "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks), "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim}


def save_timm_folder(state: dict[str, torch.Tensor], arch: dict, out: str | Path,
                     mean: Sequence[float], std: Sequence[float],
                     metadata: dict[str, str] | None = None, num_classes: int = 0,
                     global_pool: str = "token", label_names: Sequence[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` to ``out``, each file atomically:
    ``timm.create_model('local-dir:OUT', pretrained=True)`` loads it (and ``hf-hub:REPO`` once
    the folder is uploaded). ``state`` has timm's names: an MAE encoder's entries
    (:func:`encoder_state_dict`) or a fine-tuned classifier's whole state dict, with its
    ``num_classes``, ``global_pool`` and ``label_names`` (:func:`timm_config`)."""
    from mimkit.engine.checkpoint import atomic_save_safetensors, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_save_safetensors(tensors, out / "model.safetensors", metadata=metadata)
    config = timm_config(arch, mean, std, num_classes, global_pool, label_names)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out
