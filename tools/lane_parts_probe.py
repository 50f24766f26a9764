"""The CPU lane's host function on MLP parts of several sizes, on this host: is there a cost per group?

    python3 tools/lane_parts_probe.py [--out DIR] [--formats bf16,int4] [--seconds 0.4]

For each format, the 8B MLP's CPU part with `c` intermediate rows (c = 14336: the whole MLP without its norm),
as the lane computes it (llama.mlp_rows on the CPU kernels, one input row, workers spinning as in a step), cycled
through copies that overflow the last-level cache (plan/group_cost.time_part, which the planner's calibration
runs at two of these sizes). Fits time = a + bytes / R over the sizes: `a` is the cost per group that a rate
alone does not carry. Each format in each mode (--modes): the lane's C programs with guided or fixed chunks, or the
host function through Python. Writes lane_parts_probe.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from graphrt.config import ModelConfig
from graphrt.plan.group_cost import time_part
from graphrt.weights.formats import int4_cpu
from graphrt.weights.formats.policy import quantization_policy

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b.json"
CPU_ROWS = (14080, 10496, 7168, 4352, 2048)


def probe(fmt: str, seconds: float, mode: str) -> dict:
    cfg = ModelConfig.from_file(CONFIG)
    policy = quantization_policy(None if fmt == "bf16" else fmt, torch.bfloat16, torch.device("cpu"))
    int4_cpu.library().graphrt_cpu_pool_guided(int(mode != "program-fixed"))
    rows = []
    for c in CPU_ROWS:   # timed as the planner's calibration times them (plan/group_cost.py)
        nbytes, t = time_part(cfg, policy, 1, c, seconds, programs=mode != "python")
        rows.append(dict(cpu_rows=c, MB=nbytes / 1e6, us=t * 1e6, GBps=nbytes / t / 1e9))
        print(f"{fmt} {mode} {c:6d} rows {nbytes / 1e6:7.1f} MB  {t * 1e6:8.1f} us  {nbytes / t / 1e9:6.1f} GB/s",
              flush=True)
    b = torch.tensor([r["MB"] * 1e6 for r in rows], dtype=torch.float64)
    t = torch.tensor([r["us"] * 1e-6 for r in rows], dtype=torch.float64)
    a_mat = torch.stack([torch.ones_like(b), b], dim=1)
    fixed, per_byte = torch.linalg.lstsq(a_mat, t[:, None]).solution[:, 0].tolist()
    print(f"{fmt} {mode}: time = {fixed * 1e6:.1f} us + bytes / {1 / per_byte / 1e9:.1f} GB/s", flush=True)
    return dict(rows=rows, fixed_us=fixed * 1e6, rate_GBps=1 / per_byte / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--formats", default="bf16,int4")
    ap.add_argument("--seconds", type=float, default=0.4)
    ap.add_argument("--modes", default="program,program-fixed,python",
                    help="program: the lane's C programs, guided chunks (the default); program-fixed: fixed chunks; "
                         "python: the host function through Python")
    a = ap.parse_args()
    int4_cpu.set_spin(4000)   # as the lane sets it (exec/cpu_lane.LANE_SPIN_US)
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    out = dict(threads=torch.get_num_threads(),
               formats={f"{f} {m}": probe(f, a.seconds, m) for f in a.formats.split(",") for m in a.modes.split(",")})
    int4_cpu.library().graphrt_cpu_pool_guided(1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lane_parts_probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
