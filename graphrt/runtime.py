"""`Runtime`, the facade: load a checkpoint under a GPU budget, then decode token ids or text.

The data flows once down the package: a weight source (weights/) -> a placement and step plans
(plan/) -> the weight store and ring (weights/store.py) -> the engine, eager or captured (exec/) ->
sampling -> tokens and text (text.py, chat.py). The runtime wires these together and owns nothing
else: every piece keeps its own state.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import nvtx
import torch

from . import text
from .config import ConfigError, RuntimeOptions, parse_dtype, resolve_device, resolve_max_seq_len
from .exec.decode import Rows, decode_eager, decode_graph
from .exec.comm import join_rank
from .exec.cpu_lane import LANE_SPIN_US
from .exec.engine import Engine
from .exec.speculative import SpecStats
from .exec.graph import DecodeGraph, GraphCache, pad_prompts
from .plan.calibrate import cpu_rate, lane_rates
from .plan.memory import with_prefill_chunk
from .plan.cost import CostModel
from .plan.gpu_calibrate import lane_gpu_rates
from .plan.placement import Placement, plan_placement, prompt_groups
from .plan.schedule import build_plans, build_prologue
from .sampling import SEED_STRIDE, SamplingParams
from .speculative import Speculation, Speculative
from .weights.formats import int4_cpu
from .weights.layout import model_groups
from .weights.pieces import cut_group
from .weights.sources import open_source, weight_policy
from .weights.store import WeightStore

DEVICE_MARGIN = 2**30  # left free by the default budget (CUDA context, cuBLAS workspaces)
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
            self.placement: Placement = self._plan()
        p = self.placement
        if self.comm is not None and opts.prefill_chunk is None:   # every rank runs the same prompt steps
            self.placement = p = with_prefill_chunk(p, self.local_config, self.dtype, opts.max_batch_size,
                                                    opts.max_seq_len, self.comm.min_int(p.prefill_chunk, self.device),
                                                    self.device.type == "cuda")
        self.options = opts = replace(opts, prefill_chunk=p.prefill_chunk)   # "auto" (None) resolved by the plan
        # prompt steps: the CPU lane's groups they stream, in pieces where a slot is smaller (weights/pieces.py)
        prompt_order, pieces = prompt_groups(p.groups, p.prompt_streamed, p.slot_bytes)
        with nvtx.annotate("graphrt.load", color="purple"):
            store = WeightStore(self.source, p.groups, p.resident, p.ring_depth, p.slot_bytes, self.device,
                                opts.progress, p.cpu, shard, p.prompt_streamed, opts.copy_mode, opts.max_batch_size,
                                pieces)
        names, streamed = [g.name for g in p.groups], set(p.streamed)
        prompt, prompt_names = streamed | p.prompt_streamed | set(pieces), [g.name for g in prompt_order]
        self.engine = Engine(self.local_config, opts, store, build_plans(names, streamed, opts.ring_depth),
                             build_prologue(names, streamed, opts.ring_depth), self.dtype, self.comm,
                             shard.vocab[0] if shard is not None else 0,
                             (build_plans(prompt_names, prompt, opts.ring_depth),
                              build_prologue(prompt_names, prompt, opts.ring_depth))
                             if p.prompt_streamed else None)
        self.graph_cache: GraphCache | None = None
        self.speculation = Speculation()   # drafts loaded for this runtime and their device rounds

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, **options) -> "Runtime":
        """A Hugging Face directory or a .gguf file; options: see RuntimeOptions (unknown names raise)."""
        return cls(path, device, dtype, RuntimeOptions.from_kwargs(**options))

    def _plan(self) -> Placement:
        o, cfg = self.options, self.local_config
        device_memory, budget = None, o.gpu_budget
        if self.device.type == "cuda":
            free, device_memory = torch.cuda.mem_get_info(self.device)
            budget = budget if budget is not None else max(free - DEVICE_MARGIN, 0)
        elif budget is None:
            budget = 1 << 62  # CPU: everything resident unless a budget asks for streaming
        cost = CostModel(o.h2d_bandwidth, o.hbm_bandwidth)
        cuda = self.device.type == "cuda"
        if o.cpu_lane:   # the CPU lane's groups are stored in the CPU's formats (e.g. int4 in its kernel's packing)
            cpu_policy = weight_policy(self.source, o.quantization, self.dtype, torch.device("cpu"))
            if cuda:   # calibrate graphrt's CPU kernels as the lane runs them: workers awake between products
                int4_cpu.set_spin(LANE_SPIN_US)
            rates = lane_rates(cfg, cpu_policy, o.max_batch_size, cuda, o.cpu_threads, o.cpu_rate)
            torch.set_num_threads(rates.threads)
            if cuda:   # the GPU's compute is on the lane's path; copies run alone where the lane is idle
                gpu, h2d = lane_gpu_rates(cfg, self.policy, o.max_batch_size, self.device)
                cost = replace(cost, gpu_rate=gpu, h2d_bandwidth=min(cost.h2d_bandwidth, h2d or cost.h2d_bandwidth))
            cost = replace(cost, cpu_rate=rates.cpu, cpu_rate_alone=rates.cpu_alone,
                           h2d_beside_cpu=min(rates.h2d_beside, cost.h2d_bandwidth))

        def plan(cost: CostModel) -> Placement:
            return plan_placement(cfg, budget, o.ring_depth, o.max_batch_size, o.max_seq_len, self.policy,
                                  stream_unit=o.stream_unit, strategy=o.placement, prefill_chunk=o.prefill_chunk,
                                  cost=cost, device_memory=device_memory, fused_attention=cuda)
        p = plan(cost)
        if p.cpu and cuda and not o.cpu_rate:   # the lane's rate at the plan's own working set (a large last-level
            working = cpu_rate(cfg, cpu_policy, o.max_batch_size, True, groups=len(p.cpu))   # cache serves part)
            if abs(working / cost.cpu_rate - 1) > 0.05:   # the rate alone scales alike
                p = plan(replace(cost, cpu_rate=working, cpu_rate_alone=cost.cpu_rate_alone * working / cost.cpu_rate))
        if p.cpu:
            on_cpu = {g.name: g for g in model_groups(cfg, cpu_policy, p.stream_unit, split=dict(p.split))
                      if g.name in p.cpu}
            # prompts stream the CPU-lane groups whose bytes the GPU computes as they are, whole or in pieces
            portable = frozenset(g.name for g in p.groups if g.name in on_cpu and on_cpu[g.name] == g and p.streamed
                                 and (g.nbytes <= p.slot_bytes or cut_group(g, p.slot_bytes) is not None))
            p = replace(p, groups=tuple(on_cpu.get(g.name, g) for g in p.groups), prompt_streamed=portable)
        return p

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
