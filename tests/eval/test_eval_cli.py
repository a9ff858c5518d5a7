import hashlib
import json

import torch
import yaml

from mimkit.cli import main
from mimkit.interop.official import to_official
from mimkit.models import model_from_config


def test_eval_knn_writes_json_next_to_checkpoint(tiny_ckpt):
    assert main(["eval", "knn", "--checkpoint", str(tiny_ckpt)]) == 0
    rec = json.loads((tiny_ckpt.parent / "eval_knn.json").read_text())
    assert rec["metric"] == "knn_top1" and rec["split"] == "test" and 0 <= rec["value"] <= 1
    assert rec["checkpoint_sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert rec["config"]["model"]["embed_dim"] == 32 and rec["timings"]["wall_s"] > 0


def test_eval_linprobe_and_finetune_with_overrides(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["eval", "linprobe", "--checkpoint", str(tiny_ckpt), "--out", str(out),
                 "eval.linprobe.epochs=2"]) == 0
    assert json.loads((out / "eval_linprobe.json").read_text())["details"]["epochs"] == 2
    assert main(["eval", "finetune", "--checkpoint", str(tiny_ckpt), "--out", str(out),
                 "data.label_fraction=0.5"]) == 0
    rec = json.loads((out / "eval_finetune_lf0.5.json").read_text())
    assert rec["label_fraction"] == 0.5 and rec["details"]["train_size"] == 60
    assert not list(out.glob("*.state.pt"))  # the saved progress goes once the result is stored
    printed = capsys.readouterr().out
    assert "weakest classes: " in printed and "classifier: " in printed
    per_class = rec["details"]["per_class_top1"]
    assert len(per_class) == rec["details"]["num_classes"] and all(0 <= v <= 1 for v in per_class.values())

    # The fine-tuned classifier is kept: timm rebuilds it, and it scores the record's number.
    import timm
    from torch.utils.data import DataLoader

    from mimkit.config import config_from_dict
    from mimkit.eval.common import labelled_dataset
    from mimkit.eval.finetune import evaluate_classifier

    folder = out / "eval_finetune_lf0.5"
    assert rec["details"]["classifier"] == str(folder)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == list(per_class)
    test = labelled_dataset(config_from_dict(rec["config"]), "test")
    assert evaluate_classifier(model, DataLoader(test, batch_size=64), torch.device("cpu")) == rec["value"]


def test_knn_grid_is_chosen_on_val_and_refused_on_test(tmp_path, make_cfg, save_ckpt, capsys):
    """``--grid`` scores every (k, T) on val beside the configured one; on test it would tune the
    published number, so it is a one-line error that says how to run it on val."""
    ckpt = tmp_path / "run" / "checkpoint-00000001.pt"
    ckpt.parent.mkdir()
    save_ckpt(ckpt, make_cfg("data.val_fraction=0.2"))
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--grid"]) == 2
    assert "add eval.split=val" in capsys.readouterr().err
    assert not list(ckpt.parent.glob("eval_knn*.json"))
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--grid", "--ks", "3,20", "--temperatures", "0.07,1",
                 "eval.split=val"]) == 0
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "--grid", "--ks", "0,5", "eval.split=val"]) == 2
    assert "every k must be >= 1" in capsys.readouterr().err
    rec = json.loads((ckpt.parent / "eval_knn_val.json").read_text())
    assert [(r["k"], r["temperature"]) for r in rec["details"]["grid"]] == [(3, 0.07), (3, 1.0), (20, 0.07), (20, 1.0)]
    configured = [r for r in rec["details"]["grid"] if r["k"] == 20 and r["temperature"] == 0.07]
    assert abs(configured[0]["top1"] - rec["value"]) < 1e-6 and rec["split"] == "val"


