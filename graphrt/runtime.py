"""`Runtime`, the facade: load a checkpoint under a GPU budget, then decode token ids or text.

The data flows once down the package: a weight source (weights/) -> a placement and step plans
(plan/) -> the weight store and ring (weights/store.py) -> the engine, eager or captured (exec/) ->
sampling -> tokens and text (text.py, chat.py). The runtime wires these together and owns nothing
else: every piece keeps its own state.
"""
from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import nvtx
import torch

from . import text
from .config import ConfigError, RuntimeOptions, parse_dtype, resolve_device, resolve_max_seq_len
from .exec.decode import Rows, decode_eager, decode_graph
from .exec.comm import join_rank
from .exec.build import build_engine
from .exec.lane_check import lane_busy_per_step
from .exec.speculative import SpecStats
from .exec.graph import DecodeGraph, GraphCache, pad_prompts
from .plan.memory import with_prefill_chunk
from .plan.in_step import IN_STEP_TOLERANCE, store_in_step_factor
from .load_plan import plan_runtime
from .plan.placement import Placement, repredict
from .sampling import SEED_STRIDE, SamplingParams
from .speculative import Speculation, Speculative
from .weights.sources import open_source, weight_policy

Prompts = "torch.Tensor | Sequence[Sequence[int]]"


