"""The CPU lane: a group computed on the CPU from host memory, inside the same step (and the same CUDA graph).

While the copy engine streams ring groups over PCIe, the CPU reads other groups' weights from DRAM and computes
them: two host paths at once. For one group on a CUDA device the compute stream carries

    activation D2H (into pinned staging)  ->  host node: fn(staging) on the CPU  ->  result H2D

so the GPU work after it waits for the CPU result, and the copy stream, which does not wait on the compute
stream until its ring slots run out, keeps streaming meanwhile. The two small copies are kernels that read and
write the pinned staging through its mapped address (weights/copy_kernel.py) where NVRTC compiles: as memcpys
they waited behind the ring's copies on the copy engine (tools/lane_probe.py on the H100: a lane group took
9.6 ms instead of 1.7 ms while 256 MB copies ran beside it). Eagerly the same three steps run as plain
copies around a direct call (the host waits). In a graph being captured, the middle step runs the Python function
registered under a key (`register`) on another thread, in one of two ways:
  - signalled (the default where lane_signal.available()): the D2H kernel also writes the key into a pinned flag,
    graphrt's serving thread (lane_signal.LaneServer) runs the function and answers, and a kernel polls for the
    answer: no host node, and no wake-up of the driver's thread per group (70-170 us each on the H100 host). Where
    the function is a chain of graphrt's CPU kernels (every MLP group on them), `start` records it at capture as a
    C program (weights/formats/cpu_program.py) that the serving thread runs without Python;
  - a host node: `cuLaunchHostFunc` (the CUDA driver, through ctypes) records a call of one C-callable trampoline
    with the key; each replay calls it from the driver's thread.
Host functions must not call CUDA, and these do not: `fn` is CPU math on CPU tensors. An exception inside one
cannot propagate to the stream; it is kept and raised by `check()`, which the decode loop calls where it already
waits for the GPU (as is a signalled group that got no answer within lane_signal.TIMEOUT_S).

On a CPU device the lane is a direct call (tests run the same math and placement there).
"""
from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError
from ..weights import copy_kernel
from . import lane_signal
from ..weights.formats import cpu_program, int4_cpu
from ..weights.store import pinned_empty, unpin

HostFn = Callable[[torch.Tensor], torch.Tensor]
LANE_SPIN_US = 4000   # the CPU kernels' workers spin this long after a product (a step's groups are ms apart)

_REGISTRY: dict[int, Callable[[], None]] = {}
_ERRORS: list[BaseException] = []
_LOCK = threading.Lock()
_SERVERS: list[lane_signal.LaneServer] = []   # live serving threads (check() reads their timeout flags)


def _trampoline_py(user_data: int | None) -> None:
    """What the driver calls on every replay: the registered function of this key, errors kept."""
    try:
        with torch.inference_mode():
            _REGISTRY[int(user_data or 0)]()
    except BaseException as e:  # noqa: BLE001 - nothing can propagate through the driver's thread
        with _LOCK:
            _ERRORS.append(e)


HOST_FN_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
TRAMPOLINE = HOST_FN_TYPE(_trampoline_py)   # module lifetime: graphs keep calling it


def register(fn: Callable[[], None]) -> int:
    key = cpu_program.next_key()   # one key space with the C programs (weights/formats/cpu_program.py)
    _REGISTRY[key] = fn
    return key


def check() -> None:
    """Raise the first error a host node hit since the last check (RuntimeError, with it as the cause)."""
    for server in _SERVERS:
        key = server.timed_out()
        if key:
            with _LOCK:
                _ERRORS.append(TimeoutError(f"host function {key} did not answer within {lane_signal.TIMEOUT_S} s"))
    with _LOCK:
        if not _ERRORS:
            return
        first = _ERRORS[0]
        _ERRORS.clear()
    raise RuntimeError(f"a CPU-lane group failed inside the captured step: {type(first).__name__}: {first}") \
        from first


_LIBCUDA = None


def _libcuda() -> ctypes.CDLL:
    global _LIBCUDA
    if _LIBCUDA is None:
        _LIBCUDA = ctypes.CDLL("libcuda.so.1")
        _LIBCUDA.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, HOST_FN_TYPE, ctypes.c_void_p]
        _LIBCUDA.cuLaunchHostFunc.restype = ctypes.c_int
    return _LIBCUDA


