"""Dense weights in a float dtype (fp32, fp16, bf16): the format every checkpoint has by default."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
        return F.linear(x, parts["w"], bias)

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return F.embedding(ids, parts["w"]).to(dtype)

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts["w"].to(dtype)
