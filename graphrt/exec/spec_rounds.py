"""Speculative decoding with the whole round on the device, captured as CUDA graphs.

A round, `spec_round`, reads and writes only device state (SpecState): the draft proposes k tokens from each
row's history, the target verifies [last, d_1 .. d_k] at positions pos .. pos + k in ONE pass of its step plan
(streamed groups stream once), the accepted prefix is kept with one token of the target's (greedy: the longest
agreeing prefix and the target's argmax; sampling: speculative.verify_sampled's rejection rule, with the row's
temperature / top-k / top-p / seed in SpecState and counter-based noise), the emitted tokens are written into
the history and the row advances. Rows that reached their limit stay where they
are. Nothing in a round reads the host, so on CUDA it is captured once per (ring phase, context bucket) and
replayed; the host only picks the graph (the context bucket from an upper bound of the positions) and reads
the rows' progress back every few rounds, asynchronously. On the CPU, or with use_graph=False, the same
function runs eagerly: graph == eager is the same code.

The drafts and the device state they read: device_drafts.py.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..config import ConfigError, context_buckets
from ..sampling import SamplingParams, argmax_rows, sample
from .device_drafts import DeviceLookup, DeviceModelDraft, SpecState
from .engine import Engine
from .graph import capture_graphs
from .speculative import SpecStats, verify_greedy, verify_sampled


def spec_round(target: Engine, draft, st: SpecState, k: int, phase: int, ctx_len: int, greedy: bool = True) -> None:
    """One round on the device (see the module docstring). ctx_len >= every row's pos + 2k + 2: the round verifies
    st.drafts at pos .. pos + k, and after accepting proposes the next round's drafts (at most k + 1 positions on).
    The proposal runs after the target's LM head and before its step joins the copy stream, so the draft model
    computes while the copy engine prefetches the next pass's first groups (engine.run_plan's `tail`)."""
    dev = st.pos.device
    steps = torch.arange(k + 1, device=dev)
    drafts = st.drafts                     # [B, k]; read (in stream order) before accept overwrites it
    tokens = torch.cat([st.last[:, None], drafts], dim=1)                               # [B, k+1]

    def accept(logits: torch.Tensor) -> None:                                           # [B, k+1, V]
        n, nxt = verify_greedy(logits, drafts) if greedy else verify_sampled(logits, drafts, None, st.sampling(),
                                                                              st.pos)
        live = st.made < st.limit
        emitted = torch.cat([drafts, nxt[:, None]], dim=1).scatter(1, n[:, None], nxt[:, None])   # d_1..d_n, nxt
        # a row takes at most the tokens it still wants, so its pos never passes prompt + limit - 1: a finished
        # row keeps writing K/V (masked) at pos .. pos + k < max_seq_len (check_room); its history stays as it is
        step = torch.where(live, torch.minimum(n + 1, st.limit - st.made), 0)
        at = (st.pos[:, None] + 1 + steps).clamp(max=st.history.shape[1] - 1)              # [B, k+1] positions
        keep = steps[None] < step[:, None]
        st.history.scatter_(1, at, torch.where(keep, emitted, st.history.gather(1, at)))
        draft.commit(st, n, k)
        st.pos.add_(step)
        st.made.add_(step)
        st.last.copy_(torch.where(live, nxt, st.last))
        st.accepted.add_(torch.where(live, n, 0))
        st.passes.add_(live.long())
        st.drafts.copy_(draft.propose(st, k, ctx_len))

    target.run_plan(target.plans[phase], tokens, st.pos[:, None] + steps, ctx_len, None, tail=accept)


class SpecRounds:
    """Speculative decoding of `batch` rows with k drafts per round, greedy or sampled; captured on CUDA when
    `capture`."""

    def __init__(self, target: Engine, draft, batch: int, k: int, capture: bool, greedy: bool = True):
        self.target, self.draft, self.batch, self.k, self.greedy = target, draft, batch, k, greedy
        self.capture = capture and target.device.type == "cuda"
        self.state = SpecState.empty(batch, target.options.max_seq_len, k, target.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.first: dict[tuple[int], torch.cuda.CUDAGraph] = {}   # per context bucket: the first proposal
        # on CUDA the draft model's prompt runs on its own stream, beside the target's (its weights stream)
        self.side = torch.cuda.Stream(target.device) if target.device.type == "cuda" and not isinstance(
            draft, DeviceLookup) else None
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(target.device)

    def _round(self, ctx_len: int) -> None:
        e = self.target
        key = (e.phase(), e.context(ctx_len))
        if not self.capture:
            spec_round(e, self.draft, self.state, self.k, *key, self.greedy)
        else:
            self.graphs[key].replay()
        e.ring_step += 1

    def _propose_first(self, ctx_len: int) -> None:
        """The first round's drafts (later rounds propose at their end)."""
        c = self.target.context(ctx_len)
        if not self.capture:
            self.state.drafts.copy_(self.draft.propose(self.state, self.k, c))
        else:
            self.first[(c,)].replay()

    def _capture_all(self) -> None:
        """Every (phase, context bucket) graph, before the prefill (warm-up and capture scribble the state)."""
        e, st = self.target, self.state
        ctxs = context_buckets(e.options.max_seq_len)
        todo = [(p, c) for c in ctxs for p in range(len(e.plans)) if (p, c) not in self.graphs]
        if not todo:
            return
        if e.cpu_lane is not None:   # the CPU lane's staging for k + 1 tokens per row
            e.cpu_lane.reserve(self.batch * (self.k + 1))
        st.limit.zero_()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):   # warm-up outside capture (lazy library init)
            spec_round(e, self.draft, st, self.k, *todo[0], self.greedy)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graphs.update(capture_graphs(todo, lambda *key: spec_round(e, self.draft, st, self.k, *key, self.greedy),
                                          self.pool, self.stream))
        self.first.update(capture_graphs([(c,) for c in ctxs if (c,) not in self.first],
                                         lambda c: st.drafts.copy_(self.draft.propose(st, self.k, c)),
                                         self.pool, self.stream))
        e.reset()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, lengths: list[int], max_new_tokens: int, stats: SpecStats | None = None,
            sync_every: int = 4, params: SamplingParams | None = None) -> Iterator[list[list[int]]]:
        """Right-padded prompts [B, T] -> the tokens each row gained, as host lists, per block of rounds.
        `params`: the sampling parameters of sampled rounds (greedy rounds ignore them)."""
        B, T = ids.shape
        if B != self.batch:
            raise ConfigError(f"these speculative rounds were built for batch {self.batch}, got {B} prompts")
        e, st, k = self.target, self.state, self.k
        if self.capture:
            self._capture_all()
        if isinstance(self.draft, DeviceModelDraft) and self.capture:
            self.draft.prepare(T)           # its prompt's graph, captured before the target's prompt is issued
        ids = ids.to(e.device)
        side = self.side
        if side is not None:   # the draft's prefill computes while the target's streams its weights
            side.wait_stream(torch.cuda.current_stream(e.device))
        logits = e.prefill(ids, lengths)
        pos = torch.tensor(lengths, device=e.device)
        if self.greedy:
            first = argmax_rows(logits)
        else:   # the same first token as plain sampling (counter = its position)
            for buf, value in zip(st.sampling(), (params or SamplingParams(1.0)).tensors(B, e.device)):
                buf.copy_(value)
            first = sample(logits, *st.sampling(), counter=pos)
        st.history.zero_()
        st.history[:, :T].copy_(ids)
        st.history.scatter_(1, pos[:, None], first[:, None])
        st.pos.copy_(pos)
        st.last.copy_(first)
        st.made.fill_(1)
        st.limit.fill_(max_new_tokens)
        st.accepted.zero_()
        st.passes.zero_()
        if side is None:
            self.draft.start(ids, lengths)
        else:
            with torch.cuda.stream(side):
                self.draft.start(ids, lengths)
            torch.cuda.current_stream(e.device).wait_stream(side)
        yield [[t] for t in first.tolist()]
        if max_new_tokens == 1:
            return
        shown = [1] * B                         # tokens of each row handed out
        cap = max(lengths) + max_new_tokens + k  # no row's verified or drafted position reaches it
        self._propose_first(min(max(lengths) + k + 1, cap))
        bound, pending = max(lengths), []       # bound: >= every row's pos
        in_flight = 0                           # rounds queued and not yet read back
        try:   # the statistics also when the caller stops early (a row's EOS closes this generator)
            while True:
                # Queue only rounds that some row surely still needs, counting k + 1 tokens per round (every draft
                # accepted): a round queued after every row finished would still stream the target's weights once
                # (~a decode step), while a round too few costs one host read-back (~0.1 ms) before the next block.
                need = max(-(-(max_new_tokens - shown[b]) // (k + 1)) for b in range(B)) - in_flight
                if need > 0 or not pending:
                    n = int(min(sync_every, max(need, 1)))
                    for _ in range(n):
                        self._round(min(bound + 2 * (k + 1), cap))
                        bound += k + 1
                    copy = (st.history.to("cpu", non_blocking=True), st.made.to("cpu", non_blocking=True),
                            st.pos.max().to("cpu", non_blocking=True))
                    event = torch.cuda.Event() if e.device.type == "cuda" else None
                    if event is not None:
                        event.record()
                    pending.append((event, copy, n))
                    in_flight += n
                    if len(pending) < 2 and e.device.type == "cuda" and need > n:
                        continue                        # keep one block of rounds queued ahead of the host
                event, (hist, made, top), since = pending.pop(0)
                if event is not None:
                    event.synchronize()
                in_flight -= since
                bound = min(bound, int(top) + (k + 1) * in_flight)
                gained = []
                for b in range(B):
                    m = min(int(made[b]), max_new_tokens)
                    gained.append(hist[b, lengths[b] + shown[b]:lengths[b] + m].tolist())
                    shown[b] = m
                yield gained
                if min(shown) >= max_new_tokens:
                    break
        finally:
            if stats is not None:
                torch.cuda.synchronize() if e.device.type == "cuda" else None
                stats.rounds += int(st.passes.max())
                stats.row_passes += int(st.passes.sum())
                stats.accepted += int(st.accepted.sum())
                stats.proposed += k * int(st.passes.sum())
                stats.emitted += int((st.made - 1).sum())
                stats.per_row = [min(int(m), max_new_tokens) for m in st.made.tolist()]
