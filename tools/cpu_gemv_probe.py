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
--paths and --rows choose a subset. Each path cycles through distinct copies of its weights holding --cycle-mb (a
large last-level cache would otherwise serve a repeated matrix, which a decode step never reads twice).
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

from graphrt.plan.calibrate import cycle_bytes
from graphrt.weights.formats import bf16_cpu, int4_cpu
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


def cycled(make, nbytes: int, cycle_bytes: int):
    """fn() that calls the functions of enough distinct weight copies (make() -> fn, one copy each) to hold
    `cycle_bytes` in turn: the last-level cache cannot serve them, as in a decode step."""
    fns = [make() for _ in range(max(1, min(16, -(-cycle_bytes // nbytes))))]
    turn = [0]

    def fn():
        turn[0] += 1
        return fns[turn[0] % len(fns)]()
    return fn


def paths(w: torch.Tensor, m: int, cycle_bytes: int) -> dict:
    x = torch.randn(m, w.shape[1]).bfloat16()
    n, k = w.shape
    out = {"linear": (cycled(lambda: (lambda v=w.clone(): F.linear(x, v)), w.numel() * 2, cycle_bytes), w.numel() * 2)}
    try:
        def onednn():
            packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
            return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        out["onednn"] = (cycled(onednn, w.numel() * 2, cycle_bytes), w.numel() * 2)
    except (RuntimeError, AttributeError) as e:
        print("onednn unavailable:", e)

    def int8():
        q = torch.randint(-127, 128, w.shape, dtype=torch.int8)
        scale = torch.rand(w.shape[0], dtype=torch.bfloat16)
        return lambda: torch._weight_int8pack_mm(x, q, scale)
    out["int8"] = (cycled(int8, w.numel(), cycle_bytes), w.numel())
    codes = torch.randint(0, 16, w.shape, dtype=torch.int32)
    sz = (torch.randn(k // 128, n, 2) * 0.01).bfloat16()
    int4_bytes = w.numel() // 2 + sz.numel() * 2

    def aten4():
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, 128, sz)
    out["int4-aten"] = (cycled(aten4, int4_bytes, cycle_bytes), int4_bytes)
    if int4_cpu.available():
        def ours4():
            blocked, s2 = pack_blocked(codes), sz.clone()
            return lambda: int4_cpu.int4_gemv(x, blocked, s2)
        out["int4-graphrt"] = (cycled(ours4, int4_bytes, cycle_bytes), int4_bytes)
    else:
        print("graphrt's int4 CPU kernel unavailable:", int4_cpu.why_unavailable())
    if bf16_cpu.available():   # graphrt's bf16 GEMV: AVX512-BF16 tiles, and AMX tiles where they run
        out["bf16-graphrt"] = (cycled(lambda: (lambda v=w.clone(): bf16_cpu.bf16_gemv(x, v, amx=False)),
                                      w.numel() * 2, cycle_bytes), w.numel() * 2)
        if bf16_cpu.amx_available():
            out["bf16-amx"] = (cycled(lambda: (lambda v=w.clone(): bf16_cpu.bf16_gemv(x, v, amx=True)),
                                      w.numel() * 2, cycle_bytes), w.numel() * 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-cpu-probe"))
    ap.add_argument("--seconds", type=float, default=0.4)
    ap.add_argument("--paths", default="linear,onednn,int8,int4-aten,int4-graphrt")
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--cycle-mb", type=int, default=cycle_bytes() >> 20, help="distinct weight copies taken in turn "
                    "hold this much (default: the calibration's, 4x the last-level cache; 0: one copy, which a large "
                    "last-level cache may serve)")
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
                    for path, (fn, nbytes) in paths(w, m, a.cycle_mb << 20).items():
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
