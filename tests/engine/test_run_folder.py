"""The run folder: one live writer, resume rules, side work that cannot cost the run, file modes."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import signal

import pytest
import yaml

from mimkit.config import load_config
from mimkit.data.sampler import ShardedEpochSampler
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.checkpoint import list_checkpoints, load_file
from mimkit.engine.logging import read_metrics
from mimkit.engine.rundir import RunLock
from mimkit.engine.trainer import pretrain
from mimkit.errors import RunError


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def test_sampler_yields_whole_optimizer_steps_only():
    # 30 samples, batch 4: 7 batches; with accumulation 2 only 3 steps = 6 batches per epoch.
    s = ShardedEpochSampler(30, 4, seed=0, epoch=0, accum_iter=2)
    assert len(list(s)) == len(s) == 24
    assert len(list(ShardedEpochSampler(30, 4, seed=0, epoch=0, start_batch=4, accum_iter=2))) == 8


def test_resume_at_an_epoch_boundary_with_a_leftover_batch_is_exact(tmp_path, tiny_overrides, one_thread):
    # 30 samples / batch 4 / accum 2 = 3 steps per epoch and one micro-batch left over each epoch.
    over = tiny_overrides + ["data.synthetic_size=30", "train.batch_size=4", "train.accum_iter=2",
                             "train.max_steps=8", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    want = losses(pretrain(load_config(None, over), tmp_path / "a"))
    run = pretrain(load_config(None, over), tmp_path / "b")
    for step, path in list_checkpoints(run):
        if step > 3:  # as if killed right after the epoch-boundary checkpoint
            path.unlink()
    assert losses(pretrain(None, run, resume=True)) == want


def test_a_second_run_into_a_live_folder_is_refused(tmp_path, tiny_overrides):
    run = tmp_path / "r"
    with RunLock(run), pytest.raises(RunError, match="in use by a live mimkit run"):
        pretrain(load_config(None, tiny_overrides + ["train.max_steps=1"]), run)
    assert not list_checkpoints(run)
    pretrain(load_config(None, tiny_overrides + ["train.max_steps=1"]), run)  # released: fine


def _hold_lock(run, ready) -> None:
    with RunLock(run):
        ready.set()
        signal.pause()


def test_the_lock_dies_with_its_process(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path / "r", ready))
    p.start()
    assert ready.wait(60)
    with pytest.raises(RunError, match=f"pid {p.pid}"):
        RunLock(tmp_path / "r").__enter__()
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with RunLock(tmp_path / "r"):
        pass


def test_resume_before_the_first_checkpoint_starts_from_step_zero(tmp_path, tiny_overrides):
    over = tiny_overrides + ["train.max_steps=3"]
    want = losses(pretrain(load_config(None, over), tmp_path / "a"))
    run = tmp_path / "b"
    pretrain(load_config(None, over), run)
    for _, path in list_checkpoints(run):  # as if killed before its first checkpoint
        path.unlink()
    assert losses(pretrain(None, run, resume=True)) == want


def test_resume_of_an_empty_folder(tmp_path, tiny_overrides):
    with pytest.raises(RunError, match="no run to continue"):
        pretrain(None, tmp_path / "none", resume=True)
    # With a config, a preemptible job can always pass --resume: the first launch starts the run.
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=1"]), tmp_path / "new", resume=True)
    assert [s for s, _ in list_checkpoints(run)] == [1]


def test_resume_refuses_overrides_that_change_the_checkpoints_meaning(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "r")
    for bad in ("model.embed_dim=64", "train.batch_size=4", "data.name=fashion_mnist", "method=emae"):
        with pytest.raises(RunError, match=bad.split("=")[0]):
            pretrain(None, run, resume=True, overrides=[bad])
    run = pretrain(None, run, resume=True, overrides=["train.max_steps=3", "train.log_every=2",
                                                      "train.checkpoint_every=5"])
    assert [s for s, _ in list_checkpoints(run)][-1] == 3


def test_a_run_saved_before_a_key_existed_resumes_with_its_default(tmp_path, tiny_overrides):
    # Runs begun by an older mimkit lack keys added since (here data.decode); they mean the default.
    from mimkit.engine.checkpoint import atomic_save, load_file

    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "r")
    step, path = list_checkpoints(run)[-1]
    state = load_file(path)
    del state["config"]["data"]["decode"]
    atomic_save(state, path)
    with pytest.raises(RunError, match="data.decode would change from 'pil' to 'device'"):
        pretrain(None, run, resume=True, overrides=["data.decode=device"])
    run = pretrain(None, run, resume=True, overrides=["train.max_steps=3"])
    assert [s for s, _ in list_checkpoints(run)][-1] == 3


def test_failing_side_work_is_a_warning_and_the_checkpoint_is_written(tmp_path, tiny_overrides,
                                                                       monkeypatch, caplog):
    import mimkit.engine.trainer as trainer

    def broken(*args, **kwargs):
        raise OSError("cannot identify image file 'corrupt.jpg'")

    monkeypatch.setattr(trainer, "save_reconstructions", broken)
    monkeypatch.setattr(trainer, "knn_monitor", broken)
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        run = pretrain(load_config(None, tiny_overrides + ["train.epochs=1", "train.knn_every=1"]),
                       tmp_path / "r")
    assert [s for s, _ in list_checkpoints(run)] == [8]
    assert "reconstruction grid failed" in caplog.text and "k-NN monitor failed" in caplog.text


def test_checkpoints_get_the_umask_mode(tmp_path, tiny_overrides):
    old = os.umask(0o022)
    try:
        run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=1"]), tmp_path / "r")
    finally:
        os.umask(old)
    for path in [list_checkpoints(run)[0][1], run / "config.yaml", run / "metrics.jsonl"]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=2", "train.checkpoint_every=2"]),
                   tmp_path / "r")
    real_open = os.open

    def full_disk(path, flags, mode=0o777):  # checkpoints go to /dev/full: the kernel's own ENOSPC
        if ".checkpoint-" in str(path):
            real_open(path, flags, mode)  # the temporary file exists, as on a real full disk
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode)

    monkeypatch.setattr(ckpt.os, "open", full_disk)
    with pytest.raises(RunError, match="checkpoint-00000004.pt.*intact"):
        pretrain(None, run, resume=True, overrides=["train.max_steps=4"])
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert load_file(list_checkpoints(run)[0][1])["step"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_output_folder_is_a_run_error(tmp_path, tiny_overrides):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunError, match="choose a writable --out"):
        pretrain(load_config(None, tiny_overrides), tmp_path / "file" / "run")


def test_a_failed_write_names_its_cause_and_fix(tmp_path):
    """A full disk asks for space; a folder deleted under a running job says so instead."""
    with pytest.raises(RunError, match=r"gone/x\.json: No such file.*folder .*gone is gone"):
        ckpt.atomic_write_text(tmp_path / "gone" / "x.json", "{}")

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(RunError, match="No space left on device; free space"):
        ckpt._atomic_write(tmp_path / "x.json", full)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_metrics_survive_a_cut_line_and_count_resumed_steps_once(tmp_path, tiny_overrides):
    run = pretrain(load_config(None, tiny_overrides + ["train.max_steps=3", "train.checkpoint_every=2"]),
                   tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 9.0}\n{"step": 4, "lo')  # a re-logged step, then a kill mid-line
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert read_metrics(run)[-1]["loss"] == 9.0  # the later row of a step wins
    (run / "checkpoint-00000003.pt").unlink()
    run = pretrain(None, run, resume=True)  # the resume drops rows past step 2, the cut line too
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]


def test_a_preemptible_job_relaunched_with_its_config_continues(tmp_path, tiny_overrides):
    """``--resume --config X`` on a begun run continues it with the saved config, even where the
    run derived values the preset does not hold (a batch fitted to the data)."""
    over = tiny_overrides + ["data.synthetic_size=40", "train.batch_size=64", "data.min_steps_per_epoch=4",
                             "train.max_steps=3"]
    run = pretrain(load_config(None, over), tmp_path / "job", resume=True)  # first launch starts it
    saved_batch = yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"]
    assert saved_batch < 64  # fitted to 40 samples
    run = pretrain(load_config(None, over), run, resume=True, overrides=["train.max_steps=4"])
    assert [s for s, _ in list_checkpoints(run)][-1] == 4


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, tiny_overrides):
    """A bad setting found at start (here a missing init_from file) is an error, not an empty run folder;
    a folder the user made stays, without the lock file."""
    bad = tiny_overrides + ["train.max_steps=1", f"train.init_from={tmp_path / 'missing.pt'}"]
    with pytest.raises(Exception, match="missing.pt"):
        pretrain(load_config(None, bad), tmp_path / "new" / "run")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(Exception, match="missing.pt"):
        pretrain(load_config(None, bad), tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
