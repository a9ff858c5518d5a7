import json

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import CheckpointError, list_checkpoints, load_file, load_latest
from mimkit.engine.logging import read_metrics
from mimkit.engine.trainer import NonFiniteLossError, pretrain
from mimkit.errors import RunError


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def test_exact_resume_matches_uninterrupted_run(tmp_path, tiny_overrides):
    # 64 samples / batch 8 = 8 steps per epoch: step 11 is mid-epoch 2.
    over = tiny_overrides + ["train.max_steps=14", "train.checkpoint_every=11", "train.keep_checkpoints=5"]
    want = losses(pretrain(load_config(None, over), tmp_path / "uninterrupted"))
    run = pretrain(load_config(None, over), tmp_path / "killed")
    # As if killed after the step-11 checkpoint and a couple more logged steps:
    for step, path in list_checkpoints(run):
        if step > 11:
            path.unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:13]) + "\n")
    torch.manual_seed(1234)  # resume must not depend on the caller's RNG state
    got = losses(pretrain(None, run, resume=True))
    assert sorted(got) == list(range(1, 15))  # log lines past the checkpoint were replaced
    for s in range(1, 15):
        assert got[s] == want[s], s  # bit for bit


def test_accumulation_matches_big_batch(tmp_path, tiny_overrides):
    a = pretrain(load_config(None, tiny_overrides + ["train.max_steps=3"]), tmp_path / "a")
    b = pretrain(load_config(None, tiny_overrides + ["train.max_steps=3", "train.batch_size=4",
                                                      "train.accum_iter=2"]), tmp_path / "b")
    la, lb = losses(a), losses(b)
    for s in (1, 2, 3):
        assert la[s] == pytest.approx(lb[s], rel=1e-4)


def test_run_folder_contents(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=4", "train.checkpoint_every=2",
                                                       "train.keep_checkpoints=1"]), tmp_path / "r")
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    assert (run / "reconstructions-00000004.png").stat().st_size > 0
    assert [s for s, _ in list_checkpoints(run)] == [4]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "loss_rec"} <= set(rows[0])
    ckpt = load_file(list_checkpoints(run)[-1][1])
    assert ckpt["format"] == "mimkit-v1" and ckpt["norm_pix_loss"] is True
    with pytest.raises(RunError, match="--resume"):
        pretrain(load_config(None, tiny_overrides), run)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    from mimkit.objectives.mae import MAE

    over = tiny_overrides + ["train.max_steps=6", "train.checkpoint_every=2"]
    orig = MAE.forward
    calls = {"n": 0}

    def poisoned(self, imgs, noise, progress=0.0):
        calls["n"] += 1
        out = orig(self, imgs, noise, progress)
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="checkpoint-00000002.pt"):
        pretrain(load_config(None, over), tmp_path / "n")
    assert [s for s, _ in list_checkpoints(tmp_path / "n")] == [2]
    assert torch.isfinite(load_file(list_checkpoints(tmp_path / "n")[0][1])["model"]["norm.weight"]).all()


def test_truncated_checkpoint_falls_back_and_errors_clearly(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=4", "train.checkpoint_every=2"]),
                   tmp_path / "t")
    (s2, p2), (s4, p4) = list_checkpoints(run)
    p4.write_bytes(p4.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_file(p4)
    state, path = load_latest(run)
    assert path == p2 and state["step"] == 2


def test_no_temp_files_left(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "x")
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_online_knn_monitor_logged_each_epoch(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.epochs=2", "train.knn_every=1",
                                                       "eval.monitor_samples=32"]), tmp_path / "k")
    rows = {r["step"]: r for r in read_metrics(run)}
    assert [s for s, r in rows.items() if "knn_top1" in r] == [8, 16]  # 8 steps per epoch
    assert 0.0 <= rows[8]["knn_top1"] <= 1.0 and "loss" in rows[8]


def test_fp16_trains_with_a_loss_scaler_and_resumes_exactly(tmp_path, tiny_overrides, one_thread):
    over = tiny_overrides + ["train.amp=fp16", "train.max_steps=4", "train.checkpoint_every=2",
                             "train.keep_checkpoints=3"]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        torch.amp.GradScaler("cpu")
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"this torch has no fp16 autocast / GradScaler on CPU: {e}")
    want = losses(pretrain(load_config(None, over), tmp_path / "a"))
    run = tmp_path / "b"
    pretrain(load_config(None, over), run)
    ckpt = load_file(list_checkpoints(run)[-1][1])
    assert ckpt["scaler"]["scale"] > 0  # the scaler's state is saved for an exact resume
    list_checkpoints(run)[-1][1].unlink()
    assert losses(pretrain(None, run, resume=True)) == want
