"""Host-to-device copies as kernels (issue 9, host cost of streamed graphs): are they as fast as copy-engine
memcpys, and do they make a graph cheaper to launch?

    python3 tools/copy_probe.py [--out DIR]

1. Bandwidth from a pinned, registered host buffer (graphrt.weights.store.pinned_empty) to the GPU: the copy
   engine (`Tensor.copy_`) against an NVRTC kernel that reads the host memory directly (16-byte loads, grid-stride)
   at several grid sizes; and the kernel copy while a bf16 GEMV loop runs on another stream (both rates).
2. Host time of `CUDAGraph.replay()` (GPU idle before the call, median of 30) for graphs of L layers, each one
   small kernel plus one 4 MiB copy from host memory: copy nodes (memcpy) against copy kernels, L = 8 and 80;
   and the node types of each graph (cudaGraphGetNodes / cudaGraphNodeGetType through the runtime).
Writes copy_probe.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from graphrt.bench.run import cuda_median
from graphrt.weights.store import pinned_empty, unpin

SOURCE = r"""
extern "C" __global__ void copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, long long n16) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {        // four 16-byte loads in flight per thread
        const uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a; dst[i + stride] = b; dst[i + 2 * stride] = c; dst[i + 3 * stride] = d;
    }
    for (; i < n16; i += stride) dst[i] = src[i];
}
"""
NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
              7: "event_record", 8: "ext_sem_signal", 9: "ext_sem_wait", 10: "mem_alloc", 11: "mem_free"}


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    return cuda_median(fn, reps)


def node_types(graph: torch.cuda.CUDAGraph) -> dict[str, int]:
    lib = torch.cuda._utils._get_gpu_runtime_library()      # libcuda (driver API): CUgraph is cudaGraph_t
    g = ctypes.c_void_p(graph.raw_cuda_graph())
    n = ctypes.c_size_t(0)
    lib.cuGraphGetNodes(g, None, ctypes.byref(n))
    nodes = (ctypes.c_void_p * n.value)()
    lib.cuGraphGetNodes(g, nodes, ctypes.byref(n))
    out: dict[str, int] = {}
    for node in nodes:
        t = ctypes.c_int(0)
        lib.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t))
        name = NODE_TYPES.get(t.value, str(t.value))
        out[name] = out.get(name, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-copy-probe"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    kernel = torch.cuda._compile_kernel(SOURCE, "copy16")
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)

    nbytes = 512 << 20
    host = pinned_empty(nbytes)
    host.copy_(torch.randint(0, 255, (nbytes,), dtype=torch.uint8))
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    res["memcpy_GBps"] = nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    rates = {}
    for blocks in (8, 16, 32, 64, 132, 264):
        for threads in (256, 512):
            def run(b=blocks, t=threads):
                kernel(grid=(b, 1, 1), block=(t, 1, 1), args=[host, dev, nbytes // 16])
            dev.zero_()
            rates[f"{blocks}x{threads}"] = nbytes / timed(run) / 1e9
            assert torch.equal(dev.cpu(), host), "the copy kernel wrote wrong bytes"
    res["kernel_GBps"] = rates
    print(f"memcpy {res['memcpy_GBps']:.1f} GB/s; kernel: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()),
          flush=True)

    # the kernel copy beside GEMVs on another stream
    best = max(rates, key=rates.get)
    b, t = map(int, best.split("x"))
    w = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    gemv_alone = timed(lambda: [F.linear(x, w) for _ in range(100)]) / 100
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.cuda.stream(side):
        kernel(grid=(b, 1, 1), block=(t, 1, 1), args=[host, dev, nbytes // 16])
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(100):
        F.linear(x, w)
    e1.record()
    ec = torch.cuda.Event(enable_timing=True)
    ec.record(side)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - start
    res["together"] = dict(grid=best, gemv_alone_us=1e6 * gemv_alone, gemv_beside_copy_us=e0.elapsed_time(e1) * 10,
                           copy_GBps_wall=nbytes / copy_s / 1e9)
    print("beside GEMVs:", res["together"], flush=True)

    # graph launch cost: L layers of (one small kernel, one 4 MiB copy from host memory)
    chunk = 4 << 20
    small = torch.zeros(1024, device="cuda")
    launch = {}
    for layers in (8, 80):
        for mode in ("memcpy", "kernel"):
            src = [host[i * chunk:(i + 1) * chunk] for i in range(layers)]
            dst = [dev[i * chunk:(i + 1) * chunk] for i in range(len(src))]
            try:
                g = torch.cuda.CUDAGraph(keep_graph=True)     # raw_cuda_graph() needs the graph kept
            except TypeError:
                g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(g, stream=s):
                for i in range(layers):
                    small.add_(1.0)
                    j = i % len(src)
                    if mode == "memcpy":
                        dst[j].copy_(src[j], non_blocking=True)
                    else:
                        kernel(grid=(b, 1, 1), block=(t, 1, 1), args=[src[j], dst[j], chunk // 16])
            g.replay()
            torch.cuda.synchronize()
            host_us = []
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                g.replay()
                host_us.append(1e6 * (time.perf_counter() - t0))
            gpu_s = timed(g.replay)
            try:
                nodes = node_types(g)
            except Exception as e:      # an older torch without raw_cuda_graph
                nodes = {"error": repr(e)}
            launch[f"{layers} layers, {mode}"] = dict(host_us=statistics.median(host_us), gpu_ms=1e3 * gpu_s,
                                                     GBps=layers * chunk / gpu_s / 1e9, nodes=nodes)
            print(f"{layers} layers, {mode}: {launch[f'{layers} layers, {mode}']}", flush=True)
            del g
    res["launch"] = launch
    unpin(host)
    (a.out / "copy_probe.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
