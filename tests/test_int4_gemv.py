"""The blocked int4 layout and its Triton GEMV (graphrt/weights/formats/int4_gemv.py), through Int4("blocked").

Without a GPU the kernel runs in Triton's interpreter in a subprocess (see test_gemv.py for why); the reference is
x (float64) @ Int4.dense(parts, float32), the matrix the kernel forms in registers. GPU tests (marked `gpu`) run
the compiled kernel, in a CUDA graph too.
"""
import textwrap
import zlib

import pytest
import torch

from graphrt.weights.formats.int4 import Int4
from graphrt.weights.formats.int4_gemv import _plan, pack_blocked, unpack_blocked
from test_gemv import HAVE_TRITON, INTERPRETER_SETUP, needs_triton, run_interpreter

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}
CASES = [dict(x=x, m=m, k=k, n=n, g=g, split=split, bias=bias)
         for x, m, k, n, g, split, bias in [
             ("float32", 1, 256, 48, 128, None, False), ("bfloat16", 1, 256, 48, 128, None, True),
             ("float32", 1, 576, 40, 64, 3, False), ("float16", 1, 192, 16, 32, 2, True),
             ("float32", 3, 256, 48, 128, None, False), ("bfloat16", 5, 576, 40, 64, 3, True),
             ("float32", 16, 128, 24, 32, 2, False), ("float32", 1, 64, 8, 32, None, False)]]


