"""`Engine`: one model step (embedding, every group of the plan, head) over the KV cache and the ring.

The engine owns the per-runtime decode state: the KV cache [layers, 2, maxB, Hkv, S, D], the RoPE
frequencies, the CPU lane (cpu_lane.py) for groups computed on the CPU, and the ring phase (which of the N / gcd(S, N) step plans comes next). The same
`run_plan` issues a step eagerly or into a CUDA graph being captured (exec/graph.py). Rows of a batch
may have different lengths (a ragged batch): each row carries its own positions, and a row's padding
only writes KV positions past its own end, which its later steps overwrite before they read them.
"""
from __future__ import annotations

from typing import Callable

import nvtx
import torch

from ..config import ConfigError, ModelConfig, RuntimeOptions, context_bucket
from ..models import llama
from ..plan.schedule import LANE, StepPlan
from ..weights.store import WeightStore
from .comm import Comm
from .cpu_lane import CpuLane
from .executor import StepExecutor


class Engine:
    def __init__(self, config: ModelConfig, options: RuntimeOptions, store: WeightStore, plans: list[StepPlan],
                 prologue: StepPlan, dtype: torch.dtype, comm: Comm | None = None, vocab_start: int = 0,
                 prompt_plans: tuple[list[StepPlan], StepPlan] | None = None):
        """Tensor parallel: `config` is this rank's part of the model (weights/shard.py), `comm` its collectives,
        `vocab_start` the first vocabulary id of its embedding rows. `prompt_plans` (plans, prologue): the plans
        prompt steps use when they stream the CPU lane's groups instead (store.host holds those groups too)."""
        self.comm, self.vocab_start = comm, vocab_start
        # logits are gathered over the ranks' equal vocabulary shards: the whole vocabulary
        self.vocab_size = config.vocab_size * (comm.world if comm is not None else 1)
        self.config, self.options, self.store, self.dtype = config, options, store, dtype
        self.device = store.device
        self.plans, self.prologue = plans, prologue
        self.prompt_plans = prompt_plans
        self.prompt_mode = False    # the ring follows the prompt plans (switching runs the other prologue)
        self.executor = StepExecutor(store, options.poison_freed_slots)
        cfg = config
        self.kv = torch.zeros(cfg.num_layers, 2, options.max_batch_size, cfg.num_kv_heads, options.max_seq_len,
                              cfg.head_dim, dtype=dtype, device=self.device)
        self.inv_freq = llama.rope_inv_freq(cfg).to(self.device)
        self.rope = llama.rope_table(self.inv_freq, options.max_seq_len, options.max_batch_size, dtype)
        self.ring_step = 0          # steps run since the last prologue; selects the ring phase
        self.ring_cold = True       # the prologue must run before the next step
        # prompt steps attend causally without a mask where a fused kernel does it (CUDA's flash attention takes
        # bf16 / fp16 with grouped kv heads; float32 on CUDA would fall back to materialised scores, which the
        # memory estimate does not count there) and on the CPU
        self.causal_prompts = self.device.type != "cuda" or dtype in (torch.float16, torch.bfloat16)
        # staging for captured decode steps, one token per row (speculative rounds reserve k + 1); prompts run
        # the lane eagerly or stream its groups (prompt plans)
        self.cpu_lane = CpuLane(self.device, options.max_batch_size, cfg.hidden_size, dtype,
                                nodes=options.lane_nodes) if store.cpu else None

    # ---- limits --------------------------------------------------------------------------------
    def check_shape(self, batch: int, length: int) -> None:
        """Refuse a batch or a total length (prompt + new tokens) the runtime cannot hold."""
        o, cfg = self.options, self.config
        if batch > o.max_batch_size:
            raise ConfigError(f"batch of {batch} sequences exceeds max_batch_size={o.max_batch_size}; "
                              "load the runtime with a larger max_batch_size")
        if length > cfg.max_position_embeddings:
            raise ConfigError(f"prompt + new tokens = {length} exceeds the model's "
                              f"{cfg.max_position_embeddings} positions (max_position_embeddings); "
                              "shorten the prompt or generate fewer tokens")
        if length > o.max_seq_len:
            raise ConfigError(f"prompt + new tokens = {length} exceeds max_seq_len={o.max_seq_len}; load the "
                              "runtime with a larger max_seq_len (--max-seq-len) or generate fewer tokens")

    def phase(self) -> int:
        return self.ring_step % len(self.plans)

    def context(self, length: int) -> int:
        return context_bucket(length, self.options.max_seq_len)

    # ---- one step ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the ring's prefetched groups; the next step starts with the prologue."""
        self.ring_cold, self.ring_step = True, 0

    def use_plans(self, prompt: bool, annotate: bool = True) -> None:
        """Make the ring follow the prompt plans or the decode plans, running the prologue when it is cold or
        switches (the prologue's copies wait for every earlier compute, so the slots are free)."""
        prompt = prompt and self.prompt_plans is not None
        if self.ring_cold or prompt != self.prompt_mode:
            self.executor.run(self.prompt_plans[1] if prompt else self.prologue, lambda g, w, s: None, annotate)
            self.ring_cold, self.ring_step, self.prompt_mode = False, 0, prompt

    def forward_step(self, ids: torch.Tensor, positions: torch.Tensor, ctx_len: int,
                     pick: torch.Tensor | None, annotate: bool = True, prompt: bool = False,
                     causal: bool = False) -> torch.Tensor:
        """ids, positions [B, T] on the device -> float32 logits [B, T or 1, vocab]; appends K/V.
        pick [B] (token index per row) asks for one position per row; None for every position. `prompt`: a
        prompt step (it streams the CPU lane's groups where prompt plans exist). `causal`: every row holds
        positions ctx_len - T .. ctx_len - 1 (attention without a mask, see llama.step_context)."""
        self.use_plans(prompt, annotate)
        plans = self.prompt_plans[0] if self.prompt_mode else self.plans
        logits = self.run_plan(plans[self.ring_step % len(plans)], ids, positions, ctx_len, pick, annotate,
                               self.prompt_mode, causal)
        self.ring_step += 1
        return logits

    def run_plan(self, plan: StepPlan, ids: torch.Tensor, positions: torch.Tensor, ctx_len: int,
                 pick: torch.Tensor | None, annotate: bool = True, prompt: bool = False,
                 causal: bool = False, tail: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Issue one step plan (eagerly, or into a graph being captured); no ring bookkeeping. `prompt`: a plan
        of prompt_plans (the CPU lane's groups it streams are computed from their slots). `tail(logits)`: work
        issued after the LM head and before the step joins its copy stream (StepExecutor.run)."""
        cfg = self.config
        ctx = llama.step_context(positions, self.rope, cfg.num_heads // cfg.num_kv_heads, ctx_len, causal)
        act: dict[str, torch.Tensor] = {}

        reduce = self.comm.all_reduce if self.comm is not None else None
        gather = self.comm.all_gather_last if self.comm is not None else None

        def compute(group: str, w: dict, stream: str = "compute") -> None:
            layout = self.store.layouts[group]
            if stream == LANE:   # a split MLP's CPU rows, posted before its GPU rows (which then run beside them)
                gpu = self.store.views(group.replace(":cpu", ":gpu"))   # the resident GPU part holds the norm
                act["mlp_x"] = x = llama.mlp_input(act["h"], gpu, cfg)
                act["lane"] = self.cpu_lane.start(x, lambda x: llama.mlp_rows(x, w))
                return
            if layout.kind == "embed":
                act["h"] = llama.embed_forward(ids, w, self.dtype, self.vocab_start, reduce)
            elif layout.kind in ("layer", "attn"):
                fn = llama.layer_forward if layout.kind == "layer" else llama.attn_forward
                kv = self.kv[layout.layer]
                act["h"] = fn(act["h"], w, cfg, kv[0], kv[1], ctx, reduce)
            elif layout.kind == "mlp" and group in self.store.cpu and not (  # the CPU lane: host weights, CPU math
                    prompt and group in self.store.host):
                act["h"] = self.cpu_lane.run(act["h"], lambda x: llama.mlp_forward(x, w, cfg))
            elif layout.kind == "mlp":
                act["h"] = llama.mlp_forward(act["h"], w, cfg, reduce)
            elif layout.kind == "mlp_gpu" and "lane" in act:   # its rows while the CPU computes the others
                act["mlp_first"] = llama.mlp_gpu_rows(act["h"], act["mlp_x"], w, reduce)
            elif layout.kind == "mlp_gpu":   # a split MLP's first part: the norm and its rows, on the GPU
                act["mlp_x"], act["mlp_first"] = llama.mlp_gpu_part(act["h"], w, cfg, reduce)
            elif layout.kind == "mlp_cpu":   # its other rows: on the CPU lane, or from a slot in prompt steps
                x = act.pop("mlp_x")
                lane = group in self.store.cpu and not (prompt and group in self.store.host)
                if "lane" in act:      # posted by its lane op: the answer
                    second = self.cpu_lane.finish(act.pop("lane"))
                elif lane:
                    second = self.cpu_lane.run(x, lambda x: llama.mlp_rows(x, w))
                else:
                    second = llama.mlp_rows(x, w)
                act["h"] = llama.mlp_join(act["h"], act.pop("mlp_first"), second, reduce)
            elif layout.kind == "piece":   # rows of an MLP's matrix (a prompt step streaming a lane group in pieces)
                piece = self.store.pieces[group]
                part = self.store.layouts[piece.group].kind == "mlp_cpu"   # a split MLP's second part
                act["mlp"] = llama.mlp_piece_forward(act["h"], w, piece.key, act.get("mlp"), cfg,
                                                     act.get("mlp_x") if part else None)
                if piece.ends_group and part:
                    act.pop("mlp_x")
                    act["h"] = llama.mlp_join(act["h"], act.pop("mlp_first"), llama.mlp_pieces_rows(act.pop("mlp")),
                                              reduce)
                elif piece.ends_group:
                    act["h"] = llama.mlp_pieces_output(act["h"], act.pop("mlp"), reduce)
            else:
                h = act["h"]
                if pick is not None:  # [B, T, hidden] -> [B, 1, hidden]
                    h = h.gather(1, pick.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))
                embed = self.store.views("embed") if cfg.tie_word_embeddings else None
                act["logits"] = llama.head_forward(h, w, cfg, embed, gather)

        self.executor.run(plan, compute, annotate, None if tail is None else lambda: tail(act["logits"]))
        return act["logits"]

    # ---- prompts -------------------------------------------------------------------------------
    def chunk_len(self, rows: int) -> int:
        """Prompt tokens per row in one prefill step of `rows` rows. The placement sized prefill_chunk for
        max_batch_size rows and its memory estimate is linear in rows x chunk, so fewer rows take longer
        chunks (one 4096-token prompt in one pass where 8 prompts would take 512 each)."""
        o = self.options
        return max(1, min(o.max_seq_len, o.prefill_chunk * o.max_batch_size // max(rows, 1)))

    def _chunks(self, ids: torch.Tensor, start: int):
        """Prompt chunks of ids [B, T] from position `start`: (offset c0, ids [B, n], positions [B, n],
        context length start + c0 + n: exact, for causal attention), in order; each is one streamed step."""
        B, T = ids.shape
        self.check_shape(B, start + T)
        ids = ids.to(self.device)
        chunk = self.chunk_len(B)
        for c0 in range(0, T, chunk):
            part = ids[:, c0:c0 + chunk]
            n = part.shape[1]
            pos = torch.arange(start + c0, start + c0 + n, device=self.device).expand(B, n)
            yield c0, part, pos, start + c0 + n

    def prefill(self, ids: torch.Tensor, lengths: list[int], start: int = 0) -> torch.Tensor:
        """Run prompts (right-padded ids [B, T]; row b has lengths[b] tokens) in chunks from position
        `start`; returns float32 logits [B, vocab] of each row's last token."""
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        out = None
        with nvtx.annotate("graphrt.prefill", color="orange"):
            for c0, part, pos, ctx in self._chunks(ids, start):
                n = part.shape[1]
                logits = self.forward_step(part, pos, ctx, (last - c0).clamp(0, n - 1), prompt=True,
                                           causal=self.causal_prompts)[:, 0]
                ends_here = ((last >= c0) & (last < c0 + n))[:, None]
                out = logits if out is None else torch.where(ends_here, logits, out)
            self.use_plans(prompt=False)   # decode steps (and captured graphs) follow the decode plans
        return out

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Every position's float32 logits [B, T, vocab] of prompts [B, T] from position 0."""
        return torch.cat([self.forward_step(part, pos, ctx, None, prompt=True, causal=self.causal_prompts)
                          for _, part, pos, ctx in self._chunks(ids, 0)], dim=1)
