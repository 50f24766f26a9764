"""Sampling: greedy, temperature, top-k, top-p; seeded and a pure function of (seed, position)."""
import torch

from graphrt.sampling import sample, uniform_noise


def params(B, t=1.0, k=0, p=1.0, seed=0):
    return (torch.full((B,), t), torch.full((B,), k), torch.full((B,), p), torch.full((B,), seed))


def test_greedy_and_topk1_are_argmax():
    logits = torch.randn(4, 100)
    pos = torch.arange(4)
    assert torch.equal(sample(logits, *params(4, t=0.0), counter=pos), logits.argmax(-1))
    assert torch.equal(sample(logits, *params(4, t=0.7, k=1), counter=pos), logits.argmax(-1))


def test_topk_and_topp_restrict_support():
    logits = torch.randn(1, 50).repeat(2000, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    s = sample(logits, *params(2000, t=2.0, k=5), counter=torch.arange(2000))
    assert set(s.tolist()) <= top5 and len(set(s.tolist())) == 5
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    nucleus = set(order[:keep].tolist())
    s = sample(logits, *params(2000, p=0.5), counter=torch.arange(2000))
    assert set(s.tolist()) <= nucleus


def test_distribution_follows_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(20000, 1)
    s = sample(logits, *params(20000), counter=torch.arange(20000))
    freq = torch.bincount(s, minlength=4).float() / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)


def test_seeded_noise_is_deterministic_and_seed_dependent():
    a = uniform_noise(torch.tensor([7, 7]), torch.tensor([3, 4]), 1000)
    assert torch.equal(a, uniform_noise(torch.tensor([7, 7]), torch.tensor([3, 4]), 1000))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, uniform_noise(torch.tensor([8, 8]), torch.tensor([3, 4]), 1000))
    assert (a > 0).all() and (a < 1).all() and abs(a.mean().item() - 0.5) < 0.03


def test_generate_sampling_reproducible(make_ckpt):
    from graphrt import Runtime
    rt = Runtime.from_pretrained(make_ckpt(), device="cpu", max_batch_size=2, max_seq_len=64)
    ids = torch.randint(3, 200, (2, 5))
    a = rt.generate(ids, 20, temperature=1.0, top_k=20, top_p=0.95, seed=5)
    assert torch.equal(a, rt.generate(ids, 20, temperature=1.0, top_k=20, top_p=0.95, seed=5))
    assert not torch.equal(a, rt.generate(ids, 20, temperature=1.0, top_k=20, top_p=0.95, seed=6))
