"""The CPU lane's node in a captured step without a CUDA host node: kernels and a serving thread meet at two flags.

A host node (`cuLaunchHostFunc`) costs 70-170 us per group on the H100 host before any CPU work (tools/lane_probe.py,
"empty" rows): the driver's callback thread must wake for each one. Here the captured step carries two kernels
per CPU-lane group instead:

    post   copies the activation into pinned staging, then (the last block to finish) writes the group's key into
           the request flag (pinned, mapped host memory: weights/formats/lane_signal_source.py says which is which)
    wait   one thread polls the answer flag until it holds the key, clears it, and lets the result's copy follow

and a thread of graphrt's (one per lane) waits for requests in C (`graphrt_lane_serve`, without the GIL), runs the
group's C program (weights/formats/cpu_program.py) there or else the Python host function registered under the key
(cpu_lane.register), and answers. Between requests it spins for SPIN_US, so
a decode step's groups find it awake; then it naps. A wait that sees no answer within TIMEOUT_S gives up, marks the
timeout flag and lets the step go on; `check()` (the lane's, which the decode loop calls) raises it.
Needs graphrt's kernel library (a C++ compiler) and NVRTC; `available()` says whether both are here.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import torch

from ..weights.formats import int4_cpu
from ..weights.store import pinned_empty, unpin

SPIN_US, NAP_US = 50_000, 50     # the serving thread spins this long after a request, then naps this long a time
TRACE_SPANS = 1 << 16            # program runs a trace holds (start_trace)
TIMEOUT_S = 5.0                  # a waiting kernel gives up after this long without an answer
BLOCKS, THREADS = 16, 256

_SOURCE = r"""
extern "C" __global__ void lane_post(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                     long long n, int* flags, int key, unsigned int* finished) {
    const uint4* s = (const uint4*)src;
    uint4* d = (uint4*)dst;
    const long long n16 = n >> 4, stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i < n16; i += stride) d[i] = s[i];
    const long long t = (n16 << 4) + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) dst[t] = src[t];
    __threadfence_system();          /* this thread's copies reach host memory before the count below */
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(finished, 1u) == gridDim.x - 1) {   /* the last block: every copy is out */
        *finished = 0;
        __threadfence_system();
        ((volatile int*)flags)[0] = key;
    }
}

extern "C" __global__ void lane_wait(int* flags, int key, double timeout_ns) {
    volatile int* f = flags;
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (f[1] != key) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if ((double)(now - start) > timeout_ns) { f[2] = key; break; }
        __nanosleep(200);
    }
    f[1] = 0;
    __threadfence_system();
}
"""


@functools.lru_cache(maxsize=None)
def _kernels(device_index: int):
    with torch.cuda.device(device_index):
        return (torch.cuda._compile_kernel(_SOURCE, "lane_post"), torch.cuda._compile_kernel(_SOURCE, "lane_wait"))


def available(device_index: int = 0) -> bool:
    """Whether signalled lane nodes can run here: graphrt's kernel library and NVRTC kernels."""
    if int4_cpu.library() is None or not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        _kernels(device_index)
        return True
    except Exception:
        return False


class LaneServer:
    """Serves the CPU lane's host functions to a device's captured steps from a thread of its own."""

    def __init__(self, device: torch.device, call):
        """call(key): runs the host function registered under key (errors kept by the caller, cpu_lane)."""
        self.index = device.index or 0
        self.post_kernel, self.wait_kernel = _kernels(self.index)
        self.lib = int4_cpu.library()
        self.flags_buf = pinned_empty(16, mapped=True)
        self.flags = self.flags_buf.view(torch.int32)   # request, answer, timeout, stop
        self.flags.zero_()
        self.finished = torch.zeros(1, dtype=torch.int32, device=device)   # blocks of a post that are done
        self.call = call
        self.trace = torch.zeros(2 + 2 * TRACE_SPANS, dtype=torch.int64)   # capacity, count, then (start, end) pairs
        self.thread = threading.Thread(target=self._serve, name="graphrt-cpu-lane", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        ptr, trace = ctypes.c_void_p(self.flags.data_ptr()), ctypes.c_void_p(self.trace.data_ptr())
        while True:   # C programs are run and answered inside graphrt_lane_serve; it returns the other keys
            key = self.lib.graphrt_lane_serve(ptr, SPIN_US, NAP_US, trace)
            if key == 0:
                return
            self.call(key)
            self.lib.graphrt_lane_done(ptr, key)

    def start_trace(self) -> None:
        """Log each C program run from now on (the serving loop reads the capacity before each)."""
        self.trace[1] = 0
        self.trace[0] = TRACE_SPANS

    def stop_trace(self) -> list[tuple[float, float]]:
        """(start, end) of each program run since start_trace (call while no request is in flight)."""
        self.trace[0] = 0
        n = int(self.trace[1])
        return [tuple(p) for p in self.trace[2:2 + 2 * n].view(torch.float64).view(n, 2).tolist()]

    def post(self, staging: torch.Tensor, src: torch.Tensor, key: int) -> None:
        """On the current stream: staging (pinned, mapped) <- src (device; same bytes), then request `key`."""
        n = src.numel() * src.element_size()   # a C int (torch's kernel call passes ints so)
        if staging.data_ptr() % 16 or src.data_ptr() % 16 or staging.numel() * staging.element_size() < n:
            raise ValueError("lane post needs 16-byte aligned buffers and staging as large as the activation")
        self.post_kernel(grid=(BLOCKS, 1, 1), block=(THREADS, 1, 1),
                         args=[src, staging, n, self.flags, key, self.finished])

    def wait(self, key: int) -> None:
        """On the current stream: hold the stream until the answer to `key` (or the timeout)."""
        self.wait_kernel(grid=(1, 1, 1), block=(1, 1, 1), args=[self.flags, key, TIMEOUT_S * 1e9])   # ints pass as C int

    def timed_out(self) -> int:
        """The key of a group whose answer never came (0: none); clears it."""
        key = int(self.flags[2])
        if key:
            self.flags[2] = 0
        return key

    def close(self) -> None:
        """Stop the serving thread and unpin the flags (no graph that posts to them may replay after this)."""
        self.flags[3] = 1
        self.thread.join()
        unpin(self.flags_buf)
