"""Quantization on load (the quantized formats land in the next commit)."""
from __future__ import annotations

import torch

QUANTIZATIONS: tuple[str, ...] = ()


def quantization_policy(quantization: str, compute_dtype: torch.dtype, device: torch.device):
    raise ValueError(f"unknown quantization {quantization!r}")
