"""What one CPU-lane group costs inside a captured step, beyond its CPU math (issue 17).

    python3 tools/lane_probe.py [--out DIR] [--formats bf16,int8,int4] [--threads N]

MLP groups of the 8B shape (random contents, the lane's formats, enough groups that the CPU's cache cannot hold them:
calibrate.mlp_groups), taken in turn, batch 1:
  direct     the group's math called on the CPU (llama.mlp_forward, as the lane's host function runs it)
  graph      a CUDA graph of the lane's three nodes (activation D2H, host node running the same math, result H2D),
             replayed back to back; per replay. The small copies as copy kernels (the lane's default) and as
             copy-engine memcpys (`memcpy_` rows)
  empty      the same graph around a host function that only copies its input (the nodes' own cost)
  chain16    16 such empty groups in one graph (per replay; / 16 is a group's cost without the graph's launch)
Each graph is measured with the lane's default nodes (signalled where they run: exec/lane_signal.py), with host
nodes (`host_` rows) and with host nodes and memcpys (`memcpy_` rows).
  +h2d       while a side stream keeps the copy engine busy with pinned H2D copies (the lane's situation); only the
             replay stream is waited for
overhead = graph - direct: what the planner's CostModel.cpu_overhead stands for. Writes lane_probe.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graphrt.config import ModelConfig
from graphrt.exec.cpu_lane import CpuLane, check
from graphrt.models import llama
from graphrt.plan.calibrate import mlp_groups
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.synthetic import PRESETS, make_config

QUANT = {"bf16": None, "int8": "int8", "int4": "int4"}


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-lane-probe"))
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the direct calls")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=16), dtype="bfloat16"))
    dev = torch.device("cuda")
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=dev)
    side = torch.cuda.Stream()
    rows = []
    for name in a.formats.split(","):
        policy = quantization_policy(QUANT[name], torch.bfloat16, "cpu", in_features=(4096, 4096, 14336))
        nbytes, groups = mlp_groups(cfg, policy, 1)
        fns = [lambda x, w=w: llama.mlp_forward(x, w, cfg) for w in groups]
        x_cpu = torch.randn(1, 1, cfg.hidden_size).bfloat16()
        turn = iter(range(1 << 30))
        with torch.inference_mode():
            for f in fns:
                f(x_cpu)
            direct = median_time(lambda: fns[next(turn) % len(fns)](x_cpu), a.reps)
            if a.profile:
                with torch.profiler.profile() as prof:
                    for i in range(10):
                        fns[i % len(fns)](x_cpu)
                print(name, prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
            result = dict(format=name, threads=a.threads, group_MB=nbytes / 1e6, groups=len(groups),
                          direct_us=direct * 1e6)
            for prefix, nodes, kernel_copies in (("", "auto", True), ("host_", "host", True), ("memcpy_", "host", False)):
                lane = CpuLane(dev, 1, cfg.hidden_size, torch.bfloat16, threads=a.threads, nodes=nodes)
                lane.kernel_copies = lane.kernel_copies and kernel_copies
                if kernel_copies != lane.kernel_copies or (prefix == "host_" and result.get("nodes") == "host"):
                    continue                    # no copy kernel here, or the default is host nodes already
                result[f"{prefix}nodes"] = lane.nodes
                h = torch.randn(1, 1, cfg.hidden_size, device=dev).bfloat16()
                stream = torch.cuda.Stream()
                graphs = {}
                empty = lambda x: x.clone()   # noqa: E731
                for kind, fs, chain in (("graph", fns, 1), ("empty", [empty], 1), ("chain16", [empty], 16)):
                    graphs[kind] = []
                    for f in fs:
                        with torch.cuda.stream(stream):
                            lane.run(h, f)          # warm-up outside capture (the eager path)
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, stream=stream):
                            y = h
                            for _ in range(chain):  # 16 empty groups in one graph: the nodes' cost per group
                                y = lane.run(y, f)
                        graphs[kind].append(g)
                for kind, busy in (("graph", False), ("empty", False), ("chain16", False), ("graph", True),
                                   ("empty", True)):
                    gs = graphs[kind]
                    with torch.cuda.stream(stream):
                        for g in gs:
                            g.replay()
                    stream.synchronize()
                    if busy:
                        with torch.cuda.stream(side):
                            for _ in range(64):
                                dst.copy_(src, non_blocking=True)
                    t = time.perf_counter()
                    with torch.cuda.stream(stream):
                        for i in range(a.reps):
                            gs[i % len(gs)].replay()
                    stream.synchronize()                    # the replays only, not the side stream's copies
                    result[f"{prefix}{kind}{'+h2d' if busy else ''}_us"] = (time.perf_counter() - t) / a.reps * 1e6
                    side.synchronize()
                check()
                del graphs
                torch.cuda.synchronize()
                lane.release()
        result["overhead_us"] = result["graph_us"] - result["direct_us"]
        result["direct_GBps"] = nbytes / direct / 1e9
        rows.append(result)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    (a.out / "lane_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
