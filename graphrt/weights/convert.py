"""Convert a llama GGUF into a Hugging Face directory (float32 safetensors, config.json, tokenizer.json,
tokenizer_config.json), dequantized with the `gguf` package: the reference the native GGUF path
is tested against."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .gguf_source import build_tokenizer, hf_name, unpermute_rows

def _field(reader, key: str):
    return reader.fields[key].contents()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a Hugging Face directory for a llama GGUF. Writes into a temporary folder and renames,
    so a failed conversion never leaves a half-written model behind."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (llama only)")
    heads, kv_heads = int(_field(r, "llama.attention.head_count")), int(_field(r, "llama.attention.head_count_kv"))
    tensors: dict[str, torch.Tensor] = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = torch.from_numpy(np.ascontiguousarray(w.reshape([int(d) for d in reversed(t.shape)])))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind in ("attn_q", "attn_k"):
            w = unpermute_rows(w, heads if kind == "attn_q" else kv_heads).contiguous()
        name = hf_name(t.name)
        if name is None:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} has no Hugging Face name in graphrt's llama map")
        tensors[name] = w  # float32: Q4_1 values are not bf16-exact
    tokens = [str(x) for x in _field(r, "tokenizer.ggml.tokens")]
    types = [int(x) for x in _field(r, "tokenizer.ggml.token_type")]
    im_end = tokens.index("<|im_end|>") if "<|im_end|>" in tokens else None
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": int(_field(r, "llama.embedding_length")),
        "intermediate_size": int(_field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(r, "llama.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(_field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(r, "llama.rope.freq_base")), "rope_scaling": None,
        "max_position_embeddings": int(_field(r, "llama.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in tensors, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",   # what the file holds
        "bos_token_id": int(_field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": im_end if im_end is not None else int(_field(r, "tokenizer.ggml.eos_token_id")),
    }
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        build_tokenizer(tokens, types, [str(m) for m in _field(r, "tokenizer.ggml.merges")]).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": str(_field(r, "tokenizer.chat_template")), "eos_token": "<|im_end|>"}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir
