"""Weight sources: a Hugging Face directory (safetensors) or a GGUF file, and the formats to store in.

`open_source(path)` validates everything it can (config, tensor names, shapes and types) before any
weight is read. A source has: `path`, `config`, `tokenizer`, `chat_template`, `eos_ids`,
`tensor_formats(dtype)` (formats the file's tensors already have: pre-quantized checkpoints) and
`fill_groups(groups, buffer_for, device)`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError
from .checkpoint import Checkpoint, CheckpointError
from .formats.policy import QUANTIZATIONS, linear_in_features, quantization_policy
from .layout import FormatPolicy


def open_source(path: str | Path):
    path = Path(path)
    if path.suffix == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF"):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        from .gguf_source import GGUFCheckpoint
        return GGUFCheckpoint(path)
    return Checkpoint(path)


def weight_policy(source, quantization: str | None, dtype: torch.dtype, device: torch.device,
                  tensor_parallel: int = 1) -> FormatPolicy:
    """The formats of the loaded weights: the file's own (pre-quantized files), or quantize on load."""
    stored = source.tensor_formats(dtype)
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
        if stored:
            raise ConfigError(f"{source.path} is already quantized ({stored[0][1].name}); load it without "
                              "quantization=..., or quantize its float original instead")
        return quantization_policy(quantization, dtype, device, linear_in_features(source.config, tensor_parallel))
    return FormatPolicy(dtype, per_tensor=stored)
