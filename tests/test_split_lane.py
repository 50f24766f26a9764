"""MLPs split by intermediate rows between the GPU and the CPU lane (plan/lanes.py, weights/layout.mlp_parts).

A split MLP is two groups: "mlp.i:gpu" (the norm and gate/up rows [0, c), down columns [0, c)) and "mlp.i:cpu" (the
other rows). Each part's buffer must hold exactly its slice of the checkpoint (safetensors and GGUF), the two
products must add up to the MLP's, and a runtime whose plan splits MLPs must give the all-resident runtime's tokens.
"""
import pytest
import torch

from graphrt.config import ConfigError, ModelConfig
from graphrt.exec import cpu_lane
from graphrt.models import llama
from graphrt.plan.cost import NODE_COST, CostModel
from graphrt.plan.placement import plan_placement
from graphrt.runtime import Runtime
from graphrt.weights.formats import Dense, int4_cpu
from graphrt.weights.layout import FormatPolicy, mlp_parts, model_groups
from graphrt.weights.sources import open_source
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint

from test_gguf_source import bits, fill, write_gguf

CFG_8B = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=16), dtype="bfloat16"))
SPEC = dict(PRESETS["tiny-llama"], layers=4, hidden=512, intermediate=768)


@pytest.fixture(scope="module")
def split_model(tmp_path_factory):
    cfg = make_config(**SPEC)
    return write_checkpoint(tmp_path_factory.mktemp("split") / "m", cfg, random_tensors(cfg, 5))


def half_budget(p) -> int:
    """Fixed memory, embedding and head, 3 attention-sized slots and half the layer groups' bytes (of an
    all-resident attn_mlp placement p)."""
    groups = {g.name: g for g in p.groups}
    fixed = sum(v for k, v in p.memory.items() if k != "weights")
    layers = sum(g.nbytes for g in groups.values() if g.kind in ("attn", "mlp"))
    return fixed + groups["embed"].nbytes + groups["head"].nbytes + 3 * groups["attn.0"].nbytes + layers // 2


def _dense(views, key):
    v = views[key]
    return v.format.dense(v.parts, torch.float32) if hasattr(v, "format") else v.float()


def test_mlp_parts_hold_their_rows_of_a_safetensors_checkpoint(split_model):
    from safetensors.torch import load_file
    ckpt = open_source(split_model)
    cfg = ckpt.config
    held = {}
    for f in split_model.glob("*.safetensors"):
        held.update(load_file(f))
    gpu, cpu = mlp_parts(cfg, 1, FormatPolicy(torch.float32), 256)
    assert (gpu.ffn, cpu.ffn, gpu.kind, cpu.kind) == ((0, 256), (256, 768), "mlp_gpu", "mlp_cpu")
    assert {t.key for t in gpu.tensors} == {"post_norm", "gate_up", "down"} and "post_norm" not in {
        t.key for t in cpu.tensors}
    p = "model.layers.1.mlp."
    for g, views in fill(ckpt, [gpu, cpu]):
        a, b = g.ffn
        gate_up = torch.cat([held[p + "gate_proj.weight"][a:b], held[p + "up_proj.weight"][a:b]]).float()
        assert torch.equal(_dense(views, "gate_up"), gate_up), g.name
        assert torch.equal(_dense(views, "down"), held[p + "down_proj.weight"][:, a:b].float()), g.name
    # the whole model with layer 1 and 3 split: the same groups elsewhere, two parts in place of each MLP
    whole = model_groups(cfg, torch.float32, "attn_mlp")
    parted = model_groups(cfg, torch.float32, "attn_mlp", split={1: 256, 3: 512})
    names = [g.name for g in parted]
    assert names[names.index("attn.1") + 1:names.index("attn.1") + 3] == ["mlp.1:gpu", "mlp.1:cpu"]
    assert len(parted) == len(whole) + 2 and {g.name for g in whole} - set(names) == {"mlp.1", "mlp.3"}
    with pytest.raises(ValueError, match="gpu_rows"):
        mlp_parts(cfg, 1, FormatPolicy(torch.float32), 768)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "F16"])
