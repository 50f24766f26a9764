"""Weight groups: which checkpoint tensors form a group, and how a group is packed into one buffer.

A group (the embedding, a layer, or a layer's attention / MLP half, the head) is the unit that stays
resident or streams. Its tensors are packed into one contiguous byte buffer with a fixed layout, so a
resident GPU buffer, a pinned host buffer and a ring slot all expose the same typed views. Each matrix
is stored in a weight format (dense, or quantized: data and scales side by side in the same buffer);
vectors (norms, biases) are dense in the compute dtype. Matrices that read the same input (q/k/v, gate/up) are
stored stacked along rows as one matrix ("qkv", "gate_up") when their formats allow, so one kernel reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..config import ModelConfig
from .formats import Dense, PartSpec, Weight, WeightFormat, stackable

ALIGN = 256  # bytes; every stored tensor in a group buffer starts on this boundary


@dataclass(frozen=True)
class FormatPolicy:
    """Which format each matrix is stored in. `matrix` covers the linear layers, `embedding` the token
    table (also the LM head when tied), `lm_head` an untied head; `per_tensor` (checkpoint name ->
    format) wins over all three (a GGUF file states each tensor's type). None means dense."""
    compute_dtype: torch.dtype
    matrix: WeightFormat | None = None
    embedding: WeightFormat | None = None
    lm_head: WeightFormat | None = None
    per_tensor: tuple[tuple[str, WeightFormat], ...] = field(default=(), repr=False)

    def format_of(self, checkpoint_name: str) -> WeightFormat:
        for name, fmt in self.per_tensor:
            if name == checkpoint_name:
                return fmt
        if checkpoint_name == "model.embed_tokens.weight":
            chosen = self.embedding
        elif checkpoint_name == "lm_head.weight":
            chosen = self.lm_head
        else:
            chosen = self.matrix
        return chosen or Dense(self.compute_dtype)


@dataclass(frozen=True)
class TensorSpec:
    key: str                              # short name inside the group, e.g. "qkv" or "down"
    sources: tuple[tuple[str, int], ...]  # (Hugging Face tensor name, rows): checkpoint tensors stacked along dim 0
    shape: tuple[int, ...]                # logical shape of the stack ([out, in] for a matrix)
    format: WeightFormat
    parts: tuple[tuple[PartSpec, int], ...]  # stored tensors and their byte offsets in the buffer

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def checkpoint_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sources)

    def source_shape(self, rows: int) -> tuple[int, ...]:
        return (rows, *self.shape[1:])


