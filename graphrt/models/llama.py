"""Llama-family math (Llama 2/3, Mistral, Qwen2) as pure functions of activations and weights.

Weights come in as dicts (views of a resident buffer or of a ring slot): a `Weight` (format + stored
parts) for each matrix, a tensor for each vector. Nothing here knows about streams, graphs, where the
weights live or how they are stored: `linear` and `embedding` ask the weight's own format. The elementwise
steps (RMSNorm, RoPE with the KV append, silu * up) are one kernel each on the GPU (fused.py).
Shapes: B batch, T tokens, H heads, Hkv kv heads,
D head dim, S max sequence length, L attended context length (a static bucket >= every position + 1).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..weights.formats import RopeAppend, Weight, embedding, linear, linear_fused
from .attention import masked_attention
from .fused import rms_norm, rope_append, silu_mul

Weights = dict[str, torch.Tensor | Weight]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, with Llama 3 frequency scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    old_ctx, factor = s["original_max_position_embeddings"], s["factor"]
    low_wavelen, high_wavelen = old_ctx / s["low_freq_factor"], old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RopeTable(NamedTuple):
    """What every step's context is cut from, made once per engine (a step then gathers its rows: 2 kernels
    where computing cos / sin and the mask takes about 13, at every decode and draft step)."""
    cos: torch.Tensor        # [S, D] compute dtype: cos(position * inv_freq), the frequencies repeated twice
    sin: torch.Tensor        # [S, D]
    keys: torch.Tensor       # [S] int64 0..S-1
    rows: torch.Tensor       # [maxB] int64 0..maxB-1
    zero: torch.Tensor       # [] compute dtype 0 (mask values)
    hidden: torch.Tensor     # [] compute dtype -inf


def rope_table(inv_freq: torch.Tensor, max_seq_len: int, max_batch_size: int, dtype: torch.dtype) -> RopeTable:
    dev = inv_freq.device
    keys = torch.arange(max_seq_len, device=dev)
    freqs = keys.float()[:, None] * inv_freq  # [S, D/2] float32: the same products a step of those positions makes
    emb = torch.cat((freqs, freqs), dim=-1)
    return RopeTable(emb.cos().to(dtype), emb.sin().to(dtype), keys, torch.arange(max_batch_size, device=dev),
                     torch.zeros((), dtype=dtype, device=dev), torch.full((), float("-inf"), dtype=dtype, device=dev))


class StepContext(NamedTuple):
    """Per-step tensors shared by every layer (computed once per step, not per layer)."""
    positions: torch.Tensor  # [B, T] int64
    cos: torch.Tensor        # [B, 1, T, D]
    sin: torch.Tensor        # [B, 1, T, D]
    rows: torch.Tensor       # [B, T] batch row of each token, for the KV append
    mask: torch.Tensor | None  # [B, 1, G*T, L] additive, compute dtype: 0 where key l is visible to query
                             # row (g, t), -inf elsewhere (made once per step, not converted per layer). None: a
                             # prompt step whose rows all hold positions L-T..L-1, attended causally (no mask)
    ctx_len: int             # L


def step_context(positions: torch.Tensor, table: RopeTable, num_groups: int, ctx_len: int,
                 causal: bool = False) -> StepContext:
    """causal: every row's positions are ctx_len - T .. ctx_len - 1 (a prompt chunk of right-padded prompts):
    attention is causal aligned at the last key, with no mask tensor (flash / cuDNN kernels on CUDA).
    Positions must be < the table's S (max_seq_len)."""
    B, T = positions.shape
    cos, sin = table.cos[positions][:, None], table.sin[positions][:, None]     # [B, 1, T, D]
    rows = table.rows[:B, None].expand(B, T)
    if causal:
        if ctx_len < T:
            raise ValueError(f"a causal step of {T} tokens needs ctx_len >= {T}, got {ctx_len}")
        return StepContext(positions, cos, sin, rows, None, ctx_len)
    # query row g*T + t of batch row b has position positions[b, t]: [B, G, T, L] -> [B, 1, G*T, L]
    visible = table.keys[:ctx_len] <= positions[:, None, :, None]
    mask = torch.where(visible.expand(B, num_groups, T, ctx_len), table.zero, table.hidden)
    return StepContext(positions, cos, sin, rows, mask.view(B, 1, num_groups * T, ctx_len), ctx_len)


Reduce = Callable[[torch.Tensor], torch.Tensor] | None   # tensor parallel: sums partial products over ranks


