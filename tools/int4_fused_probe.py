"""Time per call of the fused int4 products (linear_fused) against the same steps apart, at the default model's
shapes (the self-int4 draft's layer), each replayed 200 times from one CUDA graph (launch gaps included):

    python3 tools/int4_fused_probe.py [--dtype bfloat16] [--out DIR]

qkv: rms_norm + product + rope_append against one kernel; gate_up: rms_norm + product against one; down:
silu_mul + product + residual against one; o: product + residual (the same kernel both ways). And the decode
attention kernel over 256 keys with the context split for about 1, 6 and 128 programs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from graphrt.models.fused import rms_norm, rope_append, silu_mul
from graphrt.weights.formats import RopeAppend, Weight, linear, linear_fused
from graphrt.weights.formats.int4 import Int4


def per_call_us(fn, calls: int = 200) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    hidden, inter, H, Hkv, D, S = 576, 1536, 9, 3, 64, 512
    fmt = Int4(dtype, packing="blocked")

    def weight(out: int, inp: int) -> Weight:
        parts = {k: v.cuda() for k, v in fmt.encode(torch.randn(out, inp) / inp ** 0.5, torch.device("cuda")).items()}
        return Weight(fmt, parts, (out, inp))

    qkv, o, gate_up, down = weight((H + 2 * Hkv) * D, hidden), weight(hidden, H * D), weight(2 * inter, hidden), \
        weight(hidden, inter)
    h = torch.randn(1, 1, hidden, device="cuda", dtype=dtype)
    nw = torch.ones(hidden, device="cuda", dtype=dtype)
    gu = torch.randn(1, 1, 2 * inter, device="cuda", dtype=dtype)
    attn = torch.randn(1, 1, H * D, device="cuda", dtype=dtype)
    cos = torch.ones(1, 1, 1, D, device="cuda", dtype=dtype)
    sin = torch.zeros(1, 1, 1, D, device="cuda", dtype=dtype)
    pos = torch.full((1, 1), 7, device="cuda")
    rows = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    kc, vc = (torch.zeros(1, Hkv, S, D, device="cuda", dtype=dtype) for _ in range(2))
    rope = RopeAppend(cos, sin, pos, kc, vc, H, Hkv)

    def qkv_apart():
        q, k, v = linear(rms_norm(h, nw, 1e-5), qkv).split((H * D, Hkv * D, Hkv * D), dim=-1)
        rope_append(q, k, v, cos, sin, kc, vc, rows, pos, H, Hkv)

    def down_apart():
        g, u = gu.chunk(2, dim=-1)
        linear(silu_mul(g, u), down, residual=h)

    cases = {
        "qkv apart (norm, product, rope)": qkv_apart,
        "qkv fused": lambda: linear_fused(h, qkv, norm=(nw, 1e-5), rope=rope),
        "qkv product alone": lambda: linear(h, qkv),
        "gate_up apart (norm, product)": lambda: linear(rms_norm(h, nw, 1e-5), gate_up),
        "gate_up fused": lambda: linear_fused(h, gate_up, norm=(nw, 1e-5)),
        "gate_up product alone": lambda: linear(h, gate_up),
        "down apart (silu, product + residual)": down_apart,
        "down fused": lambda: linear_fused(gu, down, silu=True, residual=h),
        "o product + residual": lambda: linear(attn, o, residual=h),
    }
    from graphrt.models import attention
    q4 = torch.randn(1, Hkv, H // Hkv, D, device="cuda", dtype=dtype)
    mask = torch.zeros(1, 1, H // Hkv, 256, device="cuda", dtype=dtype)
    res = {name: per_call_us(fn) for name, fn in cases.items()}
    for programs in (1, 6, 128):   # the context split until about this many programs (the default: 128)
        attention.TARGET_PROGRAMS = programs
        res[f"attention, 256 keys, about {programs} programs"] = per_call_us(
            lambda: attention.decode_attention(q4, kc[:, :, :256], vc[:, :, :256], mask))
    attention.TARGET_PROGRAMS = 128
    for name, us in res.items():
        print(f"{us:8.2f} us  {name}")
    (a.out / "int4_fused_probe.json").write_text(json.dumps(dict(dtype=a.dtype, us=res), indent=1))


if __name__ == "__main__":
    main()
