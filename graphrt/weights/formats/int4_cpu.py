"""The CPU int4 kernel (source and math: int4_cpu_source.py): built once per machine with the system's C++
compiler into graphrt's cache, loaded with ctypes, called with the tensors' pointers (ctypes releases the GIL
for the call; the kernels run on a worker pool of their own, cpu_pool_source.py, which says why not OpenMP).

Where it runs: bfloat16 activations, the "blocked" layout, on a CPU with AVX512-BF16 (`available()`); there the
CPU policy packs int4 "blocked" (policy.int4_packing), so a CPU-lane group holds the bytes the GPU streams. On
the H100 host's Xeon (tools/cpu_gemv_probe.py, weights cycled so the cache cannot serve them, 15 threads, one row):
gate/up 28672 x 4096 at 159 G weights/s against ATen's 148, down 4096 x 14336 at 132 against 101 (docs/results/
2026-11-26-h100-cpu-gemv-probe-15414cb.json); at 4 rows it is 15-20% slower than ATen's (it runs rows in fours).
This module also builds and loads the bf16 and int8 GEMVs (bf16_cpu.py, int8_cpu.py): one library. The portable path computes
the same operations lane by lane (bitwise equal; tests compare them) and is the reference, not a fallback: a CPU
without AVX512-BF16 keeps ATen's "cpu" layout and kernel.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .bf16_cpu_source import SOURCE as BF16_SOURCE
from .cpu_calls import invoke
from .cpu_pool_source import SOURCE as POOL_SOURCE
from .cpu_program_source import SOURCE as PROGRAM_SOURCE
from .int4_cpu_source import SOURCE as INT4_SOURCE
from .int8_cpu_source import SOURCE as INT8_SOURCE
from .lane_signal_source import SOURCE as LANE_SOURCE

SOURCE = POOL_SOURCE + INT4_SOURCE + BF16_SOURCE + INT8_SOURCE + PROGRAM_SOURCE + LANE_SOURCE   # one library: the
# bf16 and int8 GEMVs (bf16_cpu.py, int8_cpu.py) use the int4 source's helpers; programs of calls (cpu_program.py)
# the three GEMVs; the CPU lane's serving loop (exec/lane_signal.py) the pool's and the programs

GROUPS = (128, 256)     # group sizes the kernel takes (it works in 128-column chunks)
MAX_ROWS = 16          # activation rows per call: the GEMV regime (the C entries keep 16 norm scales); more rows
                       # dequantize, then F.linear
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-std=c++17")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphrt" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not). Built into the cache once (written to a temporary name, then renamed:
    never a half-written library)."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler (g++, c++ or clang++; or set CXX)"
    tag = hashlib.sha256((SOURCE + " ".join(FLAGS) + cxx).encode()).hexdigest()[:16]
    path = _cache_dir() / f"int4_cpu_{tag}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, lib = Path(tmp) / "int4_cpu.cpp", Path(tmp) / "int4_cpu.so"
            src.write_text(SOURCE)
            run = subprocess.run([cxx, *FLAGS, str(src), "-o", str(lib)], capture_output=True, text=True)
            if run.returncode != 0:
                return None, f"{cxx} failed: {run.stderr.strip()[-400:]}"
            os.replace(lib, path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:   # e.g. a cached library from another machine's toolchain: delete it to rebuild
        return None, f"cannot load {path} ({e}); delete it and graphrt builds it again"
    lib.graphrt_int4_gemv.restype = None
    lib.graphrt_int4_gemv.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int] * 6
                                     + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p])
    lib.graphrt_int4_has_avx512bf16.restype = ctypes.c_int
    lib.graphrt_cpu_pool_spin.restype = None
    lib.graphrt_cpu_pool_spin.argtypes = [ctypes.c_long]
    lib.graphrt_cpu_pool_guided.restype = None
    lib.graphrt_cpu_pool_guided.argtypes = [ctypes.c_int]
    lib.graphrt_bf16_gemv.restype = None
    lib.graphrt_bf16_gemv.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
                                      + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p])
    lib.graphrt_bf16_has_amx.restype = ctypes.c_int
    lib.graphrt_int8_gemv.restype = None
    lib.graphrt_int8_gemv.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
                                      + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p])
    lib.graphrt_lane_wait.restype = ctypes.c_int
    lib.graphrt_lane_wait.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.graphrt_lane_done.restype = None
    lib.graphrt_lane_done.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.graphrt_lane_serve.restype = ctypes.c_int
    lib.graphrt_lane_serve.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    lib.graphrt_program_set.restype = None
    lib.graphrt_program_set.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.graphrt_program_drop.restype = None
    lib.graphrt_program_drop.argtypes = [ctypes.c_int]
    lib.graphrt_program_run.restype = ctypes.c_int
    lib.graphrt_program_run.argtypes = [ctypes.c_int]
    return lib, ""


def set_spin(microseconds: int) -> None:
    """How long the kernels' workers spin after a job before they sleep (cpu_pool_source.py): the CPU lane sets
    a few milliseconds, so they stay awake between the groups of a step; the default, 50 us, leaves the CPU to
    other work soon after a product."""
    lib, _ = _library()
    if lib is not None:
        lib.graphrt_cpu_pool_spin(int(microseconds))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it does not build (see why_unavailable)."""
    return _library()[0]


