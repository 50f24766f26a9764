"""The CPU lane's host function on MLP parts of several sizes, on this host: is there a cost per group?

    python3 tools/lane_parts_probe.py [--out DIR] [--formats bf16,int4] [--seconds 0.4]

For each format, the 8B MLP's CPU part with `c` intermediate rows (c = 14336: the whole MLP without its norm),
as the lane computes it (llama.mlp_rows on the CPU kernels, one input row, workers spinning as in a step), cycled
through copies that overflow the last-level cache, one after another, and each product alone. Fits time = a +
bytes / R over the sizes: `a` is the cost per group that a rate alone does not carry. Writes lane_parts_probe.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graphrt.config import ModelConfig
from graphrt.models import llama
from graphrt.plan.calibrate import cycle_bytes, for_cpu, host_empty, random_buffer
from graphrt.weights.formats import int4_cpu, linear, linear_fused
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.layout import mlp_parts

CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b.json"
CPU_ROWS = (14080, 10496, 7168, 4352, 2048)


def timed(fn, groups, seconds: float) -> float:
    for w in groups:
        fn(w)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3 * len(groups):
        w = groups[len(times) % len(groups)]
        t = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def probe(fmt: str, seconds: float) -> dict:
    cfg = ModelConfig.from_file(CONFIG)
    policy = quantization_policy(None if fmt == "bf16" else fmt, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(1, 1, cfg.hidden_size).to(torch.bfloat16)
    rows = []
    for c in CPU_ROWS:
        g = mlp_parts(cfg, 0, policy, cfg.intermediate_size - c)[1]
        first = random_buffer(g)
        count = max(2, -(-cycle_bytes() // g.nbytes))
        groups = [for_cpu(g.views(b), 1) for b in [first] + [host_empty(g.nbytes).copy_(first)
                                                             for _ in range(count - 1)]]
        act = torch.randn(1, 1, 2 * c).to(torch.bfloat16)
        with torch.inference_mode():
            t = timed(lambda w: llama.mlp_rows(x, w), groups, seconds)
            gu = timed(lambda w: linear(x, w["gate_up"]), groups, seconds / 2)
            dn = timed(lambda w: linear_fused(act, w["down"], silu=True), groups,
                       seconds / 2)
        rows.append(dict(cpu_rows=c, MB=g.nbytes / 1e6, us=t * 1e6, GBps=g.nbytes / t / 1e9, gate_up_us=gu * 1e6,
                         down_silu_us=dn * 1e6))
        print(f"{fmt} {c:6d} rows {g.nbytes / 1e6:7.1f} MB  {t * 1e6:8.1f} us  {g.nbytes / t / 1e9:6.1f} GB/s"
              f"  (gate_up {gu * 1e6:7.1f}, down with silu {dn * 1e6:7.1f} us)", flush=True)
    b = torch.tensor([r["MB"] * 1e6 for r in rows], dtype=torch.float64)
    t = torch.tensor([r["us"] * 1e-6 for r in rows], dtype=torch.float64)
    a_mat = torch.stack([torch.ones_like(b), b], dim=1)
    fixed, per_byte = torch.linalg.lstsq(a_mat, t[:, None]).solution[:, 0].tolist()
    print(f"{fmt}: time = {fixed * 1e6:.1f} us + bytes / {1 / per_byte / 1e9:.1f} GB/s", flush=True)
    return dict(rows=rows, fixed_us=fixed * 1e6, rate_GBps=1 / per_byte / 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--formats", default="bf16,int4")
    ap.add_argument("--seconds", type=float, default=0.4)
    a = ap.parse_args()
    int4_cpu.set_spin(4000)   # as the lane sets it (exec/cpu_lane.LANE_SPIN_US)
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    out = dict(threads=torch.get_num_threads(), formats={f: probe(f, a.seconds) for f in a.formats.split(",")})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lane_parts_probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
