"""Pieces (weights/pieces.py): a group cut into row ranges of its matrices, each filling one ring slot."""
import pytest
import torch

from graphrt.config import ModelConfig
from graphrt.weights.formats import FP8, Dense, Int4, Int8, Weight
from graphrt.weights.layout import FormatPolicy, model_groups
from graphrt.weights.pieces import ROW_ALIGN, cut_group
from graphrt.weights.synthetic import PRESETS, make_config

BF = torch.bfloat16
CFG = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], layers=2, hidden=256, intermediate=640)))
CFG_8B = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=2), dtype="bfloat16"))

FORMATS = {
    "bf16": None,
    "int8": Int8(BF),
    "fp8": FP8(BF),
    "int4-blocked": Int4(BF, packing="blocked"),
    "int4-tinygemm": Int4(BF, packing="cuda"),     # tiles of 8 rows, packed on the CPU here
    "int4-g32": Int4(BF, packing="blocked", group_size=32),
}


def _filled(layout, policy, seed: int) -> tuple[torch.Tensor, dict]:
    """A group buffer holding random matrices encoded in their formats, and those matrices as the format reads
    them back (dense float32)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(buf)
    want = {}
    for t in layout.tensors:
        dense = torch.randn(t.shape, generator=g).to(torch.bfloat16)
        if not t.is_matrix:
            views[t.key].copy_(dense)
            continue
        for name, part in t.format.encode(dense, torch.device("cpu")).items() if not isinstance(
                t.format, Dense) else [("w", dense.to(t.format.dtype))]:
            views[t.key].parts[name].copy_(part)
        want[t.key] = views[t.key].format.dense(views[t.key].parts, torch.float32)
    return buf, want


@pytest.mark.parametrize("name", FORMATS)
def test_pieces_assemble_the_rows_of_every_format(name):
    policy = FormatPolicy(torch.bfloat16, matrix=FORMATS[name])
    mlp = next(g for g in model_groups(CFG, policy, "attn_mlp") if g.name == "mlp.1")
    host, want = _filled(mlp, policy, 3)
    slot_bytes = mlp.nbytes // 3
    pieces = cut_group(mlp, slot_bytes)
    assert pieces is not None and len(pieces) >= 4
    assert [p.layout.name for p in pieces] == [f"mlp.1/{i}" for i in range(len(pieces))]
    assert [p.ends_group for p in pieces] == [False] * (len(pieces) - 1) + [True]
    covered = {}
    for p in pieces:
        assert p.layout.nbytes <= slot_bytes and p.group == "mlp.1" and p.layout.kind == "piece"
        assert p.rows[0] % ROW_ALIGN == 0 and p.rows[1] <= p.matrix_rows
        slot = torch.full((slot_bytes,), 0xAB, dtype=torch.uint8)   # stale bytes that the copies must cover
        for src, dst, n in p.copies:
            slot[dst:dst + n] = host[src:src + n]
        views = p.layout.views(slot)
        w = views[p.key]
        assert isinstance(w, Weight) and w.shape == (p.rows[1] - p.rows[0], want[p.key].shape[1])
        assert torch.equal(w.format.dense(w.parts, torch.float32), want[p.key][p.rows[0]:p.rows[1]])
        if p is pieces[0]:
            assert torch.equal(views["post_norm"], mlp.views(host)["post_norm"])
        covered.setdefault(p.key, []).append(p.rows)
    for key, ranges in covered.items():   # every row once, in order
        assert ranges[0][0] == 0 and ranges[-1][1] == want[key].shape[0]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_8b_mlp_pieces_fit_attention_sized_slots_in_a_few_copies():
    for fmt, most_copies in ((None, 1), (Int8(BF), 2), (Int4(BF, packing="blocked"), 1 + 14336 // 128)):
        groups = {g.name: g for g in model_groups(CFG_8B, FormatPolicy(torch.bfloat16, matrix=fmt), "attn_mlp")}
        slot = groups["attn.0"].nbytes
        pieces = cut_group(groups["mlp.0"], slot)
        assert pieces and all(p.layout.nbytes <= slot for p in pieces)
        # gate_up: 3 or 4 pieces of about equal rows, down: 2 (it is half the bytes)
        assert 5 <= len(pieces) <= 7, [(p.key, p.rows) for p in pieces]
        assert max(len(p.copies) for p in pieces[1:]) <= most_copies
        assert sum(n for p in pieces for _, _, n in p.copies) == sum(
            part.nbytes for t in groups["mlp.0"].tensors for part, _ in t.parts)


def test_groups_that_cannot_be_cut_say_so():
    policy = FormatPolicy(torch.float32)
    odd = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], layers=1, hidden=64, intermediate=96)))
    mlp = next(g for g in model_groups(odd, policy, "attn_mlp") if g.kind == "mlp")
    assert cut_group(mlp, mlp.nbytes // 2) is None           # 96 rows: not a multiple of ROW_ALIGN
    whole = cut_group(mlp, mlp.nbytes)                       # unless each matrix fits a piece whole
    assert [(p.key, p.rows) for p in whole] == [("gate_up", (0, 192)), ("down", (0, 64))]
    mlp = next(g for g in model_groups(CFG, policy, "attn_mlp") if g.kind == "mlp")
    assert cut_group(mlp, 1000) is None                      # a slot smaller than ROW_ALIGN rows


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    from graphrt.weights.synthetic import random_tensors, write_checkpoint
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6, hidden=128, intermediate=256))
    return write_checkpoint(tmp_path_factory.mktemp("pieces") / "w", cfg, random_tensors(cfg, 4))


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_lane_plan_with_attention_slots_streams_prompts_in_pieces(wide_model, quantization):
    """With a fast CPU lane the planner computes every non-resident MLP group on the CPU and sizes the slots for the
    attention groups; prompt steps stream those MLP groups in pieces through the small slots, decode steps keep
    them on the CPU. Against the all-resident runtime: the same greedy tokens, logits within float32 rounding."""
    from graphrt.runtime import Runtime
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, quantization=quantization)
    ref = Runtime.from_pretrained(wide_model, **kw)
    groups = {g.name: g for g in ref.placement.groups}
    fixed = sum(v for k, v in ref.placement.memory.items() if k != "weights")
    # the embedding, head, 3 attention-sized slots and half of the layers' bytes
    layers = sum(g.nbytes for g in groups.values() if g.kind in ("attn", "mlp", "layer"))
    budget = fixed + groups["embed"].nbytes + groups["head"].nbytes + 3 * 2 * 128 * 128 * 4 + layers // 2
    rt = Runtime.from_pretrained(wide_model, **kw, gpu_budget=budget, stream_unit="attn_mlp", cpu_lane=True,
                                 cpu_rate=1e12, h2d_bandwidth=1e6)
    p, store = rt.placement, rt.engine.store
    assert p.strategy == "lane+cpu" and p.cpu and p.streamed, p.describe()
    assert not any(n.startswith("mlp.") for n in p.streamed) and all(n.startswith("mlp.") for n in p.cpu)
    assert max(g.nbytes for g in p.groups if g.name in p.cpu) > p.slot_bytes            # the lane's groups fit no slot whole
    assert p.prompt_streamed == p.cpu and store.pieces and {c.group for c in store.pieces.values()} == p.cpu
    prompt_names = [op.group for op in rt.engine.prompt_plans[0][0].ops if op.kind == "compute"]
    assert [n for n in prompt_names if "/" in n] == list(store.pieces)     # pieces replace the lane's groups
    calls = []
    run = rt.engine.cpu_lane.run
    rt.engine.cpu_lane.run = lambda h, fn: calls.append(h.shape[1]) or run(h, fn)
    got, want = rt.logits(ids), ref.logits(ids)
    assert calls == []                                                    # the prompt never reached the lane
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert rt.generate(ids, 8).equal(ref.generate(ids, 8))
    assert calls and set(calls) == {1}                                    # decode steps, one token each
    rt.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("copy_mode", ["memcpy", "kernel"])
def test_cuda_prompts_stream_lane_groups_in_pieces(wide_model, copy_mode):
    """On the GPU: the lane plan with attention-sized slots; prompts stream the lane's MLP groups in pieces (copy
    engine or copy kernel), decode computes them on the CPU inside the captured step. Graph == eager; against the
    all-GPU run bf16 logits within 2e-2 relative."""
    from graphrt.exec import cpu_lane
    from graphrt.runtime import Runtime
    kw = dict(device="cuda", dtype="bfloat16", max_seq_len=128, stream_unit="attn_mlp")
    ref = Runtime.from_pretrained(wide_model, **kw)
    groups = {g.name: g for g in ref.placement.groups}
    fixed = sum(v for k, v in ref.placement.memory.items() if k != "resident_weights" and k != "weights")
    layers = sum(g.nbytes for g in groups.values() if g.kind in ("attn", "mlp"))
    budget = fixed + groups["embed"].nbytes + groups["head"].nbytes + 3 * groups["attn.0"].nbytes + layers // 2
    rt = Runtime.from_pretrained(wide_model, **kw, gpu_budget=budget, cpu_lane=True, cpu_rate=1e12,
                                 h2d_bandwidth=1e6, copy_mode=copy_mode, cpu_threads=2)
    p = rt.placement
    assert p.strategy == "lane+cpu" and rt.engine.store.pieces and p.prompt_streamed == p.cpu, p.describe()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    got, want = rt.logits(ids), ref.logits(ids)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    eager, graph = rt.generate(ids, 32, use_graph=False), rt.generate(ids, 32, use_graph=True)
    assert torch.equal(eager, graph)
    cpu_lane.check()
    for r in (rt, ref):
        r.close()


def test_planner_sizes_lane_plan_slots_for_attention_and_keeps_more_resident():
    """8B shape at the benchmark's split budget: with a CPU lane the fastest plan computes every non-resident MLP
    group on the CPU and streams attention groups through attention-sized slots; the memory this frees holds more
    resident bytes than the best plan with MLP-sized slots, and every lane group can be cut for prompts."""
    from graphrt.plan.cost import CostModel
    from graphrt.plan.placement import plan_placement
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=16), dtype="bfloat16"))
    budget = int(6.78 * 2**30)
    cost = CostModel(h2d_bandwidth=55e9, cpu_rate=90e9, h2d_beside_cpu=50e9)
    best = plan_placement(cfg, budget, 3, 1, 512, torch.bfloat16, stream_unit="attn_mlp", cost=cost)
    lane = plan_placement(cfg, budget, 3, 1, 512, torch.bfloat16, stream_unit="attn_mlp", cost=cost, strategy="lane")
    wide = plan_placement(cfg, budget, 3, 1, 512, torch.bfloat16, stream_unit="attn_mlp", cost=cost, strategy="spread")
    groups = {g.name: g for g in lane.groups}
    assert lane.strategy == "lane+cpu" and wide.strategy == "spread+cpu", (lane.describe(), wide.describe())
    assert best.strategy.startswith("lane") and best.prediction.step_time <= lane.prediction.step_time
    assert lane.slot_bytes == groups["attn.0"].nbytes < wide.slot_bytes == groups["mlp.0"].nbytes
    assert all(groups[n].kind == "attn" for n in lane.streamed)
    assert {n for n in groups if n.startswith("mlp.")} == {n for n in groups if n.startswith("mlp.") and (
        n in lane.resident or n in lane.cpu)}
    assert lane.resident_bytes > wide.resident_bytes + 2 * 2**30 // 3
    assert lane.prediction.step_time < wide.prediction.step_time
    assert all(cut_group(groups[n], lane.slot_bytes) for n in lane.cpu)
    assert sum(lane.memory.values()) <= budget
