"""``mimkit study`` and ``mimkit report`` on a tiny synthetic study: the plan, caching, resume,
wall-clock calibration, verdicts and the generated page."""

from __future__ import annotations

import json

import pytest

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.report import compare, write_report
from mimkit.study import Study, load_study

TINY_STUDY = [
    "data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0", "model.img_size=16",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
    "model.decoder_depth=1", "model.decoder_num_heads=2", "train.batch_size=8", "eval.batch_size=32",
    "eval.linprobe.epochs=2", "eval.linprobe.warmup_epochs=0", "eval.finetune.batch_size=16",
    "study.methods=[mae,emae,rcmae]", "study.seeds=[0,1]", "study.label_fractions=[0.5,1.0]",
    "study.finetune_steps=1", "study.consistency_images=8",
]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    scfg, base = load_study("fmnist_study", TINY_STUDY)
    Study(scfg, base, out, budget=0.5).run()
    return out


def test_plan_runs_and_evaluations(study_dir):
    index = json.loads((study_dir / "study.json").read_text())
    runs = index["runs"]
    expected = {"mae-epochs-s0", "emae-epochs-s0", "rcmae-epochs-s0", "mae-time1-s0", "emae-time1-s0",
                "rcmae-time1-s0", "mae-epochs-s1", "emae-time1-s1", "scratch-s0", "scratch-s1"}
    assert set(runs) == expected
    assert runs["mae-epochs-s0"]["steps"] == 4  # budget 0.5 x 1 epoch of 64 images at batch 8
    # MAE at 1x its own time is the same config, hence the same (shared) run folder.
    assert runs["mae-time1-s0"]["dir"] == runs["mae-epochs-s0"]["dir"]
    cal = next(iter(index["calibration"].values()))
    steps = round(cal["reference_s"] / cal["s_per_step"]["emae"])
    assert runs["emae-time1-s0"]["steps"] == max(1, steps)
    for info in runs.values():
        evals = json.loads((study_dir / info["dir"] / "study_eval.json").read_text())
        if info["pretrained"]:
            assert {"knn_lf0.5", "knn_lf1"} <= set(evals)
            assert sum(k.startswith("linprobe_lf") for k in evals) == 2
            assert any(k.startswith("consistency") for k in evals)
            assert 0.0 <= evals["knn_lf1"]["value"] <= 1.0
            assert evals["knn_lf0.5"]["bank_size"] == 30  # class-balanced half of 64 images, 10 classes
    rc = json.loads((study_dir / runs["rcmae-epochs-s0"]["dir"] / "study_eval.json").read_text())
    assert {"student_knn_lf1", "student_knn_lf0.5"} <= set(rc)  # the teacher's student, too
    scratch = json.loads((study_dir / runs["scratch-s0"]["dir"] / "study_eval.json").read_text())
    assert {k.split("_s")[0] for k in scratch} == {"finetune_lf0.5", "finetune_lf1"}
    seed1 = json.loads((study_dir / runs["emae-time1-s1"]["dir"] / "study_eval.json").read_text())
    assert any(k.startswith("finetune_lf0.5") for k in seed1)


def test_rerun_computes_nothing(study_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    monkeypatch.setattr("mimkit.engine.trainer.pretrain", boom)
    monkeypatch.setattr("mimkit.eval.finetune.run_finetune", boom)
    monkeypatch.setattr("mimkit.study.Study._features", boom)
    scfg, base = load_study("fmnist_study", TINY_STUDY)
    Study(scfg, base, study_dir, budget=0.5).run()


def test_interrupted_run_resumes(study_dir, monkeypatch):
    index = json.loads((study_dir / "study.json").read_text())
    run = study_dir / index["runs"]["rcmae-epochs-s0"]["dir"]
    (run / "done.json").unlink()
    calls = []
    import mimkit.engine.trainer as trainer

    real = trainer.pretrain

    def spy(cfg, r, resume=False, **kw):
        calls.append(resume)
        return real(cfg, r, resume, **kw)

    monkeypatch.setattr(trainer, "pretrain", spy)
    scfg, base = load_study("fmnist_study", TINY_STUDY)
    Study(scfg, base, study_dir, budget=0.5).run()
    assert calls == [True] and (run / "done.json").exists()


def test_report_page_and_plots(study_dir, tmp_path):
    out = write_report(study_dir, tmp_path / "RESULTS.md")
    text = out.read_text()
    for heading in ("## Setup", "## Claims", "## Matched epochs", "## Matched wall-clock", "## Seeds"):
        assert heading in text
    assert "EMAE reaches MAE's quality" in text and "→ **" in text
    assert "(n=2)" in text  # two seeds of the headline pair
    assert "RC-MAE (student)" in text and "RC-MAE (teacher)" in text
    for png in ("accuracy_vs_time.png", "loss_curves.png", "recon_mae.png", "recon_emae.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    assert "torch " in text and "Hardware" in text


def test_compare_verdicts():
    assert compare([0.80, 0.81, 0.82], [0.70, 0.71, 0.72])[0] == "better"
    assert compare([0.70, 0.71, 0.72], [0.80, 0.81, 0.82])[0] == "worse"
    assert compare([0.70, 0.75, 0.80], [0.72, 0.76, 0.78])[0] == "within noise"
    assert compare([0.5], [0.4], noise=0.01)[0] == "better"
    assert compare([0.5], [0.4], higher_is_better=False, noise=0.01)[0] == "worse"
    assert compare([0.5], [0.49], noise=0.01)[0] == "within noise"


@pytest.mark.parametrize("override, message", [
    ("study.methods=[emae,mae]", "must start with 'mae'"),
    ("study.seeds=[]", "at least one seed"),
    ("study.label_fractions=[0.0]", "label_fractions"),
    ("study.epoch=2", "did you mean 'study.epochs'"),
    ("study.methods=[mae,mea]", "unknown 'mea'"),
])
def test_bad_study_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study("fmnist_study", [override])


def test_cli_errors(tmp_path, capsys):
    assert main(["study", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "no study preset" in capsys.readouterr().err
    assert main(["study", "--budget", "0", "--out", str(tmp_path), *TINY_STUDY]) == 2


def test_evaluation_settings_do_not_change_the_run():
    from mimkit.study import config_hash

    _, base = load_study("fmnist_study", TINY_STUDY)
    _, other_eval = load_study("fmnist_study", [*TINY_STUDY, "eval.finetune.blr=0.01", "data.num_workers=2"])
    _, other_train = load_study("fmnist_study", [*TINY_STUDY, "train.blr=0.01"])
    assert config_hash(base) == config_hash(other_eval)
    assert config_hash(base) != config_hash(other_train)


def test_renamed_run_folder_is_found_by_its_config(study_dir):
    scfg, base = load_study("fmnist_study", TINY_STUDY)
    study = Study(scfg, base, study_dir, budget=0.5)
    cfg = study.run_config("mae", 0, 4)
    run = study.find_run(cfg)
    moved = run.with_name("mae-s0-oldhash")
    run.rename(moved)
    try:
        assert study.find_run(cfg) == moved
    finally:
        moved.rename(run)
