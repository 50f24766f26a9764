"""One-row GEMV for dense 16-bit weights on CUDA, with the residual add and split-K in ONE kernel.

    y[n] = residual[n] + sum_k x[k] * w[n, k]        x [K], w [N, K] (unit stride along K), residual [N]

cuBLAS serves a one-row product of the 8B shape with two kernels where it splits K (the GEMM and its split-K
reduction, ~2 us each on the H100), and leaves SMs idle on the qkv stack (96 tiles of 64 rows on 132 SMs). On the
H100, with weights read from HBM (tools/dense_gemv_probe.py, 2026-11-26): qkv 19.1 us against cuBLAS's 20.5, o 15.2
against 16.5, gate_up 77.0 against 85.7, down 42.3 against 44.4, the LM head 333.6 against 369.8. Here a
grid of (N / BLOCK_N, SPLIT) programs walks K in BLOCK_K chunks, acc [BLOCK_N, BLOCK_K] float32 += w * x (one FMA
per weight, one row sum at the end). With SPLIT > 1 each program stores its float32 partial sums and counts itself
done on a per-row-block counter; the last one adds the partials in split order (deterministic), adds the residual,
rounds once and zeroes the counter for the next call. Shapes decide the plan (no autotuning inside graph capture).
"""
from __future__ import annotations

import functools

import torch

from .counters import zeroed_counters
from .gemv import _triton

_KERNEL = None
DTYPES = (torch.bfloat16, torch.float16)


def _build():
    triton, tl = _triton()

    @triton.jit
    def _dense_gemv_kernel(x_ptr, w_ptr, res_ptr, out_ptr, part_ptr, count_ptr, N, K,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                           K_SPLIT: tl.constexpr, HAS_RES: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for kk in range(0, K_SPLIT, BLOCK_K):
            cols = pid_s * K_SPLIT + kk + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + cols[None, :])
            xv = tl.load(x_ptr + cols)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if SPLIT == 1:
            if HAS_RES:
                y += tl.load(res_ptr + rows).to(tl.float32)
            tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(part_ptr + pid_s * N + rows, y)
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
            if done == SPLIT - 1:
                tl.store(count_ptr + pid_n, 0)
                total = tl.zeros((BLOCK_N,), tl.float32)
                for s in range(SPLIT):
                    total += tl.load(part_ptr + s * N + rows)
                if HAS_RES:
                    total += tl.load(res_ptr + rows).to(tl.float32)
                tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty))

    return _dense_gemv_kernel


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(n: int, k: int, sms: int, block_n: int = 16, block_k: int = 512, split: int | None = None):
    """(BLOCK_N, BLOCK_K, SPLIT, K_SPLIT) or None where the shape does not tile: SPLIT for about 4 programs per SM."""
    if n % block_n or k % block_k:
        return None
    chunks = k // block_k
    if split is None:
        split = 1
        while n // block_n * split < 4 * sms and chunks % (2 * split) == 0 and split < 16:
            split *= 2
    if chunks % split:
        return None
    return block_n, block_k, split, k // split


MIN_BYTES = 16 << 20     # smaller matrices keep cuBLAS (measured only on the 8B shape's matrices)
BLOCKS = (8, 1024)       # BLOCK_N, BLOCK_K: the best of tools/dense_gemv_probe.py's plans over the 8B shapes


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """One input row, 16-bit weights of x's dtype, a shape that tiles by BLOCKS and of at least MIN_BYTES."""
    n, k = w.shape
    return (x.is_cuda and x.dtype in DTYPES and w.dtype == x.dtype and x.numel() == k and n * k * 2 >= MIN_BYTES
            and n % BLOCKS[0] == 0 and k % BLOCKS[1] == 0 and w.stride(1) == 1 and w.stride(0) == k
            and bool(_triton()))


def dense_gemv(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None,
               blocks: tuple[int, int] = BLOCKS, split: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [..., K] holding one row, w [N, K] -> [..., N] (+ residual, same shape) in x's dtype. Call `fits` first."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build()
    n, k = w.shape
    p = plan(n, k, _sms(x.device.index or 0), *blocks, split)
    block_n, block_k, sp, k_split = p
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if sp > 1:
        part = torch.empty(sp * n, dtype=torch.float32, device=x.device)
        count = zeroed_counters(x.device, n // block_n)
    else:
        part = count = out
    res = residual.contiguous() if residual is not None else out
    _KERNEL[(n // block_n, sp)](x.reshape(-1), w, res, out, part, count, n, k, BLOCK_N=block_n, BLOCK_K=block_k,
                                SPLIT=sp, K_SPLIT=k_split, HAS_RES=residual is not None, num_warps=num_warps)
    return out
