"""Read MAE weights from any supported file; export them to another format.

Sources ``read_weights`` understands (the kind is sniffed from the content, not the name):

- a mimkit checkpoint (``torch.save`` dict with ``format='mimkit-v1'``, ``arch``, ``model``;
  RC-MAE-style runs also hold ``teacher`` and ``student``);
- an official MAE file ``{'model': state_dict}``, full or encoder-only (a bare state dict too);
- a safetensors file (mimkit's ``safetensors`` or ``timm`` export, or any timm ViT weights);
- a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` folder (``config.json`` + weights),
  or a timm folder (mimkit's ``timm`` export: ``config.json`` with ``pretrained_cfg``).

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

from mimkit.engine.checkpoint import CheckpointError, atomic_save, atomic_save_safetensors, load_file
from mimkit.interop.official import fit_position_tables, infer_arch, model_from_state

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
    if "pretrained_cfg" in cfg and "architecture" in cfg:  # a timm folder (mimkit's timm export)
        w = read_weights(weight_file(folder))
        w.source = "timm"
        return w
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


def init_from(model, path: str | Path, weights: str = "auto") -> Weights:
    """Load ``path``'s weights (any file :func:`read_weights` reads) into ``model``, a fresh MAE
    built from a run's config, so that pre-training starts from them: continued or
    domain-adaptive pre-training (``train.init_from``).

    The architecture is the model's: every tensor of the file must fit it, except the position
    tables, which are resized to the model's patch grid. An encoder-only file leaves the model's
    own (seeded) decoder and mask token in place. A file that does not fit raises
    :class:`~mimkit.config.ConfigError` naming the first tensor that differs.
    """
    from mimkit.config import ConfigError

    w = read_weights(path, weights)
    own = model.state_dict()
    fix = (f"set model.* to the file's architecture ({_arch_text(w.arch)}) or drop train.init_from")
    state = fit_position_tables(w.state, model)
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state
                     and not (w.encoder_only and k.startswith(("decoder", "mask_token"))))
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing:
        name, what = (unexpected[0], "has") if unexpected else (missing[0], "lacks")
        raise ConfigError(f"train.init_from={path} {what} {name!r}, which the configured model "
                          f"{'does not have' if unexpected else 'needs'}: {fix}")
    if wrong:
        k = wrong[0]
        raise ConfigError(f"train.init_from={path}: {k} is {tuple(state[k].shape)}, the configured model's "
                          f"{tuple(own[k].shape)}: {fix}")
    model.load_state_dict(state, strict=False)
    return w


def _arch_text(arch: dict) -> str:
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "decoder_embed_dim", "decoder_depth")
    return ", ".join(f"{k}={arch[k]}" for k in keys if k in arch)


def _metadata(w: Weights, fmt: str) -> dict[str, str]:
    meta = {"format": fmt, "arch": json.dumps(w.arch), "norm_pix_loss": str(w.norm_pix_loss).lower()}
    if w.mask_ratio is not None:
        meta["mask_ratio"] = str(w.mask_ratio)
    return meta


def export_stats(w: Weights) -> tuple[list[float], list[float]]:
    """Normalization an exported encoder expects: the run's own (a mimkit checkpoint's saved
    config), else ImageNet's (official, Hugging Face and other files)."""
    from mimkit.data import dataset_stats, stats_for

    if w.config:
        from mimkit.config import ConfigError, config_from_dict, known_keys

        try:
            mean, std = stats_for(config_from_dict(known_keys(w.config)))
            return list(mean), list(std)
        except ConfigError as e:  # an older run's config this version rejects: say so, go on
            log.warning("cannot read the checkpoint's data statistics (%s); using ImageNet's", e)
    mean, std = dataset_stats("folder", int(w.arch["in_chans"]))
    return list(mean), list(std)


def _img_side(arch: dict) -> int:
    size = arch["img_size"]
    return int(size) if isinstance(size, int) else int(size[0])


def _resize_text(fmt: str, side: int) -> str:
    from mimkit.interop.timm import eval_crop

    crop_pct = eval_crop(side)[0] if fmt == "timm" else 1.0  # ViTImageProcessor only resizes
    if crop_pct == 1.0:
        return "bicubic resize"
    return f"bicubic resize to {int(side / crop_pct)} px, center crop"


