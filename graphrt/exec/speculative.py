"""Speculative decoding, eager: a draft proposes k tokens per row, the target verifies them in ONE pass.

Each round feeds [last, d_1 .. d_k] at positions pos .. pos + k (a k+1-token step with the prefill machinery:
ragged rows, one streamed pass over the weights) and gets the target's distributions p_0 .. p_k.
  greedy (temperature 0): accept the longest prefix with d_i == argmax p_{i-1}; then emit argmax p_n.
  sampling: accept d_i with probability min(1, p_{i-1}(d_i) / q_i(d_i)) (q: the draft's distribution; one-hot for
    a deterministic draft); at the first rejection draw from max(0, p - q) renormalised, after k acceptances from
    p_k. The emitted tokens are distributed exactly as the target's own samples (the standard rejection rule).
Row b then advances by n_b + 1 positions. The KV entries of rejected drafts need no undo: they lie past the row's
position, the attention mask hides them, and the next round overwrites them (position bookkeeping).
Randomness is counter-based (sampling.uniform_noise of the seed and the position), as in plain sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..sampling import SamplingParams, argmax_rows, probabilities, sample, uniform_noise
from .drafts import Draft
from .engine import Engine


@dataclass
class SpecStats:
    rounds: int = 0            # target passes after the prefill
    proposed: int = 0          # drafted tokens, over live rows
    accepted: int = 0          # drafted tokens accepted
    emitted: int = 0           # tokens emitted by the rounds (accepted + one per live row and round)
    row_passes: int = 0        # (row, round) pairs with the row still generating
    per_row: list[int] = field(default_factory=list)

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row gains per target pass (1 without speculation, at most k + 1)."""
        return self.emitted / max(self.row_passes, 1)

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)


def verify_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, k+1, V], drafts [B, k] -> (accepted n [B], the target's next token [B])."""
    B, k1, V = logits.shape
    g = argmax_rows(logits.reshape(B * k1, V)).view(B, k1)
    n = (drafts == g[:, :-1]).long().cumprod(dim=1).sum(dim=1)
    return n, g.gather(1, n[:, None]).squeeze(1)


def verify_sampled(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, params_t: tuple,
                   pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule. q [B, k, V] (None: one-hot drafts); params_t = (temperature, top_k, top_p, seed) [B]."""
    temperature, top_k, top_p, seed = params_t
    B, k1, V = logits.shape
    k = k1 - 1
    rep = lambda t: t.repeat_interleave(k1)  # noqa: E731
    p = probabilities(logits.reshape(B * k1, V), rep(temperature), rep(top_k), rep(top_p)).view(B, k1, V)
    if q is None:
        q = torch.zeros(B, k, V, device=logits.device).scatter_(-1, drafts[..., None], 1.0)
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)       # [B, k] p_{i-1}(d_i)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = uniform_noise(seed, pos * 4 + 2, k)                        # the target's own stream is counter pos * 1
    accept = u * qd < pd                                           # u < min(1, pd / qd), without dividing
    n = accept.long().cumprod(dim=1).sum(dim=1)                    # [B]
    at = n.clamp(max=k - 1)[:, None, None].expand(B, 1, V)
    residual = (p[:, :k].gather(1, at) - q.gather(1, at)).clamp_(min=0).squeeze(1)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k].gather(1, at).squeeze(1))
    final = torch.where((n == k)[:, None], p[:, k], residual)     # after k acceptances: the bonus from p_k
    final = final / final.sum(-1, keepdim=True)
    v = uniform_noise(seed, pos * 4 + 3, 1)
    nxt = torch.searchsorted(final.cumsum(-1), v).squeeze(-1).clamp_(max=V - 1)
    return n, nxt


def speculative_decode(engine: Engine, draft: Draft, ids: torch.Tensor, lengths: list[int], max_new_tokens: int,
                       params: SamplingParams, k: int, stats: SpecStats | None = None) -> Iterator[list[list[int]]]:
    """Yields the tokens each row gained per round (host lists); at most max_new_tokens per row."""
    B = len(lengths)
    engine.check_shape(B, max(lengths) + max_new_tokens + k)
    dev = engine.device
    params_t = params.tensors(B, dev)
    logits = engine.prefill(ids, lengths)
    pos = torch.tensor(lengths, device=dev)                       # [B] position of `last` (not in the KV yet)
    last = sample(logits, *params_t, counter=pos, greedy_only=params.greedy)
    first = [[t] for t in last.tolist()]
    draft.start(ids, lengths)
    draft.commit(None, first)
    made = [1] * B
    stats = stats if stats is not None else SpecStats()
    stats.per_row = made
    yield first
    steps = torch.arange(k + 1, device=dev)
    while min(made) < max_new_tokens:
        drafts, q = draft.propose(last, pos, k)
        drafts = drafts.to(dev)
        positions = pos[:, None] + steps
        logits = engine.forward_step(torch.cat([last[:, None], drafts], dim=1), positions,
                                     engine.context(int(positions.max()) + 1), None)      # [B, k+1, V]
        if params.greedy:
            n, nxt = verify_greedy(logits, drafts)
        else:
            n, nxt = verify_sampled(logits, drafts, None if q is None else q.to(dev), params_t, pos)
        gained = []
        for b, (nb, tb, d) in enumerate(zip(n.tolist(), nxt.tolist(), drafts.tolist())):
            live = made[b] < max_new_tokens
            toks = (d[:nb] + [tb])[:max_new_tokens - made[b]] if live else []
            if live:
                stats.row_passes += 1
                stats.proposed += k
                stats.accepted += nb
                stats.emitted += nb + 1
            made[b] += len(toks)
            gained.append(toks)
        stats.rounds += 1
        draft.commit(n, gained)
        # a row advances by the tokens it kept: a finished row stays within prompt + max_new_tokens, so its
        # rounds' writes at pos .. pos + k stay inside max_seq_len (check_room)
        pos = pos + torch.tensor([len(t) for t in gained], device=dev)
        done = torch.tensor([m >= max_new_tokens for m in made], device=dev)
        last = torch.where(done, last, nxt)
        yield gained