def launch_host_func(stream: torch.cuda.Stream, key: int) -> None:
    """Enqueue (or, while capturing, record) a call of the trampoline with `key` on `stream`."""
    status = _libcuda().cuLaunchHostFunc(ctypes.c_void_p(stream.cuda_stream), TRAMPOLINE, ctypes.c_void_p(key))
    if status != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {status}")


def node_kind(device: torch.device, nodes: str = "auto") -> str:
    """How captured steps on `device` reach the CPU lane: "signal" or "host" (RuntimeOptions.lane_nodes)."""
    if nodes not in ("auto", "signal", "host"):
        raise ConfigError(f"lane_nodes must be 'auto', 'signal' or 'host', got {nodes!r}")
    index = device.index or 0
    signal = (device.type == "cuda" and nodes != "host" and copy_kernel.available(index)
              and lane_signal.available(index))
    if nodes == "signal" and not signal:
        raise ConfigError("lane_nodes='signal' needs a CUDA device, NVRTC and graphrt's CPU kernel library (a C++ "
                          f"compiler: {int4_cpu.why_unavailable() or 'built'}); use lane_nodes='auto' or 'host'")
    return "signal" if signal else "host"


@dataclass
class LaneTicket:
    """A group posted to the CPU lane (CpuLane.start): its result where it is known already, else the staging the
    CPU writes (and the request's key, signalled)."""
    out: torch.Tensor | None = None
    key: int = 0
    staged: torch.Tensor | None = None