def case_id(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


def make(c, device):
    """(x, Int4 format, parts, bias, float64 reference) for a case."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
    fmt = Int4(getattr(torch, c["x"]), group_size=c["g"], packing="blocked")
    parts = {k: v.to(device) for k, v in fmt.encode(torch.randn(c["n"], c["k"], generator=g), device).items()}
    x = torch.randn(c["m"], c["k"], generator=g).to(fmt.compute_dtype)
    bias = torch.randn(c["n"], generator=g).to(fmt.compute_dtype) if c["bias"] else None
    ref = x.double() @ fmt.dense({k: v.cpu() for k, v in parts.items()}, torch.float32).double().T
    if bias is not None:
        ref += bias.double()
    return x.to(device), fmt, parts, None if bias is None else bias.to(device), ref


def check(c, y, ref):
    rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < TOL[c["x"]], rel


_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import test_int4_gemv as t
    from graphrt.weights.formats.int4_gemv import int4_gemv
    out = {{}}
    for c in json.load(sys.stdin):
        x, fmt, parts, bias, ref = t.make(c, "cpu")
        try:
            t.check(c, int4_gemv(x, parts["w"], parts["scales_and_zeros"], bias, split_k=c["split"]), ref)
            out[t.case_id(c)] = "ok"
        except Exception as e:
            out[t.case_id(c)] = f"{{type(e).__name__}}: {{e}}"
    print("RESULTS " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed: the int4 GEMV cannot run, not even in Triton's interpreter")
    return run_interpreter(_SCRIPT, CASES, timeout=600)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreter_matches_dense(interpreted, case):
    assert interpreted[case_id(case)] == "ok"


def test_blocked_layout_round_trip_and_nibble_positions():
    q = torch.randint(0, 16, (24, 320), dtype=torch.int32)
    w = pack_blocked(q)
    assert w.shape == (24, 160) and w.dtype == torch.uint8
    assert torch.equal(unpack_blocked(w), q)
    # byte j of block b: column 64 b + j low, 64 b + 32 + j high
    assert int(w[5, 32 + 7]) == int(q[5, 64 + 7]) | int(q[5, 64 + 32 + 7]) << 4
    fmt = Int4(torch.float32, 64, "blocked")
    assert [p.shape for p in fmt.parts((24, 320))] == [(24, 160), (5, 24, 2)]
    with pytest.raises(ValueError, match="in_features % 64"):
        fmt.parts((24, 96))
    # on the CPU the blocked format dequantizes: linear == x @ dense.T exactly as F.linear computes it
    parts = fmt.encode(torch.randn(24, 320), torch.device("cpu"))
    x = torch.randn(2, 320)
    assert torch.equal(fmt.linear(x, parts, None), torch.nn.functional.linear(x, fmt.dense(parts, torch.float32)))


def test_plan_whole_chunks():
    for m in (1, 4):
        for n, k in ((14336, 4096), (4096, 14336), (1024, 4096), (128256, 4096), (40, 576), (16, 64)):
            use_dot, bn, bk, _, split, k_split = _plan(m, n, k, 132, None, None)
            assert k % bk == 0 and k_split % bk == 0 and (split - 1) * k_split < k <= split * k_split


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernel_and_graph(case):
    from graphrt.weights.formats.int4_gemv import int4_gemv
    x, fmt, parts, bias, ref = make(case, torch.device("cuda"))
    y = int4_gemv(x, parts["w"], parts["scales_and_zeros"], bias, split_k=case["split"])
    check(case, y, ref)
    from graphrt.weights.formats import int4_cuda
    w, sz = parts["w"], parts["scales_and_zeros"]
    chosen = int4_cuda.int4_gemv_row if x.shape[0] <= int4_cuda.MAX_INPUTS and int4_cuda.supports(x, w, sz) \
        else int4_gemv
    assert torch.equal(fmt.linear(x, parts, bias), chosen(x, w, sz, bias))
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fmt.linear(static_x, parts, bias)
    static_x.copy_(x * 2)
    g.replay()
    assert torch.equal(out, fmt.linear(x * 2, parts, bias))


ROW_CASES = [dict(x=x, m=1, k=k, n=n, g=g, split=None, bias=bias)
             for x, k, n, g, bias in [("bfloat16", 4096, 1024, 128, False), ("bfloat16", 14336, 512, 128, True),
                                      ("float32", 576, 64, 32, False), ("float16", 4096, 256, 64, True),
                                      ("bfloat16", 2048, 96, 256, False), ("float32", 64, 8, 32, True)]]
ROW_CASES += [dict(x=x, m=m, k=k, n=n, g=g, split=None, bias=bias)
              for x, m, k, n, g, bias in [("bfloat16", 2, 4096, 1024, 128, False), ("float32", 2, 576, 64, 32, True),
                                         ("bfloat16", 3, 14336, 512, 128, True), ("float16", 4, 4096, 256, 64, False)]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROW_CASES + [c for c in CASES if c["m"] == 1], ids=case_id)
def test_nvrtc_row_kernel(case):
    """The NVRTC kernel (int4_cuda.py) for 1..4 rows against float64 x @ dense(parts, float32).T, in a CUDA graph
    too, and chosen by Int4("blocked").linear; each row of a multi-row call equals that row alone, bitwise."""
    from graphrt.weights.formats import int4_cuda
    if not int4_cuda.available(0):
        pytest.fail("the NVRTC int4 kernel does not compile on this GPU (torch.cuda._compile_kernel / NVRTC)")
    x, fmt, parts, bias, ref = make(case, torch.device("cuda"))
    w, sz = parts["w"], parts["scales_and_zeros"]
    assert int4_cuda.supports(x, w, sz)
    y = int4_cuda.int4_gemv_row(x, w, sz, bias)
    check(case, y, ref)
    assert torch.equal(fmt.linear(x, parts, bias), y)
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = int4_cuda.int4_gemv_row(static_x, w, sz, bias)
    static_x.copy_(x * 2)
    g.replay()
    assert torch.equal(out, int4_cuda.int4_gemv_row(x * 2, w, sz, bias))
    for i in range(x.shape[0]):
        assert torch.equal(y[i], int4_cuda.int4_gemv_row(x[i:i + 1], w, sz, bias)[0])
    assert not int4_cuda.supports(torch.cat([x] * 5)[:5], w, sz)   # 5 rows: the Triton kernel
    # rows that are not a multiple of 8, or a misaligned view: the Triton kernel serves instead
    assert not int4_cuda.supports(x, w[:-1], sz[:, :-1])
