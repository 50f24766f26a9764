"""The CPU lane's cost per group beyond its bytes, measured on this machine.

A lane group's host function costs more than its bytes at the calibrated rate: each product dispatches the worker
pool and waits for its slowest thread, the memory streams ramp up (and, before the lane ran C programs, the host
function ran some Python). On the H100 host (tools/lane_parts_probe.py,
docs/results/2026-11-26-h100-lane-parts-probe-ab67812.json, Python host functions) the 8B MLP's CPU part with c
intermediate rows took 151 us + bytes / 120.6 GB/s in bf16 and 119 us + bytes / 70.4 GB/s in int4 (one input row,
15 threads): a plan of 16 small groups paid 2.4 ms a step that the calibrated rate, measured on whole MLPs, did not
show.

`group_cost(cfg, policy, batch)` times the lane's math (llama.mlp_rows as the lane's C program: calibrate.lane_runs)
on a small, a middle and a large CPU part (1/8, 1/2 and nearly all of the rows; cycled through copies that overflow
the last-level cache, as calibrate.measure does) and returns a of the least-squares line time = a + bytes / R
(three sizes: two gave a from 0 to 116 us on one H100 host); cached beside the rates. `marginal(rate, whole, a)`: the rate R at which a whole group of `whole` bytes
takes as long as at the calibrated `rate` with a paid once.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..config import ModelConfig
from ..models import llama
from ..weights.formats import for_cpu
from ..weights.layout import FormatPolicy, mlp_parts
from ..weights.store import host_empty
from .calibrate import MAX_CYCLE, _key, cycle_bytes, lane_runs, random_buffer, read_cache, store

SMALL = 8   # the small part holds 1/SMALL of the intermediate rows


def time_part(cfg: ModelConfig, policy: FormatPolicy, batch: int, cpu_rows: int, seconds: float,
              programs: bool = True) -> tuple[int, float]:
    """(bytes, median seconds) of the CPU part with `cpu_rows` rows, computed as the lane computes it (programs=False:
    through Python, as host nodes and functions that are not programs run; tools/lane_parts_probe.py compares)."""
    g = mlp_parts(cfg, 0, policy, cfg.intermediate_size - cpu_rows)[1]
    first = random_buffer(g)
    count = min(MAX_CYCLE, max(2, -(-cycle_bytes() // g.nbytes)))   # as calibrate.cycle_count
    groups = [for_cpu(g.views(b), batch) for b in [first] + [host_empty(g.nbytes).copy_(first)
                                                              for _ in range(count - 1)]]
    x = torch.randn(batch, 1, cfg.hidden_size).to(policy.compute_dtype)
    with torch.inference_mode():
        runs = lane_runs(x, groups) if programs else [lambda w=w: llama.mlp_rows(x, w) for w in groups]
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 2 * len(runs):
            run = runs[len(times) % len(runs)]
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return g.nbytes, statistics.median(times)


def group_cost(cfg: ModelConfig, policy: FormatPolicy, batch: int, use_cache: bool = True,
               seconds: float = 0.3) -> float:
    """Seconds a CPU-lane group costs beyond its bytes at the marginal rate (>= 0), measured once and cached."""
    key = "group-cost|" + _key(cfg, policy, batch, False)
    cache = read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    f, unit = cfg.intermediate_size, 256
    small = max(unit, f // SMALL // unit * unit)
    big = f - unit
    if big <= small:    # too small a model to tell two sizes apart
        return 0.0
    middle = max(small, (small + big) // 2 // unit * unit)
    points = [time_part(cfg, policy, batch, rows, seconds) for rows in sorted({small, middle, big})]
    cost = max(0.0, intercept(points))
    if use_cache:
        store(key, cost)
    return cost


def intercept(points: list[tuple[int, float]]) -> float:
    """a of the least-squares line time = a + bytes / R through (bytes, seconds) points (0 where it has no slope)."""
    n = len(points)
    mean_b, mean_t = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    spread = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in points) / spread if spread else 0.0
    return mean_t - slope * mean_b if slope > 0 else 0.0


def marginal(rate: float, whole: int, cost: float) -> float:
    """The rate at which `whole` bytes take as long as at `rate` once `cost` is paid (`rate` itself where the cost
    is not less than that time)."""
    if not rate or cost <= 0:
        return rate
    left = whole / rate - cost
    return whole / left if left > 0 else rate
