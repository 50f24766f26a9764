"""A step's context (llama.step_context) cut from the RoPE table made once per engine equals what computing it
for the step's positions gives: cos / sin bit for bit, and the additive mask (query row g*T + t of batch row b
sees keys <= positions[b, t])."""
import pytest
import torch

from graphrt.models.llama import rope_table, step_context


def computed(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, groups: int, ctx_len: int):
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    q_pos = positions.repeat(1, groups)
    visible = (torch.arange(ctx_len)[None, None, :] <= q_pos[:, :, None])[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None], mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_gives_the_computed_context(dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    table = rope_table(inv_freq, 96, 4, dtype)
    positions = torch.tensor([[5, 6, 7], [40, 41, 42], [0, 1, 2]])      # ragged rows, T = 3
    ctx = step_context(positions, table, num_groups=3, ctx_len=48)
    cos, sin, mask = computed(positions, inv_freq, dtype, 3, 48)
    assert torch.equal(ctx.cos, cos) and torch.equal(ctx.sin, sin)
    assert ctx.mask.shape == mask.shape == (3, 1, 9, 48) and torch.equal(ctx.mask, mask)
    assert torch.equal(ctx.rows, torch.arange(3)[:, None].expand(3, 3))
    causal = step_context(torch.arange(40, 48)[None], table, num_groups=3, ctx_len=48, causal=True)
    assert causal.mask is None and torch.equal(causal.cos, computed(torch.arange(40, 48)[None], inv_freq, dtype, 3,
                                                                     48)[0])


def test_context_buckets_are_every_bucket_a_length_takes():
    from graphrt.config import context_bucket, context_buckets
    for max_seq_len in (1, 63, 64, 65, 100, 512, 1000, 4096, 5000):
        every = {context_bucket(n, max_seq_len) for n in range(1, max_seq_len + 1)}
        assert context_buckets(max_seq_len) == sorted(every, reverse=True), max_seq_len
