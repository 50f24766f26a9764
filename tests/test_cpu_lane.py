"""The CPU lane (issue 17): the planner's third home, the lane's math, the host-node trampoline, the calibration.

On the CPU the lane is a direct call, so a runtime whose plan computes some MLP groups "on the CPU lane" from
their host buffers must give exactly the logits of the all-resident runtime. GPU tests (marked `gpu`): the
captured step with host nodes == the eager step, bitwise, and close to the all-GPU run.
"""
import ctypes
import json

import pytest
import torch

from graphrt.config import ConfigError, ModelConfig
from graphrt.exec import cpu_lane
from graphrt.plan import calibrate
from graphrt.plan.cost import CostModel
from graphrt.plan.placement import plan_placement
from graphrt.runtime import Runtime
from graphrt.weights.formats import Dense, Weight, for_cpu, linear
from graphrt.weights.formats.dense import onednn_available
from graphrt.weights.formats import bf16_cpu, int4_cpu
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint

CFG_8B = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=16), dtype="bfloat16"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6))
    return write_checkpoint(tmp_path_factory.mktemp("lane") / "m", cfg, random_tensors(cfg, 3))


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Widths that are multiples of 128: int4 takes the "blocked" layout on both sides of the lane."""
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6, hidden=128, intermediate=256))
    return write_checkpoint(tmp_path_factory.mktemp("lane") / "w", cfg, random_tensors(cfg, 4))


def half_budget(p) -> int:
    """Fixed memory, embedding and head, 3 slots of the largest layer group, and half the layer groups' bytes."""
    fixed = sum(p.memory.values()) - p.memory["weights"]
    layers = [g.nbytes for g in p.groups if g.kind not in ("embed", "head")]
    ends = sum(g.nbytes for g in p.groups if g.kind in ("embed", "head"))
    return fixed + ends + 3 * max(layers) + sum(layers) // 2


def test_planner_puts_mlp_groups_on_the_cpu_when_it_shortens_the_step():
    budget = int(6.9 * 2**30)  # 8B shape, 16 layers: about half the layers' bytes fit
    base = plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, cost=CostModel())
    assert not base.cpu and base.cpu_busy is None
    lane = plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, cost=CostModel(cpu_rate=50e9))
    assert lane.cpu and all(name.startswith("mlp.") for name in lane.cpu)
    assert not lane.cpu & lane.resident and not lane.cpu & set(lane.streamed)
    assert lane.prediction.step_time < 0.85 * base.prediction.step_time
    assert 0 < lane.cpu_busy <= 1 and "CPU lane:" in lane.describe() and "CPU lane busy" in lane.describe()
    assert lane.slot_bytes == max(g.nbytes for g in lane.groups if g.name in lane.streamed)
    # a slow CPU is not used; a faster one takes more groups
    assert not plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, cost=CostModel(cpu_rate=2e9)).cpu
    fast = plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16, cost=CostModel(cpu_rate=100e9))
    assert len(fast.cpu) >= len(lane.cpu)
    # everything resident: nothing to place
    assert not plan_placement(CFG_8B, 80 * 2**30, 3, 1, 512, torch.bfloat16, cost=CostModel(cpu_rate=50e9)).cpu


def test_copies_beside_the_cpu_price_the_lane_plans():
    """A copy engine slowed by the CPU's DRAM reads (h2d_beside_cpu) lengthens a lane plan whose copies bound the
    step, and not one whose CPU does (the copies still end under it, busier); without the lane nothing changes."""
    budget = int(6.9 * 2**30)
    plan = lambda strategy="auto", **kw: plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16,  # noqa: E731
                                                        strategy=strategy, cost=CostModel(**kw))
    fast = plan(cpu_rate=100e9)
    same = plan(cpu_rate=100e9, h2d_beside_cpu=55e9)
    slow = plan(cpu_rate=100e9, h2d_beside_cpu=35e9)
    assert same.cpu == fast.cpu and same.prediction.step_time == fast.prediction.step_time
    assert fast.cpu and fast.prediction.copy_busy > 0.9 and slow.prediction.step_time > 1.1 * fast.prediction.step_time
    # whole MLP groups on the CPU (a split plan moves bytes to the copies exactly where the CPU bounds the step)
    cpu_bound, slower_copies = plan("lane", cpu_rate=50e9), plan("lane", cpu_rate=50e9, h2d_beside_cpu=35e9)
    assert cpu_bound.cpu == slower_copies.cpu and cpu_bound.cpu_busy > 0.85
    assert slower_copies.prediction.step_time == pytest.approx(cpu_bound.prediction.step_time, rel=1e-9)
    assert slower_copies.prediction.copy_busy > cpu_bound.prediction.copy_busy
    plain = plan(h2d_beside_cpu=35e9)
    assert not plain.cpu and plain.prediction.step_time == plan().prediction.step_time


