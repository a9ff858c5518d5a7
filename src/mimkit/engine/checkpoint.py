"""Atomic, pickle-free checkpoints: ``torch.save`` of tensors and plain data only, loaded with
``weights_only=True`` so that a tampered file cannot execute code."""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.errors import MimkitError, RunError

log = logging.getLogger("mimkit")
CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointError(MimkitError, RuntimeError):
    """A checkpoint file that cannot be read."""


def _atomic_write(path: str | Path, write) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, fsync, then rename over ``path``.

    The file gets the umask-respecting mode of any other new file (0644 by default), unlike
    ``mkstemp``'s 0600, so colleagues on a shared cluster can read checkpoints and exports.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a read-only or lost mount: the old file is intact
            raise RunError(f"cannot write {path}: {e.strerror or e}; {_write_fix(e, path)}") from None
        raise


def _write_fix(e: OSError, path: Path) -> str:
    """What to do about a failed write, by its cause."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space or choose another output location"
    if e.errno == errno.ENOENT:
        return f"its folder {path.parent} is gone (deleted while the run wrote to it?); choose an output location"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another output location"
    return "choose another output location"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (a killed writer leaves the old file intact)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely; a truncated or foreign file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip errors, unpickling refusals, EOF on truncation
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason}. The file is truncated, corrupt, or holds "
            "objects other than tensors and plain data (refused for safety)."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-STEP.pt`` in ``run_dir``, oldest first."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob("checkpoint-*.pt"):
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Write ``checkpoint-STEP.pt`` atomically and delete all but the newest ``keep``.

    A failed write (a full disk, a lost mount) leaves the previous checkpoints as they were and
    raises :class:`~mimkit.errors.RunError` naming the file and the fix.
    """
    path = Path(run_dir) / f"checkpoint-{step:08d}.pt"
    try:
        atomic_save(state, path)
    except RunError as e:
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1][1].name} is intact" if previous else "no earlier checkpoint"
        raise RunError(f"{e}; then continue with --resume ({kept})") from None
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path]:
    """Newest readable checkpoint; a corrupt newest one falls back to the previous one."""
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"no checkpoint-*.pt in {run_dir} to resume from")
    for _, path in reversed(found):
        try:
            return load_file(path, map_location), path
        except CheckpointError as e:
            log.warning("%s; trying the previous checkpoint", e)
    raise CheckpointError(f"no readable checkpoint in {run_dir}")


def rng_state() -> dict:
    """Every RNG a step may touch (torch CPU/CUDA, numpy, python)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(
            np.random.get_state()[1].astype("<u4").tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(_python_rng_words(), dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _python_rng_words() -> list[int]:
    version, words, gauss = random.getstate()
    return list(words)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype="<u4")
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(w) for w in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
