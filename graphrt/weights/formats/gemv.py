"""Weight-only GEMV for decode rows: int8 / float8_e4m3fn weights with one float32 scale per output channel.

    y[m, n] = scale[n] * sum_k x[m, k] * float(w[n, k])   (+ bias[n])

x [..., K] in bfloat16, float16 or float32; w [N, K] int8 or float8_e4m3fn (unit stride along K); scale [N] float32;
y [..., N] in x's dtype. Products and sums are float32 (every int8 and e4m3 value is exact in bfloat16, float16 and
float32, so the products are exact). Each weight byte is read once from global memory: the kernel is memory-bound
and moves half the bytes of a bfloat16 GEMV.

Kernel (Triton, `_gemv_kernel`): a grid of (cdiv(N, BLOCK_N), SPLIT) programs. Program (i, s) owns rows
[i*BLOCK_N, (i+1)*BLOCK_N) of w and columns [s*K_SPLIT, (s+1)*K_SPLIT) (K_SPLIT a multiple of BLOCK_K). It walks
its whole BLOCK_K chunks without masks (rows past N re-read row N - 1 and are never stored), then the partial last
chunk of K, if any, with masks (other = 0). Weights are converted to float32 exactly: e4m3 by Triton's conversion;
int8 through its uint8 bits, float32_bits(0x4B000080 ^ byte) - (2**23 + 128), which uses integer and FP32 adds
instead of the quarter-rate I2F conversion (the bottleneck at HBM speed). Then:
  - M == 1 ("row" path): acc [BLOCK_N, BLOCK_K] float32 += w * x[None, :] (one FMA per weight, no reduction in
    the loop); after the loop, one row sum.
  - M >= 2 ("dot" path): tl.dot(w [BLOCK_N, BLOCK_K] in x's dtype (exact), x^T [BLOCK_K, BLOCK_M]) into a float32
    accumulator [BLOCK_N, BLOCK_M], BLOCK_M = 16 (rows m >= M re-read row M - 1 and are not stored). The weights
    are the MMA's wide operand ("swap AB": wgmma m64n16 on sm90). float32 activations use input_precision="ieee"
    (no TF32); e4m3 goes to bfloat16 through float32 (Triton 3.6's direct e4m3 -> bf16 emits an sm90-only
    instruction on sm89, and is a slow F2F on sm90).
Then it multiplies by scale[n]. With SPLIT == 1 it adds the bias and stores y in x's dtype (one rounding); with
SPLIT > 1 it stores float32 partials [SPLIT, M, N] and `_reduce_kernel` sums them in order (s = 0, 1, ...), adds
the bias and casts. No atomics: results are deterministic, and graph replay equals the eager call bit for bit.

Split-K is used when the N blocks alone are too few for the GPU: fewer than 2 per SM. SPLIT is then chosen for
about 4 programs per SM, keeping at least 2 BLOCK_K chunks per split and at most 16 splits. Block sizes are fixed
by M and the dtype (no autotuning, which could not run inside CUDA graph capture); see `_plan`.

Everything is capturable: shapes decide the plan (the SM count is read once per device and cached), no host
syncs, no CPU tensors; the only allocations are the output and, with split-K, the fixed-shape partials buffer.
Triton compiles a kernel variant on its first call with a new plan; call once eagerly before capturing (the
runtime's warm-up step does).

Triton is imported lazily: graphrt imports without it, and `gemv_available` is False then.
"""
from __future__ import annotations

import functools
import os

import torch

from .base import GEMV_MAX_ROWS

_TRITON = None          # the (triton, triton.language) modules once imported; False if the import failed
_KERNELS = None         # (_gemv_kernel, _reduce_kernel), built on first use

# Plans: (BLOCK_N, BLOCK_K, num_warps) for the two paths. Tunable; all powers of two (BLOCK_K >= 16, BLOCK_N >= 16).
ROW_BLOCKS = (16, 512, 4)       # M == 1: 16 rows x 512 bytes (int8/fp8) = 8 KiB of weights per chunk
DOT_BLOCKS = (64, 128, 4)       # M >= 2: 64 rows x 128 bytes = 8 KiB per chunk; MMA tile 64 x 16
DOT_M = 16                      # the smallest row block of the dot path (tl.dot needs >= 16)
MAX_ROWS = GEMV_MAX_ROWS         # rows this kernel takes (more rows: the dot path's BLOCK_M grows to fit)
MAX_SPLIT = 16
DEFAULT_SMS = 132               # SM count assumed for non-CUDA tensors (the Triton interpreter)
NUM_STAGES = 3

