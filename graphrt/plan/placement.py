"""Placement: which weight groups stay resident under a GPU memory budget and which stream."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import ConfigError, ModelConfig
from ..weights.layout import FormatPolicy, GroupLayout, model_groups
from ..weights.pieces import Piece, cut_group
from .cost import CostModel
from .memory import PREFILL_BASE, essentials, widen_prefill_chunk
from .schedule import build_plans, build_prologue
from .simulator import SimResult, simulate
from .lanes import beside_candidates, beside_groups, lane_candidates, spread, split_candidates



def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


class BudgetError(ConfigError):
    """The GPU budget cannot hold what graphrt needs; the message gives the minimum."""


@dataclass(frozen=True)
class Placement:
    groups: tuple[GroupLayout, ...]
    resident: frozenset[str]
    ring_depth: int
    slot_bytes: int
    budget: int
    memory: dict[str, int]           # what the budget holds, by item
    prediction: SimResult | None = field(default=None, compare=False)
    strategy: str = "all-resident"
    stream_unit: str = "layer"
    cpu: frozenset[str] = frozenset()  # groups computed on the CPU from host memory (the CPU lane)
    cpu_busy: float | None = field(default=None, compare=False)  # predicted CPU share of the step
    prefill_chunk: int = PREFILL_BASE  # prompt tokens per prefill step (each streams the weights once)
    prompt_streamed: frozenset[str] = frozenset()  # CPU-lane groups that prompt steps stream through the ring
    cost: CostModel | None = field(default=None, compare=False)   # the rates the prediction used
    split: tuple[tuple[int, int], ...] = ()   # (layer, GPU rows) of MLPs split between the GPU and the CPU (lanes.py)

    @property
    def beside(self) -> frozenset[str]:
        """CPU-lane groups computed while their GPU part runs (schedule.build_step_plan's `beside`)."""
        return beside_groups(self.groups, set(self.streamed), self.cpu, self.cost)

    @property
    def streamed(self) -> list[str]:
        return [g.name for g in self.groups if g.name not in self.resident and g.name not in self.cpu]

    @property
    def streamed_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.name not in self.resident and g.name not in self.cpu)

    @property
    def cpu_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.name in self.cpu)

    @property
    def resident_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups if g.name in self.resident)

    def describe(self) -> str:
        gib = 2**30
        lines = [f"budget {self.budget / gib:.2f} GiB: " +
                 ", ".join(f"{k} {v / gib:.2f}" for k, v in self.memory.items()),
                 f"resident {len(self.resident)} groups ({self.resident_bytes / gib:.2f} GiB), "
                 f"streamed {len(self.streamed)} groups ({self.streamed_bytes / gib:.2f} GiB per step) "
                 f"through {self.ring_depth if self.streamed else 0} slots of {self.slot_bytes / 2**20:.1f} MiB"
                 f" [{self.strategy}, {self.stream_unit} groups]"]
        if self.streamed:
            lines.append("streamed: " + _ranges(self.streamed))
        if self.cpu:
            names = [g.name for g in self.groups if g.name in self.cpu]
            lines.append(f"CPU lane: {len(names)} groups ({self.cpu_bytes / gib:.2f} GiB per step, computed on the "
                         f"CPU from host memory): {_ranges(names)}")
        if self.split:
            by_rows: dict[int, list[str]] = {}
            for i, rows in self.split:
                by_rows.setdefault(rows, []).append(f"mlp.{i}")
            lines.append("split MLPs (the GPU computes their first intermediate rows, the CPU lane the rest): " +
                         "; ".join(f"{rows} rows on the GPU: {_ranges(names)}" for rows, names in by_rows.items()))
        if self.prediction is not None and self.prediction.step_time:
            p = self.prediction
            lines.append(f"predicted step {p.step_time * 1e3:.2f} ms ({1 / p.step_time:.1f} tokens/s per "
                         f"sequence), copy engine busy {100 * p.copy_busy:.1f}%, compute stall "
                         f"{p.compute_stall * 1e3:.2f} ms/step")
            if self.cpu and self.cpu_busy is not None:
                c = self.cost
                rates = (f" (weights at {c.cpu_rate / 1e9:.1f} GB/s beside copies, "
                         f"{(c.cpu_rate_alone or c.cpu_rate) / 1e9:.1f} alone; copies at "
                         f"{(c.h2d_beside_cpu or c.h2d_bandwidth) / 1e9:.1f} GB/s beside it, "
                         f"{c.h2d_bandwidth / 1e9:.1f} alone; GPU products at "
                         f"{(c.gpu_rate or c.hbm_bandwidth) / 1e12:.2f} TB/s)") if c is not None else ""
                per_group = f"; {c.cpu_group_cost * 1e6:.0f} us a group beyond its bytes" if c and c.cpu_group_cost \
                    else ""
                lines.append(f"CPU lane busy {100 * self.cpu_busy:.1f}% of the step{rates}{per_group}")
        lines.append(f"prefill: chunks of up to {self.prefill_chunk} tokens per row at the full batch, longer for "
                     f"fewer rows (activations "
                     f"{self.memory.get('activations', 0) / gib:.2f} GiB)" +
                     (f"; prompts stream {len(self.prompt_streamed)} of the CPU lane's groups through the ring "
                      "(a prompt's many tokens cost the CPU more than the copy), in pieces where a slot is smaller"
                      if self.prompt_streamed else ""))
        return "\n".join(lines)