def test_the_cpu_alone_is_priced_where_no_copy_runs_beside_it():
    """With a faster rate alone (copy engine idle), a lane plan's step is shorter, but never shorter than the same
    plan with the CPU at that rate throughout; 0 means the rate beside copies everywhere."""
    budget = int(6.9 * 2**30)
    plan = lambda **kw: plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16,  # noqa: E731
                                       cost=CostModel(h2d_beside_cpu=47e9, **kw))
    beside = plan(cpu_rate=100e9)
    assert beside.prediction.step_time == plan(cpu_rate=100e9, cpu_rate_alone=100e9).prediction.step_time
    mixed = plan(cpu_rate=100e9, cpu_rate_alone=125e9)
    assert mixed.cpu and mixed.prediction.step_time < beside.prediction.step_time
    both_fast = plan(cpu_rate=125e9, h2d_bandwidth=55e9)
    assert mixed.prediction.step_time > both_fast.prediction.step_time * 0.999
    # the lane's busy share is the simulated time of its groups: between the all-alone and all-beside times
    lane_time = mixed.cpu_busy * mixed.prediction.step_time / len(mixed.cpu)
    g = next(x for x in mixed.groups if x.name in mixed.cpu)
    cost = CostModel(cpu_rate=100e9, cpu_rate_alone=125e9)
    assert cost.cpu_times(g)[0] < lane_time < cost.cpu_times(g)[1]


def test_a_measured_gpu_rate_prices_the_gpu_compute_of_lane_plans():
    """A GPU slower than the HBM default (quantized products) lengthens the lane plan's step by its groups' extra
    compute, which the CPU lane does not hide (the compute stream waits for each lane group)."""
    budget = int(6.9 * 2**30)
    plan = lambda **kw: plan_placement(CFG_8B, budget, 3, 1, 512, torch.bfloat16,  # noqa: E731
                                       cost=CostModel(cpu_rate=100e9, h2d_beside_cpu=47e9, **kw))
    default, slow = plan(), plan(gpu_rate=1.5e12)
    assert default.prediction.step_time == plan(gpu_rate=3.0e12).prediction.step_time
    assert slow.cpu and slow.prediction.step_time > default.prediction.step_time
    g = next(x for x in slow.groups if x.name in slow.resident and x.kind in ("mlp", "mlp_gpu"))
    assert CostModel(gpu_rate=1.5e12).compute_time(g) == pytest.approx(g.nbytes / 1.5e12 + 10e-6)


def test_a_failed_gpu_calibration_plans_with_the_default_and_says_so(monkeypatch, capsys):
    from graphrt.plan import gpu_calibrate

    def fails(*args):
        raise RuntimeError("CUDA graph capture failed")
    monkeypatch.setattr(gpu_calibrate, "gpu_rate", fails)
    monkeypatch.setattr(gpu_calibrate, "h2d_alone", lambda device: 50e9)
    policy = quantization_policy(None, torch.bfloat16, torch.device("cuda"))
    assert gpu_calibrate.lane_gpu_rates(CFG_8B, policy, 1, torch.device("cuda")) == (0.0, 50e9)
    err = capsys.readouterr().err
    assert "GPU rate calibration failed" in err and "capture failed" in err and "default" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_gpu_rate_is_measured_in_a_graph_and_cached(tmp_path, monkeypatch, quantization):
    from graphrt.plan.gpu_calibrate import gpu_rate, h2d_alone
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=1024, intermediate=2816)))
    policy = quantization_policy(quantization, torch.bfloat16, torch.device("cuda"))
    rate = gpu_rate(cfg, policy, 4, torch.device("cuda"))
    assert 1e9 < rate < 20e12 and gpu_rate(cfg, policy, 4, torch.device("cuda")) == rate
    assert any(k.startswith("gpu|") for k in json.loads(calibrate.cache_file().read_text()))
    copies = h2d_alone(torch.device("cuda"))
    assert 1e9 < copies < 200e9 and h2d_alone(torch.device("cuda")) == copies


