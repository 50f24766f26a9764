"""The CPU lane's rate inside replays of the captured decode step (runtime.py plans again from it; plan/in_step.py).

A short prompt is prefilled, a few replays warm the step (the kernels' workers, the caches), then each host
function of `windows` runs of `steps` replays is timed where it runs (CpuLane.start_trace): the lane's busy
seconds per step, the median over the windows, which the simulator predicts as SimResult.host_compute less the
groups' node costs (CostModel.cpu_overhead). One window is not enough: on the H100 host, 24-replay windows 3 s
apart after a load ranged 66-91 GB/s for an int8 lane (8% standard deviation;
docs/results/2026-11-26-h100-lane-drift-1a0a5be.json). The KV cache rows these replays write are overwritten by
the next prefill (it resets the graph).
"""
from __future__ import annotations

import statistics

import torch

from .cpu_lane import CpuLane
from .graph import DecodeGraph

WARMUP_STEPS = 4


def lane_busy_per_step(graph: DecodeGraph, lane: CpuLane, groups: int, steps: int = 12,
                       windows: int = 5) -> float | None:
    """Seconds per step the lane's `groups` host functions took inside replays of `graph` (the median over `windows`
    runs of `steps` replays); None where the sequence length cannot hold the replays, or a trace does not hold one
    call per group and step."""
    if graph.engine.options.max_seq_len < 2 + WARMUP_STEPS + steps * windows or groups < 1:
        return None
    graph.prefill(torch.ones(graph.batch_size, 1, dtype=torch.int64))
    busy = []
    try:
        for _ in range(WARMUP_STEPS):
            graph.step()
        torch.cuda.synchronize(graph.engine.device)
        for _ in range(windows):
            lane.start_trace()
            for _ in range(steps):
                graph.step()
            torch.cuda.synchronize(graph.engine.device)
            spans = lane.stop_trace()
            if len(spans) != steps * groups:
                return None
            busy.append(sum(end - start for start, end in spans) / steps)
    finally:
        lane.stop_trace()
        graph.reset()
    median = statistics.median(busy)
    return median if median > 0 else None
