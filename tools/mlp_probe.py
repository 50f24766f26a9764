"""Where one decode MLP group's GPU time goes, at the 8B shape and batch 1: the whole group (`llama.mlp_forward`,
as the planner's GPU rate measures it) against its kernels alone, for bf16, int8 and int4, and the int4 down
product with its silu prologue at other rows / threads per block.

    python3 tools/mlp_probe.py [--out DIR] [--formats bf16,int8,int4] [--batch 1]

Each case: CALLS calls replayed from one CUDA graph, cycling through enough copies of the group (>= 256 MB) that
no call reads its weights from L2; microseconds per call and the group's (or matrix's) bytes / time. Writes
mlp_probe.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import gemv_sweep  # tools/ (run as a script: its folder is on sys.path)
from graphrt.config import ModelConfig
from graphrt.models import llama
from graphrt.models.fused import rms_norm, silu_mul
from graphrt.plan.calibrate import mlp_layout, random_buffer
from graphrt.weights.formats import linear, linear_fused
from graphrt.weights.formats import int4_cuda
from graphrt.weights.formats.policy import quantization_policy

CALLS = 60
CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b.json"


def us(fns) -> float:
    return gemv_sweep.graph_time(fns, CALLS) * 1e6


def weight_bytes(w) -> int:
    return sum(p.numel() * p.element_size() for p in w.parts.values())


def probe(fmt: str, batch: int) -> dict:
    cfg = ModelConfig.from_file(CONFIG)
    policy = quantization_policy(None if fmt == "bf16" else fmt, torch.bfloat16, torch.device("cuda"))
    g = mlp_layout(cfg, policy)
    host = random_buffer(g)
    copies = max(2, -(-256_000_000 // g.nbytes))
    groups = [g.views(host.to("cuda")) for _ in range(copies)]
    h = torch.randn(batch, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(batch, 1, 2 * cfg.intermediate_size, device="cuda", dtype=torch.bfloat16) * 0.5
    act = silu_mul(*gu.chunk(2, dim=-1))
    norm = lambda w: (w["post_norm"], cfg.rms_norm_eps)  # noqa: E731
    gub, db = weight_bytes(groups[0]["gate_up"]), weight_bytes(groups[0]["down"])
    res: dict[str, dict] = {}

    def case(name: str, fns, nbytes: int) -> None:
        t = us(fns)
        res[name] = dict(us=t, GBps=nbytes / t / 1e3)
        print(f"{fmt:5s} {name:44s} {t:8.2f} us  {nbytes / t / 1e3:7.0f} GB/s", flush=True)

    with torch.inference_mode():
        case("mlp_forward (the planner's GPU rate)", [lambda w=w: llama.mlp_forward(h, w, cfg) for w in groups],
             g.nbytes)
        case("rms_norm", lambda: rms_norm(h, groups[0]["post_norm"], cfg.rms_norm_eps), 0)
        case("silu_mul", lambda: silu_mul(*gu.chunk(2, dim=-1)), 0)
        case("gate_up alone", [lambda w=w: linear(h, w["gate_up"]) for w in groups], gub)
        case("gate_up with the norm (linear_fused)", [lambda w=w: fused_or_apart(h, w["gate_up"], norm=norm(w))
                                                      for w in groups], gub)
        case("down alone", [lambda w=w: linear(act, w["down"]) for w in groups], db)
        case("down + residual", [lambda w=w: linear(act, w["down"], residual=h) for w in groups], db)
        case("down with silu + residual (linear_fused)",
             [lambda w=w: fused_or_apart(gu, w["down"], silu=True, residual=h) for w in groups], db)
        if fmt == "int4":
            int4_cases(case, groups, h, gu, act, norm, gub, db)
            attn_cases(case, cfg, policy, h)
    del groups
    torch.cuda.empty_cache()
    return dict(group_MB=g.nbytes / 1e6, copies=copies, cases=res)


def fused_or_apart(x, w, norm=None, silu=False, residual=None):
    """linear_fused where the format takes the call, else the steps apart (as models/llama.mlp_rows runs them)."""
    out = linear_fused(x, w, norm=norm, silu=silu, residual=residual)
    if out is not None:
        return out
    if norm is not None:
        x = rms_norm(x, *norm)
    if silu:
        x = silu_mul(*x.chunk(2, dim=-1))
    return linear(x, w, residual=residual)


def int4_cases(case, groups, h, gu, act, norm, gub, db) -> None:
    """The NVRTC row kernel at two block shapes, plain and with its prologues fused."""
    def row(x, w, **kw):
        return int4_cuda.int4_gemv_row(x, w.parts["w"], w.parts["scales_and_zeros"], **kw)
    for rows, threads in ((4, 64), (8, 128)):
        kw = dict(rows=rows, max_threads=threads)
        case(f"gate_up alone r{rows} t{threads}", [lambda w=w: row(h, w["gate_up"], **kw) for w in groups], gub)
        case(f"down + residual r{rows} t{threads}", [lambda w=w: row(act, w["down"], residual=h, **kw)
                                                     for w in groups], db)
        case(f"gate_up with the norm r{rows} t{threads}", [lambda w=w: row(h, w["gate_up"], norm=norm(w), **kw)
                                                           for w in groups], gub)
        case(f"down with silu + residual r{rows} t{threads}",
             [lambda w=w: row(gu, w["down"], silu=True, residual=h, **kw) for w in groups], db)


def attn_cases(case, cfg, policy, h) -> None:
    """The attention group's qkv product: the norm and RoPE fused, the norm apart, the steps apart."""
    from graphrt.models.fused import rope_append
    from graphrt.weights.formats import RopeAppend
    from graphrt.weights.layout import model_groups
    g = next(x for x in model_groups(cfg, policy, "attn_mlp") if x.kind == "attn")
    host = random_buffer(g)
    groups = [g.views(host.to("cuda")) for _ in range(max(2, -(-256_000_000 // g.nbytes)))]
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos = torch.ones(1, 1, 1, D, device="cuda", dtype=h.dtype)
    sin = torch.zeros(1, 1, 1, D, device="cuda", dtype=h.dtype)
    pos = torch.full((1, 1), 7, device="cuda")
    slots = torch.zeros(1, 1, dtype=torch.int64, device="cuda")
    kc, vc = (torch.zeros(1, Hkv, 512, D, device="cuda", dtype=h.dtype) for _ in range(2))
    rope = RopeAppend(cos, sin, pos, kc, vc, H, Hkv)
    nb = weight_bytes(groups[0]["qkv"])
    eps = cfg.rms_norm_eps

    def apart(w):
        q, k, v = linear(rms_norm(h, w["input_norm"], eps), w["qkv"]).split((H * D, Hkv * D, Hkv * D), dim=-1)
        rope_append(q, k, v, cos, sin, kc, vc, slots, pos, H, Hkv)

    case("qkv alone", [lambda w=w: linear(h, w["qkv"]) for w in groups], nb)
    case("qkv with the norm and rope", [lambda w=w: linear_fused(h, w["qkv"], norm=(w["input_norm"], eps), rope=rope)
                                        for w in groups], nb)
    case("rms_norm, then qkv with rope", [lambda w=w: linear_fused(rms_norm(h, w["input_norm"], eps), w["qkv"],
                                                                   rope=rope) for w in groups], nb)
    case("qkv apart (norm, product, rope)", [lambda w=w: apart(w) for w in groups], nb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=a.batch,
               formats={f: probe(f, a.batch) for f in a.formats.split(",")})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "mlp_probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