def test_lane_rates_on_the_cpu_measure_no_rate_alone():
    """Without CUDA there are no copies beside the lane: one rate, and the given rate is used as it is."""
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=128, intermediate=256)))
    policy = quantization_policy(None, torch.float32, torch.device("cpu"))
    r = calibrate.lane_rates(cfg, policy, 1, cuda=False, threads=1, rate=3e9)
    assert (r.threads, r.cpu, r.h2d_beside, r.cpu_alone) == (1, 3e9, 0.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_h2d_beside_cpu_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=1024, intermediate=2816)))
    policy = quantization_policy(None, torch.bfloat16, torch.device("cpu"))
    rate = calibrate.h2d_beside_cpu(cfg, policy, 1)
    assert 1e9 < rate < 200e9 and calibrate.h2d_beside_cpu(cfg, policy, 1) == rate
    lane = calibrate.lane_rates(cfg, policy, 1, cuda=True, threads=2)   # measured with 2 threads: beside copies,
    assert lane.threads == 2 and lane.cpu > 0 and lane.cpu_alone >= lane.cpu   # then alone, then the copies beside
    assert 1e9 < lane.h2d_beside < 200e9


@pytest.mark.parametrize("quantization,dtype", [(None, None), ("int8", None), ("int4", None), ("int4", "bfloat16")])
def test_cpu_lane_runtime_equals_all_resident(model, wide_model, quantization, dtype):
    """(int4 in bfloat16: graphrt's AVX512-BF16 kernel where the CPU has it, ATen's otherwise)"""
    if dtype == "bfloat16":
        model = wide_model
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, quantization=quantization,
              **({"dtype": dtype} if dtype else {}))
    ref = Runtime.from_pretrained(model, **kw)
    probe = Runtime.from_pretrained(model, **kw, gpu_budget=1 << 60, stream_unit="attn_mlp")
    budget = half_budget(probe.placement)
    # planning rates that make the lane pay on a tiny model (copies slow, the CPU fast)
    rt = Runtime.from_pretrained(model, **kw, gpu_budget=budget, stream_unit="attn_mlp", cpu_lane=True,
                                 cpu_rate=1e12, h2d_bandwidth=1e6)
    p = rt.placement
    assert p.cpu and p.streamed, p.describe()
    assert rt.engine.store.cpu == p.cpu and set(rt.engine.store.cpu_buffers) == set(p.cpu)
    if quantization == "int4" and dtype == "bfloat16":
        packing = {t.format.packing for g in p.groups if g.name in p.cpu for t in g.tensors if hasattr(t.format, "packing")}
        assert packing == {"blocked" if int4_cpu.available() else "cpu"}
    assert torch.equal(rt.logits(ids), ref.logits(ids))
    assert rt.generate(ids, 8).equal(ref.generate(ids, 8))
    rt.close()


@pytest.mark.skipif(not (onednn_available() or bf16_cpu.available()), reason="neither CPU bf16 kernel here")
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_lane_bf16_linear_matches_the_float64_product(rows):
    """The lane's bf16 product: graphrt's GEMV where AVX512-BF16 runs (on the buffer's bytes), else oneDNN's packed
    copy; both against float64 and the plain path."""
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(384, 1024, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, 2, 1024, generator=g).bfloat16()
    weight = Weight(Dense(torch.bfloat16), {"w": w}, (384, 1024))
    packed = for_cpu({"m": weight}, rows)["m"]
    ours = bf16_cpu.available() and (rows <= bf16_cpu.lane_rows() or not onednn_available())
    assert set(packed.parts) == ({"w", "gemv"} if ours else {"w", "packed"})
    assert packed.parts["w"] is w   # the buffer's bytes stay
    y, plain = linear(x, packed), linear(x, weight)
    ref = x.double() @ w.double().T
    assert y.shape == plain.shape == (rows, 2, 384) and y.dtype == torch.bfloat16
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2
    assert ((y.double() - plain.double()).abs().max() / ref.abs().max()).item() < 1e-2
    # float32 matrices and vectors are left as they are
    f32 = Weight(Dense(torch.float32), {"w": w.float()}, (384, 1024))
    kept = for_cpu({"m": f32, "norm": torch.ones(4)}, rows)
    assert set(kept["m"].parts) == {"w"} and kept["norm"].shape == (4,)


