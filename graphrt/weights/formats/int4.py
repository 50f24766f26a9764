"""Int4 weight-only quantization, asymmetric, in groups along `in` (the tinygemm format of ATen).

Quantization of an [out, in] matrix W, for each row o and group g (columns g*G .. g*G+G-1):
    scale = bf16((max - min) / 15)          zero = bf16(min + 8 * scale)
    q     = clamp(round((W - zero) / scale) + 8, 0, 15)          (q = 8 where scale == 0)
Dequantized value, as both ATen kernels compute it (verified exactly on the CPU against
`_weight_int4pack_mm_for_cpu` with an identity input, and read in aten/src/ATen/native/cuda/int4mm.cu):
    W'[o, i] = (q[o, i] - 8) * scale[g, o] + zero[g, o]          g = i // G
  CPU kernel: in float32 (one fma; (q - 8) * scale is exact in float32), so `dense(parts, float32)` is exactly
  the kernel's matrix. CUDA kernel: one bfloat16 fma (`__hfma2`), i.e. the same value rounded once to bfloat16,
  which equals `dense(parts, bfloat16)` except where the float32 sum itself was inexact (double rounding).

Parts (`G` = the group size actually used, `T` = inner k-tiles, see `_geometry`):
    packing "cpu":   w                 uint8    [out, in/2]      `_convert_weight_to_int4pack_for_cpu(q int32, T)`
    packing "cuda":  w                 int32    [out/8, in/(T*16), 32, T/2]
                                                                 `_convert_weight_to_int4pack(q uint8 [out, in/2], T)`
                                                                 (byte = q[2j] << 4 | q[2j+1]); shape checked
                                                                 against torch's Meta kernel in the tests
    packing "blocked": w               uint8    [out, in/2]      columns in blocks of 64, byte j of a block holding
                                                                 columns j (low nibble) and 32 + j (high nibble);
                                                                 read by the Triton kernel of int4_gemv.py
    all:             scales_and_zeros  bfloat16 [in/G, out, 2]   [..., 0] = scale, [..., 1] = zero

The group size: `group_size` (default 128) when it divides `in`, else the largest of 64, 32 that does (e.g. 576
columns use groups of 64). The packed layout needs `out` % 16 == 0 ("cpu") / % 8 == 0 ("cuda") and `in` % 32 == 0;
other shapes raise a ValueError from `parts`. T is the largest of 8, 4, 2 with `in` % (16 T) == 0 (the CPU
kernel ignores it; the CUDA layout depends on it).

linear:
  CPU   `torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, G, scales_and_zeros)`: bfloat16 activations go in as
        they are; float32 / float16 activations run the kernel in float32 (scales converted to float32, which
        the kernel wants in the activation dtype) and the result is cast back.
  CUDA  "cuda" packing: `torch.ops.aten._weight_int4pack_mm(x_bf16, w, G, scales_and_zeros)` (needs sm80+,
        bfloat16 only: other compute dtypes are cast to bfloat16 and back). "blocked" packing (the policy's choice
        for float32 / float16 compute, which tinygemm rounds to bfloat16, and for bfloat16 where the CUDA kernel
        compiles): 1..4 rows through `int4_cuda.int4_gemv_row` (NVRTC), 5..GEMV_MAX_ROWS rows through the Triton
        `int4_gemv`; both form `dense(parts, float32)` in registers.
        "blocked" packing on the CPU (the policy's choice where AVX512-BF16 runs: bfloat16 compute, groups of 128 or
        256): 1..16 rows through graphrt's C++ kernel (int4_cpu.py), which reads the bytes the GPU streams.
  Both: more than GEMV_MAX_ROWS rows (prefill), or parts packed for another device: dequantize, then F.linear.
The CPU packed layout depends on the CPU's vector ISA (AVX512: blocks of 64 rows, AVX2 / default: 32, ...), so
parts packed for "cpu" belong to the machine that packed them; `dense` recovers q by probing the pack op once
per row count (see `_cpu_nibble_index`). The CUDA layout is unpacked by its formula (`_tinygemm_index`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import GEMV_MAX_ROWS, PartSpec
from .gemv import gemv_available
from . import int4_cpu, int4_cuda
from .int4_gemv import dequant_blocked, int4_gemv, pack_blocked, unpack_blocked
from .int4_layouts import _cpu_nibble_index, _to_uint8_pairs, pack_tinygemm, unpack_tinygemm

PACKINGS = ("cpu", "cuda", "blocked")
_ROW_ALIGN = {"cpu": 16, "cuda": 8, "blocked": 1}
_COL_ALIGN = {"cpu": 32, "cuda": 32, "blocked": 64}


def _geometry(shape: tuple[int, int], group_size: int, packing: str) -> tuple[int, int]:
    """(group size, inner k-tiles) for an [out, in] matrix; ValueError for shapes the kernels cannot take."""
    out, inp = shape
    if inp % _COL_ALIGN[packing] or out % _ROW_ALIGN[packing]:
        fix = ("compute in bfloat16 (--dtype bfloat16: ATen's tinygemm layout needs in_features % 32), or use int8 "
               "or fp8" if packing == "blocked" else "use int8 or fp8")
        rows = f" and out_features % {_ROW_ALIGN[packing]} == 0" if _ROW_ALIGN[packing] > 1 else ""
        raise ValueError(f"int4 ({packing} packing) needs in_features % {_COL_ALIGN[packing]} == 0{rows}; "
                         f"a [{out}, {inp}] matrix does not fit: {fix}")
    group = next(g for g in (group_size, 128, 64, 32) if g <= group_size and inp % g == 0)
    tiles = next(t for t in (8, 4, 2) if inp % (16 * t) == 0)
    return group, tiles


CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8)  # candidate group ranges [lo, hi] * shrink


def _affine_codes(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Groups wg [out, n, G] with ranges lo, hi [out, n] -> (q in 0..15 as float, scale, zero), scale and
    zero rounded to bfloat16 as stored."""
    scale = ((hi - lo) / 15.0).to(torch.bfloat16).to(torch.float32)
    zero = (lo + 8.0 * scale).to(torch.bfloat16).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((wg - zero[..., None]) / safe[..., None]) + 8.0
    q = torch.where(scale[..., None] > 0, q, torch.full_like(q, 8.0)).clamp_(0, 15)
    return q, scale, zero


