"""A CPU-lane host function as a program of graphrt's kernel calls, run in C without Python.

A lane group's host function (exec/cpu_lane.py) is Python: llama.mlp_rows through the formats down to the CPU
GEMVs, about 50 us of Python per group before any math (and the interpreter's lock, which the decode loop's thread
holds at times). `record(fn, x, y)` runs fn(x) once with the kernel calls recorded (cpu_calls.py), as a CUDA graph
records kernels, and keeps them under a key as a C program (cpu_program_source.py) that does y <- fn(x): the lane's
serving loop runs it without Python, and the calibration times the same program.

A record is only a program where it provably computes what fn computes: nothing but graphrt's kernel calls ran
(a dispatch mode sees every other torch operation: a copy, an add, ATen's kernels), each call reads x or an
earlier call's output, and fn returned the last call's output. Otherwise `record` returns None and the caller
keeps the Python function. The calls keep every tensor they were given (scratch included) alive with the program.
"""
from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import int4_cpu
from .cpu_calls import KernelCall, recording

KINDS = {"graphrt_bf16_gemv": 1, "graphrt_int8_gemv": 2, "graphrt_int4_gemv": 3}
COPY = 4
SLOTS = 16
_aten = torch.ops.aten
ALLOWED = {_aten.empty.memory_format, _aten._unsafe_view.default, _aten.detach.default}   # besides views (ops that
# say so: OpOverload.is_view), what the kernels' wrappers do besides their call: allocate
RESHAPES = {_aten.reshape.default}   # allowed where the result is a view (no copy)
_KEYS = itertools.count(1)


def next_key() -> int:
    """A key no other program or host function of this process has (the lane's host functions take theirs here)."""
    return next(_KEYS)


class _Call(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("a", ctypes.c_int64 * SLOTS), ("f", ctypes.c_double)]


class _Watch(TorchDispatchMode):
    """Notes every torch operation other than allocation and views (which neither read nor write data)."""

    def __init__(self):
        super().__init__()
        self.other: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        view = (func in RESHAPES and isinstance(out, torch.Tensor)   # a reshape that did not copy
                and out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr())
        if func not in ALLOWED and not func.is_view and not view:
            self.other.append(func)
        return out


@dataclass
class Program:
    key: int
    calls: tuple[KernelCall, ...]
    out: torch.Tensor             # y, which the program writes

    def run(self) -> None:
        """y <- fn(x) in C (from the caller's thread)."""
        int4_cpu.library().graphrt_program_run(self.key)

    def drop(self) -> None:
        """Forget the C program (its calls point into tensors this object keeps)."""
        lib = int4_cpu.library()
        if lib is not None:
            lib.graphrt_program_drop(self.key)

    def __del__(self) -> None:   # a program no one holds can no longer be run: its tensors go with this object
        try:
            self.drop()
        except Exception:   # noqa: BLE001 - at interpreter exit the library may be gone already
            pass


def _c_call(c: KernelCall) -> _Call:
    ints = [int(a) for a in c.args if not isinstance(a, float)]
    floats = [a for a in c.args if isinstance(a, float)]
    if len(ints) > SLOTS or len(floats) != 1:
        raise ValueError(f"{c.name}: {len(ints)} integer and {len(floats)} float arguments do not fit a program call")
    return _Call(KINDS[c.name], (ctypes.c_int64 * SLOTS)(*ints), floats[0])


def _checked(calls: list[KernelCall], x: torch.Tensor, result) -> bool:
    """Whether the calls alone made `result` from x (see the module's docstring)."""
    if not calls or any(c.name not in KINDS for c in calls) or not isinstance(result, torch.Tensor):
        return False
    live = {x.data_ptr()}
    for c in calls:
        if any(r and r not in live for r in c.reads):
            return False
        live.add(c.writes)
    last = calls[-1]
    return (result.is_contiguous() and result.data_ptr() == last.writes
            and result.numel() * result.element_size() == last.write_bytes)


def record(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, threads: int,
           key: int | None = None) -> Program | None:
    """Run fn(x) once (CPU tensors; its kernels with `threads` workers) and keep it as a program under `key` (a new
    one by default) that writes fn(x) into y; None where the record is not such a program (then nothing is kept)."""
    lib = int4_cpu.library()
    if lib is None or x.device.type != "cpu" or y.device.type != "cpu" or not (x.is_contiguous() and y.is_contiguous()):
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), recording() as calls, _Watch() as watch:
            result = fn(x)
    finally:
        torch.set_num_threads(before)
    if watch.other or not _checked(calls, x, result) or result.dtype != y.dtype or result.numel() != y.numel():
        return None
    copy = KernelCall("copy", (y.data_ptr(), result.data_ptr(), y.numel() * y.element_size()), (result.data_ptr(),),
                      y.data_ptr(), y.numel() * y.element_size(), (y, result))
    program = [_c_call(c) for c in calls] + [_Call(COPY, (ctypes.c_int64 * SLOTS)(*copy.args), 0.0)]
    key = next_key() if key is None else key
    lib.graphrt_program_set(key, (_Call * len(program))(*program), len(program))
    return Program(key, tuple(calls) + (copy,), y)


def runner(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[Callable[[], None], Program | None]:
    """(a call that computes fn(x), the program it runs or None): the program where fn records as one, else fn
    itself. What the calibration times, so that it measures the lane as the lane runs."""
    out = torch.empty_like(fn(x))
    program = record(fn, x.contiguous(), out, torch.get_num_threads())
    if program is None:
        return (lambda: fn(x)), None
    return program.run, program
