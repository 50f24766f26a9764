#!/usr/bin/env python3
"""Decode benchmark on one GPU, against physical limits measured in the same run.

1. Limits: pinned host-to-device bandwidth, device-memory (HBM) bandwidth.
2. A Llama-3.1-8B-shaped checkpoint (random bf16 weights, --layers layers) with every layer streamed:
   step time of the graph and of the eager executor at batch 1 and 16, against streamed bytes / H2D
   bandwidth, and the simulator's prediction from the measured bandwidths; layer vs attn/mlp groups.
3. The default model fully resident: graph vs eager time per token.
4. Host time to issue one `DecodeGraph.step()` for 8 and 80 layers.
Writes decode.json and decode.md under --out and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


from graphrt import Runtime
from graphrt.bench.run import make_bench_model, measure_limits
from graphrt.plan.cost import CostModel
from graphrt.plan.simulator import simulate
from graphrt.weights.synthetic import make_config, random_tensors, write_checkpoint


def streamed_runtime(path: Path, ring_depth: int, batch: int, unit: str = "layer") -> Runtime:
    """Every layer streams; embedding and LM head (1 GiB each at 8B shapes) stay resident."""
    probe = Runtime.from_pretrained(path, device="cpu", max_batch_size=batch, max_seq_len=256,
                                    stream_unit=unit, dtype="bfloat16")
    groups = probe.placement.groups
    mem = probe.placement.memory
    fixed = sum(mem.values()) - mem["weights"]
    slot = max(g.nbytes for g in groups if g.kind not in ("embed", "head"))
    ends = sum(g.nbytes for g in groups if g.kind in ("embed", "head"))
    del probe
    return Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", max_batch_size=batch, max_seq_len=256,
                                   gpu_budget=fixed + ring_depth * slot + ends, ring_depth=ring_depth,
                                   stream_unit=unit)


def graph_step_time(rt: Runtime, batch: int, steps: int = 20, repeats: int = 3) -> float:
    """Median over `repeats` runs of the mean step time of `steps` back-to-back replays."""
    g = rt.capture(batch)
    g.prefill(torch.randint(3, 1000, (batch, 32)))
    return statistics.median(_graph_steps(g, steps) for _ in range(repeats))


def _graph_steps(g, steps: int) -> float:
    for _ in range(3):
        g.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        g.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def eager_step_time(rt: Runtime, batch: int, steps: int = 20) -> float:
    ids = torch.randint(3, 1000, (batch, 32)).cuda()
    gen = rt.decode_eager(ids, steps + 4)
    for _ in range(4):
        next(gen)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in gen:
        pass
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def predicted_step(rt: Runtime, h2d: float, hbm: float, batch: int) -> float:
    cost = CostModel(h2d_bandwidth=h2d, hbm_bandwidth=hbm, batch_size=batch)
    by_name = {g.name: g for g in rt.placement.groups}
    return simulate(rt.engine.plans, rt.engine.prologue, copy_time=lambda n: cost.copy_time(by_name[n]),
                    compute_time=lambda n: cost.compute_time(by_name[n]), step_overhead=5e-6).step_time


def eager_timeline(rt: Runtime, steps: int = 3) -> dict:
    """Timing events around every copy and compute of the eager executor (same plan as the graph):
    per-op start/end in ms for the last step, copy-engine busy fraction and the gaps between copies."""
    store = rt.engine.store
    marks: list[tuple[str, str, torch.cuda.Event, torch.cuda.Event]] = []
    copy_to_slot = store.copy_to_slot

    def timed_copy(group, slot):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        copy_to_slot(group, slot)
        b.record()
        marks.append(("copy", group, a, b))

    store.copy_to_slot = timed_copy
    ids = torch.randint(3, 1000, (1, 8)).cuda()
    try:
        gen = rt.decode_eager(ids, steps + 1)
        next(gen)
        marks.clear()
        t0 = torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in gen:
            pass
        torch.cuda.synchronize()
    finally:
        store.copy_to_slot = copy_to_slot
    ops = sorted(((k, g, t0.elapsed_time(a), t0.elapsed_time(b)) for k, g, a, b in marks), key=lambda x: x[2])
    span = ops[-1][3] - ops[0][2]
    busy = sum(e - s for k, _, s, e in ops if k == "copy")
    gaps = [ops[i + 1][2] - ops[i][3] for i in range(len(ops) - 1)]
    return dict(span_ms=span, copy_busy_pct=100 * busy / span, max_gap_ms=max(gaps, default=0.0),
                copies=[(g, round(s, 3), round(e, 3)) for _, g, s, e in ops[-12:]])


def host_step_us(path: Path, steps: int = 30) -> float:
    rt = Runtime.from_pretrained(path, device="cuda", max_seq_len=256)
    g = rt.capture(1)
    g.prefill(torch.randint(3, 200, (1, 8)))
    g.step()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()  # the GPU has caught up: the call cannot block on a full queue
        t = time.perf_counter()
        g.step()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--layers", type=int, default=8, help="layers of the 8B-shaped model (default 8)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/graphrt-bench"))
    ap.add_argument("--default-model", type=Path, default=ROOT / "weights" / "smollm2-135m-instruct")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    limits = measure_limits()
    h2d, hbm = limits["h2d_GBps"] * 1e9, limits["hbm_GBps"] * 1e9
    res["h2d_GBps"], res["hbm_GBps"] = h2d / 1e9, hbm / 1e9
    print(f"pinned H2D {h2d / 1e9:.1f} GB/s, HBM {hbm / 1e9:.0f} GB/s", flush=True)

    path = make_bench_model(a.work / "llama8b", a.layers)
    rows = []
    for unit in ("layer", "attn_mlp"):
        for batch in ((1, 16) if unit == "layer" else (1,)):
            rt = streamed_runtime(path, 3, batch, unit)
            h2d = measure_limits()["h2d_GBps"] * 1e9  # re-measured: the host's bandwidth drifts
            roof = rt.placement.streamed_bytes / h2d
            g = graph_step_time(rt, batch)
            e = eager_step_time(rt, batch)
            pred = predicted_step(rt, h2d, hbm, batch)
            if unit == "layer" and batch == 1:
                res["eager_copy_timeline"] = eager_timeline(rt)
                print("copy timeline:", res["eager_copy_timeline"], flush=True)
            rows.append(dict(model=f"llama-3.1-8b x{a.layers} layers, all layers streamed", unit=unit, batch=batch,
                             ring_depth=3, streamed_GB=rt.placement.streamed_bytes / 1e9, roofline_ms=roof * 1e3,
                             h2d_GBps=h2d / 1e9, graph_ms=g * 1e3, eager_ms=e * 1e3, graph_pct_of_h2d=100 * roof / g,
                             eager_pct_of_h2d=100 * roof / e, graph_over_roofline=g / roof,
                             predicted_ms=pred * 1e3, prediction_error_pct=100 * (pred - g) / g))
            print(rows[-1], flush=True)
            rt.close()
            del rt
            torch.cuda.empty_cache()
    for n in (2, 4, 6):
        rt = streamed_runtime(path, n, 1)
        h2d = measure_limits()["h2d_GBps"] * 1e9
        roof = rt.placement.streamed_bytes / h2d
        g = graph_step_time(rt, 1)
        rows.append(dict(model=f"llama-3.1-8b x{a.layers} layers, all layers streamed", unit="layer", batch=1,
                         ring_depth=n, streamed_GB=rt.placement.streamed_bytes / 1e9, roofline_ms=roof * 1e3,
                         h2d_GBps=h2d / 1e9,
                         graph_ms=g * 1e3, graph_pct_of_h2d=100 * roof / g, graph_over_roofline=g / roof))
        print(rows[-1], flush=True)
        rt.close()
        del rt
        torch.cuda.empty_cache()
    res["streaming"] = rows

    rt = Runtime.from_pretrained(a.default_model, device="cuda", dtype="bfloat16", max_seq_len=512)
    g, e = graph_step_time(rt, 1, 50), eager_step_time(rt, 1, 100)
    weights = sum(x.nbytes for x in rt.placement.groups)
    res["default_model"] = dict(graph_ms=g * 1e3, eager_ms=e * 1e3, speedup=e / g,
                                hbm_roofline_ms=weights / hbm * 1e3, graph_pct_of_hbm=100 * weights / hbm / g)
    print(res["default_model"], flush=True)
    del rt
    # Attention cost against context: one graph per context bucket, so a short sequence does not pay
    # for max_seq_len. Step time at ~50 tokens (bucket 64) vs ~3000 (bucket 4096), max_seq_len 4096.
    rt = Runtime.from_pretrained(a.default_model, device="cuda", dtype="bfloat16", max_seq_len=4096, max_batch_size=8)
    ctx = {}
    for batch in (1, 8):
        for prompt in (40, 3000):
            g = rt.capture(batch)
            t = time.perf_counter()
            g.prefill(torch.randint(3, 1000, (batch, prompt)))
            torch.cuda.synchronize()
            prefill_s = time.perf_counter() - t
            ctx[f"batch{batch}_len{prompt}"] = dict(step_ms=1e3 * _graph_steps(g, 20), prefill_ms=1e3 * prefill_s)
    res["context_buckets"] = ctx
    print("context buckets:", ctx, flush=True)
    del rt

    host = {}
    for layers in (8, 80):
        cfg = make_config(arch="LlamaForCausalLM", hidden=256, intermediate=704, layers=layers, heads=8, kv_heads=2,
                          vocab=1024)
        p = write_checkpoint(a.work / f"host{layers}", cfg, random_tensors(cfg))
        host[layers] = host_step_us(p)
    res["host_step_us"] = host
    print(f"host us per step(): {host}", flush=True)

    (a.out / "decode.json").write_text(json.dumps(res, indent=2))
    md = [f"# graphrt decode benchmark on {res['device']} (torch {res['torch']})", "",
          f"Measured limits: pinned H2D {res['h2d_GBps']:.1f} GB/s, HBM {res['hbm_GBps']:.0f} GB/s (read+write).", "",
          "| groups | batch | ring N | streamed GB/step | H2D GB/s (just before) | roofline ms | graph ms | % of H2D | eager ms | eager % | simulator ms (err) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eager = f"{r['eager_ms']:.2f} | {r['eager_pct_of_h2d']:.1f}" if "eager_ms" in r else "- | -"
        pred = f"{r['predicted_ms']:.2f} ({r['prediction_error_pct']:+.1f}%)" if "predicted_ms" in r else "-"
        md.append(f"| {r['unit']} | {r['batch']} | {r['ring_depth']} | {r['streamed_GB']:.2f} | {r['h2d_GBps']:.1f} | {r['roofline_ms']:.2f} | "
                  f"{r['graph_ms']:.2f} | {r['graph_pct_of_h2d']:.1f} | {eager} | {pred} |")
    d = res["default_model"]
    md += ["", f"Default model (SmolLM2-135M, bf16, resident, batch 1): graph {d['graph_ms']:.3f} ms/token, eager "
           f"{d['eager_ms']:.3f} ms/token, speedup {d['speedup']:.1f}x; HBM roofline {d['hbm_roofline_ms']:.3f} ms "
           f"({d['graph_pct_of_hbm']:.0f}% of it).", "",
           f"Host time per `step()` call (median): 8 layers {host[8]:.1f} us, 80 layers {host[80]:.1f} us.", "",
           "Default model, max_seq_len 4096, graph step time by sequence length (context bucket 64 vs 4096), "
           "and eager streamed prefill time of the prompt:", ""]
    md += [f"- {k}: step {v['step_ms']:.3f} ms, prefill {v['prefill_ms']:.1f} ms" for k, v in res["context_buckets"].items()]
    (a.out / "decode.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
