"""How fast this machine's CPU computes a model's MLP group: the CPU lane's rate for the planner (bytes/s).

`cpu_rate(cfg, policy, batch)` builds MLP groups of the model in the CPU's formats (random contents: codes
and scales of the right dtypes; speed does not depend on the values; enough groups that the CPU's cache cannot
hold them, `mlp_groups`, in the huge-page host memory the lane's weights live in), runs the lane's math on them in turn
(`llama.mlp_forward` at `batch` rows, as the C program the lane runs: `lane_runs`) for about `seconds`, and returns the group's bytes / the median time. With
`concurrent_h2d` (a CUDA device), pinned host-to-device copies run on a side stream meanwhile: the two host
paths share DRAM bandwidth, and the lane runs beside the ring. Results are cached in
$XDG_CACHE_HOME/graphrt/cpu_rates.json (or ~/.cache/...), keyed by CPU, threads, torch version, the group's
formats and shape, the batch and the concurrency, so a load measures once. `best_threads` measures a few team
sizes (`thread_candidates`) and keeps the fastest: the lane's default thread count on a GPU machine.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..models import llama
from ..weights.formats import cpu_program, for_cpu
from ..weights.layout import FormatPolicy, GroupLayout, model_groups
from ..weights.store import host_empty


CPU_KERNELS = ("bf16-gemv-avx512bf16-tiles-amx-chunks,int4-blocked-avx512bf16-fused,int8-gemv-pool,cycled-4xLLC,"
               "c-programs")   # the lane's kernels, in the cache key: a change measures again


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphrt" / "cpu_rates.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_buffer(g: GroupLayout) -> torch.Tensor:
    """A group buffer whose float parts hold small normal values and whose integer parts random bytes."""
    buf = host_empty(g.nbytes)   # the memory the lane's weights live in
    gen = torch.Generator().manual_seed(0)
    for t in g.tensors:
        for part, offset in t.parts:
            view = buf[offset:offset + part.nbytes]
            if part.dtype.is_floating_point and part.dtype.itemsize > 1:
                view.view(part.dtype).copy_(torch.randn(part.nbytes // part.dtype.itemsize, generator=gen) * 0.02)
            else:  # int8 / uint8 / int32 codes, float8 (random bytes: finite or not, the speed is the same)
                view.copy_(torch.randint(0, 256, (part.nbytes,), dtype=torch.uint8, generator=gen))
    return buf


MAX_CYCLE = 16


def last_level_cache() -> int:
    """Bytes of this CPU's largest cache (sysfs; 64 MiB where it does not say)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            pass
    return max(sizes, default=64 << 20)


def cycle_bytes() -> int:
    """What the groups a measurement takes in turn hold together: 4x the last-level cache (at least 1 GiB, at most
    2 GiB). A decode step reads each of its CPU groups once; the H100 host's 300 MiB cache kept part of one 352 MB
    group cycled on its own, and the calibration priced the lane 1.8x faster than it ran in the step."""
    return min(2 << 30, max(1 << 30, 4 * last_level_cache()))


def mlp_layout(cfg: ModelConfig, policy: FormatPolicy) -> GroupLayout:
    return next(x for x in model_groups(cfg, policy, "attn_mlp") if x.kind == "mlp")


