"""CPU simulator of step plans: hazard checking (symbolic) and timing (given bandwidth and op times).

The plans of `steps` consecutive steps (after a prologue) are unrolled in host issue order. Ordering
is what CUDA guarantees: ops on one stream run in issue order; a wait on an event orders after the
latest record of that event issued before the wait. From that happens-before relation:
  - every compute that reads a slot must come after the copy that put its data there (same slot);
  - every copy into a slot must come after all reads of the slot's previous content;
  - every wait must refer to an event recorded before it.
Timing runs the same ops event by event: a copy takes bytes / bandwidth, a compute its given time; a copy and a
CPU-lane group that run at the same time each take their `shared` duration (both read host DRAM). Ops on the "lane"
stream (a CPU-lane group beside its GPU part) take `lane_time`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .schedule import StepPlan, is_lane_event


@dataclass
class SimResult:
    hazards: list[str]
    step_time: float = 0.0            # seconds, steady state (mean over the steps after the first)
    copy_busy: float = 0.0            # fraction of the steady-state step the copy engine is busy
    copy_idle: float = 0.0            # seconds per step the copy engine idles
    compute_stall: float = 0.0        # seconds per step the compute stream waits for copies
    host_compute: float = 0.0         # seconds per step the CPU lane's groups take (the CPU's busy time)
    stall_by_group: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.hazards


def _unroll(plans: list[StepPlan], prologue: StepPlan, steps: int):
    out = [(-1, op) for op in prologue.ops]
    for t in range(steps):
        out += [(t, op) for op in plans[t % len(plans)].ops]
    return out


Duration = float | tuple[float, float]   # seconds; or (alone, shared) for an op that reads host memory


def simulate(plans: list[StepPlan], prologue: StepPlan, steps: int = 0,
             copy_time: Callable[[str], Duration] | None = None,
             compute_time: Callable[[str], Duration] | None = None, step_overhead: float = 0.0,
             lane_time: Callable[[str], Duration] | None = None) -> SimResult:
    steps = steps or max(3, 2 * len(plans) + 1)
    ops = _unroll(plans, prologue, steps)
    S = prologue.num_streamed
    hazards: list[str] = []
    anc: list[int] = []                       # bitset of ops that happen before op i
    pred_lists: list[list[int]] = []          # the ops op i directly follows (its stream's last op, its waits)
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
        pred_lists.append(preds)
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
        _time(ops, pred_lists, result, copy_time, compute_time, step_overhead, lane_time or compute_time)
    return result


def _time(ops, preds: list[list[int]], result: SimResult, copy_time, compute_time, step_overhead: float,
          lane_time) -> None:
    """Event-driven timing: each stream runs its ops in issue order, an op starts when its stream and the ops it
    waits for are done. An op whose duration is a pair (alone, shared) reads host memory (a host-to-device copy, a
    CPU-lane group): it progresses at 1/shared while another such op runs beside it, else at 1/alone (the copy
    engine and the CPU share DRAM bandwidth). A plain float is a duration that nothing slows."""
    n = len(ops)
    durations: list[tuple[float, float | None]] = []
    for t, op in ops:
        if op.kind == "copy":
            d = copy_time(op.group)
        elif op.kind == "compute":
            d = (lane_time if op.stream == "lane" else compute_time)(op.group)
        else:   # the launch gap between two steps, at the start of each
            d = step_overhead if op.kind == "mark" and op.stream == "compute" and "begin" in op.records else 0.0
        durations.append(d if isinstance(d, tuple) else (d, None))
    queues: dict[str, list[int]] = {}
    for i, (_, op) in enumerate(ops):
        queues.setdefault(op.stream, []).append(i)
    head = {s: 0 for s in queues}
    start, end = [0.0] * n, [None] * n
    running: dict[str, list] = {}           # stream -> [op, work left (fraction), since (s), duration at its rate,
    took = [0.0] * n                        #            rate changes]; took: each op's time (exact at one rate)
    now = 0.0

    def duration(i: int, readers: int) -> float:
        alone, shared = durations[i]
        return shared if shared is not None and readers > 1 else alone

    while True:
        started = True
        while started:                      # start every op whose predecessors are done (zero-length ops end now)
            started = False
            for s, q in queues.items():
                if s in running or head[s] == len(q):
                    continue
                i = q[head[s]]
                if any(end[p] is None for p in preds[i]):
                    continue
                head[s] += 1
                start[i] = now
                if durations[i][0] > 0:
                    running[s] = [i, 1.0, now, 0.0, 0]
                else:
                    end[i] = now
                started = True
        if not running:
            break
        readers = sum(durations[r[0]][1] is not None for r in running.values())
        for r in running.values():          # a new rate from now on where the readers beside it changed; an op
            d = duration(r[0], readers)     # that keeps its rate keeps its segment (exact: start + duration)
            if d != r[3]:
                if r[3]:
                    r[1] -= (now - r[2]) / r[3]
                r[2], r[3], r[4] = now, d, r[4] + 1
        now = min(since + left * d for _, left, since, d, _ in running.values())
        for s in [s for s, (_, left, since, d, _) in running.items() if since + left * d <= now]:
            i, _, _, d, changes = running.pop(s)
            end[i] = now
            took[i] = d if changes == 1 else now - start[i]
    if any(e is None for e in end):
        raise ValueError("the plan deadlocks: an op waits for an event that only a later op of its stream records")
    _summarize(ops, start, end, took, durations, result)


def _summarize(ops, start, end, took, durations, result: SimResult) -> None:
    step_end: dict[int, float] = {}
    copy_busy: dict[int, float] = {}
    host_compute: dict[int, float] = {}
    stall: dict[int, float] = {}
    stall_by_group: dict[str, float] = {}
    prev_on: dict[str, int] = {}
    for i, (t, op) in enumerate(ops):
        if op.kind == "copy":
            copy_busy[t] = copy_busy.get(t, 0.0) + took[i]
        if op.kind == "compute" and durations[i][1] is not None:
            host_compute[t] = host_compute.get(t, 0.0) + took[i]
        ready = end[prev_on[op.stream]] if op.stream in prev_on else 0.0
        waits_lane = any(is_lane_event(w) for w in op.waits)   # a lane group's join waits for the CPU
        if op.kind == "compute" and op.stream == "compute" and not waits_lane and start[i] > ready:
            stall[t] = stall.get(t, 0.0) + start[i] - ready
            if t >= 1:
                stall_by_group[op.group] = stall_by_group.get(op.group, 0.0) + start[i] - ready
        prev_on[op.stream] = i
        step_end[t] = max(step_end.get(t, 0.0), end[i])
    steps = sorted(t for t in step_end if t >= 0)
    measured = steps[1:] or steps
    span = step_end[measured[-1]] - step_end[measured[0] - 1]
    n = len(measured)
    result.step_time = span / n
    busy = sum(copy_busy.get(t, 0.0) for t in measured) / n
    result.copy_busy = busy / result.step_time if result.step_time else 0.0
    result.copy_idle = max(0.0, result.step_time - busy)
    result.compute_stall = sum(stall.get(t, 0.0) for t in measured) / n
    result.host_compute = sum(host_compute.get(t, 0.0) for t in measured) / n
    result.stall_by_group = {g: s / n for g, s in stall_by_group.items()}
