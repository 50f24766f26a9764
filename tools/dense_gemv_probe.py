"""One-row bf16 products of the 8B shape: cuBLAS (F.linear; addmm_ with the residual; cuBLASLt preferred) against
graphrt's Triton GEMV (graphrt/weights/formats/dense_gemv.py) at a few block plans. Each candidate runs 20 times
inside one CUDA graph (as in a decode step: launch gaps included), cycling through copies of the weight that
together exceed the L2 cache (a decode step reads each weight once, from HBM); prints us per call and GB/s against the measured
device-to-device bandwidth, and the error against F.linear. Writes dense_gemv_probe.json.

    python3 tools/dense_gemv_probe.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from graphrt.bench.run import cuda_median, measure_limits
from graphrt.weights.formats.dense_gemv import dense_gemv, plan

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
PLANS = [((16, 512), 4), ((8, 512), 4), ((8, 1024), 4), ((4, 1024), 4), ((16, 1024), 8), ((32, 256), 4)]
REPS = 20


def graph_time(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    g.replay()
    return min(cuda_median(g.replay, 10) for _ in range(3)) / REPS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-dense-gemv"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    hbm = measure_limits()["hbm_GBps"]
    print(f"{torch.cuda.get_device_name()}: device-to-device {hbm:.0f} GB/s")
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
                  for _ in range(max(1, -(-400 * 2**20 // (n * k * 2))))]
        w = copies[0]
        turn = [0]

        def nxt():
            turn[0] = (turn[0] + 1) % len(copies)
            return copies[turn[0]]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(1, 1, n, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).double()
        cands = {"cublas F.linear": (lambda: F.linear(x, nxt()), None),
                 "cublas addmm_ residual": (lambda: h.view(1, n).addmm_(x.view(1, k), nxt().t()), None)}
        for (bn, bk), warps in PLANS:
            if plan(n, k, 132, bn, bk) is not None:
                y = dense_gemv(x, w, None, (bn, bk), None, warps)
                cands[f"triton {bn}x{bk} w{warps} residual"] = (
                    lambda bn=bn, bk=bk, warps=warps: dense_gemv(x, nxt(), h, (bn, bk), None, warps),
                    ((y.double() - ref).norm() / ref.norm()).item())
        for label, (fn, err) in cands.items():
            t = graph_time(fn)
            r = dict(shape=name, n=n, k=k, candidate=label, us=t * 1e6, GBps=n * k * 2 / t / 1e9,
                     pct_of_d2d=100 * n * k * 2 / t / 1e9 / hbm, rel_err=err)
            rows.append(r)
            print(f"{name:8s} {label:34s} {r['us']:8.1f} us {r['GBps']:7.0f} GB/s {r['pct_of_d2d']:5.1f}%"
                  + (f"  err {err:.1e}" if err is not None else ""), flush=True)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        t = graph_time(lambda: F.linear(x, nxt()))
        torch.backends.cuda.preferred_blas_library("cublas")
        copies.clear()          # free this shape's weights before the next shape
        torch.cuda.empty_cache()
        rows.append(dict(shape=name, n=n, k=k, candidate="cublasLt F.linear", us=t * 1e6, GBps=n * k * 2 / t / 1e9,
                         pct_of_d2d=100 * n * k * 2 / t / 1e9 / hbm))
        print(f"{name:8s} {'cublasLt F.linear':34s} {t * 1e6:8.1f} us {n * k * 2 / t / 1e9:7.0f} GB/s "
              f"{100 * n * k * 2 / t / 1e9 / hbm:5.1f}%", flush=True)
    (a.out / "dense_gemv_probe.json").write_text(json.dumps(dict(hbm_GBps=hbm, rows=rows), indent=1))


if __name__ == "__main__":
    main()
