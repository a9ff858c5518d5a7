"""``mimkit study``: every arm gets the same pre-training wall-clock, is evaluated at points along
its run (k-NN and linear probe on cached features), and is fine-tuned at the end.

Runs live in ``<out>/runs/<arm>-s<seed>-<config hash>``: a finished run (``done.json``) is never
recomputed, an interrupted one resumes from its checkpoint, and evaluations are cached in the run's
``study_evals.json`` under their settings. ``<out>/study.json`` is the typed index the report reads.

The index alone is enough to resume: copied into an empty folder (``mimkit report`` keeps a copy
beside ``RESULTS.md``), its finished runs and their evaluations are reused, not recomputed, so a
study can continue on another machine without the checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from mimkit.config import Config, ConfigError, config_from_dict, flat_dict, to_dict, validate
from mimkit.engine.summary import cpu_name
from mimkit.study.index import Calibration, EvalRecord, RunRecord, StudyIndex
from mimkit.study.spec import Arm, FinetuneJob, StudySpec, arm_config, load_study

log = logging.getLogger("mimkit")

# Config keys that do not change what a pre-training run computes.
NOT_PRETRAINING = ("eval", "data.num_workers", "train.checkpoint_every", "train.keep_checkpoints",
                   "train.log_every", "train.vis_every", "train.knn_every", "train.loggers",
                   "train.grad_checkpointing", "train.strategy")


def pretraining_key(cfg: Config) -> dict:
    """The part of a config that defines a pre-training run's result: the keys that differ from
    mimkit's defaults, less :data:`NOT_PRETRAINING`. Only non-defaults count, so a key added to
    mimkit later (with its default) keeps every cached run."""
    defaults = flat_dict(to_dict(Config()))
    return {k: v for k, v in flat_dict(to_dict(cfg)).items()
            if not k.startswith(NOT_PRETRAINING) and (k not in defaults or defaults[k] != v)}


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def config_hash(cfg: Config) -> str:
    """A short digest of :func:`pretraining_key` (changing evaluation settings keeps the runs)."""
    return digest(pretraining_key(cfg))


def saved_config(run_dir: Path) -> Config:
    """A run folder's saved ``config.yaml``."""
    import yaml

    return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def timed_steps(run_dir: Path) -> list[tuple[dict, float, int]]:
    """``(metrics row, seconds, steps)`` for every logged row: each row's images/s covers the steps
    since the previous row (data and compute, not checkpoints or side work), so a resumed run
    counts only the steps it kept."""
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


def default_out(name: str) -> Path:
    """``$MIMKIT_CACHE/study/<name>`` (default ``~/.cache/mimkit``): outside any checkout."""
    from mimkit.data import cache_dir

    return cache_dir() / "study" / name


