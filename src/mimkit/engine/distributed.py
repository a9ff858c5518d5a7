"""torch.distributed set-up for ``torchrun``: NCCL on GPUs, Gloo on CPUs, rank-0 side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimkit.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this machine has no usable CUDA device "
                          f"(torch {torch.__version__}); use train.device=auto or train.device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = pick_device(device_name).type == "cuda"
    if world == 1:
        return DistInfo(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return DistInfo(rank, world, local_rank), device


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (identity when alone)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
