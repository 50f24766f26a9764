"""Fused CUDA kernels (Triton) for the elementwise parts of a Llama layer, with their reference math.

A decode step at batch 1 is a chain of small kernels: RMSNorm alone is 7 ATen kernels, RoPE on q and k and the
KV append 14, silu * up 2. Each costs a launch (~2-3 us in a graph) for microseconds of work, which is the
gap between resident decode and the HBM roofline. Here each is one kernel:

  rms_norm(x, w, eps)                 x [..., N] -> w * (x * rsqrt(mean(x^2) + eps)).to(dtype)
  rope_append(q, k, v, cos, sin, ...) q, k, v [B, T, heads * D] from the projections -> q rotated [B, H, T, D];
                                      k rotated and v written into the caches [maxB, Hkv, S, D] at each token's
                                      position (the KV append)
  silu_mul(g, u)                      silu(g) * u

Each function computes the same math as its `*_reference` (the code the CPU runs), rounding where the reference
rounds (every RoPE product and sum is rounded to the compute dtype as ATen's elementwise kernels round them),
but not bit for bit: the compiler contracts a * b + c * d into FMAs, RMSNorm sums its squares in another order,
and exp / rsqrt may differ in the last bit (tests/test_fused.py bounds each). The fused path runs where x is a CUDA tensor and Triton imports;
elsewhere the reference runs. Eager and captured steps run the same kernels, so graph == eager stays bitwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..weights.formats.gemv import _triton

_KERNELS = None


# ---- the reference math (the CPU path) ----------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def rope_append_reference(q, k, v, cos, sin, k_cache, v_cache, rows, positions, num_heads, num_kv_heads):
    B, T, _ = q.shape
    D = cos.shape[-1]
    q = apply_rope(q.view(B, T, num_heads, D).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, num_kv_heads, D).transpose(1, 2), cos, sin)
    k_cache[rows, :, positions] = k.transpose(1, 2)  # [B, T, Hkv, D] into [B, Hkv, S, D]
    v_cache[rows, :, positions] = v.view(B, T, num_kv_heads, D)
    return q


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


# ---- kernels --------------------------------------------------------------------------------------------
def _build():
    triton, tl = _triton()

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
        y = (x * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rot(x_ptr, c_ptr, s_ptr, j, HALF: tl.constexpr):
        # x * cos + rotate_half(x) * sin on one head, each product and the sum rounded as ATen rounds them
        x1 = tl.load(x_ptr + j)
        x2 = tl.load(x_ptr + HALF + j)
        c1, c2 = tl.load(c_ptr + j), tl.load(c_ptr + HALF + j)
        s1, s2 = tl.load(s_ptr + j), tl.load(s_ptr + HALF + j)
        dt = x1.dtype
        lo = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32) \
            + (-(x2.to(tl.float32)) * s1.to(tl.float32)).to(dt).to(tl.float32)
        hi = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32) \
            + (x1.to(tl.float32) * s2.to(tl.float32)).to(dt).to(tl.float32)
        return lo.to(dt), hi.to(dt)

    globals().update(_rot=_rot)

    @triton.jit
    def _rope_append_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
                            T, S, stride_kb, stride_kh, stride_vb, stride_vh, stride_q, stride_k, stride_v,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        tok = tl.program_id(0)                    # b * T + t
        head = tl.program_id(1)                   # 0..H-1: query heads; H..H+HKV-1: kv heads
        b = tok // T
        t = tok % T
        j = tl.arange(0, D // 2)
        c_ptr = cos_ptr + tok * D
        s_ptr = sin_ptr + tok * D
        if head < H:
            lo, hi = _rot(q_ptr + tok * stride_q + head * D, c_ptr, s_ptr, j, D // 2)
            out = qo_ptr + ((b * H + head) * T + t) * D           # [B, H, T, D]
            tl.store(out + j, lo)
            tl.store(out + D // 2 + j, hi)
        else:
            kvh = head - H
            pos = tl.load(pos_ptr + tok).to(tl.int64)
            lo, hi = _rot(k_ptr + tok * stride_k + kvh * D, c_ptr, s_ptr, j, D // 2)
            kc = kc_ptr + b * stride_kb + kvh * stride_kh + pos * D
            tl.store(kc + j, lo)
            tl.store(kc + D // 2 + j, hi)
            jj = tl.arange(0, D)
            vc = vc_ptr + b * stride_vb + kvh * stride_vh + pos * D
            tl.store(vc + jj, tl.load(v_ptr + tok * stride_v + kvh * D + jj))

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, F, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * F + cols, (s * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)

    return _rms_norm_kernel, _rope_append_kernel, _silu_mul_kernel


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _build()
    return _KERNELS


def fused_available(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and bool(_triton())


# ---- the functions the model math calls ----------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] -> RMSNorm(x) * weight in x's dtype (weight [N] in x's dtype)."""
    if not fused_available(x) or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty_like(x2)
    block = _triton()[0].next_power_of_2(n)
    _kernels()[0][(x2.shape[0],)](x2, weight, out, n, eps, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out.view(x.shape)


def rope_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """q [B, T, H*D], k and v [B, T, Hkv*D] (contiguous, or the column slices of one stacked qkv product); cos, sin [B, 1, T, D]; caches [maxB, Hkv, S, D] (unit stride in the
    last two dims); rows, positions [B, T]. Writes rotated k and v at (rows[b, t], :, positions[b, t]) and
    returns rotated q [B, H, T, D]. Row b of the batch is cache row b (rows[b, t] == b), as step_context makes."""
    B, T, _ = q.shape
    D = cos.shape[-1]
    ok = (fused_available(q) and D % 2 == 0 and (D & (D - 1)) == 0 and k_cache.stride(3) == 1
          and k_cache.stride(2) == D and v_cache.stride(3) == 1 and v_cache.stride(2) == D
          and all(_token_stride(t) is not None for t in (q, k, v)))
    if not ok:
        return rope_append_reference(q, k, v, cos, sin, k_cache, v_cache, rows, positions, num_heads, num_kv_heads)
    q_out = torch.empty(B, num_heads, T, D, dtype=q.dtype, device=q.device)
    cos, sin, positions = cos.contiguous(), sin.contiguous(), positions.contiguous()
    _kernels()[1][(B * T, num_heads + num_kv_heads)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache, T, k_cache.shape[2],
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        _token_stride(q), _token_stride(k), _token_stride(v), H=num_heads, HKV=num_kv_heads, D=D, num_warps=1)
    return q_out


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, elementwise, g and u [B, T, F] of one shape and dtype (views with unit stride in F, such
    as the two halves of a stacked gate/up product) -> [B, T, F] contiguous."""
    rows_g, rows_u = _token_stride(g), _token_stride(u)
    if not fused_available(g) or rows_g is None or rows_u is None or g.shape != u.shape or g.dim() != 3:
        return silu_mul_reference(g, u)
    B, T, F = g.shape
    out = torch.empty(B, T, F, dtype=g.dtype, device=g.device)
    block = 1024
    _kernels()[2][(B * T, -(-F // block))](g, u, out, F, rows_g, rows_u, BLOCK=block, num_warps=4)
    return out


def _token_stride(t: torch.Tensor) -> int | None:
    """For t [B, T, N] with unit stride along N and row (b, t) at b * T * s + t * s: s; else None."""
    if t.dim() != 3 or t.stride(2) != 1 or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)):
        return None
    return t.stride(1)
