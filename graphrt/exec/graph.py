"""`DecodeGraph`: the whole streamed decode step captured as CUDA graphs; per token the host replays one.

One graph per (batch bucket, ring phase, context bucket, sampling mode). Each contains, on the capture
stream and a copy stream forked from it: the embedding of the last sampled token, every layer with
its slot waits and prefetch copies (including the next step's first groups), the KV append at device
positions, the LM head, sampling, the write-back of the token and the position increment.
`GraphCache` holds the static buffers and the captured graphs of one engine; buckets are captured
largest first into one memory pool. Padded rows (a batch between buckets) use KV rows no live
sequence owns. Rows may have different lengths: positions live on the device, one per row.
"""
from __future__ import annotations

import gc

import nvtx
import torch

from ..config import ConfigError, context_buckets
from ..sampling import SamplingParams, sample
from .engine import Engine


def capture_graphs(keys: list[tuple], body, pool, stream: torch.cuda.Stream) -> dict[tuple, torch.cuda.CUDAGraph]:
    """One CUDA graph of `body(*key)` per key, all in `pool`, captured on `stream` (warm it up first); then a
    synchronize. A runtime collected mid-capture would synchronize and unpin its host buffers, which a capture
    forbids: collect first, and not during the capture."""
    graphs = {}
    gc.collect()
    gc.disable()
    try:
        for key in keys:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="global"):
                body(*key)
            graphs[key] = graph
    finally:
        gc.enable()
    torch.cuda.synchronize()
    return graphs


class GraphCache:
    """Static buffers and captured graphs shared by every DecodeGraph of one engine."""

    def __init__(self, engine: Engine):
        B, d = engine.options.max_batch_size, engine.device
        self.engine = engine
        self.tokens = torch.zeros(B, dtype=torch.int64, device=d)       # last sampled token per row
        self.positions = torch.zeros(B, dtype=torch.int64, device=d)    # its position
        self.logits = torch.zeros(B, engine.vocab_size, dtype=torch.float32, device=d)
        self.history = torch.zeros(B, engine.options.max_seq_len, dtype=torch.int64, device=d)
        self.pick = torch.zeros(B, dtype=torch.int64, device=d)         # the one token of a decode step
        self.temperature = torch.zeros(B, device=d)
        self.top_k = torch.zeros(B, dtype=torch.int64, device=d)
        self.top_p = torch.ones(B, device=d)
        self.seed = torch.zeros(B, dtype=torch.int64, device=d)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(d)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.by_batch: dict[int, DecodeGraph] = {}
        b, self.buckets = 1, []
        while b < B:
            self.buckets.append(b)
            b *= 2
        self.buckets.append(B)

    def decode_graph(self, batch_size: int, **kwargs) -> "DecodeGraph":
        """The DecodeGraph for this batch size, captured on first use."""
        if batch_size not in self.by_batch:
            self.by_batch[batch_size] = DecodeGraph(self, batch_size, **kwargs)
        return self.by_batch[batch_size]

    def step_body(self, b: int, phase: int, ctx_len: int, greedy: bool, annotate: bool = False) -> None:
        """One decode step for rows [0, b): reads tokens/positions, writes logits/history, advances."""
        pos = self.positions[:b, None]                                               # [b, 1]
        logits = self.engine.run_plan(self.engine.plans[phase], self.tokens[:b, None], pos, ctx_len,
                                      self.pick[:b], annotate)
        self.logits[:b].copy_(logits[:, 0])
        nxt = sample(self.logits[:b], self.temperature[:b], self.top_k[:b], self.top_p[:b], self.seed[:b],
                     counter=self.positions[:b] + 1, greedy_only=greedy)
        self.history[:b].scatter_(1, pos + 1, nxt[:, None])
        self.tokens[:b].copy_(nxt)
        self.positions[:b].add_(1)

    def capture(self, buckets: list[int], greedy: bool) -> None:
        """Capture every (phase, context bucket) for these batch buckets, largest first, one pool.
        Warm-up and capture scribble on the static buffers and KV rows: callers prefill afterwards."""
        e = self.engine
        ctxs = context_buckets(e.options.max_seq_len)
        todo = [(b, p, c, greedy) for b in sorted(buckets, reverse=True) for c in ctxs
                for p in range(len(e.plans)) if (b, p, c, greedy) not in self.graphs]
        if not todo:
            return
        with nvtx.annotate("graphrt.capture", color="yellow"), torch.inference_mode():
            self.positions.zero_()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm-up: lazy init of cuBLAS etc. outside capture
                for key in todo[: len(e.plans)]:
                    self.step_body(*key)
                    self.positions.zero_()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.graphs.update(capture_graphs(todo, self.step_body, self.pool, self.stream))
        e.reset()


