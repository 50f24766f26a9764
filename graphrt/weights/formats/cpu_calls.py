"""Calls into graphrt's CPU kernel library (int4_cpu.py builds it), and their recording.

Every CPU GEMV wrapper (bf16_cpu, int8_cpu, int4_cpu) makes its library call through `invoke`. While `recording()`
is open on this thread, each call is also kept as a `KernelCall`: the C function's name, its arguments (tensors
as their addresses, None as 0), which of them are the activations it reads and the tensor it writes, and every
tensor it was given (kept alive, so the addresses stay valid). cpu_program.py turns such a record into a program
that C runs without Python: the CPU lane's host functions inside a captured step.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class KernelCall:
    name: str                       # the library's C function
    args: tuple                     # its arguments in order: ints (addresses, counts, flags) and one float
    reads: tuple[int, ...]          # addresses of the activations it reads (0: none)
    writes: int                     # address of its output
    write_bytes: int
    keep: tuple[torch.Tensor, ...]  # every tensor it was given: their memory must outlive a program of it


_local = threading.local()


def _address(a) -> int | float:
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return 0 if a is None else a


def invoke(fn, *args, reads: tuple = (), out: torch.Tensor) -> None:
    """fn(*args) with tensors passed as their addresses (a library function from int4_cpu._library()); recorded
    where a recording is open. reads: the activation tensors among args (or None); out: the one it writes."""
    plain = tuple(_address(a) for a in args)
    fn(*plain)
    calls = getattr(_local, "calls", None)
    if calls is not None:
        calls.append(KernelCall(fn.__name__, plain, tuple(_address(r) for r in reads), out.data_ptr(),
                                out.numel() * out.element_size(),
                                tuple(a for a in args if isinstance(a, torch.Tensor))))


@contextlib.contextmanager
def recording() -> Iterator[list[KernelCall]]:
    """The kernel calls made on this thread inside the block, in order (the calls still run)."""
    if getattr(_local, "calls", None) is not None:
        raise RuntimeError("a CPU kernel recording is already open on this thread")
    _local.calls = []
    try:
        yield _local.calls
    finally:
        _local.calls = None
