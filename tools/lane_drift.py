"""Does the CPU lane's rate in the captured step drift after a load, and how? (issue 17: in the versus run at
d330865 the lane's first replays, right after each load, and the measured steps a minute later differed by up to
28%: int8 56 against 71 GB/s, bf16 at 16 sequences 90 against 82.)

    python3 tools/lane_drift.py [--out DIR] [--rows int8:1,bf16:16] [--samples 20] [--gap 3]

For each row (format:batch) of the versus benchmark's split with the lane: load as the benchmark does (the
calibration cleared first; the runtime's own in-step check included), then `--samples` times: the lane's busy time
per step over 24 replays (exec/lane_check.py), the time since the load ended, and the host's AnonHugePages
(/proc/meminfo: a background collapse of the lane's weights into huge pages would show there), `--gap` seconds
apart. Writes lane_drift.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from graphrt.bench.run import make_bench_model
from graphrt.bench.versus import LAYERS, _runtime, split_budget
from graphrt.config import ModelConfig
from graphrt.exec.lane_check import lane_busy_per_step


def anon_huge_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return -1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-lane-drift"))
    ap.add_argument("--rows", default="int8:1,bf16:16")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--gap", type=float, default=3.0)
    a = ap.parse_args()
    path = make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), LAYERS)
    cfg = ModelConfig.from_file(path / "config.json")
    a.out.mkdir(parents=True, exist_ok=True)
    out = []
    for row in a.rows.split(","):
        fmt, batch = row.split(":")
        q, batch = (None if fmt == "bf16" else fmt), int(batch)
        before = anon_huge_mb()
        rt = _runtime(path, q, split_budget(cfg, q, batch, 512), batch, 512, cpu_lane=True)
        loaded = time.perf_counter()
        p = rt.placement
        planned = p.prediction.host_compute - len(p.cpu) * p.cost.cpu_overhead
        rec = dict(format=fmt, batch=batch, cpu_groups=len(p.cpu), cpu_GB=p.cpu_bytes / 1e9,
                   planned_GBps=p.cpu_bytes / planned / 1e9, first_replays_GBps=(rt.lane_in_step_rate or 0) / 1e9,
                   anon_huge_MB_before_load=before, samples=[])
        graph = rt.capture(batch)
        for _ in range(a.samples):
            busy = lane_busy_per_step(graph, rt.engine.cpu_lane, len(p.cpu), steps=24, windows=1)
            rec["samples"].append(dict(t_s=round(time.perf_counter() - loaded, 2),
                                       GBps=p.cpu_bytes / busy / 1e9 if busy else None, anon_huge_MB=anon_huge_mb()))
            print(json.dumps(dict(format=fmt, batch=batch, **rec["samples"][-1])), flush=True)
            time.sleep(a.gap)
        out.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "samples"}), flush=True)
        del graph
        rt.close()
        del rt
        torch.cuda.empty_cache()
        (a.out / "lane_drift.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