@pytest.mark.skipif(not (onednn_available() or bf16_cpu.available()), reason="neither CPU bf16 kernel here")
def test_bf16_lane_groups_use_the_cpu_kernel_and_track_all_resident(tmp_path):
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6, hidden=128, intermediate=256), dtype="bfloat16")
    path = write_checkpoint(tmp_path / "m", cfg, random_tensors(cfg, 5, torch.bfloat16))
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    kw = dict(device="cpu", dtype="bfloat16", max_batch_size=2, max_seq_len=64)
    ref = Runtime.from_pretrained(path, **kw)
    budget = half_budget(Runtime.from_pretrained(path, **kw, gpu_budget=1 << 60, stream_unit="attn_mlp").placement)
    rt = Runtime.from_pretrained(path, **kw, gpu_budget=budget, stream_unit="attn_mlp", cpu_lane=True,
                                 cpu_rate=1e12, h2d_bandwidth=1e6)
    assert rt.placement.cpu
    for group in rt.placement.cpu:
        matrices = [w for w in rt.engine.store.views(group).values() if isinstance(w, Weight)]
        assert matrices and all(("gemv" if bf16_cpu.available() else "packed") in w.parts for w in matrices)
    got, want = rt.logits(ids), ref.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    rt.close()


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_prompts_stream_the_lane_groups_decode_computes_them_on_the_cpu(tmp_path, quantization):
    """Where a ring slot holds an MLP group (here attention groups are the larger), prompt steps copy the CPU
    lane's groups through the ring and the GPU math computes them; decode steps keep them on the CPU."""
    cfg = make_config(**dict(PRESETS["tiny-llama"], layers=6, intermediate=48))
    model = write_checkpoint(tmp_path / "m", cfg, random_tensors(cfg, 5))
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = dict(device="cpu", max_batch_size=2, max_seq_len=64, quantization=quantization)
    ref = Runtime.from_pretrained(model, **kw)
    probe = Runtime.from_pretrained(model, **kw, gpu_budget=1 << 60, stream_unit="attn_mlp")
    rt = Runtime.from_pretrained(model, **kw, gpu_budget=half_budget(probe.placement), stream_unit="attn_mlp",
                                 cpu_lane=True, cpu_rate=1e12, h2d_bandwidth=1e6)
    p = rt.placement
    assert p.cpu and p.prompt_streamed == p.cpu and "prompts stream" in p.describe(), p.describe()
    calls = []
    run = rt.engine.cpu_lane.run
    rt.engine.cpu_lane.run = lambda h, fn: calls.append(h.shape[1]) or run(h, fn)
    assert torch.equal(rt.logits(ids), ref.logits(ids))
    assert calls == []                                   # the prompt never reached the lane
    assert rt.generate(ids, 8).equal(ref.generate(ids, 8))
    assert calls and set(calls) == {1}                   # decode steps, one token each
    rt.close()


def test_cpu_lane_options_are_checked():
    with pytest.raises(ConfigError, match="cpu_rate must be > 0"):
        Runtime.from_pretrained("unused", cpu_rate=0.0)
    with pytest.raises(ConfigError, match="cpu_threads must be >= 1"):
        Runtime.from_pretrained("unused", cpu_threads=0)


def test_trampoline_runs_the_registered_function_and_keeps_errors():
    seen = []
    key = cpu_lane.register(lambda: seen.append(torch.is_inference_mode_enabled()))
    cpu_lane.TRAMPOLINE(ctypes.c_void_p(key))      # what the driver does on a replay
    assert seen == [True]
    cpu_lane.check()                               # nothing failed
    bad = cpu_lane.register(lambda: 1 / 0)
    cpu_lane.TRAMPOLINE(ctypes.c_void_p(bad))      # must not raise through the C frame
    with pytest.raises(RuntimeError, match="ZeroDivisionError") as e:
        cpu_lane.check()
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    cpu_lane.check()                               # reported once