def _ranges(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:4])}, ..., {', '.join(names[-3:])}"


def plan_placement(cfg: ModelConfig, gpu_budget: int, ring_depth: int = 3, max_batch_size: int = 1,
                   max_seq_len: int = 2048, dtype: torch.dtype | FormatPolicy = torch.bfloat16, *,
                   stream_unit: str = "auto", strategy: str = "auto", prefill_chunk: int | None = 256,
                   cost: CostModel | None = None, device_memory: int | None = None,
                   fused_attention: bool = False) -> Placement:
    """Choose resident groups that minimise the predicted step time within `gpu_budget` bytes.
    stream_unit "auto" plans with whole layers and with attention/MLP halves and keeps the faster:
    both copy at the same bandwidth (measured), halves need smaller slots, layers fewer events.
    prefill_chunk None: plan with PREFILL_BASE, then widen the chunk into the memory the placement left.
    fused_attention: see `essentials` (True for CUDA devices)."""
    if prefill_chunk is None:
        p = plan_placement(cfg, gpu_budget, ring_depth, max_batch_size, max_seq_len, dtype, stream_unit=stream_unit,
                           strategy=strategy, prefill_chunk=PREFILL_BASE, cost=cost, device_memory=device_memory,
                           fused_attention=fused_attention)
        compute = dtype.compute_dtype if isinstance(dtype, FormatPolicy) else dtype
        return widen_prefill_chunk(p, cfg, compute, max_batch_size, max_seq_len, fused_attention)
    if strategy.startswith("lane"):   # the lane's plans: a CPU rate, and attention and MLP halves
        if not (cost and cost.cpu_rate > 0) or stream_unit == "layer":
            raise ConfigError(f"placement {strategy} computes MLPs on the CPU lane: it needs a CPU rate (cpu_lane=True; "
                              "--cpu-rate GBps in graphrt plan) and attention/MLP groups (stream_unit auto or attn_mlp)")
        stream_unit = "attn_mlp"
        if strategy == "lane-beside" and not cost.lane_beside:
            raise ConfigError("placement lane-beside computes CPU rows while the GPU computes its own: it needs "
                              "signalled lane nodes (lane_nodes 'auto' or 'signal'; host nodes hold the stream)")
    if stream_unit == "auto":
        kw = dict(strategy=strategy, prefill_chunk=prefill_chunk, cost=cost, device_memory=device_memory,
                  fused_attention=fused_attention)
        layer = plan_placement(cfg, gpu_budget, ring_depth, max_batch_size, max_seq_len, dtype,
                               stream_unit="layer", **kw)
        if layer.prediction is None:
            return layer
        try:
            half = plan_placement(cfg, gpu_budget, ring_depth, max_batch_size, max_seq_len, dtype,
                                  stream_unit="attn_mlp", **kw)
        except BudgetError:
            return layer
        return half if half.prediction.step_time < layer.prediction.step_time * 0.99 else layer
    if ring_depth < 2:
        raise ConfigError(f"ring_depth must be >= 2, got {ring_depth}")
    if device_memory is not None and gpu_budget > device_memory:
        raise BudgetError(f"gpu_budget {gpu_budget / 2**30:.2f} GiB is larger than the device's "
                          f"{device_memory / 2**30:.2f} GiB; give a smaller budget or leave it unset")
    cost = cost or CostModel()
    policy = dtype if isinstance(dtype, FormatPolicy) else FormatPolicy(dtype)
    groups = model_groups(cfg, policy, stream_unit)
    fixed = essentials(cfg, policy.compute_dtype, max_batch_size, max_seq_len, prefill_chunk, fused_attention)
    total = sum(g.nbytes for g in groups)
    base = sum(fixed.values())
    if base + total <= gpu_budget:
        return Placement(tuple(groups), frozenset(g.name for g in groups), ring_depth, 0, gpu_budget,
                         {"weights": total, **fixed}, prefill_chunk=prefill_chunk)
    # Tied embeddings serve the first and the last compute: they stay resident.
    must = [g for g in groups if g.kind == "embed" and cfg.tie_word_embeddings]
    others = [g for g in groups if g not in must]
    layers = [g.nbytes for g in others if g.kind not in ("embed", "head")]
    ends = sum(g.nbytes for g in others if g.kind in ("embed", "head"))
    # the smallest placement: everything streams through 2 slots, or the ends stay and layers stream
    minimum = base + sum(g.nbytes for g in must) + min(2 * max(g.nbytes for g in others),
                                                       ends + 2 * max(layers, default=0))
    if gpu_budget < minimum:
        raise BudgetError(
            f"gpu_budget {_gib(gpu_budget)} is too small: at least {minimum / 2**30:.2f} GiB is "
            f"needed (KV cache {fixed['kv_cache'] / 2**30:.2f}, activations and logits "
            f"{(fixed['activations'] + fixed['logits']) / 2**30:.2f}, 2 ring slots, margin); raise gpu_budget "
            "or lower max_seq_len / the batch size")
    evaluated = [_evaluate(groups, resident, ring_depth, gpu_budget, fixed, cost, kind)
                 for resident, kind in _candidates(groups, must, gpu_budget - base, ring_depth, strategy)]
    if cost.cpu_rate > 0 and strategy in ("auto", "lane", "lane-split", "lane-beside"):   # the lane's plans
        lanes = [_evaluate_homes(groups, resident, cpu, ring_depth, gpu_budget, fixed, cost, "lane")
                 for resident, cpu in lane_candidates(groups, must, gpu_budget - base, ring_depth)]

        def split(kind: str):
            def evaluate(parts, resident, cpu, rows) -> Placement:
                p = _evaluate_homes(parts, resident, cpu, ring_depth, gpu_budget, fixed, cost, kind)
                return replace(p, split=tuple(sorted(rows.items())))
            return evaluate
        best = sorted(lanes, key=lambda p: p.prediction.step_time)[:2]   # MLPs split between the two lanes
        splits = [c for p in best for c in split_candidates(cfg, policy, p, gpu_budget - base, split("lane-split"))]
        # every MLP split beside its resident rows: asked for only (lanes.py says why)
        besides = list(beside_candidates(cfg, policy, groups, must, gpu_budget - base, ring_depth,
                                         split("lane-beside"))) if cost.lane_beside and strategy == "lane-beside" \
            else []
        evaluated += {"auto": lanes + splits, "lane": lanes, "lane-split": splits, "lane-beside": besides}[strategy]
    if not evaluated and strategy.startswith("lane"):
        what = "on the CPU lane" if strategy == "lane" else "split between the GPU and the CPU lane"
        raise BudgetError(f"placement {strategy}: no plan with MLPs {what} fits gpu_budget {_gib(gpu_budget)} "
                          f"(intermediate_size {cfg.intermediate_size}); use placement auto")
    if not evaluated:
        raise BudgetError(f"no placement fits gpu_budget {gpu_budget / 2**30:.2f} GiB with ring_depth "
                          f"{ring_depth}; raise gpu_budget or lower ring_depth")
    fastest = min(p.prediction.step_time for p in evaluated)
    # Decode steps are copy-bound whichever layers stay: among the placements within 1% of the fastest decode
    # step, the shortest prompt step of a full chunk (resident layers spread between streamed ones keep the copy
    # engine busy while a long chunk computes them; all resident first, it waits for the first freed slot).
    tokens = max_batch_size * min(prefill_chunk, max_seq_len)
    near = [p for p in evaluated if p.prediction.step_time <= 1.01 * fastest]
    best = min(near, key=lambda p: prompt_step_time(p, replace(cost, batch_size=tokens)))
    return replace(best, prefill_chunk=prefill_chunk)


