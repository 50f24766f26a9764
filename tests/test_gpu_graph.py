"""GPU: the captured decode step equals the eager executor bit for bit, and stays correct."""
import pytest
import torch

from gpu_util import MID, eager_decode, graph_decode, runtime
from graphrt import ConfigError
from graphrt.plan.schedule import slot_of
from test_gpu_streaming import model_path

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["llama", "qwen2", "default"])
@pytest.mark.parametrize("mode", ["resident", "half", "full"])
def test_graph_equals_eager(name, mode, make_ckpt, request):
    path = model_path(name, make_ckpt, request)
    dtype = "bfloat16" if name == "default" else "float32"
    for n in ((3,) if mode == "resident" else (2, 3, 5)):
        rt = runtime(path, mode, n, dtype=dtype, max_batch_size=8, max_seq_len=160)
        for batch in (1, 8):
            ids = torch.randint(3, 1000, (batch, 24), generator=torch.Generator().manual_seed(batch))
            e_tok, e_logits = eager_decode(rt, ids, 70)
            g_tok, g_logits = graph_decode(rt, ids, 70)
            assert torch.equal(g_tok, e_tok), (name, mode, n, batch)
            assert torch.equal(g_logits, e_logits), (name, mode, n, batch)
        del rt


def test_padded_batch_matches_eager_and_never_touches_real_rows(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "half", 3, max_batch_size=8)
    ids = torch.randint(3, 1000, (3, 16), generator=torch.Generator().manual_seed(7))
    e_tok, _ = eager_decode(rt, ids, 64)
    g = rt.capture(3)
    assert g.bucket == 4
    g_tok, _ = graph_decode(rt, ids, 64)
    assert torch.equal(g_tok, e_tok)
    # the padded row's KV lives in cache row 3, which no live sequence owns
    kv_real = rt.engine.kv[:, :, :3].clone()
    rt.engine.kv[:, :, 3:].fill_(float("nan"))
    g.prefill(ids)
    for _ in range(10):
        g.step()
    assert not rt.engine.kv[:, :, :3, :, :40].isnan().any()
    assert torch.equal(rt.engine.kv[:, :, :3, :, :26], kv_real[:, :, :, :, :26])


def idle_slots(rt):
    """Slots that hold no prefetched group of the next step (safe to poison between steps)."""
    plan = rt.engine.plans[0]
    S, N, P = plan.num_streamed, plan.ring_depth, plan.prefetch
    busy = {slot_of(rt.engine.ring_step, k, S, N) for k in range(P)}
    return [s for s in range(N) if s not in busy]


def test_poisoning_idle_slots_between_replays_changes_nothing(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "full", 4)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    want, want_logits = graph_decode(rt, ids, 80)

    def poison(rt):
        for s in idle_slots(rt):
            rt.engine.store.ring.poison(s)

    got, got_logits = graph_decode(rt, ids, 80, between=poison)
    assert torch.equal(got, want) and torch.equal(got_logits, want_logits)


