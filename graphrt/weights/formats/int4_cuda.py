"""Int4 weight-only GEMV for a few decode rows (M = 1..4) over the "blocked" layout, as a CUDA kernel compiled at run
time with NVRTC (`torch.cuda._compile_kernel`: no compiler, no build step, no extension to install).

Why a second kernel beside int4_gemv.py's Triton one: at M == 1 a 4-bit GEMV issues about as many instructions
per weight byte as the GPU can retire, so the instruction count per weight decides whether it reaches HBM speed.
Here a weight costs two: a shift-and-mask per 4 codes puts each code q (0..15) at bits 3..6 of its byte, then one
byte permute per weight writes that byte under 0x3F, which is the float 0.5 + q / 32 exactly, and one FMA
accumulates x times it. The group's scale s and zero z are applied once per 16 weights:

    sum_k x[k] (q[n, k] - 8) = 32 * sum_k x[k] (0.5 + q[n, k] / 32) - 24 * sum_k x[k]
    y[n] = sum over 16-column runs c of  s[n, g(c)] * (that sum over c)  +  z[n, g(c)] * sum_{k in c} x[k]

in float32 (the value of x @ Int4.dense(parts, float32).T up to float32 rounding: the rearrangement costs a few
ulps of the 16-term sums, well inside the tests' 1e-5 for float32). Measured on the H100 (tools/int4_row_sweep.py,
docs/results/2026-11-26-h100-int4-row-sweep-b09dc0d.json): 48.4 us at 28672 x 8192 (2.58 TB/s) with 4 rows x 64
threads per block, against tinygemm's 60.8 and the Triton kernel's 109.7.

Work split: a block of T threads (T = 32..MAX_THREADS) owns ROWS consecutive rows and strides along K in
16-byte chunks (32 weights of one 64-column packing block): thread t reads chunks t, t + T, ... of every row, so a warp's loads
of 512 contiguous bytes per row are in flight together and x is loaded once (16-byte loads) for all ROWS rows.
With M input rows (a batch of up to 4, a speculative draft's two-token step) every weight load serves all M:
the weights are read once. Rows are reduced inside the block in a fixed order (warp shuffles, then the warps in turn): deterministic, so
graph replay == eager, bitwise. Needs N % ROWS == 0, K % 64 == 0 and 16-byte aligned x, w and scales; int4.py
falls back to the Triton kernel otherwise.
"""
from __future__ import annotations

import functools
import struct

import torch

from .int4_cuda_source import SOURCE

ROWS = 4                    # rows per block (tools/int4_row_sweep.py: 4 beat 8 and 16 on the H100)
MAX_THREADS = 64            # threads per block (the sweep: 64 beat 128 at every 8B decode shape; up to 256)
MAX_INPUTS = 4              # input rows one launch takes (each weight load serves all of them)
# The prologues (NORM, SILU) are redone by every block over all K inputs, so they cost a share of the product at
# any size, while fusing saves one launch (about 1.2-1.6 us in a graph). tools/mlp_probe.py on the H100, 8B shapes
# (docs/results/2026-11-26-h100-mlp-probe-e24f76f.json): down 4096 x 14336 with silu fused 26.2 us against silu_mul
# 1.2 + product 15.9 apart; gate_up 28672 x 4096 with the norm 30.5 against 1.6 + 26.8; qkv 6144 x 4096 with the
# norm (and RoPE) 11.3 against 1.6 + 9.4. At the default model's shapes fusing saves about 1 us a product
# (tools/int4_fused_probe.py). So a prologue is fused up to this many weights (N x K):
PROLOGUE_MAX_WEIGHTS = {"silu": 8 << 20, "norm": 40 << 20}
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}



@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, device_index: int, rows: int = ROWS, inputs: int = 1, norm: bool = False,
            silu: bool = False, rope: bool = False):
    major, minor = torch.cuda.get_device_capability(device_index)
    source = SOURCE
    for name, value in (("XT", _DTYPES[dtype]), ("ROWS", rows), ("MR", inputs), ("NORM", int(norm)),
                        ("SILU", int(silu)), ("ROPE", int(rope))):
        source = source.replace(f"__{name}__", str(value))
    with torch.cuda.device(device_index):
        try:
            return torch.cuda._compile_kernel(source, "int4_gemv_row", compute_capability=f"{major}{minor}")
        except TypeError:   # an older signature: (source, name) only
            return torch.cuda._compile_kernel(source, "int4_gemv_row")


