"""graphrt vs Hugging Face transformers on the CPU, fp32: logits within 1e-4 relative, same greedy tokens."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from graphrt import Runtime

CASES = {
    "llama-default-rope-untied-gqa2": dict(arch="LlamaForCausalLM"),
    "llama3-rope-tied-mha": dict(arch="LlamaForCausalLM", rope="llama3", theta=500000.0, tied=True, kv_heads=4),
    "llama3-rope-untied-gqa4-sharded": dict(arch="LlamaForCausalLM", rope="llama3", kv_heads=1, shards=3),
    "llama-v5-layout-llama3": dict(arch="LlamaForCausalLM", rope="llama3", layout="v5", kv_heads=2),
    "llama-v5-layout-default-tied": dict(arch="LlamaForCausalLM", layout="v5", tied=True),
    "mistral-gqa4": dict(arch="MistralForCausalLM", kv_heads=1),
    "mistral-v5-sharded": dict(arch="MistralForCausalLM", layout="v5", shards=2),
    "qwen2-bias-gqa2": dict(arch="Qwen2ForCausalLM", theta=1000000.0),
    "qwen2-tied-mha-v5": dict(arch="Qwen2ForCausalLM", tied=True, kv_heads=4, layout="v5"),
    "llama-3-layers-headdim32": dict(arch="LlamaForCausalLM", layers=3, hidden=128, heads=4, kv_heads=2),
}


def reference(path):
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    m.generation_config.eos_token_id = None  # graphrt does not stop at EOS unless asked
    return m.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(make_ckpt, case):
    path = make_ckpt(case, **CASES[case])
    rt = Runtime.from_pretrained(path, device="cpu", max_batch_size=2, max_seq_len=160, prefill_chunk=48)
    ref = reference(path)
    ids = torch.randint(3, rt.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = rt.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    prompt = ids[:, :20]
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(rt.generate(prompt, max_new_tokens=40), want)


def test_rope_llama3_positions_cross_all_bands(make_ckpt):
    """The llama3 test config has original_max_position_embeddings=64; positions up to 100 reach every band."""
    from graphrt.models.llama import rope_inv_freq
    rt = Runtime.from_pretrained(make_ckpt("r", **CASES["llama3-rope-tied-mha"]), device="cpu", max_seq_len=128)
    inv = rope_inv_freq(rt.config)
    plain = 1.0 / (rt.config.rope_theta ** (torch.arange(0, rt.config.head_dim, 2).float() / rt.config.head_dim))
    ratio = plain / inv
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()
