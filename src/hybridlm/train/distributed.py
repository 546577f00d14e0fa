"""Processes and devices, and what is applied to a built model from outside: activation
checkpointing, torch.compile and FSDP2 sharding (torchtitan's order: checkpointing, compile, shard).

Launched by torchrun (`torchrun --nproc_per_node N -m hybridlm train ...`, multi-node through its
rendezvous) the trainer joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs) and
shards the model with `fully_shard` per block, then at the root. Launched plainly it is one process.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool  # a process group exists (also with world size 1 under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device: str = "auto") -> DistributedEnv:
    """Join torchrun's process group if launched by it; pick the device ('auto', 'cpu', 'cuda[:N]')."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device is {device!r} but no CUDA device is available; use 'cpu' or 'auto'")
    if not launched_by_torchrun():
        chosen = torch.device("cuda" if device == "auto" and use_cuda else ("cpu" if device == "auto" else device))
        if chosen.type == "cuda":
            if chosen.index is None:  # plain "cuda": the current device (set_device needs an index)
                chosen = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(chosen)
        return DistributedEnv(rank=0, world_size=1, local_rank=0, device=chosen, is_distributed=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        chosen = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=chosen if use_cuda else None)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen, is_distributed=True)


def shutdown_distributed(env: DistributedEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistributedEnv) -> list[float]:
    """Sums of float scalars over all ranks (float64 on the wire, so counts stay exact)."""
    if not env.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(env: DistributedEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def broadcast_object(value, env: DistributedEnv):
    """Rank 0's `value` on every rank."""
    if not env.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# Applied to the model from outside --------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Wraps each block's forward in non-reentrant `torch.utils.checkpoint` without renaming modules, so
    state-dict names (and checkpoints) are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block separately (repeated blocks share one compiled graph per kind)."""
    for block in model.model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32) -> None:
    """FSDP2: shard every block, then the root (embedding, final norm, LM head) over all ranks.

    param_dtype: the dtype parameters are gathered in for compute (bfloat16 for mixed precision,
    None to keep float32); gradients are reduced in reduce_dtype (float32) and the sharded master
    weights and optimizer state stay float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """With FSDP, skip the gradient reduce-scatter on all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def autocast_context(env: DistributedEnv, compute_dtype: torch.dtype | None, sharded: bool):
    """bfloat16 autocast for an unsharded model on GPU; FSDP casts parameters itself."""
    if compute_dtype is None or sharded:
        return contextlib.nullcontext()
    return torch.autocast(device_type=env.device.type, dtype=compute_dtype)
