"""The trainer runs every method and resumes them exactly (teacher included)."""

import shutil

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import load_latest
from mimkit.engine.trainer import pretrain

TINY = ["model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.name=synthetic", "data.synthetic_size=32", "data.num_workers=0", "train.batch_size=8",
        "train.log_every=1", "train.checkpoint_every=2", "train.warmup_epochs=0.5"]


@pytest.mark.parametrize("method", ["emae+rcmae", "mixedae"])
def test_resume_is_exact(tmp_path, method):
    cfg = load_config("fmnist_tiny", [f"method={method}", "train.max_steps=3", *TINY])
    pretrain(cfg, tmp_path / "straight")
    # Keep the step-2 checkpoint of the same run, then resume from it to step 3.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoint-00000003.pt").unlink()
    pretrain(None, tmp_path / "resumed", resume=True)
    a, _ = load_latest(tmp_path / "straight")
    b, _ = load_latest(tmp_path / "resumed")
    assert a["step"] == b["step"] == 3
    for key, value in a["objective"].items():
        torch.testing.assert_close(b["objective"][key], value, rtol=0, atol=0, msg=key)
    if "rcmae" in method:  # the checkpoint's eval weights are the teacher's
        assert set(a) >= {"student", "teacher"}
        for key, value in a["teacher"].items():
            assert torch.equal(a["model"][key], value)
