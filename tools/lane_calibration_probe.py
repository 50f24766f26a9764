"""Why does the calibration price a one-row bf16 lane group ~20% slower than it runs inside the decode step?
(issue 17: lane_timeline at 1251dd3 and 3f2c461, two machines: host functions at 1 row 1.20-1.23x the calibrated
rate, at 4-16 rows 0.91-1.06x.)

    python3 tools/lane_calibration_probe.py [--out DIR] [--batches 1,4,8] [--seconds S]

The 8B shape's bf16 MLP groups (5, as the benchmark's lane plans hold), the lane's threads (all CPUs but one) and
worker spin, each group's time as calibrate.measure takes it (median), in these settings, alternated twice:
  back-to-back   groups one after another, pinned H2D copies queued beside (what the calibration does)
  gap-0.6ms      the same with 0.6 ms of idle host between groups (a decode step's GPU work between lane groups)
  gap-2ms        2 ms between groups
  no-copies      back to back, no copies
Writes lane_calibration_probe.json.
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
from graphrt.plan.calibrate import mlp_groups
from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.synthetic import PRESETS, make_config

MODES = {"back-to-back": (0.0, True), "gap-0.6ms": (0.6e-3, True), "gap-2ms": (2e-3, True), "no-copies": (0.0, False)}


def rate(cfg, nbytes, groups, batch, gap, copies, seconds) -> float:
    x = torch.randn(batch, 1, cfg.hidden_size).bfloat16()
    cuda = copies and torch.cuda.is_available()
    if cuda:
        src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        dst, side = torch.empty_like(src, device="cuda"), torch.cuda.Stream()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        if cuda:
            with torch.cuda.stream(side):
                for _ in range(4):
                    dst.copy_(src, non_blocking=True)
        if gap:
            until = time.perf_counter() + gap
            while time.perf_counter() < until:
                pass
        w = groups[len(times) % len(groups)]
        t = time.perf_counter()
        llama.mlp_forward(x, w, cfg)
        times.append(time.perf_counter() - t)
    if cuda:
        side.synchronize()
    return nbytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-lane-calibration"))
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--seconds", type=float, default=0.6)
    a = ap.parse_args()
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=1), dtype="bfloat16"))
    policy = quantization_policy(None, torch.bfloat16, "cpu", in_features=(4096, 4096, 14336))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    int4_cpu.set_spin(LANE_SPIN_US)
    rows = []
    with torch.inference_mode():
        for batch in (int(b) for b in a.batches.split(",")):
            nbytes, groups = mlp_groups(cfg, policy, batch, 5)
            for w in groups:
                llama.mlp_forward(torch.randn(batch, 1, cfg.hidden_size).bfloat16(), w, cfg)
            for turn in range(2):
                for mode, (gap, copies) in MODES.items():
                    r = rate(cfg, nbytes, groups, batch, gap, copies, a.seconds)
                    rows.append(dict(batch=batch, mode=mode, turn=turn, GBps=r / 1e9, threads=torch.get_num_threads()))
                    print(json.dumps(rows[-1]), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lane_calibration_probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