def prompt_step_time(p: Placement, cost: CostModel) -> float:
    """Predicted time of a prompt step of cost.batch_size tokens on placement p: every group that is not resident
    streams (prompt steps carry the CPU lane's groups over PCIe too, in pieces where a slot is smaller)."""
    groups, _ = prompt_groups(p.groups, {g.name for g in p.groups if g.name not in p.resident}, p.slot_bytes)
    streamed = {g.name for g in groups if g.name not in p.resident}
    return _simulate(groups, streamed, p.ring_depth, cost, frozenset()).step_time


def prompt_groups(groups, streamed: set[str], slot_bytes: int) -> tuple[list[GroupLayout], dict[str, Piece]]:
    """A prompt step's groups in order, each of the `streamed` groups that no slot holds replaced by its pieces
    (weights/pieces.py); and those pieces by name."""
    order, pieces = [], {}
    for g in groups:
        cut = cut_group(g, slot_bytes) if g.name in streamed and g.nbytes > slot_bytes else None
        order += [c.layout for c in cut] if cut else [g]
        pieces.update({c.layout.name: c for c in cut or ()})
    return order, pieces


def repredict(p: Placement, cost: CostModel) -> Placement:
    """p's homes priced at other rates (the CPU lane's measured in the decode step: runtime.py)."""
    sim = _simulate(p.groups, set(p.streamed), p.ring_depth, cost, p.cpu)
    busy = sim.host_compute / sim.step_time if p.cpu and sim.step_time else None
    return replace(p, prediction=sim, cost=cost, cpu_busy=busy)


