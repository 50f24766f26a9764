"""Random-weight Hugging Face checkpoint of a supported architecture (tests and benchmarks).

Every weight is perturbed away from its default init (norm weights != 1, biases != 0), so a loader that
mixes up tensors or skips one is caught. Presets give real layer shapes with fewer layers, e.g.
    python tools/make_checkpoint.py /tmp/l8b --preset llama-3.1-8b --num-layers 4 --dtype bfloat16
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    "tiny-llama": dict(arch="LlamaForCausalLM", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256),
    "tiny-qwen2": dict(arch="Qwen2ForCausalLM", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=256),
    "tiny-mistral": dict(arch="MistralForCausalLM", hidden=64, intermediate=160, layers=2, heads=4, kv_heads=1, vocab=256),
    "llama-3.1-8b": dict(arch="LlamaForCausalLM", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                         vocab=128256, rope="llama3", theta=500000.0),
    # the default model's shape (SmolLM2-135M): 30 narrow layers, tied embeddings
    "smollm2-135m": dict(arch="LlamaForCausalLM", hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3,
                         vocab=49152, theta=100000.0, tied=True),
    "llama-3.1-70b": dict(arch="LlamaForCausalLM", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8,
                          vocab=128256, rope="llama3", theta=500000.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(arch: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                rope: str = "default", theta: float = 10000.0, tied: bool = False, dtype: str = "float32",
                layout: str = "v4", max_pos: int = 4096) -> dict:
    cfg = {"architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                                                   "Qwen2ForCausalLM": "qwen2"}[arch],
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
           "rms_norm_eps": 1e-5, "max_position_embeddings": max_pos, "tie_word_embeddings": tied,
           "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
           "attention_dropout": 0.0}
    if arch == "MistralForCausalLM":
        cfg["sliding_window"] = None
    if arch == "Qwen2ForCausalLM":
        cfg["use_sliding_window"] = False
    scaling = None
    if rope == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}  # small, so test positions cross every band
    if layout == "v5":
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        cfg["rope_theta"], cfg["rope_scaling"] = theta, scaling
    return cfg


def random_tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random weights (drawn on `device`, e.g. "cuda" for speed, returned on the CPU)."""
    g = torch.Generator(device).manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape, scale=None):
        return (torch.randn(*shape, generator=g, device=device) * (scale or shape[-1] ** -0.5)).to(dtype).cpu()

    def norm(n):
        return (1.0 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype).cpu()

    t = {"model.embed_tokens.weight": w(v, h, scale=1.0), "model.norm.weight": norm(h)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                  p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                  p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                  p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
                  p + "mlp.down_proj.weight": w(h, f)})
        if cfg["architectures"][0] == "Qwen2ForCausalLM":
            for n, size in (("q", q), ("k", kv), ("v", kv)):
                t[p + f"self_attn.{n}_proj.bias"] = (0.1 * torch.randn(size, generator=g, device=device)).to(dtype).cpu()
    return t


def write_checkpoint(out: Path, cfg: dict, tensors: dict[str, torch.Tensor], num_shards: int = 1) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(tensors)
    if num_shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for s in range(num_shards):
        part = names[s::num_shards]
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def fp8_compressed_tensors(cfg: dict, tensors: dict[str, torch.Tensor], strategy: str = "channel",
                           ignore: tuple[str, ...] = ("lm_head",)) -> tuple[dict, dict[str, torch.Tensor]]:
    """The compressed-tensors FP8 layout of the published `*-FP8` checkpoints: every linear weight
    (except `ignore`) as float8_e4m3fn `weight` + float32 `weight_scale` ([out, 1] for the channel
    strategy, [1] for tensor), and the matching `quantization_config` in the config."""
    out = {}
    for name, w in tensors.items():
        layer = name.removesuffix(".weight")
        if w.dim() != 2 or "embed_tokens" in name or any(layer.endswith(i) for i in ignore):
            out[name] = w
            continue
        w32 = w.float()
        amax = w32.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w32.abs().amax().view(1)
        scale = (amax / 448.0).clamp(min=1e-12)
        q = (w32 / (scale if strategy == "channel" else scale[0])).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name], out[layer + ".weight_scale"] = q, scale.float()
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": list(ignore),
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                    "strategy": strategy, "dynamic": False},
                                        "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                              "strategy": "token", "dynamic": True}}}}
    return {**cfg, "quantization_config": qc}, out
