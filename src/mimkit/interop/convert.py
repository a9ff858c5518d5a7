"""Read MAE weights from any supported file; export them to another format.

Sources ``read_weights`` understands (the kind is sniffed from the content, not the name):

- a mimkit checkpoint (``torch.save`` dict with ``format='mimkit-v1'``, ``arch``, ``model``;
  RC-MAE-style runs also hold ``teacher`` and ``student``);
- an official MAE file ``{'model': state_dict}``, full or encoder-only (a bare state dict too);
- a safetensors file (mimkit's ``safetensors`` or ``timm`` export, or any timm ViT weights);
- a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` folder (``config.json`` + weights).

Pickled files are read with ``torch.load(weights_only=True)`` only, so a tampered file is refused
instead of executing code; safetensors cannot hold code at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mimkit.engine.checkpoint import CheckpointError, atomic_save, load_file
from mimkit.interop.official import infer_arch, model_from_state

log = logging.getLogger("mimkit")
FORMATS = ("timm", "mae", "hf", "safetensors")
WEIGHTS = ("auto", "teacher", "student")


class UnsupportedCheckpointError(CheckpointError, ValueError):
    """A readable file that does not hold MAE / ViT weights mimkit understands."""


@dataclass
class Weights:
    """MAE weights under official names, plus what is known about them."""

    state: dict[str, torch.Tensor]  # full or encoder-only
    arch: dict  # MaskedAutoencoderViT keyword arguments
    norm_pix_loss: bool = True
    mask_ratio: float | None = None
    source: str = "official"  # mimkit | official | safetensors | timm | hf
    config: dict | None = None  # a mimkit run's saved config
    which: str = "model"  # model | teacher | student

    @property
    def encoder_only(self) -> bool:
        return "decoder_embed.weight" not in self.state


def is_safetensors(path: str | Path) -> bool:
    """True when ``path`` starts like a safetensors file (u64 header length, then ``{``)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size < 100_000_000


def weight_file(path: str | Path) -> Path:
    """The file holding the weights (a Hugging Face folder's ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the weights file behind ``path``."""
    h = hashlib.sha256()
    with open(weight_file(path), "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # header errors, truncation
        raise CheckpointError(f"cannot read safetensors file {path}: {e}. The file is truncated "
                              "or corrupt.") from None
    return state, meta


def _strip_head(state: dict) -> dict:
    """Drop classifier entries of timm-style fine-tuned weights (not part of the MAE encoder)."""
    dropped = [k for k in state if k.startswith(("head.", "fc_norm."))]
    if dropped:
        log.warning("ignoring %d classifier entries (%s, ...)", len(dropped), dropped[0])
    return {k: v for k, v in state.items() if k not in dropped}


def _check_state(state: dict, path: Path) -> None:
    if "patch_embed.proj.weight" not in state or "blocks.0.mlp.fc1.weight" not in state:
        keys = sorted(state)[:6]
        raise UnsupportedCheckpointError(f"{path}: not MAE / ViT encoder weights (keys: {keys} ...)")


def _hf_arch(cfg: dict) -> dict:
    if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
        raise UnsupportedCheckpointError("only ViTMAE configs with gelu and qkv_bias=True are supported")
    eps = cfg.get("layer_norm_eps", 1e-6)
    if eps != 1e-6:
        log.warning("config.json has layer_norm_eps=%g; mimkit uses 1e-6 (MAE)", eps)
    size = cfg.get("image_size", 224)
    hidden, dec = cfg["hidden_size"], cfg.get("decoder_hidden_size", 512)
    mlp_ratio = cfg.get("intermediate_size", 4 * hidden) / hidden
    dec_ratio = cfg.get("decoder_intermediate_size", 4 * dec) / dec
    if dec_ratio != mlp_ratio:
        raise UnsupportedCheckpointError(
            f"encoder mlp ratio {mlp_ratio} differs from the decoder's {dec_ratio}; mimkit uses one")
    return dict(
        img_size=list(size) if isinstance(size, list | tuple) else [size, size],
        patch_size=cfg.get("patch_size", 16), in_chans=cfg.get("num_channels", 3),
        embed_dim=hidden, depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        decoder_embed_dim=dec, decoder_depth=cfg.get("decoder_num_hidden_layers", 8),
        decoder_num_heads=cfg.get("decoder_num_attention_heads", 16), mlp_ratio=mlp_ratio,
    )


def _read_hf_folder(folder: Path) -> Weights:
    from mimkit.interop.hf import from_hf_state_dict

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is a folder but has no config.json (Hugging Face layout)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("model_type") not in (None, "vit_mae"):
        raise UnsupportedCheckpointError(f"{folder}: model_type {cfg.get('model_type')!r}, expected 'vit_mae'")
    file = weight_file(folder)
    hf_state = _read_safetensors(file)[0] if file.suffix == ".safetensors" else load_file(file)
    if not any(k.startswith("vit.") for k in hf_state):  # ViTMAEModel: no "vit." prefix
        hf_state = {(k if k.startswith("decoder.") else f"vit.{k}"): v for k, v in hf_state.items()}
    # transformers 5.x saves the decoder blocks as "decoder.decoder_encoder.layer.N" (its
    # layers -> encoder.layer rename applied to "decoder_layers"); 4.x as "decoder.decoder_layers.N".
    legacy_dec = "decoder.decoder_encoder.layer."
    hf_state = {(f"decoder.decoder_layers.{k[len(legacy_dec):]}" if k.startswith(legacy_dec) else k): v
                for k, v in hf_state.items()}
    state = from_hf_state_dict(hf_state)
    _check_state(state, folder)
    return Weights(state, _hf_arch(cfg), bool(cfg.get("norm_pix_loss", False)),
                   cfg.get("mask_ratio"), "hf")


def read_weights(path: str | Path, weights: str = "auto") -> Weights:
    """MAE weights from any supported file or folder (see the module docstring).

    ``weights`` picks from RC-MAE-style checkpoints: ``auto`` is the run's evaluation weights
    (the ``model`` entry: the teacher unless the run chose otherwise), ``teacher`` or ``student``.
    Unreadable, truncated or tampered files raise :class:`CheckpointError`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        state, meta = _read_safetensors(path)
        state = _strip_head(state)
        _check_state(state, path)
        arch = json.loads(meta["arch"]) if "arch" in meta else infer_arch(state)
        mask_ratio = float(meta["mask_ratio"]) if "mask_ratio" in meta else None
        source = "timm" if meta.get("format") == "timm-vit" else "safetensors"
        return Weights(state, arch, meta.get("norm_pix_loss", "true") == "true", mask_ratio, source)

    ckpt = load_file(path)
    if str(ckpt.get("format", "")).startswith("mimkit"):
        key = "model"
        if weights != "auto":
            if weights == "teacher" and "teacher" not in ckpt:
                raise UnsupportedCheckpointError(f"{path} has no teacher weights")
            key = weights if weights in ckpt else "model"
        return Weights(dict(ckpt[key]), dict(ckpt["arch"]), bool(ckpt.get("norm_pix_loss", True)),
                       (ckpt.get("config") or {}).get("mask_ratio"), "mimkit", ckpt.get("config"), key)
    if weights == "teacher":
        raise UnsupportedCheckpointError(f"{path} has no teacher weights")
    for key in ("model", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            state = ckpt[key]
            break
    else:
        state = ckpt
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedCheckpointError(
            f"{path}: not a mimkit or official MAE checkpoint (keys: {sorted(ckpt)[:8]})")
    state = _strip_head(dict(state))
    _check_state(state, path)
    arch = dict(ckpt["arch"]) if isinstance(ckpt.get("arch"), dict) else infer_arch(state)
    return Weights(state, arch, bool(ckpt.get("norm_pix_loss", True)), None, "official")


def build_mae(w: Weights, **overrides):
    """A :class:`MaskedAutoencoderViT` holding ``w`` (``overrides`` as for ``load_model``)."""
    overrides.setdefault("norm_pix_loss", w.norm_pix_loss)
    if w.mask_ratio is not None:
        overrides.setdefault("mask_ratio", w.mask_ratio)
    norm_pix = overrides.pop("norm_pix_loss")
    return model_from_state(w.state, w.arch, norm_pix_loss=norm_pix, **overrides)


def _metadata(w: Weights, fmt: str) -> dict[str, str]:
    meta = {"format": fmt, "arch": json.dumps(w.arch), "norm_pix_loss": str(w.norm_pix_loss).lower()}
    if w.mask_ratio is not None:
        meta["mask_ratio"] = str(w.mask_ratio)
    return meta


def export(path: str | Path, fmt: str, out: str | Path, encoder_only: bool = False,
           weights: str = "auto") -> dict:
    """Write the weights in ``path`` to ``out`` as ``fmt``; returns what was written.

    ``timm``: encoder-only safetensors file loadable with ``strict=True`` by the printed
    ``timm.create_model(...)`` call. ``mae``: official ``{'model': state_dict}`` (plus ``arch`` and
    ``norm_pix_loss``) via ``torch.save``. ``safetensors``: the MAE state dict with the
    architecture in the metadata. ``hf``: a ``ViTMAEForPreTraining`` folder (``save_pretrained``).
    """
    from safetensors.torch import save_file

    from mimkit.interop.timm import create_model_call, encoder_state_dict

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    w = read_weights(path, weights)
    out = Path(out)
    info = {"format": fmt, "out": str(out), "source": w.source, "weights": w.which}
    if fmt == "hf":
        from mimkit.interop.hf import to_hf_model

        if encoder_only or w.encoder_only:
            raise ValueError("the Hugging Face export is a full ViTMAEForPreTraining: it needs the "
                             "decoder (drop --encoder-only, or use a full checkpoint)")
        to_hf_model(build_mae(w)).save_pretrained(str(out))
        return info
    state = {k: v.detach().cpu().contiguous() for k, v in w.state.items()}
    if fmt == "timm" or encoder_only:
        state = encoder_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mae":
        atomic_save({"model": state, "arch": w.arch, "norm_pix_loss": w.norm_pix_loss}, out)
    elif fmt == "safetensors":
        save_file(state, str(out), metadata=_metadata(w, "mimkit-safetensors"))
    else:
        call = create_model_call(w.arch)
        meta = _metadata(w, "timm-vit")
        meta["create_model"] = call
        save_file(state, str(out), metadata=meta)
        info["create_model"] = call
    info["encoder_only"] = fmt == "timm" or encoder_only or w.encoder_only
    return info
