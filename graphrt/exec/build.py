"""The engine of a placement: its weight store (resident groups, the ring, the CPU lane's host groups) and the step
plans of decode and of prompts. Runtime calls it once per placement (again when the CPU lane's rate measured in the
captured step re-plans, runtime.py)."""
from __future__ import annotations

import nvtx
import torch

from ..config import ModelConfig, RuntimeOptions
from ..plan.placement import Placement, prompt_groups
from ..plan.schedule import build_plans, build_prologue
from ..weights.store import WeightStore
from .comm import Comm
from .engine import Engine


def build_engine(source, p: Placement, cfg: ModelConfig, opts: RuntimeOptions, dtype: torch.dtype,
                 device: torch.device, shard=None, comm: Comm | None = None) -> Engine:
    """Load `p`'s weights from `source` and wire the engine (cfg: what this process computes, a shard's under
    tensor parallel)."""
    # prompt steps: the CPU lane's groups they stream, in pieces where a slot is smaller (weights/pieces.py)
    prompt_order, pieces = prompt_groups(p.groups, p.prompt_streamed, p.slot_bytes)
    with nvtx.annotate("graphrt.load", color="purple"):
        store = WeightStore(source, p.groups, p.resident, p.ring_depth, p.slot_bytes, device, opts.progress, p.cpu,
                            shard, p.prompt_streamed, opts.copy_mode, opts.max_batch_size, pieces)
    names, streamed = [g.name for g in p.groups], set(p.streamed)
    prompt, prompt_names = streamed | p.prompt_streamed | set(pieces), [g.name for g in prompt_order]
    return Engine(cfg, opts, store, build_plans(names, streamed, opts.ring_depth, p.beside),
                  build_prologue(names, streamed, opts.ring_depth), dtype, comm,
                  shard.vocab[0] if shard is not None else 0,
                  (build_plans(prompt_names, prompt, opts.ring_depth),
                   build_prologue(prompt_names, prompt, opts.ring_depth)) if p.prompt_streamed else None)