def test_mlp_parts_hold_their_rows_of_a_gguf(tmp_path, kind):
    """GGUF quantized rows are cut on whole blocks of the file (down's columns: blocks of 32 values)."""
    from graphrt.weights.gguf_source import GGUFCheckpoint
    types = {f"blk.0.ffn_{m}.weight": kind for m in ("gate", "up", "down")}
    path, held = write_gguf(tmp_path / "m.gguf", types=types, hidden=256, inter=768)
    ckpt = GGUFCheckpoint(path)
    policy = FormatPolicy(torch.float32, per_tensor=tuple(ckpt.tensor_formats(torch.float32)))
    p = "model.layers.0.mlp."
    for g, views in fill(ckpt, list(mlp_parts(ckpt.config, 0, policy, 512))):
        a, b = g.ffn
        gate_up = torch.cat([held[p + "gate_proj.weight"][a:b], held[p + "up_proj.weight"][a:b]])
        assert torch.equal(bits(_dense(views, "gate_up")), bits(gate_up)), g.name
        assert torch.equal(bits(_dense(views, "down")), bits(held[p + "down_proj.weight"][:, a:b].contiguous()))


def test_the_two_parts_add_up_to_the_mlp():
    cfg = ModelConfig.from_dict(make_config(**SPEC))
    gen = torch.Generator().manual_seed(3)
    f, h = cfg.intermediate_size, cfg.hidden_size
    gate, up, down = (torch.randn(s, generator=gen) / 10 for s in ((f, h), (f, h), (h, f)))
    norm = torch.rand(h, generator=gen) + 0.5
    x = torch.randn(2, 3, h, generator=gen)
    W = lambda w: llama.Weight(Dense(torch.float32), {"w": w}, tuple(w.shape))  # noqa: E731
    whole = {"post_norm": norm, "gate_up": W(torch.cat([gate, up])), "down": W(down)}
    c = 256
    first = {"post_norm": norm, "gate_up": W(torch.cat([gate[:c], up[:c]])), "down": W(down[:, :c].contiguous())}
    second = {"gate_up": W(torch.cat([gate[c:], up[c:]])), "down": W(down[:, c:].contiguous())}
    normed, with_first = llama.mlp_gpu_part(x, first, cfg)
    got = llama.mlp_join(x, with_first, llama.mlp_rows(normed, second))
    want = llama.mlp_forward(x, whole, cfg)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_planner_splits_mlps_where_the_lanes_would_not_finish_together():
    """8B shape at the benchmark's split budgets and the H100 host's measured rates (session 12): at batch 1 the
    CPU bounds a whole-group lane plan, and the split plan streams the first rows of each lane MLP; at 8 sequences
    the copies bound it, and the split plan gives rows of a resident MLP to the CPU and keeps attention resident."""
    from graphrt.bench.versus import split_budget
    for batch, cpu, alone, beside, gpu, streamed_parts in ((1, 101.5e9, 125.2e9, 46.9e9, 2.83e12, True),
                                                           (8, 83.1e9, 95.3e9, 46.8e9, 2.58e12, False)):
        budget = split_budget(CFG_8B, None, batch, 512)
        cost = CostModel(cpu_rate=cpu, cpu_rate_alone=alone, h2d_beside_cpu=beside, gpu_rate=gpu, batch_size=batch,
                         cpu_overhead=NODE_COST["host"])   # session 12 reached the CPU through host nodes
        plan = lambda s: plan_placement(CFG_8B, budget, 3, batch, 512, torch.bfloat16, cost=cost,  # noqa: E731
                                        strategy=s, fused_attention=True)
        best, whole = plan("auto"), plan("lane")
        assert best.strategy == "lane-split+cpu" and best.split, best.describe()
        assert best.prediction.step_time < 0.99 * whole.prediction.step_time
        assert sum(best.memory.values()) <= budget and "split MLPs" in best.describe()
        parts = {g.name: g for g in best.groups if g.kind == "mlp_gpu"}
        assert len(parts) == len(best.split) and all(n.replace(":gpu", ":cpu") in best.cpu for n in parts)
        if streamed_parts:
            assert set(parts) <= set(best.streamed) and max(g.nbytes for g in parts.values()) <= best.slot_bytes
            assert best.cpu_bytes < whole.cpu_bytes
        else:
            assert set(parts) <= best.resident and len(best.streamed) < len(whole.streamed)
            assert best.cpu_bytes > whole.cpu_bytes


def test_lane_split_needs_the_lane():
    with pytest.raises(ConfigError, match="cpu_lane"):
        Runtime.from_pretrained("unused", device="cpu", placement="lane-split")


