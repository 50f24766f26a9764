"""The CPU bfloat16 GEMV (source and math: bf16_cpu_source.py; built and loaded with the int4 kernel, int4_cpu.py):
the CPU lane's product for dense bf16 groups, reading the row-major bytes the GPU streams (no packed copy), with
software prefetch; RMSNorm, silu(gate) * up and the residual taken in as the int4 kernel takes them. AVX512-BF16
below AMX_ROWS input rows (or without AMX), AMX tiles from there up to MAX_ROWS."""
from __future__ import annotations

import functools

import torch

from . import int4_cpu
from .cpu_calls import invoke

MAX_ROWS = int4_cpu.MAX_ROWS
AMX_ROWS = 4   # from this many input rows the product runs on AMX tiles where they run. H100 host, 15 threads, weights
               # cycled (docs/results/2026-11-26-h100-cpu-gemv-probe-4ceba63.json), GB/s AMX / AVX512 / oneDNN: 1 row
               # gate_up 110 / 124 / 78, down 162 / 189 / 83; 4 rows 105 / 72 / 75 and 108 / 113 / 76; 8 rows
               # 86 / 43 / 73 and 93 / 47 / 72; 16 rows 101 / 34 / 73 and 116 / 35 / 80
LANE_ROWS = 8   # without AMX the lane uses this kernel up to this batch; beyond, oneDNN's packed kernel (AVX512
                # tiles hold at most 8 input rows, and were slower than oneDNN's at 8: 43-47 against 72-73 GB/s)


def available() -> bool:
    """Whether the AVX512-BF16 path runs here (the library builds and the CPU has the instructions)."""
    return int4_cpu.available()


def fusable(x: torch.Tensor, w: torch.Tensor, norm: tuple | None = None, silu: bool = False,
            residual: torch.Tensor | None = None) -> bool:
    """Whether `bf16_gemv` takes x [..., K] (or [..., 2K] with silu) times w [N, K] with these neighbours."""
    if not int4_cpu.available() or w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu":
        return False
    n, k = w.shape
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.shape[-1] != (2 * k if silu else k) or k % 128
            or not 1 <= rows <= MAX_ROWS or (norm is not None and silu)):
        return False
    return int4_cpu.neighbours_fit(x.shape[:-1], k, n, norm, residual)


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """Whether AMX tiles run here (the CPU has AMX-BF16 and the kernel may use the tile state)."""
    lib, _ = int4_cpu._library()
    return lib is not None and int4_cpu.available() and lib.graphrt_bf16_has_amx() == 1


def lane_rows() -> int:
    """The most rows (the batch) the CPU lane computes with this kernel: on AMX tiles every row of a tile serves
    from one weight load (MAX_ROWS), on AVX512-BF16 LANE_ROWS; beyond it, oneDNN's packed kernel."""
    return MAX_ROWS if amx_available() else LANE_ROWS


def bf16_gemv(x: torch.Tensor, w: torch.Tensor, portable: bool = False, *,
              norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
              residual: torch.Tensor | None = None, amx: bool | None = None) -> torch.Tensor:
    """x bf16 [..., K] (or [..., 2K] = [gate | up] with silu) times w bf16 [N, K] -> y bf16 [..., N]; the neighbours
    as int4_cpu.int4_gemv's. portable: the lane-by-lane path (tests; bitwise equal to the vector path). amx: AMX
    tiles (None: where they run and there are at least AMX_ROWS rows); their float32 sums go in another order."""
    lib, why = int4_cpu._library()
    if lib is None:
        raise RuntimeError(f"the CPU GEMV kernels are not built: {why}")
    n, k = w.shape
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = w.contiguous()
    b = x2.shape[0]
    y = torch.empty(b, n, dtype=torch.bfloat16)
    xe = torch.empty(b, k, dtype=torch.bfloat16)
    nw = norm[0].contiguous() if norm is not None else None
    res = residual.reshape(b, n).contiguous() if residual is not None else None
    tiles = not portable and (amx if amx is not None else amx_available() and b >= AMX_ROWS)
    if tiles and not amx_available():
        raise RuntimeError("AMX tiles do not run on this CPU")
    xt = torch.empty(b * k, dtype=torch.bfloat16) if tiles else None
    invoke(lib.graphrt_bf16_gemv, x2, w, y, xe, b, n, k, torch.get_num_threads(), 0 if portable else 2 if tiles else 1,
           nw, float(norm[1]) if norm is not None else 0.0, int(silu), res, xt, reads=(x2, res), out=y)
    return y.view(*x.shape[:-1], n)
