"""Speculative decoding (issue 12) on the CPU: greedy output equals plain greedy output token for token in fp32 for
every draft kind, batch 1 and ragged batch 2 (greedy rounds run on the device state, exec/spec_rounds.py, the code
CUDA captures); the device prompt lookup drafts what the host one does; sampled device rounds draw what the
host-loop rounds draw and have the target's distribution; bad input. On the GPU: captured rounds == eager
rounds (greedy and sampled) == plain greedy."""
import pytest
import torch

from graphrt import Runtime
from graphrt.config import ConfigError
from graphrt.exec.speculative import SpecStats, verify_greedy
from graphrt.speculative import Speculative

REPEATING = [5, 9, 17, 33, 5, 9, 17, 33, 5, 9, 17, 33, 5, 9]     # lookup finds its n-grams


@pytest.fixture(scope="module")
def target(make_ckpt):
    return make_ckpt("tiny-llama", layers=3, seed=4)


def rt_of(path, **kw):
    return Runtime.from_pretrained(path, device="cpu", max_batch_size=4, max_seq_len=96, **kw)


def test_device_lookup_drafts_what_prompt_lookup_drafts():
    from graphrt.exec.drafts import PromptLookup
    from graphrt.exec.device_drafts import DeviceLookup, SpecState
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, S, k, ngram = 3, 40, 4, 3
        st = SpecState.empty(B, S, k, torch.device("cpu"))
        st.history.copy_(torch.randint(0, 4, (B, S), generator=g))     # a small alphabet: many matches
        st.pos.copy_(torch.randint(0, S - 1, (B,), generator=g))
        st.last.copy_(st.history.gather(1, st.pos[:, None]).squeeze(1))
        host = PromptLookup(ngram)
        host.history = [st.history[b, :int(st.pos[b]) + 1].tolist() for b in range(B)]
        want, _ = host.propose(st.last, st.pos, k)
        assert torch.equal(DeviceLookup(ngram).propose(st, k, S), want), trial


def test_verify_greedy_accepts_the_matching_prefix():
    logits = torch.full((2, 4, 10), -1.0)
    for b, best in enumerate([[3, 4, 5, 6], [3, 9, 5, 6]]):
        for i, t in enumerate(best):
            logits[b, i, t] = 1.0
    n, nxt = verify_greedy(logits, torch.tensor([[3, 4, 5], [3, 4, 5]]))
    assert n.tolist() == [3, 1] and nxt.tolist() == [6, 9]


@pytest.mark.parametrize("kind", ["lookup", "self-int4", "other-model", "same-model"])
def test_greedy_speculative_equals_greedy(target, make_ckpt, kind):
    rt = rt_of(target)
    draft = {"lookup": "lookup", "self-int4": "self-int4", "other-model": str(make_ckpt("tiny-llama", seed=9)),
             "same-model": rt_of(target)}[kind]
    prompts = [REPEATING, [7, 8, 9, 10, 11]]
    for batch in (prompts[:1], prompts):
        stats = SpecStats()
        want = rt.generate(batch, 24)
        got = rt.generate(batch, 24, speculative=Speculative(draft, k=3), speculative_stats=stats)
        assert got == want, (kind, len(batch))
        assert stats.rounds >= 1 and 1 <= stats.tokens_per_pass <= 4 and 0 <= stats.acceptance <= 1
        if kind == "same-model":     # the target drafting for itself: every draft is accepted
            assert stats.acceptance == 1.0 and stats.tokens_per_pass > 3, stats
    assert all(len(r) == len(p) + 24 for r, p in zip(got, prompts))


def test_greedy_speculative_tensor_prompts_and_eos(target):
    rt = rt_of(target)
    ids = torch.tensor([REPEATING[:10], REPEATING[2:12]])
    want = rt.generate(ids, 16)
    assert torch.equal(rt.generate(ids, 16, speculative=Speculative("lookup", k=5)), want)
    eos = int(want[0, 13])
    rt.eos_ids = (eos,)
    assert rt.generate([REPEATING], 16, stop_at_eos=True, speculative=Speculative("lookup", k=2)) == \
        rt.generate([REPEATING], 16, stop_at_eos=True)


def _second_token_law(rt, prompt, temperature):
    """Exact distribution of the 2nd new token: sum over t1 of p(t1 | prompt) p(t2 | prompt, t1)."""
    V = rt.config.vocab_size
    ids = torch.tensor([prompt])
    p1 = torch.softmax(rt.logits(ids)[0, -1] / temperature, -1)
    out = torch.zeros(V)
    for t1 in torch.nonzero(p1 > 1e-6).flatten().tolist():
        ext = torch.tensor([prompt + [t1]])
        out += p1[t1] * torch.softmax(rt.logits(ext)[0, -1] / temperature, -1)
    return out


@pytest.mark.parametrize("kind", ["lookup", "other-model"])
def test_sampled_speculative_has_the_targets_distribution(target, make_ckpt, kind):
    """Total variation between the empirical law of the 2nd token and the exact law, against plain sampling's."""
    rt = Runtime.from_pretrained(target, device="cpu", max_batch_size=64, max_seq_len=32)
    draft = "lookup" if kind == "lookup" else str(make_ckpt("tiny-llama", seed=9))
    prompt, temperature, n = REPEATING[:8], 1.0, 4096
    law = _second_token_law(rt, prompt, temperature)

    def tv(**kw):
        counts = torch.zeros(rt.config.vocab_size)
        for s in range(0, n, 64):
            out = rt.generate([prompt] * 64, 2, temperature=temperature, seed=list(range(s, s + 64)), **kw)
            for row in out:
                counts[row[-1]] += 1
        return 0.5 * (counts / n - law).abs().sum().item()

    plain = tv()
    spec = tv(speculative=Speculative(draft, k=2))
    print(f"{kind}: TV plain {plain:.3f}, speculative {spec:.3f}")
    assert spec < 1.3 * plain + 0.03, (spec, plain)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 20, 0.9), (0.05, 0, 1.0)])
def test_sampled_device_rounds_equal_the_host_loop(target, temperature, top_k, top_p):
    """Sampled rounds on device state (exec/spec_rounds.py, what CUDA captures) draw exactly the tokens of the
    host-loop rounds (exec/speculative.py) with the same drafts and seeds: the same rejection rule and noise.
    At temperature 0.05 drafts are accepted (the rule's acceptance branch runs), at 0.8 mostly rejected."""
    from graphrt.exec.drafts import PromptLookup
    from graphrt.exec.device_drafts import DeviceLookup
    from graphrt.exec.spec_rounds import SpecRounds
    from graphrt.exec.speculative import speculative_decode
    from graphrt.sampling import SamplingParams
    rt = rt_of(target)
    prompts = [REPEATING, [7, 8, 9, 10, 11, 7, 8, 9]]
    ids, lengths = rt._prompts(prompts)
    params = SamplingParams(temperature, top_k=top_k, top_p=top_p, seed=[11, 12])
    host_rows, host_stats = [[] for _ in prompts], SpecStats()
    for block in speculative_decode(rt.engine, PromptLookup(3), ids, lengths, 24, params, 3, host_stats):
        for row, toks in zip(host_rows, block):
            row += toks
    stats = SpecStats()
    device_rows = [[] for _ in prompts]
    for block in SpecRounds(rt.engine, DeviceLookup(3), 2, 3, capture=False, greedy=False).run(
            ids, lengths, 24, stats, params=params):
        for row, toks in zip(device_rows, block):
            row += toks
    assert device_rows == host_rows and all(len(r) == 24 for r in device_rows)
    assert stats.accepted == host_stats.accepted
    if temperature < 0.1:
        assert stats.accepted > 0
    assert rt.generate(prompts, 24, temperature=temperature, top_k=top_k, top_p=top_p, seed=[11, 12],
                       speculative=Speculative("lookup", k=3)) == [p + r for p, r in zip(prompts, device_rows)]


def test_bad_speculative_input(target, make_ckpt):
    rt = rt_of(target)
    with pytest.raises(ConfigError, match="vocabulary has 512 tokens, the target's 256"):
        rt.generate([[1, 2, 3]], 4, speculative=Speculative(str(make_ckpt("tiny-llama", vocab=512)), k=2))
    with pytest.raises(ConfigError, match="k=8 needs max_seq_len >= prompt \\+ new tokens \\+ k = 98"):
        rt.generate([[1] * 10], 80, speculative=Speculative("lookup", k=8))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        rt.generate([[1, 2]], 4, speculative=Speculative("/nonexistent/draft", k=2))
    with pytest.raises(ConfigError, match="use_graph=True needs device='cuda'"):
        rt.generate([[1, 2]], 4, temperature=0.8, use_graph=True, speculative=Speculative("lookup"))
    for bad in (dict(k=0), dict(k=1.5), dict(ngram=0)):
        with pytest.raises(ValueError):
            Speculative("lookup", **bad)


@pytest.mark.parametrize("draft", ["lookup", "self-int4"])
def test_default_model_greedy_speculative_equals_greedy(default_model, draft):
    rt = Runtime.from_pretrained(default_model, device="cpu", max_batch_size=2, max_seq_len=160)
    text = ("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. "
            "Repeat the sentence once more: The quick brown fox")
    prompts = [rt.encode(text), rt.encode("Summarise: graphrt streams weights into a ring of GPU slots.")]
    stats = SpecStats()
    want = rt.generate(prompts, 32)
    assert rt.generate(prompts, 32, speculative=Speculative(draft, k=4), speculative_stats=stats) == want
    print(f"{draft}: {stats.tokens_per_pass:.2f} tokens per target pass, acceptance {stats.acceptance:.2f}")
    assert stats.tokens_per_pass > 1.2


