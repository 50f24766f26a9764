"""How fast the GPU computes a model's MLP group at a batch: the planner's GPU rate (bytes of weights/s).

The cost model's default prices a group's GPU compute at the HBM bandwidth (3.0 TB/s). That holds for bf16
products and overstates quantized ones: on the H100, with every weight of the 16-layer 8B shape resident, decode
read bf16 weights at 2.6 TB/s, int8 at 2.0 and int4 at 1.4, launch gaps included (327.9 / 489.2 / 650.2
tokens/s over 8.03 / 4.02 / 2.13 GB, docs/results/2026-11-26-h100-versus-7bbfdfc.md). In a CPU-lane step the
GPU's compute is on the critical path (the compute stream waits for each lane group and every later group
depends on it), so the lane's plans take the measured rate.

`gpu_rate(cfg, policy, batch, device)` builds one MLP group in the GPU's formats (random contents: the speed does
not depend on the values), captures `calls` of `llama.mlp_forward` on `batch` rows in a CUDA graph (as a step
runs them: no launch gaps beyond a graph's), and returns bytes / the median time of a group over `repeats`
replays. Cached in the CPU's rate file (calibrate.cache_file), keyed by GPU, torch, the group's formats and
shape, and the batch.
"""
from __future__ import annotations

import statistics
import sys

import torch

from ..config import ModelConfig
from ..models import llama
from ..weights.layout import FormatPolicy
from .calibrate import formats_key, h2d_window, mlp_layout, random_buffer, read_cache, store

GPU_KERNELS = "int4-row-prologues-where-they-pay"   # the GPU products' kernels, in the cache key: a change
                                                    # measures again


def gpu_rate(cfg: ModelConfig, policy: FormatPolicy, batch: int, device: torch.device, use_cache: bool = True,
             repeats: int = 7, calls: int = 10) -> float:
    """Bytes/s of one MLP group computed by the GPU at `batch` rows (weights resident), measured once and cached."""
    g = mlp_layout(cfg, policy)
    key = "|".join(map(str, ("gpu", torch.cuda.get_device_name(device), torch.__version__, GPU_KERNELS,
                             formats_key(g),
                             policy.compute_dtype, cfg.hidden_size, cfg.intermediate_size, batch)))
    cache = read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    weights = g.views(random_buffer(g).to(device))
    x = torch.randn(batch, 1, cfg.hidden_size, device=device).to(policy.compute_dtype)   # [B, 1, hidden]
    times = []
    with torch.inference_mode(), torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):                  # first calls (kernels built, autotuned) outside the capture
            for _ in range(3):
                llama.mlp_forward(x, weights, cfg)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):                  # `calls` groups back to back, as a captured step runs them
            for _ in range(calls):
                llama.mlp_forward(x, weights, cfg)
        graph.replay()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls)
        del graph, weights
    torch.cuda.empty_cache()   # the group and the graph's pool go back before the plan's buffers are made
    rate = g.nbytes / statistics.median(times)
    if use_cache:
        store(key, rate)
    return rate


def h2d_alone(device: torch.device, use_cache: bool = True) -> float:
    """Bytes/s of pinned host-to-device copies with nothing else reading host memory (the copy engine's rate where
    the CPU lane is idle; the planner's 55 GB/s default is an estimate), measured once and cached."""
    key = "|".join(map(str, ("h2d-alone", torch.cuda.get_device_name(device), torch.__version__)))
    cache = read_cache() if use_cache else {}
    if key in cache:
        return float(cache[key])
    rate = h2d_window(device)
    if use_cache:
        store(key, rate)
    return rate


def lane_gpu_rates(cfg: ModelConfig, policy: FormatPolicy, batch: int, device: torch.device) -> tuple[float, float]:
    """(GPU rate, copies alone) for a CUDA plan with a CPU lane; 0.0 for one whose measurement failed (the planner
    then keeps its default, and says so on stderr: a calibration is an estimate, the load goes on)."""
    rates = []
    for name, measure in (("GPU rate", lambda: gpu_rate(cfg, policy, batch, device)),
                          ("host-to-device rate", lambda: h2d_alone(device))):
        try:
            rates.append(measure())
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            print(f"[graphrt] the CPU lane's {name} calibration failed ({type(e).__name__}: {str(e)[:200]}); "
                  "planning with the default", file=sys.stderr)
            rates.append(0.0)
    return rates[0], rates[1]
