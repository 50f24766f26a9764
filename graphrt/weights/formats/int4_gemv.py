"""Int4 weight-only GEMV for decode rows (Triton), and the "blocked" packing it reads.

Blocked packing of int4 codes q [N, K] (0..15, K % 64 == 0): uint8 w [N, K/2]; columns go in blocks of 64,
and byte j (0..31) of block b holds column b*64 + j in its low nibble and column b*64 + 32 + j in its high
nibble. A block's two halves are then contiguous column ranges, so the kernel needs no interleave: each half
multiplies a contiguous slice of x. Scales and zeros: bfloat16 [K/G, N, 2] (the layout of int4.py's other packings) ([..., 0] scale, [..., 1] zero),
groups of G (32, 64, 128 or 256) columns along K, as Int4 (int4.py) quantizes them.

    W'[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G]          (float32, one rounding: the add)
    y[m, n]  = sum_k x[m, k] * W'[n, k]

The kernel forms W' exactly as `Int4.dense(parts, float32)` does ((q - 8) * scale is exact in float32, so an FMA
equals the multiply-then-add), in registers, and:
  - M == 1 ("row" path): acc [BLOCK_N, NB, 32] float32 += W' * x (one FMA per weight), one sum at the end;
  - M >= 2 ("dot" path): per 64-column block, two tl.dot of W' (cast to x's dtype, as `dense(parts, x.dtype)`
    rounds it) [BLOCK_N, 32] by x^T [32, BLOCK_M] into a float32 accumulator.
Codes become floats without the slow I2F unit: float32_bits(0x4B000000 | q) - (2**23 + 8) == q - 8 exactly.
Split-K and the in-order reduction of partials are gemv.py's (deterministic: graph replay == eager, bitwise).
"""
from __future__ import annotations

import torch

from . import gemv
from .gemv import (DEFAULT_SMS, MAX_ROWS, _device_index, _interpreting, _num_sms, _triton, reduce_partials,
                   split_plan)

BLOCK = 64                      # columns per packing block
ROW_BLOCKS = (32, 256, 4)       # M == 1: (BLOCK_N, BLOCK_K columns, num_warps): 32 rows x 128 bytes per chunk
DOT_BLOCKS = (64, 64, 4)        # M >= 2: one packing block per iteration
NUM_STAGES = 3
_KERNEL = None


