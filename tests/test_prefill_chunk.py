"""Prefill chunks sized from the memory the placement leaves (issue 9): a prompt up to that length streams each
weight once. The widening never changes the resident set and never passes the budget; the chunk length does not
change what a prompt computes (logits within fp32 reduction order)."""
from pathlib import Path

import pytest
import torch

from graphrt import Runtime
from graphrt.config import ModelConfig
from graphrt.plan.placement import PREFILL_BASE, essentials, plan_placement

CONFIG = Path(__file__).resolve().parents[1] / "tools" / "configs" / "llama-3.1-8b.json"
GiB = 2**30


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig.from_file(CONFIG)


@pytest.mark.parametrize("budget_gib", [9, 12, 16, 40])
def test_widened_chunk_fits_the_budget_and_keeps_the_placement(cfg, budget_gib):
    budget = budget_gib * GiB
    fixed = plan_placement(cfg, budget, 3, 1, 4096, torch.bfloat16, prefill_chunk=PREFILL_BASE)
    auto = plan_placement(cfg, budget, 3, 1, 4096, torch.bfloat16, prefill_chunk=None)
    assert auto.resident == fixed.resident and auto.streamed == fixed.streamed
    assert PREFILL_BASE <= auto.prefill_chunk <= 4096
    assert sum(auto.memory.values()) <= budget
    assert auto.memory["activations"] == essentials(cfg, torch.bfloat16, 1, 4096, auto.prefill_chunk)["activations"]
    if auto.prefill_chunk < 4096:   # the next doubling would not have fitted
        bigger = essentials(cfg, torch.bfloat16, 1, 4096, min(2 * auto.prefill_chunk, 4096))["activations"]
        assert sum(auto.memory.values()) - auto.memory["activations"] + bigger > budget
    print(f"{budget_gib} GiB: chunk {auto.prefill_chunk}")


def test_whole_prompt_when_everything_is_resident_and_room_is_left(cfg):
    auto = plan_placement(cfg, 60 * GiB, 3, 1, 4096, torch.bfloat16, prefill_chunk=None)
    assert not auto.streamed and auto.prefill_chunk == 4096
    assert "prefill: chunks of up to 4096 tokens" in auto.describe()


def test_a_given_chunk_is_kept(cfg):
    p = plan_placement(cfg, 60 * GiB, 3, 1, 4096, torch.bfloat16, prefill_chunk=512)
    assert p.prefill_chunk == 512


def test_runtime_resolves_the_chunk_and_logits_do_not_depend_on_it(make_ckpt):
    path = make_ckpt("tiny-llama", layers=2, seed=3)
    auto = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=2)
    assert auto.options.prefill_chunk == 64 == auto.placement.prefill_chunk      # CPU: no budget, one chunk
    small = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=2, prefill_chunk=8)
    assert small.options.prefill_chunk == 8
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    a, b = auto.logits(ids), small.logits(ids)
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    assert auto.generate(ids, 8).equal(small.generate(ids, 8))


def test_fewer_rows_take_longer_chunks_within_the_same_tokens(make_ckpt):
    """The chunk is planned for max_batch_size rows; a step of fewer rows takes prefill_chunk x max_batch_size /
    rows tokens per row (never more than max_seq_len), so its activations stay within the plan's estimate, and
    the logits match one row at a time."""
    path = make_ckpt("tiny-llama", layers=2, seed=3)
    rt = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=4, prefill_chunk=8)
    assert [rt.engine.chunk_len(b) for b in (1, 2, 3, 4)] == [32, 16, 10, 8]
    one = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(1))
    steps = [part.shape for _, part, _, _ in rt.engine._chunks(one, 0)]
    assert steps == [(1, 32), (1, 8)]                   # 40 tokens in 2 prompt steps, not 5
    four = one.expand(4, 40)
    assert [part.shape for _, part, _, _ in rt.engine._chunks(four, 0)] == [(4, 8)] * 5
    wide = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=1, prefill_chunk=64)
    a, b = rt.logits(one), wide.logits(one)
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    capped = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=8, prefill_chunk=32)
    assert capped.engine.chunk_len(1) == 64             # at most max_seq_len


def test_fused_attention_counts_the_mask_not_the_scores(cfg):
    """On CUDA (fused SDPA kernels) no [rows, heads, chunk, context] score tensor exists: the estimate counts the
    additive mask instead. Issue 9's plan (16-layer 8B shape, 12 GiB, max_seq_len 4096, batch 8) then holds every
    layer, where the materialised-scores estimate streams 7."""
    import dataclasses
    c16 = dataclasses.replace(cfg, num_layers=16)
    math = plan_placement(c16, 12 * GiB, 3, 8, 4096, torch.bfloat16, prefill_chunk=None)
    fused = plan_placement(c16, 12 * GiB, 3, 8, 4096, torch.bfloat16, prefill_chunk=None, fused_attention=True)
    assert math.streamed and not fused.streamed
    assert fused.memory["activations"] < math.memory["activations"] and sum(fused.memory.values()) <= 12 * GiB
    e = essentials(c16, torch.bfloat16, 8, 4096, 512, fused_attention=True)
    assert e["activations"] == 2 * 8 * 512 * (4 * 4096 + 4096 + 2 * 1024 + 3 * 14336) * 2 + 8 * 512 * 4096 * 2


@pytest.mark.parametrize("start", [0, 24])
def test_causal_prompt_steps_equal_the_masked_attention(make_ckpt, start):
    """Prompt steps attend causally with no mask (flash kernels on CUDA); decode and speculative steps use the
    additive mask. Both give the same logits for a chunk of positions start .. start + T - 1 (fp32, grouped kv
    heads), first chunk (T == L) and a later one (the causal diagonal aligned at the last key)."""
    path = make_ckpt("tiny-llama", layers=2, seed=4)
    rt = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, max_batch_size=2)
    e = rt.engine
    assert e.causal_prompts and rt.config.num_heads > rt.config.num_kv_heads
    ids = torch.randint(3, 200, (2, start + 16), generator=torch.Generator().manual_seed(start))
    if start:
        e.prefill(ids[:, :start], [start, start])
    pos = torch.arange(start, start + 16).expand(2, 16)
    L = start + 16
    masked = e.forward_step(ids[:, start:], pos, L, None, causal=False)
    causal = e.forward_step(ids[:, start:], pos, L, None, causal=True)
    assert ((causal - masked).abs().max() / masked.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match="ctx_len"):
        e.forward_step(ids[:, start:], pos, 8, None, causal=True)
