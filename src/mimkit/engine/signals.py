"""Preemption: SIGTERM / SIGUSR1 set a flag that a training loop (pre-training, fine-tuning) checks
at step boundaries, saves its progress and raises :class:`Preempted`."""

from __future__ import annotations

import signal
import threading

# The CLI's exit status after a stop signal: progress is saved but the run is unfinished, so
# ``mimkit pretrain ... && mimkit eval ...`` does not go on. 75 is sysexits.h's EX_TEMPFAIL
# ("temporary failure; try again later"): run the same command again to continue.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving its progress (CLI exit status
    :data:`EXIT_PREEMPTED`). ``saved`` says what was saved where; ``hint`` how a Python caller
    continues (the CLI words its own, per command)."""

    def __init__(self, saved: str, hint: str) -> None:
        super().__init__(f"{saved}; {hint}")
        self.saved, self.hint = saved, hint


class StopSignal:
    """SIGTERM / SIGUSR1 (preemption) set a flag; the loop checkpoints and exits cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and threading.current_thread() is threading.main_thread():
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the preemption signals, so a scheduler that
    signals the whole process group (SLURM, ``kill -TERM -PGID``) does not kill them before the
    main process has written its checkpoint (the main process shuts them down itself)."""
    for name in StopSignal.SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