@pytest.mark.gpu
@pytest.mark.parametrize("draft", ["lookup", "self-int4", "other-model"])
def test_cuda_greedy_speculative_equals_greedy_fp32(make_ckpt, draft):
    """Captured rounds (use_graph=True) == the same rounds run eagerly == plain greedy, fp32, batch 1 and 2."""
    path = make_ckpt("tiny-llama", layers=3, seed=4, intermediate=192)   # int4 "blocked" (fp32) needs in % 64
    rt = Runtime.from_pretrained(path, device="cuda", dtype="float32", max_batch_size=2, max_seq_len=96)
    spec = Speculative(str(make_ckpt("tiny-llama", seed=9, intermediate=192)) if draft == "other-model" else draft, k=3)
    for prompts in ([REPEATING], [REPEATING, [7, 8, 9, 10, 11]]):
        want = rt.generate(prompts, 24, use_graph=True)
        eager, graph = SpecStats(), SpecStats()
        assert rt.generate(prompts, 24, use_graph=False, speculative=spec, speculative_stats=eager) == want
        assert rt.generate(prompts, 24, use_graph=True, speculative=spec, speculative_stats=graph) == want
        assert (eager.row_passes, eager.accepted) == (graph.row_passes, graph.accepted)
        print(f"{draft}, batch {len(prompts)}: {graph.tokens_per_pass:.2f} tokens per pass")


@pytest.mark.gpu
@pytest.mark.parametrize("draft", ["lookup", "self-int4"])
def test_cuda_sampled_rounds_captured_equal_eager(make_ckpt, draft):
    """Sampled rounds: captured (use_graph=True) == the same device rounds run eagerly, token for token."""
    path = make_ckpt("tiny-llama", layers=3, seed=4, intermediate=192)
    rt = Runtime.from_pretrained(path, device="cuda", dtype="float32", max_batch_size=2, max_seq_len=96)
    spec = Speculative(draft, k=3)
    kw = dict(temperature=0.9, top_k=40, seed=[3, 4], speculative=spec)
    prompts = [REPEATING, [7, 8, 9, 10, 11]]
    assert rt.generate(prompts, 24, use_graph=True, **kw) == rt.generate(prompts, 24, use_graph=False, **kw)


@pytest.mark.gpu
def test_cuda_captured_rounds_streamed_bf16(make_ckpt):
    """bf16 with half the layers streamed: captured rounds (the target streams once per round) == eager rounds,
    and == plain greedy decoding where no near-tie intervenes (the first difference is reported)."""
    from test_cpu_lane import half_budget
    # 12 layers: with 4, three ring slots and half the layers hold every layer, and the plan is all-resident
    path = make_ckpt("tiny-llama", layers=12, seed=4, dtype=torch.bfloat16)
    kw = dict(dtype="bfloat16", max_seq_len=96, max_batch_size=2, prefill_chunk=32)   # one chunk size for both plans
    probe = Runtime.from_pretrained(path, device="cuda", gpu_budget="60GiB", **kw)   # planned as the GPU run is
    rt = Runtime.from_pretrained(path, device="cuda", gpu_budget=half_budget(probe.placement), **kw)
    assert rt.placement.streamed, rt.placement.describe()
    spec = Speculative("self-int4", k=4)
    prompts = [REPEATING, [7, 8, 9, 10, 11]]
    eager = rt.generate(prompts, 32, use_graph=False, speculative=spec)
    assert rt.generate(prompts, 32, use_graph=True, speculative=spec) == eager
    plain = rt.generate(prompts, 32, use_graph=True)
    print("first difference from plain:", [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                                           for x, y in zip(eager, plain)])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_of_different_lengths_with_max_seq_len_exactly_enough(target, temperature):
    """The short row is done rounds before the long one; with max_seq_len = longest + new tokens + k exactly,
    no round may write past the cache (the done row stays within its room)."""
    k, new = 4, 20
    prompts = [REPEATING[:3], REPEATING]
    rt = Runtime.from_pretrained(target, device="cpu", max_batch_size=2, max_seq_len=len(REPEATING) + new + k)
    spec = Speculative("lookup", k=k)
    kw = dict(temperature=temperature, seed=3)
    got = rt.generate(prompts, new, speculative=spec, **kw)
    assert [len(r) for r in got] == [len(p) + new for p in prompts]
    if temperature == 0.0:
        assert got == rt.generate(prompts, new)


def test_statistics_when_the_caller_stops_early(target):
    """A chat stops at EOS by closing the stream: the rounds run until then are still counted (the CLI prints
    them)."""
    rt = rt_of(target)
    stats = SpecStats()
    stream = rt.stream([REPEATING], 40, speculative=Speculative("lookup", k=3), speculative_stats=stats)
    got = [next(stream) for _ in range(2)]
    stream.close()
    assert sum(len(g[0]) for g in got) >= 2
    assert stats.rounds >= 1 and stats.row_passes >= 1 and stats.tokens_per_pass >= 1.0, stats
