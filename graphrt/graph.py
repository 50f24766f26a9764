"""`DecodeGraph`: the whole streamed decode step captured as CUDA graphs; per token the host replays one.

One graph per (batch bucket, ring phase, context bucket, sampling mode). Each contains, on the capture
stream and a copy stream forked from it: the embedding of the last sampled token, every layer with
its slot waits and prefetch copies (including the next step's first groups), the KV append at device
positions, the LM head, sampling, the write-back of the token and the position increment.
Static buffers are allocated once per Runtime and shared by all buckets, which are captured largest
first into one memory pool. Padded rows (a batch between buckets) use KV rows no live sequence owns.
"""
from __future__ import annotations

import nvtx
import torch

from .config import ConfigError
from .runtime import Runtime, context_bucket
from .sampling import sample


class GraphState:
    """Static buffers and captured graphs shared by every DecodeGraph of one Runtime."""

    def __init__(self, rt: Runtime):
        B, d = rt.options.max_batch_size, rt.device
        self.tokens = torch.zeros(B, dtype=torch.int64, device=d)       # last sampled token per row
        self.positions = torch.zeros(B, dtype=torch.int64, device=d)    # its position
        self.logits = torch.zeros(B, rt.config.vocab_size, dtype=torch.float32, device=d)
        self.history = torch.zeros(B, rt.options.max_seq_len, dtype=torch.int64, device=d)
        self.temperature = torch.zeros(B, device=d)
        self.top_k = torch.zeros(B, dtype=torch.int64, device=d)
        self.top_p = torch.ones(B, device=d)
        self.seed = torch.zeros(B, dtype=torch.int64, device=d)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(d)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        b, self.buckets = 1, []
        while b < B:
            self.buckets.append(b)
            b *= 2
        self.buckets.append(B)


def _state(rt: Runtime) -> GraphState:
    if getattr(rt, "_graph_state", None) is None:
        rt._graph_state = GraphState(rt)
    return rt._graph_state


class DecodeGraph:
    def __init__(self, rt: Runtime, batch_size: int, greedy: bool = True, capture_all_buckets: bool = False):
        if rt.device.type != "cuda":
            raise ConfigError("CUDA graphs need device='cuda'; on the CPU use Runtime.generate (eager)")
        rt._check_shape(batch_size, 1)
        self.rt, self.batch_size, self.s = rt, batch_size, _state(rt)
        self.bucket = next(b for b in self.s.buckets if b >= batch_size)
        self.greedy, self.length = greedy, 0
        buckets = [b for b in self.s.buckets if capture_all_buckets or b == self.bucket]
        self.capture(buckets, greedy)

    # ---- capture -------------------------------------------------------------------------------
    def _body(self, b: int, phase: int, ctx_len: int, greedy: bool) -> None:
        """One decode step for rows [0, b): reads tokens/positions, writes logits/history, advances."""
        s = self.s
        pos = s.positions[:b, None]                                                  # [b, 1]
        logits = self.rt.run_plan(self.rt.plans[phase], s.tokens[:b, None], pos, ctx_len, True, False)
        s.logits[:b].copy_(logits[:, -1])
        nxt = sample(s.logits[:b], s.temperature[:b], s.top_k[:b], s.top_p[:b], s.seed[:b],
                     counter=s.positions[:b] + 1, greedy_only=greedy)
        s.history[:b].scatter_(1, pos + 1, nxt[:, None])
        s.tokens[:b].copy_(nxt)
        s.positions[:b].add_(1)

    def capture(self, buckets: list[int], greedy: bool) -> None:
        """Capture every (phase, context bucket) for these batch buckets, largest first, one pool.
        Warm-up and capture scribble on the static buffers and KV rows: state is reset afterwards."""
        rt, s = self.rt, self.s
        ctxs = sorted({context_bucket(n, rt.options.max_seq_len) for n in range(1, rt.options.max_seq_len + 1)},
                      reverse=True)
        todo = [(b, p, c, greedy) for b in sorted(buckets, reverse=True) for c in ctxs
                for p in range(len(rt.plans)) if (b, p, c, greedy) not in s.graphs]
        if not todo:
            return
        with nvtx.annotate("graphrt.capture", color="yellow"), torch.inference_mode():
            s.positions.zero_()
            s.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s.stream):  # warm-up: lazy init of cuBLAS etc. outside capture
                for b, p, c, g in todo[: len(rt.plans)]:
                    self._body(b, p, c, g)
                    s.positions.zero_()
            torch.cuda.current_stream().wait_stream(s.stream)
            for key in todo:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=s.pool, stream=s.stream, capture_error_mode="global"):
                    self._body(*key)
                s.graphs[key] = graph
            torch.cuda.synchronize()
        self.reset()

    # ---- decoding ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.rt.reset()
        self.length = 0

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = None) -> torch.Tensor:
        """Eager streamed prefill of the prompt [B, T], then the first token sampled; returns it [B]."""
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ConfigError(f"this DecodeGraph was captured for batch {self.batch_size}, got {B} prompts")
        greedy = temperature == 0
        self.capture([self.bucket], greedy)  # no-op once this sampling mode is captured
        self.greedy = greedy
        rt, s, b = self.rt, self.s, self.bucket
        self.reset()
        ids = input_ids.to(rt.device)
        if b > B:  # padded rows: a copy of row 0, in KV rows that no live sequence owns
            ids = torch.cat([ids, ids[:1].expand(b - B, T)])
        logits = rt.prefill(ids)[:, -1]
        temp, top_k_t, top_p_t, seeds = rt.sampling_tensors(b, temperature, top_k, top_p, seed)
        for dst, src in ((s.temperature, temp), (s.top_k, top_k_t), (s.top_p, top_p_t), (s.seed, seeds)):
            dst[:b].copy_(src)
        first = sample(logits, temp, top_k_t, top_p_t, seeds, counter=torch.full((b,), T, device=rt.device),
                       greedy_only=greedy)
        s.logits[:b].copy_(logits)
        s.history[:b, :T].copy_(ids)
        s.history[:b, T].copy_(first)
        s.tokens[:b].copy_(first)
        s.positions[:b].fill_(T)
        self.length = T + 1
        return first[:B]

    def step(self) -> torch.Tensor:
        """Replay one decode step; returns this step's tokens [B] (a device view, never overwritten)."""
        if self.length == 0:
            raise ConfigError("call DecodeGraph.prefill(prompt) before step()")
        if self.length >= self.rt.options.max_seq_len:
            raise ConfigError(f"sequence reached max_seq_len={self.rt.options.max_seq_len}; no room for another "
                              "token: reset(), or load the runtime with a larger max_seq_len")
        with nvtx.annotate("graphrt.step", color="red"):
            rt = self.rt
            key = (self.bucket, rt.ring_step % len(rt.plans), context_bucket(self.length, rt.options.max_seq_len),
                   self.greedy)
            self.s.graphs[key].replay()
            rt.ring_step += 1
            self.length += 1
            return self.s.history[: self.batch_size, self.length - 1]

    @property
    def logits(self) -> torch.Tensor:
        """[B, vocab] float32 logits of the last step (static buffer)."""
        return self.s.logits[: self.batch_size]

    def tokens(self) -> torch.Tensor:
        """[B, length]: prompt and every generated token so far, on the device."""
        return self.s.history[: self.batch_size, : self.length]


