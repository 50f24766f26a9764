"""Host-to-device copies of streamed groups issued as a kernel instead of a copy-engine memcpy.

A captured step with one memcpy node per streamed group costs the host ~2 us per node at every replay
(`tools/copy_probe.py` on the H100: 80 layers, each a small kernel and a 4 MiB copy: 165 us per `replay()` with
memcpy nodes, 5.3 us with copy kernels). A kernel that reads the pinned, mapped host buffer through its
address moves the same bytes as an ordinary kernel node, so the launch cost stays flat in the number of
streamed groups, at ~8% less bandwidth (48-51 GB/s against the copy engine's 55 on that host) and a few SMs
busy while it runs. `RuntimeOptions.copy_mode` chooses ("memcpy", the default, or "kernel").

The kernel copies 16-byte words with four loads in flight per thread, then the tail bytes; grid and block are
fixed (the probe's best: 32 blocks x 256 threads). Compiled at first use with NVRTC (`torch.cuda._compile_kernel`).
"""
from __future__ import annotations

import functools

import torch

BLOCKS, THREADS = 32, 256

_SOURCE = r"""
extern "C" __global__ void copy_h2d(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                    long long n) {
    const uint4* s = (const uint4*)src;
    uint4* d = (uint4*)dst;
    const long long n16 = n >> 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {        // four 16-byte loads in flight per thread
        const uint4 a = s[i], b = s[i + stride], c = s[i + 2 * stride], e = s[i + 3 * stride];
        d[i] = a; d[i + stride] = b; d[i + 2 * stride] = c; d[i + 3 * stride] = e;
    }
    for (; i < n16; i += stride) d[i] = s[i];
    const long long t = (n16 << 4) + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) dst[t] = src[t];
}
"""


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int):
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(_SOURCE, "copy_h2d")


def available(device_index: int = 0) -> bool:
    """Whether copy kernels can run here (CUDA, NVRTC, and a torch with `torch.cuda._compile_kernel`)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        _kernel(device_index)
        return True
    except Exception:
        return False


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, device_index: int) -> None:
    """dst <- src (uint8, 16-byte aligned, one of them on the GPU and the other in pinned host memory registered
    as mapped, or both on the GPU), by the copy kernel on the current stream of `device_index`: no copy engine
    (a small copy issued on the compute stream does not queue behind the copy stream's large ones)."""
    n = src.numel()
    if dst.numel() < n or dst.data_ptr() % 16 or src.data_ptr() % 16:
        raise ValueError(f"copy_bytes needs a 16-byte aligned destination of >= {n} bytes and an aligned source")
    _kernel(device_index)(grid=(BLOCKS, 1, 1), block=(THREADS, 1, 1), args=[src, dst, n])


def copy_h2d(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (uint8, CUDA) <- src (uint8, pinned host memory registered as mapped), on the current stream.
    Both must be 16-byte aligned (ring slots and page-aligned host buffers are)."""
    copy_bytes(dst, src, dst.device.index or 0)