@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> bool:
    """True when the kernel compiles here (a CUDA device, NVRTC, and a torch with `torch.cuda._compile_kernel`)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        for dtype in _DTYPES:
            _kernel(dtype, device_index)
        return True
    except Exception:       # no NVRTC library, or an unsupported device: the Triton kernel serves instead
        return False


def prologue_pays(w: torch.Tensor, norm: tuple | None = None, silu: bool = False) -> bool:
    """Whether fusing the asked prologues beats running them apart, for the blocked matrix w [N, K/2]."""
    weights = w.shape[0] * w.shape[1] * 2
    return not ((silu and weights > PROLOGUE_MAX_WEIGHTS["silu"])
                or (norm is not None and weights > PROLOGUE_MAX_WEIGHTS["norm"]))


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)


def supports(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor, norm: tuple | None = None,
             silu: bool = False, rope=None) -> bool:
    """Whether `int4_gemv_row` takes this call: 1..MAX_INPUTS rows on a CUDA device, N % ROWS == 0, K % 64 == 0;
    `silu`: x holds [.., 2K]; `norm`: its weight [K] of x's dtype; `rope` (formats.base.RopeAppend): heads of D
    columns, D % 4 == 0, N == (H + 2 Hkv) D, caches of x's dtype with unit stride in their last two dims."""
    n, kh = w.shape
    k = 2 * kh * (2 if silu else 1)
    if not (x.device.type == "cuda" and x.dtype in _DTYPES and x.shape[-1] == k
            and 1 <= x.numel() // k <= MAX_INPUTS and n % ROWS == 0 and kh % 32 == 0
            and scales_and_zeros.dtype == torch.bfloat16 and _aligned(x, w, scales_and_zeros)):
        return False
    if norm is not None and not (norm[0].dtype == x.dtype and norm[0].shape == (2 * kh,) and _aligned(norm[0])):
        return False
    if rope is not None:
        d = rope.k_cache.shape[-1]
        caches_ok = all(c.dtype == x.dtype and c.stride(3) == 1 and c.stride(2) == d
                        for c in (rope.k_cache, rope.v_cache))
        if not (d % 4 == 0 and n == (rope.num_heads + 2 * rope.num_kv_heads) * d and caches_ok
                and rope.cos.dtype == x.dtype and rope.cos.shape[-1] == d):
            return False
    return available(x.device.index or 0)


def int4_gemv_row(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor,
                  bias: torch.Tensor | None = None, *, rows: int = ROWS, max_threads: int = MAX_THREADS,
                  residual: torch.Tensor | None = None, norm: tuple | None = None, silu: bool = False,
                  rope=None) -> torch.Tensor:
    """x [..., K] (1..MAX_INPUTS rows in all) times the blocked int4 matrix (w uint8 [N, K/2], scales_and_zeros bf16
    [K/G, N, 2]) transposed (+ bias [N]) (+ residual [..., N], contiguous, x's dtype: added in float32 before the
    one rounding) -> [..., N] in x's dtype. Call `supports` first. Fused around the product (int4_cuda_source.py):
    `norm` (weight [K], eps): the input is rms_norm(x) * weight; `silu`: x is [..., 2K], the input silu(x[.., :K])
    * x[.., K:]; `rope` (formats.base.RopeAppend, x [B, T, K]): returns q rotated [B, H, T, D] and writes k rotated
    and v into the caches at rope.positions [B, T]."""
    n, kh = w.shape
    k = 2 * kh
    group = k // scales_and_zeros.shape[0]
    x1 = x.reshape(-1)
    inputs = x1.numel() // (2 * k if silu else k)
    lead = x.shape[:-1]
    threads = min(max_threads, max(32, -(-(k // 32) // 32) * 32))
    kernel = _kernel(x.dtype, x.device.index or 0, rows, inputs, norm is not None, silu, rope is not None)
    b = bias.contiguous() if bias is not None else x1
    res = residual if residual is not None else x1
    nw, eps_bits = (norm[0], struct.unpack("<i", struct.pack("<f", norm[1]))[0]) if norm is not None else (x1, 0)
    assert rope is None or rows == ROWS, "the rotary pairs need ROWS rows per block"
    if rope is None:
        out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
        extra = [x1, x1, x1, x1, x1, 0, 0, 0, 0, 1, 0, 0, 4]
    else:
        B, T = lead
        d = rope.k_cache.shape[-1]
        out = torch.empty(B, rope.num_heads, T, d, dtype=x.dtype, device=x.device)
        kc, vc = rope.k_cache, rope.v_cache
        extra = [rope.cos.contiguous(), rope.sin.contiguous(), rope.positions.contiguous(), kc, vc,
                 kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1), T, rope.num_heads, rope.num_kv_heads, d]
    kernel(grid=(n // rows, 1, 1), block=(threads, 1, 1),
           args=[x1, w, scales_and_zeros, b, res, out, n, k, group, int(bias is not None), int(residual is not None),
                 nw, eps_bits, *extra])
    return out
