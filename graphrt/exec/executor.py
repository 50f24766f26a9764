"""Runs step plans: on CUDA with copy stream(s) and events, on the CPU in plain issue order.

The compute stream is whatever stream is current when `run` is called, so the same code issues an
eager step or records it into a CUDA graph (where the current stream is the capture stream and the
copy streams are forked from it and joined back by the plan's begin/end events).
Two baselines for benchmarks reuse the same plans: `sync_copies` issues every copy on the compute
stream (no overlap); `split_copy_streams(groups)` puts the copies of those groups on a second copy
stream (the predecessor runtime's scheme: attention and MLP halves on two streams).
A "lane" op (a CPU-lane group beside its GPU part, schedule.py) is issued on the compute stream: what it issues there
posts the group to the CPU (cpu_lane.CpuLane.start); its lane events are the lane's own flags, not CUDA events.
`compute(group, weights, stream)` gets the op's stream, so the engine tells a lane op from the group's join.
"""
from __future__ import annotations

from contextlib import nullcontext as _null
from typing import Callable

import nvtx
import torch

from ..plan.schedule import LANE, Op, StepPlan, is_lane_event
from ..weights.store import WeightStore

ComputeFn = Callable[[str, dict, str], None]   # (group, its weights, the op's stream: "compute" | "lane")


class StepExecutor:
    def __init__(self, store: WeightStore, poison_freed_slots: bool = False):
        self.store = store
        self.poison = poison_freed_slots
        self.cuda = store.device.type == "cuda"
        self.copy_streams = [torch.cuda.Stream(store.device)] if self.cuda else []
        self.sync_copies = False
        self.second_stream_groups: frozenset[str] = frozenset()
        self.events: dict[str, torch.cuda.Event] = {}
        self.trace: list | None = None   # when a list: (op, start, end) timing events per copy/compute

    def split_copy_streams(self, groups: frozenset[str] | set[str]) -> None:
        """Copies of `groups` go on a second copy stream (benchmark baseline); empty: one stream."""
        self.second_stream_groups = frozenset(groups)
        if groups and len(self.copy_streams) == 1:
            self.copy_streams.append(torch.cuda.Stream(self.store.device))
        elif not groups:
            self.copy_streams = self.copy_streams[:1]

    def _event(self, name: str):
        if name not in self.events:
            self.events[name] = torch.cuda.Event()
        return self.events[name]

    def _streams(self, op: Op, compute_stream) -> list:
        if op.stream in ("compute", LANE) or self.sync_copies:
            return [compute_stream]
        if op.kind == "copy":
            return [self.copy_streams[-1] if op.group in self.second_stream_groups else self.copy_streams[0]]
        return self.copy_streams  # fork/join marks apply to every copy stream

    def run(self, plan: StepPlan, compute: ComputeFn, annotate: bool = True,
            tail: Callable[[], None] | None = None) -> None:
        """Issue every op of `plan`; `compute(group, weights)` runs a group's math on the current stream.
        `tail()`: more work on the compute stream after the step's last group and before it joins the copy stream,
        so it overlaps the copies of the next step's first groups (work that reads no ring slot)."""
        if not self.cuda:
            self._run_serial(plan, compute, annotate)
            if tail is not None:
                tail()
            return
        compute_stream = torch.cuda.current_stream(self.store.device)
        for op in plan.ops:
            if tail is not None and op is plan.ops[-1]:
                assert op.stream == "compute" and op.waits == ("end",), op
                tail()
            for i, stream in enumerate(self._streams(op, compute_stream)):
                for ev in (w for w in op.waits if not is_lane_event(w)):
                    stream.wait_event(self._event(ev))
                    if ev == "end" and not self.sync_copies:  # join every copy stream
                        for j in range(1, len(self.copy_streams)):
                            stream.wait_event(self._event(f"end@{j}"))
                self._issue(op, stream, compute, annotate)
                for ev in (r for r in op.records if not is_lane_event(r)):
                    self._event(ev if i == 0 else f"{ev}@{i}").record(stream)

    def _issue(self, op: Op, stream, compute: ComputeFn, annotate: bool) -> None:
        if op.kind not in ("copy", "compute"):
            return
        timed = self.trace is not None
        if timed:
            start, end = (torch.cuda.Event(enable_timing=True, external=True) for _ in range(2))
            start.record(stream)
        if op.kind == "copy":
            with torch.cuda.stream(stream), nvtx.annotate(f"copy {op.group}", color="green") if annotate else _null():
                self.store.copy_to_slot(op.group, op.slot)
        else:
            with nvtx.annotate(op.group, color="blue") if annotate else _null():
                compute(op.group, self.store.views(op.group, op.slot), op.stream)
                if self.poison and op.slot is not None:
                    self.store.ring.poison(op.slot)
        if timed:
            end.record(stream)
            self.trace.append((op, start, end))

    def _run_serial(self, plan: StepPlan, compute: ComputeFn, annotate: bool) -> None:
        """CPU: issue order is a valid serialisation of the plan (every wait follows its record)."""
        for op in plan.ops:
            if op.kind == "copy":
                self.store.copy_to_slot(op.group, op.slot)
            elif op.kind == "compute":
                with nvtx.annotate(op.group, color="blue") if annotate else _null():
                    compute(op.group, self.store.views(op.group, op.slot), op.stream)
                if self.poison and op.slot is not None:
                    self.store.ring.poison(op.slot)