def test_1000_replays_identical_and_memory_flat(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "full", 3, max_seq_len=1100)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    g = rt.capture(1)
    runs, mem = [], []
    for _ in range(2):
        g.prefill(ids)
        for i in range(1000):
            g.step()
            if i in (9, 999):  # no allocation may happen between the 10th and the 1000th replay
                torch.cuda.synchronize()
                mem.append((torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
        runs.append(g.tokens().clone())
    assert torch.equal(runs[0], runs[1])
    assert mem[0] == mem[1] and mem[2] == mem[3], mem
    e_tok, _ = eager_decode(rt, ids, 1001)
    assert torch.equal(runs[0][:, 16:], e_tok)


def broken_runtime(path, event: str, **kw):
    rt = runtime(path, "full", 3, poison_freed_slots=True, **kw)
    rt.engine.plans = [p.without_wait(event) for p in rt.engine.plans]
    return rt


BIG = dict(arch="LlamaForCausalLM", hidden=1024, intermediate=4096, layers=8, heads=16, kv_heads=4, vocab=1024)


def test_removed_ready_wait_is_caught(make_ckpt):
    """Copy-bound decode: without `ready:k` the compute reads a slot before its copy lands."""
    path = make_ckpt("big", **BIG)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    good, good_logits = graph_decode(runtime(path, "full", 3, poison_freed_slots=True), ids, 16)
    rt = broken_runtime(path, "ready:4")
    bad, bad_logits = graph_decode(rt, ids, 16)
    assert not torch.equal(bad_logits, good_logits)


def test_removed_free_wait_is_caught(make_ckpt):
    """Compute-bound prefill: without `free:k` a copy overwrites a slot that is still being read."""
    path = make_ckpt("big", **BIG)
    ids = torch.randint(3, 1000, (8, 256), generator=torch.Generator().manual_seed(0))
    good = runtime(path, "full", 3, poison_freed_slots=True, max_batch_size=8, max_seq_len=300, prefill_chunk=256)
    want = good.logits(ids)
    bad = broken_runtime(path, "free:2", max_batch_size=8, max_seq_len=300, prefill_chunk=256)
    assert not torch.equal(bad.logits(ids), want)


def test_seeded_sampling_graph_equals_eager_and_repeats(make_ckpt):
    rt = runtime(make_ckpt("mid-qwen2", **{**MID, "arch": "Qwen2ForCausalLM"}), "half", 3, max_batch_size=4)
    ids = torch.randint(3, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    e_tok, _ = eager_decode(rt, ids, 64, **kw)
    g1, _ = graph_decode(rt, ids, 64, **kw)
    g2, _ = graph_decode(rt, ids, 64, **kw)
    assert torch.equal(g1, e_tok) and torch.equal(g1, g2)
    other, _ = graph_decode(rt, ids, 64, **{**kw, "seed": 99})
    assert not torch.equal(other, g1)
    greedy, _ = graph_decode(rt, ids, 64)
    assert not torch.equal(greedy, g1)


def test_step_past_max_seq_len_raises(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "resident", max_seq_len=64)
    g = rt.capture(1)
    g.prefill(torch.randint(3, 1000, (1, 60)))
    for _ in range(3):
        g.step()
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        g.step()


def test_generate_uses_graph_by_default(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "half", 3)
    ids = torch.randint(3, 1000, (1, 10))
    out = rt.generate(ids, 30)
    assert rt.graph_cache is not None and rt.graph_cache.graphs
    assert torch.equal(out, rt.generate(ids, 30, use_graph=False))


def test_all_buckets_share_one_pool(make_ckpt):
    rt = runtime(make_ckpt("mid-llama", **MID), "half", 3, max_batch_size=8)
    rt.capture(2, capture_all_buckets=True)
    s = rt.graph_cache
    assert s.buckets == [1, 2, 4, 8]
    assert {k[0] for k in s.graphs} == {1, 2, 4, 8}
    captured = list(s.graphs)
    assert captured[0][0] == 8 and captured[-1][0] == 1  # largest first
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(4))
    e_tok, e_logits = eager_decode(rt, ids, 40)
    g_tok, g_logits = graph_decode(rt, ids, 40)
    assert torch.equal(g_tok, e_tok) and torch.equal(g_logits, e_logits)


@pytest.mark.parametrize("mode", ["half", "full"])
def test_copy_kernel_streams_the_same_bytes(mode, make_ckpt):
    """copy_mode='kernel' (the copies are kernels reading mapped host memory): graph == eager bitwise and
    equal to the memcpy runtime's tokens and logits; with poisoned freed slots, so a copy that lands late or
    short shows; and the removed ready-wait is still caught."""
    path = make_ckpt("mid-llama", **MID)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = runtime(path, mode, 3, max_batch_size=2)
    want, want_logits = graph_decode(ref, ids, 40)
    del ref
    rt = runtime(path, mode, 3, max_batch_size=2, copy_mode="kernel", poison_freed_slots=True)
    assert rt.engine.store.copy_kernel
    e_tok, e_logits = eager_decode(rt, ids, 40)
    g_tok, g_logits = graph_decode(rt, ids, 40)
    assert torch.equal(g_tok, e_tok) and torch.equal(g_logits, e_logits)
    assert torch.equal(g_tok, want) and torch.equal(g_logits, want_logits)
    path = make_ckpt("big", **BIG)
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    good, good_logits = graph_decode(runtime(path, "full", 3, poison_freed_slots=True, copy_mode="kernel"), ids, 16)
    bad, bad_logits = graph_decode(broken_runtime(path, "ready:4", copy_mode="kernel"), ids, 16)
    assert not torch.equal(bad_logits, good_logits)
