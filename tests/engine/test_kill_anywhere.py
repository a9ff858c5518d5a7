"""Kill anywhere: a run SIGKILLed at any moment and resumed logs exactly the uninterrupted losses.

Children come from a forkserver that has imported torch and mimkit once (a fresh,
single-threaded process, so forking it is safe and each child starts at once). They are killed
with SIGKILL while a checkpoint is half written (the first one, so no checkpoint exists yet, and
a later one) and at a random moment; each is resumed with ``--resume`` semantics. Data size,
batch and accumulation leave a remainder, so an epoch ends with a micro-batch that no optimizer
step uses.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from mimkit.config import load_config
from mimkit.engine.checkpoint import list_checkpoints
from mimkit.engine.logging import read_metrics
from mimkit.engine.trainer import pretrain

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a forkserver (POSIX)")

METHODS = ["mae", "emae", "rcmae", "mixedae", "emae+rcmae"]
STEPS = 12


def _overrides(tiny_overrides: list[str], method: str) -> list[str]:
    # 30 samples / batch 4 = 7 batches = 3 steps of accum 2 per epoch, one batch left over.
    return tiny_overrides + [
        f"method={method}", "data.synthetic_size=30", "train.batch_size=4", "train.accum_iter=2",
        f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.keep_checkpoints=2",
        "train.warmup_epochs=1",
    ]


def _child(run, overrides, resume: bool, slow_checkpoint: int, writing) -> None:
    """Train in a forked child; the ``slow_checkpoint``-th checkpoint write stops half-way."""
    torch.set_num_threads(1)
    if slow_checkpoint:
        import mimkit.engine.checkpoint as ckpt

        count = {"n": 0}
        real_save = torch.save

        def half_written(obj, f, *args, **kwargs):
            count["n"] += 1
            if count["n"] < slow_checkpoint:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            writing.set()
            time.sleep(60)

        ckpt.torch.save = half_written
    cfg = None if resume else load_config(None, overrides)
    pretrain(cfg, run, resume=resume)


def _run_and_kill(run, overrides, resume: bool, *, slow_checkpoint: int = 0, after_s: float = 0.0) -> bool:
    """Start a child; SIGKILL it during the slow checkpoint or after ``after_s``. True if killed."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mimkit.engine.trainer", __name__])
    writing = ctx.Event()
    p = ctx.Process(target=_child, args=(run, overrides, resume, slow_checkpoint, writing))
    p.start()
    if slow_checkpoint:
        assert writing.wait(60), "the child never reached the slow checkpoint"
    else:
        p.join(after_s)
    killed = p.is_alive()
    if killed:
        os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert killed or p.exitcode == 0, f"child failed with exit code {p.exitcode}"
    return killed


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_anywhere_then_resume_is_exact(tmp_path, tiny_overrides, one_thread, method):
    over = _overrides(tiny_overrides, method)
    want = {r["step"]: r["loss"] for r in read_metrics(pretrain(load_config(None, over), tmp_path / "ref"))}
    run = tmp_path / "killed"

    # 1. Killed while writing the first checkpoint: nothing to resume from but the saved config.
    assert _run_and_kill(run, over, resume=False, slow_checkpoint=1)
    assert not list_checkpoints(run) and (run / "config.yaml").exists()
    # 2. Killed at a random moment (seeded per method, so a failure reproduces).
    _run_and_kill(run, over, resume=True, after_s=random.Random(method).uniform(0.05, 0.3))
    # 3. Killed while writing a later checkpoint, with an earlier one on disk.
    before = [s for s, _ in list_checkpoints(run)] or [0]
    if before[-1] < STEPS - 2:
        assert _run_and_kill(run, over, resume=True, slow_checkpoint=2)
        assert [s for s, _ in list_checkpoints(run)][-1] > before[-1]
    # 4. Resumed to the end.
    _run_and_kill(run, over, resume=True, after_s=120)

    rows = read_metrics(run)
    got = {r["step"]: r["loss"] for r in rows}
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bit for bit
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # half-written files cleaned up