def _affine_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - 8.0) * scale[..., None] + zero[..., None]


@dataclass(frozen=True)
class Int4:
    compute_dtype: torch.dtype
    group_size: int = 128
    packing: str = "cpu"
    name: str = field(default="int4", init=False)

    @property
    def rows_stack(self) -> bool:
        """Stacked along rows, the "cuda" (tiles of 8 rows) and "blocked" layouts stay valid layouts of the
        stack; the "cpu" layout interleaves rows in ISA-dependent blocks, so it does not."""
        return self.packing != "cpu"

    @staticmethod
    def row_axis(part: str) -> int:
        return 1 if part == "scales_and_zeros" else 0      # [in/G, out, 2]

    def __post_init__(self) -> None:
        if self.packing not in PACKINGS:
            raise ValueError(f"int4 packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size}")

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        out, inp = (int(s) for s in shape)
        group, tiles = _geometry((out, inp), self.group_size, self.packing)
        if self.packing in ("cpu", "blocked"):
            w = PartSpec("w", (out, inp // 2), torch.uint8)
        else:
            w = PartSpec("w", (out // 8, inp // (tiles * 16), 32, tiles // 2), torch.int32)
        return (w, PartSpec("scales_and_zeros", (inp // group, out, 2), torch.bfloat16))

    # ---- quantization --------------------------------------------------------------------------
    def quantize(self, dense: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """W [out, in] -> (q int32 [out, in] in 0..15, scales_and_zeros bf16 [in/G, out, 2]), on the CPU;
        the range search runs on `device` (a GPU makes quantizing a large model on load quick)."""
        w = dense.detach().to(device, torch.float32)
        out, inp = w.shape
        group, _ = _geometry((out, inp), self.group_size, self.packing)
        wg = w.view(out, inp // group, group)
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        best = None
        for shrink in CLIP_SHRINKS:  # clip the range where that lowers the group's squared error
            cand = _affine_codes(wg, lo * shrink, hi * shrink)
            err = (_affine_values(*cand) - wg).pow(2).sum(dim=2)
            if best is None:
                best, best_err = cand, err
            else:
                better = err < best_err
                best = tuple(torch.where(better[..., None] if t.dim() == 3 else better, t, b)
                             for t, b in zip(cand, best))
                best_err = torch.minimum(err, best_err)
        q, scale, zero = best
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return q.view(out, inp).to(torch.int32).cpu(), sz.cpu()

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        q, sz = self.quantize(dense, device if torch.device(device).type == "cuda" else "cpu")
        group, tiles = _geometry(tuple(q.shape), self.group_size, self.packing)
        if self.packing == "cpu":
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
        elif self.packing == "blocked":
            w = pack_blocked(q)
        elif torch.device(device).type == "cuda":
            w = torch.ops.aten._convert_weight_to_int4pack(_to_uint8_pairs(q).to(device), tiles).cpu()
        else:  # the same layout, built on the CPU (tests, or packing ahead of time)
            w = pack_tinygemm(q, tiles)
        return {"w": w, "scales_and_zeros": sz}

    # ---- reading ---------------------------------------------------------------------------------
    def unpack(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The int32 codes q [out, in] (0..15) back from the packed part."""
        w = parts["w"]
        if self.packing == "cpu":
            n, kh = w.shape
            nib = torch.stack([w & 15, w >> 4], dim=-1).reshape(-1)
            return nib[_cpu_nibble_index(n, 2 * kh, w.device)].to(torch.int32)
        if self.packing == "blocked":
            return unpack_blocked(w)
        return unpack_tinygemm(w)

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q = self.unpack(parts)
        sz = parts["scales_and_zeros"].to(torch.float32)
        out, inp = q.shape
        group = inp // sz.shape[0]
        scale = sz[..., 0].t().repeat_interleave(group, dim=1)
        zero = sz[..., 1].t().repeat_interleave(group, dim=1)
        return ((q.to(torch.float32) - 8.0) * scale + zero).to(dtype)

    def linear_fused(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                     norm: tuple | None = None, silu: bool = False, residual: torch.Tensor | None = None,
                     rope=None) -> torch.Tensor | None:
        """The product with its neighbours in one kernel (base.linear_fused says what each means) where a kernel
        takes the call: the NVRTC kernel (blocked packing, 1..4 rows on CUDA, prologues where they pay:
        int4_cuda.prologue_pays), or on the CPU graphrt's C++ kernel
        (blocked packing, 1..16 rows, norm or silu, residual; no bias or RoPE); else None."""
        w, sz = parts["w"], parts["scales_and_zeros"]
        if self.packing == "blocked" and x.device.type == "cpu":
            if bias is not None or rope is not None or not int4_cpu.fusable(x, w, sz, norm, silu, residual):
                return None
            return int4_cpu.int4_gemv(x, w, sz, norm=norm, silu=silu, residual=residual)
        if self.packing != "blocked" or x.device.type != "cuda" or not int4_cuda.supports(x, w, sz, norm, silu, rope):
            return None
        if not int4_cuda.prologue_pays(w, norm, silu):   # large products: the norm / silu_mul apart is faster
            return None
        lead = x.shape[:-1]
        if residual is not None and not (residual.is_contiguous() and residual.dtype == x.dtype
                                         and residual.shape == (*lead, sz.shape[1]) and rope is None):
            return None
        if rope is not None and (len(lead) != 2 or rope.positions.shape != lead):
            return None
        return int4_cuda.int4_gemv_row(x, w, sz, bias, residual=residual, norm=norm, silu=silu, rope=rope)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        w, sz = parts["w"], parts["scales_and_zeros"]
        inp = x.shape[-1]
        group = inp // sz.shape[0]
        out = sz.shape[1]
        x2 = x.reshape(-1, inp)
        if self.packing == "blocked" and x.device.type == "cuda" and x2.shape[0] <= int4_cuda.MAX_INPUTS \
                and int4_cuda.supports(x2, w, sz):
            return int4_cuda.int4_gemv_row(x, w, sz, bias)
        if self.packing == "blocked" and x.device.type == "cuda" and x2.shape[0] <= GEMV_MAX_ROWS \
                and gemv_available(x):
            return int4_gemv(x, w, sz, bias)
        if self.packing == "blocked" and x.device.type == "cuda" and gemv_available(x):
            # many rows (prefill): one dequantizing kernel, then a dense GEMM
            return F.linear(x, dequant_blocked(w, sz, x.dtype), bias)
        if self.packing == "blocked" and int4_cpu.supports(x2, w, sz):    # the CPU kernel (AVX512-BF16)
            y = int4_cpu.int4_gemv(x2, w, sz).view(*x.shape[:-1], out)
            return y + bias if bias is not None else y
        if self.packing != x.device.type or x2.shape[0] > GEMV_MAX_ROWS:
            # parts packed for the other device (reference path), or many rows (prefill), where one
            # dequantization and a dense GEMM beat the GEMV-shaped kernel (measured 50x on the CPU)
            return F.linear(x, self.dense(parts, x.dtype), bias)
        if x.device.type == "cpu":
            if x.dtype == torch.bfloat16:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, group, sz)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.float32), w, group, sz.to(torch.float32))
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), w, group, sz)
        y = y.to(x.dtype).view(*x.shape[:-1], out)
        return y + bias if bias is not None else y

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Reference only (dequantizes the whole matrix): policies keep the token table dense."""
        return F.embedding(ids, self.dense(parts, dtype))
