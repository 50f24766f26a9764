"""Token sampling with no host synchronisation: every parameter is a device tensor.

Randomness comes from a counter-based hash of (seed, position, vocab rank), so a token drawn at a
given position with a given seed is the same in eager code, in a replayed CUDA graph and on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
SEED_STRIDE = 0x632BE5AB  # row b of a batch seeded with s draws with seed s + b * SEED_STRIDE


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


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64, the first index of each row's maximum, exactly as `argmax(dim=-1)`. On a GPU
    a one-row argmax over a large vocabulary runs in one thread block (27 us for 128256 on an H100); here the
    row is cut into C chunks (C a power of two dividing V): the first maximum of each chunk, then the first
    chunk holding the row's maximum."""
    B, V = logits.shape
    chunks = next((c for c in (256, 128, 64) if V % c == 0 and V // c >= 64), 1)
    if chunks == 1 or logits.device.type != "cuda":
        return logits.argmax(dim=-1)
    vals, idx = logits.view(B, chunks, V // chunks).max(dim=-1)   # [B, C] each chunk's first maximum
    best = vals.argmax(dim=-1, keepdim=True)                       # [B, 1] first chunk with the maximum
    return (best * (V // chunks) + idx.gather(-1, best)).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """The distribution `sample` draws from, explicitly: logits [B, V] -> float32 [B, V] (temperature, then top-k,
    then top-p, as in `sample`); rows with temperature 0 are one-hot at their argmax."""
    V = logits.shape[-1]
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    sorted_logits, sorted_idx = (logits.float() / t[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    out = torch.zeros_like(probs).scatter_(-1, sorted_idx, probs)
    greedy = torch.zeros_like(out).scatter_(-1, argmax_rows(logits)[:, None], 1.0)
    return torch.where(temperature[:, None] > 0, out, greedy)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seed: torch.Tensor, counter: torch.Tensor, greedy_only: bool = False) -> torch.Tensor:
    """logits [B, V] float32; temperature, top_p [B] float32; top_k, seed, counter [B] int64.
    Rows with temperature 0 take the argmax; top_k 0 and top_p 1 disable those filters."""
    greedy = argmax_rows(logits)
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


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. seed: one int for the batch
    (row b draws with seed + b * SEED_STRIDE), one int per row (a row then draws exactly as it would
    alone with that seed), or None (a fresh random seed)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        seeds = [self.seed] if self.seed is None or isinstance(self.seed, int) else list(self.seed)
        if any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in seeds):
            raise ValueError(f"seed must be a non-negative integer or a list of them, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def tensors(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(temperature, top_k, top_p, seed), each [batch] on `device`."""
        if self.seed is None or isinstance(self.seed, int):
            base = int(torch.randint(0, 2**31 - 1, ()).item()) if self.seed is None else self.seed
            seeds = torch.arange(batch, dtype=torch.int64) * SEED_STRIDE + base
        else:
            if len(self.seed) != batch:
                raise ValueError(f"got {len(self.seed)} seeds for {batch} prompts; give one per prompt or one int")
            seeds = torch.tensor(list(self.seed), dtype=torch.int64)
        return (torch.full((batch,), float(self.temperature), device=device),
                torch.full((batch,), int(self.top_k), device=device),
                torch.full((batch,), float(self.top_p), device=device), seeds.to(device))
