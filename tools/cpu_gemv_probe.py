"""CPU GEMV paths for the CPU lane, side by side on this host (issue 17): which torch kernel reads bf16 weights fastest.

    python3 tools/cpu_gemv_probe.py [--out DIR] [--seconds S]

The 8B shape's MLP matrices (gate_up 28672 x 4096, down 4096 x 14336), bf16 weights, M = 1, 4, 8, 16 rows, at a
few thread counts, each path alone and with pinned H2D copies running beside it (the lane's real situation):
  linear   F.linear (what the lane runs today)
  onednn   torch.ops.mkldnn._linear_pointwise on a weight reordered once by _reorder_linear_weight (oneDNN's
           packed layout, made at load)
  int8     torch._weight_int8pack_mm (per-channel int8 weights; bytes counted as int8)
Each row: G weights/s and GB/s of weight bytes (median over `seconds`). Writes cpu_gemv_probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}


def timed(fn, seconds: float) -> float:
    fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paths(w: torch.Tensor, m: int) -> dict:
    x = torch.randn(m, w.shape[1]).bfloat16()
    out = {"linear": (lambda: F.linear(x, w), w.numel() * 2)}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        out["onednn"] = (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), w.numel() * 2)
    except (RuntimeError, AttributeError) as e:
        print("onednn unavailable:", e)
    q = torch.randint(-127, 128, w.shape, dtype=torch.int8)
    scale = torch.rand(w.shape[0], dtype=torch.bfloat16)
    out["int8"] = (lambda: torch._weight_int8pack_mm(x, q, scale), w.numel())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-cpu-probe"))
    ap.add_argument("--seconds", type=float, default=0.4)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 2
    threads = sorted({max(1, cpus - 1), max(1, cpus // 2), max(1, cpus * 3 // 4)}, reverse=True)
    cuda = torch.cuda.is_available()
    if cuda:
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(src, device="cuda")
        side = torch.cuda.Stream()
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for name, shape in SHAPES.items():
            w = (torch.randn(shape) * 0.02).bfloat16()
            for n in threads:
                torch.set_num_threads(n)
                for m in (1, 4, 8, 16):
                    for path, (fn, nbytes) in paths(w, m).items():
                        for h2d in ((False, True) if cuda else (False,)):
                            if h2d:
                                with torch.cuda.stream(side):
                                    for _ in range(128):   # ~34 GB queued: the copy engine reads host memory throughout
                                        dst.copy_(src, non_blocking=True)
                            t = timed(fn, a.seconds)
                            if h2d:
                                side.synchronize()
                            row = dict(shape=name, threads=n, rows=m, path=path, with_h2d=h2d, us=1e6 * t,
                                       G_weights_per_s=w.numel() / t / 1e9, GB_per_s=nbytes / t / 1e9)
                            rows.append(row)
                            print(json.dumps(row), flush=True)
    (a.out / "cpu_gemv_probe.json").write_text(json.dumps(dict(cpus=cpus, torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
