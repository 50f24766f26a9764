"""`Runtime`: load a checkpoint under a GPU budget and run eager forward passes and generation."""
from __future__ import annotations

from pathlib import Path

import nvtx
import torch

from .checkpoint import Checkpoint
from .config import ConfigError, RuntimeOptions, parse_dtype
from .executor import StepExecutor
from .models import llama
from .placement import CostModel, Placement, plan_placement
from .sampling import sample
from .schedule import build_plans, build_prologue
from .store import WeightStore
from .tokenizer import load_tokenizer

DEVICE_MARGIN = 2**30  # left free by the default budget (CUDA context, cuBLAS workspaces)


def context_bucket(length: int, max_seq_len: int) -> int:
    """Attended context length for a step whose last position is length - 1: a power of two >= 64."""
    return min(max_seq_len, max(64, 1 << (max(length, 1) - 1).bit_length()))


class Runtime:
    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, opts: RuntimeOptions):
        self.checkpoint, self.config, self.device, self.dtype, self.options = ckpt, ckpt.config, device, dtype, opts
        cfg = self.config
        if cfg.sliding_window is not None and opts.max_seq_len > cfg.sliding_window:
            raise ConfigError(f"{ckpt.path}: sliding-window attention ({cfg.sliding_window}) is not supported; "
                              f"use max_seq_len <= {cfg.sliding_window}")
        with nvtx.annotate("graphrt.plan", color="purple"):
            self.placement: Placement = self._plan()
        with nvtx.annotate("graphrt.load", color="purple"):
            self.store = WeightStore(ckpt, self.placement, device, opts.progress)
        names = [g.name for g in self.placement.groups]
        streamed = set(self.placement.streamed)
        self.plans = build_plans(names, streamed, opts.ring_depth)
        self.prologue = build_prologue(names, streamed, opts.ring_depth)
        self.executor = StepExecutor(self.store, dtype, opts.poison_freed_slots)
        self.kv = torch.zeros(cfg.num_layers, 2, opts.max_batch_size, cfg.num_kv_heads, opts.max_seq_len,
                              cfg.head_dim, dtype=dtype, device=device)
        self.inv_freq = llama.rope_inv_freq(cfg).to(device)
        self.tokenizer = load_tokenizer(ckpt.tokenizer_path)
        self.ring_step = 0          # steps run since the last prologue; selects the ring phase
        self.ring_cold = True       # the prologue must run before the next step

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, max_batch_size: int = 1,
                        max_seq_len: int = 2048, **options) -> "Runtime":
        opts = RuntimeOptions.from_kwargs(max_batch_size=max_batch_size, max_seq_len=max_seq_len, **options)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        ckpt = Checkpoint(path)
        dtype = parse_dtype(dtype) or (ckpt.config.torch_dtype if device.type == "cuda" else torch.float32)
        return cls(ckpt, device, dtype, opts)

    def _plan(self) -> Placement:
        o, cfg = self.options, self.config
        device_memory = None
        budget = o.gpu_budget
        if self.device.type == "cuda":
            free, device_memory = torch.cuda.mem_get_info(self.device)
            budget = budget if budget is not None else max(free - DEVICE_MARGIN, 0)
        elif budget is None:
            budget = 1 << 62  # CPU: everything resident unless a budget asks for streaming
        cost = CostModel(o.h2d_bandwidth, o.hbm_bandwidth)
        return plan_placement(cfg, budget, o.ring_depth, o.max_batch_size, o.max_seq_len, self.dtype,
                              stream_unit=o.stream_unit, strategy=o.placement, prefill_chunk=o.prefill_chunk,
                              cost=cost, device_memory=device_memory)

    # ---- one streamed step: embedding, every layer, head --------------------------------------
    def reset(self) -> None:
        """Forget the ring's prefetched groups; the next step starts with the prologue."""
        self.ring_cold, self.ring_step = True, 0

    def forward_step(self, ids: torch.Tensor, positions: torch.Tensor, ctx_len: int,
                     last_only: bool, annotate: bool = True) -> torch.Tensor:
        """ids, positions [B, T] on the device -> float32 logits [B, 1 or T, vocab]. Appends K/V."""
        if self.ring_cold:
            self.executor.run(self.prologue, lambda g, w: None, annotate)
            self.ring_cold, self.ring_step = False, 0
        logits = self.run_plan(self.plans[self.ring_step % len(self.plans)], ids, positions, ctx_len,
                               last_only, annotate)
        self.ring_step += 1
        return logits

    def run_plan(self, plan, ids: torch.Tensor, positions: torch.Tensor, ctx_len: int, last_only: bool,
                 annotate: bool = True) -> torch.Tensor:
        """Issue one step plan (eagerly, or into a graph being captured); no ring bookkeeping."""
        cfg = self.config
        ctx = llama.step_context(positions, self.inv_freq, self.dtype, cfg.num_heads // cfg.num_kv_heads, ctx_len)
        act: dict[str, torch.Tensor] = {}

        def compute(group: str, w: dict) -> None:
            kind, _, idx = group.partition(".")
            if kind == "embed":
                act["h"] = llama.embed_forward(ids, w)
            elif kind in ("layer", "attn"):
                i = int(idx)
                fn = llama.layer_forward if kind == "layer" else llama.attn_forward
                act["h"] = fn(act["h"], w, cfg, self.kv[i, 0], self.kv[i, 1], ctx)
            elif kind == "mlp":
                act["h"] = llama.mlp_forward(act["h"], w, cfg)
            else:
                h = act["h"][:, -1:] if last_only else act["h"]
                embed = self.store.views("embed") if cfg.tie_word_embeddings else None
                act["logits"] = llama.head_forward(h, w, cfg, embed)

        self.executor.run(plan, compute, annotate)
        return act["logits"]

    def _check_shape(self, batch: int, length: int) -> None:
        o = self.options
        if batch > o.max_batch_size:
            raise ConfigError(f"batch of {batch} sequences exceeds max_batch_size={o.max_batch_size}; "
                              "load the runtime with a larger max_batch_size")
        if length > o.max_seq_len:
            raise ConfigError(f"sequence length {length} exceeds max_seq_len={o.max_seq_len}; load the "
                              "runtime with a larger max_seq_len or generate fewer tokens")

    def prefill(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Run the prompt [B, T] in chunks from position 0; returns logits of the last chunk."""
        B, T = ids.shape
        self._check_shape(B, T)
        ids = ids.to(self.device)
        out = []
        with nvtx.annotate("graphrt.prefill", color="orange"):
            for start in range(0, T, self.options.prefill_chunk):
                chunk = ids[:, start:start + self.options.prefill_chunk]
                n = chunk.shape[1]
                pos = torch.arange(start, start + n, device=self.device).expand(B, n)
                ctx = context_bucket(start + n, self.options.max_seq_len)
                out.append(self.forward_step(chunk, pos, ctx, last_only and start + n == T))
        return out[-1] if last_only else torch.cat(out, dim=1)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Stateless full forward: float32 logits [B, T, vocab] on the runtime's device."""
        return self.prefill(input_ids, last_only=False)

    def sampling_tensors(self, batch: int, temperature: float, top_k: int, top_p: float, seed: int | None):
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
        d = self.device
        rows = torch.arange(batch, device=d, dtype=torch.int64)
        return (torch.full((batch,), float(temperature), device=d), torch.full((batch,), int(top_k), device=d),
                torch.full((batch,), float(top_p), device=d), seed + rows * 0x632BE5AB)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = False,
                 use_graph: bool | None = None) -> torch.Tensor:
        """[B, T] prompt -> [B, T + max_new_tokens] (shorter when stop_at_eos ends every row early)."""
        B, T = input_ids.shape
        self._check_shape(B, T + max_new_tokens)
        if use_graph is None:
            use_graph = self.device.type == "cuda"
        if use_graph:
            if self.device.type != "cuda":
                raise ConfigError("use_graph=True needs device='cuda'; CUDA graphs do not exist on the CPU")
            from .graph import generate_with_graph
            return generate_with_graph(self, input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        tokens = list(self._decode_eager(input_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos))
        ids = input_ids.to(self.device)
        return torch.cat([ids, torch.stack(tokens, dim=1)], dim=1) if tokens else ids

    @torch.inference_mode()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, **sampling):
        """Eager generation that yields the sequence so far ([B, T + n], prompt included) per token."""
        ids = input_ids.to(self.device)
        out = [ids]
        for tok in self._decode_eager(ids, max_new_tokens, **sampling):
            out.append(tok[:, None])
            yield torch.cat(out, dim=1)

    def _decode_eager(self, input_ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                      stop_at_eos=False, logits_out: list | None = None):
        """Yields each step's tokens [B]: prefill, then one eager streamed step per token.
        `logits_out`, if given, receives the [B, vocab] logits each token was sampled from."""
        B, T = input_ids.shape
        self._check_shape(B, T + max_new_tokens)
        params = self.sampling_tensors(B, temperature, top_k, top_p, seed)
        greedy = temperature == 0
        logits = self.prefill(input_ids.to(self.device))[:, -1]
        eos = self._eos_tensor() if stop_at_eos else None
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for i in range(max_new_tokens):
            pos = T + i
            tok = sample(logits, *params, counter=torch.full((B,), pos, device=self.device), greedy_only=greedy)
            if logits_out is not None:
                logits_out.append(logits.clone())
            if eos is not None:
                tok = torch.where(done, eos[0], tok)
                done |= torch.isin(tok, eos)
            yield tok
            if i + 1 == max_new_tokens or (eos is not None and bool(done.all())):
                return
            with nvtx.annotate("graphrt.step", color="red"):
                p = torch.full((B, 1), pos, device=self.device)
                logits = self.forward_step(tok[:, None], p, context_bucket(pos + 1, self.options.max_seq_len),
                                           True)[:, -1]

    def _eos_tensor(self) -> torch.Tensor | None:
        ids = self.config.eos_token_ids
        return torch.tensor(ids, device=self.device) if ids else None

    def capture(self, batch_size: int, **kwargs):
        """Capture the decode step for `batch_size` sequences as CUDA graphs (see graph.py)."""
        from .graph import DecodeGraph
        return DecodeGraph(self, batch_size, **kwargs)
