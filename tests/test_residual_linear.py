"""`linear(x, w, residual=h)`: h + x W^T, in the product's kernel where the format has one (dense on CUDA: one GEMM
with beta = 1; blocked int4: the NVRTC kernel's epilogue), else a separate add (the CPU, other formats)."""
import pytest
import torch

from graphrt.weights.formats import Weight, linear
from graphrt.weights.formats.dense import Dense
from graphrt.weights.formats.int4 import Int4


def weights(fmt, out: int, inp: int, device: str) -> Weight:
    dense = torch.randn(out, inp, generator=torch.Generator().manual_seed(1)) / inp ** 0.5
    parts = {k: v.to(device) for k, v in fmt.encode(dense, torch.device(device)).items()}
    return Weight(fmt, parts, (out, inp))


def test_cpu_adds_separately_and_keeps_the_residual():
    w = weights(Dense(torch.float32), 64, 128, "cpu")
    x, h = torch.randn(2, 3, 128), torch.randn(2, 3, 64)
    before = h.clone()
    assert torch.equal(linear(x, w, residual=h), before + linear(x, w)) and torch.equal(h, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["dense-bf16", "dense-fp32", "int4-bf16", "int4-fp32"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_cuda_residual_in_the_product(fmt, rows):
    kind, dt = fmt.split("-")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    f = Dense(dtype) if kind == "dense" else Int4(dtype, packing="blocked")
    w = weights(f, 256, 512, "cuda")
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 1, 512, device="cuda", generator=g).to(dtype)
    h = torch.randn(rows, 1, 256, device="cuda", generator=g).to(dtype)
    want = h.double() + linear(x, w).double()
    got = linear(x, w, residual=h.clone())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.shape == h.shape and got.dtype == dtype
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    # the same call twice gives the same bits (eager and captured steps run it)
    assert torch.equal(got, linear(x, w, residual=h.clone()))