def _simulate(groups, streamed: set[str], ring_depth: int, cost: CostModel, cpu: frozenset[str]) -> SimResult:
    """The simulator's step for these homes: `streamed` groups through the ring, `cpu` groups on the CPU lane (with
    a lane, copies and CPU groups share host memory: each runs at its rate beside the other while both do)."""
    names = [g.name for g in groups]
    by_name = {g.name: g for g in groups}
    beside = beside_groups(groups, streamed, cpu, cost)

    def compute(n: str):   # a group beside its GPU part: the compute stream only adds its answer
        return 0.0 if n in beside else cost.cpu_times(by_name[n]) if n in cpu else cost.compute_time(by_name[n])
    copy = (lambda n: cost.copy_times(by_name[n])) if cpu else (lambda n: cost.copy_time(by_name[n]))  # noqa: E731
    return simulate(build_plans(names, streamed, ring_depth, beside), build_prologue(names, streamed, ring_depth),
                    copy_time=copy, compute_time=compute, step_overhead=5e-6,
                    lane_time=lambda n: cost.cpu_times(by_name[n]))


def _candidates(groups, must, room: int, ring_depth: int, strategy: str):
    """Resident sets to compare: embedding/head resident or not, then as many layer groups as fit,
    taken first, last or spread evenly over the depth."""
    layers = [g for g in groups if g.kind in ("layer", "attn", "mlp")]
    ends = [g for g in groups if g.kind in ("embed", "head") and g not in must]
    for mask in range(1 << len(ends)):
        chosen = list(must) + [g for j, g in enumerate(ends) if mask >> j & 1]
        streamed_ends = [g for g in ends if g not in chosen]
        slot = max([g.nbytes for g in layers + streamed_ends], default=0)
        left = room - ring_depth * slot - sum(g.nbytes for g in chosen)
        if left < 0:
            continue
        by_size = sorted(layers, key=lambda g: -g.nbytes)
        fit, used = [], 0
        for g in by_size:
            if used + g.nbytes <= left:
                fit.append(g)
                used += g.nbytes
        r = len(fit)
        if r == len(layers) and not streamed_ends:
            r -= 1  # something must stream here; keep a slot's worth of layers out
        orders = {"first": layers, "last": layers[::-1],
                  "spread": [layers[int(i * len(layers) / max(r, 1))] for i in range(r)] if r else []}
        for kind, order in orders.items():
            if strategy not in ("auto", kind):
                continue
            picked, used = [], 0
            for g in order:
                if len(picked) < r and used + g.nbytes <= left:
                    picked.append(g)
                    used += g.nbytes
            yield frozenset(x.name for x in chosen + picked), kind


def _evaluate(groups, resident, ring_depth, budget, fixed, cost: CostModel, kind: str) -> Placement:
    """The best home for the non-resident groups: all streamed, or (with a CPU lane in the cost model) c of the
    non-resident MLP groups computed on the CPU, spread over the depth so the copy engine streams the others
    while the CPU works; c from 1 to all of them, each predicted by the simulator."""
    choices = [frozenset()]
    if cost.cpu_rate > 0:
        mlps = [g.name for g in groups if g.kind == "mlp" and g.name not in resident]
        choices += [frozenset(spread(mlps, c)) for c in range(1, len(mlps) + 1)]
    best = None
    for cpu in choices:
        p = _evaluate_homes(groups, resident, cpu, ring_depth, budget, fixed, cost, kind)
        if best is None or p.prediction.step_time < best.prediction.step_time:
            best = p
    return best


def _evaluate_homes(groups, resident, cpu, ring_depth, budget, fixed, cost: CostModel, kind: str) -> Placement:
    names = [g.name for g in groups]
    streamed = {n for n in names if n not in resident and n not in cpu}
    by_name = {g.name: g for g in groups}
    slot = max((by_name[n].nbytes for n in streamed), default=0)
    sim = _simulate(groups, streamed, ring_depth, cost, frozenset(cpu))
    memory = {"resident_weights": sum(by_name[n].nbytes for n in resident), "ring": ring_depth * slot, **fixed}
    unit = "attn_mlp" if any(g.kind == "attn" for g in groups) else "layer"   # (every MLP may be split in parts)
    cpu_busy = sim.host_compute / sim.step_time if cpu and sim.step_time else None
    return Placement(tuple(groups), resident, ring_depth, slot, budget, memory, sim, kind + ("+cpu" if cpu else ""),
                     unit, frozenset(cpu), cpu_busy, cost=cost)
