"""The streaming schedule as data: copy and compute ops on two streams (three with the CPU lane), joined by named
events.

One `StepPlan` per ring phase. Streamed groups of a step are numbered k = 0..S-1; global copy number
t*S + k goes into ring slot (t*S + k) mod N, so the mapping repeats every N / gcd(S, N) steps.
Events (reused by name from step to step, exactly like CUDA event objects in a replayed graph):
  ready:k  recorded on the copy stream after copy k (k >= S: prefetch of next step's group k - S)
  free:k   recorded on the compute stream after the last read of streamed group k
  begin    compute -> copy fork at the start of a step; end: copy -> compute join at its end.
The first P = min(N - 1, S) streamed groups of step t+1 are copied during step t, so the copy engine
keeps going across the token boundary.
A CPU-lane group "beside" its GPU part (the other rows of a split MLP whose first rows are resident) runs on the
"lane" stream: a mark posts it (lane-post:C) before the GPU part, the CPU computes it while the compute stream runs
the GPU part, and the group's own op on the compute stream waits for its answer (lane-done:C) and adds the two.
Lane events are the CPU's: the CUDA executor carries them in the lane's own flags (exec/lane_signal.py), not in
CUDA events. The CUDA executor (executor.py) issues these ops as they are;
the simulator (simulator.py) checks them for hazards and predicts their timing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Op:
    stream: str                   # "compute" | "copy" | "lane" (LANE)
    kind: str                     # "compute" | "copy" | "mark" (records only) | "sync" (waits only)
    group: str | None = None      # weight group computed or copied
    slot: int | None = None       # ring slot read (compute) or written (copy)
    k: int | None = None          # streamed index this op's data belongs to (copies: may be >= S)
    waits: tuple[str, ...] = ()
    records: tuple[str, ...] = ()


@dataclass(frozen=True)
class StepPlan:
    phase: int
    num_streamed: int             # S
    ring_depth: int               # N
    prefetch: int                 # P: groups of the next step copied during this one
    ops: tuple[Op, ...]           # host issue order

    def without_wait(self, event: str) -> "StepPlan":
        """A deliberately broken copy of this plan (for tests): `event` is never waited on."""
        ops = tuple(replace(op, waits=tuple(w for w in op.waits if w != event)) for op in self.ops)
        return replace(self, ops=ops)


def num_phases(num_streamed: int, ring_depth: int) -> int:
    return 1 if num_streamed == 0 else ring_depth // math.gcd(num_streamed, ring_depth)


def slot_of(step: int, k: int, num_streamed: int, ring_depth: int) -> int:
    return (step * num_streamed + k) % ring_depth


LANE = "lane"   # the CPU lane's stream (groups `beside` their GPU part)


def lane_event(kind: str, group: str) -> str:
    """The name of a lane event: kind "post" (the group's input goes to the CPU) or "done" (its answer is back)."""
    return f"lane-{kind}:{group}"


def is_lane_event(name: str) -> bool:
    return name.startswith("lane-")


def build_step_plan(groups: list[str], streamed: set[str], ring_depth: int, phase: int,
                    beside: frozenset[str] = frozenset()) -> StepPlan:
    """Plan of one step (any token count: a decode step or a prefill chunk) for ring phase `phase`. `beside`: CPU-lane
    groups posted before the group just before them (their GPU part, not streamed) and computed while it runs."""
    order = [g for g in groups if g in streamed]
    for i, g in enumerate(groups):
        if g in beside and (i == 0 or g in streamed or groups[i - 1] in streamed):
            raise ValueError(f"{g} runs beside the group before it, which must exist and be resident (as must {g})")
    S, N = len(order), ring_depth
    P = min(N - 1, S)
    k_of = {g: k for k, g in enumerate(order)}
    ops = [Op("compute", "mark", records=("begin",)), Op("copy", "sync", waits=("begin",))]

    def copy(k: int, waits: tuple[str, ...]) -> Op:
        return Op("copy", "copy", order[k % S], slot_of(phase, k, S, N), k, waits, (f"ready:{k}",))

    # Copies whose slot was freed by the previous step (its reads ended before this step began).
    ops += [copy(k, ()) for k in range(P, min(N, S + P))]
    for i, g in enumerate(groups):
        if i + 1 < len(groups) and groups[i + 1] in beside:   # post the next group to the CPU, then compute this one
            c = groups[i + 1]
            ops.append(Op("compute", "mark", records=(lane_event("post", c),)))
            ops.append(Op(LANE, "compute", c, waits=(lane_event("post", c),), records=(lane_event("done", c),)))
        if g in beside:   # its answer, added to its GPU part's
            ops.append(Op("compute", "compute", g, waits=(lane_event("done", g),)))
            continue
        if g not in streamed:
            ops.append(Op("compute", "compute", g))
            continue
        k = k_of[g]
        waits = (f"ready:{k}",) if k >= P else ()  # k < P: copied last step, before its join
        ops.append(Op("compute", "compute", g, slot_of(phase, k, S, N), k, waits, (f"free:{k}",)))
        if k + N < S + P:
            ops.append(copy(k + N, (f"free:{k}",)))
    ops += [Op("copy", "mark", records=("end",)), Op("compute", "sync", waits=("end",))]
    return StepPlan(phase, S, N, P, tuple(ops))


def build_prologue(groups: list[str], streamed: set[str], ring_depth: int) -> StepPlan:
    """Before the first step after a reset: copy groups 0..P-1 of step 0 (phase 0)."""
    order = [g for g in groups if g in streamed]
    S, N = len(order), ring_depth
    P = min(N - 1, S)
    ops = [Op("compute", "mark", records=("begin",)), Op("copy", "sync", waits=("begin",))]
    ops += [Op("copy", "copy", order[k], slot_of(0, k, S, N), k, (), (f"ready:{k}",)) for k in range(P)]
    ops += [Op("copy", "mark", records=("end",)), Op("compute", "sync", waits=("end",))]
    return StepPlan(-1, S, N, P, tuple(ops))


def build_plans(groups: list[str], streamed: set[str], ring_depth: int,
                beside: frozenset[str] = frozenset()) -> list[StepPlan]:
    """One plan per ring phase."""
    S = sum(g in streamed for g in groups)
    return [build_step_plan(groups, streamed, ring_depth, p, beside) for p in range(num_phases(S, ring_depth))]