def embed_forward(ids: torch.Tensor, w: Weights, dtype: torch.dtype, vocab_start: int = 0,
                  reduce: Reduce = None) -> torch.Tensor:
    """ids [B, T] -> hidden [B, T, hidden] in the compute dtype. Tensor parallel: the table holds ids
    [vocab_start, vocab_start + rows); other ids embed to zero here and come from their rank in `reduce`."""
    if reduce is None:
        return embedding(ids, w["embed"], dtype)
    rows = w["embed"].shape[0]
    local = ids - vocab_start
    inside = (local >= 0) & (local < rows)
    e = embedding(local.clamp(0, rows - 1), w["embed"], dtype) * inside[..., None].to(dtype)
    return reduce(e)


def attn_forward(h: torch.Tensor, w: Weights, cfg: ModelConfig, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, ctx: StepContext, reduce: Reduce = None) -> torch.Tensor:
    """Pre-norm attention with residual. Appends this step's K/V at ctx.positions into the caches
    [maxB, Hkv, S, D], then attends over cache[:B, :, :L] with the causal mask ctx.mask. Returns h + attention;
    h itself may be reused for the sum (the caller's h is consumed)."""
    B, T, _ = h.shape
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // Hkv
    norm = (w["input_norm"], cfg.rms_norm_eps)
    # norm, the q/k/v product, RoPE on q and k, K/V appended at ctx.positions into [B, Hkv, S, D]; q [B, H, T, D]
    q = linear_fused(h, w["qkv"], w.get("qkv_bias"), norm=norm, rope=RopeAppend(
        ctx.cos, ctx.sin, ctx.positions, k_cache, v_cache, H, Hkv)) if "qkv" in w else None
    if q is None:   # the same steps apart (formats without the fused kernel, more rows, the CPU)
        x = rms_norm(h, *norm)
        if "qkv" in w:  # q, k, v stacked along rows: one product [B, T, (H + 2 Hkv) D], sliced by columns
            q, k, v = linear(x, w["qkv"], w.get("qkv_bias")).split((H * D, Hkv * D, Hkv * D), dim=-1)
        else:
            q = linear(x, w["q"], w.get("q_bias"))  # [B, T, H*D]
            k = linear(x, w["k"], w.get("k_bias"))  # [B, T, Hkv*D]
            v = linear(x, w["v"], w.get("v_bias"))
        q = rope_append(q, k, v, ctx.cos, ctx.sin, k_cache, v_cache, ctx.rows, ctx.positions, H, Hkv)
    L = ctx.ctx_len
    keys, values = k_cache[:B, :, :L], v_cache[:B, :, :L]
    if ctx.mask is None:  # prompt chunk: causal over the L keys, the last query at the last key
        causal = None
        if T != L:   # (imported here: the module imports triton, which a CPU-only import of graphrt avoids)
            from torch.nn.attention.bias import causal_lower_right
            causal = causal_lower_right(T, L)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, is_causal=causal is None,
                                           enable_gqa=G > 1)  # [B, H, T, D]
    else:  # GQA without copying K/V: the G query heads of one kv head become G*T query rows.
        o = masked_attention(q.reshape(B, Hkv, G * T, D), keys, values, ctx.mask)
    o = o.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
    if reduce is not None:
        return h + reduce(linear(o, w["o"]))
    return linear(o, w["o"], residual=h)    # h + o W^T, in the product's kernel where the format can


def mlp_forward(h: torch.Tensor, w: Weights, cfg: ModelConfig, reduce: Reduce = None) -> torch.Tensor:
    """Pre-norm SwiGLU MLP with residual: h + down(silu(gate) * up); h may be reused for the sum, as in attn_forward."""
    out = mlp_rows(h, w, residual=h if reduce is None else None, norm=(w["post_norm"], cfg.rms_norm_eps))
    return out if reduce is None else h + reduce(out)


