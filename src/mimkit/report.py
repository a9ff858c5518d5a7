"""``mimkit report``: ``RESULTS.md`` and its plots from a study folder (:mod:`mimkit.study`).

Everything in the page is computed from the run folders — tables, claim verdicts, plots and the
stated versions and hardware — so the page is regenerated, never edited.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

METHOD_NAMES = {"mae": "MAE", "emae": "EMAE", "rcmae": "RC-MAE", "mixedae": "MixedAE", "scratch": "scratch"}


@dataclass
class Run:
    label: str
    method: str
    seed: int
    budget: str
    steps: int
    train_s: float
    dir: Path
    evals: dict = field(default_factory=dict)
    weights: str = ""  # "" (the evaluation weights) or "student_" (a teacher method's student)

    def metric(self, kind: str, fraction: float | None = None) -> float | None:
        """The run's result for ``kind`` (knn | linprobe | finetune | consistency) at ``fraction``;
        the newest matching entry when settings changed between study runs."""
        prefix = self.weights + (kind if fraction is None else f"{kind}_lf{fraction:g}")
        hits = [v for k, v in self.evals.items() if k == prefix or k.startswith(prefix + "_")]
        return hits[-1]["value"] if hits else None


def load_runs(study: Path) -> tuple[dict, dict[str, Run]]:
    index = json.loads((study / "study.json").read_text())
    runs = {}
    for label, e in index["runs"].items():
        d = study / e["dir"]
        path = d / "study_eval.json"
        evals = json.loads(path.read_text()) if path.exists() else {}
        runs[label] = Run(label, e["method"], e["seed"], e["budget"], e["steps"], e.get("train_s", 0.0), d, evals)
    return index, runs


def name(method: str) -> str:
    return "+".join(METHOD_NAMES.get(p, p) for p in method.split("+"))


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f} (n={len(values)})"


def compare(a: list[float], b: list[float], higher_is_better: bool = True,
            noise: float | None = None) -> tuple[str, float]:
    """``(verdict, a − b)``: ``better`` / ``worse`` when the means differ by more than twice the
    standard error (several seeds each), or than twice ``noise`` (a seed-to-seed standard
    deviation measured elsewhere, for single runs); otherwise ``within noise``."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) > 1 and len(b) > 1:
        margin = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    elif noise is not None:
        margin = 2 * noise
    else:
        return ("single run, no noise estimate", diff)
    signed = diff if higher_is_better else -diff
    if signed > margin:
        return "better", diff
    if signed < -margin:
        return "worse", diff
    return "within noise", diff


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_time(runs: list[Run], fractions: list[float], path: Path) -> Path:
    plt = _plt()
    top = max(fractions)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, kind, title in ((axes[0], "knn", "k-NN"), (axes[1], "linprobe", "linear probe")):
        for method in dict.fromkeys(r.method for r in runs):
            pts = sorted((r.train_s, r.metric(kind, top)) for r in runs if r.method == method
                         and r.metric(kind, top) is not None)
            if pts:
                ax.plot([p[0] / 60 for p in pts], [100 * p[1] for p in pts], "o", label=name(method), alpha=0.8)
        ax.set_xlabel("pre-training wall-clock (min)")
        ax.set_ylabel(f"{title} top-1 (%), {top:.0%} labels")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("accuracy against pre-training time (every run of the study)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curves(runs: list[Run], path: Path) -> Path:
    """Reconstruction loss (``loss_rec``: the term every method shares) against wall-clock."""
    from mimkit.study import timed_steps

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    lows, finals = [], []
    for r in runs:
        t, xs, ys = 0.0, [], []
        for row, seconds, _ in timed_steps(r.dir):
            t += seconds
            value = row.get("loss_rec", row.get("loss"))
            if isinstance(value, float):
                xs.append(t / 60)
                ys.append(value)
        k = max(1, len(ys) // 60)  # a running mean keeps the curves readable
        smooth = [statistics.fmean(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=1.2, label=f"{name(r.method)} ({r.budget}, {r.steps} steps)")
        if smooth:
            lows.append(min(smooth))
            finals.append(smooth[-1])
    if finals:  # zoom on the part where the methods differ; the first steps go far above
        ax.set_ylim(0.95 * min(lows), 1.6 * max(finals))
    ax.set_xlabel("pre-training wall-clock (min)")
    ax.set_ylabel("reconstruction loss (norm-pix MSE)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_reconstructions(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """The same test images and masks through each run's model (RC-MAE: the teacher)."""
    import torch

    import mimkit
    from mimkit.data import stats_for
    from mimkit.engine.checkpoint import list_checkpoints
    from mimkit.eval.knn import eval_dataset
    from mimkit.study import saved_config
    from mimkit.viz import save_reconstruction_grid

    paths = {}
    for r in runs:
        ckpts = list_checkpoints(r.dir)
        if not ckpts:
            continue
        cfg = saved_config(r.dir)
        model = mimkit.load_model(ckpts[-1][1])
        test = eval_dataset(cfg, "test")
        imgs = torch.stack([test[i][0] for i in range(6)])
        noise = torch.rand(6, model.num_patches, generator=torch.Generator().manual_seed(0))
        mean, std = stats_for(cfg)
        paths[r.method] = save_reconstruction_grid(model, imgs, out_dir / f"recon_{r.method.replace('+', '_')}.png",
                                                   mean, std, noise, upscale=3)
    return paths


def write_report(study: str | Path = "runs/study", out: str | Path = "docs/RESULTS.md") -> Path:
    """Write ``out`` and its plots (in ``<out stem>/`` beside it) from the ``study`` folder."""
    study, out = Path(study), Path(out)
    index, runs = load_runs(study)
    s = index["study"]
    fractions, seeds, methods = s["label_fractions"], s["seeds"], s["methods"]
    low, top = min(fractions), max(fractions)
    figs = out.parent / out.stem.lower()
    figs.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(figs, out.parent)
    seed0 = seeds[0]
    cal = next(iter(index["calibration"].values()), {})
    wall_frac = max(s["wallclock"])

    def get(label: str) -> Run | None:
        return runs.get(label)

    matched = [r for m in methods if (r := get(f"{m}-epochs-s{seed0}"))]
    timed = [r for m in methods if (r := get(f"{m}-time{wall_frac:g}-s{seed0}"))]
    plot_accuracy_vs_time([r for r in runs.values() if r.method != "scratch"], fractions, figs / "accuracy_vs_time.png")
    plot_loss_curves(matched + [r for r in timed if r.method != "mae"], figs / "loss_curves.png")
    recon = save_reconstructions(matched, figs)

    env = index.get("environment", {})
    lines = [
        "# Results: do the papers' claims hold on Fashion-MNIST?",
        "",
        f"Generated by `mimkit report --study {study}` from the runs of "
        f"`mimkit study --config {index.get('source') or 'fmnist_study'}`"
        + (f" --budget {index['budget']:g}" if index.get("budget", 1) != 1 else "")
        + " (`make study` runs both). Every number and plot below comes from the run folders; "
        f"nothing is written by hand. Small scale ({s['epochs'] * index.get('budget', 1):g} pre-training "
        f"epoch(s), device {index.get('environment', {}).get('device', '?')}): read the verdicts as "
        "\"at this scale\", not as a replication of the papers.",
        "",
        "## Setup",
        "",
        *_setup_lines(index, env, cal, runs),
        "",
        "## Claims",
        "",
        *_claim_lines(runs, methods, seeds, low, top, wall_frac, cal),
        "",
        f"## Matched epochs ({s['epochs'] * index.get('budget', 1):g} epoch(s), seed {seed0})",
        "",
        *_table(matched, fractions),
        "",
        *_finetune_caveat(matched, fractions, s),
        f"## Matched wall-clock ({wall_frac:g} × MAE's matched-epoch time, seed {seed0})",
        "",
        *_table(timed, fractions),
        "",
        "## Seeds: the headline comparisons (mean ± std over seeds)",
        "",
        *_seed_lines(runs, seeds, fractions, low, wall_frac),
        "",
        "## Plots",
        "",
        f"![accuracy against pre-training time]({rel}/accuracy_vs_time.png)",
        "",
        f"![reconstruction loss against time]({rel}/loss_curves.png)",
        "",
        "Reconstructions (same test images and masks; columns: original | masked | reconstruction | "
        "reconstruction with the visible patches pasted), matched-epoch runs:",
        "",
        "| " + " | ".join(name(m) for m in recon) + " |",
        "|" + "---|" * len(recon),
        "| " + " | ".join(f"![{name(m)}]({rel}/{p.name})" for m, p in recon.items()) + " |",
        "",
        "## Reproduce",
        "",
        "```",
        "make study        # = mimkit study --config fmnist_study --out runs/study",
        "                  #   && mimkit report --study runs/study --out docs/RESULTS.md",
        "mimkit study --config fmnist_study --budget 0.1 --out runs/quick   # a quick look",
        "```",
        "",
        "Re-running the study computes only what is missing (runs are cached by config hash, "
        "evaluations by their settings); an interrupted study resumes from the last checkpoint.",
        "",
    ]
    out.write_text("\n".join(lines))
    return out


def _setup_lines(index: dict, env: dict, cal: dict, runs: dict[str, Run]) -> list[str]:
    base, s = index["base_config"], index["study"]
    m = base["model"]
    sizes = index.get("data_sizes", {})
    total = sum({r.dir: r.train_s for r in runs.values()}.values())  # shared runs count once
    out = [
        f"- Data: {base['data']['name']} ({sizes.get('train', '?')} train / {sizes.get('test', '?')} test "
        f"images), resized to {m['img_size']} px, "
        f"crop scale {base['data']['crop_scale']}; same augmentation for every method.",
        f"- Model: `{m['arch']}` with overrides embed_dim={m['embed_dim']}, num_heads={m['num_heads']} "
        f"(depth and decoder from the arch), patch 4, mask ratio {base['mask_ratio']}, norm-pix loss "
        f"{base['norm_pix_loss']}.",
        f"- Pre-training: batch {base['train']['batch_size']}, blr {base['train']['blr']}, AdamW "
        f"{base['train']['betas']}, warm-up {s['warmup']:.0%} of each run then cosine; "
        f"{index['steps_per_epoch']} steps per epoch.",
        f"- Budgets: matched epochs = {s['epochs'] * index.get('budget', 1):g} epoch(s) for every method; "
        f"matched wall-clock = the step count that takes each method "
        f"{', '.join(f'{f:g}' for f in s['wallclock'])} × MAE's matched-epoch time"
        + (f" ({cal['reference_s']:.0f} s), from each method's median step time" if cal else "") + ".",
        f"- Evaluation: k-NN (k={base['eval']['knn_k']}, T={base['eval']['knn_temperature']}, "
        f"{base['eval']['feature']} features, bank = the labelled subset of the train images) and "
        f"linear probe ({base['eval']['linprobe']['optimizer']}, {base['eval']['linprobe']['epochs']} "
        f"epochs on cached cls features) at {', '.join(f'{f:.0%}' for f in s['label_fractions'])} of "
        f"the labels; fine-tuning {s['finetune_steps']} steps (AdamW, batch "
        f"{base['eval']['finetune']['batch_size']}, blr {base['eval']['finetune']['blr']:g}, layer decay "
        f"{base['eval']['finetune']['layer_decay']}, warm-up {s['finetune_warmup']:.0%}, then cosine) "
        f"at each fraction; prediction consistency = mean squared disagreement of predictions of the "
        f"same masked patch under {s['consistency_masks']} random masks, {s['consistency_images']} test images "
        "(lower = more consistent). Accuracies are top-1 (%) on the whole test split.",
        f"- Seeds: {s['seeds']} for the headline pairs; other cells use seed {s['seeds'][0]}.",
        f"- Hardware and versions: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores, "
        f"{env.get('torch_threads', '?')} torch threads), device {env.get('device', '?')}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f"; Python {env.get('python', '?')}, torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, "
        f"mimkit {env.get('mimkit', '?')}; {env.get('platform', '')}.",
    ]
    out.append(f"- Total pre-training time of all runs: {total / 60:.0f} min.")
    if index.get("finished"):
        out.append(f"- Study finished {index['finished']}.")
    return out


def student_of(run: Run) -> Run | None:
    """The student view of a teacher-method run (its ``student_`` evaluations), if it has one."""
    if run.weights or not any(k.startswith("student_") for k in run.evals):
        return None
    return dataclasses.replace(run, weights="student_")


def homologous_line(run: Run) -> str:
    """MixedAE's homologous recognition during pre-training, against chance (1/r)."""
    from mimkit.engine.logging import read_metrics
    from mimkit.study import saved_config

    cfg = saved_config(run.dir)
    ways = cfg.mixedae.ways or round(1 / (1 - cfg.mask_ratio))  # default: r = K
    acc = [r["acc_homologous"] for r in read_metrics(run.dir) if isinstance(r.get("acc_homologous"), float)]
    if not acc:
        return "MixedAE homologous recognition: not logged."
    k = max(1, min(10, len(acc) // 10))
    return (f"MixedAE homologous recognition (fraction of the top-k attention keys that come from the "
            f"query's own image, mean over the homologous blocks): {statistics.fmean(acc[:k]):.3f} over the "
            f"first {k} logged steps → {statistics.fmean(acc[-k:]):.3f} over the last {k}; chance is "
            f"1/r = {1 / ways:.3f}.")


def _finetune_caveat(runs: list[Run], fractions: list[float], s: dict) -> list[str]:
    """A computed warning when the short fine-tuning budget ends below the linear probe."""
    below = [(r, f) for r in runs for f in fractions
             if (ft := r.metric("finetune", f)) is not None and (lp := r.metric("linprobe", f)) is not None
             and ft < lp]
    if not below:
        return []
    r, f = below[0]
    return [f"Note: with {s['finetune_steps']} fine-tuning steps, fine-tuning ends below the linear probe "
            f"in {len(below)} of these cells (e.g. {name(r.method)} at {f:.0%} labels: "
            f"{pct(r.metric('finetune', f))} vs {pct(r.metric('linprobe', f))}). The fine-tuning columns "
            "compare starting points under a short, equal budget — not the converged recipe, which "
            "needs far more steps than this study can afford on a CPU.", ""]


def _table(runs: list[Run], fractions: list[float]) -> list[str]:
    fr = [f"{f:.0%}" for f in fractions]
    head = ["method", "steps", "pre-train min"] + [f"k-NN {f}" for f in fr] + [f"probe {f}" for f in fr] \
        + [f"fine-tune {f}" for f in fr] + ["consistency ↓"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [x for run in runs for x in (run, student_of(run)) if x is not None]:
        c = r.metric("consistency")
        title = name(r.method) + (" (student)" if r.weights else " (teacher)" if student_of(r) else "")
        cells = [title, str(r.steps), f"{r.train_s / 60:.1f}"] \
            + [pct(r.metric("knn", f)) for f in fractions] + [pct(r.metric("linprobe", f)) for f in fractions] \
            + [pct(r.metric("finetune", f)) for f in fractions] + ["–" if c is None else f"{c:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _seed_values(runs: dict[str, Run], prefix: str, seeds: list[int], kind: str, fraction: float | None) -> list[float]:
    out = []
    for seed in seeds:
        r = runs.get(f"{prefix}-s{seed}")
        v = r.metric(kind, fraction) if r else None
        if v is not None:
            out.append(v)
    return out


def _seed_lines(runs: dict[str, Run], seeds: list[int], fractions: list[float], low: float,
                wall_frac: float) -> list[str]:
    top = max(fractions)
    groups = [("MAE, matched epochs", "mae-epochs"),
              (f"EMAE, matched wall-clock ({wall_frac:g}×)", f"emae-time{wall_frac:g}"), ("scratch", "scratch")]
    head = ["", f"k-NN {top:.0%}", f"probe {top:.0%}", f"k-NN {low:.0%}", f"fine-tune {low:.0%}", "consistency ↓"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, prefix in groups:
        cells = [fmt_ms(_seed_values(runs, prefix, seeds, "knn", top)),
                 fmt_ms(_seed_values(runs, prefix, seeds, "linprobe", top)),
                 fmt_ms(_seed_values(runs, prefix, seeds, "knn", low)),
                 fmt_ms(_seed_values(runs, prefix, seeds, "finetune", low)),
                 fmt_ms(_seed_values(runs, prefix, seeds, "consistency", None), 1.0, 4)]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return rows


def _claim_lines(runs: dict[str, Run], methods: list[str], seeds: list[int], low: float, top: float,
                 wall_frac: float, cal: dict) -> list[str]:
    s0 = seeds[0]
    mae = lambda kind, f: _seed_values(runs, "mae-epochs", seeds, kind, f)  # noqa: E731
    emae = lambda kind, f: _seed_values(runs, f"emae-time{wall_frac:g}", seeds, kind, f)  # noqa: E731
    noise = {k: (statistics.stdev(v) if len(v := mae(k, f)) > 1 else None)
             for k, f in (("knn", top), ("linprobe", top), ("finetune", low), ("consistency", None))}

    def line(claim: str, checks: list[tuple[str, list[float], list[float], str, bool]]) -> list[str]:
        out = [f"**{claim}**", ""]
        for what, a, b, kind, hib in checks:
            if not a or not b:
                out.append(f"- {what}: not measured")
                continue
            verdict, diff = compare(a, b, hib, noise.get(kind))
            scale, unit = (1.0, "") if kind == "consistency" else (100.0, " points")
            n = f"{len(a)} vs {len(b)} seed(s)"
            out.append(f"- {what}: {scale * statistics.fmean(a):.{4 if scale == 1 else 2}f} vs "
                       f"{scale * statistics.fmean(b):.{4 if scale == 1 else 2}f} "
                       f"(difference {scale * diff:+.{4 if scale == 1 else 2}f}{unit}; {n}) → **{verdict}**")
        return out + [""]

    def one(label: str, kind: str, f: float | None, student: bool = False) -> list[float]:
        r = runs.get(label)
        r = student_of(r) if r is not None and student else r
        v = r.metric(kind, f) if r else None
        return [] if v is None else [v]

    cost = cal.get("relative_cost", {})
    lines = ["Verdict rule: a difference counts when it exceeds twice its standard error over seeds "
             "(several seeds each), or twice the seed-to-seed standard deviation of MAE (single runs); "
             "otherwise it is \"within noise\". Higher is better, except consistency (lower is better).", ""]
    lines += line("1. EMAE reaches MAE's quality in much less pre-training time "
                  f"(EMAE at {wall_frac:g}× MAE's time vs MAE).", [
                      (f"k-NN, {top:.0%} labels", emae("knn", top), mae("knn", top), "knn", True),
                      (f"linear probe, {top:.0%} labels", emae("linprobe", top), mae("linprobe", top),
                       "linprobe", True),
                      (f"fine-tuning, {low:.0%} labels", emae("finetune", low), mae("finetune", low),
                       "finetune", True)])
    lines += line("2. EMAE makes predictions more consistent (lower disagreement across masks).", [
        (f"matched epochs (seed {s0})", one(f"emae-epochs-s{s0}", "consistency", None),
         one(f"mae-epochs-s{s0}", "consistency", None), "consistency", False),
        ("EMAE at matched wall-clock vs MAE (all seeds)", emae("consistency", None), mae("consistency", None),
         "consistency", False)])
    lines += line("3. RC-MAE converges faster than MAE (equal wall-clock).", [
        (f"k-NN, {top:.0%} labels (seed {s0})", one(f"rcmae-time{wall_frac:g}-s{s0}", "knn", top),
         one(f"mae-epochs-s{s0}", "knn", top), "knn", True),
        (f"linear probe, {top:.0%} labels (seed {s0})", one(f"rcmae-time{wall_frac:g}-s{s0}", "linprobe", top),
         one(f"mae-epochs-s{s0}", "linprobe", top), "linprobe", True),
        (f"k-NN, {top:.0%} labels, RC-MAE's student (seed {s0})",
         one(f"rcmae-time{wall_frac:g}-s{s0}", "knn", top, student=True), one(f"mae-epochs-s{s0}", "knn", top),
         "knn", True)])
    extra = f" Measured cost per step: ×{cost['mixedae']:.2f} of MAE's." if "mixedae" in cost else ""
    lines += line(f"4. MixedAE improves on MAE at about 3% extra cost (matched epochs).{extra}", [
        (f"k-NN, {top:.0%} labels (seed {s0})", one(f"mixedae-epochs-s{s0}", "knn", top),
         one(f"mae-epochs-s{s0}", "knn", top), "knn", True),
        (f"linear probe, {top:.0%} labels (seed {s0})", one(f"mixedae-epochs-s{s0}", "linprobe", top),
         one(f"mae-epochs-s{s0}", "linprobe", top), "linprobe", True),
        (f"fine-tuning, {low:.0%} labels (seed {s0})", one(f"mixedae-epochs-s{s0}", "finetune", low),
         one(f"mae-epochs-s{s0}", "finetune", low), "finetune", True)])
    lines += line(f"5. MAE pre-training beats training from scratch when labels are scarce "
                  f"(fine-tuning, {low:.0%} labels).", [
                      ("MAE vs scratch", mae("finetune", low), _seed_values(runs, "scratch", seeds, "finetune", low),
                       "finetune", True)])
    mixed = runs.get(f"mixedae-epochs-s{s0}")
    if mixed is not None:
        lines += [homologous_line(mixed), ""]
    if cost:
        lines.append("Step cost relative to MAE (median seconds per step, this hardware): "
                     + ", ".join(f"{name(m)} ×{c:.2f}" for m, c in cost.items()) + ".")
    return lines
