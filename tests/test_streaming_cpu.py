"""Streamed == resident, bit for bit, through the same executor (run serially on the CPU)."""
import pytest
import torch

from graphrt import Runtime


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("ring_depth", [2, 3, 4, 6])
@pytest.mark.parametrize("unit", ["layer", "attn_mlp"])
def test_streamed_matches_resident(make_ckpt, arch, ring_depth, unit):
    path = make_ckpt(arch, arch=arch, layers=16)
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=96, stream_unit=unit)
    resident = Runtime.from_pretrained(path, **kw)
    assert resident.placement.streamed == []
    slot = max(g.nbytes for g in resident.placement.groups)
    weights = resident.placement.memory["weights"]
    fixed = sum(resident.placement.memory.values()) - weights
    for budget in (fixed + ring_depth * slot + weights // 2, fixed + ring_depth * slot):  # half, then all streamed
        streamed = Runtime.from_pretrained(path, gpu_budget=budget, ring_depth=ring_depth,
                                           poison_freed_slots=True, **kw)
        assert streamed.placement.streamed
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
        assert torch.equal(streamed.logits(ids), resident.logits(ids))
        assert torch.equal(streamed.generate(ids, 40), resident.generate(ids, 40))


def test_all_groups_streamed(make_ckpt):
    path = make_ckpt()
    rt = Runtime.from_pretrained(path, device="cpu", max_seq_len=64)
    fixed = sum(rt.placement.memory.values()) - rt.placement.memory["weights"]
    slot = max(g.nbytes for g in rt.placement.groups)
    s = Runtime.from_pretrained(path, device="cpu", max_seq_len=64, gpu_budget=fixed + 2 * slot, ring_depth=2)
    assert set(s.placement.streamed) == {g.name for g in s.placement.groups}
    ids = torch.randint(0, 256, (1, 10))
    assert torch.equal(s.generate(ids, 20), rt.generate(ids, 20))
