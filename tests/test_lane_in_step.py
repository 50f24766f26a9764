"""The CPU lane measured inside the captured step (issue 17's prediction bound): the factor later plans take
(plan/in_step.py), the same homes priced at another rate (placement.repredict), the runtime's plan again at other
rates (load_plan.RuntimePlan.replan), and on CUDA the runtime that plans again from its first replays."""
import json

import pytest
import torch

from graphrt.config import ModelConfig
from graphrt.exec import cpu_lane
from graphrt.plan import calibrate, in_step
from graphrt.plan.cost import CostModel
from graphrt.plan.placement import plan_placement, repredict
from graphrt.runtime import Runtime
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint

CFG_8B = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=16), dtype="bfloat16"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6))
    return write_checkpoint(tmp_path_factory.mktemp("in_step") / "m", cfg, random_tensors(cfg, 3))


def test_the_in_step_factor_is_stored_beside_the_rates_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=256, intermediate=512)))
    policy = quantization_policy("int4", torch.bfloat16, torch.device("cpu"))
    assert in_step.in_step_factor(cfg, policy, 1) == 1.0          # never measured
    in_step.store_in_step_factor(cfg, policy, 1, 0.8)
    assert in_step.in_step_factor(cfg, policy, 1) == 0.8
    assert in_step.in_step_factor(cfg, policy, 4) == 1.0          # another batch: its own factor
    assert any(k.endswith("|in-step") for k in json.loads(calibrate.cache_file().read_text()))
    with pytest.raises(ValueError, match="must be > 0"):
        in_step.store_in_step_factor(cfg, policy, 1, 0.0)
    calibrate.clear_cache()
    assert in_step.in_step_factor(cfg, policy, 1) == 1.0


def test_repredict_prices_the_same_homes_at_another_rate():
    budget = int(6.9 * 2**30)   # 8B shape, 16 layers: about half the layers' bytes fit
    cost = CostModel(cpu_rate=50e9)
    p = plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, cost=cost)
    assert p.cpu
    same = repredict(p, cost)
    assert same == p and same.prediction.step_time == pytest.approx(p.prediction.step_time, rel=1e-12)
    assert same.prediction.host_compute == pytest.approx(p.prediction.host_compute, rel=1e-12)
    slow = repredict(p, CostModel(cpu_rate=25e9))
    assert slow == p                                   # the homes are kept (Placement equality ignores the rates)
    assert slow.cost.cpu_rate == 25e9 and slow.prediction.step_time > p.prediction.step_time
    assert slow.prediction.host_compute == pytest.approx(2 * p.prediction.host_compute, rel=0.05)
    assert slow.cpu_busy > p.cpu_busy


def test_the_runtime_plans_again_at_other_rates_with_its_budget_and_options(model):
    kw = dict(device="cpu", max_batch_size=1, max_seq_len=64, stream_unit="attn_mlp")
    probe = Runtime.from_pretrained(model, **kw)
    layers = [g.nbytes for g in probe.placement.groups if g.kind not in ("embed", "head")]
    budget = sum(probe.placement.memory.values()) - sum(layers) // 2
    rt = Runtime.from_pretrained(model, **kw, gpu_budget=budget, cpu_lane=True, cpu_rate=1e12, h2d_bandwidth=1e6)
    p = rt.placement
    assert p.cpu and rt.plan.lane is not None and rt.plan.lane[3] == 1.0   # a given rate takes no factor
    again = rt.plan.replan(p.cost)
    assert again == p and again.prediction.step_time == pytest.approx(p.prediction.step_time)
    slow = rt.plan.replan(CostModel(h2d_bandwidth=1e6, cpu_rate=1e3))   # a CPU slower than the copies
    assert len(slow.cpu) < len(p.cpu)
    assert rt.lane_in_step_rate is None                                # measured on CUDA only
    rt.close()


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """MLP groups of 25 MB in bf16: the lane's host functions take longer than its per-group node cost."""
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=4, hidden=1024, intermediate=4096, heads=8, kv_heads=4))
    return write_checkpoint(tmp_path_factory.mktemp("in_step") / "mid", cfg, random_tensors(cfg, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_lane_that_runs_slower_than_planned_is_planned_again(mid_model, tmp_path, monkeypatch, capsys):
    """A stored factor of 5 makes the plan price the lane 5x faster than this machine runs it: the runtime measures
    the lane in its first replays, stores a new factor, and its placement is priced (or planned again and loaded)
    at the measured rate; the captured step still equals the eager one. Copies priced at 1 MB/s keep MLPs on the
    lane at any measured CPU rate."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kw = dict(device="cuda", dtype="bfloat16", max_seq_len=128, stream_unit="attn_mlp", cpu_threads=2,
              h2d_bandwidth=1e6)
    probe = Runtime.from_pretrained(mid_model, **kw, gpu_budget="60GiB")
    q = probe.placement
    layers = sum(g.nbytes for g in q.groups if g.kind not in ("embed", "head"))
    budget = sum(q.memory.values()) - layers // 2   # half the layers' bytes off the GPU
    probe.close()
    first = Runtime.from_pretrained(mid_model, **kw, gpu_budget=budget, cpu_lane=True, placement="lane")
    assert first.placement.cpu, first.placement.describe()
    cfg, policy, batch, factor = first.plan.lane
    assert first.lane_in_step_rate and first.lane_in_step_rate > 0
    measured = in_step.in_step_factor(cfg, policy, batch)
    first.close()
    in_step.store_in_step_factor(cfg, policy, batch, 5 * measured)
    rt = Runtime.from_pretrained(mid_model, **kw, gpu_budget=budget, cpu_lane=True, placement="lane")
    assert rt.plan.lane[3] == pytest.approx(5 * measured)
    assert in_step.in_step_factor(cfg, policy, batch) < 0.8 * 5 * measured   # measured again, stored
    p = rt.placement
    assert p.cpu and p.cost.cpu_rate < 0.8 * rt.plan.placement.cost.cpu_rate   # priced at the rate in the step
    planned = p.prediction.host_compute - len(p.cpu) * p.cost.cpu_overhead
    assert planned == pytest.approx(p.cpu_bytes / rt.lane_in_step_rate, rel=0.2)   # the host functions' time
    print(capsys.readouterr().err)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(rt.generate(ids, 16, use_graph=False), rt.generate(ids, 16, use_graph=True))
    cpu_lane.check()
    rt.close()
