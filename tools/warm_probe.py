"""Does a CPU-lane group compute faster when its weights were read into the CPU's caches beforehand, during the
GPU's part of the step? (issue 17: the lane idles while the GPU computes; if the host's last-level cache holds a
group, the workers can read the next group's weights then, and the product that follows reads them from cache.)

    python3 tools/warm_probe.py [--out DIR] [--formats bf16,int8,int4] [--batches 1,4] [--seconds S]

The 8B shape's MLP groups in the CPU lane's formats (enough of them that the cache cannot hold them), the lane's
threads (all CPUs but one) and worker spin, pinned H2D copies queued beside as in a step. Each group's time, median,
in these modes:
  cold        the product alone (what the calibration measures)
  warm-sync   int4_cpu.warm(group, wait=True) first, then the product: both times
  warm-gap    warm handed to the workers, 1.5 ms of idle host (the GPU's part of a step), then the product (its
              time includes waiting for the warming)
  warm-part   warm-gap, warming only the first `--part-mb` MB of the group
Writes warm_probe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from graphrt.config import ModelConfig
from graphrt.exec.cpu_lane import LANE_SPIN_US
from graphrt.models import llama
from graphrt.plan.calibrate import _cpu_name, last_level_cache, mlp_groups
from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.base import group_tensors
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.synthetic import PRESETS, make_config


def first_bytes(ts: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    out, left = [], limit
    for t in ts:
        if left <= 0:
            break
        flat = t.reshape(-1).view(torch.uint8) if t.is_contiguous() else None
        if flat is None:
            continue
        out.append(flat[:left])
        left -= flat.numel()
    return out


def run(cfg, nbytes, groups, batch, mode, seconds, part, threads) -> dict:
    x = torch.randn(batch, 1, cfg.hidden_size).bfloat16()
    cuda = torch.cuda.is_available()
    if cuda:
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst, side = torch.empty_like(src, device="cuda"), torch.cuda.Stream()
    compute, warming, warmed = [], [], 0
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or len(compute) < 5:
        if cuda:
            with torch.cuda.stream(side):
                for _ in range(4):
                    dst.copy_(src, non_blocking=True)
        w = groups[i % len(groups)]
        i += 1
        ts = group_tensors(w)
        if mode == "warm-sync":
            t = time.perf_counter()
            warmed = int4_cpu.warm(ts, threads, wait=True)
            warming.append(time.perf_counter() - t)
        elif mode in ("warm-gap", "warm-part", "gap"):
            if mode != "gap":
                warmed = int4_cpu.warm(first_bytes(ts, part) if mode == "warm-part" else ts, threads)
            until = time.perf_counter() + 1.5e-3
            while time.perf_counter() < until:
                pass
        t = time.perf_counter()
        int4_cpu.warm_wait()
        llama.mlp_forward(x, w, cfg)
        compute.append(time.perf_counter() - t)
    if cuda:
        side.synchronize()
    med = statistics.median(compute)
    return dict(compute_ms=med * 1e3, GBps=nbytes / med / 1e9, warmed_MB=warmed / 1e6,
                warm_ms=statistics.median(warming) * 1e3 if warming else None,
                warm_GBps=warmed / statistics.median(warming) / 1e9 if warming else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-warm-probe"))
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--part-mb", type=int, default=128)
    a = ap.parse_args()
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=1), dtype="bfloat16"))
    threads = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    int4_cpu.set_spin(LANE_SPIN_US)
    rows = [dict(llc_MB=last_level_cache() / 1e6, threads=threads, cpus=os.cpu_count(), cpu=_cpu_name())]
    print(json.dumps(rows[0]), flush=True)
    with torch.inference_mode():
        for fmt in a.formats.split(","):
            policy = quantization_policy(None if fmt == "bf16" else fmt, torch.bfloat16, "cpu",
                                         in_features=(4096, 4096, 14336))
            for batch in (int(b) for b in a.batches.split(",")):
                nbytes, groups = mlp_groups(cfg, policy, batch)
                for w in groups:
                    llama.mlp_forward(torch.randn(batch, 1, cfg.hidden_size).bfloat16(), w, cfg)
                for turn in range(2):
                    for mode in ("cold", "gap", "warm-sync", "warm-gap", "warm-part"):
                        r = run(cfg, nbytes, groups, batch, mode, a.seconds, a.part_mb << 20, threads)
                        rows.append(dict(format=fmt, batch=batch, mode=mode, turn=turn, group_MB=nbytes / 1e6,
                                         groups=len(groups), **r))
                        print(json.dumps(rows[-1]), flush=True)
                del groups
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "warm_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
