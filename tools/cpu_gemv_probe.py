"""CPU GEMV paths for the CPU lane, side by side on this host (issue 17): which torch kernel reads bf16 weights fastest.

    python3 tools/cpu_gemv_probe.py [--out DIR] [--seconds S]

The 8B shape's MLP matrices (gate_up 28672 x 4096, down 4096 x 14336), bf16 weights, M = 1, 4, 8, 16 rows, at a
few thread counts, each path alone and with pinned H2D copies running beside it (the lane's real situation):
  linear   F.linear (what the lane runs today)
  onednn   torch.ops.mkldnn._linear_pointwise on a weight reordered once by _reorder_linear_weight (oneDNN's
           packed layout, made at load)
  int8     torch._weight_int8pack_mm (per-channel int8 weights; bytes counted as int8)
  int4-aten     torch.ops.aten._weight_int4pack_mm_for_cpu (groups of 128; bytes: codes + scales and zeros)
  int4-graphrt  graphrt's AVX512-BF16 kernel on the "blocked" layout (weights/formats/int4_cpu.py; same bytes)
--paths and --rows choose a subset.
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

from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.int4_gemv import pack_blocked

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
    n, k = w.shape
    codes = torch.randint(0, 16, w.shape, dtype=torch.int32)
    sz = (torch.randn(k // 128, n, 2) * 0.01).bfloat16()
    int4_bytes = w.numel() // 2 + sz.numel() * 2
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    out["int4-aten"] = (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, 128, sz), int4_bytes)
    if int4_cpu.available():
        blocked = pack_blocked(codes)
        out["int4-graphrt"] = (lambda: int4_cpu.int4_gemv(x, blocked, sz), int4_bytes)
    else:
        print("graphrt's int4 CPU kernel unavailable:", int4_cpu.why_unavailable())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-cpu-probe"))
    ap.add_argument("--seconds", type=float, default=0.4)
    ap.add_argument("--paths", default="linear,onednn,int8,int4-aten,int4-graphrt")
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--threads", default="", help="team sizes, e.g. 15,12 (default: all but one CPU, 3/4, 1/2)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 2
    threads = ([int(t) for t in a.threads.split(",")] if a.threads else
               sorted({max(1, cpus - 1), max(1, cpus // 2), max(1, cpus * 3 // 4)}, reverse=True))
    wanted, row_counts = set(a.paths.split(",")), [int(m) for m in a.rows.split(",")]
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
                for m in row_counts:
                    for path, (fn, nbytes) in paths(w, m).items():
                        if path not in wanted:
                            continue
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
