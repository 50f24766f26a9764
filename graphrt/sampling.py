"""Token sampling with no host synchronisation: every parameter is a device tensor.

Randomness comes from a counter-based hash of (seed, position, vocab rank), so a token drawn at a
given position with a given seed is the same in eager code, in a replayed CUDA graph and on the CPU.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on int64 tensors holding 32-bit values (products wrap mod 2**64)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, n: int) -> torch.Tensor:
    """seed, counter [B] int64 -> [B, n] float32 uniform in (0, 1), a pure function of its inputs."""
    base = _fmix32((seed & _M32) ^ _fmix32((counter * 0x9E3779B1) & _M32))  # [B]
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    h = _fmix32((base[:, None] + idx[None, :] * 0x27D4EB2F) & _M32)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
    """logits [B, V] float32; temperature, top_p [B] float32; top_k, seed, counter [B] int64.
    Rows with temperature 0 take the argmax; top_k 0 and top_p 1 disable those filters."""
    greedy = logits.argmax(dim=-1)
    if greedy_only:
        return greedy
    V = logits.shape[-1]
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    sorted_logits, sorted_idx = (logits / t[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # keeps at least the top token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(seed, counter, V)))
    choice = (sorted_logits + gumbel).argmax(dim=-1, keepdim=True)
    sampled = sorted_idx.gather(-1, choice).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)
