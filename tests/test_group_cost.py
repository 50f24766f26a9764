"""The CPU lane's cost per group (plan/group_cost.py): measured on three part sizes, cached, and priced."""
import pytest
import torch

from graphrt.config import ModelConfig
from graphrt.plan import group_cost as gc
from graphrt.plan.cost import CostModel
from graphrt.weights.layout import FormatPolicy, mlp_parts
from graphrt.weights.synthetic import make_config


def test_marginal_rate_keeps_a_whole_group_as_long():
    whole, rate, cost = 300e6, 100e9, 150e-6
    fast = gc.marginal(rate, whole, cost)
    assert fast > rate and whole / fast + cost == pytest.approx(whole / rate)
    assert gc.marginal(rate, whole, 0.0) == rate and gc.marginal(rate, 1000, 1.0) == rate   # nothing left: as is


def test_a_group_pays_its_cost_once_beside_copies_and_alone():
    cfg = ModelConfig.from_dict(make_config("LlamaForCausalLM", 256, 1024, 1, 4, 2, 512, dtype="bfloat16"))
    g = mlp_parts(cfg, 0, FormatPolicy(torch.bfloat16), 512)[1]
    c = CostModel(cpu_rate=50e9, cpu_rate_alone=100e9, cpu_overhead=0.0, cpu_group_cost=1e-4)
    assert c.cpu_times(g) == pytest.approx((g.nbytes / 100e9 + 1e-4, g.nbytes / 50e9 + 1e-4))


def test_group_cost_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig.from_dict(make_config("LlamaForCausalLM", 256, 4096, 1, 4, 2, 512, dtype="bfloat16"))
    policy = FormatPolicy(torch.bfloat16)
    calls = []
    real = gc.time_part
    monkeypatch.setattr(gc, "time_part", lambda *a: calls.append(a[3]) or real(*a))
    cost = gc.group_cost(cfg, policy, 1, seconds=0.05)
    assert cost >= 0.0 and sorted(calls) == [512, 2048, 4096 - 256]   # a small, a middle and a nearly whole part
    assert gc.group_cost(cfg, policy, 1) == cost and len(calls) == 3   # the second load reads the cache


def test_the_cost_is_the_intercept_of_a_least_squares_line():
    line = [(b, 40e-6 + b / 100e9) for b in (10e6, 50e6, 90e6)]
    assert gc.intercept(line) == pytest.approx(40e-6)
    noisy = [(10e6, 140e-6 + 3e-6), (50e6, 540e-6 - 6e-6), (90e6, 940e-6 + 3e-6)]   # residuals sum to zero
    assert gc.intercept(noisy) == pytest.approx(40e-6, abs=1e-9)
    assert gc.intercept([(10e6, 1e-3), (50e6, 1e-3)]) == 0.0                   # no slope: no cost to tell
