"""Lazy reading of Hugging Face checkpoint directories (one safetensors file or an index of shards)."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..config import ConfigError, ModelConfig
from ..text import generation_eos_ids, load_chat_template, load_tokenizer
from .compressed_tensors import SchemeError, fp8_scheme
from .formats import stack_rows
from .formats.fp8 import FP8
from .layout import GroupLayout, TensorSpec, expected_tensors
from .shard import Shard, ffn_part

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint graphrt cannot load; the message names the file or tensor and the fix."""


class Checkpoint:
    """Index of a model directory: config, tensor name -> shard file. Tensors are read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory; pass a Hugging Face model directory "
                                  "(config.json + model.safetensors or shards with an index)")
        try:
            self.config = ModelConfig.from_file(self.path)
            self.fp8 = fp8_scheme(json.loads((self.path / "config.json").read_text()))
        except (ConfigError, SchemeError) as e:
            raise CheckpointError(f"{self.path / 'config.json'}: {e}" if isinstance(e, SchemeError) else str(e)) from None
        self.tensor_files = self._index()
        self._check_tensors()
        tok = self.path / "tokenizer.json"
        self.tokenizer = load_tokenizer(tok if tok.is_file() else None)
        self.chat_template = load_chat_template(self.path)
        self.eos_ids = generation_eos_ids(self.path, self.config.eos_token_ids)

    def tensor_formats(self, compute_dtype: torch.dtype) -> tuple:
        """Formats of tensors stored pre-quantized: FP8 for the e4m3 matrices of a compressed-tensors file."""
        return tuple((name, FP8(compute_dtype)) for name in self.fp8_tensors)

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard {shard.name!r}, which is not in "
                                          f"{self.path}; copy the missing shard or fix the index")
        elif single.is_file():
            files = {}
            with self._open(single) as f:
                files = {name: single for name in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors and no model.safetensors.index.json; "
                                  "graphrt loads safetensors checkpoints only")
        for shard in sorted(set(files.values())):
            self._check_file(shard)
        return files

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read safetensors file ({e}); the file is corrupt or "
                                  "truncated: download or convert it again") from None

    def _check_file(self, file: Path) -> None:
        """safe_open reads only the header; check that the data the header describes is all there."""
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{file}: corrupt safetensors header; download or convert it again") from None
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = file.stat().st_size
        if size < 8 + header_len + end:
            raise CheckpointError(f"{file}: truncated: {size} bytes, the header needs {8 + header_len + end}; "
                                  "download or convert it again")
        self._open(file).__exit__(None, None, None)

    def _check_tensors(self) -> None:
        by_file: dict[Path, list[str]] = {}
        for name, file in self.tensor_files.items():
            by_file.setdefault(file, []).append(name)
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        self.fp8_tensors: list[str] = []
        for file, names in by_file.items():
            with self._open(file) as f:
                present = set(f.keys())
                for name in names:
                    if name in present:
                        s = f.get_slice(name)
                        shapes[name] = (tuple(s.get_shape()), s.get_dtype())
        for name, shape in expected_tensors(self.config).items():
            if name not in shapes:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                      f"(expected shape {list(shape)} for {self.config.architecture})")
            found, dtype = shapes[name]
            if found != shape:
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(found)}, expected "
                                      f"{list(shape)} from config.json; the checkpoint and its config disagree")
            if dtype == "F8_E4M3" and self.fp8 is not None and len(shape) == 2:
                scale = name.removesuffix("weight") + "weight_scale"
                if scale not in shapes:
                    raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {scale!r}; the "
                                          "compressed-tensors checkpoint is incomplete")
                self.fp8_tensors.append(name)
            elif dtype not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}; graphrt reads F32, F16 and "
                                      "BF16 checkpoints, and F8_E4M3 ones with a compressed-tensors config")

    @staticmethod
    def _stored(read, name: str, t: TensorSpec, device: torch.device) -> dict[str, torch.Tensor]:
        value = read(name)
        if value.dtype == torch.float8_e4m3fn:  # compressed-tensors: weight and weight_scale
            return FP8.from_stored(value, read(name.removesuffix("weight") + "weight_scale"))
        return t.format.encode(value, device) if t.is_matrix else {"w": value}

    def fill_groups(self, groups: list[GroupLayout], buffer_for, device: torch.device,
                    shard: Shard | None = None) -> Iterator[GroupLayout]:
        """For each group, read its tensors (one at a time) into `buffer_for(group)` (a uint8 tensor),
        each stored in its format (`encode`: a cast, or quantization on load; FP8 files as stored),
        yielding the group when it is complete. With a tensor-parallel `shard`, each tensor is its rank's slice; an
        MLP part's group (`g.ffn`) holds its intermediate rows of that."""
        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            part_of: Shard | None = shard

            def read(name: str) -> torch.Tensor:
                file = self.tensor_files[name]
                if file not in handles:
                    handles[file] = stack.enter_context(self._open(file))
                t = handles[file].get_tensor(name)
                return part_of.slice(name, t).contiguous() if part_of is not None else t

            for g in groups:
                part_of = ffn_part(self.config, shard, g.ffn) if g.ffn else shard
                buffer = buffer_for(g)
                for t in g.tensors:
                    stored = stack_rows(t.format, [self._stored(read, name, t, device) for name in t.checkpoint_names])
                    for part, offset in t.parts:
                        buffer[offset:offset + part.nbytes].view(part.dtype).view(part.shape).copy_(stored[part.name])
                yield g
