"""``mimkit study``: do the papers' claims hold? Pre-train every method at matched epochs and at
matched wall-clock, evaluate each (k-NN, linear probe, fine-tuning at several label fractions,
prediction consistency), add a from-scratch baseline, and record everything under one folder.

Every run lives in ``<out>/runs/<label>-<config hash>``: a finished run is never recomputed, an
interrupted one resumes from its last checkpoint, and each evaluation is cached in the run's
``study_eval.json`` under a key naming its settings. ``<out>/study.json`` indexes the runs and
holds the wall-clock calibration, so re-running the study only computes what is missing.
``mimkit report`` (:mod:`mimkit.report`) turns the folder into ``docs/RESULTS.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimkit.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    config_from_dict,
    merge_into,
    method_parts,
    parse_override,
    read_yaml,
    to_dict,
    validate,
)

log = logging.getLogger("mimkit")
STUDY_DIR = PRESET_DIR / "studies"


@dataclass
class StudyConfig:
    """The ``study:`` section of a study file; the rest of the file is each run's :class:`Config`."""

    methods: list[str] = field(default_factory=lambda: ["mae", "emae", "rcmae", "mixedae"])
    epochs: float = 1.0  # matched-epoch budget, in passes over the pre-training set
    wallclock: list[float] = field(default_factory=lambda: [1.0])  # fractions of MAE's matched-epoch time
    warmup: float = 0.25  # pre-training warm-up, as a fraction of each run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # headline comparisons
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    finetune_steps: int = 200  # per fine-tuning run, at every label fraction
    finetune_warmup: float = 0.1  # fraction of the fine-tuning steps
    consistency_images: int = 1000
    consistency_masks: int = 4


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(source: str | Path, overrides: list[str] | tuple = ()) -> tuple[StudyConfig, Config]:
    """A study preset or file (``study:`` section + a run config, which may name a ``base``)
    plus ``key=value`` overrides (``study.seeds=[0]``, ``train.batch_size=128``, ...)."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = STUDY_DIR / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"no study preset or file named '{source}'; presets: {', '.join(study_names())}")
    data = read_yaml(path)
    scfg, cfg = StudyConfig(), Config()
    merge_into(scfg, data.pop("study", {}) or {}, "study.")
    merge_into(cfg, data)
    for text in overrides:
        update = parse_override(text)
        if "study" in update:
            merge_into(scfg, update.pop("study"), "study.")
        merge_into(cfg, update)
    validate(cfg)
    validate_study(scfg)
    return scfg, cfg


def validate_study(s: StudyConfig) -> None:
    for m in s.methods:
        method_parts(m)
    if not s.methods or s.methods[0] != "mae":
        raise ConfigError("study.methods: must start with 'mae' (the reference of the wall-clock budget)")
    if s.epochs <= 0:
        raise ConfigError(f"study.epochs: must be > 0, got {s.epochs}")
    if any(f <= 0 for f in s.wallclock):
        raise ConfigError(f"study.wallclock: fractions must be > 0, got {s.wallclock}")
    if not s.seeds:
        raise ConfigError("study.seeds: give at least one seed")
    if not s.label_fractions or any(not 0 < f <= 1 for f in s.label_fractions):
        raise ConfigError(f"study.label_fractions: values in (0, 1], got {s.label_fractions}")
    if s.finetune_steps < 0:
        raise ConfigError(f"study.finetune_steps: must be >= 0 (0: no fine-tuning), got {s.finetune_steps}")
    if s.consistency_masks < 2:
        raise ConfigError(f"study.consistency_masks: must be >= 2, got {s.consistency_masks}")


# Config keys that do not change what a pre-training run computes (evaluation settings come from
# the study, bookkeeping only decides how often things are written).
NOT_PRETRAINING = ("eval", "data.num_workers", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.log_every", "train.vis_every", "train.knn_every", "train.loggers",
                   "train.grad_checkpointing", "train.strategy")


def pretraining_key(cfg: Config) -> dict:
    """The part of a config that defines a pre-training run's result."""
    d = to_dict(cfg)
    for key in NOT_PRETRAINING:
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(last, None)
    return d