_WEIGHT_DTYPES = (torch.int8, torch.float8_e4m3fn)
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton():
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
            _TRITON = (triton, tl)
        except Exception:       # ImportError, or a broken install (e.g. a mismatched CUDA toolchain)
            _TRITON = False
    return _TRITON


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gemv_available(x: torch.Tensor) -> bool:
    """True where `weight_only_gemv` runs compiled: x on a CUDA device and Triton importable."""
    return x.device.type == "cuda" and bool(_triton())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _plan(m: int, n: int, k: int, num_sms: int, split_k: int | None = None, blocks: tuple | None = None):
    """(use_dot, BLOCK_N, BLOCK_K, num_warps, SPLIT, K_SPLIT) for an [m, k] x [n, k]^T product."""
    use_dot = m >= 2
    block_n, block_k, warps = blocks or (DOT_BLOCKS if use_dot else ROW_BLOCKS)
    return (use_dot, block_n, block_k, warps, *split_plan(n, k, block_n, block_k, num_sms, split_k))


def split_plan(n: int, k: int, block_n: int, block_k: int, num_sms: int, split_k: int | None) -> tuple[int, int]:
    """(SPLIT, K_SPLIT): split K when the N blocks alone are fewer than 2 per SM (about 4 programs per SM, at
    least 2 BLOCK_K chunks per split, at most MAX_SPLIT); `split_k` overrides. K_SPLIT is a multiple of BLOCK_K."""
    chunks = -(-k // block_k)
    n_blocks = -(-n // block_n)
    if split_k is None:
        split_k = 1
        if n_blocks < 2 * num_sms:
            split_k = min(-(-4 * num_sms // n_blocks), chunks // 2, MAX_SPLIT)
    split_k = max(1, min(int(split_k), chunks))
    k_split = -(-chunks // split_k) * block_k      # K per split, a multiple of BLOCK_K
    return -(-k // k_split), k_split               # no empty splits


def _build():
    triton, tl = _triton()

    @triton.jit
    def _to_f32(w, W_INT8: tl.constexpr):
        if W_INT8:
            # w holds the int8 bytes as uint8. Put (q + 128) = (byte ^ 0x80) into the low mantissa bits of
            # 2**23 and subtract 2**23 + 128: exact, and it keeps the conversion off the slow I2F pipe.
            return (w.to(tl.uint32) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return w.to(tl.float32)

    @triton.jit
    def _row_chunk(acc, w_rows, x_ptr, kk, k_end, stride_xk, MASKED: tl.constexpr, W_INT8: tl.constexpr):
        if MASKED:
            k_mask = kk < k_end
            w = tl.load(w_rows + kk[None, :], mask=k_mask[None, :], other=0.0)
            xv = tl.load(x_ptr + kk * stride_xk, mask=k_mask, other=0.0)
        else:
            w = tl.load(w_rows + kk[None, :])
            xv = tl.load(x_ptr + kk * stride_xk)
        return acc + _to_f32(w, W_INT8) * xv.to(tl.float32)[None, :]

    @triton.jit
    def _dot_chunk(acc, w_rows, x_cols, kk, k_end, stride_xk, MASKED: tl.constexpr, W_INT8: tl.constexpr,
                   DOT_F32: tl.constexpr):
        if MASKED:
            k_mask = kk < k_end
            w = tl.load(w_rows + kk[None, :], mask=k_mask[None, :], other=0.0)
            xt = tl.load(x_cols + kk[:, None] * stride_xk, mask=k_mask[:, None], other=0.0)
        else:
            w = tl.load(w_rows + kk[None, :])
            xt = tl.load(x_cols + kk[:, None] * stride_xk)
        if DOT_F32:
            return tl.dot(_to_f32(w, W_INT8), xt.to(tl.float32), acc, input_precision="ieee")
        elif W_INT8 or xt.dtype == tl.bfloat16:
            # e4m3 -> bfloat16 goes through float32 (exact): Triton 3.6's direct conversion emits an sm90-only
            # instruction on sm89, and on sm90 it is a slow F2F per element.
            return tl.dot(_to_f32(w, W_INT8).to(xt.dtype), xt, acc)
        else:
            return tl.dot(w.to(xt.dtype), xt, acc)

    # Triton resolves the names a kernel calls through the module's globals, not through closures.
    globals().update(_to_f32=_to_f32, _row_chunk=_row_chunk, _dot_chunk=_dot_chunk)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
                     M, N, K, K_SPLIT,
                     stride_xm, stride_xk, stride_wn, stride_om, stride_ps,
                     W_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, USE_DOT: tl.constexpr,
                     DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        # Rows past N (last block) re-read row N - 1 and are not stored: the main loop needs no masks.
        # int64 row offsets: N * K may pass 2**31 (large vocabularies).
        w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn
        k_start = pid_s * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        k_full = k_start + ((k_end - k_start) // BLOCK_K) * BLOCK_K      # end of the whole BLOCK_K chunks
        scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0)
        if USE_DOT:
            rm = tl.arange(0, BLOCK_M)
            m_mask = rm < M
            x_cols = x_ptr + tl.minimum(rm, M - 1)[None, :] * stride_xm      # padded rows re-read row M - 1
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(k_start, k_full, BLOCK_K):
                acc = _dot_chunk(acc, w_rows, x_cols, k0 + rk, k_end, stride_xk, False, W_INT8, DOT_F32)
            if k_full < k_end:
                acc = _dot_chunk(acc, w_rows, x_cols, k_full + rk, k_end, stride_xk, True, W_INT8, DOT_F32)
            acc = acc * scale[:, None]
            out_mask = n_mask[:, None] & m_mask[None, :]
            out_offs = rm[None, :] * stride_om + rn[:, None]
            if PARTIAL:
                tl.store(out_ptr + pid_s * stride_ps + out_offs, acc, mask=out_mask)
            else:
                if HAS_BIAS:
                    acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
                tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # Elementwise float32 partial sums [BLOCK_N, BLOCK_K] (one FMA per weight), reduced once at the end.
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(k_start, k_full, BLOCK_K):
                acc2 = _row_chunk(acc2, w_rows, x_ptr, k0 + rk, k_end, stride_xk, False, W_INT8)
            if k_full < k_end:
                acc2 = _row_chunk(acc2, w_rows, x_ptr, k_full + rk, k_end, stride_xk, True, W_INT8)
            acc = tl.sum(acc2, axis=1) * scale
            if PARTIAL:
                tl.store(out_ptr + pid_s * stride_ps + rn, acc, mask=n_mask)
            else:
                if HAS_BIAS:
                    acc = acc + tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _reduce_kernel(part_ptr, bias_ptr, out_ptr, TOTAL, N, stride_ps,
                       SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < TOTAL
        acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT):
            acc += tl.load(part_ptr + s * stride_ps + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return _gemv_kernel, _reduce_kernel


def weight_only_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                     *, split_k: int | None = None, blocks: tuple[int, int, int] | None = None,
                     stages: int | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) @ (w [N, K] int8|e4m3 * scale [N, 1]).T (+ bias [N]) -> [..., N] in
    x's dtype. `split_k`, `blocks` (BLOCK_N, BLOCK_K, num_warps) and `stages` override the plan (tests and
    tools/gemv_sweep.py); None picks them from the shapes and the SM count."""
    global _KERNELS
    if not _triton():
        raise RuntimeError("weight_only_gemv needs Triton (pip install triton)")
    if w.dim() != 2 or w.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"w must be a 2-D int8 or float8_e4m3fn tensor, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, w has {k} columns")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if scale.dtype != torch.float32 or scale.numel() != n:
        raise ValueError(f"scale must be float32 with {n} values, got {scale.dtype} {list(scale.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"weight_only_gemv takes at most {MAX_ROWS} rows, got {m}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.zero_()
        return out + bias if bias is not None else out
    if w.stride(1) != 1:
        w = w.contiguous()
    scale = scale.reshape(n)
    if not scale.is_contiguous():
        scale = scale.contiguous()
    if bias is not None:
        bias = bias.reshape(n)
        if not bias.is_contiguous():
            bias = bias.contiguous()
    if x.device.type == "cuda":
        index = _device_index(x.device)
        if w.dtype == torch.float8_e4m3fn and _capability(index) < (8, 9):
            raise RuntimeError("float8_e4m3fn weights need a GPU of compute capability 8.9 or newer in Triton")
        num_sms = _num_sms(index)
    else:
        num_sms = DEFAULT_SMS
    if _KERNELS is None:
        _KERNELS = _build()
    gemv_kernel = _KERNELS[0]
    triton = _triton()[0]
    use_dot, block_n, block_k, warps, split, k_split = _plan(m, n, k, num_sms, split_k, blocks)
    out2 = out.view(m, n)
    # bf16 tl.dot is wrong in the Triton interpreter (3.9: it multiplies the raw uint16 bits), so there the dot
    # path runs in float32, which gives the same exact products and float32 sums.
    dot_f32 = x.dtype == torch.float32 or (_interpreting() and x.dtype == torch.bfloat16)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out2
    grid = (-(-n // block_n), split)
    w_int8 = w.dtype == torch.int8
    gemv_kernel[grid](
        x2, w.view(torch.uint8) if w_int8 else w, scale, bias if bias is not None else scale, part,
        m, n, k, k_split,
        x2.stride(0), x2.stride(1), w.stride(0), part.stride(-2),
        part.stride(0) if split > 1 else 0,
        W_INT8=w_int8, HAS_BIAS=bias is not None, PARTIAL=split > 1, USE_DOT=use_dot, DOT_F32=dot_f32,
        BLOCK_M=max(DOT_M, triton.next_power_of_2(m)) if use_dot else 1, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages or NUM_STAGES)
    if split > 1:
        reduce_partials(part, bias, out2)
    return out


def reduce_partials(part: torch.Tensor, bias: torch.Tensor | None, out2: torch.Tensor) -> None:
    """out2 [M, N] = sum over s (in order) of part [SPLIT, M, N] float32 (+ bias [N]), cast to out2's dtype."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build()
    split, m, n = part.shape
    total, block = m * n, 1024
    _KERNELS[1][(-(-total // block),)](
        part, bias if bias is not None else part, out2, total, n, part.stride(0),
        SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
