"""`linear_fused` on blocked int4 weights (the NVRTC kernel with its prologues and epilogues, int4_cuda_source.py)
against the same steps run apart (models/fused.py's kernels and the plain product): RMSNorm before the product,
silu(gate) * up before it, the residual and RoPE with the KV append after it. Each fused call is also replayed in a
CUDA graph, which must give the eager call's bits."""
import textwrap

import pytest
import torch

from graphrt.models.fused import rms_norm, rope_append, silu_mul
from graphrt.weights.formats import RopeAppend, Weight, linear, linear_fused
from graphrt.weights.formats.dense import Dense
from graphrt.weights.formats.int4 import Int4
from test_gemv import INTERPRETER_SETUP, needs_triton, run_interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}


def weights(out: int, inp: int, dtype: torch.dtype, seed: int = 1) -> Weight:
    dense = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) / inp ** 0.5
    fmt = Int4(dtype, packing="blocked")
    parts = {k: v.cuda() for k, v in fmt.encode(dense, torch.device("cuda")).items()}
    return Weight(fmt, parts, (out, inp))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_in_a_graph(fn, *inputs: torch.Tensor) -> None:
    """fn(*inputs) replayed from a CUDA graph gives the eager call's bits (outputs compared after each)."""
    eager = fn(*inputs)
    static = [t.clone() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    for t, src in zip(static, inputs):
        t.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_norm_before_the_product(dt, rows):
    dtype = DTYPES[dt]
    w = weights(320, 576, dtype)
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = (3 * torch.randn(rows, 1, 576, device="cuda", generator=g)).to(dtype)
    nw = (1 + 0.1 * torch.randn(576, device="cuda", generator=g)).to(dtype)
    got = linear_fused(x, w, norm=(nw, 1e-5))
    assert got is not None and got.shape == (rows, 1, 320) and got.dtype == dtype
    assert rel(got, linear(rms_norm(x, nw, 1e-5), w)) < TOL[dtype]
    same_in_a_graph(lambda a: linear_fused(a, w, norm=(nw, 1e-5)), x)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_silu_mul_before_the_product_and_the_residual_after(dt, rows):
    dtype = DTYPES[dt]
    w = weights(256, 1536, dtype)
    g = torch.Generator(device="cuda").manual_seed(rows)
    gate_up = torch.randn(rows, 1, 3072, device="cuda", generator=g).to(dtype)
    h = torch.randn(rows, 1, 256, device="cuda", generator=g).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = linear(silu_mul(gate, up), w, residual=h.clone())
    got = linear_fused(gate_up, w, silu=True, residual=h.clone())
    assert got is not None and got.shape == h.shape
    assert rel(got, want) < TOL[dtype]
    plain = linear_fused(gate_up, w, silu=True)
    assert rel(plain, linear(silu_mul(gate, up), w)) < TOL[dtype]
    same_in_a_graph(lambda a, b: linear_fused(a, w, silu=True, residual=b), gate_up, h)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 2), (2, 2), (4, 1)])
