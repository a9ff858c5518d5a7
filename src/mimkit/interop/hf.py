"""Hugging Face ``transformers.ViTMAEForPreTraining`` <-> mimkit (official MAE names).

transformers renamed ViTMAE's modules in 5.x (``vit.layers.N.attention.q_proj``); older releases
use ``vit.encoder.layer.N.attention.attention.query``. Both layouts are mapped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mimkit.models.mae import MaskedAutoencoderViT

# per-block names: mimkit suffix -> (HF 5.x suffix, HF 4.x suffix)
_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}
_QKV = (("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_GLOBAL = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def _layouts(new: bool) -> tuple[str, str, int]:
    return ("vit.layers", "decoder.decoder_layers", 0) if new else (
        "vit.encoder.layer", "decoder.decoder_layers", 1)


def to_hf_state_dict(state: dict[str, torch.Tensor], new_layout: bool = True) -> dict[str, torch.Tensor]:
    """Rename an official-MAE state dict to ViTMAEForPreTraining's names (q/k/v split)."""
    enc, dec, col = _layouts(new_layout)
    out = {}
    for key, value in state.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        prefix, idx, rest = key.split(".", 2)
        base = {"blocks": enc, "decoder_blocks": dec}[prefix] + f".{idx}."
        module, kind = rest.rsplit(".", 1)
        if module == "attn.qkv":
            for name, chunk in zip(_QKV[col], value.chunk(3, dim=0), strict=True):
                out[base + f"{name}.{kind}"] = chunk
        else:
            out[base + f"{_BLOCK[module][col]}.{kind}"] = value
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict` (detects the layout from the keys)."""
    new_layout = any(k.startswith("vit.layers.") for k in state)
    enc, dec, col = _layouts(new_layout)
    inv_global = {v: k for k, v in _GLOBAL.items()}
    inv_block = {v[col]: k for k, v in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for key, value in state.items():
        if key in inv_global:
            out[inv_global[key]] = value
            continue
        for prefix, ours in ((enc + ".", "blocks"), (dec + ".", "decoder_blocks")):
            if key.startswith(prefix):
                idx, rest = key[len(prefix):].split(".", 1)
                module, kind = rest.rsplit(".", 1)
                if module in _QKV[col]:
                    slot = qkv.setdefault(f"{ours}.{idx}.attn.qkv.{kind}", [None] * 3)
                    slot[_QKV[col].index(module)] = value
                elif module in inv_block:
                    out[f"{ours}.{idx}.{inv_block[module]}.{kind}"] = value
                break
    out.update({k: torch.cat(v, dim=0) for k, v in qkv.items()})
    return out


def hf_config_kwargs(model: MaskedAutoencoderViT) -> dict:
    """``ViTMAEConfig`` keyword arguments for the same architecture (eps 1e-6, as MAE)."""
    a = model.arch
    if a.get("decoder_kind", "self") != "self":
        raise ValueError(f"Hugging Face ViTMAE has no {a['decoder_kind']}-attention decoder; export the "
                         "encoder only (timm) for a model pre-trained with decoder.kind=cross")
    if a["img_size"][0] != a["img_size"][1]:
        raise ValueError("Hugging Face ViTMAE supports square images only")
    return dict(
        image_size=a["img_size"][0], patch_size=a["patch_size"], num_channels=a["in_chans"],
        hidden_size=a["embed_dim"], num_hidden_layers=a["depth"], num_attention_heads=a["num_heads"],
        intermediate_size=int(a["embed_dim"] * a["mlp_ratio"]),
        decoder_hidden_size=a["decoder_embed_dim"], decoder_num_hidden_layers=a["decoder_depth"],
        decoder_num_attention_heads=a["decoder_num_heads"],
        decoder_intermediate_size=int(a["decoder_embed_dim"] * a["mlp_ratio"]),
        mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss, layer_norm_eps=1e-6,
        qkv_bias=True, hidden_act="gelu",
    )


def to_hf_model(model: MaskedAutoencoderViT):
    """A ``ViTMAEForPreTraining`` holding this model's weights (needs ``transformers``)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEForPreTraining(ViTMAEConfig(**hf_config_kwargs(model))).eval()
    new_layout = any(k.startswith("vit.layers.") for k in hf.state_dict())
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), new_layout), strict=True)
    return hf


def save_image_processor(out: str | Path, img_size: int, mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write ``preprocessor_config.json``: a ``ViTImageProcessor`` that resizes to
    ``img_size`` squared (bicubic), rescales to [0, 1] and normalizes with the run's statistics.

    A one-channel model gets one-value ``image_mean``/``image_std``: give it grayscale images
    (``PIL.Image.convert('L')``), which the processor keeps at one channel.
    """
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(
        do_resize=True, size={"height": img_size, "width": img_size}, resample=3,  # PIL bicubic
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[float(m) for m in mean], image_std=[float(s) for s in std],
    )
    processor.save_pretrained(str(out))
    return Path(out) / "preprocessor_config.json"


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload mimkit export") -> str:
    """Upload an export folder to the Hugging Face Hub as model repo ``repo_id`` (created if
    missing); returns the commit URL. Authentication as ``huggingface_hub`` does it
    (``token``, ``HF_TOKEN`` or ``hf auth login``)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
