"""The public Python API, ``mimkit --version``, ``config show`` / ``config keys`` and a CLI that
starts without torch."""

import json
import subprocess
import sys

import pytest
import yaml

import mimkit
from mimkit.api import overrides_to_dict
from mimkit.cli import main
from mimkit.config import Config, ConfigError, load_config, to_dict
from mimkit.config_doc import field_comments, show


def test_parser_and_help_do_not_import_torch():
    code = ("import sys, contextlib, io\nimport mimkit\nfrom mimkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for argv in (['--help'], ['pretrain', '--help'], ['--version']):\n"
            "        try:\n            main(argv)\n        except SystemExit:\n            pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy', 'mimkit.api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mimkit {mimkit.__version__}"


def test_config_show_is_the_merged_config_with_comments(capsys):
    assert main(["config", "show", "--config", "fmnist_tiny", "train.max_steps=7"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == to_dict(load_config("fmnist_tiny", ["train.max_steps=7"]))
    lines: dict[str, str] = {}
    for ln in text.splitlines():  # the first occurrence of a name is the train section's
        lines.setdefault(ln.strip().split(":")[0], ln)
    assert "# [default: null] total optimizer steps; replaces epochs" in lines["max_steps"]
    assert lines["accum_iter"].strip() == "accum_iter: 1"  # the default value: no marker, no comment
    assert "[default: 64] per device" in lines["batch_size"]
    assert text.startswith("method: mae  # mae | emae | rcmae | mixedae")


def test_config_keys_lists_every_leaf(capsys):
    assert main(["config", "keys"]) == 0
    rows = capsys.readouterr().out.splitlines()
    keys = [r.split()[0] for r in rows]
    assert "eval.finetune.layer_decay" in keys and "train.max_steps" in keys and "model" not in keys
    assert len(keys) == len(set(keys)) == len(list(_leaves(to_dict(Config()))))
    row = rows[keys.index("train.amp")].split()
    assert row[1:3] == ["auto|bf16|fp16|off", "auto"]  # a choice lists its values


def _leaves(d, prefix=""):
    for k, v in d.items():
        yield from (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])


def test_field_comments_cover_multiline_fields():
    notes = field_comments()
    assert notes["TrainConfig"]["amp"].startswith("auto (bf16 where supported")
    assert notes["LinprobeConfig"]["crop_scale"] == "uncached only"  # a field(default_factory=...)
    assert "embed_dim" not in notes["ModelConfig"]  # no comment, no entry
    assert show(Config()).count("[default:") == 0


def test_overrides_to_dict():
    user = {"root": "imgs"}
    nested = overrides_to_dict({"train__max_steps": 5, "data": user, "data__num_workers": 0, "method": "emae"})
    assert nested == {"train": {"max_steps": 5}, "data": {"root": "imgs", "num_workers": 0}, "method": "emae"}
    assert user == {"root": "imgs"}  # the caller's dict is not edited


def test_pretrain_resume_and_evaluate_from_python(tmp_path, tiny_overrides):
    base = load_config("fmnist_tiny", tiny_overrides)
    run = mimkit.pretrain(base, tmp_path / "run", train__max_steps=3, train={"checkpoint_every": 2})
    assert isinstance(run, mimkit.Run) and run.folder == tmp_path / "run"
    assert run.last_checkpoint.name == "checkpoint-00000003.pt"
    assert [r["step"] for r in run.metrics] == [1, 2, 3] and all("loss" in r for r in run.metrics)
    assert base.train.max_steps is None  # the given Config is not changed

    run = mimkit.pretrain(None, run.folder, resume=True, train__max_steps=4)
    assert run.last_checkpoint.name == "checkpoint-00000004.pt" and len(run.metrics) == 4

    record = mimkit.evaluate("knn", run.last_checkpoint, eval__knn_k=3, eval__max_train_samples=32)
    assert record["metric"] == "knn_top1" and 0.0 <= record["value"] <= 1.0
    assert record["config"]["eval"]["knn_k"] == 3
    assert json.loads((run.folder / "eval_knn.json").read_text())["value"] == record["value"]

    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        mimkit.pretrain("fmnist_tiny", tmp_path / "other", train__epoch=1)


def test_evaluate_takes_the_cli_flags_from_python(tmp_path, tiny_overrides):
    """grid, pixels and from_scratch reach the evaluation as `mimkit eval`'s flags do."""
    run = mimkit.pretrain(load_config("fmnist_tiny", tiny_overrides), tmp_path / "run", train__max_steps=1)
    small = dict(eval__max_train_samples=32, data__val_fraction=0.25)
    record = mimkit.evaluate("knn", run.last_checkpoint, grid=([1, 3, 20], [0.07, 0.1]), eval__split="val", **small)
    cells = sorted((r["k"], r["temperature"]) for r in record["details"]["grid"])
    assert cells == [(k, t) for k in (1, 3, 20) for t in (0.07, 0.1)]
    with pytest.raises(ConfigError, match="eval.split=val"):
        mimkit.evaluate("knn", run.last_checkpoint, grid=([1], [0.1]), **small)
    pix = mimkit.evaluate("knn", None, run.folder / "config.yaml", tmp_path / "pix", pixels=True, **small)
    assert pix["pixels"] and pix["details"]["feature"] == "pixels" and (tmp_path / "pix/eval_knn_pixels.json").exists()
    scratch = mimkit.evaluate("knn", run.last_checkpoint, from_scratch=True, **small)
    assert scratch["from_scratch"] and (run.folder / "eval_knn_scratch.json").exists()


def test_pretrain_on_your_own_dataset_from_python(tmp_path, tiny_overrides, one_thread):
    """A plain list of images (tensors, arrays, PIL, with or without labels) trains, resumes and
    evaluates; a seeded 10 % is held out for reconstructions and evaluation."""
    import numpy as np
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(80):
        if i % 3 == 0:
            img = torch.rand(3, 20, 24, generator=g)  # CHW float tensor
        elif i % 3 == 1:
            img = (torch.rand(24, 20, 3, generator=g) * 255).to(torch.uint8).numpy()  # HWC array
        else:
            img = Image.fromarray(np.full((16, 16), 8 * (i % 30), dtype=np.uint8))  # PIL, gray
        items.append((img, i % 4))
    over = [o for o in tiny_overrides if not o.startswith("data.")] + ["data.num_workers=0"]
    run = mimkit.pretrain(load_config(None, over + ["train.max_steps=3"]), tmp_path / "own", dataset=items)
    assert run.last_checkpoint is not None and len(run.metrics) == 3
    assert (run.folder / "reconstructions-00000003.png").exists()
    saved = yaml.safe_load((run.folder / "config.yaml").read_text())
    assert saved["data"]["name"] == "python" and saved["data"]["root"] == "dataset"
    run = mimkit.pretrain(None, run.folder, resume=True, dataset=items, train__max_steps=4)
    assert len(run.metrics) == 4
    record = mimkit.evaluate("knn", run.last_checkpoint)
    assert 0.0 <= record["value"] <= 1.0
