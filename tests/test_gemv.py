"""The weight-only GEMV (graphrt/weights/formats/gemv.py): int8 / float8_e4m3fn weights, per-channel scales.

Without a GPU the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, in a subprocess:
the variable must be set before Triton is imported, and this process may import Triton for real. Those tests skip
when Triton is not installed. The GPU tests (marked `gpu`) run the compiled kernel, capture it in a CUDA graph,
check it through Int8/FP8.linear and time it against a bfloat16 F.linear.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphrt.weights.formats.gemv import MAX_ROWS, _plan, gemv_available, weight_only_gemv

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton): the "
                                  "GEMV kernel cannot run, not even in Triton's CPU interpreter")

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}


# --- cases, shared by the interpreter subprocess and the GPU tests ---------------------------------------------

def _cases():
    cases = []
    for w in ("int8", "fp8"):
        for x in ("float32", "bfloat16", "float16"):
            for m in (1, 3, 16):
                for k in (64, 576, 1000):
                    for n in (32, 1536):
                        cases.append(dict(w=w, x=x, m=m, k=k, n=n))
    # forced split-K (with and without bias, both kernel paths), batch dims, a strided x, every byte value
    for w in ("int8", "fp8"):
        for m in (1, 2, 5):
            for split in (2, 3, 7):
                cases.append(dict(w=w, x="float32", m=m, k=1000, n=96, split=split, bias=split != 2))
                cases.append(dict(w=w, x="bfloat16", m=m, k=576, n=40, split=split, bias=True))
        cases.append(dict(w=w, x="bfloat16", m=1, k=600, n=33, bias=True))
        cases.append(dict(w=w, x="float32", m=6, k=64, n=16, batch=(2, 3)))
        cases.append(dict(w=w, x="float32", m=1, k=64, n=16, batch=(1, 1)))
        cases.append(dict(w=w, x="float32", m=4, k=300, n=70, strided=True))
        cases.append(dict(w=w, x="float32", m=1, k=300, n=70, strided=True))
        for m in (1, 7):
            cases.append(dict(w=w, x="float32", m=m, k=512, n=64, exact=True))
            cases.append(dict(w=w, x="float32", m=m, k=520, n=256, exact=True, split=3))
    return cases


CASES = _cases()


def _case_id(c):
    fmt = lambda v: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v      # JSON turns tuples into lists
    extra = "".join(f"-{k}{fmt(v)}" for k, v in c.items() if k not in ("w", "x", "m", "k", "n"))
    return f"{c['w']}-{c['x']}-M{c['m']}-K{c['k']}-N{c['n']}{extra}"


def _make(c, device):
    """(x, w, scale, bias, reference in float64) for a case. `exact` cases have float32 results equal to the
    reference: int8 weights take all 256 byte values, x small integers times powers of two and the scales powers
    of two, so every float32 sum is exact; e4m3 weights have one nonzero per row, each of the 254 finite codes
    (subnormals included) in turn, at a random column."""
    g = torch.Generator().manual_seed(zlib.crc32(_case_id(c).encode()))
    m, k, n = c["m"], c["k"], c["n"]
    xdt = getattr(torch, c["x"])
    if c.get("exact"):
        x = torch.randint(-3, 4, (m, k), generator=g).float() * 2.0 ** torch.randint(-2, 3, (m, k), generator=g)
        scale = 2.0 ** torch.randint(-8, 2, (n,), generator=g).float()
        if c["w"] == "int8":
            codes = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
            w = codes[torch.randint(0, 256, (n, k), generator=g)]
            w[0, :min(k, 256)] = codes[:min(k, 256)]
        else:
            codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn)
            codes = codes[~codes.float().isnan()]
            assert len(codes) == 254
            w = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
            w[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = codes[torch.arange(n) % len(codes)]
    else:
        if c["w"] == "int8":
            w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
        else:
            w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        x = torch.randn(m, k, generator=g)
        scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    x = x.to(xdt)
    if c.get("strided"):
        wide = torch.zeros(m, 2 * k, dtype=xdt)
        wide[:, ::2] = x
        x = wide[:, ::2]
        assert x.stride(1) == 2
    if "batch" in c:
        x = x.reshape(*c["batch"], k)
    bias = torch.randn(n, generator=g).to(xdt) if c.get("bias") else None
    ref = x.double().reshape(-1, k) @ (w.double() * scale.double()[:, None]).T
    if bias is not None:
        ref = ref + bias.double()
    ref = ref.reshape(*x.shape[:-1], n)
    to = lambda t: None if t is None else t.to(device)
    return to(x), to(w), to(scale), to(bias), ref


def _check(c, y, ref, x):
    assert y.dtype == x.dtype and y.shape == ref.shape and y.device == x.device
    y = y.double().cpu()
    if c.get("exact"):
        assert torch.equal(y, ref), (y - ref).abs().max()
    else:
        rel = ((y - ref).norm() / ref.norm()).item()
        assert rel < TOL[c["x"]], rel


# --- the interpreter -------------------------------------------------------------------------------------------

INTERPRETER_SETUP = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import triton
    from triton.runtime import interpreter
    # Triton < 3.9's interpreter keeps scalars as 1-element arrays and int()s them for loop bounds, which
    # numpy >= 2.4 refuses; convert them the way 3.9 does.
    if hasattr(interpreter, "_patch_lang_tensor"):
        _patch = interpreter._patch_lang_tensor
        def _patch_lang_tensor(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
        interpreter._patch_lang_tensor = _patch_lang_tensor
    sys.path.insert(0, os.path.join({root!r}, "tests"))
""")
_INTERPRETER_SCRIPT = INTERPRETER_SETUP + textwrap.dedent("""
    import torch
    import test_gemv as t
    from graphrt.weights.formats.gemv import weight_only_gemv
    out = {{"triton": triton.__version__}}
    for c in json.load(sys.stdin):
        x, w, scale, bias, ref = t._make(c, "cpu")
        try:
            y = weight_only_gemv(x, w, scale, bias, split_k=c.get("split"))
            t._check(c, y, ref, x)
            out[t._case_id(c)] = "ok"
        except Exception as e:
            out[t._case_id(c)] = f"{{type(e).__name__}}: {{e}}"
    print("RESULTS " + json.dumps(out))
""")


