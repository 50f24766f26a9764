"""Runs step plans: on CUDA with a copy stream and events, on the CPU in plain issue order.

The compute stream is whatever stream is current when `run` is called, so the same code issues an
eager step or records it into a CUDA graph (where the current stream is the capture stream and the
copy stream is forked from it and joined back by the plan's begin/end events).
"""
from __future__ import annotations

from typing import Callable

from contextlib import nullcontext as _null

import nvtx
import torch

from .schedule import StepPlan
from .store import WeightStore

ComputeFn = Callable[[str, dict], None]


class StepExecutor:
    def __init__(self, store: WeightStore, dtype: torch.dtype, poison_freed_slots: bool = False):
        self.store = store
        self.dtype = dtype
        self.poison = poison_freed_slots
        self.cuda = store.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(store.device) if self.cuda else None
        self.events: dict[str, torch.cuda.Event] = {}

    def _event(self, name: str):
        if name not in self.events:
            self.events[name] = torch.cuda.Event()
        return self.events[name]

    def run(self, plan: StepPlan, compute: ComputeFn, annotate: bool = True) -> None:
        """Issue every op of `plan`; `compute(group, weights)` runs a group's math on the current stream."""
        if not self.cuda:
            return self._run_serial(plan, compute, annotate)
        compute_stream = torch.cuda.current_stream(self.store.device)
        for op in plan.ops:
            stream = compute_stream if op.stream == "compute" else self.copy_stream
            for ev in op.waits:
                stream.wait_event(self._event(ev))
            if op.kind == "copy":
                with torch.cuda.stream(stream), nvtx.annotate(f"copy {op.group}", color="green") if annotate else _null():
                    self.store.copy_to_slot(op.group, op.slot)
            elif op.kind == "compute":
                with nvtx.annotate(op.group, color="blue") if annotate else _null():
                    compute(op.group, self.store.views(op.group, op.slot))
                    if self.poison and op.slot is not None:
                        self.store.ring.poison(op.slot, self.dtype)
            for ev in op.records:
                self._event(ev).record(stream)

    def _run_serial(self, plan: StepPlan, compute: ComputeFn, annotate: bool) -> None:
        """CPU: issue order is a valid serialisation of the plan (every wait follows its record)."""
        for op in plan.ops:
            if op.kind == "copy":
                self.store.copy_to_slot(op.group, op.slot)
            elif op.kind == "compute":
                with nvtx.annotate(op.group, color="blue") if annotate else _null():
                    compute(op.group, self.store.views(op.group, op.slot))
                if self.poison and op.slot is not None:
                    self.store.ring.poison(op.slot, self.dtype)
