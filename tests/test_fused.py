"""The fused layer kernels (graphrt/models/fused.py) against their reference math.

Without a GPU they run in Triton's interpreter in a subprocess (float32 and float16: the interpreter mishandles
bfloat16, see test_gemv.py), with the GPU gate forced open. On the GPU (tests marked `gpu`): bfloat16 too.
RoPE + KV append equals the reference bit for bit in the interpreter (it rounds where ATen rounds) and within a
unit in the last place compiled (FMA contraction); RMSNorm and silu * up within a few units in the last place.
"""
import textwrap

import pytest
import torch

from graphrt.models import fused
from test_gemv import INTERPRETER_SETUP, needs_triton, run_interpreter


def compare(dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Runs each fused function and its reference on the same random inputs; returns what differs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)
    out = {}
    x, w = r(3, 5, 96), r(96)
    a, b = fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5)
    out["norm_rel"] = ((a.double() - b.double()).norm() / b.double().norm()).item()
    gate, up = r(2, 3, 160), r(2, 3, 160)
    a, b = fused.silu_mul(gate, up), fused.silu_mul_reference(gate, up)
    out["silu_rel"] = ((a.double() - b.double()).norm() / b.double().norm()).item()
    B, T, H, Hkv, D, S = 2, 3, 4, 2, 16, 10
    q, k, v = r(B, T, H * D), r(B, T, Hkv * D), r(B, T, Hkv * D)
    pos = torch.tensor([[2, 3, 4], [5, 6, 7]], device=device)
    ang = pos.float()[..., None] * torch.rand(D // 2, generator=g).to(device)
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    rows = torch.arange(B, device=device)[:, None].expand(B, T)
    kv1 = torch.zeros(2, 2, 3, Hkv, S, D, dtype=dtype, device=device)  # [layers, k/v, maxB, Hkv, S, D]
    kv2 = kv1.clone()
    a = fused.rope_append(q, k, v, cos, sin, kv1[1, 0], kv1[1, 1], rows, pos, H, Hkv)
    b = fused.rope_append_reference(q, k, v, cos, sin, kv2[1, 0], kv2[1, 1], rows, pos, H, Hkv)
    assert a.shape == (B, H, T, D)
    out["rope_equal"], out["kv_equal"] = torch.equal(a, b), torch.equal(kv1, kv2)
    out["rope_rel"] = ((a.double() - b.double()).norm() / b.double().norm()).item()
    out["kv_rel"] = ((kv1.double() - kv2.double()).norm() / kv2.double().norm()).item()
    out["kv_untouched_equal"] = torch.equal(kv1[0], kv2[0]) and torch.equal(kv1[1, :, B:], kv2[1, :, B:])
    # the column slices of one stacked product (qkv, gate_up) give what contiguous inputs give
    kv3 = torch.zeros_like(kv1)
    qs, ks, vs = torch.cat([q, k, v], dim=-1).split((H * D, Hkv * D, Hkv * D), dim=-1)
    c = fused.rope_append(qs, ks, vs, cos, sin, kv3[1, 0], kv3[1, 1], rows, pos, H, Hkv)
    gs, us = torch.cat([gate, up], dim=-1).chunk(2, dim=-1)
    out["stacked_equal"] = (torch.equal(c, a) and torch.equal(kv3, kv1)
                            and torch.equal(fused.silu_mul(gs, us), fused.silu_mul(gate, up)))
    return out


def check(res: dict, dtype: str, exact_rope: bool) -> None:
    """exact_rope: the interpreter rounds each product as ATen does; compiled kernels contract a * b + c * d
    into FMAs (one rounding fewer), so on the GPU RoPE agrees within the tolerance."""
    tol = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    if exact_rope:
        assert res["rope_equal"] and res["kv_equal"], res
    assert res["rope_rel"] < tol and res["kv_rel"] < tol and res["kv_untouched_equal"] and res["stacked_equal"], res
    assert res["norm_rel"] < tol and res["silu_rel"] < tol, res


_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import torch
    import test_fused as t
    t.fused.fused_available = lambda x: True      # the kernels on CPU tensors, in the interpreter
    print("RESULTS " + json.dumps({{d: t.compare(getattr(torch, d), "cpu") for d in ("float32", "float16")}}))
""")


@needs_triton
def test_interpreter_matches_reference():
    for dtype, res in run_interpreter(_SCRIPT, timeout=300).items():
        check(res, dtype, exact_rope=True)


def test_cpu_runs_the_reference():
    x, w = torch.randn(2, 8), torch.randn(8)
    assert not fused.fused_available(x)
    assert torch.equal(fused.rms_norm(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6))
    res = compare(torch.float32, "cpu")
    assert res["rope_equal"] and res["kv_equal"] and res["norm_rel"] == 0 and res["silu_rel"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_kernels_match_reference(dtype):
    assert fused.fused_available(torch.zeros(1, device="cuda"))
    check(compare(getattr(torch, dtype), "cuda"), dtype, exact_rope=False)


@pytest.mark.gpu
def test_cuda_argmax_rows_equals_argmax():
    from graphrt.sampling import argmax_rows
    for vocab in (128256, 49152, 32000, 1000):
        x = torch.randint(0, 7, (5, vocab), device="cuda").float()     # many ties: the first index must win
        x[3, vocab // 2:] = float("nan")
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1)), vocab


