import subprocess
import sys

import pytest
from PIL import Image

from mimkit.cli import main
from mimkit.engine.checkpoint import list_checkpoints
from mimkit.engine.logging import read_metrics


def test_cli_pretrain_resume_visualize(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "fmnist_tiny", "--out", str(run), *tiny_overrides,
                 "train.max_steps=3"]) == 0
    assert [s for s, _ in list_checkpoints(run)] == [3]
    # resume with a longer horizon continues from step 3
    assert main(["pretrain", "--out", str(run), "--resume", "train.max_steps=5"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("L", (20, 20), color=40 * i).save(imgs / f"{i}.png")
    grid = tmp_path / "grid.png"
    ckpt = list_checkpoints(run)[-1][1]
    assert main(["visualize", "--checkpoint", str(ckpt), "--images", str(imgs), "--out", str(grid)]) == 0
    with Image.open(grid) as im:
        assert im.width > im.height  # 4 columns, 3 rows of 16 px images upscaled


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["pretrain", "--config", "fmnist_tiny", "--out", str(tmp_path), "train.epoch=1"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["visualize", "--checkpoint", str(bad), "--images", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "mimkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout


@pytest.mark.parametrize("command, target, hint", [
    (["demo", "--out", "runs/x"], "mimkit.demo.run_demo", "run the same demo command again to resume"),
    (["pretrain", "--config", "fmnist_tiny", "--out", "runs/x"], "mimkit.engine.trainer.pretrain",
     "continue with --resume"),
])
def test_a_stopped_run_exits_75_with_the_command_that_continues_it(monkeypatch, capsys, command, target, hint):
    """A stop signal saves progress and exits EX_TEMPFAIL (not 0: a `&&` chain must not go on with an
    unfinished run); the CLI words the hint for the command: demo and study resume by themselves,
    pretrain takes --resume (the Python API's own hint is not a command line)."""
    from mimkit.engine.signals import EXIT_PREEMPTED, Preempted

    def stopped(*args, **kwargs):
        raise Preempted("SIGTERM received: checkpoint at step 3 written to runs/x", "continue with resume=True")

    monkeypatch.setattr(target, stopped)
    assert EXIT_PREEMPTED == 75 and main(command) == 75
    assert capsys.readouterr().err == f"mimkit: SIGTERM received: checkpoint at step 3 written to runs/x; {hint}\n"


@pytest.mark.parametrize("command, hint", [
    (["eval", "finetune", "--checkpoint", "c.pt"], "; run the same eval finetune command again to resume"),
    (["eval", "knn", "--checkpoint", "c.pt"], ""),  # nothing saved: it starts over
    (["eval", "linprobe", "--checkpoint", "c.pt"], ""),
])
def test_ctrl_c_promises_a_resume_only_where_one_exists(monkeypatch, capsys, command, hint):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mimkit.eval.run.evaluate", interrupted)
    assert main(command) == 130
    assert capsys.readouterr().err == f"mimkit: interrupted{hint}\n"
