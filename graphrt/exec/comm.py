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

from ..config import ConfigError, ModelConfig
from ..weights.shard import make_shard


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

    def check_same(self, fields: dict) -> None:
        """Every rank must have been started with the same model and options: compare `fields` (name -> a
        printable value) across ranks; every rank raises the same ConfigError if one differs (none hangs)."""
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, {k: repr(v) for k, v in fields.items()})
        for name in fields:
            values = [g[name] for g in gathered]
            if len(set(values)) > 1:
                seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                raise ConfigError(f"tensor-parallel ranks were started with different {name} ({seen}); start every "
                                  "rank with the same model and options")


def join_rank(cfg: ModelConfig, opts, source_path, device: torch.device, requested, dtype: torch.dtype):
    """This process as one tensor-parallel rank: (Comm, its Shard, its device). Under torchrun a "cuda" device
    means the GPU of the local rank. Checks that every rank was started with the same model and options."""
    if opts.cpu_lane:
        raise ConfigError("tensor_parallel with cpu_lane is not supported yet; use one of them")
    if device.type == "cuda" and requested in (None, "cuda"):   # torchrun: one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    comm = Comm.join(opts.tensor_parallel, device)
    comm.check_same(dict(
        model=(cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
               cfg.intermediate_size, cfg.vocab_size), dtype=dtype, quantization=opts.quantization,
        max_batch_size=opts.max_batch_size, max_seq_len=opts.max_seq_len, device_type=device.type))
    return comm, make_shard(cfg, comm.rank, comm.world), device
