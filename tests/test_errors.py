"""Every user error is one line that names the input and the fix, with exit code 2 (docs/errors.md).

Each case here is a row of the table in docs/errors.md; data errors are in tests/data/.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mimkit.cli import main
from mimkit.engine.checkpoint import list_checkpoints


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; check exit code 2 and a single ``mimkit: error:`` line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mimkit: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def tiny_run(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *tiny_overrides, "train.max_steps=1"]) == 0
    return run


@pytest.mark.parametrize("command", [
    ["eval", "knn", "--checkpoint"], ["export", "--format", "timm", "--out", "x.safetensors", "--checkpoint"],
    ["visualize", "--images", ".", "--checkpoint"],
])
@pytest.mark.parametrize("kind", ["missing", "truncated", "not a checkpoint"])
def test_bad_checkpoints(tmp_path, tiny_run, capsys, command, kind):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        path.write_bytes(list_checkpoints(tiny_run)[0][1].read_bytes()[:2000])
    elif kind == "not a checkpoint":
        path.write_text("hello")
    line = error_line(capsys, [*command, str(path)])
    assert str(path) in line
    assert ("not found" in line) if kind == "missing" else ("cannot read checkpoint" in line)


def test_unwritable_output_folder(tmp_path, tiny_overrides, capsys):
    (tmp_path / "file").write_text("")
    line = error_line(capsys, ["pretrain", "--out", str(tmp_path / "file" / "run"), *tiny_overrides])
    assert "choose a writable --out" in line


def test_full_disk_during_a_checkpoint_write(tmp_path, tiny_run, capsys, monkeypatch):
    import os

    from mimkit.engine import checkpoint as ckpt

    real_open = os.open

    def full_disk(path, flags, mode=0o777):
        if ".checkpoint-" in str(path):
            real_open(path, flags, mode)
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode)

    monkeypatch.setattr(ckpt.os, "open", full_disk)
    line = error_line(capsys, ["pretrain", "--out", str(tiny_run), "--resume", "train.max_steps=2"])
    assert "No space left on device" in line and "checkpoint-00000001.pt is intact" in line


def test_image_size_not_divisible_by_the_patch(tmp_path, tiny_overrides, capsys):
    line = error_line(capsys, ["pretrain", "--out", str(tmp_path / "r"), *tiny_overrides, "model.img_size=18"])
    assert "model.img_size: 18 is not divisible by the patch size 4" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(tmp_path, tiny_overrides, capsys):
    line = error_line(capsys, ["pretrain", "--out", str(tmp_path / "r"), *tiny_overrides, "train.device=cuda"])
    assert "train.device=cuda" in line and "train.device=cpu" in line


def test_nan_loss(tmp_path, tiny_overrides, capsys):
    line = error_line(capsys, ["pretrain", "--out", str(tmp_path / "r"), *tiny_overrides, "train.blr=1e30",
                               "train.max_steps=4", "train.warmup_epochs=0"])
    assert "non-finite loss" in line and "train.blr" in line


def test_resume_with_an_incompatible_override(tiny_run, capsys):
    line = error_line(capsys, ["pretrain", "--out", str(tiny_run), "--resume", "model.depth=4"])
    assert "model.depth would change from" in line


def test_the_real_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "mimkit", "eval", "knn", "--checkpoint", str(tmp_path / "missing.pt")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("mimkit: error:")
    out = subprocess.run([cmd[0], "-m", "mimkit", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert out.returncode != 2 and "Traceback" in out.stderr