class Study:
    """Runs (or resumes) a study into ``out``; :meth:`run` does everything, seed by seed."""

    def __init__(self, spec: StudySpec, base: Config, out: str | Path, budget: float = 1.0, source: str = "") -> None:
        if budget <= 0:
            raise ConfigError(f"--budget must be > 0, got {budget}")
        self.spec = spec.quick_look() if budget < 1 else spec  # the index keeps the whole file's
        self.base, self.budget, self.out = base, budget, Path(out)
        self.path = self.out / "study.json"
        try:
            old = StudyIndex.load(self.path) if self.path.exists() else StudyIndex()
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"{self.path} is not a study index of this version; choose another --out") from None
        self.index = StudyIndex(name=spec.name, source=source, budget=budget, spec=spec.to_dict(),
                                base_config=to_dict(base), calibration=old.calibration)
        self.previous = old  # its runs' results are reused where their folders are gone
        self.kept: set[tuple[str, int]] = set()  # (arm, seed) whose results come from ``previous``
        planned = {(a.name, seed) for a in self.spec.arms for seed in self.seeds(a)}
        only_here = [f"{r.arm} s{r.seed}" for r in old.runs if (r.arm, r.seed) not in planned
                     and not (self.out / r.folder).exists()]
        if only_here:  # their results live only in this index, which the new one would replace
            raise ConfigError(f"{self.path} holds results of runs this study does not include and whose folders "
                              f"are gone ({', '.join(only_here)}); choose another --out")
        self.device = torch.device("cpu")
        self._labels: dict = {}

    # --- plan --------------------------------------------------------------------------------
    def seeds(self, arm: Arm) -> list[int]:
        """The arm's seeds; a budget below 1 keeps the first ceil(budget x n) of them (a quick look,
        which also leaves out what the study marks ``quick: false``: :meth:`StudySpec.quick_look`)."""
        return arm.seeds if self.budget >= 1 else arm.seeds[:max(1, math.ceil(self.budget * len(arm.seeds)))]

    def steps_per_epoch(self) -> int:
        b = self.base
        return max(1, len(self._dataset("train", b)) // (b.train.batch_size * b.train.accum_iter))

    def _dataset(self, split: str, cfg: Config):
        from mimkit.data import dataset_from_config

        return dataset_from_config(cfg, split)

    def calibrate(self, arm: Arm) -> float:
        """Seconds per optimizer step of ``arm``: a short timed run, once (stored in the index)."""
        from mimkit.engine.trainer import pretrain

        cfg = arm_config(self.base, arm)
        key = config_hash(cfg)
        for c in self.index.calibration:
            if c.arm == arm.name and c.config_hash == key:
                return c.s_per_step
        n = self.spec.calibration_steps
        cfg.train.seed, cfg.train.max_steps, cfg.train.warmup_epochs = arm.seeds[0], n, 0.0
        cfg.train.checkpoint_every, cfg.train.log_every, cfg.train.vis_every, cfg.train.knn_every = n, 1, 0, 0
        run = self.out / "calibration" / f"{arm.name}-{key}"
        shutil.rmtree(run, ignore_errors=True)
        log.info("study: timing %d steps of arm '%s'", n, arm.name)
        pretrain(cfg, run)
        times = [s / k for _, s, k in timed_steps(run)[2:] if s > 0]  # the first steps start workers
        shutil.rmtree(run, ignore_errors=True)
        self.index.calibration.append(Calibration(arm.name, key, statistics.median(times), len(times)))
        self.save()
        return self.index.calibration[-1].s_per_step

    def run_config(self, arm: Arm, seed: int) -> tuple[Config, list[int]]:
        """The arm's config for ``seed`` at the study's wall-clock budget, and its evaluation steps
        (multiples of the checkpoint interval, so the trainer keeps those checkpoints)."""
        s_per_step = self.calibrate(arm)
        steps = max(len(self.spec.eval_fractions), round(self.index.budget_s / s_per_step))
        first = min(self.spec.eval_fractions)
        every = max(1, round(steps * first))
        points = sorted({every * round(f / first) for f in self.spec.eval_fractions} | {steps})
        points = [p for p in points if p == steps or p < steps - every / 2]  # none just before the end
        cfg = arm_config(self.base, arm)
        t = cfg.train
        t.seed, t.max_steps, t.warmup_epochs = seed, steps, self.spec.warmup * steps / self.index.steps_per_epoch
        t.checkpoint_every, t.keep_checkpoints, t.knn_every, t.vis_every = every, steps // every + 2, 0, 0
        validate(cfg)
        return cfg, points

    # --- pre-training ------------------------------------------------------------------------
    def _keep(self, arm: str, seed: int, key: str, steps: int, run: Path) -> RunRecord | None:
        """The previous index's record of this run when its folder is gone (the index was copied to
        a new machine): its results are reused instead of recomputed."""
        if run.exists() and any(run.iterdir()):
            return None
        rec = next((r for r in self.previous.runs
                    if (r.arm, r.seed, r.config_hash, r.steps) == (arm, seed, key, steps)), None)
        if rec is not None:
            log.info("study: %s: results from the index (its folder is gone)", run.name)
            self.kept.add((arm, seed))
        return rec

    def pretrain(self, arm: Arm, seed: int) -> tuple[Path, RunRecord]:
        from mimkit.engine.checkpoint import atomic_write_text, list_checkpoints
        from mimkit.engine.trainer import pretrain

        cfg, points = self.run_config(arm, seed)
        key = config_hash(cfg)
        run = self.out / "runs" / f"{arm.name}-s{seed}-{key}"
        kept = self._keep(arm.name, seed, key, cfg.train.max_steps, run)
        if kept is not None:
            self.index.runs.append(kept)
            return run, kept
        done = run / "done.json"
        if not done.exists():
            log.info("study: %s %s (%d steps)", "resuming" if list_checkpoints(run) else "pre-training",
                     run.name, cfg.train.max_steps)
            pretrain(cfg, run, resume=True)  # a fresh folder starts, a killed run continues
            for step, path in list_checkpoints(run):  # only the evaluation points are needed now
                if step not in points:
                    path.unlink()
            atomic_write_text(done, json.dumps({"steps": cfg.train.max_steps}))
        rows = timed_steps(run)
        rec = RunRecord(arm.name, seed, "pretrain", f"runs/{run.name}", key, self.calibrate(arm),
                        cfg.train.max_steps, points, sum(s for _, s, _ in rows), host_name(self.device),
                        loss_curve([r for r, _, _ in rows]))
        self.index.runs.append(rec)
        return run, rec

    # --- evaluation --------------------------------------------------------------------------
    def _cached(self, run: Path, rec: RunRecord, wanted: dict, compute) -> list[EvalRecord]:
        """Records of ``run`` matching ``wanted`` fields: from its ``study_evals.json``, else (a run
        kept from the previous index) from that index; computed and stored when missing."""
        from mimkit.engine.checkpoint import atomic_write_text

        path = run / "study_evals.json"
        stored = [EvalRecord(**e) for e in json.loads(path.read_text())] if path.exists() else []
        hits = [e for e in stored if all(getattr(e, k) == v for k, v in wanted.items())]
        if not hits and (rec.arm, rec.seed) in self.kept:
            hits = [e for e in self.previous.evals if (e.arm, e.seed) == (rec.arm, rec.seed)
                    and all(getattr(e, k) == v for k, v in wanted.items())]
        if not hits:
            if not stored and (rec.arm, rec.seed) in self.kept:
                # The folder of a run kept from the index starts with the index's records of it, so
                # that it stands alone when the next call finds the folder (and no longer keeps it).
                stored = [e for e in self.previous.evals if (e.arm, e.seed) == (rec.arm, rec.seed)]
            run.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            hits = compute()
            for e in hits:
                e.seconds = (time.perf_counter() - t0) / len(hits)
            atomic_write_text(path, json.dumps([dataclasses.asdict(e) for e in stored + hits], indent=1))
            log.info("study: %s step %d: %s", run.name, hits[0].step,
                     ", ".join(f"{e.metric}@{e.label_fraction}={e.value:.4f}" for e in hits))
        self.index.evals.extend(hits)
        return hits

    def frozen_evals(self, arm: Arm, run: Path, rec: RunRecord) -> None:
        """k-NN and linear probe at each evaluation point and label fraction, from one feature
        extraction per checkpoint; both views of a teacher-student run; the metrics log's losses and
        accuracies averaged over the steps since the previous point."""
        from mimkit.engine.checkpoint import list_checkpoints, load_file
        from mimkit.interop.convert import build_mae, read_weights

        settings = self._frozen_settings()
        ckpts = dict(list_checkpoints(run))
        if (arm.name, rec.seed) in self.kept:  # no folder: the previous index has the views and logs
            old = [e for e in self.previous.evals if (e.arm, e.seed) == (arm.name, rec.seed)]
            views = [v for v in ("auto", "student") if any(e.view == v for e in old)]
            self.index.evals += [e for e in old if e.protocol == "train_log"]
            cfg = arm_config(self.base, arm)
        else:
            cfg = saved_config(run)
            cfg.eval = copy.deepcopy(self.base.eval)
            views = ["auto", "student"] if "student" in load_file(ckpts[rec.steps]) else ["auto"]  # teacher-student
            self.index.evals += train_log_records(arm.name, rec, timed_steps(run))

        def checkpoint(step: int) -> Path:
            return self._checkpoint(run, step)

        for step in rec.eval_steps:
            # The time axis is calibrated: steps x the arm's seconds per step, timed once on an idle
            # machine. Measured time would shift with whatever else shares the CPU over a run that
            # spans several sittings; the measured total is kept in the run record (train_s).
            wall = step * rec.s_per_step
            for view in views:
                self._cached(run, rec, {"step": step, "view": view, "settings": settings},
                             lambda v=view, s=step, w=wall: self._frozen(
                                 cfg, build_mae(read_weights(checkpoint(s), v)), arm.name, rec.seed, s, w, v, settings))
        # EMAE's claim: how much predictions of the same patch differ across masks (lower: more consistent)
        last, n, masks = rec.eval_steps[-1], 1000, 4
        clock = last * rec.s_per_step
        self._cached(run, rec, {"step": last, "settings": digest(["consistency", n, masks])},
                     lambda: [EvalRecord(arm.name, rec.seed, last, clock, "consistency", "pairwise_mse", None, "test",
                                         self._consistency(cfg, checkpoint(last), n, masks), "auto",
                                         digest(["consistency", n, masks]))])

    def _frozen_settings(self) -> str:
        return digest({"eval": {k: v for k, v in to_dict(self.base)["eval"].items() if k != "finetune"},
                       "fractions": self.spec.label_fractions})

    def baseline_evals(self, arm: Arm, run: Path, rec: RunRecord) -> None:
        """k-NN and linear probe of a baseline arm, once (step 0): the study's encoder at a seeded
        random initialisation (MAE's, seeded by the run's seed), or the input pixels."""
        from mimkit.eval.common import InputPixels
        from mimkit.models import model_from_config

        cfg, settings = arm_config(self.base, arm), self._frozen_settings()

        def encoder() -> torch.nn.Module:
            if arm.baseline == "pixels":
                return InputPixels()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rec.seed)
                return model_from_config(cfg)

        self._cached(run, rec, {"step": 0, "view": "auto", "settings": settings},
                     lambda: self._frozen(cfg, encoder(), arm.name, rec.seed, 0, 0.0, "auto", settings))

    def _consistency(self, cfg: Config, ckpt: Path, n: int, masks: int) -> float:
        from mimkit.eval.consistency import prediction_consistency
        from mimkit.eval.knn import eval_dataset
        from mimkit.interop.convert import build_mae, read_weights

        model = build_mae(read_weights(ckpt)).to(self.device)
        ds = eval_dataset(cfg, "test", max_samples=n, seed=0)
        imgs = torch.stack([ds[i][0] for i in range(len(ds))])
        res = prediction_consistency(model, imgs, num_masks=masks, seed=0, batch_size=cfg.eval.batch_size)
        return res["pairwise_mse"]

    def _train_indices(self, cfg: Config, fraction: float, seed: int) -> list[int]:
        """A seeded class-balanced ``fraction`` of the training labels, capped at
        ``eval.max_train_samples`` (as :func:`mimkit.eval.common.labelled_dataset` does)."""
        from mimkit.eval.common import class_balanced_indices, dataset_labels

        if "train" not in self._labels:
            self._labels["train"] = dataset_labels(self._dataset("train", cfg))
        labels = self._labels["train"]
        idx = class_balanced_indices(labels, fraction, seed)
        cap = cfg.eval.max_train_samples
        if cap and cap < len(idx):
            g = torch.Generator().manual_seed(seed)
            idx = sorted(idx[i] for i in torch.randperm(len(idx), generator=g)[:cap].tolist())
        return idx

    def _frozen(self, cfg: Config, model: torch.nn.Module, arm: str, seed: int, step: int, wall: float, view: str,
                settings: str) -> list[EvalRecord]:
        from torch.utils.data import DataLoader, Subset

        from mimkit.eval.common import knn_features
        from mimkit.eval.knn import eval_dataset, extract_features, knn_accuracy
        from mimkit.eval.linprobe import head_accuracy, train_head_on_features

        model = model.to(self.device)
        subsets = {f: self._train_indices(cfg, f, seed) for f in self.spec.label_fractions}
        union = sorted(set().union(*subsets.values()))
        kw = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, shuffle=False)
        ftr, ltr = extract_features(model, DataLoader(Subset(eval_dataset(cfg, "train"), union), **kw), self.device,
                                    "both", "train features", normalize=False)
        fte, lte = extract_features(model, DataLoader(eval_dataset(cfg, "test"), **kw), self.device,
                                    "both", "test features", normalize=False)
        d, e, classes = ftr.shape[1] // 2, cfg.eval, int(max(ltr.max(), lte.max())) + 1
        cols = {"cls": slice(0, d), "mean": slice(d, 2 * d), "both": slice(0, 2 * d)}

        def knn_feature(x: torch.Tensor) -> torch.Tensor:  # the k-NN feature from the cached cls|mean
            return knn_features([x[:, :d], x[:, d:]] if e.feature == "both" else [x[:, cols[e.feature]]])

        where = {i: j for j, i in enumerate(union)}
        out = []
        for f, idx in subsets.items():
            rows = torch.tensor([where[i] for i in idx])
            knn = knn_accuracy(knn_feature(ftr[rows]), ltr[rows], knn_feature(fte), lte, k=e.knn_k,
                               temperature=e.knn_temperature, num_classes=classes)
            c = cols[e.linprobe.feature]
            head, _ = train_head_on_features(ftr[rows][:, c], ltr[rows], classes, e.linprobe, seed, self.device)
            probe = head_accuracy(head, fte[:, c], lte)
            for protocol, value in (("knn", knn), ("linprobe", probe)):
                out.append(EvalRecord(arm, seed, step, wall, protocol, f"{protocol}_top1", f, "test", value,
                                      view, settings))
        return out

    def finetune(self, job: FinetuneJob, arm: Arm, seed: int, run: Path, rec: RunRecord) -> None:
        """Fine-tune the run's last checkpoint (or a fresh encoder for a scratch arm) with the
        config's ``eval.finetune`` recipe, its length scaled by the budget."""
        cfg = arm_config(self.base, arm, job.overrides)
        cfg.train.seed, cfg.data.label_fraction = seed, job.label_fraction
        f = cfg.eval.finetune
        if f.max_steps is not None:
            f.max_steps = max(1, round(f.max_steps * self.budget))
        f.epochs = max(1, round(f.epochs * self.budget))
        f.warmup_epochs *= self.budget
        f.eval_every = 0
        settings = digest([dataclasses.asdict(f), job.label_fraction, seed])

        def go() -> list[EvalRecord]:
            from mimkit.eval.finetune import build_classifier, run_finetune
            from mimkit.interop.convert import sha256_file

            source = self._checkpoint(run) if arm.pretrain else None
            model = build_classifier(cfg, self._num_classes(cfg), source)
            res = run_finetune(model, cfg, self.device, state_path=state,
                               source=None if source is None else sha256_file(source))
            return [EvalRecord(arm.name, seed, rec.steps, rec.train_s, "finetune", "finetune_top1",
                               job.label_fraction, "test", res["value"], "auto", settings)]

        state = run / f"finetune-{settings}.state.pt"  # progress of an interrupted cell
        self._cached(run, rec, {"protocol": "finetune", "settings": settings}, go)
        state.unlink(missing_ok=True)  # the result is stored

    def _checkpoint(self, run: Path, step: int | None = None) -> Path:
        """The run's checkpoint of ``step`` (default: its last); a run kept from the index has none."""
        from mimkit.engine.checkpoint import list_checkpoints

        ckpts = dict(list_checkpoints(run))
        if (max(ckpts) if ckpts and step is None else step) not in ckpts:
            raise ConfigError(f"study: {run} has no checkpoint to evaluate or fine-tune; delete the folder (and "
                              f"its records in {self.path}) to pre-train it again")
        return ckpts[max(ckpts) if step is None else step]

    def _num_classes(self, cfg: Config) -> int:
        from mimkit.eval.common import num_classes_of

        return num_classes_of(self._dataset("train", cfg))

    # --- everything --------------------------------------------------------------------------
    def save(self) -> None:
        """Write the index; runs not reached yet keep their previous records, so a study stopped
        early never drops a result that only the index holds."""
        done = {(r.arm, r.seed) for r in self.index.runs}
        dataclasses.replace(
            self.index, runs=self.index.runs + [r for r in self.previous.runs if (r.arm, r.seed) not in done],
            evals=self.index.evals + [e for e in self.previous.evals if (e.arm, e.seed) not in done],
        ).save(self.path)

    def run(self) -> Path:
        """Calibrate every arm, then seed by seed and arm by arm: pre-train, evaluate along the run,
        fine-tune."""
        from mimkit.engine.distributed import pick_device
        from mimkit.engine.logging import setup_logging

        setup_logging()
        s = self.spec
        self.device = pick_device(self.base.train.device)
        ix = self.index
        ix.environment = environment(self.device)
        ix.steps_per_epoch = self.steps_per_epoch()
        ix.data_sizes = {split: len(self._dataset(split, self.base)) for split in ("train", "test")}
        t0 = time.perf_counter()
        arms = {a.name: a for a in s.arms}
        ix.budget_s = s.budget_epochs * ix.steps_per_epoch * self.calibrate(arms[s.reference]) * self.budget
        for a in s.arms:
            if a.pretrain:
                self.calibrate(a)
        n_runs = sum(len(self.seeds(a)) for a in s.arms if a.pretrain)
        log.info("study: %d pre-training runs of %.0f s each: %.1f h of pre-training in all (runs already "
                 "done are skipped), plus evaluations and fine-tuning", n_runs, ix.budget_s,
                 n_runs * ix.budget_s / 3600)
        for seed in sorted({sd for a in s.arms for sd in self.seeds(a)}):
            # Each arm is finished (evaluations and fine-tunes) before the next starts, the baselines
            # first: minutes each, so a stopped study holds complete pairs.
            for a in sorted(s.arms, key=lambda a: a.pretrain):
                if seed not in self.seeds(a):
                    continue
                if a.pretrain:
                    run, rec = self.pretrain(a, seed)
                    self.frozen_evals(a, run, rec)
                else:  # a baseline: evaluated once, fine-tuned unless it is the pixels; cached in a folder of its own
                    # the key holds the baseline: an arm that changes it starts a folder of its own
                    key = config_hash(arm_config(self.base, a))
                    key = key if a.baseline == "random" else digest([key, a.baseline])
                    run = self.out / "runs" / f"{a.name}-s{seed}-{key}"
                    kind = "pixels" if a.baseline == "pixels" else "scratch"
                    rec = (self._keep(a.name, seed, key, 0, run)
                           or RunRecord(a.name, seed, kind, f"runs/{run.name}", key, 0.0, 0))
                    ix.runs.append(rec)
                    self.baseline_evals(a, run, rec)
                self.save()
                for job in s.finetune:
                    if a.finetunes and a.name in (job.arms or arms) and (job.seeds is None or seed in job.seeds):
                        self.finetune(job, a, seed, run, rec)
                        self.save()
        ix.finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        log.info("study finished in %.0f s this call: %s (write the report with `mimkit report --study %s`)",
                 time.perf_counter() - t0, self.path, self.out)
        self.save()
        return self.path