@pytest.mark.parametrize("quantization,home", [(None, "resident"), (None, "streamed"), ("int8", None), ("int4", None)])
def test_split_lane_runtime_tracks_all_resident(split_model, quantization, home):
    """On the CPU the lane is a direct call: the split plan's logits are the all-resident runtime's up to the
    order of the sum (two partial products), and its greedy tokens are the same. Prompt steps stream the CPU parts
    through the ring (in pieces), decode steps hand them to the lane. Copies slower than the CPU: the GPU part of a
    resident MLP stays resident; faster: the GPU parts of the lane's MLPs stream."""
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, quantization=quantization, stream_unit="attn_mlp")
    ref = Runtime.from_pretrained(split_model, **kw)
    budget = half_budget(ref.placement)
    cpu_rate, h2d = (50e9, 20e9) if home == "resident" else (20e9, 50e9)
    rt = Runtime.from_pretrained(split_model, **kw, gpu_budget=budget, cpu_lane=True, placement="lane-split",
                                 cpu_rate=cpu_rate, h2d_bandwidth=h2d)
    p, store = rt.placement, rt.engine.store
    assert p.split and p.strategy == "lane-split+cpu", p.describe()
    gpu_parts = {f"mlp.{i}:gpu" for i, _ in p.split}
    if home is not None:   # (quantized: whichever the planner picks)
        assert gpu_parts <= (p.resident if home == "resident" else set(p.streamed)), p.describe()
    split_cpu = {f"mlp.{i}:cpu" for i, _ in p.split}
    assert split_cpu <= p.cpu and split_cpu <= set(store.cpu_buffers)
    calls = []
    run = rt.engine.cpu_lane.run
    rt.engine.cpu_lane.run = lambda h, fn: calls.append(tuple(h.shape)) or run(h, fn)
    got, want = rt.logits(ids), ref.logits(ids)
    assert calls == [] or not p.prompt_streamed
    # int8: down's rows are scaled over their part's columns (as a tensor-parallel shard's are): 2.8e-3 here
    tolerance = {"int8": 1e-2, "int4": 1e-4}.get(quantization, 1e-5)   # int4: the CPU kernel's float32 sums
    assert ((got - want).abs().max() / want.abs().max()).item() < tolerance
    if quantization != "int8":
        assert rt.generate(ids, 8).equal(ref.generate(ids, 8))
    else:
        rt.generate(ids, 8)
    assert calls and {c[1] for c in calls} == {1}                            # decode steps, one token each
    rt.close()
    ref.close()


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_lane_beside_runtime_tracks_all_resident(split_model, quantization):
    """placement lane-beside splits every MLP: its first rows resident, the rest on the CPU lane, posted before the
    resident rows (a lane op in each decode plan) and joined after them. On the CPU the lane is a direct call: the
    logits are the all-resident runtime's up to the order of the sum, and the greedy tokens the same."""
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, quantization=quantization, stream_unit="attn_mlp")
    ref = Runtime.from_pretrained(split_model, **kw)
    rt = Runtime.from_pretrained(split_model, **kw, gpu_budget=half_budget(ref.placement), cpu_lane=True,
                                 placement="lane-beside", cpu_rate=50e9, h2d_bandwidth=20e9)
    p = rt.placement
    layers = rt.config.num_layers
    assert p.strategy == "lane-beside+cpu" and len(p.split) == layers and p.stream_unit == "attn_mlp", p.describe()
    assert p.beside == {f"mlp.{i}:cpu" for i in range(layers)} and {f"mlp.{i}:gpu" for i in range(layers)} <= p.resident
    assert p.streamed and p.prompt_streamed == p.cpu, p.describe()   # prompts stream the CPU parts through the ring
    lane_ops = [op.group for op in rt.engine.plans[0].ops if op.stream == "lane"]
    assert lane_ops == [f"mlp.{i}:cpu" for i in range(layers)]
    starts = []
    start = rt.engine.cpu_lane.start
    rt.engine.cpu_lane.start = lambda h, fn: starts.append(tuple(h.shape)) or start(h, fn)
    got, want = rt.logits(ids), ref.logits(ids)
    tolerance = {"int4": 1e-4}.get(quantization, 1e-5)   # int4: the CPU kernel's float32 sums
    assert ((got - want).abs().max() / want.abs().max()).item() < tolerance
    assert rt.generate(ids, 8).equal(ref.generate(ids, 8))
    decode = [s for s in starts if s[1] == 1]
    assert decode and len(decode) % layers == 0                           # every decode step posts each layer
    assert len(decode) == len(starts)                                     # and no prompt step does
    rt.close()
    ref.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization,placement", [(None, "lane-split"), ("int4", "lane-split"),
                                                    (None, "lane-beside"), ("int4", "lane-beside")])
