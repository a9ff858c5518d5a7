"""The study file: ``study:`` (arms, budgets, evaluation points, fine-tuning jobs, claims) plus a
run config (which may name a ``base`` preset) that every arm starts from."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mimkit.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    _deep_update,
    merge_into,
    parse_override,
    read_yaml,
    validate,
)
from mimkit.objectives import parse_method

STUDY_DIR = PRESET_DIR / "studies"
FROZEN = ("knn_top1", "linprobe_top1")  # evaluated at every point along a run, on cached features
RULES = ("difference", "time_to_reference", "threshold")
BASELINES = ("random", "pixels")


@dataclass
class Arm:
    """One line of the study: a name and the overrides that turn the base config into its runs."""

    name: str = ""
    title: str = ""  # shown in the report; default: the name
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain: bool = True  # False: a baseline, evaluated once (no pre-training, no curve)
    # A baseline's encoder: random (the from-scratch baseline: k-NN and probe of its random
    # initialisation, and fine-tuning from it) | pixels (k-NN and probe on the input pixels themselves)
    baseline: str = "random"
    quick: bool = True  # False: left out of a quick look (--budget < 1)

    @property
    def finetunes(self) -> bool:
        """Whether fine-tuning jobs apply (not to the pixels)."""
        return self.pretrain or self.baseline == "random"


@dataclass
class FinetuneJob:
    """Fine-tune the last checkpoint of ``arms`` (default: all) on ``label_fraction`` of the labels."""

    label_fraction: float = 0.01
    arms: list[str] | None = None
    seeds: list[int] | None = None  # None: each arm's seeds
    overrides: list[str] = field(default_factory=list)  # eval.finetune.* changes for this job only
    quick: bool = True  # False: left out of a quick look (--budget < 1)


@dataclass
class Claim:
    """A paper's claim and the rule that decides it (see :mod:`mimkit.study.verdicts`).

    Accuracies are fractions (``at_least: 0.05`` is +5 points). ``difference``: mean over seeds of
    ``arm`` minus ``reference`` at the end of the runs; ``time_to_reference``: wall-clock at which
    ``arm``'s curve first reaches ``reference``'s final value, over ``reference``'s total time;
    ``threshold``: ``arm``'s final value (e.g. ``acc_homologous`` from the metrics log)."""

    name: str = ""
    rule: str = "difference"
    arm: str = ""
    reference: str = ""
    metric: str = "knn_top1"  # knn_top1 | linprobe_top1 | finetune_top1 | a metrics.jsonl key
    label_fraction: float = 1.0
    view: str = "auto"  # auto (the evaluation weights, e.g. RC-MAE's teacher) | student
    reference_view: str = "auto"
    at_least: float | None = None
    at_most: float | None = None
    tolerance: float = 0.0  # noise stand-in for a difference measured with a single seed
    paper: str = ""


@dataclass
class StudySpec:
    name: str = ""  # default: the file's stem; names the default output folder
    reference: str = "mae"  # the arm that sets the wall-clock budget and the reference quality
    budget_epochs: float = 8.0  # wall-clock per arm: this many epochs of the reference arm
    calibration_steps: int = 20  # timed steps per arm, once (the first 2 are dropped)
    warmup: float = 0.1  # pre-training warm-up, a fraction of each run
    eval_fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 0.75, 1.0])
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 1.0])  # frozen evaluations
    quick_eval_fractions: list[float] | None = None  # a quick look's evaluation points (default: eval_fractions)
    arms: list[Arm] = field(default_factory=list)
    finetune: list[FinetuneJob] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def quick_look(self) -> StudySpec:
        """The study a budget below 1 runs: the arms and fine-tuning jobs not marked ``quick: false``
        and ``quick_eval_fractions``. Claims stay; one on a left-out arm or job reads "not measured"."""
        out = copy.deepcopy(self)
        out.arms = [a for a in out.arms if a.quick]
        kept = {a.name for a in out.arms}
        out.finetune = [j for j in out.finetune if j.quick and (j.arms is None or kept & set(j.arms))]
        for j in out.finetune:
            j.arms = None if j.arms is None else [a for a in j.arms if a in kept]
        if out.quick_eval_fractions is not None:
            out.eval_fractions = list(out.quick_eval_fractions)
        return out


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def _items(cls, raw, key: str) -> list:
    if not isinstance(raw, list):
        raise ConfigError(f"{key}: expected a list of mappings, got {raw!r}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{key}[{i}]: expected a mapping, got {item!r}")
        obj = cls()
        merge_into(obj, item, f"{key}[{i}].")
        out.append(obj)
    return out


