"""Helpers shared by the GPU tests."""
import torch

from graphrt import Runtime

MID = dict(arch="LlamaForCausalLM", hidden=256, intermediate=704, layers=16, heads=8, kv_heads=2, vocab=1024)


def runtime(path, mode: str, ring_depth: int = 3, **kw) -> Runtime:
    """mode: 'resident', 'half' (about half the layers stream) or 'full' (every group streams)."""
    kw.setdefault("max_seq_len", 128)
    kw.setdefault("device", "cuda")
    probe = Runtime.from_pretrained(path, gpu_budget="70GiB", **kw)
    if mode == "resident":
        assert probe.placement.streamed == []
        return probe
    mem = probe.placement.memory
    weights = mem["weights"]
    fixed = sum(mem.values()) - weights
    slot = max(g.nbytes for g in probe.placement.groups if g.kind != "embed" or not probe.config.tie_word_embeddings)
    tied = sum(g.nbytes for g in probe.placement.groups if g.kind == "embed") if probe.config.tie_word_embeddings else 0
    # the probe's prefill chunk: otherwise the budgeted run plans with 256-token chunks, finds every weight fits,
    # and widens its chunks into what the ring would have used (placement.widen_prefill_chunk)
    kw.setdefault("prefill_chunk", probe.placement.prefill_chunk)
    del probe
    budget = fixed + ring_depth * slot + tied + (weights // 2 if mode == "half" else 0)
    rt = Runtime.from_pretrained(path, gpu_budget=budget, ring_depth=ring_depth, **kw)
    n = len(rt.placement.streamed)
    assert n > 0, rt.placement.describe()
    if mode == "full":
        assert all(g.kind == "embed" or g.name in rt.placement.streamed for g in rt.placement.groups) or n >= rt.config.num_layers
    return rt


def eager_decode(rt: Runtime, ids: torch.Tensor, steps: int, **sampling):
    logits = []
    toks = list(rt.decode_eager(ids, steps, logits_out=logits, **sampling))
    return torch.cat(toks, 1).cuda(), torch.stack(logits)


def graph_decode(rt: Runtime, ids: torch.Tensor, steps: int, between=None, **sampling):
    g = rt.capture(ids.shape[0])
    first = g.prefill(ids, **sampling)
    toks, logits = [first], [g.logits.clone()]
    for _ in range(steps - 1):
        if between is not None:
            between(rt)
        toks.append(g.step().clone())
        logits.append(g.logits.clone())
    return torch.stack(toks, 1), torch.stack(logits)
