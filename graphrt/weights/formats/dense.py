"""Dense weights in a float dtype (fp32, fp16, bf16): the format every checkpoint has by default.

On the CPU lane (weights computed by the CPU from host memory), a bf16 matrix is computed by graphrt's GEMV
(`for_cpu` marks it; bf16_cpu.py: AVX512-BF16, software prefetch, RMSNorm / silu * up / residual taken in through
`linear_fused`) on the group buffer's own bytes, the ones prompt steps stream to the GPU. Where that kernel does not
run, the matrix gets oneDNN's packed copy at load (`torch.ops.mkldnn._reorder_linear_weight`, an opaque tensor
held beside the buffer) and `linear` runs oneDNN's kernel on it. From DRAM on the H100 host (tools/cpu_gemv_probe.py,
weights cycled so the cache cannot serve them, 15 threads, one row) oneDNN read these matrices at 55-80 GB/s.
On CUDA, one input row times a large bf16 / fp16 matrix runs graphrt's Triton GEMV (dense_gemv.py); the rest cuBLAS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import bf16_cpu, dense_gemv
from .base import PartSpec


@dataclass(frozen=True)
class Dense:
    dtype: torch.dtype
    name: str = "dense"

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        return (PartSpec("w", tuple(shape), self.dtype),)

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"w": dense.to(self.dtype)}

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        if "gemv" in parts and bf16_cpu.fusable(x, parts["w"]):   # the CPU lane's GEMV (for_cpu)
            y = bf16_cpu.bf16_gemv(x, parts["w"])
            return y + bias if bias is not None else y
        if "packed" in parts:   # the CPU lane's oneDNN copy (for_cpu); x [..., in] -> [..., out]
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), parts["packed"], bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
        if bias is None and dense_gemv.fits(x, parts["w"]):     # one row on CUDA: the Triton GEMV
            return dense_gemv.dense_gemv(x, parts["w"])
        return F.linear(x, parts["w"], bias)

    def linear_fused(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                     norm: tuple | None = None, silu: bool = False, residual: torch.Tensor | None = None,
                     rope=None) -> torch.Tensor | None:
        """On the CPU lane (for_cpu's "gemv"): graphrt's GEMV with RMSNorm, silu * up and the residual taken in.
        On CUDA only the residual (base.linear_fused): residual + x W^T in one kernel, one rounding: the Triton
        GEMV for one row of a large matrix, else one cuBLAS GEMM with beta = 1 written into residual's memory;
        None (the steps apart) for anything else or elsewhere."""
        if "gemv" in parts:
            if bias is None and rope is None and bf16_cpu.fusable(x, parts["w"], norm, silu, residual):
                return bf16_cpu.bf16_gemv(x, parts["w"], norm=norm, silu=silu, residual=residual)
            return None
        if residual is None or norm is not None or silu or rope is not None:
            return None
        w = parts.get("w")
        if bias is None and "packed" not in parts and dense_gemv.fits(x, w) and residual.dtype == x.dtype \
                and residual.numel() == w.shape[0]:
            return dense_gemv.dense_gemv(x, w, residual)
        if (not x.is_cuda or bias is not None or "packed" in parts or not residual.is_contiguous()
                or residual.dtype != x.dtype or w.dtype != x.dtype):
            return None
        return residual.view(-1, w.shape[0]).addmm_(x.reshape(-1, x.shape[-1]), w.t()).view(residual.shape)

    def for_cpu(self, parts: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """The parts the CPU lane computes with: a bf16 matrix is marked for graphrt's GEMV ("gemv", an empty
        tensor: the kernel reads "w") where it runs and `rows` (the batch) is at most bf16_cpu.lane_rows(), else gains
        oneDNN's packed copy for `rows`-row inputs (made once, here); other dtypes, or neither kernel, keep their
        parts."""
        if self.dtype == torch.bfloat16 and bf16_cpu.available() and (rows <= bf16_cpu.lane_rows()
                                                                      or not onednn_available()):
            return {**parts, "gemv": torch.empty(0)}
        if self.dtype != torch.bfloat16 or not onednn_available():
            return parts
        return {**parts, "packed": torch.ops.mkldnn._reorder_linear_weight(parts["w"], rows)}

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, parts["w"]).to(dtype)

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts["w"].to(dtype)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 builds with mkldnn and bf16 support)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())
