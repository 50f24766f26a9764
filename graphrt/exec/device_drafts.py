"""The drafts of speculative rounds (spec_rounds.py) and the device state they read, SpecState.

Drafts on the device:
  DeviceLookup      prompt lookup over the history tensor: for n = ngram .. 1, the latest earlier occurrence of
                    the row's last n tokens, then the k tokens after it (cut at the row's end, the last repeated);
                    the same drafts as drafts.PromptLookup
  DeviceModelDraft  a fully resident draft model's engine (drafts.ModelDraft's catch-up rule), greedy
Both drafts are deterministic, so under sampling their distribution q is one-hot at the drafted token: the
rejection rule then still emits exactly the target's distribution (tested statistically).

DeviceModelDraft runs the draft model's prompt as a captured graph per prompt length rounded up to PROMPT_BUCKET
(padding tokens write K/V past the row's end, which later steps overwrite before reading it): an eager prompt
costs the host about as long as the target's streamed prompt pass (tens of kernels per layer from Python).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..sampling import argmax_rows
from .engine import Engine
from .graph import capture_graphs

PROMPT_BUCKET = 64


@dataclass
class SpecState:
    """Device tensors, one row per sequence (static buffers while rounds are captured)."""
    history: torch.Tensor    # [B, S] int64: token at each position (prompt, then emitted tokens)
    pos: torch.Tensor        # [B] position of `last` (its KV is written by the next round)
    last: torch.Tensor       # [B] the row's latest token
    made: torch.Tensor       # [B] tokens emitted so far (the first one, from the prefill, included)
    limit: torch.Tensor      # [B] tokens wanted; a row with made >= limit is finished
    accepted: torch.Tensor   # [B] drafted tokens accepted (statistics)
    passes: torch.Tensor     # [B] rounds the row took part in (statistics)
    temperature: torch.Tensor  # [B] float32 sampling parameters of the row (sampled rounds)
    top_k: torch.Tensor      # [B] int64
    top_p: torch.Tensor      # [B] float32
    seed: torch.Tensor       # [B] int64
    drafts: torch.Tensor     # [B, k] int64: the next round's drafted tokens (proposed at the end of a round)

    @classmethod
    def empty(cls, batch: int, max_seq_len: int, k: int, device: torch.device) -> "SpecState":
        z = lambda: torch.zeros(batch, dtype=torch.int64, device=device)  # noqa: E731
        f = lambda: torch.zeros(batch, dtype=torch.float32, device=device)  # noqa: E731
        return cls(torch.zeros(batch, max_seq_len, dtype=torch.int64, device=device), z(), z(), z(), z(), z(), z(),
                   f(), z(), f(), z(), torch.zeros(batch, k, dtype=torch.int64, device=device))

    def sampling(self) -> tuple[torch.Tensor, ...]:
        return self.temperature, self.top_k, self.top_p, self.seed


class DeviceLookup:
    def __init__(self, ngram: int = 3):
        self.ngram = ngram

    def start(self, ids: torch.Tensor, lengths: list[int]) -> None:
        pass

    def propose(self, st: SpecState, k: int, ctx_len: int) -> torch.Tensor:
        h, pos = st.history, st.pos
        B, S = h.shape
        steps = torch.arange(k, device=h.device)
        drafts = st.last[:, None].expand(B, k).clone()                  # no match: any tokens will do
        found = torch.zeros(B, dtype=torch.bool, device=h.device)
        for n in range(self.ngram, 0, -1):
            tail = h.gather(1, (pos[:, None] - n + 1 + torch.arange(n, device=h.device)).clamp(min=0))   # [B, n]
            match = (h.unfold(1, n, 1) == tail[:, None]).all(-1)                                      # [B, S-n+1]
            start = torch.arange(S - n + 1, device=h.device)
            match &= (start[None] <= (pos - n)[:, None])               # an earlier occurrence, ending before pos
            at = torch.where(match, start[None], -1).max(dim=-1).values  # [B] the latest one (-1: none)
            idx = torch.minimum(at[:, None] + n + steps, pos[:, None]).clamp(min=0)
            use = (at >= 0) & ~found
            drafts = torch.where(use[:, None], h.gather(1, idx), drafts)
            found |= use
        return drafts

    def commit(self, st: SpecState, accepted: torch.Tensor, k: int) -> None:
        pass


class DeviceModelDraft:
    """A fully resident draft engine (one step plan): k greedy draft steps per round, inside the round."""

    def __init__(self, engine: Engine, batch: int, streamed: bool):
        if streamed or len(engine.plans) != 1:
            raise ConfigError("speculative rounds on the device need the draft model fully resident; give the "
                              "runtime more GPU memory or use a smaller draft")
        self.engine = engine
        dev = engine.device
        self.catch_up = torch.zeros(batch, dtype=torch.bool, device=dev)   # the last draft was accepted
        self.pending = torch.zeros(batch, dtype=torch.int64, device=dev)   # ... and is not in the draft's KV
        # captured prompts (CUDA): static inputs and one graph per bucketed length
        self.prompt_ids = torch.zeros(batch, engine.options.max_seq_len, dtype=torch.int64, device=dev)
        self.prompt_last = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.prompts: dict[tuple[int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def _bucket(self, length: int) -> int | None:
        """The captured prompt length for a prompt of `length` tokens (None: run it eagerly)."""
        e = self.engine
        padded = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
        fits = padded <= min(e.options.max_seq_len, e.chunk_len(self.prompt_ids.shape[0]))
        return padded if e.device.type == "cuda" and fits else None

    def _prompt(self, padded: int) -> None:
        e = self.engine
        positions = torch.arange(padded, device=e.device).expand(self.prompt_ids.shape[0], padded)
        e.run_plan(e.plans[0], self.prompt_ids[:, :padded], positions, padded, self.prompt_last, annotate=False,
                   prompt=True, causal=e.causal_prompts)

    def prepare(self, length: int) -> None:
        """Capture the graph of prompts of `length` tokens, once (before other work is issued: it synchronizes)."""
        padded = self._bucket(length)
        if padded is None or (padded,) in self.prompts:
            return
        stream = torch.cuda.Stream(self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream):   # warm-up outside capture (lazy library init, kernel compiles)
            self._prompt(padded)
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        self.prompts.update(capture_graphs([(padded,)], self._prompt, self.pool, stream))

    def start(self, ids: torch.Tensor, lengths: list[int]) -> None:
        """The draft's K/V for the prompts (right-padded ids [B, T])."""
        e = self.engine
        e.reset()
        padded = self._bucket(ids.shape[1])
        if padded is None:
            e.prefill(ids, lengths)
        else:   # the padded prompt, captured or eager (the same kernels: captured rounds == eager rounds)
            self.prompt_ids[:, :ids.shape[1]].copy_(ids)
            self.prompt_last.copy_(torch.tensor([n - 1 for n in lengths]))
            if (padded,) in self.prompts:
                self.prompts[(padded,)].replay()
            else:
                self._prompt(padded)
        self.catch_up.zero_()

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, ctx_len: int) -> torch.Tensor:
        e = self.engine   # every position's logits (one or two), the last one's kept: no pick tensor to make
        return e.run_plan(e.plans[0], ids, positions, ctx_len, None)[:, -1]              # [B, V]

    def propose(self, st: SpecState, k: int, ctx_len: int) -> torch.Tensor:
        """As drafts.ModelDraft: a row whose k drafts were all accepted first writes the k-th at pos - 1."""
        last, pos = st.last, st.pos
        first = torch.where(self.catch_up, self.pending, last)
        ids = torch.stack([first, last], dim=1)
        positions = torch.stack([torch.where(self.catch_up, pos - 1, pos), pos], dim=1)
        ctx = self.engine.context(ctx_len)
        logits = self._step(ids, positions, ctx)
        out = []
        for i in range(k):
            tok = argmax_rows(logits)
            out.append(tok)
            if i + 1 < k:
                logits = self._step(tok[:, None], (pos + i + 1)[:, None], ctx)
        return torch.stack(out, dim=1)

    def commit(self, st: SpecState, accepted: torch.Tensor, k: int) -> None:
        """After verifying st.drafts (this round's, still in place): remember whether all k were accepted.
        (Device buffers only: a captured round must not read a tensor that another graph's capture made.)"""
        self.catch_up.copy_(accepted == k)
        self.pending.copy_(st.drafts[:, -1])