class DecodeGraph:
    """Decoding `batch_size` sequences with captured steps: `prefill(prompts)`, then `step()` per token."""

    def __init__(self, cache: GraphCache, batch_size: int, greedy: bool = True, capture_all_buckets: bool = False):
        e = cache.engine
        if e.device.type != "cuda":
            raise ConfigError("CUDA graphs need device='cuda'; on the CPU use Runtime.generate (eager)")
        e.check_shape(batch_size, 1)
        self.cache, self.engine, self.batch_size = cache, e, batch_size
        self.bucket = next(b for b in cache.buckets if b >= batch_size)
        self.greedy, self.length, self.prompt_ends = greedy, 0, [0] * batch_size
        cache.capture([b for b in cache.buckets if capture_all_buckets or b == self.bucket], greedy)

    def reset(self) -> None:
        self.engine.reset()
        self.length, self.prompt_ends = 0, [0] * self.batch_size

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor | list[list[int]], temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | list[int] | None = None) -> torch.Tensor:
        """Eager streamed prefill of the prompts ([B, T], or B lists of ids of any lengths), then the
        first token sampled; returns it [B] on the device."""
        ids, lengths = pad_prompts(input_ids)
        return self.prefill_padded(ids, lengths, SamplingParams(temperature, top_k, top_p, seed))

    def prefill_padded(self, ids: torch.Tensor, lengths: list[int], params: SamplingParams,
                       start: int = 0) -> torch.Tensor:
        """Right-padded prompts [B, T] with per-row lengths, from position `start` (the KV cache and
        the token history hold the positions before it: a later chat turn); first tokens [B]."""
        B, T = ids.shape
        if B != self.batch_size:
            raise ConfigError(f"this DecodeGraph was captured for batch {self.batch_size}, got {B} prompts")
        self.cache.capture([self.bucket], params.greedy)  # no-op once this sampling mode is captured
        self.greedy = params.greedy
        e, c, b = self.engine, self.cache, self.bucket
        self.reset()
        ids = ids.to(e.device)
        lengths_b = lengths + [lengths[0]] * (b - B)
        if b > B:  # padded rows: a copy of row 0, in KV rows that no live sequence owns
            ids = torch.cat([ids, ids[:1].expand(b - B, T)])
        logits = e.prefill(ids, lengths_b, start)
        tensors = params.tensors(B, e.device)
        tensors = tuple(torch.cat([t, t[:1].expand(b - B)]) for t in tensors)
        for dst, src in zip((c.temperature, c.top_k, c.top_p, c.seed), tensors):
            dst[:b].copy_(src)
        pos = torch.tensor(lengths_b, device=e.device) + start
        first = sample(logits, *tensors, counter=pos, greedy_only=params.greedy)
        c.logits[:b].copy_(logits)
        c.history[:b, start:start + T].copy_(ids)
        c.history[:b].scatter_(1, pos[:, None], first[:, None])
        c.tokens[:b].copy_(first)
        c.positions[:b].copy_(pos)
        self.prompt_ends = [start + n for n in lengths]   # row b's generated tokens start here
        self.length = max(self.prompt_ends) + 1
        return first[:B]

    def step(self) -> torch.Tensor:
        """Replay one decode step; returns this step's tokens [B] (a new device tensor, no host sync)."""
        if self.length == 0:
            raise ConfigError("call DecodeGraph.prefill(prompt) before step()")
        if self.length >= self.engine.options.max_seq_len:
            raise ConfigError(f"sequence reached max_seq_len={self.engine.options.max_seq_len}; no room for "
                              "another token: reset(), or load the runtime with a larger max_seq_len")
        with nvtx.annotate("graphrt.step", color="red"):
            e = self.engine
            self.cache.graphs[(self.bucket, e.phase(), e.context(self.length), self.greedy)].replay()
            e.ring_step += 1
            self.length += 1
            return self.cache.tokens[: self.batch_size].clone()

    @property
    def logits(self) -> torch.Tensor:
        """[B, vocab] float32 logits of the last step (static buffer)."""
        return self.cache.logits[: self.batch_size]

    def tokens(self) -> torch.Tensor:
        """[B, length]: prompt and every generated token so far, on the device (rows of a ragged batch
        are left-aligned: row b's new tokens start at prompt_ends[b], and it is valid up to
        prompt_ends[b] + length - max(prompt_ends))."""
        return self.cache.history[: self.batch_size, : self.length]


def pad_prompts(prompts: torch.Tensor | list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """[B, T] tensor or B lists of ids -> (right-padded int64 ids [B, T] on the CPU, lengths).
    Padding repeats a row's last token: any valid id does, since padding is never attended."""
    if isinstance(prompts, torch.Tensor):
        return prompts, [prompts.shape[1]] * prompts.shape[0]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([list(p) + [p[-1]] * (T - len(p)) for p in prompts], dtype=torch.int64)
    return ids, [len(p) for p in prompts]