def test_from_scratch_needs_no_checkpoint(tiny_cfg, tmp_path):
    from mimkit.config import save_config

    save_config(tiny_cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "scratch"
    assert main(["eval", "finetune", "--from-scratch", "--config", str(tmp_path / "tiny.yaml"),
                 "--out", str(out)]) == 0
    rec = json.loads((out / "eval_finetune_scratch.json").read_text())
    assert rec["from_scratch"] and rec["checkpoint_sha256"] is None


def test_pixels_are_the_yardstick_of_knn_and_linprobe(tiny_ckpt, tiny_cfg, tmp_path, capsys):
    """``--pixels``: the same protocol with the input images as the features, beside the encoder's result."""
    from mimkit.eval.knn import run_pixel_knn

    assert main(["eval", "knn", "--pixels", "--checkpoint", str(tiny_ckpt)]) == 0  # the checkpoint lends its config
    rec = json.loads((tiny_ckpt.parent / "eval_knn_pixels.json").read_text())
    assert rec["pixels"] and rec["checkpoint_sha256"] is None and rec["details"]["feature"] == "pixels"
    assert rec["value"] == run_pixel_knn(tiny_cfg)["value"]
    assert not (tiny_ckpt.parent / "eval_knn.json").exists()  # the encoder's result is not overwritten
    out = tmp_path / "pix"
    assert main(["eval", "linprobe", "--pixels", "--checkpoint", str(tiny_ckpt), "--out", str(out),
                 "eval.linprobe.epochs=2"]) == 0
    lin = json.loads((out / "eval_linprobe_pixels.json").read_text())
    assert 0 <= lin["value"] <= 1 and lin["details"]["feature"] == "pixels"  # not eval.feature: no tokens to pool
    assert main(["eval", "knn", "--pixels", "--from-scratch", "--checkpoint", str(tiny_ckpt), "--out", str(out)]) == 2
    assert "--pixels: the input pixels have no encoder" in capsys.readouterr().err


def test_foreign_checkpoint_needs_config(tiny_cfg, tmp_path, capsys):
    torch.save(to_official(model_from_config(tiny_cfg)), tmp_path / "official.pth")
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "official.pth")]) == 2
    assert "--config" in capsys.readouterr().err
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(
        {"model": {"img_size": 16, "in_chans": 1}, "data": {"name": "synthetic", "num_workers": 0}}))
    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "official.pth"),
                 "--config", str(tmp_path / "tiny.yaml")]) == 2
    assert "in_chans" in capsys.readouterr().err


def test_saved_config_with_stale_keys_still_evaluates(tmp_path, tiny_cfg, save_ckpt, caplog):
    from mimkit.engine.checkpoint import atomic_save, load_file

    ckpt = tmp_path / "old.pt"
    save_ckpt(ckpt, tiny_cfg)
    state = load_file(ckpt)
    state["config"]["emae"]["sc_warmup_epochs"] = 0.0  # an option renamed since
    atomic_save(state, ckpt)
    assert main(["eval", "knn", "--checkpoint", str(ckpt)]) == 0
    assert "emae.sc_warmup_epochs" in caplog.text


def test_the_log_names_the_split_and_where_it_came_from(tmp_path, make_cfg, save_ckpt, caplog):
    """A pre-training run's monitor split rides along in its checkpoint: ``mimkit eval`` says it
    scores val, and why, instead of leaving the user to find it in the result's name."""
    ckpt = tmp_path / "run" / "checkpoint-00000001.pt"
    ckpt.parent.mkdir()
    save_ckpt(ckpt, make_cfg("data.val_fraction=0.2", "eval.split=val"))
    caplog.set_level("INFO", logger="mimkit")
    assert main(["eval", "knn", "--checkpoint", str(ckpt)]) == 0
    assert f"the val split (eval.split, from the config saved in {ckpt}); eval.split=test" in caplog.text
    assert (ckpt.parent / "eval_knn_val.json").exists()
    caplog.clear()
    assert main(["eval", "knn", "--checkpoint", str(ckpt), "eval.split=test"]) == 0
    assert "the test split (eval.split, from the command line)" in caplog.text
    assert "gives the number to publish" not in caplog.text  # no hint when test is scored
    assert json.loads((ckpt.parent / "eval_knn.json").read_text())["split"] == "test"
