"""Data parallelism over torch.distributed: DDP (default), or FSDP2 (``train.strategy=fsdp``),
which shards parameters, gradients and optimizer state over the ranks for ViT-L/H and beyond.

Checkpoints stay one file in the usual format either way: under FSDP2 the full state dicts are
gathered with ``torch.distributed.checkpoint.state_dict`` (to CPU, rank 0 writes) and loaded back
into the shards, so a run resumes exactly and its checkpoints evaluate and export as any other.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mimkit.engine.distributed import DistInfo
from mimkit.models.mae import MaskedAutoencoderViT


def wrap(objective: nn.Module, strategy: str, info: DistInfo, device: torch.device) -> nn.Module:
    """The module whose forward the loop calls. DDP averages gradients over ranks: with equal
    per-rank batches that is the gradient of the global-batch loss, so N processes x batch b
    train like 1 process x batch N*b. FSDP2 keeps that promise with sharded state."""
    if not info.enabled:
        return objective
    if strategy == "ddp":
        return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in objective.modules():  # one shard group per block (student and teacher alike)
        if isinstance(module, MaskedAutoencoderViT):
            for block in [*module.blocks, *module.decoder_blocks]:
                fully_shard(block)
    fully_shard(objective)  # the rest: embeddings, norms, heads
    return objective


def grad_sync(net: nn.Module, strategy: str, info: DistInfo, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced over ranks only on the
    step's last micro-batch."""
    if not info.enabled:
        return nullcontext()
    if strategy == "fsdp":
        net.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else net.no_sync()


def _fsdp(strategy: str, info: DistInfo) -> bool:
    return info.enabled and strategy == "fsdp"


def full_state(objective: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
               info: DistInfo) -> tuple[dict, dict]:
    """Full (unsharded) objective and optimizer state dicts. Under FSDP2 every rank must call
    this (it gathers); the tensors land on the CPU."""
    if not _fsdp(strategy, info):
        return objective.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict, strategy: str,
                    info: DistInfo) -> None:
    """Load :func:`full_state`'s dicts (read by every rank) into the possibly sharded modules."""
    if not _fsdp(strategy, info):
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(objective, optimizer, model_state_dict=state["objective"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


def submodule_state(full: dict, objective: nn.Module, module: nn.Module) -> dict:
    """The entries of ``objective``'s full state dict that belong to its submodule ``module``."""
    prefix = next(name for name, m in objective.named_modules() if m is module)
    if not prefix:
        return dict(full)
    return {k[len(prefix) + 1:]: v for k, v in full.items() if k.startswith(prefix + ".")}


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor such as FSDP2's gradient norm."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
