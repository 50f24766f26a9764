"""The CPU int8 GEMV (source and math: int8_cpu_source.py; built and loaded with the int4 kernel, int4_cpu.py): the
CPU lane's product for int8 groups (formats/int8.py: int8 [N, K] and a float32 scale per output row), on graphrt's
worker pool instead of ATen's OpenMP kernel, with RMSNorm, silu(gate) * up and the residual taken in as the int4
kernel takes them. The vector path needs AVX512 (where int4_cpu.available()); the portable one is the reference."""
from __future__ import annotations

import torch

from . import int4_cpu
from .cpu_calls import invoke

MAX_ROWS = int4_cpu.MAX_ROWS


def available() -> bool:
    return int4_cpu.available()


def fusable(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, norm: tuple | None = None, silu: bool = False,
            residual: torch.Tensor | None = None) -> bool:
    """Whether `int8_gemv` takes x [..., K] (or [..., 2K] with silu) times w int8 [N, K] with these neighbours."""
    if not available() or w.dim() != 2 or w.dtype != torch.int8 or w.device.type != "cpu":
        return False
    n, k = w.shape
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.shape[-1] != (2 * k if silu else k) or k % 128
            or not 1 <= rows <= MAX_ROWS or (norm is not None and silu) or scale.dtype != torch.float32
            or scale.shape != (n,)):
        return False
    return int4_cpu.neighbours_fit(x.shape[:-1], k, n, norm, residual)


def int8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, portable: bool = False, *,
              norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """x bf16 [..., K] (or [..., 2K] = [gate | up] with silu) times w int8 [N, K], scaled per row by scale float32
    [N] -> y bf16 [..., N]; the neighbours as int4_cpu.int4_gemv's. portable: the lane-by-lane path (tests; bitwise
    equal to the vector path)."""
    lib, why = int4_cpu._library()
    if lib is None:
        raise RuntimeError(f"the CPU GEMV kernels are not built: {why}")
    n, k = w.shape
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w, scale = w.contiguous(), scale.contiguous()
    b = x2.shape[0]
    y = torch.empty(b, n, dtype=torch.bfloat16)
    xe = torch.empty(b, k, dtype=torch.bfloat16)
    xf = torch.empty(b, k, dtype=torch.float32)
    nw = norm[0].contiguous() if norm is not None else None
    res = residual.reshape(b, n).contiguous() if residual is not None else None
    invoke(lib.graphrt_int8_gemv, x2, w, scale, y, xe, xf, b, n, k, torch.get_num_threads(), 0 if portable else 1,
           nw, float(norm[1]) if norm is not None else 0.0, int(silu), res, reads=(x2, res), out=y)
    return y.view(*x.shape[:-1], n)
