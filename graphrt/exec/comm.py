"""Tensor-parallel communication over torch.distributed (NCCL on GPUs, gloo on CPUs): one process per rank.

`Comm.join(world, device)` initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) when it is not initialised yet, and checks that its size is `world`. `all_reduce`
sums partial products in place (after o and down); `all_gather_last` concatenates vocabulary shards of the logits
in rank order. Both are plain collectives on the current stream, so a CUDA graph can capture them (NCCL).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import ConfigError


class Comm:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @classmethod
    def join(cls, world: int, device: torch.device) -> "Comm":
        if not dist.is_available():
            raise ConfigError("tensor_parallel needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise ConfigError(f"tensor_parallel={world} needs one process per rank: start them with "
                                  f"`torchrun --nproc-per-node {world} ...` (or initialise torch.distributed first)")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if backend == "nccl" and not dist.is_nccl_available():
                raise ConfigError("tensor_parallel on CUDA needs NCCL, which this torch build lacks")
            dist.init_process_group(backend)
        if dist.get_world_size() != world:
            raise ConfigError(f"tensor_parallel={world} but the process group has {dist.get_world_size()} ranks; "
                              "start as many processes as the tensor-parallel size")
        return cls(dist.get_rank(), world)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (ranks must agree on, e.g., the prefill chunk)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
