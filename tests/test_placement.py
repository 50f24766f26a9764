"""Placement under a budget: counts everything, errors clearly, prefers the fastest resident set."""
import pytest
import torch

from graphrt import BudgetError, ConfigError, ModelConfig, plan_placement
from graphrt.config import parse_bytes
from graphrt.plan.placement import essentials
from graphrt.weights.layout import model_groups

GiB = 2**30


def cfg70b():
    return ModelConfig.from_file("tools/configs/llama-3.1-70b.json")


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * GiB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert parse_bytes(1234) == 1234
    with pytest.raises(ConfigError):
        parse_bytes("twelve")


def test_everything_fits():
    cfg = ModelConfig.from_file("tools/configs/llama-3.1-8b.json")
    p = plan_placement(cfg, 40 * GiB, 3, 1, 4096, torch.bfloat16)
    assert p.streamed == [] and p.slot_bytes == 0 and p.prediction is None


def test_70b_on_80gb_counts_everything_within_budget():
    cfg = cfg70b()
    budget = parse_bytes("80GB")
    p = plan_placement(cfg, budget, 3, 1, 4096, torch.bfloat16)
    assert sum(p.memory.values()) <= budget
    assert p.memory["ring"] == 3 * p.slot_bytes
    assert {"kv_cache", "activations", "logits", "margin", "resident_weights"} <= set(p.memory)
    assert 0 < len(p.streamed) < cfg.num_layers + 2
    assert "embed" in p.resident  # streaming 2 GB to look up one row would be silly
    # predicted step ~ streamed bytes / bandwidth when copy-bound
    assert p.prediction.step_time == pytest.approx(p.streamed_bytes / 55e9, rel=0.05)
    assert p.prediction.hazards == []


def test_lm_head_is_a_group_and_can_stream():
    cfg = cfg70b()
    groups = {g.name: g for g in model_groups(cfg, torch.bfloat16)}
    assert groups["head"].nbytes >= 128256 * 8192 * 2
    assert groups["embed"].nbytes >= 128256 * 8192 * 2


def test_budget_too_small_states_minimum():
    cfg = cfg70b()
    with pytest.raises(BudgetError, match=r"at least \d+\.\d+ GiB is needed"):
        plan_placement(cfg, 4 * GiB, 3, 1, 4096, torch.bfloat16)


def test_budget_larger_than_device():
    with pytest.raises(BudgetError, match="larger than the device"):
        plan_placement(cfg70b(), 100 * GiB, 3, 1, 4096, torch.bfloat16, device_memory=80 * GiB)


def test_ring_depth_below_two():
    with pytest.raises(ConfigError, match="ring_depth"):
        plan_placement(cfg70b(), 80 * GiB, 1)


def test_kv_cache_grows_with_batch_and_length():
    cfg = cfg70b()
    small = essentials(cfg, torch.bfloat16, 1, 1024, 256)["kv_cache"]
    assert essentials(cfg, torch.bfloat16, 4, 4096, 256)["kv_cache"] == 16 * small


def test_more_budget_streams_less():
    cfg = cfg70b()
    streamed = [plan_placement(cfg, b * GiB, 4, 1, 4096, torch.bfloat16).streamed_bytes for b in (20, 40, 70, 120)]
    assert streamed == sorted(streamed, reverse=True) and streamed[-1] < streamed[0]


def test_split_groups_use_smaller_slots():
    cfg = cfg70b()
    whole = plan_placement(cfg, 40 * GiB, 3, 1, 4096, torch.bfloat16, stream_unit="layer")
    split = plan_placement(cfg, 40 * GiB, 3, 1, 4096, torch.bfloat16, stream_unit="attn_mlp")
    assert split.slot_bytes < whole.slot_bytes
    assert any(n.startswith("mlp.") for n in split.streamed)


def test_chooses_by_predicted_time_not_first_layers():
    """Resident layers in a compute-heavy setting: the chosen set has the lowest predicted time."""
    from graphrt.plan.cost import CostModel
    cfg = ModelConfig.from_file("tools/configs/llama-3.1-8b.json")
    cost = CostModel(h2d_bandwidth=55e9, hbm_bandwidth=3e12, flops=2e12, batch_size=16)
    best = plan_placement(cfg, 14 * GiB, 3, 16, 512, torch.bfloat16, cost=cost)
    for strategy in ("first", "last", "spread"):
        other = plan_placement(cfg, 14 * GiB, 3, 16, 512, torch.bfloat16, cost=cost, strategy=strategy)
        assert best.prediction.step_time <= other.prediction.step_time + 1e-12


def test_auto_unit_picks_the_faster_prediction():
    cfg = cfg70b()
    kw = dict(gpu_budget=40 * GiB, ring_depth=3, max_batch_size=1, max_seq_len=4096, dtype=torch.bfloat16)
    auto = plan_placement(cfg, **kw, stream_unit="auto")
    layer = plan_placement(cfg, **kw, stream_unit="layer")
    split = plan_placement(cfg, **kw, stream_unit="attn_mlp")
    assert auto.prediction.step_time <= min(layer.prediction.step_time, split.prediction.step_time) * 1.01
    assert auto.stream_unit in ("layer", "attn_mlp")
    assert ("attn_mlp" if any(n.startswith("mlp.") for n in auto.streamed) else "layer") == auto.stream_unit
