"""Block sizes of the decode GEMVs (M = 1) on this GPU: int8 / fp8 (gemv.py) and blocked int4 (int4_gemv.py).

    python3 tools/gemv_sweep.py [--out DIR] [--budget-s 240]

For each Llama-3.1-8B matrix shape, times every (BLOCK_N, BLOCK_K, num_warps, num_stages, split) candidate as
50 calls replayed from one CUDA graph, beside bf16 F.linear (cuBLAS) and ATen's tinygemm int4, and prints the
best with its bandwidth (weight bytes / time) against the HBM copy rate measured here. Writes gemv_sweep.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from graphrt.weights.formats.gemv import weight_only_gemv
from graphrt.weights.formats.int4 import Int4
from graphrt.weights.formats.int4_gemv import int4_gemv

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096), (28672, 8192)]
CALLS = 50


def graph_time(fn, calls: int = CALLS) -> float:
    """Seconds per call: `calls` calls captured in one graph, median of 5 replays. `fn` may be a list of
    callables, called in turn (to cycle through copies of a weight that together overflow L2)."""
    fns = fn if isinstance(fn, list) else [fn]
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times)[2]


def hbm_rate() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_time(lambda: b.copy_(a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-sweep"))
    ap.add_argument("--budget-s", type=float, default=240)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    hbm = hbm_rate()
    print(f"HBM copy rate {hbm / 1e9:.0f} GB/s")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    results = []
    byte_cands = list(itertools.product((16, 32), (256, 512, 1024), (4, 8), (3, 4)))
    int4_cands = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (2, 3)))
    for n, k in SHAPES:
        t_end = time.time() + a.budget_s / len(SHAPES)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        row = dict(n=n, k=k, bf16_us=1e6 * graph_time(lambda: F.linear(x, w)))
        w8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        wf8 = w.to(torch.float8_e4m3fn)
        scale = torch.rand(n, device="cuda") * 0.01
        fmt_t = Int4(torch.bfloat16, 128, "cuda")
        parts_t = {kk: v.cuda() for kk, v in fmt_t.encode(w.cpu().float(), torch.device("cuda")).items()}
        row["tinygemm_us"] = 1e6 * graph_time(lambda: fmt_t.linear(x, parts_t, None))
        fmt_b = Int4(torch.bfloat16, 128, "blocked")
        parts_b = {kk: v.cuda() for kk, v in fmt_b.encode(w.cpu().float(), torch.device("cuda")).items()}
        row["int8_default_us"] = 1e6 * graph_time(lambda: weight_only_gemv(x, w8, scale))
        row["fp8_default_us"] = 1e6 * graph_time(lambda: weight_only_gemv(x, wf8, scale))
        row["int4_default_us"] = 1e6 * graph_time(lambda: int4_gemv(x, parts_b["w"], parts_b["scales_and_zeros"]))
        for name, cands, call in (
                ("int8", byte_cands, lambda c, s: weight_only_gemv(x, w8, scale, blocks=c[:3], stages=c[3], split_k=s)),
                ("int4", int4_cands, lambda c, s: int4_gemv(x, parts_b["w"], parts_b["scales_and_zeros"],
                                                            blocks=c[:3], stages=c[3], split_k=s))):
            best = None
            for c in cands:
                for s in (None, 1, 2, 4):
                    if time.time() > t_end:
                        break
                    try:
                        t = graph_time(lambda: call(c, s))
                    except Exception as e:  # a candidate that does not compile (registers, shared memory)
                        print(f"  {name} {c} split {s}: {type(e).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, c, s)
            if best:
                row[f"{name}_best_us"], row[f"{name}_best"] = 1e6 * best[0], [*best[1], best[2]]
        if "int8_best" in row:
            c = row["int8_best"]
            row["fp8_at_int8_best_us"] = 1e6 * graph_time(
                lambda: weight_only_gemv(x, wf8, scale, blocks=tuple(c[:3]), stages=c[3], split_k=c[4]))
        nbytes = {"bf16": 2 * n * k, "int8": n * k, "int4": n * k // 2 + n * k // 128 * 4}
        row["pct_hbm"] = {key: round(100 * nbytes[key.split("_")[0]] / (row[key] * 1e-6) / hbm, 1)
                          for key in row if key.endswith("_us") and key.split("_")[0] in nbytes}
        results.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "gemv_sweep.json").write_text(json.dumps(dict(hbm_GBps=hbm / 1e9, rows=results), indent=1))


if __name__ == "__main__":
    main()