def run_interpreter(script: str, payload=None, timeout: int = 900):
    """Runs `script` (INTERPRETER_SETUP + a body printing "RESULTS <json>") in a subprocess with Triton's
    interpreter on; returns the decoded JSON. The tests directory is importable there."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT))],
                          input=None if payload is None else json.dumps(payload), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def interpreted():
    """Runs every case in one interpreter subprocess; returns {case id: "ok" or the failure}."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install triton): the GEMV kernel cannot run in its interpreter")
    results = run_interpreter(_INTERPRETER_SCRIPT, CASES)
    print(f"Triton {results['triton']} interpreter")
    return results


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpreter_matches_reference(interpreted, case):
    assert interpreted[_case_id(case)] == "ok"


# --- host-side behaviour (no Triton needed) --------------------------------------------------------------------

def test_plan_splits_k_into_whole_chunks():
    for m in (1, 2, 16):
        for n, k in ((14336, 4096), (4096, 14336), (1024, 4096), (128256, 4096), (32, 64), (1536, 1000)):
            for sms in (132, 108, 1):
                use_dot, bn, bk, warps, split, k_split = _plan(m, n, k, sms)
                assert use_dot == (m >= 2)
                assert k_split % bk == 0 and 1 <= split and (split - 1) * k_split < k <= split * k_split
                if -(-n // bn) >= 2 * sms:
                    assert split == 1
    # the Llama-3.1-8B decode shapes on an H100 (132 SMs)
    assert _plan(1, 14336, 4096, 132)[4] == 1
    assert _plan(1, 4096, 14336, 132)[4] > 1
    assert _plan(1, 100, 1000, 132, split_k=64)[4] == 2          # clamped to the number of BLOCK_K chunks


def test_gemv_available_and_lazy_import():
    assert not gemv_available(torch.zeros(2))
    code = ("import sys, torch; by_torch = 'triton' in sys.modules; "
            "import graphrt, graphrt.weights.formats.int8, graphrt.weights.formats.fp8; "
            "assert by_torch or 'triton' not in sys.modules, 'graphrt imported triton'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@needs_triton
def test_rejects_bad_inputs():
    w = torch.zeros(8, 32, dtype=torch.int8)
    s = torch.ones(8)
    with pytest.raises(ValueError, match="at most"):
        weight_only_gemv(torch.zeros(MAX_ROWS + 1, 32), w, s)
    with pytest.raises(ValueError, match="columns"):
        weight_only_gemv(torch.zeros(1, 31), w, s)
    with pytest.raises(ValueError, match="int8 or float8"):
        weight_only_gemv(torch.zeros(1, 32), w.float(), s)
    with pytest.raises(ValueError, match="scale"):
        weight_only_gemv(torch.zeros(1, 32), w, s.half())
    assert weight_only_gemv(torch.zeros(0, 32), w, s).shape == (0, 8)


# --- the GPU ---------------------------------------------------------------------------------------------------

def _gpu_ready(c=None):
    if not gemv_available(torch.zeros(1, device="cuda")):
        pytest.skip("triton is not importable on this GPU machine")
    if c is not None and c["w"] == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8_e4m3fn in Triton needs compute capability 8.9+")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gpu_matches_reference(case):
    _gpu_ready(case)
    x, w, scale, bias, ref = _make(case, "cuda")
    y = weight_only_gemv(x, w, scale, bias, split_k=case.get("split"))
    _check(case, y, ref, x)
    assert torch.equal(weight_only_gemv(x, w, scale, bias, split_k=case.get("split")), y)   # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 14336), (1, 14336, 4096), (4, 1024, 4096), (16, 4096, 1000), (1, 128256, 512)])
def test_gpu_large_shapes_and_formats(w_dtype, m, n, k):
    """Decode shapes (split-K and not, the int64 row offsets of a vocabulary-sized matrix) through Int8/FP8.linear:
    the formats take the GEMV up to GEMV_MAX_ROWS rows and agree with their dequantized matrix."""
    from graphrt.weights.formats import FP8, Int8
    from graphrt.weights.formats.base import GEMV_MAX_ROWS
    case = dict(w=w_dtype, x="bfloat16", m=m, k=k, n=n)
    _gpu_ready(case)
    fmt = Int8(torch.bfloat16) if w_dtype == "int8" else FP8(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    parts = {name: t.cuda() for name, t in fmt.encode(torch.randn(n, k, generator=g) * 0.02, "cuda").items()}
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    y = fmt.linear(x, parts, bias)
    assert m <= GEMV_MAX_ROWS and torch.equal(y, weight_only_gemv(x, parts["w"], parts["scale"], bias))
    ref = x.double() @ fmt.dense(parts, torch.float64).T + bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    many = torch.randn(GEMV_MAX_ROWS + 1, k, generator=g).to(torch.bfloat16).cuda()     # prefill path
    ref = many.double() @ fmt.dense(parts, torch.float64).T + bias.double()
    got = fmt.linear(many, parts, bias)
    assert ((got.double() - ref).norm() / ref.norm()).item() < (2e-2 if w_dtype == "int8" else 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_weights_past_2_gib(m):
    """A matrix of more than 2**31 bytes: the row offsets of the kernel must not overflow int32."""
    _gpu_ready()
    n, k = 262_400, 8192                     # 2.15e9 int8 weights
    assert n * k > 2**31
    w = torch.zeros(n, k, dtype=torch.int8, device="cuda")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    g = torch.Generator().manual_seed(m)
    w[rows] = torch.randint(-127, 128, (len(rows), k), generator=g).to(torch.int8).cuda()
    scale = torch.full((n,), 0.5, device="cuda")
    x = torch.randint(-3, 4, (m, k), generator=g).float().cuda()
    y = weight_only_gemv(x, w, scale)
    want = torch.zeros(m, n, dtype=torch.float64, device="cuda")
    want[:, rows] = x.double() @ w[rows].double().T * 0.5
    assert torch.equal(y.double(), want)
    del w


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("m,n,k", [(1, 4096, 14336), (1, 14336, 4096), (3, 1000, 576), (16, 4096, 4096)])
def test_gpu_cuda_graph_replay_equals_eager(w_dtype, m, n, k):
    case = dict(w=w_dtype, x="bfloat16", m=m, k=k, n=n, bias=True)
    _gpu_ready(case)
    x, w, scale, bias, _ = _make(case, "cuda")
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                       # warm-up (compiles the kernel) outside capture
        weight_only_gemv(static_x, w, scale, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = weight_only_gemv(static_x, w, scale, bias)
    for seed in range(3):
        new_x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.dtype).cuda()
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, weight_only_gemv(new_x, w, scale, bias))


def _time_graph(fn, calls, reps=20):
    """Microseconds per call of `fn(i)` for i in range(calls), captured in one CUDA graph (no launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * calls)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_gpu_timing_vs_bf16(n, k):
    """Prints the time of one M=1 product (several weight copies in turn, more bytes than the L2 holds); asserts
    only correctness."""
    _gpu_ready()
    copies = 4
    g = torch.Generator().manual_seed(0)
    dense = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).cuda() for _ in range(copies)]
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).cuda()
    results = {"bf16 F.linear": _time_graph(lambda i: F.linear(x, dense[i % copies]), 4 * copies)}
    formats = [("int8", torch.int8)]
    if torch.cuda.get_device_capability() >= (8, 9):
        formats.append(("fp8", torch.float8_e4m3fn))
    for name, dtype in formats:
        qmax = 127.0 if dtype == torch.int8 else 448.0
        quant = []
        for d in dense:
            scale = d.float().abs().amax(1) / qmax
            q = d.float() / scale[:, None]
            q = q.round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else q.to(dtype)
            quant.append((q, scale))
        results[f"{name} gemv"] = _time_graph(lambda i: weight_only_gemv(x, *quant[i % copies], None), 4 * copies)
        ref = F.linear(x.float(), quant[0][0].float() * quant[0][1][:, None])
        got = weight_only_gemv(x, *quant[0], None)
        assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2
    plan = _plan(1, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    print(f"\n[N={n}, K={k}] M=1 on {torch.cuda.get_device_name()}, plan {plan}")
    for name, us in results.items():
        nbytes = n * k * (2 if name.startswith("bf16") else 1)
        print(f"  {name:14s} {us:8.2f} us  {nbytes / us / 1e3:7.1f} GB/s")


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("GEMV_SWEEP"), reason="block-size sweep: set GEMV_SWEEP=1 (prints timings)")
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_gpu_block_sweep(monkeypatch, n, k):
    """Times the kernel under other block sizes (BLOCK_N, BLOCK_K, num_warps) and pipeline depths, to tune
    ROW_BLOCKS / DOT_BLOCKS / NUM_STAGES in gemv.py. `GEMV_SWEEP=1 pytest -s -k sweep`."""
    from graphrt.weights.formats import gemv
    _gpu_ready()
    copies = 4
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randint(-127, 128, (n, k), generator=g).to(torch.int8).cuda(), torch.rand(n, generator=g).cuda())
               for _ in range(copies)]
    if torch.cuda.get_device_capability() >= (8, 9):
        weights8 = [(w.float().mul(3).to(torch.float8_e4m3fn), s) for w, s in weights]
    else:
        weights8 = []
    dense = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).cuda() for _ in range(copies)]
    print(f"\n[N={n}, K={k}] {torch.cuda.get_device_name()}")
    for m in (1, 4, 16):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).cuda()
        bf16 = _time_graph(lambda i: F.linear(x, dense[i % copies]), 4 * copies)
        print(f"  M={m:2d} bf16 F.linear {bf16:8.2f} us")
        configs = ([(16, 512, 4), (32, 256, 4), (16, 256, 4), (8, 512, 4), (16, 512, 8), (32, 512, 8), (16, 1024, 8)]
                   if m == 1 else [(64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (64, 64, 4), (32, 128, 4)])
        for blocks in configs:
            for stages in (2, 3):
                monkeypatch.setattr(gemv, "ROW_BLOCKS" if m == 1 else "DOT_BLOCKS", blocks)
                monkeypatch.setattr(gemv, "NUM_STAGES", stages)
                for split in (None, 1):
                    line = f"  M={m:2d} {str(blocks):15s} stages={stages} split={'auto' if split is None else 1}:"
                    for name, ws in (("int8", weights), ("fp8", weights8)):
                        if ws:
                            us = _time_graph(lambda i: weight_only_gemv(x, *ws[i % copies], None, split_k=split),
                                             4 * copies)
                            line += f"  {name} {us:8.2f} us"
                    print(line)
