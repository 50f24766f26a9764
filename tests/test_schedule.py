"""Step plans and the simulator: zero hazards over a grid; broken plans caught; timing sane."""
import math

import pytest

from graphrt.plan.schedule import build_plans, build_prologue, num_phases
from graphrt.plan.simulator import simulate


def names(num_layers):
    return ["embed"] + [f"layer.{i}" for i in range(num_layers)] + ["head"]


def streamed_set(groups, how, count):
    layers = [g for g in groups if g.startswith("layer")]
    pick = {"first": layers[:count], "last": layers[-count:] if count else [],
            "spread": layers[::max(1, len(layers) // max(count, 1))][:count]}[how]
    return set(pick)


@pytest.mark.parametrize("num_layers", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("ring_depth", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("how", ["first", "last", "spread"])
def test_no_hazards_over_grid(num_layers, ring_depth, fraction, how):
    groups = names(num_layers)
    streamed = streamed_set(groups, how, round(fraction * num_layers))
    if fraction == 1.0 and how == "first":
        streamed |= {"embed", "head"}
    plans = build_plans(groups, streamed, ring_depth)
    assert len(plans) == num_phases(len(streamed), ring_depth)
    r = simulate(plans, build_prologue(groups, streamed, ring_depth), steps=3 * len(plans) + 2)
    assert r.hazards == []


@pytest.mark.parametrize("S,N", [(5, 2), (6, 4), (7, 3), (8, 6), (3, 5)])
def test_phase_period(S, N):
    groups = names(S)
    plans = build_plans(groups, set(groups[1:-1]), N)
    assert len(plans) == N // math.gcd(S, N)
    slots = [[op.slot for op in p.ops if op.kind == "compute" and op.slot is not None] for p in plans]
    assert len({tuple(s) for s in slots}) == len(plans)  # every phase maps groups to slots differently


def test_missing_ready_wait_is_caught():
    groups = names(6)
    plans = build_plans(groups, set(groups[1:-1]), 3)
    broken = [p.without_wait("ready:4") for p in plans]
    r = simulate(broken, build_prologue(groups, set(groups[1:-1]), 3))
    assert any("before" in h and "layer.4" in h for h in r.hazards), r.hazards


def test_missing_free_wait_is_caught():
    groups = names(6)
    plans = build_plans(groups, set(groups[1:-1]), 3)
    broken = [p.without_wait("free:1") for p in plans]
    r = simulate(broken, build_prologue(groups, set(groups[1:-1]), 3))
    assert any("overwrite" in h for h in r.hazards), r.hazards


def test_slot_reused_early_is_caught():
    """Copy k+N issued into the slot of k before compute k ran (one slot too early)."""
    from dataclasses import replace
    groups = names(6)
    streamed = set(groups[1:-1])
    plan = build_plans(groups, streamed, 3)[0]
    ops = list(plan.ops)
    i = next(j for j, op in enumerate(ops) if op.kind == "copy" and op.waits == ("free:2",))
    moved = ops.pop(i)
    j = next(j for j, op in enumerate(ops) if op.kind == "compute" and op.k == 1)
    ops.insert(j + 1, replace(moved, waits=("free:1",)))
    r = simulate([replace(plan, ops=tuple(ops))], build_prologue(groups, streamed, 3))
    assert r.hazards


def test_timing_copy_bound_keeps_copy_engine_busy():
    groups = names(8)
    streamed = set(groups[1:-1])
    plans = build_plans(groups, streamed, 3)
    r = simulate(plans, build_prologue(groups, streamed, 3), steps=8,
                 copy_time=lambda g: 1.0, compute_time=lambda g: 0.1)
    assert r.hazards == []
    assert r.step_time == pytest.approx(8.0, rel=1e-6)  # 8 copies of 1.0 back to back, across tokens
    assert r.copy_busy == pytest.approx(1.0)


def test_timing_compute_bound():
    groups = names(8)
    streamed = set(groups[1:-1])
    plans = build_plans(groups, streamed, 2)
    r = simulate(plans, build_prologue(groups, streamed, 2), steps=6,
                 copy_time=lambda g: 0.1, compute_time=lambda g: 1.0)
    assert r.step_time == pytest.approx(10.0, rel=1e-6)  # 10 computes, copies hidden
    assert r.compute_stall == pytest.approx(0.0)


def test_timing_depth_one_would_serialise():
    """With N=2 and copy == compute, the ring overlaps copy k+1 with compute k."""
    groups = ["layer.0", "layer.1", "layer.2", "layer.3"]
    streamed = set(groups)
    r = simulate(build_plans(groups, streamed, 2), build_prologue(groups, streamed, 2), steps=6,
                 copy_time=lambda g: 1.0, compute_time=lambda g: 1.0)
    assert r.step_time < 4 * 2.0 * 0.8


def test_copies_and_cpu_groups_share_host_memory_while_both_run():
    """A CPU-lane group (alone 1.0, shared 2.0) beside the next step's copy (alone 0.5, shared 1.0): both run at
    half speed until the copy ends at 1.0 (half the group done), the group's other half alone takes 0.5 more."""
    groups, streamed = ["cpu", "layer"], {"layer"}
    plans, prologue = build_plans(groups, streamed, 2), build_prologue(groups, streamed, 2)
    gpu = lambda g: 0.1  # noqa: E731

    def run(copy, cpu):
        return simulate(plans, prologue, steps=8, copy_time=lambda g: copy,
                        compute_time=lambda g: cpu if g == "cpu" else gpu(g))
    r = run((0.5, 1.0), (1.0, 2.0))
    assert r.step_time == pytest.approx(1.6) and r.host_compute == pytest.approx(1.5)
    assert r.copy_busy * r.step_time == pytest.approx(1.0)
    assert run((1.0, 2.0), (1.0, 2.0)).step_time == pytest.approx(2.1)       # whole overlap: both at shared speed
    assert run(1.0, (1.0, 2.0)).step_time == pytest.approx(1.1)             # a plain duration shares nothing
    assert run((1.0, 2.0), 1.0).host_compute == 0.0


def test_a_cpu_group_beside_its_gpu_part_runs_while_the_gpu_part_does():
    """mlp:cpu beside mlp:gpu: posted before the GPU part, computed on the lane stream while it runs, and joined by
    its own op (which waits for the lane's answer): the pair costs max(GPU, CPU), not their sum; no hazards."""
    groups, streamed = ["attn.0", "mlp.0:gpu", "mlp.0:cpu", "attn.1", "head"], {"attn.1"}
    times = {"attn.0": 0.1, "mlp.0:gpu": 0.4, "mlp.0:cpu": 1.0, "attn.1": 0.1, "head": 0.1}

    def run(beside):
        plans = build_plans(groups, streamed, 2, beside)
        compute = lambda g: 0.0 if g in beside else times[g]  # noqa: E731 (the join only adds)
        return plans, simulate(plans, build_prologue(groups, streamed, 2), steps=6, copy_time=lambda g: 0.2,
                               compute_time=compute, lane_time=lambda g: times[g])
    plans, beside = run(frozenset({"mlp.0:cpu"}))
    _, apart = run(frozenset())
    assert beside.ok and apart.ok
    assert apart.step_time == pytest.approx(1.7) and beside.step_time == pytest.approx(1.3)
    assert beside.host_compute == 0.0 and beside.compute_stall == 0.0   # plain durations: not host-memory readers
    ops = [(op.stream, op.kind, op.group) for op in plans[0].ops if op.group in ("mlp.0:gpu", "mlp.0:cpu")]
    assert ops == [("lane", "compute", "mlp.0:cpu"), ("compute", "compute", "mlp.0:gpu"),
                   ("compute", "compute", "mlp.0:cpu")]
    with pytest.raises(ValueError, match="resident"):   # a streamed GPU part cannot be waited for before the post
        build_plans(groups, streamed | {"mlp.0:gpu"}, 2, frozenset({"mlp.0:cpu"}))


def test_the_lane_takes_host_memory_beside_copies_on_its_own_stream():
    """A lane-stream group that reads host memory (alone, shared) slows beside a copy, like a compute-stream one."""
    groups, streamed = ["mlp.0:gpu", "mlp.0:cpu", "attn.1"], {"attn.1"}
    beside = frozenset({"mlp.0:cpu"})
    r = simulate(build_plans(groups, streamed, 2, beside), build_prologue(groups, streamed, 2), steps=6,
                 copy_time=lambda g: (0.5, 1.0), compute_time=lambda g: 0.0 if g in beside else 0.1,
                 lane_time=lambda g: (1.0, 2.0))
    assert r.ok and r.host_compute > 1.0    # slowed while the next step's copy ran beside it
