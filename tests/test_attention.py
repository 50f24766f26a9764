"""The decode attention kernel (graphrt/models/attention.py) against SDPA in float64.

Without a GPU it runs in Triton's interpreter in a subprocess (float32 and float16: the interpreter mishandles
bfloat16, see test_gemv.py). On the GPU (marked `gpu`): bfloat16 too, through `masked_attention` as the model
calls it, with views of a KV cache as K and V.
"""
import textwrap

import pytest
import torch

from graphrt.models import attention
from test_gemv import INTERPRETER_SETUP, needs_triton, run_interpreter

# (batch, kv heads, query rows, context, head dim): one block, several blocks, a split context (L > SPLIT_KEYS)
CASES = [(1, 3, 3, 17, 64), (2, 2, 20, 130, 64), (2, 1, 4, 1100, 128), (1, 2, 64, 64, 32)]
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


def compare(dtype: torch.dtype, device: str, fn) -> dict:
    """Max error of fn(q, k, v, mask) relative to the largest output value, per case; K/V are views of a longer
    cache, the mask hides a suffix of the keys for batch row 0 and (causal-style) a few keys per query row."""
    out = {}
    for i, (B, H, R, L, D) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
        q = r(B, H, R, D)
        cache_k, cache_v = r(B + 1, H, L + 40, D), r(B + 1, H, L + 40, D)
        k, v = cache_k[:B, :, :L], cache_v[:B, :, :L]
        visible = torch.ones(B, 1, R, L, dtype=torch.bool)
        visible[0, :, :, L // 2:] = False
        for row in range(R):
            visible[:, :, row, L - 1 - row % 3:] = False
        mask = torch.zeros(B, 1, R, L).masked_fill_(~visible, float("-inf")).to(dtype).to(device)
        got = fn(q, k, v, mask).double().cpu()
        want = torch.nn.functional.scaled_dot_product_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                                attn_mask=mask.double().cpu())
        out[str(CASES[i])] = ((got - want).abs().max() / want.abs().max()).item() if got.shape == want.shape else 1.0
    return out


_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import torch
    import test_attention as t
    print("RESULTS " + json.dumps({{d: t.compare(getattr(torch, d), "cpu", t.attention.decode_attention)
                                    for d in ("float32", "float16")}}))
""")


@needs_triton
def test_interpreter_matches_sdpa():
    for dtype, res in run_interpreter(_SCRIPT, timeout=600).items():
        assert all(err < TOL[dtype] for err in res.values()), (dtype, res)


def test_cpu_takes_sdpa():
    q, k, v, mask = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.zeros(1, 1, 3, 5)
    assert not attention.decode_attention_fits(q, k, v, mask)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(attention.masked_attention(q, k, v, mask), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_kernel_matches_sdpa(dtype):
    q = torch.zeros(1, 1, 4, 128, device="cuda", dtype=getattr(torch, dtype))
    assert attention.decode_attention_fits(q, q, q, q[:, :, :, :8])
    res = compare(getattr(torch, dtype), "cuda", attention.masked_attention)
    assert all(err < TOL[dtype] for err in res.values()), res


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_is_deterministic_and_capturable():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    mask = torch.zeros(2, 1, 4, 2048, device="cuda", dtype=torch.bfloat16)
    eager = attention.masked_attention(q, k, v, mask)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.masked_attention(q, k, v, mask)
    graph.replay()
    assert torch.equal(out, eager) and torch.equal(attention.masked_attention(q, k, v, mask), eager)