def test_rope_and_the_kv_append_after_the_product(dt, batch, tokens):
    dtype = DTYPES[dt]
    H, Hkv, D, S, hidden = 9, 3, 64, 48, 576
    w = weights((H + 2 * Hkv) * D, hidden, dtype)
    g = torch.Generator(device="cuda").manual_seed(batch * 10 + tokens)
    x = torch.randn(batch, tokens, hidden, device="cuda", generator=g).to(dtype)
    nw = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
    positions = torch.stack([torch.arange(tokens, device="cuda") + 5 + 7 * b for b in range(batch)])
    angle = positions.float()[..., None] * (1e-2 * torch.arange(1, D // 2 + 1, device="cuda"))
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    caches = torch.randn(2, 2, 5, Hkv, S, D, device="cuda", generator=g).to(dtype)   # (want, got) x (k, v)
    rows = torch.arange(batch, device="cuda")[:, None].expand(batch, tokens)
    q, k, v = linear(rms_norm(x, nw, 1e-6), w).split((H * D, Hkv * D, Hkv * D), dim=-1)
    want_q = rope_append(q, k, v, cos, sin, caches[0, 0], caches[0, 1], rows, positions, H, Hkv)
    before = caches[1].clone()
    got_q = linear_fused(x, w, norm=(nw, 1e-6), rope=RopeAppend(cos, sin, positions, caches[1, 0], caches[1, 1],
                                                                 H, Hkv))
    assert got_q is not None and got_q.shape == want_q.shape == (batch, H, tokens, D)
    assert rel(got_q, want_q) < TOL[dtype]
    written = torch.zeros(5, S, dtype=torch.bool, device="cuda")
    written[rows, positions] = True
    for i in range(2):
        assert rel(caches[1, i][:, :, :][written[:, None].expand(5, Hkv, S)],
                   caches[0, i][written[:, None].expand(5, Hkv, S)]) < TOL[dtype]
        untouched = ~written[:, None].expand(5, Hkv, S)
        assert torch.equal(caches[1, i][untouched], before[i][untouched])
    rope = RopeAppend(cos, sin, positions, caches[1, 0], caches[1, 1], H, Hkv)
    same_in_a_graph(lambda a: torch.cat([linear_fused(a, w, norm=(nw, 1e-6), rope=rope).flatten(),
                                         caches[1].flatten()]), x)


def test_formats_without_the_kernel_say_so():
    """Dense weights and the CPU: None, so the model math runs the steps apart."""
    x = torch.randn(1, 1, 64)
    dense = Weight(Dense(torch.float32), {"w": torch.randn(32, 64)}, (32, 64))
    assert linear_fused(x, dense, norm=(torch.ones(64), 1e-5)) is None
    fmt = Int4(torch.float32, packing="blocked")
    w = Weight(fmt, fmt.encode(torch.randn(64, 64), torch.device("cpu")), (64, 64))
    assert linear_fused(x, w, norm=(torch.ones(64), 1e-5)) is None


def test_prologues_fuse_only_where_they_pay():
    """The norm / silu prologue is redone by every block: fused up to PROLOGUE_MAX_WEIGHTS, apart above (measured)."""
    from graphrt.weights.formats.int4_cuda import prologue_pays
    packed = lambda n, k: torch.empty(n, k // 2, dtype=torch.uint8, device="meta")  # noqa: E731 (blocked [N, K/2])
    norm = (torch.empty(0), 1e-5)
    assert prologue_pays(packed(3072, 576), norm=norm) and prologue_pays(packed(576, 1536), silu=True)
    assert prologue_pays(packed(6144, 4096), norm=norm)             # the 8B qkv: the norm still fused
    assert not prologue_pays(packed(28672, 4096), norm=norm)        # the 8B gate_up: rms_norm apart
    assert not prologue_pays(packed(4096, 14336), silu=True)        # the 8B down: silu_mul apart
    assert prologue_pays(packed(4096, 14336))                       # no prologue asked


@gpu
def test_large_products_run_their_prologue_apart():
    """At the 8B down shape linear_fused declines the silu prologue, so mlp_rows runs silu_mul, then the product."""
    w = weights(4096, 14336, torch.bfloat16)
    gu = torch.randn(1, 1, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    assert linear_fused(gu, w, silu=True) is None
    assert linear_fused(gu[..., :14336].contiguous(), w) is not None


# ---- prompt steps: one dequantizing kernel (int4_gemv.dequant_blocked) then a dense product -----------------
_DEQUANT_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import torch
    from graphrt.weights.formats.int4 import Int4
    from graphrt.weights.formats.int4_gemv import dequant_blocked
    same = {{}}
    for n, k, group in ((40, 128, 64), (64, 576, 64), (96, 256, 128)):
        fmt = Int4(torch.float32, group_size=group, packing="blocked")
        parts = fmt.encode(torch.randn(n, k, generator=torch.Generator().manual_seed(n)), torch.device("cpu"))
        for dtype in (torch.float32, torch.float16):
            got = dequant_blocked(parts["w"], parts["scales_and_zeros"], dtype)
            same[f"{{n}}x{{k}} g{{group}} {{dtype}}"] = bool(torch.equal(got, fmt.dense(parts, dtype)))
    print("RESULTS " + json.dumps(same))
""")


@needs_triton
def test_dequant_kernel_equals_dense_in_the_interpreter():
    res = run_interpreter(_DEQUANT_SCRIPT, timeout=300)
    assert len(res) == 6 and all(res.values()), res


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dt", DTYPES)
def test_prompt_rows_dequantize_in_one_kernel(dt):
    dtype = DTYPES[dt]
    from graphrt.weights.formats.int4_gemv import dequant_blocked
    w = weights(320, 576, dtype)
    assert torch.equal(dequant_blocked(w.parts["w"], w.parts["scales_and_zeros"], dtype), w.format.dense(w.parts, dtype))
    x = torch.randn(1, 40, 576, device="cuda").to(dtype)
    assert rel(linear(x, w), x.double() @ w.format.dense(w.parts, torch.float64).t()) < TOL[dtype]
