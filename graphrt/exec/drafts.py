"""Drafts for speculative decoding, behind one interface: propose k tokens per row, learn what was accepted.

  PromptLookup  n-gram matching against the prompt and the output so far (no model): the tokens that followed
                the latest earlier occurrence of the row's last n tokens (n from `ngram` down to 1)
  ModelDraft    a second, small model's engine (fully resident; the same vocabulary), decoding k tokens greedily
                or by sampling; also the target's own weights quantized to 4 bits ("self-draft")

`start(ids, lengths)` once after the target's prefill; `commit(None, first tokens)` with the token sampled from
it; then per round `propose(last, pos, k)` -> (drafts [B, k] int64, draft probabilities [B, k, V] float32, or None
for a deterministic draft) and `commit(accepted [B], tokens)`: accepted[b] drafts of row b were taken, and
tokens[b] is what the row emitted (those drafts, then the target's own token). Drafts keep their own state (the model draft
its KV cache, which it rewinds by positions exactly like the target: later writes overwrite rejected entries).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..sampling import SamplingParams, argmax_rows, probabilities, uniform_noise
from .engine import Engine


class Draft(Protocol):
    def start(self, ids: torch.Tensor, lengths: list[int]) -> None: ...
    def propose(self, last: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def commit(self, accepted: torch.Tensor | None, tokens: list[list[int]]) -> None: ...


class PromptLookup:
    def __init__(self, ngram: int = 3):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.history: list[list[int]] = []

    def start(self, ids: torch.Tensor, lengths: list[int]) -> None:
        self.history = [ids[b, :n].tolist() for b, n in enumerate(lengths)]

    def _lookup(self, h: list[int], k: int) -> list[int]:
        for n in range(min(self.ngram, len(h) - 1), 0, -1):
            tail = h[-n:]
            for i in range(len(h) - n - 1, -1, -1):   # latest earlier occurrence first
                if h[i:i + n] == tail:
                    follow = h[i + n:i + n + k]
                    return follow + [follow[-1]] * (k - len(follow))
        return [h[-1]] * k                            # no match: any tokens will do (they are checked)

    def propose(self, last: torch.Tensor, pos: torch.Tensor, k: int):
        rows = [self._lookup(h, k) for h in self.history]       # each history ends with the row's `last`
        return torch.tensor(rows, dtype=torch.int64, device=last.device), None

    def commit(self, accepted: torch.Tensor | None, tokens: list[list[int]]) -> None:
        for h, new in zip(self.history, tokens):               # the tokens each row emitted this round
            h += new


class ModelDraft:
    def __init__(self, engine: Engine, params: SamplingParams):
        self.engine, self.params = engine, params
        self.catch_up: torch.Tensor | None = None   # [B] bool: the row's last draft was accepted (not in KV yet)
        self.pending: torch.Tensor | None = None    # [B] that draft token
        self.tensors: tuple = ()                    # sampling parameters [B] of the current batch

    def start(self, ids: torch.Tensor, lengths: list[int]) -> None:
        e = self.engine
        e.reset()
        e.prefill(ids, lengths)
        B = len(lengths)
        self.tensors = self.params.tensors(B, e.device)
        self.catch_up = torch.zeros(B, dtype=torch.bool, device=e.device)
        self.pending = torch.zeros(B, dtype=torch.int64, device=e.device)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        e = self.engine
        pick = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.int64, device=e.device)
        ctx = e.context(int(positions.max()) + 1)
        return e.forward_step(ids.to(e.device), positions.to(e.device), ctx, pick)[:, 0]   # [B, V]

    def propose(self, last: torch.Tensor, pos: torch.Tensor, k: int):
        """last [B] at positions pos [B]; a row whose previous k drafts were all accepted first writes the k-th
        (never fed) at pos - 1, in the same step (T = 2; other rows write `last` twice at pos)."""
        dev = self.engine.device
        last, pos = last.to(dev), pos.to(dev)
        first = torch.where(self.catch_up, self.pending, last)
        ids = torch.stack([first, last], dim=1)
        positions = torch.stack([torch.where(self.catch_up, pos - 1, pos), pos], dim=1)
        logits = self._step(ids, positions)
        drafts, probs = [], []
        temperature, top_k, top_p, seed = self.tensors
        for i in range(k):
            if self.params.greedy:  # greedy verification needs no draft distribution
                tok = argmax_rows(logits)
            else:  # inverse-CDF draw with the draft's own counter stream (the target's is another)
                p = probabilities(logits, temperature, top_k, top_p)                   # [B, V]
                u = uniform_noise(seed ^ 0x5BD1E995, (pos + i) * 2 + 1, 1)[:, 0]
                tok = torch.searchsorted(p.cumsum(-1), u[:, None]).squeeze(-1).clamp_(max=p.shape[-1] - 1)
                probs.append(p)
            drafts.append(tok)
            if i + 1 < k:
                logits = self._step(tok[:, None], (pos + i + 1)[:, None])
        self.last_drafts = torch.stack(drafts, dim=1)
        return self.last_drafts, torch.stack(probs, dim=1) if probs else None

    def commit(self, accepted: torch.Tensor | None, tokens: list[list[int]]) -> None:
        if accepted is None:   # the first token (sampled from the prefill): nothing drafted yet
            return
        self.catch_up = accepted.to(self.engine.device) == self.last_drafts.shape[1]
        self.pending = self.last_drafts[:, -1]
