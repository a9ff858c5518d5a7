"""The Python API: pre-train and evaluate from a script or a notebook.

```python
import mimkit

run = mimkit.pretrain("fmnist_tiny", "runs/nb", train__max_steps=200, data={"num_workers": 0})
print(run.last_checkpoint, run.metrics[-1]["loss"])
record = mimkit.evaluate("knn", run.last_checkpoint)
print(record["metric"], record["value"])
```

Overrides are keyword arguments naming config keys: a dotted key ``train.max_steps`` is written
``train__max_steps=...`` (double underscore for the dot), or a whole section is given as a
dict (``train={"max_steps": 200}``). Values are Python values, checked like YAML ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimkit.config import Config, ConfigError, load_config, merge_into, validate


@dataclass
class Run:
    """A pre-training run: its folder, last checkpoint (None if none was written) and the rows
    of its ``metrics.jsonl`` (one dict per logged step)."""

    folder: Path
    last_checkpoint: Path | None
    metrics: list[dict]

    @classmethod
    def load(cls, folder: str | Path) -> Run:
        """The run in ``folder`` as it is on disk."""
        from mimkit.engine.checkpoint import list_checkpoints
        from mimkit.engine.logging import read_metrics

        folder = Path(folder)
        ckpts = list_checkpoints(folder)
        metrics = read_metrics(folder) if (folder / "metrics.jsonl").exists() else []
        return cls(folder, ckpts[-1][1] if ckpts else None, metrics)


def overrides_to_dict(overrides: dict[str, Any]) -> dict:
    """``{'train__max_steps': 5, 'data': {'root': 'x'}}`` → ``{'train': {'max_steps': 5},
    'data': {'root': 'x'}}`` (``__`` stands for the dot of a config key)."""
    out: dict = {}
    for key, value in copy.deepcopy(overrides).items():  # never edit the caller's dicts
        *sections, name = key.split("__")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another value given for {part!r}")
        if isinstance(value, dict) and isinstance(node.get(name), dict):
            node[name].update(value)
        else:
            node[name] = value
    return out


def _config(config_or_preset: Config | str | Path, overrides: dict[str, Any]) -> Config:
    cfg = copy.deepcopy(config_or_preset) if isinstance(config_or_preset, Config) \
        else load_config(config_or_preset)
    merge_into(cfg, overrides_to_dict(overrides))
    validate(cfg)
    return cfg


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    """Flatten nested overrides into ``key=value`` strings (what resume takes), values as YAML."""
    import yaml

    def walk(node: dict, prefix: str):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:  # one-line YAML (flow style); parse_override reads it back
                yield f"{prefix}{k}=" + yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]

    return list(walk(overrides_to_dict(overrides), ""))


def use_dataset(dataset: Any, name: str = "dataset") -> dict[str, Any]:
    """Hand a map-style data set to mimkit under ``name``; returns the overrides that select it
    (``data.name=python``, ``data.root=name``). Items are images (PIL, CHW tensors, HWC arrays)
    or ``(image, label)`` pairs; a seeded ``data.val_fraction`` of them is held out for
    reconstructions and evaluation."""
    from mimkit.data.sources import IN_PROCESS

    IN_PROCESS[name] = dataset
    return {"data": {"name": "python", "root": name}}


def pretrain(config_or_preset: Config | str | Path | None, out: str | Path, resume: bool = False,
             dataset: Any = None, **overrides: Any) -> Run:
    """Pre-train into the folder ``out`` and return the :class:`Run`.

    ``config_or_preset``: a :class:`~mimkit.config.Config`, a preset name (``mimkit config
    show --config NAME`` prints one) or a YAML file. ``resume=True`` continues the run in ``out``
    with its saved config (pass ``None`` for ``config_or_preset``; ``overrides`` still apply, e.g.
    a larger ``train__max_steps``). ``dataset``: your own map-style data set instead of
    ``data.name`` (see :func:`use_dataset`; hand it again to resume). Keyword overrides: see
    the module docstring.
    """
    from mimkit.engine.trainer import pretrain as train

    if dataset is not None:
        selected = use_dataset(dataset)
        if not resume:
            overrides = {**overrides, "data": {**overrides.get("data", {}), **selected["data"]}}
    if config_or_preset is None and not resume:
        raise ConfigError("mimkit.pretrain needs a Config, a preset name or a YAML file "
                          "(or resume=True to continue the run in out)")
    if resume:
        train(None, out, resume=True, overrides=_override_strings(overrides))
    else:
        train(_config(config_or_preset, overrides), out)
    return Run.load(out)


def evaluate(protocol: str, checkpoint: str | Path | None, config: Config | str | Path | None = None,
             out: str | Path | None = None, weights: str = "auto", *, from_scratch: bool = False,
             pixels: bool = False, grid: tuple[list[int], list[float]] | None = None, **overrides: Any) -> dict:
    """Evaluate ``checkpoint`` with ``protocol`` (``knn``, ``linprobe`` or ``finetune``) and return
    the record also written to ``eval_<protocol>.json`` (beside the checkpoint unless ``out``).

    The data and evaluation settings are the checkpoint's saved config unless ``config`` (a
    :class:`~mimkit.config.Config`, a preset or a YAML file) is given; keyword overrides as for :func:`pretrain`
    (``eval__knn_k=10``, ``data__label_fraction=0.1``). As the CLI's flags: ``from_scratch`` evaluates
    a random initialisation of the architecture (the checkpoint's, or ``config``'s with ``checkpoint=None``),
    ``pixels`` the input pixels themselves (knn, linprobe; ``checkpoint=None``), and ``grid=(ks,
    temperatures)`` also scores every k-NN setting under ``record["details"]["grid"]`` (``eval__split="val"`` only).
    """
    import tempfile

    from mimkit.config import save_config
    from mimkit.eval.run import evaluate as run_eval

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(config, Config):  # the evaluation reads presets and files: write it out
            save_config(config, Path(tmp) / "config.yaml")
            config = Path(tmp) / "config.yaml"
        record, _ = run_eval(protocol, checkpoint, config, out, from_scratch=from_scratch,
                             overrides=_override_strings(overrides), weights=weights, pixels=pixels,
                             grid=None if grid is None else (list(grid[0]), list(grid[1])))
    return record
