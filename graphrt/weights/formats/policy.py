"""Quantization on load: which format each matrix of a float checkpoint is stored in.

`quantization_policy(name, compute_dtype, device)`:
  "int8"  every linear layer Int8 (per-channel int8, see int8.py)
  "fp8"   every linear layer FP8 (e4m3 + per-channel scale, see fp8.py); CUDA devices need compute
          capability >= 8.9 (ConfigError otherwise)
  "int4"  every linear layer Int4 (groups of 128 along `in`, fewer where `in` needs it; see int4.py), packed for
          the device it will run on (`int4_packing`: on CUDA the "blocked" layout of the NVRTC row kernel and
          the Triton GEMV, or ATen's tinygemm "cuda" layout where NVRTC is missing; on the CPU "blocked" for
          graphrt's AVX512-BF16 kernel in bfloat16, else ATen's "cpu" layout);
          "int4-g64" / "int4-g32": smaller groups, 0.25 / 0.75 bits per weight more, closer to the original (a
          checkpoint that was itself 4-bit in blocks of 32, as GGUF Q4_0/Q4_1 are, survives groups of 32 almost
          exactly)
  None    nothing quantized (every matrix dense in the compute dtype)
The token embedding stays dense in the compute dtype: decode reads only B rows of it per step, so quantizing
it saves memory but no time, and a dense table is exact. The LM head, when untied, is quantized like the other
matrices (it is the largest matrix and is read whole every step). A tied LM head *is* the embedding table, so
it stays dense with it.
"""
from __future__ import annotations

import os

import torch

from ...config import ConfigError
from ..layout import FormatPolicy
from . import int4_cpu, int4_cuda
from .fp8 import FP8, fp8_supported
from .int4 import Int4
from .int8 import Int8
from .gemv import _triton

QUANTIZATIONS: tuple[str, ...] = ("int8", "fp8", "int4", "int4-g64", "int4-g32")


def quantization_policy(quantization: str | None, compute_dtype: torch.dtype, device: torch.device | str,
                        in_features: tuple[int, ...] = ()) -> FormatPolicy:
    """in_features: the linear layers' input widths as this process holds them (`linear_in_features`); the
    blocked int4 layout needs each % 64, ATen's tinygemm % 32, so bfloat16 falls back to tinygemm without it."""
    device = torch.device(device)
    if quantization is None:
        return FormatPolicy(compute_dtype)
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} "
                          "(or None for unquantized weights)")
    if quantization == "int8":
        fmt = Int8(compute_dtype)
    elif quantization == "fp8":
        # (a CUDA device that is not here: planning only, nothing to check)
        if not fp8_supported(device) and not (device.type == "cuda" and not torch.cuda.is_available()):
            what = device
            if device.type == "cuda" and torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability(device)
                what = f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
            raise ConfigError(f"quantization='fp8' needs a GPU of compute capability 8.9 or newer (Ada, Hopper, "
                              f"Blackwell) or the CPU; {what} has no FP8 GEMM. Use quantization='int8' or 'int4'")
        fmt = FP8(compute_dtype)
    elif quantization.startswith("int4"):
        group = 128 if quantization == "int4" else int(quantization.split("-g")[1])
        fmt = Int4(compute_dtype, group_size=group, packing=int4_packing(device, compute_dtype, in_features, group))
    return FormatPolicy(compute_dtype, matrix=fmt, embedding=None, lm_head=fmt)


def int4_packing(device: torch.device, compute_dtype: torch.dtype, in_features: tuple[int, ...] = (),
                 group_size: int = 128) -> str:
    """The int4 layout for `device`. On the CPU: "blocked" (graphrt's C++ kernel, int4_cpu.py; the bytes the GPU
    streams) for bfloat16 compute where the kernel runs (AVX512-BF16), the groups are 128 or 256 and every input
    width a multiple of 128; else ATen's "cpu" layout. On CUDA the "blocked" layout (the
    NVRTC kernel at 1..4 rows, int4_cuda.py; the Triton GEMV at 5..16 rows) where the NVRTC kernel compiles and
    every input width is a multiple of 64 (the layout's block), and for float32 / float16 compute, which
    tinygemm would round to bfloat16; else ATen's tinygemm "cuda" layout (widths % 32).
    GRAPHRT_INT4_PACKING=cuda|blocked overrides the CUDA choice (the quant bench measures both in one run)."""
    if device.type != "cuda":
        ok = (compute_dtype == torch.bfloat16 and group_size in int4_cpu.GROUPS
              and not any(k % 128 for k in in_features) and int4_cpu.available())
        return "blocked" if ok else "cpu"
    forced = os.environ.get("GRAPHRT_INT4_PACKING")
    if forced in ("cuda", "blocked"):
        return forced
    if forced:
        raise ConfigError(f"GRAPHRT_INT4_PACKING={forced!r}: use 'cuda' (tinygemm) or 'blocked', or unset it")
    if not _triton():
        return "cuda"
    if compute_dtype != torch.bfloat16:
        return "blocked"
    row_kernel = torch.cuda.is_available() and int4_cuda.available(device.index or 0)
    return "blocked" if row_kernel and not any(k % 64 for k in in_features) else "cuda"


def linear_in_features(cfg, tensor_parallel: int = 1) -> tuple[int, ...]:
    """Input widths of a layer's linear maps on one of `tensor_parallel` ranks (o and down split by input)."""
    heads = cfg.num_heads * cfg.head_dim
    return (cfg.hidden_size, heads // tensor_parallel, cfg.intermediate_size // tensor_parallel)