@dataclass(frozen=True)
class GroupLayout:
    name: str                # "embed", "layer.3", "attn.3", "mlp.3", "head"; MLP parts "mlp.3:gpu", "mlp.3:cpu"
    kind: str                # "embed" | "layer" | "attn" | "mlp" | "head"; "mlp_gpu" | "mlp_cpu" (an MLP's parts)
    layer: int | None
    tensors: tuple[TensorSpec, ...]
    nbytes: int
    ffn: tuple[int, int] | None = None   # an MLP part: intermediate rows [f0, f1) (gate/up rows, down columns)

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor | Weight]:
        """Typed views over a uint8 buffer of at least `nbytes` (host, device or ring slot): a `Weight`
        for each matrix, a plain tensor for each vector."""
        out: dict[str, torch.Tensor | Weight] = {}
        for t in self.tensors:
            parts = {p.name: buffer[o:o + p.nbytes].view(p.dtype).view(p.shape) for p, o in t.parts}
            out[t.key] = Weight(t.format, parts, t.shape) if t.is_matrix else parts["w"]
        return out

    @property
    def num_params(self) -> int:
        return sum(_numel(t.shape) for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


Entry = tuple[str, str, tuple[int, ...]]     # (key, Hugging Face name, shape)


def _stacked(policy: FormatPolicy, key: str, entries: list[Entry]) -> list:
    """The entries as one row-stacked entry (key, ((name, rows), ...), shape) when their formats are one stackable
    format (q/k/v and gate/up: one GEMV instead of three or two); else unchanged."""
    formats = {policy.format_of(ckpt) if len(shape) == 2 else None for _, ckpt, shape in entries}
    fmt = next(iter(formats))
    if len(formats) != 1 or (fmt is not None and not stackable(fmt)):
        return entries
    rows = sum(shape[0] for _, _, shape in entries)
    return [(key, tuple((ckpt, shape[0]) for _, ckpt, shape in entries), (rows, *entries[0][2][1:]))]


def _layout(name: str, kind: str, layer: int | None, policy: FormatPolicy, entries: list) -> GroupLayout:
    specs, offset = [], 0
    for key, ckpt, shape in entries:
        sources = ckpt if isinstance(ckpt, tuple) else ((ckpt, shape[0]),)
        fmt = policy.format_of(sources[0][0]) if len(shape) == 2 else Dense(policy.compute_dtype)
        parts = []
        for p in (fmt.parts(shape) if len(shape) == 2 else (PartSpec("w", shape, policy.compute_dtype),)):
            parts.append((p, offset))
            offset += -(-p.nbytes // ALIGN) * ALIGN
        specs.append(TensorSpec(key, sources, shape, fmt, tuple(parts)))
    return GroupLayout(name, kind, layer, tuple(specs), offset)


def _attn_entries(cfg: ModelConfig, i: int, policy: FormatPolicy, stack: bool) -> list:
    p, h = f"model.layers.{i}.", cfg.hidden_size
    qkv = [("q", p + "self_attn.q_proj.weight", (cfg.q_size, h)),
           ("k", p + "self_attn.k_proj.weight", (cfg.kv_size, h)),
           ("v", p + "self_attn.v_proj.weight", (cfg.kv_size, h))]
    bias = [("q_bias", p + "self_attn.q_proj.bias", (cfg.q_size,)),
            ("k_bias", p + "self_attn.k_proj.bias", (cfg.kv_size,)),
            ("v_bias", p + "self_attn.v_proj.bias", (cfg.kv_size,))] if cfg.qkv_bias else []
    stacked = _stacked(policy, "qkv", qkv) if stack else qkv
    if len(stacked) == 1 and bias:
        bias = _stacked(policy, "qkv_bias", bias)
    return [("input_norm", p + "input_layernorm.weight", (h,)), *stacked, *bias,
            ("o", p + "self_attn.o_proj.weight", (h, cfg.q_size))]


def _mlp_entries(cfg: ModelConfig, i: int, policy: FormatPolicy, stack: bool, rows: int | None = None,
                 norm: bool = True) -> list:
    """rows: the intermediate rows of an MLP part (default all); norm: with the post-attention norm."""
    p, h, f = f"model.layers.{i}.", cfg.hidden_size, rows or cfg.intermediate_size
    gate_up = [("gate", p + "mlp.gate_proj.weight", (f, h)), ("up", p + "mlp.up_proj.weight", (f, h))]
    return [*([("post_norm", p + "post_attention_layernorm.weight", (h,))] if norm else []),
            *(_stacked(policy, "gate_up", gate_up) if stack else gate_up),
            ("down", p + "mlp.down_proj.weight", (h, f))]


def mlp_parts(cfg: ModelConfig, i: int, policy: FormatPolicy, gpu_rows: int,
              stack: bool = True) -> tuple[GroupLayout, GroupLayout]:
    """Layer i's MLP split by intermediate rows: "mlp.i:gpu" (the norm and rows [0, gpu_rows)) and "mlp.i:cpu" (rows
    [gpu_rows, F), no norm). Their products add up to the MLP's."""
    f = cfg.intermediate_size
    if not 0 < gpu_rows < f:
        raise ValueError(f"an MLP part needs 0 < gpu_rows < {f}, got {gpu_rows}")
    gpu = _layout(f"mlp.{i}:gpu", "mlp_gpu", i, policy, _mlp_entries(cfg, i, policy, stack, gpu_rows))
    cpu = _layout(f"mlp.{i}:cpu", "mlp_cpu", i, policy, _mlp_entries(cfg, i, policy, stack, f - gpu_rows, norm=False))
    return replace(gpu, ffn=(0, gpu_rows)), replace(cpu, ffn=(gpu_rows, f))


def model_groups(cfg: ModelConfig, policy: FormatPolicy | torch.dtype, stream_unit: str = "layer",
                 stack: bool = True, split: dict[int, int] | None = None) -> list[GroupLayout]:
    """All groups in execution order: embed, layers (whole or attn/mlp halves), head.
    `policy` may be a plain dtype: every matrix dense in it. `stack`: q/k/v and gate/up stored as one
    row-stacked matrix each ("qkv", "gate_up") where their formats allow; else one tensor each.
    split {layer: gpu_rows} (attn_mlp units): those MLPs as their two parts (`mlp_parts`)."""
    if isinstance(policy, torch.dtype):
        policy = FormatPolicy(policy)
    v, h = cfg.vocab_size, cfg.hidden_size
    groups = [_layout("embed", "embed", None, policy, [("embed", "model.embed_tokens.weight", (v, h))])]
    for i in range(cfg.num_layers):
        if stream_unit == "layer":
            groups.append(_layout(f"layer.{i}", "layer", i, policy,
                                  _attn_entries(cfg, i, policy, stack) + _mlp_entries(cfg, i, policy, stack)))
        else:
            groups.append(_layout(f"attn.{i}", "attn", i, policy, _attn_entries(cfg, i, policy, stack)))
            if split and i in split:
                groups += mlp_parts(cfg, i, policy, split[i], stack)
            else:
                groups.append(_layout(f"mlp.{i}", "mlp", i, policy, _mlp_entries(cfg, i, policy, stack)))
    head = [("norm", "model.norm.weight", (h,))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head", "lm_head.weight", (v, h)))
    groups.append(_layout("head", "head", None, policy, head))
    return groups


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for validation."""
    return {name: t.source_shape(rows) for g in model_groups(cfg, torch.float32, stack=False)
            for t in g.tensors for name, rows in t.sources}
