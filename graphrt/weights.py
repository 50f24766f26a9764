"""Weight groups: which checkpoint tensors form a group, and how a group is packed into one buffer.

A group (the embedding, a layer, or a layer's attention / MLP half, the head) is the unit that stays
resident or streams. Its tensors are packed into one contiguous byte buffer with a fixed layout, so a
resident GPU buffer, a pinned host buffer and a ring slot all expose the same typed views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

ALIGN = 256  # bytes; every tensor in a group buffer starts on this boundary


@dataclass(frozen=True)
class TensorSpec:
    key: str                 # short name inside the group, e.g. "q" or "gate"
    checkpoint_name: str     # Hugging Face tensor name
    shape: tuple[int, ...]
    offset: int              # byte offset in the group buffer


@dataclass(frozen=True)
class GroupLayout:
    name: str                # "embed", "layer.3", "attn.3", "mlp.3", "head"
    kind: str                # "embed" | "layer" | "attn" | "mlp" | "head"
    layer: int | None
    dtype: torch.dtype
    tensors: tuple[TensorSpec, ...]
    nbytes: int

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensors over a uint8 buffer of at least `nbytes` (host, device or ring slot)."""
        size = torch.tensor([], dtype=self.dtype).element_size()
        out = {}
        for t in self.tensors:
            n = _numel(t.shape) * size
            out[t.key] = buffer[t.offset:t.offset + n].view(self.dtype).view(t.shape)
        return out

    @property
    def num_params(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(name: str, kind: str, layer: int | None, dtype: torch.dtype,
            entries: list[tuple[str, str, tuple[int, ...]]]) -> GroupLayout:
    size = torch.tensor([], dtype=dtype).element_size()
    specs, offset = [], 0
    for key, ckpt, shape in entries:
        specs.append(TensorSpec(key, ckpt, shape, offset))
        offset += -(-_numel(shape) * size // ALIGN) * ALIGN
    return GroupLayout(name, kind, layer, dtype, tuple(specs), offset)


def _attn_entries(cfg: ModelConfig, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    p, h = f"model.layers.{i}.", cfg.hidden_size
    e = [("input_norm", p + "input_layernorm.weight", (h,)),
         ("q", p + "self_attn.q_proj.weight", (cfg.q_size, h)),
         ("k", p + "self_attn.k_proj.weight", (cfg.kv_size, h)),
         ("v", p + "self_attn.v_proj.weight", (cfg.kv_size, h))]
    if cfg.qkv_bias:
        e += [("q_bias", p + "self_attn.q_proj.bias", (cfg.q_size,)),
              ("k_bias", p + "self_attn.k_proj.bias", (cfg.kv_size,)),
              ("v_bias", p + "self_attn.v_proj.bias", (cfg.kv_size,))]
    e.append(("o", p + "self_attn.o_proj.weight", (h, cfg.q_size)))
    return e


def _mlp_entries(cfg: ModelConfig, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    p, h, f = f"model.layers.{i}.", cfg.hidden_size, cfg.intermediate_size
    return [("post_norm", p + "post_attention_layernorm.weight", (h,)),
            ("gate", p + "mlp.gate_proj.weight", (f, h)),
            ("up", p + "mlp.up_proj.weight", (f, h)),
            ("down", p + "mlp.down_proj.weight", (h, f))]


def model_groups(cfg: ModelConfig, dtype: torch.dtype, stream_unit: str = "layer") -> list[GroupLayout]:
    """All groups in execution order: embed, layers (whole or attn/mlp halves), head."""
    v, h = cfg.vocab_size, cfg.hidden_size
    groups = [_layout("embed", "embed", None, dtype, [("embed", "model.embed_tokens.weight", (v, h))])]
    for i in range(cfg.num_layers):
        if stream_unit == "layer":
            groups.append(_layout(f"layer.{i}", "layer", i, dtype, _attn_entries(cfg, i) + _mlp_entries(cfg, i)))
        else:
            groups.append(_layout(f"attn.{i}", "attn", i, dtype, _attn_entries(cfg, i)))
            groups.append(_layout(f"mlp.{i}", "mlp", i, dtype, _mlp_entries(cfg, i)))
    head = [("norm", "model.norm.weight", (h,))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head", "lm_head.weight", (v, h)))
    groups.append(_layout("head", "head", None, dtype, head))
    return groups


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for validation."""
    out: dict[str, tuple[int, ...]] = {}
    for g in model_groups(cfg, torch.float32):
        for t in g.tensors:
            out[t.checkpoint_name] = t.shape
    return out