def test_cuda_split_lane_graph_equals_eager_and_tracks_all_gpu(split_model, quantization, placement):
    """lane-beside: the GPU computes each layer's resident rows while the CPU computes the others (signalled
    nodes), in the graph and eagerly alike."""
    kw = dict(device="cuda", dtype="bfloat16", max_seq_len=128, stream_unit="attn_mlp", quantization=quantization)
    ref = Runtime.from_pretrained(split_model, **kw)
    budget = half_budget(ref.placement)
    rt = Runtime.from_pretrained(split_model, **kw, gpu_budget=budget, cpu_lane=True, placement=placement,
                                 cpu_rate=50e9, h2d_bandwidth=20e9, cpu_threads=2)
    assert rt.placement.split, rt.placement.describe()
    assert bool(rt.placement.beside) == (placement == "lane-beside"), rt.placement.describe()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    eager = rt.generate(ids, 32, use_graph=False)
    graph = rt.generate(ids, 32, use_graph=True)
    assert torch.equal(eager, graph)
    cpu_lane.check()
    lane = rt.engine.cpu_lane   # the graph's CPU groups ran as C programs where graphrt's CPU kernels run
    assert bool(lane.programs) == (lane.nodes == "signal" and int4_cpu.available()), len(lane.programs)
    got, want = rt.logits(ids), ref.logits(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
    rt.close()
    ref.close()


def test_planner_puts_every_mlp_beside_its_resident_rows_where_the_lane_lets_the_gpu_go_on():
    """The 8B shape at the versus benchmark's bf16 split budget and the H100's rates (docs/results, 7cb4389): every
    MLP split, its CPU rows beside its resident rows, predicts a shorter step with the CPU busier than the best
    split where the GPU waits for the lane. With the CPU's cost per group of Python host functions measured there
    (127 us beyond the bytes: tools/lane_parts_probe.py, the rates made marginal), its 16 groups cost more than the
    overlap gains (as measured: 49.8 against 55.2 tokens/s); at the cost of C programs (about 20 us,
    weights/formats/cpu_program.py) it predicts the shorter step again. Auto never takes it (lanes.py says why);
    host nodes (lane_beside False) hold the compute stream: no such plan there."""
    from graphrt.plan.group_cost import marginal
    from graphrt.plan.placement import plan_placement
    from graphrt.plan.calibrate import mlp_layout
    from test_cpu_lane import CFG_8B
    budget = int(6.78 * 2**30)

    def plan(strategy, per_group=0.0, **kw):
        whole = mlp_layout(CFG_8B, FormatPolicy(torch.bfloat16)).nbytes
        rates = dict(h2d_bandwidth=54.6e9, cpu_rate=marginal(107.2e9, whole, per_group),
                     cpu_rate_alone=marginal(120.6e9, whole, per_group), h2d_beside_cpu=46.1e9, gpu_rate=2.86e12)
        return plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, strategy=strategy,
                              cost=CostModel(**rates, cpu_group_cost=per_group, **kw))
    best, split = plan("lane-beside"), plan("lane-split")
    assert best.strategy == "lane-beside+cpu" and len(best.beside) == CFG_8B.num_layers, best.describe()
    assert best.prediction.step_time < 0.98 * split.prediction.step_time and best.cpu_busy > split.cpu_busy + 0.05
    costly, costly_split = plan("lane-beside", 127e-6), plan("lane-split", 127e-6)
    assert costly.prediction.step_time > costly_split.prediction.step_time
    assert plan("lane-beside", 20e-6).prediction.step_time < plan("lane-split", 20e-6).prediction.step_time
    assert costly_split.strategy == plan("auto", 20e-6).strategy == "lane-split+cpu"   # auto: asked for only
    with pytest.raises(ConfigError, match="lane-beside"):               # host nodes hold the compute stream
        plan("lane-beside", lane_beside=False)
