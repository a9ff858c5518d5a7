"""``mimkit eval``: resolve the config, load the encoder, run a protocol, write ``eval_<protocol>.json``."""

from __future__ import annotations

import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mimkit.config import Config, ConfigError, config_from_dict, known_keys, load_config, to_dict

log = logging.getLogger("mimkit")
PROTOCOLS = ("knn", "linprobe", "finetune")


def resolve_config(saved: dict | None, config: str | Path | None, overrides: list[str] | tuple = (),
                   source: str | Path | None = None) -> Config:
    """``config`` (preset or file) ⊕ overrides; without one, a mimkit checkpoint's ``saved`` config."""
    if config is not None:
        return load_config(config, overrides)
    if saved:
        return config_from_dict(known_keys(saved), overrides)
    if source is not None:
        raise ConfigError(f"{source} carries no mimkit config: give --config (a preset or YAML "
                          "file naming the data set and image size)")
    raise ConfigError("give --checkpoint, or --config with --from-scratch or --pixels")


def split_origin(overrides: list[str] | tuple, config: str | Path | None, checkpoint: str | Path | None) -> str:
    """Where ``eval.split`` came from: a pre-training run's monitor split (often ``val``) rides along
    in its checkpoint's config, so the log says so rather than scoring val silently."""
    if any(o.split("=", 1)[0].strip() == "eval.split" for o in overrides):  # as config parses them
        return "the command line"
    if config is not None:
        return f"--config {config}"
    return f"the config saved in {checkpoint}"


def result_name(protocol: str, from_scratch: bool, label_fraction: float, pixels: bool = False) -> str:
    """``eval_<protocol>.json``; from-scratch, pixels and label-fraction runs get a suffix so they
    never overwrite the default result."""
    name = f"eval_{protocol}"
    if from_scratch:
        name += "_scratch"
    if pixels:
        name += "_pixels"
    if label_fraction < 1.0:
        name += f"_lf{label_fraction:g}"
    return name + ".json"


def result_path(out: Path, protocol: str, from_scratch: bool, cfg: Config, pixels: bool = False) -> Path:
    """Where the result of ``protocol`` goes in ``out``; a val number never overwrites the
    published test number."""
    path = out / result_name(protocol, from_scratch, cfg.data.label_fraction, pixels)
    if cfg.eval.split != "test":
        path = path.with_name(f"{path.stem}_{cfg.eval.split}{path.suffix}")
    return path


def _encoder_for_features(cfg: Config, w):
    """A timm ViT (``global_pool='token'``) whose ``forward_features`` are the MAE encoder's;
    ``w`` is the checkpoint's :class:`~mimkit.interop.convert.Weights`, or None (from scratch)."""
    from mimkit.eval.common import timm_encoder

    return timm_encoder(cfg, w, global_pool="token")


def log_grid(grid: list[dict], split: str) -> None:
    """Log a k × T table of k-NN top-1 (%) and its best setting."""
    temps = sorted({r["temperature"] for r in grid})
    rows = {}
    for r in grid:
        rows.setdefault(r["k"], {})[r["temperature"]] = r["top1"]
    lines = ["k \\ T " + " ".join(f"{t:>7g}" for t in temps)]
    lines += [f"{k:>6} " + " ".join(f"{100 * rows[k][t]:7.2f}" for t in temps) for k in sorted(rows)]
    sims = {1: grid[0]["first_similarity"], **{r["k"]: r["kth_similarity"] for r in grid}}
    lines.append("mean cosine similarity of the k-th neighbour: "
                 + ", ".join(f"k={k} {sims[k]:.4f}" for k in sorted(sims)))
    best = max(grid, key=lambda r: r["top1"])
    log.info("knn grid, top-1 (%%) on %s:\n%s\nbest: eval.knn_k=%d eval.knn_temperature=%g (%.2f %%)", split,
             "\n".join(lines), best["k"], best["temperature"], 100 * best["top1"])


