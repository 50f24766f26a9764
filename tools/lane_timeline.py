"""Where a CPU-lane decode step's time goes, measured inside the captured step, beside the plan's prediction.

    python3 tools/lane_timeline.py [--out DIR] [--batches 1,4] [--rings 3,5] [--quantization int8]
                                   [--variants default,blocking-sync,threads=12,spin=1000,placement=lane]

The versus benchmark's model and split budget (graphrt/bench/versus.py), the planner free to use the CPU lane. For
each batch and ring depth: the measured step (graph replays, as versus measures it), the plan's predicted step, and a
profiled step (graphrt/bench/timeline.py): each CPU-lane group's time on the compute stream (activation out, host
node, result back) against the simulator's time for it (the CPU at its rate beside copies while they run, alone
otherwise, plus cpu_overhead) and the calibrated rates, each host function's own time (its
start to its end on the driver's thread, during the measured replays), each streamed copy's rate against the rate
the plan priced it at, the copy engine's busy share, and the step's GPU side (the measured step less its lane
groups) against the prediction's (the predicted step less the simulated lane time). Writes lane_timeline.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from graphrt.bench.quant import step_time
from graphrt.bench.run import make_bench_model
from graphrt.bench.timeline import measure_timeline
from graphrt.bench.versus import LAYERS, split_budget
from graphrt.config import ModelConfig
from graphrt.exec.cpu_lane import LANE_SPIN_US
from graphrt.runtime import Runtime
from graphrt.weights.formats import int4_cpu
from lane_sync import set_blocking_sync   # tools/lane_sync.py, beside this script


def one(path: Path, cfg: ModelConfig, batch: int, ring: int, quantization: str | None,
        variant: str = "default") -> dict:
    """variant: "default", "blocking-sync" (threads that wait for the GPU sleep), "threads=N" (the lane's team),
    "spin=US" (how long the CPU kernels' workers spin after a product), "placement=lane" (whole MLPs on the CPU,
    no split) or "placement=lane-split"."""
    gc.collect()
    torch.cuda.empty_cache()
    kind, _, value = variant.partition("=")
    rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", quantization=quantization,
                                 max_batch_size=batch, max_seq_len=512, ring_depth=ring, stream_unit="auto",
                                 cpu_lane=True, gpu_budget=split_budget(cfg, quantization, batch, 512),
                                 **({"cpu_threads": int(value)} if kind == "threads" else {}),
                                 **({"placement": value} if kind == "placement" else {}))
    if kind == "spin":
        int4_cpu.set_spin(int(value))
    set_blocking_sync(rt.device, kind == "blocking-sync")
    p = rt.placement
    sizes = {g.name: g.nbytes for g in p.groups}
    lane_obj = rt.engine.cpu_lane
    if lane_obj is not None:
        lane_obj.start_trace()   # each host function's start and end (the serving thread, host clock)
    step = step_time(rt, steps=24, repeats=5, batch=batch, prompt=128) if batch > 1 else step_time(rt)
    host_fn = [e - s for s, e in lane_obj.stop_trace()] if lane_obj is not None else []
    tl = measure_timeline(rt, batch, 2)
    lane = [o["end"] - o["start"] for o in tl["ops"] if o["kind"] == "compute" and o["group"] in p.cpu]
    copies = [(sizes[o["group"]], o["end"] - o["start"]) for o in tl["ops"] if o["kind"] == "copy"]
    pred = p.prediction
    predicted_lane = (p.cpu_busy * pred.step_time / len(p.cpu)) if p.cpu and p.cpu_busy else None
    predicted_copy = (p.streamed_bytes / (pred.copy_busy * pred.step_time)) if p.streamed and pred.copy_busy else None
    set_blocking_sync(rt.device, False)
    int4_cpu.set_spin(LANE_SPIN_US)
    row = dict(batch=batch, ring=ring, variant=variant, quantization=quantization or "bf16", strategy=p.strategy,
               split=[list(x) for x in p.split],
               cpu_groups=len(p.cpu), streamed_groups=len(p.streamed), slot_MiB=p.slot_bytes / 2**20,
               measured_step_ms=1e3 * step, predicted_step_ms=1e3 * pred.step_time,
               profiled_step_ms=tl["span_ms"] / 2, copy_busy_pct=tl["copy_busy_pct"],
               predicted_copy_busy_pct=100 * pred.copy_busy,
               lane_group_ms=statistics.median(lane) if lane else None,
               host_fn_ms=1e3 * statistics.median(host_fn) if host_fn else None,
               host_fn_GBps=(sum(sizes[n] for n in p.cpu) / len(p.cpu) / statistics.median(host_fn) / 1e9
                             if host_fn and p.cpu else None),
               predicted_lane_group_ms=1e3 * predicted_lane if predicted_lane else None,
               gpu_side_ms=1e3 * step - len(p.cpu) * statistics.median(lane) if lane else None,   # the rest of the step
               predicted_gpu_side_ms=1e3 * (pred.step_time - pred.host_compute) if p.cpu else None,
               copy_GBps=statistics.median(n / (ms * 1e6) for n, ms in copies) if copies else None,
               predicted_copy_GBps=predicted_copy / 1e9 if predicted_copy else None,
               stall_ms_by_group={k: round(v, 3) for k, v in sorted(tl["stall_ms_by_group"].items(),
                                                                    key=lambda kv: -kv[1])[:6]},
               lane_threads=rt.engine.cpu_lane.host_threads if rt.engine.cpu_lane is not None else None,
               **_rates(p.cost))
    rt.close()
    return row


def _rates(cost) -> dict:
    """The calibrated rates the plan used (GB/s): the CPU beside copies and alone, the copies beside the CPU."""
    if cost is None or not cost.cpu_rate:
        return {}
    return dict(cpu_beside_GBps=cost.cpu_rate / 1e9, cpu_alone_GBps=(cost.cpu_rate_alone or cost.cpu_rate) / 1e9,
                h2d_beside_GBps=(cost.h2d_beside_cpu or cost.h2d_bandwidth) / 1e9,
                gpu_TBps=(cost.gpu_rate or cost.hbm_bandwidth) / 1e12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rings", default="3")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--variants", default="default", help="comma list: default, blocking-sync, threads=N, spin=US, placement=lane|lane-split")
    a = ap.parse_args()
    path = make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), LAYERS)
    cfg = ModelConfig.from_file(path / "config.json")
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        for ring, variant in ((int(r), v) for r in a.rings.split(",") for v in a.variants.split(",")):
            try:
                rows.append(one(path, cfg, batch, ring, a.quantization, variant))
            except Exception as e:  # noqa: BLE001 - keep the other rows
                rows.append(dict(batch=batch, ring=ring, variant=variant, error=f"{type(e).__name__}: {e}"[:400]))
            print(json.dumps(rows[-1]), flush=True)
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "lane_timeline.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