def config_hash(cfg: Config) -> str:
    """A short digest of :func:`pretraining_key` (changing evaluation settings keeps the runs)."""
    text = json.dumps(pretraining_key(cfg), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def saved_config(run_dir: Path) -> Config:
    """A run folder's saved ``config.yaml``."""
    import yaml

    return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def timed_steps(run_dir: Path) -> list[tuple[dict, float, int]]:
    """``(metrics row, seconds, steps)`` of the steps each row covers, for every logged row with a speed: each
    row's images/s covers the steps since the previous row (data loading and compute, not
    checkpoints or images), so a resumed run counts only the steps it kept."""
    from mimkit.engine.logging import read_metrics

    cfg = saved_config(run_dir)
    batch = cfg.train.batch_size * cfg.train.accum_iter  # single-process runs
    out, prev = [], 0
    for row in read_metrics(run_dir):
        speed = row.get("images_per_s")
        seconds = batch * (row["step"] - prev) / speed if isinstance(speed, float) and speed > 0 else 0.0
        out.append((row, seconds, row["step"] - prev))
        prev = row["step"]
    return out


def train_seconds(run_dir: Path) -> float:
    """Pre-training wall-clock of a run, summed over its logged steps."""
    return sum(seconds for _, seconds, _ in timed_steps(run_dir))


def seconds_per_step(run_dir: Path) -> float:
    """Median seconds per optimizer step of a run (robust to the first, slower steps)."""
    times = [seconds / steps for _, seconds, steps in timed_steps(run_dir) if seconds > 0]
    if not times:
        raise RuntimeError(f"{run_dir}: no timed steps in metrics.jsonl")
    return statistics.median(times)


def settings_tag(obj) -> str:
    """A short digest of a settings dataclass, to key cached evaluations."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(obj), sort_keys=True).encode()).hexdigest()[:6]


class Study:
    """Runs (or resumes) a study into ``out``; :meth:`run` does everything in priority order."""

    def __init__(self, scfg: StudyConfig, base: Config, out: str | Path, budget: float = 1.0,
                 source: str = "") -> None:
        if budget <= 0:
            raise ConfigError(f"--budget must be > 0, got {budget}")
        self.s, self.base, self.budget, self.source = scfg, base, budget, source
        self.out = Path(out)
        self.index_path = self.out / "study.json"
        self.index = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        self.index.setdefault("runs", {})
        self.index.setdefault("calibration", {})
        self.device = None
        self._datasets: dict = {}

    # --- bookkeeping -------------------------------------------------------------------------
    def _save_index(self) -> None:
        from mimkit.engine.checkpoint import atomic_write_text

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.index_path, json.dumps(self.index, indent=2))

    def split_size(self, split: str) -> int:
        from mimkit.data import dataset_from_config

        return len(dataset_from_config(self.base, split))

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        return max(1, self.split_size("train") // (self.base.train.batch_size * self.base.train.accum_iter))

    def run_config(self, method: str, seed: int, steps: int) -> Config:
        cfg = copy.deepcopy(self.base)
        cfg.method, cfg.train.seed, cfg.train.max_steps = method, seed, steps
        cfg.train.warmup_epochs = self.s.warmup * steps / self.steps_per_epoch
        cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, max(1, steps))
        cfg.train.knn_every = 0
        validate(cfg)
        return cfg

    def find_run(self, cfg: Config) -> Path:
        """The folder of ``cfg``'s pre-training run: named by method, seed and config hash (two
        budgets that come out equal share a run); a folder of the same method and seed whose saved
        config has the same pre-training settings is reused whatever its name."""
        run = self.out / "runs" / f"{cfg.method}-s{cfg.train.seed}-{config_hash(cfg)}"
        if run.exists():
            return run
        key = pretraining_key(cfg)
        for other in sorted((self.out / "runs").glob(f"{cfg.method}-s{cfg.train.seed}-*")):
            saved = other / "config.yaml"
            if saved.exists() and pretraining_key(saved_config(other)) == key:
                return other
        return run

    def eval_config(self, run: Path) -> Config:
        """The run's saved config with the study's evaluation settings."""
        cfg = saved_config(run)
        cfg.eval = copy.deepcopy(self.base.eval)
        return cfg

    # --- pre-training ------------------------------------------------------------------------
    def pretrain(self, label: str, cfg: Config, budget_kind: str, budget_value: float) -> Path:
        from mimkit.engine.checkpoint import list_checkpoints
        from mimkit.engine.trainer import pretrain

        run = self.find_run(cfg)
        done = run / "done.json"
        if not done.exists():
            t0 = time.perf_counter()
            ckpts = list_checkpoints(run)
            if ckpts:
                log.info("study: resuming %s", run.name)
                pretrain(None, run, resume=True)
            else:
                log.info("study: pre-training %s (%s, seed %d, %d steps)", run.name, cfg.method,
                         cfg.train.seed, cfg.train.max_steps)
                pretrain(cfg, run)
            from mimkit.engine.checkpoint import atomic_write_text

            atomic_write_text(done, json.dumps({
                "train_s": train_seconds(run), "s_per_step": seconds_per_step(run),
                "last_call_elapsed_s": time.perf_counter() - t0, "steps": cfg.train.max_steps,
            }, indent=2))
        self.index["runs"][label] = {
            "method": cfg.method, "seed": cfg.train.seed, "steps": cfg.train.max_steps,
            "budget": budget_kind, "budget_value": budget_value, "dir": f"runs/{run.name}",
            "pretrained": True, **json.loads(done.read_text()),
        }
        self._save_index()
        return run

    def scratch(self, seed: int) -> Path:
        cfg = copy.deepcopy(self.base)
        cfg.train.seed = seed
        run = self.out / "runs" / f"scratch-s{seed}-{config_hash(cfg)}"
        run.mkdir(parents=True, exist_ok=True)
        self.index["runs"][f"scratch-s{seed}"] = {"method": "scratch", "seed": seed,
                                        "steps": 0, "budget": "none", "budget_value": 0.0,
                                        "dir": f"runs/{run.name}", "pretrained": False, "train_s": 0.0}
        self._save_index()
        return run

    # --- evaluation --------------------------------------------------------------------------
    def _cached(self, run: Path, key: str, fn) -> dict:
        from mimkit.engine.checkpoint import atomic_write_text

        path = run / "study_eval.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        if key not in results:
            t0 = time.perf_counter()
            value = fn()
            value["wall_s"] = time.perf_counter() - t0
            results = json.loads(path.read_text()) if path.exists() else {}
            results[key] = value
            atomic_write_text(path, json.dumps(results, indent=2))
            log.info("study: %s %s = %s", run.name, key, value.get("value"))
        return results[key]

    def _checkpoint(self, run: Path) -> Path:
        from mimkit.engine.checkpoint import list_checkpoints

        return list_checkpoints(run)[-1][1]

    def frozen_evals(self, run: Path) -> None:
        """k-NN and linear probe at every label fraction from one feature extraction, and the
        prediction-consistency metric; for teacher methods (RC-MAE) of both the teacher (the
        default evaluation weights) and the student, under keys prefixed ``student_``."""
        cfg = self.eval_config(run)
        self._frozen_evals(run, cfg, "auto", "")
        if "rcmae" in method_parts(cfg.method):
            self._frozen_evals(run, cfg, "student", "student_")

    def _frozen_evals(self, run: Path, cfg: Config, weights: str, prefix: str) -> None:
        probe_tag = settings_tag(cfg.eval.linprobe)
        fractions = self.s.label_fractions
        keys = [f"{prefix}knn_lf{f:g}" for f in fractions]
        keys += [f"{prefix}linprobe_lf{f:g}_{probe_tag}" for f in fractions]
        stored = run / "study_eval.json"
        have = json.loads(stored.read_text()) if stored.exists() else {}
        feats = None if all(k in have for k in keys) else self._features(run, cfg, weights)
        for f in fractions:
            self._cached(run, f"{prefix}knn_lf{f:g}", lambda f=f: self._knn(feats, cfg, f))
            self._cached(run, f"{prefix}linprobe_lf{f:g}_{probe_tag}", lambda f=f: self._probe(feats, cfg, f))
        n, r = self.s.consistency_images, self.s.consistency_masks
        self._cached(run, f"{prefix}consistency_n{n}_r{r}", lambda: self._consistency(run, cfg, n, r, weights))

    def _features(self, run: Path, cfg: Config, weights: str = "auto") -> dict:
        from torch.utils.data import DataLoader

        import mimkit
        from mimkit.eval.knn import eval_dataset, extract_features

        model = mimkit.load_model(self._checkpoint(run), weights=weights).to(self.device)
        kw = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
        out = {}
        for split in ("train", "test"):
            loader = DataLoader(eval_dataset(cfg, split), **kw)
            out[split] = extract_features(model, loader, self.device, "both", f"{split} features", normalize=False)
        out["dim"] = out["train"][0].shape[1] // 2  # [cls, mean of patches]
        return out

    def _subset(self, labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
        from mimkit.eval.common import class_balanced_indices

        if fraction >= 1.0:
            return torch.arange(len(labels))
        return torch.tensor(class_balanced_indices(labels.numpy(), fraction, seed))

    def _knn(self, feats: dict, cfg: Config, fraction: float) -> dict:
        import torch.nn.functional as F

        from mimkit.eval.knn import knn_accuracy

        d = feats["dim"]

        def prep(x: torch.Tensor) -> torch.Tensor:  # the `both` k-NN feature (METHODS §1)
            parts = {"cls": [x[:, :d]], "mean": [x[:, d:]], "both": [x[:, :d], x[:, d:]]}[cfg.eval.feature]
            return F.normalize(torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1), dim=-1)

        (ftr, ltr), (fte, lte) = feats["train"], feats["test"]
        idx = self._subset(ltr, fraction, cfg.train.seed)
        acc = knn_accuracy(prep(ftr[idx]), ltr[idx], prep(fte), lte, k=cfg.eval.knn_k,
                           temperature=cfg.eval.knn_temperature, num_classes=int(ltr.max()) + 1)
        return {"metric": "knn_top1", "value": acc, "bank_size": len(idx), "test_size": len(lte),
                "feature": cfg.eval.feature, "k": cfg.eval.knn_k}

    def _probe(self, feats: dict, cfg: Config, fraction: float) -> dict:
        from mimkit.eval.linprobe import head_accuracy, train_head_on_features

        d, p = feats["dim"], cfg.eval.linprobe
        cols = {"cls": slice(0, d), "mean": slice(d, 2 * d), "both": slice(0, 2 * d)}[p.feature]
        (ftr, ltr), (fte, lte) = feats["train"], feats["test"]
        idx = self._subset(ltr, fraction, cfg.train.seed)
        head, stats = train_head_on_features(ftr[idx][:, cols], ltr[idx], int(ltr.max()) + 1, p,
                                             cfg.train.seed, self.device)
        return {"metric": "linprobe_top1", "value": head_accuracy(head, fte[:, cols], lte),
                "train_size": len(idx), "feature": p.feature, **stats}

    def _consistency(self, run: Path, cfg: Config, n: int, r: int, weights: str = "auto") -> dict:
        import mimkit
        from mimkit.eval.consistency import prediction_consistency
        from mimkit.eval.knn import eval_dataset

        model = mimkit.load_model(self._checkpoint(run), weights=weights).to(self.device)
        ds = eval_dataset(cfg, "test", max_samples=n, seed=0)
        imgs = torch.stack([ds[i][0] for i in range(len(ds))])
        res = prediction_consistency(model, imgs, num_masks=r, seed=0, batch_size=cfg.eval.batch_size)
        return {"metric": "pairwise_mse", "value": res["pairwise_mse"], **res}

    def finetune(self, run: Path, fraction: float, seed: int, pretrained: bool = True) -> dict:
        """Fine-tune the run's encoder (or a fresh one for a scratch run) on ``fraction`` of the labels
        for ``study.finetune_steps`` steps (warm-up a fixed fraction of them)."""
        steps = max(1, round(self.s.finetune_steps * self.budget))
        cfg = self.eval_config(run) if pretrained else copy.deepcopy(self.base)
        cfg.train.seed = seed
        cfg.data.label_fraction = fraction
        f = cfg.eval.finetune
        n_labels = self._num_labels(cfg, fraction)
        batch = min(f.batch_size, n_labels)
        steps_per_epoch = max(1, n_labels // batch // f.accum_iter)
        f.max_steps, f.warmup_epochs, f.eval_every = steps, self.s.finetune_warmup * steps / steps_per_epoch, 0
        tag = settings_tag(f)

        def go() -> dict:
            from mimkit.eval.finetune import build_classifier, run_finetune

            source = self._checkpoint(run) if pretrained else None
            model = build_classifier(cfg, 10 if cfg.data.name != "cifar100" else 100, source)
            res = run_finetune(model, cfg, self.device)
            res.pop("history", None)
            return res

        return self._cached(run, f"finetune_lf{fraction:g}_s{steps}_{tag}", go)

    def _num_labels(self, cfg: Config, fraction: float) -> int:
        from mimkit.eval.common import dataset_labels
        from mimkit.eval.knn import eval_dataset

        key = (cfg.data.name, cfg.data.root)
        if key not in self._datasets:
            self._datasets[key] = dataset_labels(eval_dataset(cfg, "train"))
        labels = self._datasets[key]
        return len(labels) if fraction >= 1 else len(self._subset(torch.as_tensor(labels), fraction, cfg.train.seed))

    def _epochs_run(self, method: str, seed: int) -> Path:
        """Pre-train ``method`` for the matched-epoch budget, then its frozen evaluations."""
        budget = self.s.epochs * self.budget
        run = self.pretrain(f"{method}-epochs-s{seed}", self.run_config(method, seed, self.epoch_steps),
                            "epochs", budget)
        self.frozen_evals(run)
        return run

    def _time_run(self, method: str, seed: int, frac: float) -> Path:
        """Pre-train ``method`` for ``frac`` x MAE's matched-epoch time (calibrated step count)."""
        steps = max(1, round(frac * self.cal["reference_s"] / self.cal["s_per_step"][method]))
        run = self.pretrain(f"{method}-time{frac:g}-s{seed}", self.run_config(method, seed, steps),
                            "wallclock", frac * self.cal["reference_s"])
        self.frozen_evals(run)
        return run

    # --- the plan ----------------------------------------------------------------------------
    def run(self) -> Path:
        """Everything, most important first: matched-epoch runs (seed 0) and their frozen
        evaluations; wall-clock calibration and matched-wall-clock runs; extra seeds of the
        headline pair (MAE at matched epochs, EMAE at matched wall-clock); fine-tuning."""
        from mimkit.engine.distributed import pick_device
        from mimkit.engine.logging import setup_logging

        setup_logging()
        self.device = pick_device(self.base.train.device)
        s, seed0 = self.s, self.s.seeds[0]
        spe = self.steps_per_epoch
        epoch_steps = max(1, round(s.epochs * spe * self.budget))
        self.index.update(
            study=dataclasses.asdict(s), budget=self.budget, source=self.source, steps_per_epoch=spe,
            base_config=to_dict(self.base), environment=environment(self.device),
            data_sizes={split: self.split_size(split) for split in ("train", "test")},
        )
        t_start = time.perf_counter()
        self.epoch_steps = epoch_steps
        matched = {m: self._epochs_run(m, seed0) for m in s.methods}
        # Wall-clock calibration: each method's median seconds/step from its matched-epoch run,
        # stored once so that re-running the study reproduces the same step counts.
        cal = self.index["calibration"]
        if str(epoch_steps) not in cal:
            per_step = {m: json.loads((matched[m] / "done.json").read_text())["s_per_step"] for m in s.methods}
            cal[str(epoch_steps)] = {"reference_s": epoch_steps * per_step["mae"], "s_per_step": per_step,
                                     "relative_cost": {m: per_step[m] / per_step["mae"] for m in s.methods}}
            self._save_index()
        self.cal = cal[str(epoch_steps)]
        for frac in s.wallclock:
            for m in s.methods:
                self._time_run(m, seed0, frac)
        # Headline: MAE (matched epochs) vs EMAE (matched wall-clock) over every seed.
        seeded: dict[tuple[str, int], Path] = {}
        for seed in s.seeds:
            seeded["mae", seed] = self._epochs_run("mae", seed)
            if "emae" in s.methods:
                seeded["emae", seed] = self._time_run("emae", seed, max(s.wallclock))
        if s.finetune_steps:
            low = min(s.label_fractions)
            for m in s.methods:
                for frac in s.label_fractions:
                    self.finetune(matched[m], frac, seed0)
            for frac in s.label_fractions:
                self.finetune(self.scratch(seed0), frac, seed0, pretrained=False)
            for seed in s.seeds:
                for (_, sd), run in seeded.items():
                    if sd == seed:
                        self.finetune(run, low, seed)
                self.finetune(self.scratch(seed), low, seed, pretrained=False)
        self.index["study_wall_s_last_call"] = time.perf_counter() - t_start
        self.index["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self._save_index()
        log.info("study finished: %s (write the report with `mimkit report --study %s`)", self.index_path, self.out)
        return self.index_path


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the report."""
    import timm

    import mimkit

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "mimkit": getattr(mimkit, "__version__", "?"), "platform": platform.platform(),
           "cpu": _cpu_name(), "cpu_count": __import__("os").cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_study(config: str | Path = "fmnist_study", out: str | Path = "runs/study", budget: float = 1.0,
              overrides: list[str] | tuple = ()) -> Path:
    """Run (or resume) a study; returns the path of its ``study.json``."""
    scfg, base = load_study(config, overrides)
    return Study(scfg, base, out, budget, source=f"{config} {' '.join(overrides)}".strip()).run()