def model_card(w: Weights, fmt: str, source: str | Path, mean: list[float], std: list[float]) -> str:
    """``README.md`` of an export folder: method, data, config summary, usage and the measured
    evaluations (the ``eval_*.json`` files beside a checkpoint file)."""
    import yaml

    cfg = w.config or {}
    a, data, train = w.arch, cfg.get("data", {}), cfg.get("train", {})
    method = cfg.get("method", "mae")
    library = "transformers" if fmt == "hf" else "timm"
    lines = ["---", f"library_name: {library}", "tags:", "- mimkit", "- masked-image-modeling",
             f"- {method}", "- vision-transformer", "---", "",
             f"# {Path(source).parent.name if Path(source).is_file() else Path(source).name}: "
             f"{method.upper()} pre-trained ViT", "",
             f"Exported by mimkit from `{Path(source).name}` ({w.source} file, {w.which} weights).", "",
             "## Model", "",
             f"- Method: `{method}`, mask ratio {w.mask_ratio if w.mask_ratio is not None else 'n/a'}, "
             f"normalized-pixel loss: {w.norm_pix_loss}",
             f"- Encoder: ViT, {a['depth']} blocks, width {a['embed_dim']}, {a['num_heads']} heads, "
             f"patch {a['patch_size']}, image {_img_side(a)} px, {a['in_chans']} channel(s)",
             f"- Input: {_img_side(a)} px ({_resize_text(fmt, _img_side(a))}), then normalize with "
             f"mean {mean} and std {std}"
             + (" (one channel: give grayscale images)" if a["in_chans"] == 1 else ""), ""]
    if cfg:
        steps = f"{train.get('max_steps')} steps" if train.get("max_steps") else f"{train.get('epochs')} epochs"
        lines += ["## Training data and recipe", "",
                  f"- Data: `{data.get('name')}`" + (f" (`{Path(data['root']).name}`)" if data.get("root") else ""),
                  f"- {steps}, batch {train.get('batch_size')} x accumulation {train.get('accum_iter')}, "
                  f"base lr {train.get('blr')}, weight decay {train.get('weight_decay')}, seed {train.get('seed')}",
                  "", "<details><summary>Full config</summary>", "", "```yaml",
                  yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "</details>", ""]
    evals = sorted(Path(source).parent.glob("eval_*.json")) if Path(source).is_file() else []
    rows = []
    for path in evals:
        try:
            rec = json.loads(path.read_text())
            rows.append(f"| {rec.get('protocol', path.stem)} | {rec['metric']} | {100 * float(rec['value']):.2f}% "
                        f"| `{path.name}` |")
        except (ValueError, KeyError, TypeError):
            log.warning("skipping unreadable evaluation record %s", path)
    lines += ["## Evaluation", ""]
    lines += (["| protocol | metric | value | record |", "| --- | --- | --- | --- |", *rows]
              if rows else ["No evaluation record (`mimkit eval ...` writes `eval_*.json` beside the checkpoint)."])
    lines += ["", "## Usage", "", "```python"]
    if fmt == "hf":
        lines += ["from transformers import AutoImageProcessor, ViTMAEForPreTraining",
                  "processor = AutoImageProcessor.from_pretrained(PATH_OR_REPO)",
                  "model = ViTMAEForPreTraining.from_pretrained(PATH_OR_REPO)",
                  "out = model(**processor(images, return_tensors='pt'))"]
    else:
        lines += ["import timm", "model = timm.create_model('hf-hub:REPO', pretrained=True)  # or 'local-dir:PATH'",
                  "cfg = timm.data.resolve_data_config(model=model)",
                  "features = model.forward_features(timm.data.create_transform(**cfg)(image)[None])"]
    lines += ["```", ""]
    return "\n".join(lines)


def export(path: str | Path, fmt: str, out: str | Path, encoder_only: bool = False,
           weights: str = "auto") -> dict:
    """Write the weights in ``path`` to ``out`` as ``fmt``; returns what was written.

    ``timm``: a folder (``config.json``, ``model.safetensors``, ``README.md``) that
    ``timm.create_model('local-dir:OUT', pretrained=True)`` loads, with the encoder's own input
    size and normalization in its ``pretrained_cfg``; an ``out`` ending in ``.safetensors`` writes
    only the encoder weights, loadable with ``strict=True`` by the printed ``timm.create_model(...)``
    call. ``mae``: official ``{'model': state_dict}`` (plus ``arch`` and ``norm_pix_loss``) via
    ``torch.save``. ``safetensors``: the MAE state dict with the architecture in the metadata.
    ``hf``: a ``ViTMAEForPreTraining`` folder (``save_pretrained``) with ``preprocessor_config.json``
    and a model card ``README.md``. ``info['folder']`` is True for the folder formats.
    """
    from mimkit.interop.timm import create_model_call, encoder_state_dict, save_timm_folder

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    w = read_weights(path, weights)
    out = Path(out)
    info = {"format": fmt, "out": str(out), "source": w.source, "weights": w.which, "folder": False}
    if fmt == "hf":
        from mimkit.interop.hf import save_image_processor, to_hf_model

        if encoder_only or w.encoder_only:
            raise ValueError("the Hugging Face export is a full ViTMAEForPreTraining: it needs the "
                             "decoder (drop --encoder-only, or use a full checkpoint)")
        mean, std = export_stats(w)
        to_hf_model(build_mae(w)).save_pretrained(str(out))
        save_image_processor(out, _img_side(w.arch), mean, std)
        (out / "README.md").write_text(model_card(w, fmt, path, mean, std))
        info["folder"] = True
        return info
    state = {k: v.detach().cpu().contiguous() for k, v in w.state.items()}
    if fmt == "timm" or encoder_only:
        state = encoder_state_dict(state)
    info["encoder_only"] = fmt == "timm" or encoder_only or w.encoder_only
    if fmt == "timm" and out.suffix != ".safetensors":
        mean, std = export_stats(w)
        save_timm_folder(state, w.arch, out, mean, std, metadata=_metadata(w, "timm-vit"))
        (out / "README.md").write_text(model_card(w, fmt, path, mean, std))
        info["folder"] = True
        info["create_model"] = f"timm.create_model('local-dir:{out}', pretrained=True)"
        return info
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mae":
        atomic_save({"model": state, "arch": w.arch, "norm_pix_loss": w.norm_pix_loss}, out)
    elif fmt == "safetensors":
        atomic_save_safetensors(state, out, metadata=_metadata(w, "mimkit-safetensors"))
    else:
        call = create_model_call(w.arch)
        meta = _metadata(w, "timm-vit")
        meta["create_model"] = call
        atomic_save_safetensors(state, out, metadata=meta)
        info["create_model"] = call
    return info