def spec_from_dict(raw: dict, name: str = "") -> StudySpec:
    raw = copy.deepcopy(raw)
    lists = {k: raw.pop(k, []) or [] for k in ("arms", "finetune", "claims")}
    spec = StudySpec(name=name)
    merge_into(spec, raw, "study.")
    spec.arms = _items(Arm, lists["arms"], "study.arms")
    spec.finetune = _items(FinetuneJob, lists["finetune"], "study.finetune")
    spec.claims = _items(Claim, lists["claims"], "study.claims")
    return spec


def load_study(source: str | Path, overrides: list[str] | tuple = ()) -> tuple[StudySpec, Config]:
    """A study preset or file plus ``key=value`` overrides (``study.budget_epochs=4``,
    ``train.batch_size=128``); the arms' configs are built and validated here."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = STUDY_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"no study preset or file named '{source}'; presets: {', '.join(study_names())}")
    data = read_yaml(path)
    raw, base = data.pop("study", {}) or {}, Config()
    merge_into(base, data)
    for text in overrides:
        update = parse_override(text)
        if "study" in update:
            raw = _deep_update(raw, update.pop("study"))
        merge_into(base, update)
    validate(base)
    spec = spec_from_dict(raw, path.stem)
    validate_spec(spec, base)
    return spec, base


def arm_config(base: Config, arm: Arm, extra: list[str] | tuple = ()) -> Config:
    """``base`` with the arm's overrides (and ``extra``), validated."""
    cfg = copy.deepcopy(base)
    for text in [*arm.overrides, *extra]:
        merge_into(cfg, parse_override(text))
    validate(cfg)
    return cfg


def validate_spec(s: StudySpec, base: Config) -> None:
    names = [a.name for a in s.arms]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"study.arms: give each arm a unique name, got {names}")
    for a in s.arms:
        if not a.seeds:
            raise ConfigError(f"study.arms: arm '{a.name}' has no seeds")
        if a.baseline not in BASELINES or (a.pretrain and a.baseline != "random"):
            raise ConfigError(f"study.arms '{a.name}': baseline must be one of {', '.join(BASELINES)}, on an arm "
                              f"with pretrain: false; got '{a.baseline}'")
        try:
            parse_method(arm_config(base, a).method)
        except ConfigError as e:
            raise ConfigError(f"study.arms '{a.name}': {e}") from None

    def known(arm: str, key: str) -> None:
        if arm not in names:
            raise ConfigError(f"{key}: no arm named '{arm}'; arms: {', '.join(names)}")

    known(s.reference, "study.reference")
    if not s.arm(s.reference).pretrain or not s.arm(s.reference).quick:
        raise ConfigError("study.reference: must be a pre-training arm, in the quick look too")
    if s.budget_epochs <= 0 or s.calibration_steps < 3:
        raise ConfigError("study.budget_epochs must be > 0 and study.calibration_steps >= 3")
    fractions = [("eval_fractions", s.eval_fractions), ("label_fractions", s.label_fractions)]
    if s.quick_eval_fractions is not None:
        fractions.append(("quick_eval_fractions", s.quick_eval_fractions))
    for key, values in fractions:
        if not values or any(not 0 < f <= 1 for f in values):
            raise ConfigError(f"study.{key}: values in (0, 1], got {values}")
    for job in s.finetune:
        for a in job.arms or []:
            known(a, "study.finetune.arms")
            if not s.arm(a).finetunes:
                raise ConfigError(f"study.finetune.arms: '{a}' is the pixels baseline, which has no encoder "
                                  "to fine-tune; remove it from the job")
        if not 0 < job.label_fraction <= 1:
            raise ConfigError(f"study.finetune.label_fraction: in (0, 1], got {job.label_fraction}")
    for c in s.claims:
        if c.rule not in RULES:
            raise ConfigError(f"study.claims '{c.name}': rule must be one of {', '.join(RULES)}, got '{c.rule}'")
        known(c.arm, f"study.claims '{c.name}'.arm")
        if c.rule != "threshold":
            known(c.reference, f"study.claims '{c.name}'.reference")
        if c.at_least is None and c.at_most is None:
            raise ConfigError(f"study.claims '{c.name}': give at_least or at_most")
        if c.rule == "time_to_reference" and c.metric not in FROZEN:
            raise ConfigError(f"study.claims '{c.name}': time_to_reference needs a curve ({', '.join(FROZEN)})")
        if c.rule == "time_to_reference" and not (s.arm(c.arm).pretrain and s.arm(c.reference).pretrain):
            raise ConfigError(f"study.claims '{c.name}': time_to_reference compares pre-training curves; a "
                              "baseline (pretrain: false) has none")
        if c.metric == "finetune_top1" and any(not s.arm(a).finetunes for a in (c.arm, c.reference) if a):
            raise ConfigError(f"study.claims '{c.name}': the pixels baseline is never fine-tuned")
