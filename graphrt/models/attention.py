"""Attention of a few query rows over the KV cache with an additive mask: decode steps and speculative passes.

    masked_attention(q [B, Hkv, R, D], k, v [B, Hkv, L, D], mask [B, 1, R, L]) -> [B, Hkv, R, D]
    = softmax(q k^T / sqrt(D) + mask) v, per batch row and kv head (R = G*T: the G query heads of one kv head
    times the T tokens of the step, so K/V are read once per kv head, never copied per query head).

Where it runs:
- CUDA with Triton, R <= MAX_ROWS, D a power of two in 16..256: `decode_attention`, one Triton kernel (two when
  the context is split, below). SDPA's kernels for an explicit mask are prefill kernels (cuDNN: 64-128 query
  rows per tile, plus a memset; ~8 us per layer at R = 4 on the H200, tools/profile_step.py; float32 only has the
  memory-efficient kernel, ~28 us) for work that reads K/V once.
- elsewhere (the CPU, more rows): `torch.nn.functional.scaled_dot_product_attention`.

The kernel: one program per (batch row, kv head, split of the context). It holds the R query rows (padded to 16
for the MMA), walks its keys in blocks of BLOCK_L with the online softmax (running max m, sum l, accumulator
acc in float32), products through `tl.dot` (float32 inputs with input_precision="ieee", no TF32; the
probabilities are rounded to the K/V dtype for the second product, as flash attention does). A split context
(long contexts: one program per SPLIT_KEYS keys so that enough programs run) stores (m, l, acc) per split and
`_combine_kernel` merges the splits in order. A block where a row sees no key keeps that row's m at -inf and adds
nothing. No atomics: eager and captured calls give the same bits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..weights.formats.gemv import _triton

MAX_ROWS = 64
BLOCK_L = 64
SPLIT_KEYS = 512     # keys per program when the context is split
_KERNELS = None


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if decode_attention_fits(q, k, v, mask):
        return decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> bool:
    D = q.shape[-1]
    return (q.is_cuda and bool(_triton()) and q.shape[2] <= MAX_ROWS and 16 <= D <= 256 and D & (D - 1) == 0
            and k.dtype == v.dtype == q.dtype == mask.dtype and k.stride(3) == 1 and v.stride(3) == 1)


def _build():
    triton, tl = _triton()

    @triton.jit
    def _attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, m_ptr, l_ptr, R, L, HKV, scale,
                     sqb, sqh, sqr, skb, skh, skl, svb, svh, svl, smb, smr, sob, soh, sor,
                     SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
                     D: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, BLOCK_R)
        dd = tl.arange(0, D)
        row_ok = rows < R
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        start = split * CHUNK
        for off in range(0, CHUNK, BLOCK_L):
            cols = start + off + tl.arange(0, BLOCK_L)
            col_ok = cols < L
            kb = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skl + dd[None, :], mask=col_ok[:, None],
                         other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            s = s * scale + tl.load(mask_ptr + b * smb + rows[:, None] * smr + cols[None, :],
                                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vb = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svl + dd[None, :], mask=col_ok[:, None],
                         other=0.0)
            if IEEE:
                pv = tl.dot(p, vb, input_precision="ieee")
            else:
                pv = tl.dot(p.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        if SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(out_ptr + b * sob + h * soh + rows[:, None] * sor + dd[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:   # out_ptr: the float32 partials acc [B*HKV, SPLITS, BLOCK_R, D]; m, l [B*HKV, SPLITS, BLOCK_R]
            at = (bh * SPLITS + split) * BLOCK_R
            tl.store(m_ptr + at + rows, m_i)
            tl.store(l_ptr + at + rows, l_i)
            tl.store(out_ptr + (at + rows[:, None]) * D + dd[None, :], acc)

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, R, HKV, sob, soh, sor,
                        SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, BLOCK_R)
        dd = tl.arange(0, D)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        for s in range(SPLITS):
            m = tl.maximum(m, tl.load(m_ptr + (bh * SPLITS + s) * BLOCK_R + rows))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_tot = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        for s in range(SPLITS):     # in split order: deterministic
            at = (bh * SPLITS + s) * BLOCK_R
            w = tl.exp(tl.load(m_ptr + at + rows) - m_safe)
            l_tot += w * tl.load(l_ptr + at + rows)
            acc += w[:, None] * tl.load(acc_ptr + (at + rows[:, None]) * D + dd[None, :])
        o = acc / l_tot[:, None]
        tl.store(out_ptr + b * sob + h * soh + rows[:, None] * sor + dd[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=(rows < R)[:, None])

    return _attn_kernel, _combine_kernel


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build()
    return _KERNELS


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The module's Triton path; shapes as `masked_attention` (k, v may be views of the caches)."""
    B, HKV, R, D = q.shape
    L = k.shape[2]
    if q.stride(3) != 1:
        q = q.contiguous()
    if mask.stride(3) != 1:
        mask = mask.contiguous()
    block_r = max(16, 1 << (R - 1).bit_length())
    splits = max(1, -(-L // SPLIT_KEYS))
    chunk = -(-L // splits)
    chunk = -(-chunk // BLOCK_L) * BLOCK_L
    splits = -(-L // chunk)
    out = torch.empty(B, HKV, R, D, dtype=q.dtype, device=q.device)
    attn, combine = _kernels()
    ieee = q.dtype == torch.float32
    if splits == 1:
        target, m, l = out, out, out
    else:
        target = torch.empty(B * HKV * splits * block_r, D, dtype=torch.float32, device=q.device)
        m = torch.empty(B * HKV * splits * block_r, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
    attn[(B * HKV, splits)](
        q, k, v, mask, target, m, l, R, L, HKV, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        SPLITS=splits, CHUNK=chunk, BLOCK_R=block_r, BLOCK_L=BLOCK_L, D=D, IEEE=ieee, num_warps=4)
    if splits > 1:
        combine[(B * HKV,)](target, m, l, out, R, HKV, out.stride(0), out.stride(1), out.stride(2),
                            SPLITS=splits, BLOCK_R=block_r, D=D, num_warps=4)
    return out
