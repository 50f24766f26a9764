"""graphrt's one-row GEMV for 16-bit dense weights (graphrt/weights/formats/dense_gemv.py) against float64.

Without a GPU: Triton's interpreter in a subprocess (float16; the interpreter mishandles bfloat16), split-K with
the last-program merge included. On the GPU (marked `gpu`): bfloat16 through `Dense.linear` as the model calls it,
with and without the residual, eager against captured.
"""
import textwrap

import pytest
import torch

from graphrt.weights.formats import dense_gemv
from test_gemv import INTERPRETER_SETUP, needs_triton, run_interpreter

# (N, K, blocks, split): one program per row block; split K in 2 and 4 (merged by the last program)
CASES = [(32, 2048, (8, 1024), 1), (64, 4096, (8, 1024), 2), (48, 2048, (16, 256), 4)]


def errors(device: str, dtype: torch.dtype) -> dict:
    out = {}
    for n, k, blocks, split in CASES:
        g = torch.Generator().manual_seed(n + k)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
        x, h = torch.randn(1, k, generator=g).to(dtype).to(device), torch.randn(1, n, generator=g).to(dtype).to(device)
        want = x.double() @ w.double().t()
        for res in (None, h):
            y = dense_gemv.dense_gemv(x, w, res, blocks, split)
            ref = want + (res.double() if res is not None else 0)
            out[f"{n}x{k} split {split} residual {res is not None}"] = ((y.double() - ref).norm() / ref.norm()).item()
    return out


_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import torch
    import test_dense_gemv as t
    t.dense_gemv._sms = lambda index: 132
    print("RESULTS " + json.dumps(t.errors("cpu", torch.float16)))
""")


@needs_triton
def test_interpreter_matches_float64():
    res = run_interpreter(_SCRIPT, timeout=300)
    assert len(res) == 2 * len(CASES) and all(e < 1e-3 for e in res.values()), res


def test_plan_splits_until_enough_programs():
    assert dense_gemv.plan(6144, 4096, 132, 8, 1024) == (8, 1024, 1, 4096)      # 768 row blocks: no split
    assert dense_gemv.plan(4096, 14336, 132, 8, 1024) == (8, 1024, 2, 7168)     # 512 blocks: split in 2
    assert dense_gemv.plan(4096, 1000, 132, 8, 1024) is None                    # K does not tile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dense_linear_takes_it_and_matches():
    from graphrt.weights.formats import Weight, linear
    from graphrt.weights.formats.dense import Dense
    res = errors("cuda", torch.bfloat16)
    assert all(e < 1e-2 for e in res.values()), res
    n, k = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    w = Weight(Dense(torch.bfloat16), {"w": torch.randn(n, k, device="cuda", generator=g).bfloat16() / 64}, (n, k))
    x = torch.randn(1, 1, k, device="cuda", generator=g).bfloat16()
    h = torch.randn(1, 1, n, device="cuda", generator=g).bfloat16()
    assert dense_gemv.fits(x, w.parts["w"])
    eager, eager_res = linear(x, w), linear(x, w, residual=h.clone())
    graph = torch.cuda.CUDAGraph()
    h2 = h.clone()
    with torch.cuda.graph(graph):
        out, out_res = linear(x, w), linear(x, w, residual=h2)
    graph.replay()
    assert torch.equal(out, eager) and torch.equal(out_res, eager_res)
    want = torch.nn.functional.linear(x.double(), w.parts["w"].double())
    assert ((eager.double() - want).norm() / want.norm()).item() < 1e-2
