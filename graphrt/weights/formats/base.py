"""What a weight format is: how a matrix is stored in a group buffer, and the linear that reads it.

A format is data the model math receives with the weight (`Weight(format, parts)`); the math calls
`linear(x, w)` and never asks which format it has. Every part of every format lives inside the one
contiguous group buffer, so one copy moves a quantized group (data and scales together) into a slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


# Rows (tokens) up to which weight-only kernels (int8/int4 GEMV) run; above it (prefill) a format
# dequantizes once and runs a dense GEMM. The choice depends on shapes only, so eager and captured
# steps of the same shape take the same path.
GEMV_MAX_ROWS = 16


@dataclass(frozen=True)
class PartSpec:
    """One stored tensor of a weight: `name` ("w", "scale", "zero", ...), shape and dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class WeightFormat(Protocol):
    """A storage format for a [out_features, in_features] matrix (or an [vocab, hidden] embedding).
    Implementations are frozen dataclasses (hashable, comparable, printable)."""
    name: str

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        """The tensors that store a matrix of this logical shape."""
        ...

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Float matrix [out, in] -> stored parts (on the CPU; `device` is where they will be used,
        for formats whose packed layout depends on it)."""
        ...

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] in the compute dtype -> [..., out] in the compute dtype."""
        ...

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """ids [B, T] -> rows [B, T, in] in `dtype` (only formats whose rows can be gathered)."""
        ...

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Stored parts -> the matrix [out, in] in `dtype` (reference and CPU paths)."""
        ...


class Weight(NamedTuple):
    """A matrix as the model math receives it: its format and typed views of its parts."""
    format: WeightFormat
    parts: dict[str, torch.Tensor]
    shape: tuple[int, int]


def stackable(fmt: WeightFormat) -> bool:
    """Whether matrices of this format, stacked along rows (out), are one matrix of the format whose parts are the
    parts stacked (`stack_rows`): true where every row is stored on its own (per-row or per-row-group scales)."""
    return bool(getattr(fmt, "rows_stack", True))


def row_axis(fmt: WeightFormat, part: str) -> int:
    """The axis of a stored part along which the matrix's rows (out) run: `fmt.row_axis(part)`, 0 unless the format
    says otherwise (int4's scales are [in / G, out, 2])."""
    return getattr(fmt, "row_axis", lambda name: 0)(part)


def stack_rows(fmt: WeightFormat, stored: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stored parts of several [out_i, in] matrices -> the parts of their [sum out_i, in] stack. Each part is
    concatenated along its row axis (`row_axis`)."""
    if len(stored) == 1:
        return stored[0]
    return {name: torch.cat([s[name] for s in stored], dim=row_axis(fmt, name)) for name in stored[0]}


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> x W^T (+ bias) [..., out]; with `residual` [..., out]: residual + that, in the product's own
    kernel where the format has one for this call (`linear_fused`, which may reuse residual's memory: the caller
    gives it up), else as a separate add."""
    if residual is None:
        return w.format.linear(x, w.parts, bias)
    out = linear_fused(x, w, bias, residual=residual)
    return out if out is not None else residual + w.format.linear(x, w.parts, bias)


class RopeAppend(NamedTuple):
    """What follows a stacked [q | k | v] product in attention: RoPE on q and k and the KV append
    (models/fused.rope_append)."""
    cos: torch.Tensor        # [B, 1, T, D] compute dtype
    sin: torch.Tensor        # [B, 1, T, D]
    positions: torch.Tensor  # [B, T] int64: where row b's token t goes in cache row b
    k_cache: torch.Tensor    # [maxB, Hkv, S, D]
    v_cache: torch.Tensor    # [maxB, Hkv, S, D]
    num_heads: int
    num_kv_heads: int


def linear_fused(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, *,
                 norm: tuple[torch.Tensor, float] | None = None, silu: bool = False,
                 residual: torch.Tensor | None = None, rope: RopeAppend | None = None) -> torch.Tensor | None:
    """The product with its neighbours in one kernel, where the weight's format has one for this call
    (`format.linear_fused`); None otherwise, and the caller runs the steps apart. What it computes:
      norm (weight [in], eps): linear(rms_norm(x, weight, eps), w)
      silu: x [..., 2 in] (a stacked gate | up product): linear(silu(x[..., :in]) * x[..., in:], w)
      residual [..., out]: residual + the product
      rope: q, k, v = the product's columns; returns q rotated [B, H, T, D] and writes k rotated and v into the
            caches (models/fused.rope_append)."""
    fn = getattr(w.format, "linear_fused", None)
    return fn(x, w.parts, bias, norm=norm, silu=silu, residual=residual, rope=rope) if fn is not None else None


def embedding(ids: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return w.format.embedding(ids, w.parts, dtype)


def for_cpu(views: dict[str, "torch.Tensor | Weight"], rows: int) -> dict[str, "torch.Tensor | Weight"]:
    """A group's views as the CPU lane computes them: each matrix's format may add parts made once for the CPU's
    kernel (`format.for_cpu(parts, rows)`, e.g. a dense bf16 matrix marked for graphrt's CPU GEMV, or oneDNN's packed
    copy for large batches); formats without it are unchanged."""
    out = {}
    for key, w in views.items():
        prepare = getattr(w.format, "for_cpu", None) if isinstance(w, Weight) else None
        out[key] = Weight(w.format, prepare(w.parts, rows), w.shape) if prepare else w
    return out
