"""Run logging: ``metrics.jsonl`` (one object per logged step) plus the ``train.loggers`` backends.

Backends: ``tensorboard`` (scalars, the config as hparams, reconstruction images; under
``RUN/tb``), ``wandb`` and ``mlflow`` (optional extras: ``pip install 'mimkit[wandb]'`` /
``'mimkit[mlflow]'``). Each gets the scalars of every logged step, the flattened config at the
start, and the reconstruction images. ``metrics.jsonl`` is always written: it is the record
that resume, reports and ``mimkit.Run.metrics`` read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from mimkit.config import ConfigError, Logger, choices, flat_dict
from mimkit.errors import RunError

log = logging.getLogger("mimkit")
LOGGERS = choices(Logger)
_EXTRA = {"wandb": "wandb", "mlflow": "mlflow"}  # backend -> module (and pip extra) it needs


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made: a redirected or replaced stderr (notebooks, capture) never receives a closed stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """mimkit's log lines on stderr (once per process), at ``level``."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mimkit %(levelname)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)


def _as_array(image):
    """An HWC uint8 array from a file path or an array (HWC, or HW for grayscale)."""
    import numpy as np

    if isinstance(image, str | Path):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    arr = np.asarray(image)
    return arr[..., None] if arr.ndim == 2 else arr


class TensorBoardBackend:
    """``RUN/tb``: scalars, the config in the HParams tab, images."""

    def __init__(self, run_dir: Path, start_step: int, hparams: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        if hparams:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run (add_hparams would start a sub-run); 'loss' links the table
            # to the loss curve.
            for summary in hparams_summary(hparams, {"loss": float("nan")}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, step: int, name: str, image, path: Path | None) -> None:
        self.writer.add_image(name, _as_array(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A Weights & Biases run (project ``$WANDB_PROJECT`` or ``mimkit``; ``WANDB_MODE=offline``
    works without a network). The run id is kept in ``RUN/wandb-id`` so a resumed run continues
    the same W&B run."""

    def __init__(self, run_dir: Path, start_step: int, hparams: dict[str, Any] | None) -> None:
        import wandb

        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: W&B picks one
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mimkit"), name=run_dir.name,
                              id=run_id, resume="allow", dir=str(run_dir), config=hparams or {})
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_image(self, step: int, name: str, image, path: Path | None) -> None:
        self.run.log({name: self.wandb.Image(str(path) if path is not None else _as_array(image))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``mimkit``) on
    MLflow's tracking URI (``$MLFLOW_TRACKING_URI``); the config as params, images as artifacts.
    The run id is kept in ``RUN/mlflow-id`` so a resumed run continues the same MLflow run."""

    def __init__(self, run_dir: Path, start_step: int, hparams: dict[str, Any] | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient()
        id_file = run_dir / "mlflow-id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimkit")
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        self.run_id = client.create_run(exp_id, run_name=run_dir.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [Param(k, str(v)) for k, v in (hparams or {}).items()]
        for i in range(0, len(params), 100):  # MLflow's per-request limit on params
            client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_image(self, step: int, name: str, image, path: Path | None) -> None:
        if path is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path=name)
        else:
            self.client.log_image(self.run_id, _as_array(image), artifact_file=f"{name}/{step:08d}.png")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "mlflow": MlflowBackend}


def check_loggers(names: list[str]) -> None:
    """Known names whose package is installed, else a :class:`ConfigError` naming the fix."""
    import importlib.util

    for name in names:
        if name not in _BACKENDS:
            raise ConfigError(f"train.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        module = _EXTRA.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers: {name!r} needs the {module} package: "
                              f"pip install 'mimkit[{name}]' (or drop it from train.loggers)")


def _repair(path: Path, start_step: int) -> None:
    """Keep the rows up to ``start_step``; drop a last line cut by a kill during its write."""
    from mimkit.engine.checkpoint import atomic_write_text

    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping an unreadable line %d (%s...)%s", path, i + 1, line[:40],
                        " cut by a stop during its write" if i == len(lines) - 1 else "")
            continue
        if row.get("step", 0) <= start_step:
            kept.append(line)
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


class MetricLogger:
    """Appends to ``metrics.jsonl`` and forwards to the backends in ``loggers``.

    On resume (``start_step``) the file first keeps exactly the history up to the checkpoint we
    resume from, and a cut last line is dropped. ``loggers`` defaults to ``cfg.train.loggers``
    when ``cfg`` is given, else TensorBoard (``tensorboard=False``: none). ``cfg`` also gives the
    hparams (the flattened config) logged at the start.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True,
                 cfg: Any | None = None, loggers: list[str] | None = None) -> None:
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            _repair(self.path, start_step)
        if loggers is None:
            loggers = list(cfg.train.loggers) if cfg is not None else (["tensorboard"] if tensorboard else [])
        check_loggers(loggers)
        hparams = None
        if cfg is not None:
            from mimkit.config import to_dict

            # hparams tables take scalars: lists and None become strings
            hparams = {k: v if isinstance(v, bool | int | float | str) else str(v)
                       for k, v in flat_dict(to_dict(cfg)).items()}
        self.file = open(self.path, "a")
        self.backends = [_BACKENDS[name](run_dir, start_step, hparams) for name in dict.fromkeys(loggers)]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                                for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for backend in self.backends:
            backend.log(step, scalars)

    def log_image(self, step: int, name: str, path_or_array) -> None:
        """Send an image (a PNG path, or an HWC / HW uint8 array) to every backend."""
        path = Path(path_or_array) if isinstance(path_or_array, str | Path) else None
        for backend in self.backends:
            backend.log_image(step, name, path_or_array, path)

    def close(self) -> None:
        self.file.close()
        for backend in self.backends:
            backend.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``RUN/metrics.jsonl``, one per step in step order. Rows of one step are merged,
    a later value winning (a monitor adds ``knn_top1`` to its step; a step re-run after a resume
    counts once); a cut last line (a run stopped mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise RunError(f"{path}: line {i + 1} is not JSON ({line[:40]}...); the file was edited or "
                           "damaged: delete that line") from None
        rows.setdefault(row.get("step", 0), {}).update(row)
    return [rows[s] for s in sorted(rows)]