def pack_blocked(q: torch.Tensor) -> torch.Tensor:
    """int codes [N, K] (0..15) -> uint8 [N, K/2] in the blocked layout above."""
    n, k = q.shape
    if k % BLOCK:
        raise ValueError(f"the blocked int4 layout needs in_features % {BLOCK} == 0, got {k}")
    blocks = q.reshape(n, k // BLOCK, 2, BLOCK // 2).to(torch.int32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).to(torch.uint8)


def unpack_blocked(w: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] blocked -> int32 codes [N, K]."""
    n, kh = w.shape
    b = w.to(torch.int32).reshape(n, kh // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([b & 15, b >> 4], dim=2).reshape(n, 2 * kh)


def _plan(m: int, n: int, k: int, num_sms: int, split_k: int | None, blocks: tuple | None):
    use_dot = m >= 2
    block_n, block_k, warps = blocks or (DOT_BLOCKS if use_dot else ROW_BLOCKS)
    if k % block_k:             # K is a multiple of 64: fall back to one packing block per iteration
        block_k = BLOCK
    return (use_dot, block_n, block_k, warps, *split_plan(n, k, block_n, block_k, num_sms, split_k))


def _build():
    triton, tl = _triton()

    @triton.jit
    def _deq(q, s, z):
        # q int32 codes, s / z float32 (broadcastable): (q - 8) * s + z, exactly as dense() in float32
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        return qf * s + z

    globals().update(_deq=_deq)

    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_om, stride_ps,
                     GROUP: tl.constexpr, PARTIAL: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rows = tl.minimum(rn, N - 1).to(tl.int64)        # rows past N re-read row N - 1, never stored
        KH = K // 2
        k_start = pid_s * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        j = tl.arange(0, 32)
        if USE_DOT:
            rm = tl.arange(0, BLOCK_M)
            m_mask = rm < M
            x_cols = x_ptr + tl.minimum(rm, M - 1)[None, :] * stride_xm
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(k_start, k_end, 64):
                byte = tl.load(w_ptr + rows[:, None] * KH + (k0 // 2 + j)[None, :]).to(tl.int32)
                g_lo = k0 // GROUP
                g_hi = (k0 + 32) // GROUP
                s_lo = tl.load(sz_ptr + (g_lo * N + rows) * 2).to(tl.float32)
                z_lo = tl.load(sz_ptr + (g_lo * N + rows) * 2 + 1).to(tl.float32)
                s_hi = tl.load(sz_ptr + (g_hi * N + rows) * 2).to(tl.float32)
                z_hi = tl.load(sz_ptr + (g_hi * N + rows) * 2 + 1).to(tl.float32)
                w_lo = _deq(byte & 15, s_lo[:, None], z_lo[:, None])
                w_hi = _deq(byte >> 4, s_hi[:, None], z_hi[:, None])
                x_lo = tl.load(x_cols + (k0 + j)[:, None])
                x_hi = tl.load(x_cols + (k0 + 32 + j)[:, None])
                if DOT_F32:
                    acc = tl.dot(w_lo, x_lo.to(tl.float32), acc, input_precision="ieee")
                    acc = tl.dot(w_hi, x_hi.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w_lo.to(x_lo.dtype), x_lo, acc)
                    acc = tl.dot(w_hi.to(x_hi.dtype), x_hi, acc)
            out_mask = n_mask[:, None] & m_mask[None, :]
            out_offs = rm[None, :] * stride_om + rn[:, None]
            if PARTIAL:
                tl.store(out_ptr + pid_s * stride_ps + out_offs, acc, mask=out_mask)
            else:
                tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            b = tl.arange(0, BLOCK_K // 64)
            acc3 = tl.zeros((BLOCK_N, BLOCK_K // 64, 32), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                col0 = k0 + b * 64                                           # [NB] first column of each block
                byte = tl.load(w_ptr + rows[:, None, None] * KH + (col0 // 2)[None, :, None]
                               + j[None, None, :]).to(tl.int32)               # [BLOCK_N, NB, 32]
                sz_lo = ((col0 // GROUP)[None, :] * N + rows[:, None]) * 2   # [BLOCK_N, NB]
                sz_hi = (((col0 + 32) // GROUP)[None, :] * N + rows[:, None]) * 2
                s_lo = tl.load(sz_ptr + sz_lo).to(tl.float32)
                z_lo = tl.load(sz_ptr + sz_lo + 1).to(tl.float32)
                s_hi = tl.load(sz_ptr + sz_hi).to(tl.float32)
                z_hi = tl.load(sz_ptr + sz_hi + 1).to(tl.float32)
                x_lo = tl.load(x_ptr + col0[:, None] + j[None, :]).to(tl.float32)       # [NB, 32]
                x_hi = tl.load(x_ptr + col0[:, None] + 32 + j[None, :]).to(tl.float32)
                acc3 += _deq(byte & 15, s_lo[:, :, None], z_lo[:, :, None]) * x_lo[None, :, :]
                acc3 += _deq(byte >> 4, s_hi[:, :, None], z_hi[:, :, None]) * x_hi[None, :, :]
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
            if PARTIAL:
                tl.store(out_ptr + pid_s * stride_ps + rn, acc, mask=n_mask)
            else:
                tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        # rows pid_n * BLOCK_N .. of one 64-column packing block: byte j holds columns j (low) and 32 + j (high)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col = tl.program_id(1) * 64 + tl.arange(0, 32)
        rows = tl.minimum(rn, N - 1).to(tl.int64)
        byte = tl.load(w_ptr + rows[:, None] * (K // 2) + (tl.program_id(1) * 32 + tl.arange(0, 32))[None, :]
                       ).to(tl.int32)
        at_lo = ((col // GROUP)[None, :] * N + rows[:, None]) * 2
        at_hi = (((col + 32) // GROUP)[None, :] * N + rows[:, None]) * 2
        w_lo = _deq(byte & 15, tl.load(sz_ptr + at_lo).to(tl.float32), tl.load(sz_ptr + at_lo + 1).to(tl.float32))
        w_hi = _deq(byte >> 4, tl.load(sz_ptr + at_hi).to(tl.float32), tl.load(sz_ptr + at_hi + 1).to(tl.float32))
        ok = (rn < N)[:, None]
        out = out_ptr + rows[:, None] * K + col[None, :]
        tl.store(out, w_lo.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out + 32, w_hi.to(out_ptr.dtype.element_ty), mask=ok)

    return _int4_kernel, _dequant_kernel


def dequant_blocked(w: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocked int4 matrix (w uint8 [N, K/2], scales_and_zeros bf16 [K/G, N, 2]) as a dense [N, K] of `dtype`,
    in one kernel: the same values as Int4.dense (each weight (q - 8) * s + z in float32, where the product is
    exact, then rounded once to `dtype`). Prompt steps (more rows than a GEMV takes) multiply by it."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    n, kh = w.shape
    k = 2 * kh
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    block_n = 32
    _KERNEL[1][(-(-n // block_n), k // BLOCK)](w, scales_and_zeros, out, n, k,
                                                GROUP=k // scales_and_zeros.shape[0], BLOCK_N=block_n, num_warps=4)
    return out


def int4_gemv(x: torch.Tensor, w: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None,
              *, split_k: int | None = None, blocks: tuple[int, int, int] | None = None,
              stages: int | None = None) -> torch.Tensor:
    """x [..., K] (at most MAX_ROWS rows) times the blocked int4 matrix (w uint8 [N, K/2], scales_and_zeros bf16
    [K/G, N, 2]) transposed (+ bias [N]) -> [..., N] in x's dtype. Overrides as in `gemv.weight_only_gemv`."""
    global _KERNEL
    if not _triton():
        raise RuntimeError("int4_gemv needs Triton (pip install triton)")
    n, kh = w.shape
    k = 2 * kh
    if w.dtype != torch.uint8 or k % BLOCK:
        raise ValueError(f"w must be uint8 [N, K/2] with K % {BLOCK} == 0, got {w.dtype} {list(w.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, w has {k} columns")
    groups = scales_and_zeros.shape[0]
    if scales_and_zeros.shape != (groups, n, 2) or k % groups or (k // groups) not in (32, 64, 128, 256):
        raise ValueError(f"scales_and_zeros must be [K/G, {n}, 2] with G in 32, 64, 128, 256; "
                         f"got {list(scales_and_zeros.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int4_gemv takes at most {MAX_ROWS} rows, got {m}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    num_sms = _num_sms(_device_index(x.device)) if x.device.type == "cuda" else DEFAULT_SMS
    if _KERNEL is None:
        _KERNEL = _build()
    use_dot, block_n, block_k, warps, split, k_split = _plan(m, n, k, num_sms, split_k, blocks)
    if use_dot:
        block_k = BLOCK
    out2 = out.view(m, n)
    dot_f32 = x.dtype == torch.float32 or (_interpreting() and x.dtype == torch.bfloat16)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 or bias is not None else out2
    triton = _triton()[0]
    _KERNEL[0][(-(-n // block_n), split)](
        x2, w, scales_and_zeros, part, m, n, k, k_split, x2.stride(0), part.stride(-2),
        part.stride(0) if part.dim() == 3 else 0,
        GROUP=k // groups, PARTIAL=part.dim() == 3, USE_DOT=use_dot, DOT_F32=dot_f32,
        BLOCK_M=max(gemv.DOT_M, triton.next_power_of_2(m)) if use_dot else 1, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages or NUM_STAGES)
    if part.dim() == 3:
        reduce_partials(part, bias, out2)
    return out