def working_groups(cfg: ModelConfig, policy: FormatPolicy, cpu_bytes: int) -> int:
    """How many whole MLP groups hold a plan's `cpu_bytes` of CPU-lane weights (rounded up): the working set that
    `cpu_rate(groups=...)` measures for it, whatever the sizes of the plan's own groups."""
    return max(1, -(-cpu_bytes // mlp_layout(cfg, policy).nbytes))


def cycle_count(g: GroupLayout) -> int:
    """How many copies of group `g` a measurement cycles through by default (`cycle_bytes`, 2 to MAX_CYCLE)."""
    return min(MAX_CYCLE, max(2, -(-cycle_bytes() // max(g.nbytes, 1))))


def mlp_groups(cfg: ModelConfig, policy: FormatPolicy, rows: int = 1,
               count: int | None = None) -> tuple[int, list[dict]]:
    """(bytes of one group, groups): `count` distinct MLP groups, by default enough (`cycle_bytes`, up to MAX_CYCLE)
    that the CPU's last-level cache cannot hold them (copies of one random group: the speed does not depend on the
    values)."""
    g = mlp_layout(cfg, policy)
    first = random_buffer(g)
    count = count or cycle_count(g)
    buffers = [first] + [host_empty(g.nbytes).copy_(first) for _ in range(count - 1)]
    return g.nbytes, [for_cpu(g.views(b), rows) for b in buffers]


def lane_runs(x: torch.Tensor, groups: list[dict], cfg: ModelConfig | None = None) -> list[Callable[[], None]]:
    """For each group, a call that computes it on x as the CPU lane does: the whole MLP (cfg given: norm, residual)
    or its rows (llama.mlp_rows), as a C program of kernel calls where it records as one (cpu_program.runner; the
    lane's serving loop runs the same programs)."""
    def part(w: dict):
        return (lambda v: llama.mlp_forward(v, w, cfg)) if cfg is not None else (lambda v: llama.mlp_rows(v, w))
    return [cpu_program.runner(part(w), x)[0] for w in groups]


def measure(cfg: ModelConfig, policy: FormatPolicy, batch: int, seconds: float = 0.3,
            concurrent_h2d: bool = False, group: tuple[int, list[dict]] | None = None) -> float:
    """Bytes/s of MLP groups computed by the CPU lane's math, one after another (no cache); `group` from
    mlp_groups, or built."""
    nbytes, groups = group or mlp_groups(cfg, policy, batch)
    x = torch.randn(batch, 1, cfg.hidden_size).to(policy.compute_dtype)
    copies = None
    if concurrent_h2d and torch.cuda.is_available():
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        copies = torch.cuda.Stream()
    times = []
    with torch.inference_mode():
        runs = lane_runs(x, groups, cfg)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            if copies is not None:  # keep the copy engine reading host memory while the CPU computes
                with torch.cuda.stream(copies):
                    for _ in range(4):
                        dst.copy_(src, non_blocking=True)
            run = runs[len(times) % len(runs)]
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    if copies is not None:
        copies.synchronize()
    return nbytes / statistics.median(times)


def formats_key(g: GroupLayout) -> str:
    """The group's weight formats, for a cache key."""
    return ",".join(sorted({f"{type(t.format).__name__}:{getattr(t.format, 'name', '')}:"
                            f"{getattr(t.format, 'packing', '')}" for t in g.tensors}))


def _key(cfg: ModelConfig, policy: FormatPolicy, batch: int, concurrent_h2d: bool, groups: int | None = None) -> str:
    """What a cached rate depends on: CPU, this thread's team size, torch, the group's formats and shape."""
    formats = formats_key(mlp_layout(cfg, policy))
    return "|".join(map(str, (_cpu_name(), torch.get_num_threads(), torch.__version__, formats, CPU_KERNELS,
                              policy.compute_dtype, cfg.hidden_size, cfg.intermediate_size, batch, concurrent_h2d)))\
        + (f"|groups={groups}" if groups else "")


def read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text()) if cache_file().is_file() else {}
    except (OSError, ValueError):
        return {}


def _cached(cfg: ModelConfig, policy: FormatPolicy, batch: int, concurrent_h2d: bool) -> bool:
    return _key(cfg, policy, batch, concurrent_h2d) in read_cache()


def cpu_rate(cfg: ModelConfig, policy: FormatPolicy, batch: int, concurrent_h2d: bool = False,
             use_cache: bool = True, group: tuple[int, list[dict]] | None = None, groups: int | None = None) -> float:
    """The cached rate for this machine and group, measuring it the first time. groups: cycle through this many
    MLP groups (a plan's CPU-lane groups: a step reads each once, and a large last-level cache keeps part of a
    working set little larger than itself), instead of enough to defeat the cache; at least 2, and no more than
    the default cycle (a larger working set is measured by it: memory stays bounded for any plan)."""
    if groups is not None:
        groups = max(2, groups)
        if groups >= cycle_count(mlp_layout(cfg, policy)):
            groups = None
    key = _key(cfg, policy, batch, concurrent_h2d, groups)
    cache = read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    rate = measure(cfg, policy, batch, concurrent_h2d=concurrent_h2d,
                   group=group or (mlp_groups(cfg, policy, batch, groups) if groups else None))
    if use_cache:
        store(key, rate)
    return rate


def clear_cache() -> None:
    """Forget every cached rate (the next load measures again: benchmarks on a shared host, whose memory bandwidth
    drifts between minutes, calibrate each configuration at its own load)."""
    cache_file().unlink(missing_ok=True)


def store(key: str, rate: float) -> None:
    """Add one rate to the cache file (written whole, then renamed: never a half-written cache)."""
    cache, path = read_cache(), cache_file()
    cache[key] = rate
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(path)


def h2d_window(device: torch.device, beside: Callable[[], None] | None = None, copies: int = 24) -> float:
    """Bytes/s of `copies` pinned host-to-device copies of 256 MB (about 0.1 s) on a side stream, the engine busy
    before the timed window opens; `beside` is called over and over on the host until the window closes."""
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            start.record(stream)
            for _ in range(copies):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
        while beside is not None and not end.query():
            beside()
        end.synchronize()
    return copies * src.numel() / (start.elapsed_time(end) / 1e3)


def h2d_beside_cpu(cfg: ModelConfig, policy: FormatPolicy, batch: int, use_cache: bool = True) -> float:
    """Bytes/s of pinned host-to-device copies while the CPU lane computes this model's MLP groups on this
    thread's team (CUDA): the two host paths share DRAM, so the copy engine slows while the CPU reads. Cached like
    `cpu_rate`. The simulator runs streamed groups at this rate while a lane group computes beside them."""
    key = _key(cfg, policy, batch, True) + "|h2d"
    cache = read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    nbytes, groups = mlp_groups(cfg, policy, batch)
    x = torch.randn(batch, 1, cfg.hidden_size).to(policy.compute_dtype)
    turn = 0
    with torch.inference_mode():
        runs = lane_runs(x, groups, cfg)

        def compute() -> None:                         # the CPU computes for the whole window
            nonlocal turn
            runs[turn % len(runs)]()
            turn += 1
        rate = h2d_window(torch.device("cuda"), compute)
    if use_cache:
        store(key, rate)
    return rate


def thread_candidates(cpus: int) -> list[int]:
    """Team sizes the lane tries on a GPU machine (one thread drives the GPU): all CPUs but one, three quarters
    and half of them (the half: one thread per core where each core runs two hardware threads)."""
    return sorted({max(1, cpus - 1), max(1, cpus * 3 // 4), max(1, cpus // 2)}, reverse=True)


def best_threads(cfg: ModelConfig, policy: FormatPolicy, batch: int, candidates: list[int],
                 concurrent_h2d: bool = False) -> tuple[int, float]:
    """(threads, bytes/s) of the fastest team size among `candidates`, each rate measured once and cached; the
    caller's thread count is left as it was."""
    before = torch.get_num_threads()
    best: tuple[int, float] | None = None
    group = None
    try:
        for n in candidates:
            torch.set_num_threads(n)
            if group is None and not _cached(cfg, policy, batch, concurrent_h2d):
                group = mlp_groups(cfg, policy, batch)    # built once for every team size measured
            rate = cpu_rate(cfg, policy, batch, concurrent_h2d=concurrent_h2d, group=group)
            if best is None or rate > best[1]:
                best = (n, rate)
    finally:
        torch.set_num_threads(before)
    return best


@dataclass(frozen=True)
class LaneRates:
    threads: int        # the lane's torch threads
    cpu: float          # bytes/s of MLP groups the lane computes (copies beside it on CUDA)
    h2d_beside: float   # bytes/s of the copy engine while the lane computes (CUDA; else 0)
    cpu_alone: float = 0.0   # bytes/s of the lane with the copy engine idle (CUDA; else 0: the same as cpu)


def lane_rates(cfg: ModelConfig, policy: FormatPolicy, batch: int, cuda: bool, threads: int | None = None,
               rate: float | None = None) -> LaneRates:
    """The CPU lane's thread count and rates for the planner. threads: given (--cpu-threads), else on a GPU machine
    the fastest measured team size (one thread drives the GPU), else torch's. rate: given (--cpu-rate: nothing is
    measured, and the rate holds beside copies and alone), else measured (cached) with that team, copies beside it
    on CUDA; then, on CUDA, the lane's rate with the copy engine idle and the copy engine's rate beside the lane
    (the two share DRAM: the simulator runs each at its shared rate only while both work). The caller's thread
    count is left as it was."""
    if not (threads or rate or not cuda):
        threads, cpu = best_threads(cfg, policy, batch, thread_candidates(os.cpu_count() or 2), concurrent_h2d=True)
    else:
        threads = threads or (min(torch.get_num_threads(), max(1, (os.cpu_count() or 2) - 1)) if cuda
                              else torch.get_num_threads())
        cpu = rate
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = cpu or cpu_rate(cfg, policy, batch, concurrent_h2d=cuda)
        measured = cuda and not rate
        alone = cpu_rate(cfg, policy, batch, concurrent_h2d=False) if measured else 0.0
        beside = h2d_beside_cpu(cfg, policy, batch) if measured else 0.0
    finally:
        torch.set_num_threads(before)
    return LaneRates(threads, cpu, beside, max(alone, cpu) if alone else 0.0)
