"""A GGUF file (llama.cpp) as a weight source, with the same interface as `Checkpoint`.

The file's quantized matrices keep their bytes: `tensor_formats` maps every matrix to the format of its GGUF
type (`GGUFQuant`, or `Dense` when the file's float dtype is the compute dtype), and `fill_groups` copies each
matrix's raw rows into the group buffer. llama.cpp stores the rows of attn_q / attn_k interleaved per head
(for its RoPE); those rows are put back in Hugging Face order, which is exact because GGUF quantizes each row on
its own. A matrix whose layout format is not the file's (the caller asked for another format) is dequantized
(bit-exact with the `gguf` package) and encoded into that format.

Everything is checked in `__init__` (architecture, metadata, tensor names, shapes and types) before any weight
is read; problems raise `CheckpointError` naming the file (and the tensor).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
from .checkpoint import CheckpointError
from .formats import Dense, GGUFQuant, WeightFormat, stack_rows
from .formats.gguf import GGML_TYPES, SUPPORTED_TYPES, dequantize, type_name
from .layout import GroupLayout, expected_tensors
from .shard import ffn_part

ARCHITECTURES = {"llama": "LlamaForCausalLM"}
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_MISSING = object()


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj
    .weight"), or None for names graphrt does not map."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order -> Hugging Face order, for any [rows, ...] tensor (floats or raw GGUF rows):
    within each head, llama.cpp stores rows (0, h/2, 1, h/2+1, ...); this returns (0, 1, ..., h-1)."""
    n = rows.shape[0]
    return rows.reshape(num_heads, n // num_heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def build_tokenizer(tokens: list[str], types: list[int], merges: list[str]):
    """Byte-level BPE with SmolLM's pre-tokenizer (single digits, then GPT-2 byte-level splitting); control
    tokens (type 3) are special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


class GGUFCheckpoint:
    """A llama GGUF file: `path`, `config`, `tokenizer`, `chat_template`, `bos_token`, `eos_token`, `eos_ids`,
    `tensor_formats(dtype)`, `fill_groups(groups, buffer_for, device)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        import gguf
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ... on bad files
            raise CheckpointError(f"{self.path}: cannot read GGUF file ({type(e).__name__}: {e}); the file is "
                                  "corrupt, truncated or not GGUF: download or convert it again") from None
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported; graphrt reads "
                                  f"GGUF files of architecture {', '.join(map(repr, ARCHITECTURES))}")
        self.architecture = arch
        self._tensors = self._index()
        self.config = self._config()
        self._check_tensors()
        self.tokens = [str(t) for t in self._field("tokenizer.ggml.tokens", [])]
        self.bos_token = self._token(self._field("tokenizer.ggml.bos_token_id", None))
        self.eos_token = self._token(self._field("tokenizer.ggml.eos_token_id", None))
        template = self._field("tokenizer.chat_template", None)
        self.chat_template_text: str | None = str(template) if template else None
        from ..text import chat_template_from_gguf_metadata
        self.chat_template = chat_template_from_gguf_metadata(self.chat_template_text, self.bos_token, self.eos_token)
        eot = self._field("tokenizer.ggml.eot_token_id", None)
        self.eos_ids = tuple(dict.fromkeys(self.config.eos_token_ids + ((int(eot),) if eot is not None else ())))
        self.tokenizer_error: str | None = None
        self.tokenizer = self._build_tokenizer()

    # ---- metadata ----------------------------------------------------------------------------------------------
    def _field(self, key: str, default=_MISSING):
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
            return default
        return field.contents()

    def _token(self, token_id) -> str | None:
        return self.tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(self.tokens) else None

    def _index(self) -> dict[str, object]:
        tensors = {}
        for t in self._reader.tensors:
            if t.name == "rope_freqs.weight":
                raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' (llama3-style RoPE frequency "
                                      "scaling stored as a tensor) is not supported for GGUF files yet; load the "
                                      "Hugging Face checkpoint instead")
            name = hf_name(t.name)
            if name is not None:
                tensors[name] = t
        return tensors

    def _config(self) -> ModelConfig:
        a = self.architecture
        scaling = self._field(f"{a}.rope.scaling.type", None)
        if scaling not in (None, "none"):
            raise CheckpointError(f"{self.path}: GGUF RoPE scaling {scaling!r} is not supported (plain RoPE only)")
        if "model.embed_tokens.weight" not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing from the GGUF file")
        heads = int(self._field(f"{a}.attention.head_count"))
        hidden = int(self._field(f"{a}.embedding_length"))
        # compute dtype by default: float32 / float16 for files whose matrices are all of that type, else bfloat16
        kinds = frozenset(int(t.tensor_type) for t in self._tensors.values() if len(t.shape) == 2)
        dtype = {frozenset({0}): "float32", frozenset({1}): "float16"}.get(kinds, "bfloat16")
        raw = {
            "architectures": [ARCHITECTURES[a]], "model_type": a,
            "vocab_size": int(self._tensors["model.embed_tokens.weight"].shape[1]),
            "hidden_size": hidden,
            "intermediate_size": int(self._field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self._field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self._field(f"{a}.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._field(f"{a}.rope.freq_base", 10000.0)),
            "rope_scaling": None,
            "max_position_embeddings": int(self._field(f"{a}.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": False, "torch_dtype": dtype,
            "bos_token_id": self._optional_int("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._optional_int("tokenizer.ggml.eos_token_id"),
        }
        try:
            return ModelConfig.from_dict(raw, str(self.path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def _optional_int(self, key: str) -> int | None:
        value = self._field(key, None)
        return None if value is None else int(value)

    def _check_tensors(self) -> None:
        cfg = self.config
        for name, shape in expected_tensors(cfg).items():
            t = self._tensors.get(name)
            if t is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the GGUF file (expected shape "
                                      f"{list(shape)} for a {cfg.num_layers}-layer llama)")
            found = tuple(int(d) for d in reversed(t.shape))
            if found != shape:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} ({name}) has shape {list(found)}, expected "
                                      f"{list(shape)} from the file's metadata")
            try:
                kind = type_name(t.tensor_type)
            except ValueError:
                kind = None
            allowed = SUPPORTED_TYPES if len(shape) == 2 else tuple(_FLOAT_TYPES)
            if kind not in allowed:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} has GGUF type {getattr(t.tensor_type, 'name', t.tensor_type)}, "
                    f"which graphrt cannot read for a {'matrix' if len(shape) == 2 else 'vector'}; supported: "
                    f"{', '.join(allowed)}")
        for q in ("q_proj", "k_proj"):
            heads = cfg.num_heads if q == "q_proj" else cfg.num_kv_heads
            rows = cfg.q_size if q == "q_proj" else cfg.kv_size
            if rows % (2 * heads):
                raise CheckpointError(f"{self.path}: {q} has {rows} rows, not a whole number of row pairs per head")

    def _build_tokenizer(self):
        model = self._field("tokenizer.ggml.model", None)
        pre = self._field("tokenizer.ggml.pre", None)
        if model != "gpt2" or pre != "smollm":
            self.tokenizer_error = (f"{self.path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported "
                                    "for GGUF files yet (byte-level BPE with pre-tokenizer 'smollm' is); "
                                    "use token ids, or the model's Hugging Face tokenizer.json")
            return None
        types = [int(x) for x in self._field("tokenizer.ggml.token_type")]
        merges = [str(m) for m in self._field("tokenizer.ggml.merges")]
        return build_tokenizer(self.tokens, types, merges)

    # ---- weights -----------------------------------------------------------------------------------------------
    def file_type(self, name: str) -> str:
        """GGUF type name ("Q4_K", "F32", ...) of the tensor with Hugging Face name `name`."""
        return type_name(self._tensors[name].tensor_type)

    def tensor_formats(self, compute_dtype: torch.dtype) -> tuple[tuple[str, WeightFormat], ...]:
        """Hugging Face name -> the format that keeps the file's bytes, for every matrix (vectors need none)."""
        out = []
        for name, shape in expected_tensors(self.config).items():
            if len(shape) == 2:
                kind = self.file_type(name)
                fmt = Dense(compute_dtype) if _FLOAT_TYPES.get(kind) == compute_dtype else GGUFQuant(kind, compute_dtype)
                out.append((name, fmt))
        return tuple(out)

    def raw_rows(self, name: str, shard=None) -> torch.Tensor:
        """The file's bytes of tensor `name` as uint8 [rows, bytes per row] (rows in Hugging Face order). With a
        tensor-parallel `shard`: its rows, or for a column split the whole blocks of its columns."""
        raw = self._raw_rows(name)
        part = shard.split(name) if shard is not None else None
        if part is None or raw.shape[0] == 1 and part[0] == "rows":
            return raw
        kind, a, b = part
        if kind == "rows":
            return raw[a:b].contiguous()
        ggml = self.file_type(name)
        _, block, size = GGML_TYPES[ggml]
        if a % block or b % block:
            raise ConfigError(f"{self.path}: {name} ({ggml}, blocks of {block} values) cannot be split at columns "
                              f"{a}..{b} for tensor parallelism; use a tensor-parallel size whose slices are whole "
                              "blocks, or one GPU")
        return raw[:, a // block * size:b // block * size].contiguous()

    def _raw_rows(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        data = np.asarray(t.data)
        rows = int(t.shape[1]) if len(t.shape) == 2 else 1
        raw = torch.from_numpy(np.array(data.view(np.uint8).reshape(rows, -1)))  # a copy: the memmap is read-only
        if name.endswith("self_attn.q_proj.weight"):
            raw = unpermute_rows(raw, self.config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            raw = unpermute_rows(raw, self.config.num_kv_heads)
        return raw

    def dequantized(self, name: str, shard=None) -> torch.Tensor:
        """Tensor `name` (or a shard's part of it) in float32, Hugging Face shape and row order (bit-exact with
        gguf.quants.dequantize)."""
        values = dequantize(self.raw_rows(name, shard), self.file_type(name))
        return values.view(-1) if len(self._tensors[name].shape) == 1 else values

    def _stored(self, name: str, fmt: WeightFormat, device: torch.device, shard=None) -> dict[str, torch.Tensor]:
        kind = self.file_type(name)
        if isinstance(fmt, GGUFQuant) and fmt.ggml_type == kind:
            return {"q": self.raw_rows(name, shard)}
        if isinstance(fmt, Dense) and _FLOAT_TYPES.get(kind) == fmt.dtype:
            return {"w": self.raw_rows(name, shard).view(fmt.dtype)}
        return fmt.encode(self.dequantized(name, shard), device)

    def fill_groups(self, groups: list[GroupLayout], buffer_for, device: torch.device,
                    shard=None) -> Iterator[GroupLayout]:
        """For each group, write its tensors (one at a time) into `buffer_for(group)` (a uint8 tensor) in their
        layout formats, yielding the group when it is complete. With a tensor-parallel `shard`, each tensor is its
        rank's part: whole rows, or the whole blocks of its columns (the file's bytes either way)."""
        for g in groups:
            rows_of = ffn_part(self.config, shard, g.ffn) if g.ffn else shard   # an MLP part: its intermediate rows
            buffer = buffer_for(g)
            for t in g.tensors:
                stored = stack_rows(t.format, [self._stored(name, t.format, device, rows_of) if t.is_matrix else
                                               {"w": self.dequantized(name, rows_of)} for name in t.checkpoint_names])
                for part, offset in t.parts:
                    buffer[offset:offset + part.nbytes].view(part.dtype).view(part.shape).copy_(stored[part.name])
            yield g
