"""torchrun integration: process group setup, DDP / FSDP2 wrapping, reductions.

One script runs single-process or under ``torchrun --nproc_per_node N``
(RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL on GPUs, gloo on
CPUs. DDP replicates the model and all-reduces gradients; FSDP2
(``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and
optimizer state per transformer block plus the root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(mode: str, device: torch.device) -> DistState:
    """Join the torchrun process group (once) and pick the parallel mode:
    "auto" is DDP when launched with more than one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistState()  # one process: "ddp" / "fsdp" wrappers would only add overhead
    if mode == "none":
        raise ValueError("distributed='none' under torchrun with several processes: each would train alone")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return DistState(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                     "fsdp" if mode == "fsdp" else "ddp")


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: elements of ModuleLists of at least two
    sub-modules that hold parameters (GPT's h, BERT's layers, T5's blocks)."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and all(any(True for _ in m.parameters()) for m in module) \
                and all(len(list(m.children())) >= 2 for m in module):
            blocks.extend(module)
    return blocks


def wrap(module: nn.Module, state: DistState, device: torch.device) -> nn.Module:
    """DDP- or FSDP2-wrap the training module (the model with its objective)."""
    if state.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    if state.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in block_lists(module):
            fully_shard(block)
        fully_shard(module)
        return module
    return module


def all_reduce_sum(values: torch.Tensor, state: DistState) -> torch.Tensor:
    if state.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj, state: DistState) -> list:
    if not state.active:
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, state: DistState):
    if not state.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(state: DistState) -> None:
    if state.active:
        dist.barrier()


def teardown(state: DistState) -> None:
    if state.active and dist.is_initialized():
        dist.destroy_process_group()
