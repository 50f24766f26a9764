"""Memory every placement needs whatever it keeps resident (KV cache, activations, logits, RoPE table, margin),
and the prefill chunk that the memory a placement leaves can hold."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ModelConfig

MARGIN = 256 * 2**20  # allocator fragmentation and library workspaces
PREFILL_BASE = 256    # prompt tokens per prefill step the placement always leaves room for


def essentials(cfg: ModelConfig, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
               prefill_chunk: int, fused_attention: bool = False) -> dict[str, int]:
    """Memory that is needed whatever the placement: KV cache, activations, logits, RoPE table, margin.
    fused_attention: attention never holds a [rows, heads, chunk, context] score tensor (CUDA's fused SDPA
    kernels); else two float32 copies of it are counted (the CPU's math path)."""
    e = dtype.itemsize
    kv = 2 * cfg.num_layers * max_batch_size * cfg.num_kv_heads * max_seq_len * cfg.head_dim * e
    tokens = max_batch_size * min(prefill_chunk, max_seq_len)
    width = 4 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 3 * cfg.intermediate_size
    scores = max_batch_size * cfg.num_heads * min(prefill_chunk, max_seq_len) * max_seq_len * 4
    mask = max_batch_size * min(prefill_chunk, max_seq_len) * max_seq_len * e       # the additive mask
    # two live tensors of every width per token, in the compute dtype. Measured on the H100 (bf16, 8B shape,
    # docs/results/2026-11-26-session4.md): a 2048-token step peaks at 0.29 GiB beyond what was allocated before
    # it, where this gives 0.54 GiB
    activations = 2 * tokens * width * e + (mask if fused_attention else 2 * scores)
    logits = 6 * max_batch_size * cfg.vocab_size * 4  # last-position logits and sampling buffers
    rope = 2 * max_seq_len * cfg.head_dim * e + 8 * (max_seq_len + max_batch_size)   # llama.RopeTable
    return {"kv_cache": kv, "activations": activations, "logits": logits, "rope_table": rope, "margin": MARGIN}


def widen_prefill_chunk(p, cfg: ModelConfig, dtype: torch.dtype, max_batch_size: int,
                        max_seq_len: int, fused_attention: bool = False):  # -> Placement
    """The longest prefill chunk (PREFILL_BASE doubled, up to max_seq_len) whose activations fit in the memory
    the placement left: a prompt of that length streams each weight once. The resident set does not change."""
    act = lambda c: essentials(cfg, dtype, max_batch_size, max_seq_len, c, fused_attention)["activations"]  # noqa: E731
    left = p.budget - sum(p.memory.values())
    chunk = c = min(p.prefill_chunk, max_seq_len)
    while c < max_seq_len:
        c = min(2 * c, max_seq_len)
        if act(c) - act(p.prefill_chunk) > left:
            break
        chunk = c
    return with_prefill_chunk(p, cfg, dtype, max_batch_size, max_seq_len, chunk, fused_attention)


def with_prefill_chunk(p, cfg: ModelConfig, dtype: torch.dtype, max_batch_size: int, max_seq_len: int,
                       chunk: int, fused_attention: bool = False):  # -> Placement
    act = essentials(cfg, dtype, max_batch_size, max_seq_len, chunk, fused_attention)["activations"]
    return replace(p, prefill_chunk=chunk, memory={**p.memory, "activations": act})
