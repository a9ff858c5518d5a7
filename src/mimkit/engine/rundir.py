"""A run folder: one live writer at a time, and a resume that keeps its checkpoints' meaning."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from mimkit.config import flat_dict
from mimkit.errors import RunError

log = logging.getLogger("mimkit")

# Keys a resume may change: run length, bookkeeping, where the data lives, evaluation. Every other
# key changes what the saved model, optimizer state or sample order mean, so a resume refuses it.
SAFE_ON_RESUME = (
    "train.max_steps", "train.epochs", "train.checkpoint_every", "train.keep_checkpoints",
    "train.log_every", "train.vis_every", "train.knn_every", "train.device", "train.compile",
    "train.loggers", "train.grad_checkpointing", "data.root", "data.num_workers", "eval.",
)


def check_resume_compatible(saved: dict, new: dict, run: Path) -> None:
    """Refuse a resume whose config changes a key outside :data:`SAFE_ON_RESUME`, naming it.

    A key the saved config lacks (added to mimkit after the run began) counts as its default."""
    from mimkit.config import Config, to_dict

    old, cur, default = flat_dict(saved), flat_dict(new), flat_dict(to_dict(Config()))
    for key in sorted(set(old) | set(cur)):
        if key in old and key not in cur:
            continue  # a key this version no longer has (renamed or removed)
        was = old.get(key, default.get(key))
        if was == cur.get(key) or key.startswith(SAFE_ON_RESUME):
            continue
        raise RunError(
            f"--resume {run}: {key} would change from {was!r} to {cur.get(key)!r}, which changes "
            "what the saved checkpoints mean; drop that override, or start a new run with another --out"
        )


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the life of a run. The kernel drops it when the
    process dies, however it dies, so a killed run never leaves a stale lock behind. A run that
    fails before writing anything (a bad key, a missing file) leaves no folder behind either."""

    def __init__(self, run: Path) -> None:
        self.run, self.fd, self.created = Path(run), None, False

    def __enter__(self) -> RunLock:
        self.created = not self.run.exists()
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.run / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunError(f"cannot write to the run folder {self.run}: {e.strerror}; "
                           "choose a writable --out") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise RunError(f"{self.run} is in use by a live mimkit run (pid {owner}); wait for it to "
                           "finish or stop it, or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.fd is None:
            return
        if exc_type is not None and [p.name for p in self.run.iterdir()] == [".lock"]:
            (self.run / ".lock").unlink(missing_ok=True)  # still ours: the flock is held
            if self.created:
                with contextlib.suppress(OSError):  # a new writer's files keep it
                    self.run.rmdir()
        os.close(self.fd)  # closing releases the flock
        self.fd = None