class Runtime:
    def __init__(self, path: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, options: RuntimeOptions | None = None):
        opts = options or RuntimeOptions()
        self.device = resolve_device(device)
        # validates config, tensors and formats before any weight loads; an opened source is taken as is
        self.source = open_source(path) if isinstance(path, (str, Path)) else path
        self.config = cfg = self.source.config
        self.options = opts = resolve_max_seq_len(opts, cfg)
        self.dtype = parse_dtype(dtype) or (cfg.torch_dtype if self.device.type == "cuda" else torch.float32)
        if cfg.sliding_window is not None and opts.max_seq_len > cfg.sliding_window:
            raise ConfigError(f"{path}: sliding-window attention ({cfg.sliding_window}) is not supported; "
                              f"use max_seq_len <= {cfg.sliding_window}")
        self.policy = weight_policy(self.source, opts.quantization, self.dtype, self.device, opts.tensor_parallel)
        self.comm, shard = None, None
        if opts.tensor_parallel > 1:  # this process is one rank: it holds and computes its shard
            self.comm, shard, self.device = join_rank(cfg, opts, self.source.path, self.device, device, self.dtype)
        self.local_config = shard.config if shard is not None else cfg   # what this process computes
        self.tokenizer = self.source.tokenizer
        self.chat_template = self.source.chat_template
        self.eos_ids = self.source.eos_ids
        with nvtx.annotate("graphrt.plan", color="purple"):
            self.plan = plan_runtime(self.local_config, opts, self.policy, self.source, self.dtype, self.device)
            self.placement: Placement = self.plan.placement
        p = self.placement
        if self.comm is not None and opts.prefill_chunk is None:   # every rank runs the same prompt steps
            self.placement = p = with_prefill_chunk(p, self.local_config, self.dtype, opts.max_batch_size,
                                                    opts.max_seq_len, self.comm.min_int(p.prefill_chunk, self.device),
                                                    self.device.type == "cuda")
        self.options = opts = replace(opts, prefill_chunk=p.prefill_chunk)   # "auto" (None) resolved by the plan
        self.engine = build_engine(self.source, p, self.local_config, opts, self.dtype, self.device, shard, self.comm)
        self.graph_cache: GraphCache | None = None
        self.speculation = Speculation()   # drafts loaded for this runtime and their device rounds
        self.lane_in_step_rate: float | None = None   # bytes/s the CPU lane computed at in the first replays
        if p.cpu and opts.lane_in_step and self.device.type == "cuda" and self.comm is None and not opts.cpu_rate:
            self._lane_in_step(replace(opts, prefill_chunk=self.plan.asked_chunk))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, **options) -> "Runtime":
        """A Hugging Face directory or a .gguf file; options: see RuntimeOptions (unknown names raise)."""
        return cls(path, device, dtype, RuntimeOptions.from_kwargs(**options))

    def _lane_in_step(self, asked: RuntimeOptions) -> None:
        """Measure the CPU lane in the first replays of the decode step (exec/lane_check.py). Where it ran at another
        rate than the plan's (beyond IN_STEP_TOLERANCE), store the factor for later plans (plan/in_step.py) and plan
        again with the measured rate: the same homes keep the engine and take the new prediction; other homes are
        loaded instead (once; a second measurement then only corrects the prediction)."""
        cfg, policy, batch, factor = self.plan.lane
        for reloaded in (False, True):
            p = self.placement
            if not p.cpu:
                return
            busy = lane_busy_per_step(self.capture(batch), self.engine.cpu_lane, len(p.cpu))
            self.lane_in_step_rate = p.cpu_bytes / busy if busy else None
            # the simulator's lane time per step without its per-group nodes (D2H, host node, H2D): the host functions'
            planned = (p.prediction.host_compute if p.prediction else 0.0) - len(p.cpu) * p.cost.cpu_overhead
            if not (busy and planned > 0) or abs(planned / busy - 1) <= IN_STEP_TOLERANCE:
                return
            ratio = planned / busy
            factor *= ratio
            store_in_step_factor(cfg, policy, batch, factor)
            measured = replace(p.cost, cpu_rate=p.cost.cpu_rate * ratio,
                               cpu_rate_alone=(p.cost.cpu_rate_alone or 0) * ratio)
            q = self.plan.replan(measured)
            if reloaded or q == p:   # the same homes (or a second miss): this placement at the measured rate
                self.placement = repredict(p, measured)
                return
            print(f"[graphrt] the CPU lane's host functions took {busy * 1e3:.2f} ms per decode step, the plan's "
                  f"{planned * 1e3:.2f}: loading the placement planned at the measured rate", file=sys.stderr)
            self.close()
            self.engine = None
            gc.collect()
            torch.cuda.empty_cache()
            self.placement, self.options = q, replace(asked, prefill_chunk=q.prefill_chunk)
            self.engine = build_engine(self.source, q, self.local_config, self.options, self.dtype, self.device)
            self.speculation = Speculation()

    # ---- token ids in, token ids out ------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Stateless full forward: float32 logits [B, T, vocab] on the runtime's device."""
        ids, _ = self._prompts(input_ids)
        return self.engine.logits(ids)

    def capture(self, batch_size: int, **kwargs) -> DecodeGraph:
        """The captured decode step for `batch_size` sequences (CUDA graphs; see exec/graph.py)."""
        if self.device.type != "cuda":
            raise ConfigError("CUDA graphs need device='cuda'; on the CPU use Runtime.generate (eager)")
        if self.graph_cache is None:
            self.graph_cache = GraphCache(self.engine)
        return self.graph_cache.decode_graph(batch_size, **kwargs)

    @torch.inference_mode()
    def stream(self, prompts: Prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop_at_eos: bool = False,
               use_graph: bool | None = None, chunk: int = 8, start: int = 0,
               logits_out: list | None = None, speculative: Speculative | None = None,
               speculative_stats: SpecStats | None = None) -> Iterator[list[list[int]]]:
        """Yields, as they come, the new token ids of each row (one list per prompt; a row that has
        ended at its EOS gains nothing more). Graph path: blocks of `chunk` tokens. `start` > 0
        continues after positions already in the KV cache (batch 1: a chat's earlier turns)."""
        ids, lengths = self._prompts(prompts)
        _check_count("max_new_tokens", max_new_tokens, 1)
        params = SamplingParams(temperature, top_k, top_p, seed)
        self.engine.check_shape(len(lengths), start + max(lengths) + max_new_tokens)
        if speculative is not None:  # draft k tokens, verify them in one target pass (speculative.py)
            if start:
                raise ConfigError("speculative decoding starts from position 0 (not after a chat's earlier turns)")
            capture = self._use_graph(use_graph)   # greedy and sampled rounds alike (tests/test_speculative.py)
            blocks = self.speculation.blocks(self, speculative, ids, lengths, max_new_tokens, params, capture,
                                             speculative_stats)
        elif self._use_graph(use_graph):
            blocks = decode_graph(self.capture(len(lengths)), ids, lengths, max_new_tokens, params, chunk, start)
        else:
            blocks = decode_eager(self.engine, ids, lengths, max_new_tokens, params, start, logits_out)
        rows = Rows(len(lengths), self.eos_ids if stop_at_eos else ())
        for block in blocks:
            yield rows.add(block)
            if rows.all_finished:
                blocks.close()
                return

    @torch.inference_mode()
    def generate(self, prompts: Prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop_at_eos: bool = False,
                 use_graph: bool | None = None, speculative: Speculative | None = None,
                 speculative_stats: SpecStats | None = None) -> torch.Tensor | list[list[int]]:
        """Prompts as a [B, T] tensor -> [B, T + n] on the device (rows that ended at EOS are filled
        with it); as B lists of ids of any lengths -> B lists (prompt + new tokens, each up to and
        including its own EOS when stop_at_eos). Each row decodes as it would alone; a list longer
        than max_batch_size runs in batches of that size."""
        chunk = 32 if stop_at_eos else max_new_tokens
        n, most = len(self._prompts(prompts)[1]), self.options.max_batch_size
        if not isinstance(prompts, torch.Tensor) and n > most:
            if isinstance(seed, int):  # the seeds the rows would have in one batch
                seed = [seed + b * SEED_STRIDE for b in range(n)]
            return [row for i in range(0, n, most) for row in self.generate(
                prompts[i:i + most], max_new_tokens, temperature, top_k, top_p,
                seed[i:i + most] if seed is not None else None, stop_at_eos, use_graph, speculative,
                speculative_stats)]
        rows = Rows(n)
        for gained in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                                  use_graph, chunk=chunk, speculative=speculative,
                                  speculative_stats=speculative_stats):
            for r, got in enumerate(gained):
                rows.new[r] += got
        if isinstance(prompts, torch.Tensor):
            rows.finished = [bool(r) and r[-1] in self.eos_ids and stop_at_eos for r in rows.new]
            return rows.as_tensor(prompts).to(self.device)
        return [list(p) + r for p, r in zip(prompts, rows.new)]

    def decode_eager(self, input_ids: torch.Tensor, max_new_tokens: int, logits_out: list | None = None,
                     **sampling) -> Iterator[torch.Tensor]:
        """The eager executor's per-step tokens [B, 1] (on the device, no host sync), for tests and benchmarks."""
        ids, lengths = self._prompts(input_ids)
        return decode_eager(self.engine, ids, lengths, max_new_tokens, SamplingParams(**sampling),
                            logits_out=logits_out)

    def close(self) -> None:
        """Drop the captured graphs, give back the pinned host memory of streamed weights now (also done when
        collected) and the CPU lane's host functions (they hold its groups' host buffers). Tensor parallel: call
        it before `torch.distributed.destroy_process_group()`; a live graph holding captured NCCL collectives
        makes the communicator's destruction hang (pytorch/pytorch#115388). DecodeGraphs the caller still holds
        keep their graphs alive: drop them first."""
        self.graph_cache = None
        self.speculation.release()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.engine.cpu_lane is not None:   # no graph calls these functions any more
            self.engine.cpu_lane.release()
        self.engine.store.release()

    def shutdown(self) -> None:
        """`close()`, then leave the tensor-parallel process group (destroying it) if this runtime joined one."""
        self.close()
        if self.comm is not None:
            import gc
            import torch.distributed as dist
            gc.collect()   # graphs kept only by reference cycles
            if dist.is_initialized():
                dist.destroy_process_group()

    def _use_graph(self, use_graph: bool | None) -> bool:
        if use_graph and self.device.type != "cuda":
            raise ConfigError("use_graph=True needs device='cuda'; CUDA graphs do not exist on the CPU")
        return self.device.type == "cuda" if use_graph is None else use_graph

    def _prompts(self, prompts) -> tuple[torch.Tensor, list[int]]:
        """Validate prompts: a [B, T] int tensor, or a non-empty list of non-empty lists of ids."""
        if isinstance(prompts, str):
            raise TypeError("prompts are token ids; for text use generate_text([...]) or chat(messages)")
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32) or prompts.numel() == 0:
                raise TypeError(f"a prompt tensor must be [B, T] int64 with T >= 1, got {list(prompts.shape)} "
                                f"{prompts.dtype}; for one prompt of ids use ids[None]")
            bad = bool(((prompts < 0) | (prompts >= self.config.vocab_size)).any())
        else:
            if not isinstance(prompts, Sequence) or not prompts or \
                    not all(isinstance(p, Sequence) and not isinstance(p, str) for p in prompts):
                raise TypeError("prompts must be a [B, T] tensor or a list of token-id lists "
                                "(for one prompt: [ids]); for text use generate_text")
            if any(len(p) == 0 for p in prompts):
                raise ValueError("a prompt is empty; every prompt needs at least one token")
            if not all(isinstance(t, int) and not isinstance(t, bool) for p in prompts for t in p):
                raise TypeError("token ids must be ints")
            bad = any(not 0 <= t < self.config.vocab_size for p in prompts for t in p)
        if bad:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}) (the model's vocab_size)")
        return pad_prompts(prompts if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts])

    # ---- text in, text out ----------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise ConfigError(f"{self.source.path} has no tokenizer (tokenizer.json); text needs one")
        return self.tokenizer

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The checkpoint's own chat template (ChatML when it has none), rendered with jinja2."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **extra)

    def encode(self, prompt: str) -> list[int]:
        """Text -> ids as the chat template and the model expect (special tokens written in the text
        are parsed; no BOS is added: templates add their own)."""
        if not isinstance(prompt, str):
            raise TypeError(f"expected a str prompt, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty; give at least one character")
        return self._tok().encode(prompt, add_special_tokens=False).ids

    def generate_text(self, prompts: str | list[str], max_new_tokens: int = 64, **sampling) -> list[str]:
        """Texts -> the new text of each (decoding stops at each row's EOS)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        sampling.setdefault("stop_at_eos", True)
        ids = [self.encode(p) for p in prompts]
        out = self.generate(ids, max_new_tokens, **sampling)
        return [self._tok().decode(o[len(i):]) for o, i in zip(out, ids)]

    def stream_text(self, prompt: str, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """One prompt's new text, piece by piece, incrementally detokenized (never a split character)."""
        ids = self.encode(prompt)
        sampling.setdefault("stop_at_eos", True)
        pieces = text.TextStream(self._tok(), prompt_ids=ids)
        for gained in self.stream([ids], max_new_tokens, **sampling):
            piece = pieces.push_many(gained[0])
            if piece:
                yield piece
        rest = pieces.finish()  # a character cut off by the end of generation
        if rest:
            yield rest

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **sampling) -> str:
        """One assistant reply to a conversation, rendered with the checkpoint's chat template."""
        return self.generate_text(self.apply_chat_template(messages), max_new_tokens, **sampling)[0]


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