def mlp_rows(x: torch.Tensor, w: Weights, residual: torch.Tensor | None = None,
             norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """x [B, T, hidden] -> down(silu(gate x) * up x) [B, T, hidden], plus `residual` if given. w: a whole MLP, or some
    intermediate rows of one (a part of a split MLP: those rows of gate and up, those columns of down). norm (weight,
    eps): x is not normed yet; the norm goes inside the first product where it can."""
    if "gate_up" in w:  # gate and up stacked along rows: [B, T, 2F]
        gate_up = linear_fused(x, w["gate_up"], norm=norm) if norm is not None else None
        if gate_up is None:
            gate_up = linear(x if norm is None else rms_norm(x, *norm), w["gate_up"])
        # silu(gate) * up inside the down product where it can be (and the residual)
        out = linear_fused(gate_up, w["down"], silu=True, residual=residual)
        if out is not None:
            return out
        gate, up = gate_up.chunk(2, dim=-1)
    else:
        x = x if norm is None else rms_norm(x, *norm)
        gate, up = linear(x, w["gate"]), linear(x, w["up"])
    return linear(silu_mul(gate, up), w["down"], residual=residual)


def mlp_gpu_part(h: torch.Tensor, w: Weights, cfg: ModelConfig,
                 reduce: Reduce = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first part of an MLP split by intermediate rows (the one with the norm): (x = rms_norm(h) [B, T, hidden],
    its rows' product [B, T, hidden])."""
    x = mlp_input(h, w, cfg)
    return x, mlp_gpu_rows(h, x, w, reduce)


def mlp_input(h: torch.Tensor, w: Weights, cfg: ModelConfig) -> torch.Tensor:
    """A split MLP's normed input (w: its first part, which holds the norm), as mlp_gpu_part makes it."""
    return rms_norm(h, w["post_norm"], cfg.rms_norm_eps)


def mlp_gpu_rows(h: torch.Tensor, x: torch.Tensor, w: Weights, reduce: Reduce = None) -> torch.Tensor:
    """mlp_gpu_part's product from x = rms_norm(h) made already (the CPU lane took x first: engine.py)."""
    return mlp_rows(x, w)


def mlp_join(h: torch.Tensor, first: torch.Tensor, second: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    """The MLP's output from its two parts: h + (first + second), first mlp_gpu_part's product and second mlp_rows of
    the other rows. The parts are added before the residual, so the residual stream is rounded once per MLP as in
    the whole MLP (adding them to h one after the other rounded it twice: bf16 logits of the default model with
    every MLP split drifted 3.4% from the whole MLPs')."""
    both = first + second
    return h + (both if reduce is None else reduce(both))


class MlpPieces(NamedTuple):
    """An MLP computed from row pieces of its matrices (a prompt step that streams it in pieces, weights/pieces.py)."""
    x: torch.Tensor                          # [B, T, hidden] the normed input
    products: dict[str, list[torch.Tensor]]  # per matrix, each piece's product [B, T, rows] so far, in row order
    hidden: torch.Tensor | None              # [B, T, F] silu(gate) * up, once gate and up are whole


def mlp_piece_forward(h: torch.Tensor, w: Weights, key: str, state: MlpPieces | None,
                      cfg: ModelConfig, x: torch.Tensor | None = None) -> MlpPieces:
    """One piece: w[key] holds rows of the MLP's matrix `key` (the first piece also the norm). Pieces come in the
    group's order, so gate and up (or gate_up) are whole before the first piece of down. x: the normed input, for
    the pieces of an MLP part without the norm ("mlp_cpu")."""
    if state is None:
        state = MlpPieces(rms_norm(h, w["post_norm"], cfg.rms_norm_eps) if x is None else x, {}, None)
    if key != "down":
        return state._replace(products={**state.products, key: [*state.products.get(key, []), linear(state.x, w[key])]})
    hidden = state.hidden
    if hidden is None:   # the gate / up products are dropped here
        whole = {k: torch.cat(v, dim=-1) for k, v in state.products.items()}
        gate, up = whole["gate_up"].chunk(2, dim=-1) if "gate_up" in whole else (whole["gate"], whole["up"])
        hidden = silu_mul(gate, up)
    return MlpPieces(state.x, {"down": [*state.products.get("down", []), linear(hidden, w["down"])]}, hidden)


def mlp_pieces_rows(state: MlpPieces) -> torch.Tensor:
    """down(silu(gate) * up) [B, T, hidden] once every piece of down is in."""
    return torch.cat(state.products["down"], dim=-1)


def mlp_pieces_output(h: torch.Tensor, state: MlpPieces, reduce: Reduce = None) -> torch.Tensor:
    """h + down(silu(gate) * up) once every piece of down is in."""
    out = mlp_pieces_rows(state)
    return h + (reduce(out) if reduce is not None else out)


def layer_forward(h: torch.Tensor, w: Weights, cfg: ModelConfig, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, ctx: StepContext, reduce: Reduce = None) -> torch.Tensor:
    h = attn_forward(h, w, cfg, k_cache, v_cache, ctx, reduce)
    return mlp_forward(h, w, cfg, reduce)


def head_forward(h: torch.Tensor, w: Weights, cfg: ModelConfig, embed: Weights | None,
                 gather: Reduce = None) -> torch.Tensor:
    """hidden [B, T, hidden] -> float32 logits [B, T, vocab]. Tied models read the embedding. Tensor parallel:
    each rank's vocabulary rows, then `gather` concatenates them in rank order."""
    x = rms_norm(h, w["norm"], cfg.rms_norm_eps)
    lm_head = embed["embed"] if cfg.tie_word_embeddings else w["lm_head"]
    logits = linear(x, lm_head).float()
    return gather(logits) if gather is not None else logits
