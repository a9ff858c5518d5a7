"""Run logging: ``metrics.jsonl`` (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("mimkit")


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s mimkit %(levelname)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)


class MetricLogger:
    """Appends to ``metrics.jsonl``; on resume drops lines past the resumed step first."""

    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():  # keep exactly the history up to the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if (row := _parse(ln)) is not None and row.get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(self.path, "a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step or None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                                for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _parse(line: str) -> dict | None:
    """One metrics line, or None for a blank or cut one (a kill during the write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """One row per step, in step order. Rows of the same step are merged (a monitor adds
    ``knn_top1`` to its step) and a later row wins, so a step re-run after a resume counts once;
    a cut last line (a kill during the write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        row = _parse(line)
        if row is not None:
            rows.setdefault(row.get("step", 0), {}).update(row)
    return [rows[s] for s in sorted(rows)]
