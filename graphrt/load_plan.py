"""A runtime's placement: the GPU budget, the rates the planner prices (the CPU lane's calibrated, scaled by what
the lane ran at inside an earlier step on this machine: plan/in_step.py) and the plan; with the means to plan
again at other rates (runtime.py does after measuring the lane in its first replays)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .config import ModelConfig, RuntimeOptions
from .exec.cpu_lane import LANE_SPIN_US, node_kind
from .plan.calibrate import cpu_rate, lane_rates, mlp_layout, working_groups
from .plan.cost import NODE_COST, CostModel
from .plan.gpu_calibrate import lane_gpu_rates
from .plan.group_cost import group_cost, marginal
from .plan.in_step import in_step_factor
from .plan.placement import Placement, plan_placement
from .weights.formats import int4_cpu
from .weights.layout import FormatPolicy, model_groups
from .weights.pieces import cut_group
from .weights.sources import weight_policy

DEVICE_MARGIN = 2**30  # left free by the default budget (CUDA context, cuBLAS workspaces)


@dataclass(frozen=True)
class RuntimePlan:
    placement: Placement
    replan: Callable[[CostModel], Placement]   # the same budget and options at other rates
    asked_chunk: int | None                    # the prefill chunk the options asked for (None: the plan's)
    lane: tuple | None                         # (config, the CPU's format policy, batch, in-step factor applied)


def plan_runtime(cfg: ModelConfig, o: RuntimeOptions, policy: FormatPolicy, source, dtype: torch.dtype,
                 device: torch.device) -> RuntimePlan:
    """cfg: what this process computes (a shard's under tensor parallel); policy: the device's formats."""
    device_memory, budget = None, o.gpu_budget
    cuda = device.type == "cuda"
    if cuda:
        free, device_memory = torch.cuda.mem_get_info(device)
        budget = budget if budget is not None else max(free - DEVICE_MARGIN, 0)
    elif budget is None:
        budget = 1 << 62  # CPU: everything resident unless a budget asks for streaming
    cost = CostModel(o.h2d_bandwidth, o.hbm_bandwidth)
    if o.cpu_lane:   # what reaching the CPU costs a group in a captured step (checked here, before weights load)
        kind = node_kind(device, o.lane_nodes)
        cost = replace(cost, cpu_overhead=NODE_COST[kind], lane_beside=kind == "signal" or device.type == "cpu")
    cpu_policy, factor = None, 1.0
    if o.cpu_lane:   # the CPU lane's groups are stored in the CPU's formats (e.g. int4 in its kernel's packing)
        cpu_policy = weight_policy(source, o.quantization, dtype, torch.device("cpu"))
        if cuda:   # calibrate graphrt's CPU kernels as the lane runs them: workers awake between products
            int4_cpu.set_spin(LANE_SPIN_US)
        rates = lane_rates(cfg, cpu_policy, o.max_batch_size, cuda, o.cpu_threads, o.cpu_rate)
        torch.set_num_threads(rates.threads)
        if cuda:   # the GPU's compute is on the lane's path; copies run alone where the lane is idle
            gpu, h2d = lane_gpu_rates(cfg, policy, o.max_batch_size, device)
            cost = replace(cost, gpu_rate=gpu, h2d_bandwidth=min(cost.h2d_bandwidth, h2d or cost.h2d_bandwidth))
        factor = in_step_factor(cfg, cpu_policy, o.max_batch_size) if cuda and not o.cpu_rate else 1.0
        # a group's cost beyond its bytes (measured where the rates are), and the marginal rates that go with it
        per_group = group_cost(cfg, cpu_policy, o.max_batch_size) if cuda and not o.cpu_rate else 0.0
        whole = mlp_layout(cfg, cpu_policy).nbytes
        cost = replace(cost, cpu_rate=marginal(rates.cpu * factor, whole, per_group),
                       cpu_rate_alone=marginal(rates.cpu_alone * factor, whole, per_group),
                       cpu_group_cost=per_group, h2d_beside_cpu=min(rates.h2d_beside, cost.h2d_bandwidth))

    def plan(cost: CostModel) -> Placement:
        p = plan_placement(cfg, budget, o.ring_depth, o.max_batch_size, o.max_seq_len, policy,
                           stream_unit=o.stream_unit, strategy=o.placement, prefill_chunk=o.prefill_chunk,
                           cost=cost, device_memory=device_memory, fused_attention=cuda)
        if not p.cpu:
            return p
        on_cpu = {g.name: g for g in model_groups(cfg, cpu_policy, p.stream_unit, split=dict(p.split))
                  if g.name in p.cpu}
        # prompts stream the CPU-lane groups whose bytes the GPU computes as they are, whole or in pieces
        portable = frozenset(g.name for g in p.groups if g.name in on_cpu and on_cpu[g.name] == g and p.streamed
                             and (g.nbytes <= p.slot_bytes or cut_group(g, p.slot_bytes) is not None))
        return replace(p, groups=tuple(on_cpu.get(g.name, g) for g in p.groups), prompt_streamed=portable)
    p = plan(cost)
    if p.cpu and cuda and not o.cpu_rate:   # the lane's rate at the plan's own working set (a large last-level
        working = marginal(factor * cpu_rate(cfg, cpu_policy, o.max_batch_size, True,   # cache serves part); the
                                             groups=working_groups(cfg, cpu_policy, p.cpu_bytes)),  # rate alone
                           whole, cost.cpu_group_cost)   # scales alike
        if abs(working / cost.cpu_rate - 1) > 0.05:
            p = plan(replace(cost, cpu_rate=working, cpu_rate_alone=cost.cpu_rate_alone * working / cost.cpu_rate))
    return RuntimePlan(p, plan, o.prefill_chunk, (cfg, cpu_policy, o.max_batch_size, factor) if o.cpu_lane else None)