def built() -> bool:
    """Whether the kernel library builds and loads here (either path)."""
    return _library()[0] is not None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the AVX512-BF16 path runs on this CPU (GRAPHRT_INT4_CPU=0 turns it off: ATen's kernel then)."""
    if os.environ.get("GRAPHRT_INT4_CPU", "1") == "0":
        return False
    lib, _ = _library()
    return lib is not None and bool(lib.graphrt_int4_has_avx512bf16())


def why_unavailable() -> str:
    lib, why = _library()
    return why or ("" if lib is None or lib.graphrt_int4_has_avx512bf16() else "this CPU has no AVX512-BF16")


def supports(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor) -> bool:
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dtype == torch.uint8
            and 1 <= rows <= MAX_ROWS and k % 64 == 0 and w.shape[-1] * 2 == k and k % sz.shape[0] == 0
            and (k // sz.shape[0]) in GROUPS and sz.dtype == torch.bfloat16 and available())


def fusable(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, norm: tuple | None, silu: bool,
            residual: torch.Tensor | None) -> bool:
    """Whether `int4_gemv` takes this call with these neighbours (see its docstring)."""
    k = w.shape[-1] * 2
    lead = x.shape[:-1]
    if norm is not None and silu:
        return False
    x_in = x[..., :k] if silu else x
    if silu and x.shape[-1] != 2 * k:
        return False
    return supports(x_in, w, sz) and neighbours_fit(lead, k, sz.shape[1], norm, residual)


def neighbours_fit(lead: tuple[int, ...], k: int, n: int, norm: tuple | None, residual: torch.Tensor | None) -> bool:
    """Whether a norm weight (bf16 [k]) and a residual (bf16 [*lead, n]) on the CPU are what the kernels take
    (both kernels: this one and bf16_cpu's)."""
    if norm is not None and not (norm[0].dtype == torch.bfloat16 and norm[0].shape == (k,)
                                 and norm[0].device.type == "cpu"):
        return False
    return residual is None or (residual.dtype == torch.bfloat16 and residual.shape == (*lead, n)
                                and residual.device.type == "cpu")


def int4_gemv(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, portable: bool = False, *,
              norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """x bf16 [..., K] (CPU), w uint8 [N, K/2] blocked, sz bf16 [K/G, N, 2] -> y bf16 [..., N].
    norm (weight bf16 [K], eps): the product of RMSNorm(x) * weight; silu: x is [..., 2K] = [gate | up] and the
    product reads silu(gate) * up; residual [..., N]: residual + the product, rounded once. The neighbours round
    as the steps apart do (models/fused.py's reference math).
    portable: the lane-by-lane path (tests; bitwise equal to the vector path)."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the CPU int4 kernel is not built: {why}")
    k = w.shape[1] * 2
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w, sz = w.contiguous(), sz.contiguous()
    b, n, groups = x2.shape[0], w.shape[0], sz.shape[0]
    y = torch.empty(b, n, dtype=torch.bfloat16)
    xe, xp = torch.empty(b, k, dtype=torch.bfloat16), torch.empty(b, k, dtype=torch.bfloat16)
    sums = torch.empty(b * groups, dtype=torch.float32)
    nw = norm[0].contiguous() if norm is not None else None
    res = residual.reshape(b, n).contiguous() if residual is not None else None
    invoke(lib.graphrt_int4_gemv, x2, w, sz, y, xe, xp, sums, b, n, k, k // groups, torch.get_num_threads(),
           0 if portable else 1, nw, float(norm[1]) if norm is not None else 0.0, int(silu), res, reads=(x2, res),
           out=y)
    return y.view(*x.shape[:-1], n)
