"""What one CPU-lane group costs inside a captured step, beyond its CPU math (issue 17).

    python3 tools/lane_probe.py [--out DIR] [--formats bf16,int8,int4] [--threads N]

One MLP group of the 8B shape (random contents, the lane's formats: calibrate.mlp_group), batch 1:
  direct     the group's math called on the CPU (llama.mlp_forward, as the lane's host function runs it)
  graph      a CUDA graph of the lane's three nodes (activation D2H, host node running the same math, result H2D),
             replayed back to back; per replay
  empty      the same graph around a host function that only copies its input (the nodes' own cost)
  graph+h2d  `graph` while a side stream keeps the copy engine busy with pinned H2D copies (the lane's situation)
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
from graphrt.plan.calibrate import mlp_group
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
        nbytes, w = mlp_group(cfg, policy, 1)
        fn = lambda x: llama.mlp_forward(x, w, cfg)   # noqa: E731
        x_cpu = torch.randn(1, 1, cfg.hidden_size).bfloat16()
        with torch.inference_mode():
            fn(x_cpu)
            direct = median_time(lambda: fn(x_cpu), a.reps)
            if a.profile:
                with torch.profiler.profile() as prof:
                    for _ in range(10):
                        fn(x_cpu)
                print(name, prof.key_averages().table(sort_by="cpu_time_total", row_limit=14), flush=True)
            lane = CpuLane(dev, 1, cfg.hidden_size, torch.bfloat16, threads=a.threads)
            h = torch.randn(1, 1, cfg.hidden_size, device=dev).bfloat16()
            graphs = {}
            for kind, f in (("graph", fn), ("empty", lambda x: x.clone())):
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    lane.run(h, f)              # warm-up outside capture (eager path)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream):
                    lane.run(h, f)
                graphs[kind] = g
            result = dict(format=name, threads=a.threads, group_MB=nbytes / 1e6, direct_us=direct * 1e6)
            for kind, busy in (("graph", False), ("empty", False), ("graph", True)):
                g = graphs[kind]
                g.replay()
                torch.cuda.synchronize()
                if busy:
                    with torch.cuda.stream(side):
                        for _ in range(64):
                            dst.copy_(src, non_blocking=True)
                t = time.perf_counter()
                for _ in range(a.reps):
                    g.replay()
                torch.cuda.synchronize()
                per = (time.perf_counter() - t) / a.reps
                side.synchronize()
                result[f"{kind}{'+h2d' if busy else ''}_us"] = per * 1e6
            check()
            lane.release()
        result["overhead_us"] = result["graph_us"] - result["direct_us"]
        result["direct_GBps"] = nbytes / direct / 1e9
        rows.append(result)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    (a.out / "lane_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