class CpuLane:
    """Runs `fn(h)` for CPU-lane groups: h [..., hidden] on the step's device -> fn's result on that device."""

    def __init__(self, device: torch.device, max_tokens: int, hidden: int, dtype: torch.dtype,
                 threads: int | None = None, nodes: str = "auto"):
        """threads: torch CPU threads for the host functions (default: the caller's count, which the
        calibration measured with). OpenMP keeps the team size per thread, and the driver's callback thread
        would otherwise start with OpenMP's default (every logical CPU), oversubscribing the cores.
        nodes: how captured steps reach the CPU: "signal", "host" (a host node) or "auto" (signal where it runs)."""
        self.threads = threads or torch.get_num_threads()
        self.device = device
        self.cuda = device.type == "cuda"
        self.hidden, self.dtype, self.retired = hidden, dtype, []
        self.kernel_copies = self.cuda and copy_kernel.available(device.index or 0)
        self.nodes = node_kind(device, nodes)
        self.server: lane_signal.LaneServer | None = None   # its flags are pinned here: not while capturing
        if self.nodes == "signal":
            self.server = lane_signal.LaneServer(self.device, _trampoline_py)
            _SERVERS.append(self.server)
        if self.cuda:   # graphrt's CPU kernels keep their workers awake between the groups of a step
            int4_cpu.set_spin(LANE_SPIN_US)
        self.pinned: list[torch.Tensor] = []   # mapped staging buffers (unpinned by release)
        if self.cuda:  # pinned staging, reused by every group: the compute stream orders their uses
            self.stage_in, self.stage_out = self._staging(max_tokens * hidden), self._staging(max_tokens * hidden)
        self.keys: list[int] = []   # host functions registered by captures (kept while graphs live)
        self.programs: list[cpu_program.Program] = []   # their C programs, where they record as one (signalled)
        self.host_threads: int | None = None   # torch threads the last host function ran with
        self.trace: list[tuple[float, float]] | None = None   # a list: (start, end) of each Python host function

    def _staging(self, numel: int) -> torch.Tensor:
        if not self.kernel_copies:
            return torch.empty(numel, dtype=self.dtype, pin_memory=True)
        buf = pinned_empty(numel * self.dtype.itemsize, mapped=True)
        self.pinned.append(buf)
        return buf.view(self.dtype)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src (same shape, contiguous), one side pinned staging: the copy kernel where it runs and both
        are aligned, else a copy-engine memcpy."""
        if self.kernel_copies and dst.data_ptr() % 16 == 0 and src.data_ptr() % 16 == 0:
            copy_kernel.copy_bytes(dst.view(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8),
                                   self.device.index or 0)
        else:
            dst.copy_(src, non_blocking=True)

    def reserve(self, tokens: int) -> None:
        """Staging for steps of `tokens` activation rows (batch x tokens per row; call before capturing such
        steps, e.g. speculative rounds of k + 1 tokens). Graphs captured earlier keep the old buffers alive."""
        if self.cuda and tokens * self.hidden > self.stage_in.numel():
            self.retired += [self.stage_in, self.stage_out]
            self.stage_in, self.stage_out = self._staging(tokens * self.hidden), self._staging(tokens * self.hidden)

    def run(self, h: torch.Tensor, fn: HostFn) -> torch.Tensor:
        """fn(h) on the CPU, the compute stream waiting for it."""
        return self.finish(self.start(h, fn))

    def start(self, h: torch.Tensor, fn: HostFn) -> "LaneTicket":
        """Post fn(h) to the CPU; with signalled nodes the compute stream goes on (work issued before `finish`
        runs while the CPU computes). Eagerly, on the CPU and with host nodes it is computed here and then."""
        if not self.cuda:
            return LaneTicket(out=fn(h))
        if not torch.cuda.is_current_stream_capturing():
            return LaneTicket(out=fn(h.to("cpu")).to(self.device))
        n = h.numel()
        if n > self.stage_in.numel():
            raise RuntimeError(f"CPU-lane staging holds {self.stage_in.numel()} values, the step needs {n}")
        x, y = self.stage_in[:n].view(h.shape), self.stage_out[:n].view(h.shape)

        threads, lane = self.threads, self

        def host() -> None:
            start = time.perf_counter()
            if torch.get_num_threads() != threads:   # on the driver's thread: once
                torch.set_num_threads(threads)
            lane.host_threads = torch.get_num_threads()
            y.copy_(fn(x))
            if lane.trace is not None:
                lane.trace.append((start, time.perf_counter()))

        key = register(host)
        self.keys.append(key)
        if self.nodes == "signal":   # the serving loop runs the group in C where fn records as a program of kernels
            program = cpu_program.record(fn, x, y, threads, key=key)
            if program is not None:
                self.programs.append(program)
                self.host_threads = threads
            src = h.contiguous()
            self.server.post(x, src if src.data_ptr() % 16 == 0 else src.clone(), key)   # D2H, then the request
            return LaneTicket(key=key, staged=y)
        self._copy(x, h.contiguous())                         # D2H (a kernel node, or a memcpy node)
        launch_host_func(torch.cuda.current_stream(self.device), key)   # host node: the stream waits here
        return LaneTicket(staged=y)

    def finish(self, ticket: "LaneTicket") -> torch.Tensor:
        """The posted group's result on the step's device (signalled: a kernel polls for the CPU's answer)."""
        if ticket.out is not None:
            return ticket.out
        if ticket.key:
            self.server.wait(ticket.key)
        y = ticket.staged
        out = torch.empty(y.shape, dtype=y.dtype, device=self.device)
        self._copy(out, y)                                   # H2D
        return out

    def start_trace(self) -> None:
        """Log each host function's (start, end) from now on (perf_counter seconds), C programs' included."""
        self.trace = []
        if self.server is not None:
            self.server.start_trace()

    def stop_trace(self) -> list[tuple[float, float]]:
        """The host functions' (start, end) since start_trace, in order of start (call with the GPU idle)."""
        spans = (self.trace or []) + (self.server.stop_trace() if self.server is not None else [])
        self.trace = None
        return sorted(spans)

    def release(self) -> None:
        """Forget the host functions and unpin the mapped staging: call once no graph that uses them lives."""
        for program in self.programs:
            program.drop()
        self.programs.clear()
        if self.server is not None:
            _SERVERS.remove(self.server)
            self.server.close()
            self.server = None
        for key in self.keys:
            _REGISTRY.pop(key, None)
        self.keys.clear()
        for buf in self.pinned:
            unpin(buf)
        self.pinned.clear()
