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

_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _field(reader, key: str):
    return reader.fields[key].contents()


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows interleaved per head for its RoPE; restore Hugging Face order."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
        w = w.reshape([int(d) for d in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            i, kind = int(parts[1]), parts[2]
            if kind == "attn_q":
                w = _unpermute(w, heads)
            elif kind == "attn_k":
                w = _unpermute(w, kv_heads)
            name = f"model.layers.{i}.{_NAMES[kind]}.{parts[3]}"
        else:
            name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
            name += "." + parts[1]
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))  # float32: Q4_1 values are not bf16-exact
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
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": int(_field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": im_end if im_end is not None else int(_field(r, "tokenizer.ggml.eos_token_id")),
    }
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _tokenizer(tokens, types, [str(m) for m in _field(r, "tokenizer.ggml.merges")]).save(str(tmp / "tokenizer.json"))
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


def _tokenizer(tokens: list[str], types: list[int], merges: list[str]):
    """Byte-level BPE with SmolLM's pre-tokenizer (single digits, then GPT-2 byte-level splitting)."""
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
