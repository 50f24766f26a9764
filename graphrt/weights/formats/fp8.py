"""FP8 (float8_e4m3fn) weights with one float32 scale per output channel.

Parts of an [out, in] matrix:
    w      float8_e4m3fn [out, in]   w = e4m3(clamp(W / scale, -448, 448))   (round to nearest even)
    scale  float32       [out]       scale = max(|W[o, :]|) / 448

Dequantized matrix (`dense`): W'[o, i] = float32(w[o, i]) * scale[o], then cast.

linear:
  CPU   dequantize then `F.linear` in the compute dtype.
  CUDA  decode (up to GEMV_MAX_ROWS rows), compute capability >= 8.9, Triton installed: `weight_only_gemv`
        (gemv.py), a weight-only Triton kernel that reads each e4m3 weight once and computes
        scale[o] * sum_i x[i] * float(w[o, i]) in float32 (activations are not quantized; at one row this reads
        half the bytes of a bfloat16 GEMV, where `_scaled_mm` is slower than bfloat16).
        Otherwise (compute capability >= 8.9, `in` and `out` multiples of 16) dynamic per-token activation
        quantization and one row-wise scaled FP8 GEMM:
            a      = max(|x[m, :]|) / 448 (float32, clamped away from 0)        -> scale_a [M, 1]
            xq     = e4m3(clamp(x / a, -448, 448))
            y      = torch._scaled_mm(xq, w.t(), scale_a=a, scale_b=scale.view(1, N), out_dtype=...)
        `w.t()` of the row-major [N, K] part is the column-major [K, N] operand `_scaled_mm` wants. torch checks
        K % 16 == 0 and N % 16 == 0 (both dims of mat2); M is free (no padding needed). Row-wise scaling
        outputs bfloat16 on every GPU (CUTLASS path on sm89); on sm90+ with cuBLAS >= 12.9 float16 and float32
        work too, so other compute dtypes are requested directly there and go through bfloat16 on sm89.
        Matrices whose dims are not multiples of 16, and GPUs below sm89, use the dequantize path.
Everything in `linear` is capturable: static shapes, no host syncs (the capability is read once per device
and cached), no CPU tensors.

Pre-quantized checkpoints (compressed-tensors, "float-quantized", channel or tensor strategy):
`FP8.from_stored(weight, weight_scale)` turns their `weight` (e4m3 [out, in]) and `weight_scale`
(float32 [out, 1], or one value for the tensor strategy, broadcast to every channel) into parts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import GEMV_MAX_ROWS, PartSpec
from .gemv import gemv_available, weight_only_gemv

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _cuda_capability(device: torch.device | str) -> tuple[int, int]:
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)


def fp8_supported(device: torch.device | str) -> bool:
    """True where FP8 GEMMs run: a CUDA device of compute capability 8.9 (Ada) or newer. The CPU computes FP8
    weights by dequantizing, so it counts as supported too."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _cuda_capability(device) >= (8, 9)


@dataclass(frozen=True)
class FP8:
    compute_dtype: torch.dtype
    name: str = field(default="fp8", init=False)

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        out, inp = (int(s) for s in shape)
        return (PartSpec("w", (out, inp), E4M3), PartSpec("scale", (out,), torch.float32))

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        w = dense.detach().to("cpu", torch.float32)
        scale = w.abs().amax(dim=1) / E4M3_MAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / safe[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return {"w": q, "scale": scale}

    @staticmethod
    def from_stored(weight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parts from a compressed-tensors FP8 checkpoint: `weight` e4m3 [out, in]; `weight_scale` float
        [out, 1] or [out] (channel strategy) or a single value (tensor strategy)."""
        if weight.dtype != E4M3 or weight.dim() != 2:
            raise ValueError(f"FP8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {list(weight.shape)}")
        out = weight.shape[0]
        s = weight_scale.detach().to("cpu", torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(out)
        elif s.numel() != out:
            raise ValueError(f"FP8 weight_scale has {s.numel()} values for a weight of {out} rows; expected "
                             "one per row (channel strategy) or one in all (tensor strategy)")
        return {"w": weight.detach().cpu().contiguous(), "scale": s.contiguous()}

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return (parts["w"].to(torch.float32) * parts["scale"][:, None]).to(dtype)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        w, scale = parts["w"], parts["scale"]
        n, k = w.shape
        if x.device.type != "cuda" or _cuda_capability(x.device) < (8, 9):
            return F.linear(x, self.dense(parts, x.dtype), bias)
        if x.numel() // max(k, 1) <= GEMV_MAX_ROWS and gemv_available(x):
            return weight_only_gemv(x, w, scale, bias)
        if n % 16 or k % 16:
            return F.linear(x, self.dense(parts, x.dtype), bias)
        x2 = x.reshape(-1, k)
        a = (x2.abs().amax(dim=1, keepdim=True).to(torch.float32) / E4M3_MAX).clamp_(min=1e-12)
        xq = (x2.to(torch.float32) / a).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
        direct = x.dtype == torch.bfloat16 or _cuda_capability(x.device) >= (9, 0)
        y = torch._scaled_mm(xq, w.t(), scale_a=a, scale_b=scale.view(1, n),
                             out_dtype=x.dtype if direct else torch.bfloat16)
        y = y.to(x.dtype).view(*x.shape[:-1], n)
        return y + bias if bias is not None else y

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = parts["w"].index_select(0, flat).to(torch.float32) * parts["scale"].index_select(0, flat)[:, None]
        return rows.view(*ids.shape, parts["w"].shape[1]).to(dtype)