def train_log_records(arm: str, rec: RunRecord, rows: list[tuple[dict, float, int]]) -> list[EvalRecord]:
    """The metrics log's losses and accuracies (``loss*``, ``acc_*``) averaged over the steps since
    the previous evaluation point, one record per point and key."""
    out, prev = [], 0
    for step in rec.eval_steps:
        window = [r for r, _, _ in rows if prev < r["step"] <= step]
        for k in sorted({k for r in window for k in r if k.startswith(("loss", "acc_"))}):
            vals = [r[k] for r in window if isinstance(r.get(k), float)]
            if vals:
                out.append(EvalRecord(arm, rec.seed, step, step * rec.s_per_step, "train_log", k, None, "train",
                                      statistics.fmean(vals)))
        prev = step
    return out


def loss_curve(rows: list[dict], points: int = 200) -> list[list[float]]:
    """``[step, reconstruction loss]`` (``loss_rec``, else ``loss``) of a metrics log: the mean of
    each of at most ``points`` equal runs of rows, so the index keeps the curve without the log."""
    pts = [(r["step"], r.get("loss_rec", r.get("loss"))) for r in rows]
    pts = [(s, v) for s, v in pts if isinstance(v, float)]
    k = max(1, math.ceil(len(pts) / points))
    return [[pts[min(i + k, len(pts)) - 1][0], statistics.fmean(v for _, v in pts[i:i + k])]
            for i in range(0, len(pts), k)]


def host_name(device: torch.device) -> str:
    """The processor a run used: the GPU's name on CUDA, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the report."""
    import timm

    import mimkit

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "mimkit": getattr(mimkit, "__version__", "?"), "platform": platform.platform(),
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_study(config: str | Path = "fmnist_study", out: str | Path | None = None, budget: float = 1.0,
              overrides: list[str] | tuple = ()) -> Path:
    """Run (or resume) a study; returns the path of its ``study.json``. ``out`` defaults to
    :func:`default_out` of the study's name."""
    spec, base = load_study(config, overrides)
    out = default_out(spec.name) if out is None else out
    source = " ".join([f"--config {config}", *([f"--budget {budget:g}"] if budget != 1 else []), *overrides])
    return Study(spec, base, out, budget, source).run()