def stream_with_graph(rt: Runtime, input_ids: torch.Tensor, max_new_tokens: int, chunk: int = 8,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      stop_at_eos: bool = False):
    """Yields the sequence so far (host tensor) every `chunk` tokens. Tokens come back through two
    pinned host buffers: chunk n is copied asynchronously while the host waits only for chunk n-1,
    so the GPU always has queued replays and never waits for the host."""
    B, T = input_ids.shape
    rt._check_shape(B, T + max_new_tokens)
    graphs = rt.__dict__.setdefault("_decode_graphs", {})
    if B not in graphs:
        graphs[B] = rt.capture(B)
    g = graphs[B]
    g.prefill(input_ids, temperature, top_k, top_p, seed)
    eos = rt._eos_tensor().cpu() if stop_at_eos and rt._eos_tensor() is not None else None
    host = [torch.empty(B, T + max_new_tokens, dtype=torch.int64, pin_memory=True) for _ in range(2)]
    pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []

    def ready():
        event, out = pending.pop(0)
        event.synchronize()
        return _cut_at_eos(out.clone(), T, eos) if eos is not None else (out.clone(), False)

    chunks = 0
    for n in range(1, max_new_tokens + 1):
        if n > 1:
            g.step()
        if n % chunk == 0 or n == max_new_tokens:
            out = host[chunks % 2][:, : g.length]  # chunk - 2 used this buffer and was read already
            chunks += 1
            out.copy_(g.tokens(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            pending.append((event, out))
            if len(pending) == 2:
                seq, finished = ready()
                yield seq
                if finished:
                    return
    while pending:
        seq, finished = ready()
        yield seq
        if finished:
            return


def _cut_at_eos(out: torch.Tensor, T: int, eos: torch.Tensor):
    """Tokens after a row's first EOS become EOS; ends when every row has one."""
    gen = out[:, T:]
    hit = torch.isin(gen, eos)
    after = hit.cumsum(dim=1) - hit.int() > 0
    gen = torch.where(after, eos[0], gen)
    done = bool(hit.any(dim=1).all())
    if done:  # trim to the longest row
        last = int(hit.int().argmax(dim=1).max()) + 1
        gen = gen[:, :last]
    return torch.cat([out[:, :T], gen], dim=1), done


@torch.inference_mode()
def generate_with_graph(rt: Runtime, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
    """`Runtime.generate` on CUDA: replays without host syncs; reads the tokens back at the end
    (or every 32 tokens when stopping at EOS)."""
    out = None
    for out in stream_with_graph(rt, input_ids, max_new_tokens, 32 if stop_at_eos else max_new_tokens,
                                 temperature, top_k, top_p, seed, stop_at_eos):
        pass
    return out.to(rt.device)
