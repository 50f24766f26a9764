"""Int8 weight-only quantization: symmetric, one scale per output channel.

Parts of an [out, in] matrix:
    w      int8    [out, in]   q = clamp(round(W / scale), -127, 127)
    scale  float32 [out]       scale = max(|W[o, :]|) / 127

Dequantized matrix (`dense`): W'[o, i] = float32(w[o, i]) * scale[o], computed in float32, then cast.

linear:
  CPU   `torch._weight_int8pack_mm(x2d, w, scale.to(x.dtype))` (ATen's CPU kernel; it needs the scales in the
        activation dtype and a 2-D input; it accumulates in float32, checked against the dequantized matrix in
        float32, bfloat16 and float16 by tests/test_formats.py). The CPU lane's groups (`for_cpu` marks them
        "gemv") take graphrt's GEMV on its worker pool instead (int8_cpu.py: ATen's OpenMP team slows down on
        the lane's serving thread), with RMSNorm, silu * up and the residual taken in (`linear_fused`).
  CUDA  up to GEMV_MAX_ROWS rows (decode), where Triton is installed: `weight_only_gemv` (gemv.py), a Triton
        kernel that reads each int8 weight once and computes scale[o] * sum_i x[i] * w[o, i] in float32 (the
        result is rounded once, to the compute dtype). More rows (prefill), or no Triton: dequantize (`dense`)
        then `F.linear` (cuBLAS). torch 2.11 does register a CUDA kernel for `_weight_int8pack_mm`, but it is a
        naive one-thread-per-output loop whose weight reads are not coalesced and which converts activations to
        float32 first.
Everything in `linear` is capturable in a CUDA graph: static shapes, no host syncs, no CPU tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import GEMV_MAX_ROWS, PartSpec
from . import int8_cpu
from .gemv import gemv_available, weight_only_gemv


@dataclass(frozen=True)
class Int8:
    compute_dtype: torch.dtype
    name: str = field(default="int8", init=False)

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        out, inp = (int(s) for s in shape)
        return (PartSpec("w", (out, inp), torch.int8), PartSpec("scale", (out,), torch.float32))

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        w = dense.detach().to("cpu", torch.float32)
        scale = w.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"w": q, "scale": scale}

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return (parts["w"].to(torch.float32) * parts["scale"][:, None]).to(dtype)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        w, scale = parts["w"], parts["scale"]
        rows = x.numel() // x.shape[-1]
        if "gemv" in parts and int8_cpu.fusable(x, w, scale):   # the CPU lane's GEMV (for_cpu)
            y = int8_cpu.int8_gemv(x, w, scale)
            return y + bias if bias is not None else y
        if x.device.type == "cuda" and rows <= GEMV_MAX_ROWS and gemv_available(x):
            return weight_only_gemv(x, w, scale, bias)
        if x.device.type == "cpu" and rows <= GEMV_MAX_ROWS:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), w, scale.to(x.dtype))
            y = y.view(*x.shape[:-1], w.shape[0])
            return y + bias if bias is not None else y
        return F.linear(x, self.dense(parts, x.dtype), bias)

    def linear_fused(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                     norm: tuple | None = None, silu: bool = False, residual: torch.Tensor | None = None,
                     rope=None) -> torch.Tensor | None:
        """On the CPU lane (for_cpu's "gemv"): graphrt's GEMV with its neighbours; None (the steps apart) else."""
        if "gemv" in parts and bias is None and rope is None and int8_cpu.fusable(x, parts["w"], parts["scale"], norm,
                                                                                     silu, residual):
            return int8_cpu.int8_gemv(x, parts["w"], parts["scale"], norm=norm, silu=silu, residual=residual)
        return None

    def for_cpu(self, parts: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """The CPU lane's parts: marked for graphrt's GEMV ("gemv", an empty tensor) where it runs and `rows` (the
        batch) is at most int8_cpu.MAX_ROWS; else as they are (ATen's kernel)."""
        return {**parts, "gemv": torch.empty(0)} if int8_cpu.available() and rows <= int8_cpu.MAX_ROWS else parts

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = parts["w"].index_select(0, flat).to(torch.float32) * parts["scale"].index_select(0, flat)[:, None]
        return rows.view(*ids.shape, parts["w"].shape[1]).to(dtype)
