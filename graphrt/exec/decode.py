"""Decode loops: eager (any device) and captured (CUDA graphs), both yielding blocks of new tokens.

Both take right-padded prompts [B, T] with per-row lengths and yield int64 blocks [B, k] of new
tokens: k = 1 per eager step (on the device); on the graph path, host blocks of `chunk` tokens read
back through two pinned buffers (block n is copied asynchronously while the host waits only for block n-1, so the GPU
always has queued replays). `Rows` cuts each row at its own end-of-sequence token.
"""
from __future__ import annotations

from typing import Iterator

import nvtx
import torch

from . import cpu_lane
from ..sampling import SamplingParams, sample
from .engine import Engine
from .graph import DecodeGraph


def decode_eager(engine: Engine, ids: torch.Tensor, lengths: list[int], max_new_tokens: int,
                 params: SamplingParams, start: int = 0, logits_out: list | None = None) -> Iterator[torch.Tensor]:
    """Prefill (from position `start`: the KV cache holds the positions before it), then one eager
    streamed step per token. Yields [B, 1] tokens per step, on the device (no host sync here). `logits_out`, if given, receives
    the [B, vocab] logits each token was sampled from."""
    B = len(lengths)
    engine.check_shape(B, start + max(lengths) + max_new_tokens)
    temperature, top_k, top_p, seed = params.tensors(B, engine.device)
    logits = engine.prefill(ids, lengths, start)
    pos = torch.tensor(lengths, device=engine.device) + start  # [B] position of the token being sampled
    pick = torch.zeros(B, dtype=torch.int64, device=engine.device)
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, seed, counter=pos, greedy_only=params.greedy)
        if logits_out is not None:
            logits_out.append(logits.clone())
        yield tok[:, None]  # on the device: the consumer decides when to wait for it
        if i + 1 == max_new_tokens:
            return
        with nvtx.annotate("graphrt.step", color="red"):
            logits = engine.forward_step(tok[:, None], pos[:, None], engine.context(start + max(lengths) + i + 1),
                                         pick)[:, 0]
        pos = pos + 1


def decode_graph(graph: DecodeGraph, ids: torch.Tensor, lengths: list[int], max_new_tokens: int,
                 params: SamplingParams, chunk: int = 8, start: int = 0) -> Iterator[torch.Tensor]:
    """Captured decode: prefill (from position `start`), then one replay per token, no host sync
    between replays except one wait per block of `chunk` tokens (for the block before).
    Yields the first token [B, 1] as soon as it is sampled, then [B, k] host tokens per block."""
    B = len(lengths)
    graph.engine.check_shape(B, start + max(lengths) + max_new_tokens)
    device = graph.engine.device
    new = torch.empty(B, max_new_tokens, dtype=torch.int64, device=device)
    host = [torch.empty(B, chunk, dtype=torch.int64, pin_memory=True) for _ in range(2)]
    pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    def ready() -> torch.Tensor:
        event, out = pending.pop(0)
        event.synchronize()
        cpu_lane.check()  # a CPU-lane group that failed inside a replay raises here, with its tokens
        return out.clone()

    new[:, 0] = graph.prefill_padded(ids, lengths, params, start)
    yield new[:, :1].cpu()  # the first token at once: time to first token is the prefill's time
    done, blocks = 1, 0
    for n in range(2, max_new_tokens + 1):
        new[:, n - 1] = graph.step()
        if n - done == chunk or n == max_new_tokens:
            out = host[blocks % 2][:, : n - done]  # block - 2 used this buffer and was read already
            out.copy_(new[:, done:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.append((event, out))
            done, blocks = n, blocks + 1
            if len(pending) == 2:
                yield ready()
    while pending:
        yield ready()


class Rows:
    """Collects new tokens per row; with `eos` ids, a row ends at (and includes) its first EOS."""

    def __init__(self, batch: int, eos: tuple[int, ...] = ()):
        self.new: list[list[int]] = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self.eos = set(eos)

    def add(self, block: torch.Tensor) -> list[list[int]]:
        """block [B, k] (or B host lists, of any lengths) -> the tokens each row gained (empty for finished rows)."""
        gained = []
        for r, row in enumerate(block.tolist() if isinstance(block, torch.Tensor) else block):
            got = []
            for t in row:
                if self.finished[r]:
                    break
                got.append(t)
                self.finished[r] = t in self.eos
            self.new[r] += got
            gained.append(got)
        return gained

    @property
    def all_finished(self) -> bool:
        return bool(self.eos) and all(self.finished)

    def as_tensor(self, prompts: torch.Tensor) -> torch.Tensor:
        """[B, T + longest row]: rows that ended early are filled with their EOS."""
        width = max(len(r) for r in self.new)
        fill = [r[-1] if r and self.finished[i] else 0 for i, r in enumerate(self.new)]
        new = torch.tensor([r + [fill[i]] * (width - len(r)) for i, r in enumerate(self.new)], dtype=torch.int64)
        return torch.cat([prompts.cpu(), new.view(len(self.new), width)], dim=1)
