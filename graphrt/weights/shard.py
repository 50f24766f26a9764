"""Tensor parallelism (Megatron-style) as data: which slice of each checkpoint tensor a rank holds.

Rank r of k holds
  q (and its bias):      the rows of query heads [r H/k, (r+1) H/k)
  k, v (and biases):     the rows of the kv heads those query heads read: a split when kv heads divide evenly,
                         else the few kv heads each rank needs (replicated across ranks)
  o:                     the columns of its query heads            -> partial sums, one all-reduce
  gate, up:              rows [r F/k, (r+1) F/k);  down: those columns -> partial sums, one all-reduce
  embedding, LM head:    the rows of vocabulary ids [r V/k, (r+1) V/k)  (embedding: all-reduce; head: all-gather)
  norms:                 whole
`config` is the model as one rank computes it (its heads, kv heads, intermediate and vocabulary sizes), so the
layout, the placement, the KV cache and the math all see a plain (smaller) model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    config: ModelConfig             # what this rank computes
    heads: tuple[int, int]          # query heads [h0, h1)
    kv_heads: tuple[int, int]       # kv heads [k0, k1)
    ffn: tuple[int, int]            # intermediate rows [f0, f1)
    vocab: tuple[int, int]          # vocabulary ids [v0, v1)

    def split(self, name: str) -> tuple[str, int, int] | None:
        """("rows" | "cols", start, end): the part of checkpoint tensor `name` (HF naming) this rank holds;
        None: the whole tensor (norms; the row scales of column-split matrices)."""
        D = self.config.head_dim
        base = name.rsplit(".", 1)[0]
        if base.endswith("self_attn.q_proj"):
            return "rows", self.heads[0] * D, self.heads[1] * D
        if base.endswith(("self_attn.k_proj", "self_attn.v_proj")):
            return "rows", self.kv_heads[0] * D, self.kv_heads[1] * D
        if base.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return ("rows", *self.ffn)
        if base in ("model.embed_tokens", "lm_head"):
            return ("rows", *self.vocab)
        if name.endswith("weight_scale"):                   # column-split matrices keep their row scales
            return None
        if base.endswith("self_attn.o_proj"):
            return "cols", self.heads[0] * D, self.heads[1] * D
        if base.endswith("mlp.down_proj"):
            return ("cols", *self.ffn)
        return None                                         # norms

    def slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (HF naming; `weight_scale`s follow their weight's rows)."""
        part = self.split(name)
        if part is None or (part[0] == "rows" and (t.dim() == 0 or t.numel() == 1)):
            return t
        kind, a, b = part
        return t[a:b] if kind == "rows" else t[:, a:b]


def make_shard(cfg: ModelConfig, rank: int, world: int) -> Shard:
    H, Hkv, F, V = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size
    for what, n in (("num_attention_heads", H), ("intermediate_size", F), ("vocab_size", V)):
        if n % world:
            raise ConfigError(f"tensor_parallel={world} does not divide {what}={n}; use a tensor-parallel size that "
                              f"divides it")
    hq, G = H // world, H // Hkv
    h0 = rank * hq
    k0, k1 = h0 // G, (h0 + hq - 1) // G + 1
    if hq % (k1 - k0):
        raise ConfigError(f"tensor_parallel={world}: the {hq} query heads of a rank read {k1 - k0} kv heads unevenly "
                          f"({H} heads, {Hkv} kv heads); use a tensor-parallel size that divides {Hkv} or a multiple "
                          "of it that divides the heads")
    f = F // world
    v = V // world
    local = replace(cfg, num_heads=hq, num_kv_heads=k1 - k0, intermediate_size=f, vocab_size=v)
    return Shard(rank, world, local, (h0, h0 + hq), (k0, k1), (rank * f, rank * f + f), (rank * v, rank * v + v))


def ffn_part(cfg: ModelConfig, shard: Shard | None, ffn: tuple[int, int]) -> Shard:
    """The slice of an MLP that holds intermediate rows [f0, f1) of what `shard` holds (the whole model when None):
    gate and up rows, down columns. A plan that splits an MLP between the GPU and the CPU lane fills each part's
    group through it, exactly as a tensor-parallel rank fills its shard."""
    base = shard or Shard(0, 1, cfg, (0, cfg.num_heads), (0, cfg.num_kv_heads), (0, cfg.intermediate_size),
                          (0, cfg.vocab_size))
    start = base.ffn[0]
    if not 0 <= ffn[0] < ffn[1] <= base.ffn[1] - start:
        raise ValueError(f"intermediate rows {ffn} are outside 0..{base.ffn[1] - start}")
    return replace(base, ffn=(start + ffn[0], start + ffn[1]))