def test_cpu_lane_on_the_cpu_is_a_direct_call():
    lane = cpu_lane.CpuLane(torch.device("cpu"), 4, 8, torch.float32)
    h = torch.randn(1, 2, 8)
    assert torch.equal(lane.run(h, lambda x: x * 2), h * 2)


def test_calibration_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=256, intermediate=512)))
    policy = quantization_policy("int8", torch.float32, torch.device("cpu"))
    rate = calibrate.cpu_rate(cfg, policy, batch=1)
    assert rate > 1e6
    cached = json.loads(calibrate.cache_file().read_text())
    assert list(cached.values()) == [rate]
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("measured again"))
    assert calibrate.cpu_rate(cfg, policy, batch=1) == rate
    calibrate.clear_cache()
    assert not calibrate.cache_file().exists()


def test_lane_host_memory_that_cannot_be_had_says_so():
    from graphrt.weights.store import host_empty
    with pytest.raises(MemoryError, match="GiB of host memory for CPU-lane weights.*larger gpu_budget"):
        host_empty(1 << 60)
    assert host_empty(5000).numel() == 5000


def test_calibration_cycles_past_the_cache_or_over_a_plans_working_set(tmp_path, monkeypatch):
    """By default the groups cycled hold 4x the last-level cache (>= 1 GiB) so the cache cannot serve them; with
    `groups`, that many (a plan's CPU-lane groups), cached under their own key; given rates measure nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibrate.last_level_cache() > 0 and calibrate.cycle_bytes() >= 1 << 30
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=256, intermediate=512)))
    policy = quantization_policy(None, torch.float32, torch.device("cpu"))
    nbytes, groups = calibrate.mlp_groups(cfg, policy, 1)
    assert len(groups) == calibrate.MAX_CYCLE   # tiny groups: the most the measurement cycles
    assert len({w["gate_up"].parts["w"].data_ptr() for w in groups}) == len(groups)   # distinct memory
    assert all(torch.equal(w["down"].parts["w"], groups[0]["down"].parts["w"]) for w in groups)
    seen = []
    monkeypatch.setattr(calibrate, "measure", lambda *a, group=None, **k: seen.append(len(group[1]) if group else None) or 1e9)
    assert calibrate.cpu_rate(cfg, policy, batch=1, groups=3) == 1e9 and seen == [3]
    calibrate.cpu_rate(cfg, policy, batch=1)
    assert seen == [3, None] and len(json.loads(calibrate.cache_file().read_text())) == 2
    calibrate.cpu_rate(cfg, policy, batch=1, groups=1000)   # more than the default cycle: the default measurement
    assert seen == [3, None]
    given = calibrate.lane_rates(cfg, policy, 1, cuda=False, rate=5e9)
    assert given.cpu == 5e9 and given.h2d_beside == 0.0 and seen == [3, None]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int4"])
def test_cuda_cpu_lane_graph_equals_eager_and_tracks_all_gpu(model, wide_model, quantization):
    """int4: the lane's groups in the GPU's "blocked" bytes, computed by graphrt's CPU kernel where AVX512-BF16 runs"""
    model = wide_model if quantization else model
    kw = dict(device="cuda", dtype="bfloat16", max_seq_len=128, stream_unit="attn_mlp", quantization=quantization)
    ref = Runtime.from_pretrained(model, **kw)
    probe = Runtime.from_pretrained(model, **kw, gpu_budget="60GiB")   # every group resident: its sizes and memory
    budget = half_budget(probe.placement)
    threads = torch.get_num_threads()
    rt = Runtime.from_pretrained(model, **kw, gpu_budget=budget, cpu_lane=True, cpu_rate=1e12, h2d_bandwidth=1e6,
                                 cpu_threads=2)
    assert rt.placement.cpu, rt.placement.describe()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    eager = rt.generate(ids, 32, use_graph=False)
    graph = rt.generate(ids, 32, use_graph=True)
    assert torch.equal(eager, graph)
    cpu_lane.check()
    assert rt.engine.cpu_lane.host_threads == 2     # the lane's thread ran with the lane's count
    torch.set_num_threads(threads)
    # greedy speculative rounds (k + 1 tokens a step) captured with the lane's host nodes == the same rounds eager
    from graphrt.speculative import Speculative
    spec = Speculative("lookup", k=3)
    assert torch.equal(rt.generate(ids, 24, use_graph=True, speculative=spec),
                       rt.generate(ids, 24, use_graph=False, speculative=spec))
    cpu_lane.check()
    # bf16 on the CPU vs the GPU: logits within 2e-2 relative (the bound), tokens reported
    got, want = rt.logits(ids), ref.logits(ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
    all_gpu = ref.generate(ids, 32)
    first_diff = next((i for i in range(32) if graph[0, i] != all_gpu[0, i]), None)
    print(f"CPU lane vs all-GPU: logits rel {rel:.2e}, first differing greedy token: {first_diff}")


def test_plan_cli_shows_the_cpu_lane(capsys):
    from pathlib import Path
    from graphrt.cli import main
    config = str(Path(__file__).resolve().parents[1] / "tools" / "configs" / "llama-3.1-70b.json")
    assert main(["plan", config, "--gpu-budget", "40GB", "--cpu-rate", "60"]) == 0
    with_lane = capsys.readouterr().out
    assert main(["plan", config, "--gpu-budget", "40GB"]) == 0
    without = capsys.readouterr().out
    assert "CPU lane:" in with_lane and "CPU lane busy" in with_lane and "CPU lane" not in without
    speed = lambda out: float(out.split("predicted decode: ")[1].split()[0])  # noqa: E731
    assert speed(with_lane) > speed(without)
    assert main(["plan", config, "--gpu-budget", "40GB", "--cpu-rate", "60", "--placement", "lane"]) == 0
    whole = capsys.readouterr().out
    assert main(["plan", config, "--gpu-budget", "40GB", "--cpu-rate", "60", "--placement", "lane-split"]) == 0
    split = capsys.readouterr().out
    assert "split MLPs" in split and "split MLPs" not in whole and "mlp." in split.split("split MLPs")[1]
    assert speed(with_lane) >= 0.99 * max(speed(whole), speed(split))   # auto: within 1%, the best prompt step
    assert main(["plan", config, "--gpu-budget", "40GB", "--placement", "lane-split"]) == 2   # no CPU rate
    assert "CPU lane" in capsys.readouterr().err


def test_thread_count_comes_from_the_calibration(tmp_path, monkeypatch):
    """On a GPU machine the lane's default team size is the fastest measured candidate (each cached), and the
    caller's thread count is left as it was."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibrate.thread_candidates(16) == [15, 12, 8] and calibrate.thread_candidates(1) == [1]
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["tiny-llama"], hidden=256, intermediate=512)))
    policy = quantization_policy(None, torch.float32, torch.device("cpu"))
    rates = {3: 5e9, 2: 9e9, 1: 4e9}
    seen = []
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: seen.append(torch.get_num_threads())
                        or rates[torch.get_num_threads()])
    before = torch.get_num_threads()
    assert calibrate.best_threads(cfg, policy, 1, [3, 2, 1]) == (2, 9e9)
    assert sorted(seen) == [1, 2, 3] and torch.get_num_threads() == before
    assert calibrate.best_threads(cfg, policy, 1, [3, 2, 1]) == (2, 9e9) and len(seen) == 3   # from the cache


@pytest.mark.gpu
def test_default_model_bf16_lane_keeps_the_all_gpu_greedy_tokens(default_model):
    """Issue 17's bound on the default model: bf16, half its MLP groups computed by the CPU lane inside the captured
    step, against the all-GPU run: logits within 2e-2 relative and the same 64 greedy tokens."""
    kw = dict(device="cuda", dtype="bfloat16", max_seq_len=256, stream_unit="attn_mlp")
    ref = Runtime.from_pretrained(default_model, **kw)
    probe = Runtime.from_pretrained(default_model, **kw, gpu_budget="60GiB")
    rt = Runtime.from_pretrained(default_model, **kw, gpu_budget=half_budget(probe.placement), cpu_lane=True,
                                 cpu_rate=1e12, h2d_bandwidth=1e6)
    assert rt.placement.cpu, rt.placement.describe()
    text = rt.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([rt.encode(text)])
    got, want = rt.logits(ids), ref.logits(ids)
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    assert torch.equal(rt.generate(ids, 64, use_graph=True), ref.generate(ids, 64, use_graph=True))
    cpu_lane.check()
    for r in (rt, probe, ref):
        r.close()
