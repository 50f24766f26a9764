"""Where a resident decode step's time goes: per-kernel GPU time of captured-graph replays (torch.profiler).

    python3 tools/profile_step.py [--layers 8] [--formats bf16,int8,fp8,int4] [--default] [--out DIR]

Builds the 8B-shaped random checkpoint (graphrt.bench.run.make_bench_model), loads it fully resident in
each format, captures the batch-1 graph and profiles 20 replays. Prints, per format, the step time (CUDA
events, no profiler), the number of kernels per step and the top kernels by GPU time per step. With
--default, the same for the default model (GRAPHRT_DEFAULT_GGUF or fetched). Writes profile.json to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from graphrt.bench.run import cuda_median, make_bench_model, measure_limits, resident_read_bytes
from graphrt.runtime import Runtime

STEPS = 20


def profile_runtime(rt: Runtime, label: str, top: int = 14) -> dict:
    g = rt.capture(1)
    g.prefill(torch.randint(3, rt.config.vocab_size, (1, 16)))
    for _ in range(5):
        g.step()
    step_s = statistics.median(cuda_median(lambda: [g.step() for _ in range(STEPS)], 1) / STEPS for _ in range(5))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            g.step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        rec = per_name[ev.name[:90]]
        rec[0] += 1
        rec[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    read = resident_read_bytes(rt.placement, rt.config.tie_word_embeddings)
    hbm = measure_limits()["hbm_GBps"] * 1e9
    kernels = sorted(((n, c / STEPS, us / STEPS) for n, (c, us) in per_name.items()), key=lambda r: -r[2])
    busy = sum(r[2] for r in kernels)
    count = sum(r[1] for r in kernels)
    print(f"\n## {label}: step {1e3 * step_s:.3f} ms ({1 / step_s:.1f} tok/s); {count:.0f} kernels/step, "
          f"GPU busy {busy / 1e3:.3f} ms/step; reads {read / 1e9:.2f} GB: {100 * read / hbm / step_s:.1f}% of "
          f"the HBM roofline ({hbm / 1e9:.0f} GB/s device-to-device)")
    for name, c, us in kernels[:top]:
        print(f"  {us:8.1f} us  x{c:5.1f}  {name}")
    return dict(label=label, step_ms=1e3 * step_s, kernels_per_step=count, busy_ms=busy / 1e3, read_GB=read / 1e9,
                hbm_GBps=hbm / 1e9, pct_hbm_roofline=100 * read / hbm / step_s,
                kernels=[dict(name=n, per_step=c, us=us) for n, c, us in kernels])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--formats", default="bf16,int8,fp8,int4")
    ap.add_argument("--default", action="store_true", help="also profile the default model")
    ap.add_argument("--small", default="", help="the default model's shape with random weights, e.g. "
                    "'bfloat16:none,bfloat16:int4,float32:int4' (compute dtype:quantization)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-profile"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    path = make_bench_model(Path(f"/tmp/graphrt-bench/llama8b-{a.layers}"), a.layers) if a.formats else None
    for fmt in filter(None, a.formats.split(",")):
        rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", max_seq_len=256, prefill_chunk=64,
                                     quantization=None if fmt == "bf16" else fmt)
        results.append(profile_runtime(rt, f"8B shape, {a.layers} layers, {fmt}, resident"))
        rt.close()
        torch.cuda.empty_cache()
    if a.small:
        from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint
        small = Path("/tmp/graphrt-bench/smollm2-shape")
        if not (small / "config.json").is_file():
            cfg = make_config(**PRESETS["smollm2-135m"], dtype="float32")
            write_checkpoint(small, cfg, random_tensors(cfg, 0, torch.float32, device="cuda"))
        for item in a.small.split(","):
            dtype, quant = item.split(":")
            rt = Runtime.from_pretrained(small, device="cuda", dtype=dtype, max_seq_len=256,
                                         quantization=None if quant == "none" else quant)
            results.append(profile_runtime(rt, f"default model's shape, {dtype}, {quant}, resident"))
            rt.close()
            torch.cuda.empty_cache()
    if a.default:
        from graphrt.default_model import fetch_default
        rt = Runtime.from_pretrained(fetch_default(), device="cuda", dtype="bfloat16", max_seq_len=256)
        results.append(profile_runtime(rt, "default model (GGUF), resident"))
        rt.close()
    (a.out / "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
