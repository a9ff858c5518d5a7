"""``mimkit report``: ``RESULTS.md``, its plots and ``summary.json`` from a study folder.

Everything is read from the typed index (:class:`~mimkit.study.index.StudyIndex`) and the run
folders; arm names, titles, the data set and the model come from the study's configs."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

from mimkit.study.index import StudyIndex
from mimkit.study.spec import FROZEN, Claim, StudySpec, spec_from_dict
from mimkit.study.verdicts import Verdict, judge, time_ratio

LABELS = {"knn_top1": "k-NN", "linprobe_top1": "linear probe", "finetune_top1": "fine-tuning",
          "pairwise_mse": "inconsistency ↓"}  # pairwise_mse: predictions of a patch across masks


def is_accuracy(metric: str) -> bool:
    return metric.endswith("_top1") or metric.startswith("acc_")


def fmt(values: list[float], metric: str) -> str:
    """Mean ± std (n) of a metric, accuracies in %."""
    if not values:
        return "–"
    k = 100.0 if is_accuracy(metric) else 1.0
    m = statistics.fmean(values) * k
    text = f"{m:.2f}" if k == 100 else f"{m:.4f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * k:.2f}" if k == 100 else f" ± {statistics.stdev(values) * k:.4f}"
    return text + (f" (n={len(values)})" if len(values) > 1 else "")


def lf_text(f: float | None) -> str:
    return "" if f is None else f"{f:.0%}" if f >= 0.1 else f"{f:.1%}".replace(".0%", "%")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(ix: StudyIndex, spec: StudySpec, path: Path) -> Path:
    """Accuracy against pre-training wall-clock per arm: mean over seeds, band = ± std."""
    plt = _plt()
    fracs = spec.label_fractions
    fig, axes = plt.subplots(len(FROZEN), len(fracs), figsize=(5 * len(fracs), 3.6 * len(FROZEN)), dpi=100,
                             squeeze=False)
    for i, metric in enumerate(FROZEN):
        for j, f in enumerate(fracs):
            ax = axes[i][j]
            for a in spec.arms:
                if not a.pretrain:  # a baseline: one value, a horizontal line
                    pts = ix.curve(a.name, metric, f)
                    if pts:
                        ax.axhline(100 * pts[0][1], ls=":", lw=1.2, color="grey" if a.baseline == "pixels" else "black",
                                   label=f"{a.title or a.name} (no pre-training)")
                    continue
                for view in ("auto", "student"):
                    pts = ix.curve(a.name, metric, f, view)
                    if not pts:
                        continue
                    t = [p[0] / 60 for p in pts]
                    m = [100 * p[1] for p in pts]
                    s = [100 * p[2] for p in pts]
                    line, = ax.plot(t, m, "o-" if view == "auto" else "x--", ms=3,
                                    label=(a.title or a.name) + (" (student)" if view == "student" else ""))
                    lo, hi = ([x + sign * y for x, y in zip(m, s, strict=True)] for sign in (-1, 1))
                    ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15)
            ax.set_title(f"{LABELS[metric]}, {lf_text(f)} of the labels", fontsize=9)
            ax.set_xlabel("pre-training wall-clock (min)")
            ax.set_ylabel("top-1 (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(ix: StudyIndex, spec: StudySpec, path: Path) -> Path:
    """Reconstruction loss (``loss_rec``, else ``loss``) against wall-clock, one line per run: the
    run record's curve, else (an index from before runs kept one) the means at its evaluation points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    colors, finals = {}, []
    for r in ix.runs:
        if r.kind != "pretrain":
            continue
        pts = r.losses
        if not pts:
            log = {m: {e.step: e.value for e in ix.select(r.arm, m, seed=r.seed)} for m in ("loss_rec", "loss")}
            pts = sorted((log["loss_rec"] or log["loss"]).items())
        xs = [step * r.s_per_step / 60 for step, _ in pts]  # calibrated time, as the accuracy curves
        ys = [v for _, v in pts]
        k = max(1, len(ys) // 50)  # a running mean keeps the lines readable
        ys = [statistics.fmean(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        title = spec.arm(r.arm).title or r.arm
        line, = ax.plot(xs, ys, lw=1, color=colors.get(r.arm), label=None if r.arm in colors else title)
        colors[r.arm] = line.get_color()
        finals += ys[-1:]
    if finals:  # the first steps go far above; zoom on where the arms differ
        ax.set_ylim(0.9 * min(finals), 1.8 * max(finals))
    ax.set_xlabel("pre-training wall-clock (min)")
    ax.set_ylabel("reconstruction loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_reconstructions(ix: StudyIndex, study: Path, out_dir: Path) -> dict[str, Path]:
    """The same test images and masks through the last checkpoint of each arm's first run, in
    ``recon_<run folder>.png``. An arm none of whose runs has its checkpoints here (a study resumed
    from a copied index) keeps the picture an earlier report drew of one of its runs, if any."""
    import torch

    import mimkit
    from mimkit.data import stats_for
    from mimkit.engine.checkpoint import list_checkpoints
    from mimkit.eval.knn import eval_dataset
    from mimkit.study.runner import saved_config
    from mimkit.viz import save_reconstruction_grid

    paths: dict[str, Path] = {}
    for r in ix.runs:
        ckpts = list_checkpoints(study / r.folder) if r.kind == "pretrain" else []
        if r.arm in paths or not ckpts:
            continue
        path = out_dir / f"recon_{Path(r.folder).name}.png"
        cfg = saved_config(study / r.folder)
        model = mimkit.load_model(ckpts[-1][1])
        test = eval_dataset(cfg, "test")
        imgs = torch.stack([test[i][0] for i in range(6)])
        noise = torch.rand(6, model.num_patches, generator=torch.Generator().manual_seed(0))
        mean, std = stats_for(cfg)
        paths[r.arm] = save_reconstruction_grid(model, imgs, path, mean, std, noise,
                                                upscale=max(1, 96 // cfg.model.img_size))
    for r in ix.runs:  # runs of this index drawn by an earlier report, their checkpoints gone
        earlier = out_dir / f"recon_{Path(r.folder).name}.png"
        if r.kind == "pretrain" and r.arm not in paths and earlier.exists():
            paths[r.arm] = earlier
    return paths


def claim_rows(ix: StudyIndex, spec: StudySpec) -> list[tuple[Claim, Verdict]]:
    return [(c, judge(ix, c)) for c in spec.claims]


def _claim_measure(c: Claim, v: Verdict) -> str:
    if v.value is None:
        return "–"
    if c.rule == "time_to_reference":
        return f"{v.value:.2f} × the reference's time"
    k, unit, d = (100.0, " points", 2) if is_accuracy(c.metric) else (1.0, "", 4)
    if c.rule == "threshold":
        return f"{k * v.value:.{d}f}" + ("%" if k == 100 else "")
    noise = "" if v.noise is None else f" (noise ±{k * v.noise:.{d}f}{unit}; n={v.n[0]} vs {v.n[1]})"
    return f"{k * v.value:+.{d}f}{unit}{noise}"


def _claim_rule(c: Claim, titles: dict[str, str]) -> str:
    k = 100.0 if is_accuracy(c.metric) and c.rule != "time_to_reference" else 1.0
    bounds = " and ".join(x for x in (f"≥ {k * c.at_least:g}" if c.at_least is not None else "",
                                       f"≤ {k * c.at_most:g}" if c.at_most is not None else "") if x)
    lf = f" at {lf_text(c.label_fraction)} labels" if c.metric.endswith("_top1") else ""
    arm = titles[c.arm] + (f" ({c.view})" if c.view != "auto" else "")
    ref = titles.get(c.reference, c.reference) + (f" ({c.reference_view})" if c.reference_view != "auto" else "")
    what = LABELS.get(c.metric, f"`{c.metric}`") + lf
    if c.rule == "difference":
        return f"{what}: {arm} − {ref} {bounds}"
    if c.rule == "time_to_reference":
        return f"{what}: time for {arm} to reach {ref}'s final value, over {ref}'s time, {bounds}"
    return f"{what} of {arm} {bounds}"


def write_report(study: str | Path | None = None, out: str | Path = "docs/RESULTS.md") -> Path:
    """Write ``out``, its plots and ``summary.json`` (in ``<out stem>/`` beside it) from ``study``."""
    from mimkit.study.runner import default_out

    study = Path(study) if study is not None else default_out("fmnist_study")
    out = Path(out)
    ix = StudyIndex.load(study / "study.json")
    whole = spec_from_dict(ix.spec, ix.name)
    spec = whole.quick_look() if ix.budget < 1 else whole  # what ran
    titles = {a.name: a.title or a.name for a in whole.arms}
    figs = out.parent / out.stem.lower()
    figs.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(figs, out.parent)
    plot_curves(ix, spec, figs / "accuracy_vs_time.png")
    plot_losses(ix, spec, figs / "loss_vs_time.png")
    recon = save_reconstructions(ix, study, figs)
    for old in set(figs.glob("recon_*.png")) - set(recon.values()):  # runs no longer shown
        old.unlink()
    verdicts = claim_rows(ix, spec)
    write_summary(ix, verdicts, figs / "summary.json")
    ix.save(figs / "study.json")  # the whole index: enough to rewrite this page or resume the study

    lines = [f"# Results: {ix.name}", "",
             f"Generated by `mimkit report` from `mimkit study {ix.source or '(Python API)'}`; every number "
             "and plot comes from the study's run index (`study.json`) and run folders, and the page is never "
             f"edited by hand. Machine-readable: [`{rel}/summary.json`]({rel}/summary.json); the whole index: "
             f"[`{rel}/study.json`]({rel}/study.json).", "",
             "## Setup", "", *setup_lines(ix, spec, study), *quick_lines(whole, ix.budget, titles), "",
             "## Claims", "",
             "Verdicts: a difference is the mean over seeds; a claimed gain or loss must also exceed "
             "twice its standard error (≥ 2 seeds each side) or the stated tolerance (one seed), else it "
             "is *within noise*. Times are read off the curves, linear between evaluation points.", "",
             "| claim | paper | rule | measured | verdict |", "|---|---|---|---|---|"]
    for c, v in verdicts:
        lines.append(f"| {c.name} | {c.paper or '–'} | {_claim_rule(c, titles)} | {_claim_measure(c, v)} "
                     f"| **{v.text}** |")
    lines += ["", "## Arms at the end of their runs", "",
              "Pre-training minutes: *calibrated* is steps × the arm's calibrated seconds per step (the "
              "curves' time axis); *measured* is the runs' own training time, which includes any sharing "
              "of the machine (mean over seeds).", "", *arm_table(ix, spec, titles), "",
              "## Time to the reference's final quality", "", *time_table(ix, spec, titles), "",
              "## Training-log metrics at the end of the runs", "", *log_table(ix, titles), "",
              "## Plots", "",
              f"![accuracy against pre-training wall-clock]({rel}/accuracy_vs_time.png)", "",
              f"![reconstruction loss against wall-clock]({rel}/loss_vs_time.png)", "",
              *(["Reconstructions of the same test images and masks (original | masked | reconstruction | "
                 "with the visible patches pasted), last checkpoint of each arm's first run that still has "
                 "its checkpoints:", "",
                 "| " + " | ".join(titles[a] for a in recon) + " |", "|" + "---|" * len(recon),
                 "| " + " | ".join(f"![{titles[a]}]({rel}/{p.name})" for a, p in recon.items()) + " |", ""]
                if recon else []),
              "## Reproduce", "", "```",
              f"mimkit study {ix.source}" + ("" if study.resolve() == default_out(ix.name).resolve()
                                             else f" --out {shown(study)}"),  # where the page's runs are
              f"mimkit report --study {shown(study)} --out {shown(out)}", "```", "",
              "Re-running the study computes only what is missing: runs are cached by their pre-training "
              "settings, evaluations by theirs, and an interrupted run resumes from its checkpoint. To go on "
              f"from this page on another machine, copy `{rel}/study.json` into the study folder first: its "
              "finished runs are reused without their checkpoints.", ""]
    out.write_text("\n".join(lines))
    return out


def quick_lines(whole: StudySpec, budget: float, titles: dict[str, str]) -> list[str]:
    """What a quick look (``--budget`` < 1) left out of the study file, if anything."""
    arms = [titles[a.name] for a in whole.arms if not a.quick]
    jobs = [f"at {lf_text(j.label_fraction)} labels" for j in whole.finetune if not j.quick]
    if budget >= 1 or (not arms and not jobs):
        return []
    named = ", ".join(f"*{t}*" for t in arms)  # a title may hold a comma ("MAE, predict 25 %")
    left = "; ".join(x for x in ((f"the arm{'s' * (len(arms) > 1)} {named}" if arms else ""),
                                 (f"fine-tuning {', '.join(jobs)}" if jobs else "")) if x)
    return [f"- Quick look (budget below 1): it leaves out {left} (marked `quick: false` in the study file); "
            "claims on them read *not measured*."]


def shown(path: Path) -> str:
    """``path`` as a reader can reuse it: relative under the working directory, ``~/…`` under home."""
    p = Path(path).absolute()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        if p.is_relative_to(base):
            return prefix + p.relative_to(base).as_posix()
    return p.as_posix()


def setup_lines(ix: StudyIndex, spec: StudySpec, study: Path) -> list[str]:
    from mimkit.config import config_from_dict
    from mimkit.models import model_from_config

    b = config_from_dict(ix.base_config)
    model = model_from_config(b)
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    e, env, sizes = b.eval, ix.environment, ix.data_sizes
    cal = {c.arm: c.s_per_step for c in ix.calibration}
    ref = cal.get(spec.reference)
    pre_s = sum(r.train_s for r in ix.runs)
    hosts: dict[str, list[str]] = {}
    for r in ix.runs:
        if r.kind == "pretrain":
            hosts.setdefault(r.host, []).append(f"{r.arm} s{r.seed}")
    if "" in hosts:
        hosts["not recorded"] = hosts.pop("")
    here = env.get("gpu") or env.get("cpu")  # the machine of the last call
    by_machine = len(hosts) > 1 or any(h != here for h in hosts)
    eval_s = sum(x.seconds for x in ix.evals)
    ran = {a.name: sorted({r.seed for r in ix.runs if r.arm == a.name}) for a in spec.arms}  # --budget < 1: fewer
    baselines = [a for a in spec.arms if not a.pretrain and ix.select(a.name, "knn_top1")]  # (older studies: none)
    return [
        f"- Data: `{b.data.name}`, {sizes.get('train', '?')} training / {sizes.get('test', '?')} test images "
        f"at {b.model.img_size} px; pre-training crop scale {b.data.crop_scale}, flip {b.data.hflip}.",
        f"- Model: `{b.model.arch}` ({model.pos_embed.shape[-1]}-d encoder, {len(model.blocks)} blocks, "
        f"{enc / 1e6:.2f} M encoder parameters), patch {model.patch_embed.patch_size[0]}, "
        f"{model.num_patches} patches, mask ratio {b.mask_ratio}.",
        f"- Pre-training: batch {b.train.batch_size}, blr {b.train.blr:g}, warm-up {spec.warmup:.0%} of each "
        f"run then cosine; {ix.steps_per_epoch} steps per epoch.",
        f"- Budget: every arm gets the same pre-training wall-clock, {ix.budget_s:.0f} s = "
        f"{spec.budget_epochs:g} epochs of `{spec.reference}` × budget {ix.budget:g}; each arm's step count "
        "comes from its calibrated seconds per step: "
        + ", ".join(f"{a} {s:.3f} s (×{s / ref:.2f})" for a, s in cal.items() if ref) + ". The time axes "
        "are steps × these calibrated seconds (timed once per arm, on an otherwise idle machine), so a run "
        "that shared the CPU or spanned several sittings is placed where it would be alone.",
        f"- Evaluation points: at {', '.join(f'{f:g}' for f in spec.eval_fractions)} of each run: k-NN (k={e.knn_k}, "
        f"T={e.knn_temperature}, `{e.feature}` features) and linear probe ({e.linprobe.optimizer}, "
        f"{e.linprobe.epochs} epochs on cached `{e.linprobe.feature}` features) on "
        f"{', '.join(lf_text(f) for f in spec.label_fractions)} of the training labels (class-balanced, seeded"
        + (f", at most {e.max_train_samples} images" if e.max_train_samples else "") + "); top-1 on the whole "
        "test split.",
        "- Fine-tuning at the end of each run: "
        + "; ".join(f"{lf_text(j.label_fraction)} labels: "
                    f"{', '.join(j.arms or [a.name for a in spec.arms if a.finetunes])}"
                    + (f" ({' '.join(j.overrides)})" if j.overrides else "") for j in spec.finetune)
        + f" — recipe `eval.finetune` (epochs {b.eval.finetune.epochs} × budget, batch "
        f"{b.eval.finetune.batch_size}, blr {b.eval.finetune.blr:g}, layer decay {b.eval.finetune.layer_decay}).",
        *([("- Baselines, evaluated once with the same protocols (no pre-training, a horizontal line in the "
             "plots): " + "; ".join(f"{a.title or a.name}: " + ("the input pixels themselves (each test and bank image "
                                    "flattened as the features)" if a.baseline == "pixels" else "the encoder at "
                                    "random initialisation (where the from-scratch fine-tunes start)")
                                    for a in baselines) + ".")] if baselines else []),
        "- Seeds: " + ", ".join(f"{a.title or a.name} {ran[a.name]}"
                                + (f" of {a.seeds}" if ran[a.name] != a.seeds else "") for a in spec.arms) + ".",
        f"- Compute: {pre_s / 60:.0f} min of pre-training, {eval_s / 60:.0f} min of evaluation and fine-tuning."
        + (f" Finished {ix.finished}." if ix.finished else " (study not finished)"),
        f"- Hardware and versions{' of the last call' if by_machine else ''}: {env.get('cpu', '?')} "
        f"({env.get('cpu_count', '?')} cores, "
        f"{env.get('torch_threads', '?')} torch threads), device {env.get('device', '?')}"
        + (f" ({env['gpu']})" if env.get("gpu") else "")
        + f"; Python {env.get('python', '?')}, torch {env.get('torch', '?')}, timm {env.get('timm', '?')}, "
        f"mimkit {env.get('mimkit', '?')}; {env.get('platform', '')}.",
        *(["- Pre-training runs by machine: " + "; ".join(f"{h}: {', '.join(r)}" for h, r in hosts.items()) + "."]
          if by_machine else []),
    ]


def _views(ix: StudyIndex, arm: str) -> list[str]:
    return [v for v in ("auto", "student") if any(e.arm == arm and e.view == v for e in ix.evals)]


def arm_table(ix: StudyIndex, spec: StudySpec, titles: dict[str, str]) -> list[str]:
    fracs = sorted({f for f in spec.label_fractions} | {j.label_fraction for j in spec.finetune})
    cols = [(m, f) for m in FROZEN for f in spec.label_fractions] + \
           [("finetune_top1", f) for f in fracs if any(j.label_fraction == f for j in spec.finetune)] + \
           [("pairwise_mse", None)]
    head = ["arm", "steps", "pre-train min (calibrated)", "measured min"] + \
        [f"{LABELS[m]} {lf_text(f)}".strip() for m, f in cols]
    cal = {c.arm: c.s_per_step for c in ix.calibration}
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in spec.arms:
        runs = [r for r in ix.runs if r.arm == a.name]
        for view in _views(ix, a.name) or ["auto"]:
            steps = sorted({r.steps for r in runs})
            minutes = [r.train_s / 60 for r in runs]
            calibrated = [r.steps * cal[a.name] / 60 for r in runs if a.name in cal]
            cells = [titles[a.name] + (" (student)" if view == "student" else ""),
                     "/".join(map(str, steps)) or "–",
                     f"{statistics.fmean(calibrated):.1f}" if calibrated else "–",
                     f"{statistics.fmean(minutes):.1f}" if minutes else "–"]
            cells += [fmt(ix.final(a.name, m, f, view), m) for m, f in cols]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def time_table(ix: StudyIndex, spec: StudySpec, titles: dict[str, str]) -> list[str]:
    """For each arm and frozen metric: when its mean curve first reaches the reference's final value."""
    cols = [(m, f) for m in FROZEN for f in spec.label_fractions]
    rows = ["Fraction of the reference's (`" + titles[spec.reference] + "`) pre-training time at which each "
            "arm's mean curve first reaches the reference's final value.", "",
            "| arm | " + " | ".join(f"{LABELS[m]} {lf_text(f)}" for m, f in cols) + " |",
            "|" + "---|" * (len(cols) + 1)]
    for a in (a for a in spec.arms if a.pretrain):  # baselines have no curve
        for view in _views(ix, a.name):
            cells = []
            for m, f in cols:
                ref = [(t, v) for t, v, _ in ix.curve(spec.reference, m, f)]
                v = time_ratio([(t, x) for t, x, _ in ix.curve(a.name, m, f, view)], ref)
                cells.append(f"{v.value:.2f}" if v.value is not None else v.text)
            if any(c != "not measured" for c in cells):
                title = titles[a.name] + (" (student)" if view == "student" else "")
                rows.append(f"| {title} | " + " | ".join(cells) + " |")
    return rows


def log_table(ix: StudyIndex, titles: dict[str, str]) -> list[str]:
    """Final means of the metrics log's accuracies (e.g. homologous recognition) and losses."""
    metrics = sorted({e.metric for e in ix.evals if e.protocol == "train_log"})
    if not metrics:
        return ["(none logged)"]
    rows = ["Mean over the steps since the previous evaluation point, at the last point of each run.", "",
            "| arm | " + " | ".join(f"`{m}`" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for arm in ix.arms():
        if any(e.arm == arm and e.protocol == "train_log" for e in ix.evals):
            rows.append(f"| {titles.get(arm, arm)} | " + " | ".join(fmt(ix.final(arm, m), m) for m in metrics) + " |")
    return rows


def write_summary(ix: StudyIndex, verdicts: list[tuple[Claim, Verdict]], path: Path) -> Path:
    """One record per (arm, seed, evaluation point) with its measured metrics; one per claim."""
    points: dict[tuple, dict] = {}
    for e in ix.evals:
        p = points.setdefault((e.arm, e.seed, e.step), {"arm": e.arm, "seed": e.seed, "step": e.step,
                                                       "wall_s": e.wall_s, "metrics": []})
        p["metrics"].append({k: getattr(e, k) for k in ("protocol", "metric", "label_fraction", "split",
                                                        "view", "value")})
    claims = [{**dataclasses.asdict(c), "verdict": v.text, "holds": v.holds, "measured": v.value,
               "noise": v.noise, "n": list(v.n)} for c, v in verdicts]
    path.write_text(json.dumps({"study": ix.name, "source": ix.source, "budget": ix.budget,
                                "budget_s": ix.budget_s, "points": list(points.values()), "claims": claims},
                               indent=1))
    return path
