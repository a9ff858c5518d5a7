"""``mimkit study`` and ``mimkit report`` end to end on a tiny synthetic study: the plan, the
wall-clock budget, caching, resume, the typed index and the generated page."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.study import Study, StudyIndex, load_study, write_report
from mimkit.study.report import shown

TINY = {
    "method": "mae", "mask_ratio": 0.75,
    "model": {"arch": "vit_tiny_small_images", "img_size": 16, "in_chans": 1, "embed_dim": 32, "depth": 2,
              "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "data": {"name": "synthetic", "synthetic_size": 64, "num_workers": 0},
    "train": {"batch_size": 8, "blr": 1e-3, "loggers": []},
    "eval": {"batch_size": 64, "linprobe": {"epochs": 2, "warmup_epochs": 0},
             "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 16}},
    "study": {
        "reference": "foo", "budget_epochs": 1.0, "calibration_steps": 4, "eval_fractions": [0.34, 0.67, 1.0],
        "label_fractions": [0.5, 1.0],
        "arms": [{"name": "foo", "title": "Foo", "overrides": ["method=mae"], "seeds": [0, 1]},
                 {"name": "bar", "overrides": ["method=rcmae"], "seeds": [0, 1]},
                 {"name": "zero", "pretrain": False, "seeds": [0, 1]},
                 {"name": "pix", "title": "pixels", "pretrain": False, "baseline": "pixels"}],
        "finetune": [{"label_fraction": 0.5, "arms": ["foo", "zero"]}, {"label_fraction": 1.0}],
        "claims": [
            {"name": "bar sooner", "rule": "time_to_reference", "arm": "bar", "reference": "foo", "at_most": 1.0},
            {"name": "foo beats zero", "rule": "difference", "arm": "foo", "reference": "zero",
             "metric": "finetune_top1", "label_fraction": 0.5, "at_least": 0.0},
            {"name": "teacher vs student", "rule": "difference", "arm": "bar", "reference": "bar",
             "reference_view": "student", "at_least": 0.0, "tolerance": 0.01},
            {"name": "loss low", "rule": "threshold", "arm": "foo", "metric": "loss", "at_most": 10.0},
        ],
    },
}


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def study_dir(study_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    spec, base = load_study(study_file)
    Study(spec, base, out).run()
    return out


def test_plan_budget_and_index(study_dir):
    ix = StudyIndex.load(study_dir / "study.json")
    assert {(r.arm, r.seed, r.kind) for r in ix.runs} == {
        ("foo", 0, "pretrain"), ("foo", 1, "pretrain"), ("bar", 0, "pretrain"), ("bar", 1, "pretrain"),
        ("zero", 0, "scratch"), ("zero", 1, "scratch"), ("pix", 0, "pixels")}
    cal = {c.arm: c.s_per_step for c in ix.calibration}
    assert ix.budget_s == pytest.approx(1.0 * 8 * cal["foo"])  # 1 epoch of foo = 64 / 8 steps
    for r in ix.runs:
        if r.kind == "pretrain":  # the same wall-clock for every arm, from its calibrated step time
            assert r.steps == max(3, round(ix.budget_s / cal[r.arm]))
            assert r.eval_steps[-1] == r.steps and len(r.eval_steps) >= 2
            for step in r.eval_steps:
                for metric in ("knn_top1", "linprobe_top1"):
                    for f in (0.5, 1.0):
                        hits = [e for e in ix.select(r.arm, metric, f, seed=r.seed) if e.step == step]
                        assert len(hits) == 1 and 0.0 <= hits[0].value <= 1.0
    walls = [e.wall_s for e in ix.select("foo", "knn_top1", 1.0, seed=0)]
    assert walls == sorted(walls) and walls[0] > 0
    assert ix.final("bar", "knn_top1", 1.0, view="student")  # teacher-student runs: both views
    assert len(ix.final("foo", "finetune_top1", 0.5)) == 2 and len(ix.final("zero", "finetune_top1", 0.5)) == 2
    assert not ix.final("bar", "finetune_top1", 0.5)  # not in the job's arms
    # The baselines: k-NN and probe once (step 0); the pixels are never fine-tuned, even by a job for all arms
    for arm, n in (("zero", 2), ("pix", 1)):
        for metric in ("knn_top1", "linprobe_top1"):
            for f in (0.5, 1.0):
                hits = ix.select(arm, metric, f)
                assert len(hits) == n and {e.step for e in hits} == {0} and all(0 <= e.value <= 1 for e in hits)
    assert len(ix.final("foo", "finetune_top1", 1.0)) == 2 and len(ix.final("zero", "finetune_top1", 1.0)) == 2
    assert not ix.select("pix", "finetune_top1")
    assert ix.final("foo", "loss")  # the metrics log, as records
    assert len(ix.final("bar", "pairwise_mse")) == 2  # prediction consistency at the end of each run


def test_index_round_trip(study_dir, tmp_path):
    ix = StudyIndex.load(study_dir / "study.json")
    ix.save(tmp_path / "copy.json")
    assert StudyIndex.load(tmp_path / "copy.json") == ix


def test_rerun_computes_nothing(study_file, study_dir, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    before = (study_dir / "study.json").read_text()
    monkeypatch.setattr("mimkit.engine.trainer.pretrain", boom)
    monkeypatch.setattr("mimkit.eval.finetune.run_finetune", boom)
    monkeypatch.setattr("mimkit.study.runner.Study._frozen", boom)
    spec, base = load_study(study_file)
    with caplog.at_level("INFO", logger="mimkit"):
        Study(spec, base, study_dir).run()
    old, new = json.loads(before), json.loads((study_dir / "study.json").read_text())
    for key in ("runs", "evals", "calibration"):
        assert new[key] == old[key]
    budget = new["budget_s"]  # the plan is announced once the arms are timed: 4 runs of the budget
    assert f"study: 4 pre-training runs of {budget:.0f} s each: {4 * budget / 3600:.1f} h" in caplog.text


def test_the_index_alone_resumes_on_another_machine(study_file, study_dir, tmp_path, monkeypatch):
    """A copy of ``study.json`` without the run folders (the report keeps one beside the page):
    nothing is recomputed; an evaluation it lacks fails with the fix instead of a traceback."""
    def boom(*args, **kwargs):
        raise AssertionError("a result kept in the index was recomputed")

    write_report(study_dir, tmp_path / "page" / "RESULTS.md")
    old = StudyIndex.load(tmp_path / "page" / "results" / "study.json")
    assert old == StudyIndex.load(study_dir / "study.json")
    assert all(0 < len(r.losses) <= 200 and r.host for r in old.runs if r.kind == "pretrain")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "study.json").write_text((tmp_path / "page" / "results" / "study.json").read_text())
    monkeypatch.setattr("mimkit.engine.trainer.pretrain", boom)
    monkeypatch.setattr("mimkit.eval.finetune.run_finetune", boom)
    monkeypatch.setattr("mimkit.study.runner.Study._frozen", boom)
    spec, base = load_study(study_file)
    Study(spec, base, fresh).run()
    new = StudyIndex.load(fresh / "study.json")
    key = lambda e: (e.arm, e.seed, e.step, e.protocol, e.metric, e.label_fraction, e.view)  # noqa: E731
    assert sorted(map(key, new.evals)) == sorted(map(key, old.evals))
    assert {(r.arm, r.seed): r for r in new.runs} == {(r.arm, r.seed): r for r in old.runs}
    assert write_report(fresh, tmp_path / "again" / "RESULTS.md").exists()  # loss curves from the index

    spec, base = load_study(study_file, ["study.finetune=[{label_fraction: 0.25, arms: [bar]}]"])
    with pytest.raises(ConfigError, match="no checkpoint to evaluate or fine-tune; delete the folder"):
        Study(spec, base, fresh).run()
    stopped = StudyIndex.load(fresh / "study.json")  # stopped at seed 0: seed 1 is still recorded
    assert {(r.arm, r.seed) for r in stopped.runs} == {(r.arm, r.seed) for r in old.runs}
    assert [e for e in stopped.evals if e.seed == 1] == [e for e in old.evals if e.seed == 1]
    spec, base = load_study(study_file)  # a quick look would drop seed 1, kept only in the index
    with pytest.raises(ConfigError, match=r"does not include and whose folders are gone \(zero s1, foo s1, bar s1\)"):
        Study(spec, base, fresh, budget=0.5)


def test_a_copied_index_whose_baselines_lack_frozen_evals_resumes_twice(study_dir, study_file, tmp_path, monkeypatch):
    """An index from before the baselines had k-NN and probe records: the first call computes them
    for the (kept) baseline runs, and the folder it writes carries the index's other records of the
    run, so a second call recomputes nothing, fine-tunes included."""
    def boom(*args, **kwargs):
        raise AssertionError("a result kept in the index was recomputed")

    old = StudyIndex.load(study_dir / "study.json")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    frozen = ("knn", "linprobe")
    dataclasses.replace(old, evals=[e for e in old.evals if not (e.arm in ("zero", "pix") and e.protocol in frozen)]
                        ).save(fresh / "study.json")
    monkeypatch.setattr("mimkit.eval.finetune.run_finetune", boom)
    monkeypatch.setattr("mimkit.engine.trainer.pretrain", boom)
    spec, base = load_study(study_file)
    Study(spec, base, fresh).run()
    first = StudyIndex.load(fresh / "study.json")
    for arm, n in (("zero", 2), ("pix", 1)):
        assert len(first.select(arm, "knn_top1", 1.0)) == n
    monkeypatch.setattr("mimkit.study.runner.Study._frozen", boom)
    Study(spec, base, fresh).run()
    second = StudyIndex.load(fresh / "study.json")
    key = lambda e: (e.arm, e.seed, e.step, e.protocol, e.metric, e.label_fraction, e.view, e.value)  # noqa: E731
    assert sorted(map(key, second.evals)) == sorted(map(key, first.evals))
    assert len(second.final("zero", "finetune_top1", 0.5)) == 2


def test_interrupted_run_resumes(study_file, study_dir, monkeypatch):
    ix = StudyIndex.load(study_dir / "study.json")
    rec = next(r for r in ix.runs if r.arm == "bar" and r.seed == 1)
    run = study_dir / rec.folder
    (run / "done.json").unlink()  # as if killed between its last two evaluation points
    (run / f"checkpoint-{rec.steps:08d}.pt").unlink()
    calls = []
    import mimkit.engine.trainer as trainer

    real = trainer.pretrain

    def spy(cfg, r, resume=False, **kw):
        calls.append(resume)
        return real(cfg, r, resume, **kw)

    monkeypatch.setattr(trainer, "pretrain", spy)
    spec, base = load_study(study_file)
    Study(spec, base, study_dir).run()
    assert calls == [True] and (run / "done.json").exists()
    assert (run / f"checkpoint-{rec.steps:08d}.pt").exists()
    from mimkit.engine.logging import read_metrics

    assert [r["step"] for r in read_metrics(run)] == list(range(1, rec.steps + 1))  # each step once


def test_report_is_generic(study_dir, tmp_path):
    out = write_report(study_dir, tmp_path / "RESULTS.md")
    text = out.read_text()
    for heading in ("## Setup", "## Claims", "## Arms at the end", "## Time to the reference", "## Plots"):
        assert heading in text
    assert "| Foo |" in text and "| bar (student) |" in text and "| zero |" in text and "| pixels |" in text
    assert "- Baselines, evaluated once" in text and "pixels: the input pixels themselves" in text
    times = text.split("## Time to the reference")[1].split("##")[0]
    assert "| Foo |" in times and "| zero |" not in times and "| pixels |" not in times  # no curve, no time
    # the arms table gives the calibrated minutes (steps x s/step) beside the measured ones
    ix = StudyIndex.load(study_dir / "study.json")
    cal = {c.arm: c.s_per_step for c in ix.calibration}
    runs = [r for r in ix.runs if r.arm == "foo"]
    steps, measured = runs[0].steps, statistics.fmean(r.train_s / 60 for r in runs)
    row = next(line for line in text.splitlines() if line.startswith("| Foo |"))
    assert f"| {steps} | {steps * cal['foo'] / 60:.1f} | {measured:.1f} |" in row
    assert "`synthetic`" in text and "patch 4" in text and "torch " in text
    for name in ("MAE", "EMAE", "RC-MAE", "MixedAE", "Fashion"):
        assert name not in text
    first = {arm: Path(next(r.folder for r in ix.runs if r.arm == arm)).name for arm in ("foo", "bar")}
    recons = [f"recon_{first['foo']}.png", f"recon_{first['bar']}.png"]
    for png in ("accuracy_vs_time.png", "loss_vs_time.png", *recons):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    # Rewritten from a copy of the index alone (no checkpoints here): the pictures of its runs stay
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(study_dir / "study.json", copied / "study.json")
    assert all(f"results/{png})" in write_report(copied, out).read_text() for png in recons)
    assert sorted(p.name for p in (tmp_path / "results").glob("recon_*.png")) == sorted(recons)
    assert "Reconstructions" not in write_report(copied, tmp_path / "elsewhere" / "RESULTS.md").read_text()
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert {c["name"] for c in summary["claims"]} == {c["name"] for c in TINY["study"]["claims"]}
    assert all(c["verdict"] for c in summary["claims"])
    point = next(p for p in summary["points"] if p["arm"] == "foo")
    assert {m["metric"] for m in point["metrics"]} >= {"knn_top1", "linprobe_top1"}


def test_report_names_the_seeds_that_ran(study_dir, tmp_path):
    """A quick look (--budget < 1) runs fewer seeds than the file declares; the page says which."""
    text = write_report(study_dir, tmp_path / "a.md").read_text()
    assert "- Seeds: Foo [0, 1], bar [0, 1], zero [0, 1], pixels [0]." in text
    quick = tmp_path / "quick"
    shutil.copytree(study_dir, quick)
    ix = StudyIndex.load(quick / "study.json")
    dataclasses.replace(ix, runs=[r for r in ix.runs if r.seed == 0],
                        evals=[e for e in ix.evals if e.seed == 0]).save(quick / "study.json")
    text = write_report(quick, tmp_path / "b.md").read_text()
    assert "- Seeds: Foo [0] of [0, 1], bar [0] of [0, 1], zero [0] of [0, 1], pixels [0]." in text
    # the Reproduce block runs the study into the folder the page was written from
    assert f"mimkit study {ix.source} --out {quick}\n" in text


def test_report_paths_are_portable(monkeypatch, tmp_path):
    """The Reproduce block names no machine-specific folder: home becomes ~, the checkout relative."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert shown(tmp_path / "home" / ".cache" / "s") == "~/.cache/s"
    assert shown(tmp_path / "repo" / "docs" / "RESULTS.md") == "docs/RESULTS.md"
    assert shown(Path("/opt/x")) == "/opt/x"


