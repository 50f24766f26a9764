"""The CPU lane's rate inside replays of the captured decode step (runtime.py plans again from it; plan/in_step.py).

A short prompt is prefilled, a few replays warm the step (the kernels' workers, the caches), then each host
function of `steps` replays is timed on the driver's thread (CpuLane.trace): the lane's busy seconds per step, which
the simulator predicts as SimResult.host_compute less the groups' node costs (CostModel.cpu_overhead). The KV cache rows these replays write are overwritten by the next
prefill (it resets the graph).
"""
from __future__ import annotations

import torch

from .cpu_lane import CpuLane
from .graph import DecodeGraph

WARMUP_STEPS = 4


def lane_busy_per_step(graph: DecodeGraph, lane: CpuLane, groups: int, steps: int = 24) -> float | None:
    """Seconds per step the lane's `groups` host functions took inside `steps` replays of `graph`;
    None where the sequence length cannot hold the replays, or the trace does not hold one call per group and step."""
    if graph.engine.options.max_seq_len < 2 + WARMUP_STEPS + steps or groups < 1:
        return None
    graph.prefill(torch.ones(graph.batch_size, 1, dtype=torch.int64))
    for _ in range(WARMUP_STEPS):
        graph.step()
    torch.cuda.synchronize(graph.engine.device)
    lane.trace = []
    try:
        for _ in range(steps):
            graph.step()
        torch.cuda.synchronize(graph.engine.device)
        spans = list(lane.trace)
    finally:
        lane.trace = None
        graph.reset()
    busy = sum(end - start for start, end in spans)
    if len(spans) != steps * groups or busy <= 0:
        return None
    return busy / steps
