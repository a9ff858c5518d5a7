"""The study's typed run index, ``<out>/study.json``: what ran, and every measured value.

The study writes it and the report reads it; nothing in between is encoded in strings."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class Calibration:
    """An arm's measured seconds per optimizer step, stored once so re-runs keep their step counts."""

    arm: str
    config_hash: str
    s_per_step: float
    steps_timed: int


@dataclass
class RunRecord:
    arm: str
    seed: int
    kind: str  # pretrain | scratch (random-init baseline) | pixels (baseline)
    folder: str  # relative to the study folder
    config_hash: str
    s_per_step: float  # calibrated (0 for the baselines)
    steps: int
    eval_steps: list[int] = field(default_factory=list)
    train_s: float = 0.0  # measured pre-training wall-clock (data + compute, no checkpoints)
    host: str = ""  # the processor (or GPU) it ran on
    losses: list[list[float]] = field(default_factory=list)  # [step, reconstruction loss], <= 200 points


@dataclass
class EvalRecord:
    arm: str
    seed: int
    step: int  # the pre-training step of the evaluated checkpoint (0: none)
    wall_s: float  # pre-training wall-clock at that checkpoint: steps x calibrated s/step
    protocol: str  # knn | linprobe | finetune | train_log
    metric: str  # knn_top1 | linprobe_top1 | finetune_top1 | a metrics.jsonl key
    label_fraction: float | None
    split: str  # test | train (train_log: the training batches)
    value: float
    view: str = "auto"  # auto (the evaluation weights) | student
    settings: str = ""  # digest of the settings that produced it (the evaluation cache key)
    seconds: float = 0.0  # cost of the evaluation itself


@dataclass
class StudyIndex:
    name: str = ""
    source: str = ""
    budget: float = 1.0
    budget_s: float = 0.0  # the per-arm pre-training wall-clock budget
    steps_per_epoch: int = 0
    spec: dict = field(default_factory=dict)
    base_config: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    data_sizes: dict = field(default_factory=dict)
    calibration: list[Calibration] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    finished: str = ""

    def save(self, path: str | Path) -> None:
        from mimkit.engine.checkpoint import atomic_write_text

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StudyIndex:
        d = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        out.calibration = [Calibration(**c) for c in d.get("calibration", [])]
        out.runs = [RunRecord(**r) for r in d.get("runs", [])]
        out.evals = [EvalRecord(**e) for e in d.get("evals", [])]
        return out

    # --- queries -----------------------------------------------------------------------------
    def select(self, arm: str, metric: str, label_fraction: float | None = None, view: str = "auto",
               seed: int | None = None) -> list[EvalRecord]:
        return sorted((e for e in self.evals if e.arm == arm and e.metric == metric and e.view == view
                       and (seed is None or e.seed == seed)
                       and (label_fraction is None or e.label_fraction is None
                            or abs(e.label_fraction - label_fraction) < 1e-9)),
                      key=lambda e: (e.seed, e.step))

    def final(self, arm: str, metric: str, label_fraction: float | None = None, view: str = "auto") -> list[float]:
        """One value per seed: the last evaluated point of each run (fine-tuning: its result)."""
        last: dict[int, EvalRecord] = {}
        for e in self.select(arm, metric, label_fraction, view):
            last[e.seed] = e
        return [last[s].value for s in sorted(last)]

    def curve(self, arm: str, metric: str, label_fraction: float | None = None,
              view: str = "auto") -> list[tuple[float, float, float]]:
        """``(wall_s, mean, std)`` over seeds at each evaluation point (points matched by rank)."""
        per_seed: dict[int, list[EvalRecord]] = {}
        for e in self.select(arm, metric, label_fraction, view):
            per_seed.setdefault(e.seed, []).append(e)
        n = min((len(v) for v in per_seed.values()), default=0)
        out = []
        for i in range(n):
            pts = [v[i] for v in per_seed.values()]
            vals = [p.value for p in pts]
            out.append((statistics.fmean(p.wall_s for p in pts), statistics.fmean(vals),
                        statistics.stdev(vals) if len(vals) > 1 else 0.0))
        return out

    def arms(self) -> list[str]:
        return list(dict.fromkeys(r.arm for r in self.runs))
