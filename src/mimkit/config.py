"""Typed config: dataclass defaults ⊕ preset/YAML file ⊕ ``key=value`` overrides.

A wrong key or a value of the wrong type fails at start-up with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mimkit.errors import MimkitError

log = logging.getLogger("mimkit")
PRESET_DIR = Path(__file__).parent / "presets"


# Allowed values, spelled once: the config coercion checks them (with "did you mean"), and the
# modules that take them use these aliases and :func:`choices`.
OnCorrupt = Literal["error", "skip"]
Decode = Literal["pil", "torchvision", "device"]
DataStats = Literal["dataset", "imagenet", "compute"]
DecoderKind = Literal["self", "cross"]
Amp = Literal["auto", "bf16", "fp16", "off"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal["ddp", "fsdp"]
Logger = Literal["tensorboard", "wandb", "mlflow"]
ScDistance = Literal["mse", "l1", "smooth_l1"]
ScTarget = Literal["other", "mean"]
EmaSchedule = Literal["cosine", "constant"]
TeacherMask = Literal["same", "different"]
EvalWeights = Literal["teacher", "student"]
SegmentEmbed = Literal["none", "decoder", "encoder"]
Feature = Literal["cls", "mean", "both"]
EvalSplit = Literal["test", "val"]
ProbeOptimizer = Literal["sgd", "lars"]
MixupMode = Literal["batch", "pair", "elem"]
EraseMode = Literal["pixel", "rand", "const"]
GlobalPool = Literal["avg", "token"]


def choices(alias: Any) -> tuple[str, ...]:
    """The values a ``Literal`` alias allows."""
    return typing.get_args(alias)


class ConfigError(MimkitError, ValueError):
    """A config key or value that cannot be used."""


@dataclass
class ModelConfig:
    arch: str = "vit_base_patch16"  # a name in mimkit.models.archs.ARCHS
    img_size: int = 224
    in_chans: Literal[1, 3] = 3  # 1 (grayscale) | 3 (RGB)
    patch_size: int | None = None  # None: the arch's value
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = None


@dataclass
class DecoderConfig:
    """How much the MAE decoder reconstructs (the architecture's sizes are ``model.decoder_*``)."""

    predict_ratio: float = 1.0  # share of the masked patches decoded and scored; 1: all (MAE)
    kind: DecoderKind = "self"  # self (MAE: self-attention over all tokens) | cross (CrossMAE: queries see visible)


@dataclass
class DataConfig:
    name: str = "folder"  # folder | fashion_mnist | mnist | cifar10 | cifar100 | synthetic
    root: str | None = None
    stats: DataStats = "dataset"  # dataset (its usual mean/std; ImageNet's for folders) | imagenet | compute
    mean: list[float] | None = None  # explicit normalization; data.stats=compute fills these in
    std: list[float] | None = None
    val_fraction: float | None = None  # held out of train as 'val'; None: 0 with a test split, else 0.1
    split_seed: int = 0  # seeds the train/val partition (docs/data.md)
    min_steps_per_epoch: int = 1  # shrink accum, then batch, until an epoch has this many steps; 0: off
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    decode: Decode = "pil"  # pil | torchvision (tensor decode in workers) | device (on the GPU); docs/data.md
    num_workers: int = 4
    on_corrupt: OnCorrupt = "error"  # error | skip
    synthetic_size: int = 512
    label_fraction: float = 1.0  # evaluation: seeded class-balanced subset of the training labels


@dataclass
class TrainConfig:
    epochs: int = 800
    max_steps: int | None = None  # total optimizer steps; replaces epochs when set
    warmup_epochs: float = 40.0
    batch_size: int = 64  # per device
    accum_iter: int = 1
    blr: float = 1.5e-4
    lr: float | None = None  # absolute lr; None: blr * effective_batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float | None = None
    seed: int = 0
    init_from: str | None = None  # weights to start from (official MAE, mimkit export, run checkpoint)
    amp: Amp = "auto"  # auto (bf16 where supported, fp32 on CPU) | bf16 | fp16 | off
    device: Device = "auto"  # auto | cpu | cuda
    compile: bool = False
    strategy: Strategy = "ddp"  # ddp | fsdp (FSDP2: shards weights and optimizer state; under torchrun)
    grad_checkpointing: bool = False  # recompute encoder/decoder blocks in backward: less memory
    checkpoint_every: int = 1000  # optimizer steps
    keep_checkpoints: int = 3
    log_every: int = 1
    vis_every: int = 0  # steps between reconstruction images (0: only at the end)
    knn_every: int = 0  # epochs between online k-NN monitors (0: off)
    loggers: list[Logger] = field(default_factory=lambda: ["tensorboard"])  # tensorboard | wandb | mlflow


@dataclass
class EMAEConfig:
    num_parts: int = 0  # parts run per step; 0: all K = 1/(1-mask_ratio)
    sc_weight: float = 1.0  # λ of the self-consistency loss
    sc_warmup: float = 0.0  # fraction of training over which λ rises linearly from 0 (0: off)
    sc_distance: ScDistance = "mse"  # mse | l1 | smooth_l1
    sc_target: ScTarget = "other"  # other | mean
    sequential: bool = False  # run parts one after another to save memory


@dataclass
class TeacherConfig:
    weight: float = 1.0  # γ of the teacher-consistency loss
    momentum: float = 0.996
    momentum_end: float = 1.0
    schedule: EmaSchedule = "cosine"  # cosine | constant
    mask: TeacherMask = "same"  # same | different
    eval_weights: EvalWeights = "teacher"  # teacher | student
    # EMA window 1/(1-m) capped at this fraction of the run, so short runs forget the random
    # init (docs/methods/rcmae.md); 0: no cap, the paper's momentum at any run length
    max_window: float = 0.05


@dataclass
class MixedAEConfig:
    ways: int = 0  # r images mixed per sample (<= K); 0: K = 1/(1-mask_ratio)
    attn_blocks: list[int] | None = None  # encoder blocks with homologous attention; None: all
    topk: int = 0  # patch keys kept per query (+ cls); 0: L/K, the patches of one source
    oracle: bool = False
    hc_weight: float = 0.5
    attn_weight: float = 1.0  # SupCon on the homologous blocks' attention logits (loss_attn)
    hc_temperature: float = 0.2
    hc_proj_dim: int = 128
    hc_prototype: bool = False
    segment_embed: SegmentEmbed = "none"  # none | decoder | encoder


@dataclass
class LinprobeConfig:
    """Linear probe (MAE protocol, docs/methods/mae.md); defaults suit small data sets on a CPU."""

    epochs: int = 90
    batch_size: int = 256  # per step; the effective batch is batch_size * accum_iter
    accum_iter: int = 1
    blr: float = 0.1  # lr = blr * effective batch / 256
    lr: float | None = None  # absolute lr; None: from blr
    min_lr: float = 0.0
    warmup_epochs: float = 10.0
    optimizer: ProbeOptimizer = "sgd"  # sgd (small data) | lars (the MAE recipe, large batches)
    momentum: float = 0.9
    weight_decay: float = 0.0
    feature: Feature = "cls"  # cls (token after the final norm, MAE) | mean | both
    cached_features: bool = True  # extract once without augmentation; train the head on tensors
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # uncached only


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning (MAE protocol, docs/methods/mae.md); defaults suit small images on a CPU."""

    epochs: int = 50
    max_steps: int | None = None  # total optimizer steps; replaces epochs when set
    batch_size: int = 128  # per step; the effective batch is batch_size * accum_iter
    accum_iter: int = 1
    blr: float = 1.0e-3  # lr = blr * effective batch / 256
    lr: float | None = None
    min_lr: float = 1.0e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.0  # alpha; 0 disables
    cutmix: float = 0.0  # alpha; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: MixupMode = "batch"  # batch | pair | elem
    auto_augment: str | None = None  # e.g. rand-m9-mstd0.5-inc1; None: off (small images)
    color_jitter: float | None = None
    reprob: float = 0.25  # random erasing probability
    remode: EraseMode = "pixel"
    recount: int = 1
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    hflip: float = 0.5
    global_pool: GlobalPool = "avg"  # avg (+ fc_norm, MAE) | token
    clip_grad: float | None = None
    eval_every: int = 0  # epochs between learning-curve points (on val if data.val_fraction > 0; 0: none)


@dataclass
class EvalConfig:
    split: EvalSplit = "test"  # test (published numbers) | val (choosing settings; carved from train)
    knn_k: int = 20
    knn_temperature: float = 0.07
    feature: Feature = "cls"  # k-NN features: cls | mean | both
    batch_size: int = 256  # feature extraction
    max_train_samples: int = 0  # k-NN bank cap; 0: all
    monitor_samples: int = 10000  # online k-NN monitor: cap on bank and queries (0: all)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class Config:
    method: str = "mae"  # mae | emae | rcmae | mixedae, or a '+'-combination such as emae+rcmae
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    emae: EMAEConfig = field(default_factory=EMAEConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mixedae: MixedAEConfig = field(default_factory=MixedAEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field type (int, float, bool, str, list, Optional)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, allowed))}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def merge_into(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            valid = [prefix + n for n in names]
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            merge_into(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> dict:
    """``'train.epochs=5'`` → ``{'train': {'epochs': 5}}`` (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return _nest(key.strip(), value)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(source: str | Path) -> dict:
    """A preset name or a YAML file path → dict (a file may name a ``base`` preset/file)."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            close = difflib.get_close_matches(str(source), preset_names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"no preset or file named '{source}'{hint}; presets: {', '.join(preset_names())}"
            )
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_update(read_yaml(base), data)


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(source: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults ⊕ preset/file ⊕ ``key=value`` overrides, validated."""
    cfg = Config()
    if source is not None:
        merge_into(cfg, read_yaml(source))
    for text in overrides:
        merge_into(cfg, parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict, overrides: list[str] | tuple = ()) -> Config:
    """A saved config (e.g. a run's ``config.yaml``) plus ``key=value`` overrides, validated."""
    cfg = Config()
    merge_into(cfg, data)
    for text in overrides:
        merge_into(cfg, parse_override(text))
    validate(cfg)
    return cfg


def known_keys(saved: dict, obj: object | None = None, prefix: str = "") -> dict:
    """A run's saved config without the keys this version of mimkit no longer has (renamed or
    removed options of other sections must not block evaluating an older checkpoint); each
    dropped key is logged. User-given configs stay strict."""
    obj = Config() if obj is None else obj
    names = {f.name for f in dataclasses.fields(obj)}
    out = {}
    for key, value in saved.items():
        if key not in names:
            log.warning("ignoring the saved config key '%s%s' (unknown to this version)", prefix, key)
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = known_keys(value, current, f"{prefix}{key}.")
        out[key] = value
    return out


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{'train': {'lr': 1}}`` → ``{'train.lr': 1}`` (dotted keys, as in overrides)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The config as the YAML text saved in a run folder."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(config_yaml(cfg))


def validate(cfg: Config) -> None:
    """Value checks that types cannot express; each error names its key. The method name is
    checked where the methods are registered (:func:`mimkit.objectives.parse_method`)."""
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio: must be in (0, 1), got {cfg.mask_ratio}")
    from mimkit.models.archs import ARCHS

    if cfg.model.arch not in ARCHS:
        close = difflib.get_close_matches(cfg.model.arch, ARCHS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.arch: unknown '{cfg.model.arch}'{hint}; choose from {sorted(ARCHS)}")
    patch = cfg.model.patch_size or ARCHS[cfg.model.arch]["patch_size"]
    if cfg.model.img_size % patch:
        raise ConfigError(
            f"model.img_size: {cfg.model.img_size} is not divisible by the patch size {patch}"
        )
    t = cfg.train
    positive = {"train.batch_size": t.batch_size, "train.accum_iter": t.accum_iter,
                "train.checkpoint_every": t.checkpoint_every, "train.keep_checkpoints": t.keep_checkpoints,
                "train.log_every": t.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps: must be >= 1, got {t.max_steps}")
    if t.epochs < 1 and t.max_steps is None:
        raise ConfigError(f"train.epochs: must be >= 1, got {t.epochs}")
    if not 0.0 < cfg.data.label_fraction <= 1.0:
        raise ConfigError(f"data.label_fraction: must be in (0, 1], got {cfg.data.label_fraction}")
    vf = cfg.data.val_fraction
    if vf is not None and not 0.0 <= vf < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {vf}")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("data.mean and data.std: set both or neither")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: expected two values, got {t.betas}")
    _validate_methods(cfg)
    _validate_eval(cfg.eval)


def _validate_methods(cfg: Config) -> None:
    """Method options; shapes that depend on the model (K dividing L, top-k) are checked when
    the objective is built (:func:`mimkit.objectives.build_objective`)."""
    e, te, mx = cfg.emae, cfg.teacher, cfg.mixedae
    if e.num_parts < 0:
        raise ConfigError(f"emae.num_parts: must be >= 0 (0: all parts), got {e.num_parts}")
    if e.sc_weight < 0:
        raise ConfigError(f"emae.sc_weight: must be >= 0, got {e.sc_weight}")
    if not 0.0 <= e.sc_warmup <= 1.0:
        raise ConfigError(f"emae.sc_warmup: a fraction of training in [0, 1], got {e.sc_warmup}")
    if te.weight < 0:
        raise ConfigError(f"teacher.weight: must be >= 0, got {te.weight}")
    for key, value in (("teacher.momentum", te.momentum), ("teacher.momentum_end", te.momentum_end)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}: must be in [0, 1], got {value}")
    if not 0.0 < cfg.decoder.predict_ratio <= 1.0:
        raise ConfigError(f"decoder.predict_ratio: must be in (0, 1], got {cfg.decoder.predict_ratio}")
    if te.max_window < 0:
        raise ConfigError(f"teacher.max_window: must be >= 0 (0: no cap), got {te.max_window}")
    if mx.ways < 0:
        raise ConfigError(f"mixedae.ways: must be >= 0 (0: 1/(1-mask_ratio)), got {mx.ways}")
    if mx.topk < 0:
        raise ConfigError(f"mixedae.topk: must be >= 0 (0: patches per source), got {mx.topk}")
    if mx.hc_weight < 0:
        raise ConfigError(f"mixedae.hc_weight: must be >= 0, got {mx.hc_weight}")
    if mx.attn_weight < 0:
        raise ConfigError(f"mixedae.attn_weight: must be >= 0, got {mx.attn_weight}")
    if mx.hc_temperature <= 0:
        raise ConfigError(f"mixedae.hc_temperature: must be > 0, got {mx.hc_temperature}")
    if mx.hc_proj_dim < 1:
        raise ConfigError(f"mixedae.hc_proj_dim: must be >= 1, got {mx.hc_proj_dim}")


def _validate_eval(e: EvalConfig) -> None:
    positive = {"eval.batch_size": e.batch_size, "eval.knn_k": e.knn_k,
                "eval.linprobe.epochs": e.linprobe.epochs, "eval.linprobe.batch_size": e.linprobe.batch_size,
                "eval.finetune.epochs": e.finetune.epochs, "eval.finetune.batch_size": e.finetune.batch_size,
                "eval.linprobe.accum_iter": e.linprobe.accum_iter, "eval.finetune.accum_iter": e.finetune.accum_iter}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if e.finetune.max_steps is not None and e.finetune.max_steps < 1:
        raise ConfigError(f"eval.finetune.max_steps: must be >= 1, got {e.finetune.max_steps}")
    if not 0.0 < e.finetune.layer_decay <= 1.0:
        raise ConfigError(f"eval.finetune.layer_decay: must be in (0, 1], got {e.finetune.layer_decay}")
    for key, scale in (("eval.linprobe.crop_scale", e.linprobe.crop_scale),
                       ("eval.finetune.crop_scale", e.finetune.crop_scale)):
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"{key}: expected [low, high] with 0 < low <= high <= 1, got {scale}")
