"""Attention of a few query rows over the KV cache with an additive mask: decode steps and speculative passes.

    masked_attention(q [B, Hkv, R, D], k, v [B, Hkv, L, D], mask [B, 1, R, L]) -> [B, Hkv, R, D]
    = softmax(q k^T / sqrt(D) + mask) v, per batch row and kv head (R = G*T: the G query heads of one kv head
    times the T tokens of the step, so K/V are read once per kv head, never copied per query head).

Where it runs:
- CUDA with Triton, R <= MAX_ROWS, D a power of two in 16..256: `decode_attention`, one Triton kernel. SDPA's
  kernels for an explicit mask are prefill kernels (cuDNN: 64-128 query rows per tile, plus a memset: 8 us per
  layer at R = 4 on the H200; float32 has only the memory-efficient kernel, 28 us; tools/profile_step.py) for
  work that reads K/V once.
- elsewhere (the CPU, more rows): `torch.nn.functional.scaled_dot_product_attention`.

The kernel: one program per (batch row, kv head, split of the context); the context is split until about
TARGET_PROGRAMS programs run. A program holds the R query rows (padded to 16 for the MMA), walks its keys in
blocks of BLOCK_L with the online softmax (running max m, sum l, accumulator acc, float32), products through
`tl.dot` (float32 inputs as three TF32 products, "tf32x3", about float32's accuracy; 16-bit inputs with the
probabilities rounded to the K/V dtype for the second product, as flash attention does). A row that sees no key
of a block keeps m = -inf and adds nothing. With several splits each program stores (m, l, acc) and counts itself
done on a per-(row, head) counter; the last one merges the partials in split order and zeroes the counter. The
merge order is fixed, so eager and captured calls give the same bits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..weights.formats.counters import zeroed_counters
from ..weights.formats.gemv import _triton

MAX_ROWS = 64
BLOCK_L = 64
TARGET_PROGRAMS = 128   # the context is split until about this many programs run (each at least BLOCK_L keys)
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
    def _attn_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, acc_ptr, m_ptr, l_ptr, count_ptr, R, L, HKV, scale,
                     sqb, sqh, sqr, skb, skh, skl, svb, svh, svl, smb, smr, sob, soh, sor,
                     SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
                     D: tl.constexpr, PRECISION: tl.constexpr):
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
        for off in range(0, CHUNK, BLOCK_L):
            cols = split * CHUNK + off + tl.arange(0, BLOCK_L)
            col_ok = cols < L
            kb = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skl + dd[None, :], mask=col_ok[:, None],
                         other=0.0)
            s = tl.dot(q, tl.trans(kb), input_precision=PRECISION)
            s = s * scale + tl.load(mask_ptr + b * smb + rows[:, None] * smr + cols[None, :],
                                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)      # a row that sees no key yet adds nothing
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vb = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svl + dd[None, :], mask=col_ok[:, None],
                         other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new
        out = out_ptr + b * sob + h * soh + rows[:, None] * sor + dd[None, :]
        if SPLITS == 1:
            tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            # partials [B*HKV, SPLITS, BLOCK_R (, D)]; the program that finishes last merges them, in split order
            at = (bh * SPLITS + split) * BLOCK_R
            tl.store(m_ptr + at + rows, m_i)
            tl.store(l_ptr + at + rows, l_i)
            tl.store(acc_ptr + (at + rows[:, None]) * D + dd[None, :], acc)
            done = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")     # releases the stores above
            if done == SPLITS - 1:
                tl.store(count_ptr + bh, 0)                               # zero again for the next call
                m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
                for i in range(SPLITS):
                    m = tl.maximum(m, tl.load(m_ptr + (bh * SPLITS + i) * BLOCK_R + rows))
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                l_tot = tl.zeros((BLOCK_R,), tl.float32)
                total = tl.zeros((BLOCK_R, D), tl.float32)
                for i in range(SPLITS):
                    at = (bh * SPLITS + i) * BLOCK_R
                    wgt = tl.exp(tl.load(m_ptr + at + rows) - m_safe)
                    l_tot += wgt * tl.load(l_ptr + at + rows)
                    total += wgt[:, None] * tl.load(acc_ptr + (at + rows[:, None]) * D + dd[None, :])
                tl.store(out, (total / l_tot[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    return _attn_kernel


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
    splits = max(1, min(-(-TARGET_PROGRAMS // (B * HKV)), -(-L // BLOCK_L)))
    chunk = -(-(-(-L // splits)) // BLOCK_L) * BLOCK_L
    splits = -(-L // chunk)
    out = torch.empty(B, HKV, R, D, dtype=q.dtype, device=q.device)
    if splits == 1:
        acc = m = l = count = out
    else:
        acc = torch.empty(B * HKV * splits * block_r, D, dtype=torch.float32, device=q.device)
        m = torch.empty(B * HKV * splits * block_r, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        count = zeroed_counters(q.device, B * HKV)
    _kernels()[(B * HKV, splits)](
        q, k, v, mask, out, acc, m, l, count, R, L, HKV, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        SPLITS=splits, CHUNK=chunk, BLOCK_R=block_r, BLOCK_L=BLOCK_L, D=D,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out
