"""One-row int4 GEMV kernels on this GPU: ATen's tinygemm, the Triton GEMV and the NVRTC row kernel
(graphrt/weights/formats/int4_cuda.py) at each rows-per-block / threads-per-block choice.

    python3 tools/int4_row_sweep.py [--out DIR]

For each Llama-3.1-8B decode shape: 60 calls replayed from one CUDA graph, cycling through enough copies of the
weight (>= 256 MB) that no call reads from L2; the time per call and the weight bytes / time in GB/s, beside a
bf16 F.linear (cuBLAS) measured the same way. Writes int4_row_sweep.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import gemv_sweep  # tools/ (run as a script: its folder is on sys.path)
from graphrt.weights.formats import int4_cuda
from graphrt.weights.formats.int4 import Int4
from graphrt.weights.formats.int4_gemv import int4_gemv

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (28672, 8192)]
CALLS = 60
ROW_CHOICES = [(4, 64), (4, 128), (8, 128)]


def graph_time(fns) -> float:
    """Seconds per call: CALLS calls (cycling through `fns`) replayed from one graph, median of 5 replays."""
    return gemv_sweep.graph_time(fns, CALLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-sweep"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    x = torch.randn(1, max(k for _, k in SHAPES), device="cuda", dtype=torch.bfloat16)
    for n, k in SHAPES:
        xk = x[:, :k].contiguous()
        dense = torch.randn(n, k) * 0.02
        tiny, blocked = Int4(torch.bfloat16, 128, packing="cuda"), Int4(torch.bfloat16, 128, packing="blocked")
        tp = {key: v.cuda() for key, v in tiny.encode(dense, torch.device("cuda")).items()}
        bp = {key: v.cuda() for key, v in blocked.encode(dense, torch.device("cuda")).items()}
        int4_bytes = sum(v.numel() * v.element_size() for v in bp.values())
        copies = max(1, -(-256_000_000 // int4_bytes))
        tps = [{key: v.clone() for key, v in tp.items()} for _ in range(copies)]
        bps = [{key: v.clone() for key, v in bp.items()} for _ in range(copies)]
        bf = [dense.to("cuda", torch.bfloat16) for _ in range(max(1, -(-256_000_000 // (2 * n * k))))]
        ref = xk.double() @ blocked.dense(bp, torch.float32).double().T
        row = dict(n=n, k=k, int4_MB=int4_bytes / 1e6)
        times = {"bf16 cublas": graph_time([lambda w=w: F.linear(xk, w) for w in bf])}
        times["tinygemm"] = graph_time([lambda p=p: tiny.linear(xk, p, None) for p in tps])
        times["triton"] = graph_time([lambda p=p: int4_gemv(xk, p["w"], p["scales_and_zeros"]) for p in bps])
        for r, t in ROW_CHOICES:
            y = int4_cuda.int4_gemv_row(xk, bp["w"], bp["scales_and_zeros"], rows=r, max_threads=t)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            times[f"row r{r} t{t}"] = graph_time([
                lambda p=p, r=r, t=t: int4_cuda.int4_gemv_row(xk, p["w"], p["scales_and_zeros"], rows=r, max_threads=t)
                for p in bps])
            row[f"row r{r} t{t} rel_err"] = err
        row["us"] = {name: 1e6 * s for name, s in times.items()}
        row["GBps"] = {name: (2 * n * k if name.startswith("bf16") else int4_bytes) / s / 1e9
                       for name, s in times.items()}
        rows.append(row)
        print(f"{n}x{k}: " + ", ".join(f"{name} {1e6 * s:.1f} us ({row['GBps'][name]:.0f} GB/s)"
                                       for name, s in times.items()), flush=True)
        del tps, bps, bf
        torch.cuda.empty_cache()
    batch = []   # M > 1 (batched decode, speculative verification): tinygemm against the blocked layout (NVRTC at M <= 4, Triton above)
    for n, k in ((28672, 4096), (4096, 14336)):
        dense = torch.randn(n, k) * 0.02
        tiny, blocked = Int4(torch.bfloat16, 128, packing="cuda"), Int4(torch.bfloat16, 128, packing="blocked")
        tps = [{key: v.cuda() for key, v in tiny.encode(dense, torch.device("cuda")).items()} for _ in range(4)]
        bps = [{key: v.cuda() for key, v in blocked.encode(dense, torch.device("cuda")).items()} for _ in range(4)]
        for m in (2, 4, 8, 16):
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_tiny = graph_time([lambda p=p: tiny.linear(xm, p, None) for p in tps])
            t_tri = graph_time([lambda p=p: blocked.linear(xm, p, None) for p in bps])
            batch.append(dict(n=n, k=k, m=m, tinygemm_us=1e6 * t_tiny, blocked_us=1e6 * t_tri))
            print(f"{n}x{k} M={m}: tinygemm {1e6 * t_tiny:.1f} us, blocked (NVRTC <= 4 rows, Triton above) {1e6 * t_tri:.1f} us", flush=True)
    (a.out / "int4_row_sweep.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows, batch=batch),
                                                          indent=2))


if __name__ == "__main__":
    main()
