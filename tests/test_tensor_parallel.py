"""Tensor parallelism on the CPU with 2 gloo processes (issue 11): logits equal the single-process runtime's within
fp32 reduction-order tolerance and greedy tokens are identical, for kv heads that divide and that do not
(replicated), tied and untied heads, and a model with q/k/v biases; bad sizes give clear errors."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from graphrt import Runtime
from graphrt.config import ConfigError, ModelConfig
from graphrt.weights.shard import make_shard
from graphrt.weights.synthetic import make_config

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 7, 8], [200, 1, 2, 3, 4, 5, 6, 250]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cases: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = {}
    for name, path in cases:
        rt = Runtime.from_pretrained(path, device="cpu", tensor_parallel=world, max_batch_size=2, max_seq_len=64)
        results[name] = (rt.logits(IDS), rt.generate(IDS, 12), rt.placement.groups[1].nbytes)
    torch.save(results, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def cases(make_ckpt):
    return [("gqa-divides-untied", make_ckpt("tiny-llama", layers=2, heads=4, kv_heads=2, seed=1)),
            ("kv-replicated-tied", make_ckpt("tiny-llama", layers=2, heads=4, kv_heads=1, tied=True, seed=2)),
            ("qwen2-bias", make_ckpt("tiny-qwen2", arch="Qwen2ForCausalLM", layers=2, seed=3))]


def test_two_gloo_ranks_equal_one_process(cases, tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), cases, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, path in cases:
        one = Runtime.from_pretrained(path, device="cpu", max_batch_size=2, max_seq_len=64)
        want_logits, want_tokens = one.logits(IDS), one.generate(IDS, 12)
        for r, res in enumerate(ranks):
            logits, tokens, layer_bytes = res[name]
            rel = ((logits - want_logits).norm() / want_logits.norm()).item()
            assert rel < 1e-5, (name, r, rel)
            assert torch.equal(tokens, want_tokens), (name, r)
            assert layer_bytes < one.placement.groups[1].nbytes      # each rank holds a shard, not the layer
        assert torch.equal(ranks[0][name][1], ranks[1][name][1])     # every rank samples the same tokens


def test_shards_and_bad_sizes(cases):
    cfg = ModelConfig.from_dict(make_config("LlamaForCausalLM", 64, 160, 2, 8, 2, 256))
    s = [make_shard(cfg, r, 4) for r in range(4)]
    assert [x.heads for x in s] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [x.kv_heads for x in s] == [(0, 1), (0, 1), (1, 2), (1, 2)]        # 2 kv heads, 4 ranks: replicated
    assert s[0].config.num_heads == 2 and s[0].config.intermediate_size == 40 and s[3].vocab == (192, 256)
    w = torch.arange(8 * 8 * 64).view(64, 64).float()                          # head_dim 8: o_proj [64, 64]
    assert torch.equal(s[1].slice("model.layers.0.self_attn.o_proj.weight", w), w[:, 16:32])
    assert torch.equal(s[1].slice("model.layers.0.self_attn.q_proj.weight", w), w[16:32])
    assert torch.equal(s[2].slice("model.layers.0.self_attn.k_proj.weight", w[:16]), w[8:16])
    assert torch.equal(s[0].slice("model.norm.weight", w[0]), w[0])
    with pytest.raises(ConfigError, match="tensor_parallel=3 does not divide num_attention_heads=8"):
        make_shard(cfg, 0, 3)
    odd = ModelConfig.from_dict(make_config("LlamaForCausalLM", 72, 160, 2, 6, 3, 256))
    with pytest.raises(ConfigError, match="unevenly"):
        make_shard(odd, 0, 2)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        Runtime.from_pretrained(cases[0][1], device="cpu", tensor_parallel=2)   # not started by torchrun
    with pytest.raises(ConfigError, match="tensor_parallel must be an integer >= 1"):
        Runtime.from_pretrained("unused", tensor_parallel=0)