def evaluate(protocol: str, checkpoint: str | Path | None = None, config: str | Path | None = None,
             out: str | Path | None = None, from_scratch: bool = False, overrides: list[str] | tuple = (),
             weights: str = "auto", pixels: bool = False,
             grid: tuple[list[int], list[float]] | None = None) -> tuple[dict, Path]:
    """Run ``protocol`` (knn | linprobe | finetune) and write its JSON result.

    The config gives data and evaluation settings (``--config``; default: the checkpoint's saved
    config). The encoder comes from ``checkpoint`` (any format ``mimkit.load_encoder`` reads) or,
    with ``from_scratch``, is a random initialisation of cfg's architecture (the checkpoint's
    config when one is given, so pre-trained and scratch runs match). With ``pixels`` (knn and
    linprobe), the features are the input images themselves (:class:`~mimkit.eval.common.InputPixels`):
    the yardstick an encoder's numbers are read against. ``grid`` (knn only: ks, temperatures)
    also scores every k-NN setting, on a validation split only: choosing on test would make the
    published number a tuned one. The result goes to ``out`` (default: the checkpoint's folder).
    Returns (result, path).
    """
    from mimkit.engine.checkpoint import atomic_write_text
    from mimkit.engine.distributed import pick_device
    from mimkit.engine.logging import setup_logging
    from mimkit.interop.convert import read_weights, sha256_file

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if pixels and (protocol == "finetune" or from_scratch):
        raise ConfigError("--pixels: the input pixels have no encoder to fine-tune or initialise; use it with "
                          "knn or linprobe, without --from-scratch")
    if checkpoint is None and not (from_scratch or pixels):
        raise ConfigError("give --checkpoint (or --from-scratch for a random initialisation, --pixels for the "
                          "input pixels)")
    if grid is not None and protocol != "knn":
        raise ConfigError("--grid: only the k-NN has a grid (k and temperature); drop it or use `eval knn`")
    if grid is not None and (min(grid[0]) < 1 or min(grid[1]) <= 0):
        raise ConfigError(f"--grid: every k must be >= 1 and every temperature > 0, got --ks {grid[0]} "
                          f"--temperatures {grid[1]}")
    setup_logging()
    w = read_weights(checkpoint, weights) if checkpoint is not None else None  # read once
    cfg = resolve_config(w.config if w else None, config, overrides, checkpoint)
    if grid is not None and cfg.eval.split == "test":
        raise ConfigError("--grid chooses k-NN settings, which the test split must not do: add eval.split=val "
                          "(with data.val_fraction > 0), then score the chosen eval.knn_k/eval.knn_temperature on test")
    log.info("%s: the reported number is on the %s split (eval.split, from %s)%s", protocol, cfg.eval.split,
             split_origin(overrides, config, checkpoint),
             "" if cfg.eval.split == "test" else "; eval.split=test gives the number to publish")
    if out is None:
        if checkpoint is None:
            raise ConfigError("--out is required without --checkpoint")
        ckpt = Path(checkpoint)
        out = ckpt if ckpt.is_dir() else ckpt.parent
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if w is not None and w.arch["in_chans"] != cfg.model.in_chans:
        raise ConfigError(f"model.in_chans is {cfg.model.in_chans} but {checkpoint} was trained on "
                          f"{w.arch['in_chans']}-channel images; set model.in_chans={w.arch['in_chans']}")
    if from_scratch or pixels:
        w = None  # the checkpoint only lent its config
    device = pick_device(cfg.train.device)
    sha = None if checkpoint is None or from_scratch or pixels else sha256_file(checkpoint)
    t0 = time.perf_counter()
    if protocol == "finetune":
        from mimkit.eval.common import labelled_dataset, num_classes_of
        from mimkit.eval.finetune import build_classifier, run_finetune

        num_classes = num_classes_of(labelled_dataset(cfg, "train", transform=lambda x: x))
        model = build_classifier(cfg, num_classes, w)
        # progress is saved beside the result; the same command again continues it
        stem = result_path(out, protocol, from_scratch, cfg)
        state = stem.with_suffix(".state.pt")
        result = run_finetune(model, cfg, device, state_path=state, classifier_out=stem.with_suffix(""),
                              source=None if sha is None else f"{sha} ({weights})")
    else:
        from mimkit.eval.common import InputPixels

        encoder = InputPixels() if pixels else _encoder_for_features(cfg, w)
        if protocol == "knn":
            from mimkit.eval.knn import run_knn

            result = run_knn(encoder, cfg, device, "knn", grid=grid)
            if grid is not None:
                log_grid(result["grid"], cfg.eval.split)
        else:
            from mimkit.eval.linprobe import run_linprobe

            result = run_linprobe(encoder, cfg, device)
    elapsed = time.perf_counter() - t0
    timings = dict(result.pop("timings", {}))
    timings["wall_s"] = elapsed
    record = {
        "protocol": protocol, "metric": result.pop("metric"), "value": result.pop("value"), "split": cfg.eval.split,
        "label_fraction": cfg.data.label_fraction, "from_scratch": from_scratch, "pixels": pixels,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": sha,
        "weights": weights, "details": result, "timings": timings,
        "device": f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": to_dict(cfg),
    }
    path = result_path(out, protocol, from_scratch, cfg, pixels)
    atomic_write_text(path, json.dumps(record, indent=2))
    if protocol == "finetune":
        state.unlink(missing_ok=True)  # only now: a kill before the write must not lose the run
    log.info("%s %s = %.4f (%.0f s) -> %s", protocol, record["metric"], record["value"], elapsed, path)
    return record, path