@pytest.mark.parametrize("override, message", [
    ("study.reference=nope", "no arm named 'nope'"),
    ("study.eval_fractions=[0.0]", "eval_fractions"),
    ("study.budget_epoch=2", "did you mean 'study.budget_epochs'"),
    ("study.arms=[{name: a, overrides: [method=mea]}]", "unknown 'mea'"),
    ("study.claims=[{name: c, rule: guess, arm: foo, at_least: 0}]", "rule must be one of"),
    ("study.claims=[{name: c, rule: threshold, arm: foo}]", "at_least or at_most"),
])
def test_bad_study_file(study_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(study_file, [override])


def test_cli_errors(study_file, tmp_path, capsys):
    assert main(["study", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "no study preset" in capsys.readouterr().err
    assert main(["study", "--config", str(study_file), "--budget", "0", "--out", str(tmp_path)]) == 2


def test_evaluation_settings_do_not_change_the_run(study_file):
    from mimkit.study import config_hash

    _, base = load_study(study_file)
    _, other_eval = load_study(study_file, ["eval.finetune.blr=0.01", "data.num_workers=2"])
    _, other_train = load_study(study_file, ["train.blr=0.01"])
    assert config_hash(base) == config_hash(other_eval)
    assert config_hash(base) != config_hash(other_train)


def test_quick_look_keeps_fewer_seeds(study_file, tmp_path):
    spec, base = load_study(study_file)
    study = Study(spec, base, tmp_path, budget=0.25)
    assert study.seeds(spec.arm("foo")) == [0]
    assert Study(spec, base, tmp_path, budget=0.5).seeds(spec.arm("foo")) == [0]
    assert Study(spec, base, tmp_path, budget=2).seeds(spec.arm("foo")) == [0, 1]


def test_default_output_is_outside_the_checkout(monkeypatch, tmp_path):
    from mimkit.study import default_out

    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path))
    assert default_out("x") == tmp_path / "study" / "x"


def test_shipped_preset_loads():
    from mimkit.config import Config

    if not hasattr(Config(), "decoder"):
        pytest.skip("the preset's partial-reconstruction arm needs decoder.predict_ratio")
    spec, _ = load_study("fmnist_study")
    assert spec.reference == "mae" and spec.budget_epochs >= 8 and len(spec.eval_fractions) >= 4


def test_run_cache_key_counts_only_non_default_pretraining_settings():
    """A key mimkit adds later (at its default) or a bookkeeping/evaluation change keeps every
    cached run; a pre-training change does not."""
    from mimkit.config import load_config
    from mimkit.study.runner import config_hash, pretraining_key

    assert pretraining_key(load_config(None)) == {}
    base = load_config("fmnist_tiny")
    same = load_config("fmnist_tiny", ["train.log_every=7", "eval.knn_k=5", "train.amp=auto"])
    assert config_hash(same) == config_hash(base)
    assert config_hash(load_config("fmnist_tiny", ["mask_ratio=0.5"])) != config_hash(base)


def test_quick_look_leaves_out_what_the_file_marks(study_file, tmp_path):
    """A budget below 1 drops the arms and fine-tuning jobs marked ``quick: false`` and uses the
    quick evaluation points; the claims stay (one on a dropped arm reads "not measured")."""
    raw = yaml.safe_load(study_file.read_text())
    s = raw["study"]
    s["quick_eval_fractions"] = [1.0]
    s["arms"][1]["quick"] = False  # bar
    s["finetune"].append({"label_fraction": 1.0, "arms": ["foo", "bar"], "quick": False})
    path = tmp_path / "marked.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec, base = load_study(path)
    full = Study(spec, base, tmp_path / "full").spec
    assert [a.name for a in full.arms] == ["foo", "bar", "zero", "pix"] and len(full.finetune) == 3
    assert full.eval_fractions == [0.34, 0.67, 1.0]
    quick = Study(spec, base, tmp_path / "quick", budget=0.25).spec
    assert [a.name for a in quick.arms] == ["foo", "zero", "pix"]
    assert [(j.label_fraction, j.arms) for j in quick.finetune] == [(0.5, ["foo", "zero"]), (1.0, None)]
    assert quick.eval_fractions == [1.0] and quick.claims == spec.claims
    assert [a.name for a in spec.arms] == ["foo", "bar", "zero", "pix"]  # the loaded spec is left as it was

    for arm, error in (({"name": "p2", "baseline": "pixels"}, "baseline must be one of"),
                       ({"name": "p2", "pretrain": False, "baseline": "noise"}, "baseline must be one of")):
        bad = yaml.safe_load(study_file.read_text())
        bad["study"]["arms"].append(arm)
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=error):
            load_study(path)
    bad = yaml.safe_load(study_file.read_text())
    bad["study"]["finetune"].append({"label_fraction": 1.0, "arms": ["pix"]})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="'pix' is the pixels baseline, which has no encoder to fine-tune"):
        load_study(path)
    for claim, error in (({"rule": "time_to_reference", "arm": "foo", "reference": "zero"}, "a baseline"),
                         ({"rule": "difference", "arm": "foo", "reference": "pix", "metric": "finetune_top1"},
                          "never fine-tuned")):
        bad = yaml.safe_load(study_file.read_text())
        bad["study"]["claims"].append({"name": "c", "at_most": 1.0, **claim})
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=error):
            load_study(path)

    s["quick_eval_fractions"] = []
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="study.quick_eval_fractions"):
        load_study(path)
    s["quick_eval_fractions"] = [1.0]
    s["arms"][0]["quick"] = False  # the reference must be in the quick look
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="study.reference"):
        load_study(path)


def test_quick_look_runs_and_reports_what_it_left_out(study_file, tmp_path):
    raw = yaml.safe_load(study_file.read_text())
    raw["study"]["arms"][1]["quick"] = False
    raw["study"]["quick_eval_fractions"] = [1.0]
    path = tmp_path / "marked.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec, base = load_study(path)
    out = Study(spec, base, tmp_path / "quick", budget=0.5).run()
    ix = StudyIndex.load(out)
    assert {r.arm for r in ix.runs} == {"foo", "zero", "pix"} and {r.seed for r in ix.runs} == {0}
    foo = next(r for r in ix.runs if r.arm == "foo")
    assert foo.eval_steps == [foo.steps]  # quick_eval_fractions: the end of the run only
    assert [a["name"] for a in ix.spec["arms"]] == ["foo", "bar", "zero", "pix"]  # the index keeps the whole file
    text = write_report(out.parent, tmp_path / "q.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| bar sooner"))
    assert "not measured" in row
    assert "- Quick look (budget below 1): it leaves out the arm *bar* (marked `quick: false`" in text
