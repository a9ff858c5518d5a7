"""Multi-process (2 Gloo ranks on CPU) equivalence and preemption, through the real CLI."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mimkit.engine.checkpoint import list_checkpoints
from mimkit.engine.logging import read_metrics
from mimkit.engine.signals import EXIT_PREEMPTED


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def mimkit_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mimkit"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mimkit"]


def run_cli(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*mimkit_cmd(nproc), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("decode", ["pil", "device"])  # device: crops and masks drawn per batch
def test_two_processes_equal_one_process_with_double_batch(tmp_path, tiny_overrides, decode):
    common = [*tiny_overrides, "train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=3",
              f"data.decode={decode}"]
    run_cli(1, "pretrain", "--out", str(tmp_path / "one"), *common, "train.batch_size=8")
    run_cli(2, "pretrain", "--out", str(tmp_path / "two"), *common, "train.batch_size=4")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5, abs=1e-6), s
    assert read_metrics(tmp_path / "two")[0]["lr"] == read_metrics(tmp_path / "one")[0]["lr"]

    # resume the 2-process run from its step-3 checkpoint: same losses again
    for step, path in list_checkpoints(tmp_path / "two"):
        if step > 3:
            path.unlink()
    run_cli(2, "pretrain", "--out", str(tmp_path / "two"), "--resume")
    again = losses(tmp_path / "two")
    for s in range(4, 7):
        assert again[s] == two[s], s


def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path, tiny_overrides):
    common = [*tiny_overrides, "train.max_steps=120", "train.checkpoint_every=1000"]
    run = tmp_path / "pre"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*mimkit_cmd(1), "pretrain", "--out", str(run), *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]  # saved, unfinished: not a success
    assert "SIGTERM received" in err
    (stopped, _), = list_checkpoints(run)
    assert 5 <= stopped < 120
    run_cli(1, "pretrain", "--out", str(run), "--resume")
    run_cli(1, "pretrain", "--out", str(tmp_path / "ref"), *common)
    got, want = losses(run), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 121))
    assert all(got[s] == want[s] for s in range(1, 121))


def test_sigterm_to_the_process_group_with_loader_workers(tmp_path, tiny_overrides):
    """Schedulers such as SLURM signal every process of the job: the DataLoader workers must
    survive until the main process has written its checkpoint."""
    common = [*tiny_overrides, "data.num_workers=1", "train.max_steps=400", "train.checkpoint_every=1000"]
    run = tmp_path / "pg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*mimkit_cmd(1), "pretrain", "--out", str(run), *common], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]  # saved, unfinished: not a success
    assert "SIGTERM received" in err
    (stopped, _), = list_checkpoints(run)
    assert 3 <= stopped < 400


@pytest.mark.parametrize("method", ["mae", "rcmae"])
def test_fsdp2_on_gloo_matches_one_process_and_resumes_exactly(tmp_path, tiny_overrides, method):
    """FSDP2 (``train.strategy=fsdp``) shards parameters and optimizer state over 2 Gloo ranks:
    the same losses as 1 process with the double batch, and a bit-exact resume."""
    common = [*tiny_overrides, f"method={method}", "train.max_steps=4", "train.checkpoint_every=2",
              "train.keep_checkpoints=3", "train.accum_iter=2"]
    run_cli(1, "pretrain", "--out", str(tmp_path / "one"), *common, "train.batch_size=8")
    run_cli(2, "pretrain", "--out", str(tmp_path / "fsdp"), *common, "train.batch_size=4", "train.strategy=fsdp")
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == [1, 2, 3, 4]
    for s in one:
        assert fsdp[s] == pytest.approx(one[s], rel=1e-5, abs=1e-6), s
    for step, path in list_checkpoints(tmp_path / "fsdp"):
        if step > 2:
            path.unlink()
    run_cli(2, "pretrain", "--out", str(tmp_path / "fsdp"), "--resume")
    assert losses(tmp_path / "fsdp") == fsdp
