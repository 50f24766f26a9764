"""CPU simulator of step plans: hazard checking (symbolic) and timing (given bandwidth and op times).

The plans of `steps` consecutive steps (after a prologue) are unrolled in host issue order. Ordering
is what CUDA guarantees: ops on one stream run in issue order; a wait on an event orders after the
latest record of that event issued before the wait. From that happens-before relation:
  - every compute that reads a slot must come after the copy that put its data there (same slot);
  - every copy into a slot must come after all reads of the slot's previous content;
  - every wait must refer to an event recorded before it.
Timing list-schedules the same ops: a copy takes bytes / bandwidth, a compute its given time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .schedule import StepPlan


@dataclass
class SimResult:
    hazards: list[str]
    step_time: float = 0.0            # seconds, steady state (mean over the steps after the first)
    copy_busy: float = 0.0            # fraction of the steady-state step the copy engine is busy
    copy_idle: float = 0.0            # seconds per step the copy engine idles
    compute_stall: float = 0.0        # seconds per step the compute stream waits for copies
    stall_by_group: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.hazards


def _unroll(plans: list[StepPlan], prologue: StepPlan, steps: int):
    out = [(-1, op) for op in prologue.ops]
    for t in range(steps):
        out += [(t, op) for op in plans[t % len(plans)].ops]
    return out


def simulate(plans: list[StepPlan], prologue: StepPlan, steps: int = 0,
             copy_time: Callable[[str], float] | None = None,
             compute_time: Callable[[str], float] | None = None, step_overhead: float = 0.0) -> SimResult:
    steps = steps or max(3, 2 * len(plans) + 1)
    ops = _unroll(plans, prologue, steps)
    S = prologue.num_streamed
    hazards: list[str] = []
    anc: list[int] = []                       # bitset of ops that happen before op i
    last_on: dict[str, int] = {}
    last_record: dict[str, int] = {}
    writer: dict[tuple[int, int], int] = {}   # (step, k) content -> copy op index
    slot_content: dict[int, tuple[int, int] | None] = {}
    readers: dict[tuple[int, int], list[int]] = {}

    def name(i: int) -> str:
        t, op = ops[i]
        return f"step {t} {op.kind} {op.group or ''}{'' if op.slot is None else f' slot {op.slot}'}".strip()

    for i, (t, op) in enumerate(ops):
        preds = [last_on[op.stream]] if op.stream in last_on else []
        for ev in op.waits:
            if ev not in last_record:
                hazards.append(f"{name(i)} waits on {ev!r}, which was never recorded before it")
            else:
                preds.append(last_record[ev])
        a = 0
        for p in preds:
            a |= anc[p] | (1 << p)
        anc.append(a)
        last_on[op.stream] = i
        for ev in op.records:
            last_record[ev] = i
        if op.kind == "copy":
            content = (t + 1, op.k - S) if op.k >= S else (max(t, 0), op.k)
            prev = slot_content.get(op.slot)
            for r in readers.get(prev, []) if prev else []:
                if not (a >> r) & 1:
                    hazards.append(f"{name(i)} may overwrite slot {op.slot} while {name(r)} still reads it")
            writer[content] = i
            slot_content[op.slot] = content
        elif op.kind == "compute" and op.slot is not None:
            content = (t, op.k)
            w = writer.get(content)
            if w is None:
                hazards.append(f"{name(i)} reads data that no copy brought in")
            elif ops[w][1].slot != op.slot:
                hazards.append(f"{name(i)} reads slot {op.slot} but its data went to slot {ops[w][1].slot}")
            elif not (a >> w) & 1:
                hazards.append(f"{name(i)} may read slot {op.slot} before {name(w)} finished")
            elif slot_content.get(op.slot) != content:
                later = writer[slot_content[op.slot]]
                if not (anc[later] >> i) & 1:
                    hazards.append(f"{name(i)} may read slot {op.slot} after {name(later)} overwrote it")
            readers.setdefault(content, []).append(i)
    result = SimResult(hazards)
    if copy_time is not None and compute_time is not None:
        _time(ops, anc, result, copy_time, compute_time, step_overhead)
    return result


def _time(ops, anc, result: SimResult, copy_time, compute_time, step_overhead: float) -> None:
    end: list[float] = []
    stream_end: dict[str, float] = {}
    last_record: dict[str, int] = {}
    step_end: dict[int, float] = {}
    copy_busy: dict[int, float] = {}
    stall: dict[int, float] = {}
    stall_by_group: dict[str, float] = {}
    for i, (t, op) in enumerate(ops):
        ready = stream_end.get(op.stream, 0.0)
        if op.kind == "mark" and op.stream == "compute" and "begin" in op.records:
            ready += step_overhead  # launch gap between two steps
        dep = max([end[last_record[e]] for e in op.waits if e in last_record], default=0.0)
        start = max(ready, dep)
        dur = copy_time(op.group) if op.kind == "copy" else compute_time(op.group) if op.kind == "compute" else 0.0
        if op.kind == "copy":
            copy_busy[t] = copy_busy.get(t, 0.0) + dur
        if op.kind == "compute" and dep > ready:
            stall[t] = stall.get(t, 0.0) + dep - ready
            if t >= 1:
                stall_by_group[op.group] = stall_by_group.get(op.group, 0.0) + dep - ready
        end.append(start + dur)
        stream_end[op.stream] = start + dur
        for ev in op.records:
            last_record[ev] = i
        step_end[t] = max(step_end.get(t, 0.0), start + dur)
    steps = sorted(t for t in step_end if t >= 0)
    measured = steps[1:] or steps
    span = step_end[measured[-1]] - step_end[measured[0] - 1]
    n = len(measured)
    result.step_time = span / n
    busy = sum(copy_busy.get(t, 0.0) for t in measured) / n
    result.copy_busy = busy / result.step_time if result.step_time else 0.0
    result.copy_idle = max(0.0, result.step_time - busy)
    result.compute_stall = sum(stall.get(t, 0.0) for t in measured) / n
    result.stall_by_group = {g: s / n for g, s in stall_by_group.items()}
