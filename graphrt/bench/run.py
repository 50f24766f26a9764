"""`graphrt bench`: every decode system measured in one run on one GPU, against measured limits.

Rows: graphrt graph; graphrt eager executor (same plan); eager with synchronous copies (no overlap);
the predecessor's scheme (prefetch depth 4, attention and MLP groups on two copy streams); Hugging Face
transformers resident where the model fits, transformers + accelerate CPU offload where it does not.
Sweeps: GPU budget (all streamed .. all resident), batch 1/8/32, ring depth 2..8. Writes bench.json,
bench.md, bench.png (tokens/s against budget) and timeline.png (one fully streamed step pair).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from ..runtime import Runtime
from ..weights.store import pinned_empty, unpin
from ..weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint


def cuda_median(fn, iters: int = 10) -> float:
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def measure_limits(nbytes: int = 2**30) -> dict:
    """Pinned H2D and HBM bandwidth (median of 10 copies each). Called again before every row: the
    PCIe bandwidth of a shared host drifts by a few percent within one run."""
    src, dst = pinned_empty(nbytes), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst.copy_(src, non_blocking=True)
    # the limit is the best of three medians: a single probe of a shared host's PCIe link reads low at times
    h2d = max(nbytes / cuda_median(lambda: dst.copy_(src, non_blocking=True)) for _ in range(3))
    unpin(src)
    dst = None  # free the device buffer before the HBM copy
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    hbm = 2 * nbytes / cuda_median(lambda: b.copy_(a))
    return {"h2d_GBps": h2d / 1e9, "hbm_GBps": hbm / 1e9}


REPEATS = 3


def _time_tokens(step, steps: int) -> tuple[float, float]:
    """(seconds per step, median host seconds per call): median over REPEATS windows of `steps`
    back-to-back calls, after 3 warm-up calls."""
    for _ in range(3):
        step()
    host, windows = [], []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            h = time.perf_counter()
            step()
            host.append(time.perf_counter() - h)
        torch.cuda.synchronize()
        windows.append((time.perf_counter() - t) / steps)
    return statistics.median(windows), statistics.median(host)


def run_graphrt(rt: Runtime, system: str, batch: int, steps: int) -> tuple[float, float]:
    ids = torch.randint(3, rt.config.vocab_size, (batch, 16))
    if system == "graph":
        g = rt.capture(batch)
        g.prefill(ids)
        return _time_tokens(g.step, steps)
    executor = rt.engine.executor
    executor.sync_copies = system == "eager-sync"
    if system == "predecessor":  # attention and MLP halves on two copy streams
        executor.split_copy_streams({g.name for g in rt.placement.groups if g.kind == "mlp"})
    gen = rt.decode_eager(ids, REPEATS * steps + 4)
    try:
        return _time_tokens(lambda: next(gen), steps)
    finally:
        executor.sync_copies = False
        executor.split_copy_streams(set())


def run_hf(path: Path, budget: int | None, batch: int, steps: int) -> tuple[float, float]:
    """transformers generate: resident (budget None) or accelerate offload at the same GPU budget."""
    from transformers import AutoModelForCausalLM
    kw = dict(dtype=torch.bfloat16)
    if budget is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kw).cuda()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map="auto",
                                                     max_memory={0: budget, "cpu": 200 * 2**30}, **kw)
    ids = torch.randint(3, model.config.vocab_size, (batch, 16), device="cuda")
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **gen)
        t = []
        for n in (1, steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen)
            torch.cuda.synchronize()
            t.append(time.perf_counter() - t0)
    del model
    torch.cuda.empty_cache()
    per_step = (t[1] - t[0]) / steps
    return per_step, per_step


def budgets_for(path: Path, batch: int, ring_depth: int, points: int, prefill_chunk: int,
                unit: str = "layer", max_seq_len: int = 256, dtype: str = "bfloat16") -> list[int]:
    """From the smallest budget (every layer streams) to the budget that holds every weight."""
    probe = Runtime.from_pretrained(path, device="cpu", dtype=dtype, max_batch_size=batch, max_seq_len=max_seq_len,
                                    prefill_chunk=prefill_chunk, gpu_budget=1 << 60, stream_unit=unit)
    mem, groups = probe.placement.memory, probe.placement.groups
    fixed = sum(mem.values()) - mem["weights"]
    slot = max(g.nbytes for g in groups if g.kind not in ("embed", "head"))
    ends = sum(g.nbytes for g in groups if g.kind in ("embed", "head"))
    low, high = fixed + ring_depth * slot + ends, fixed + mem["weights"]
    return [int(low + (high - low) * i / (points - 1)) for i in range(points)]


def resident_read_bytes(placement, tied: bool) -> int:
    """Bytes of resident weights one decode step reads: all of them except the embedding table, of which a step
    reads only its tokens' rows, unless the LM head reads it whole (tied embeddings)."""
    return sum(g.nbytes for g in placement.groups
               if g.name in placement.resident and (g.kind != "embed" or tied))


def row(system, rt_or_none, budget, batch, ring, per_step, host, limits, placement=None) -> dict:
    p = placement or (rt_or_none.placement if rt_or_none is not None else None)
    peak = torch.cuda.max_memory_allocated() / 2**30
    limits = measure_limits()  # right after the measurement it is compared with
    r = dict(system=system, budget_GiB=budget / 2**30 if budget else None, batch=batch, ring_depth=ring,
             h2d_GBps=limits["h2d_GBps"], ms_per_step=per_step * 1e3, tokens_per_s=batch / per_step, host_us_per_token=host * 1e6 / batch,
             peak_gpu_GiB=peak)
    if p is not None:
        stream_s = p.streamed_bytes / (limits["h2d_GBps"] * 1e9)
        tied = rt_or_none is not None and rt_or_none.config.tie_word_embeddings
        hbm_s = resident_read_bytes(p, tied) / (limits["hbm_GBps"] * 1e9)
        r.update(streamed_GB=p.streamed_bytes / 1e9, pct_stream_roofline=100 * stream_s / per_step if stream_s else None,
                 pct_hbm_roofline=100 * hbm_s / per_step, roofline_ms=1e3 * max(stream_s, hbm_s))
    print(json.dumps(r), flush=True)
    return r


def run_bench(a: argparse.Namespace) -> int:
    from .timeline import measure_timeline, plot_timeline
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    limits = measure_limits()
    print(f"limits: {limits}", flush=True)
    path = a.model or make_bench_model(Path("/tmp/graphrt-bench/llama8b"), a.layers)
    steps, chunk = (6 if a.quick else 12), 64
    rows = []

    def rt_for(budget, batch=1, ring=3, **kw):
        gc.collect()  # runtimes and their graphs reference each other: free the last one first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", max_batch_size=batch, max_seq_len=256,
                                       gpu_budget=budget, ring_depth=ring, prefill_chunk=chunk, **kw)

    budgets = budgets_for(path, 1, 3, 3 if a.quick else 5, chunk)
    for i, budget in enumerate(budgets):
        rt = rt_for(budget)
        for system in ("graph", "eager", "eager-sync"):
            torch.cuda.reset_peak_memory_stats()
            rows.append(row(system, rt, budget, 1, 3, *run_graphrt(rt, system, 1, steps), limits))
        placement = rt.placement
        del rt
        # the predecessor's 5 slots of MLP size may need more than the smallest budget: it gets its own minimum
        pre_budget = max(budget, budgets_for(path, 1, 5, 2, chunk, unit="attn_mlp")[0])
        pre = rt_for(pre_budget, ring=5, stream_unit="attn_mlp")
        if pre.placement.streamed:
            rows.append(row("predecessor", pre, pre_budget, 1, 5, *run_graphrt(pre, "predecessor", 1, steps), limits))
        del pre
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = not placement.streamed
        hf = run_hf(path, None if resident else budget, 1, max(2, steps // 4 if not resident else steps))
        rows.append(row("transformers" if resident else "transformers+offload", None, budget, 1, None, *hf,
                        limits, placement))
    mid = budgets[len(budgets) // 2]
    for batch in (8, 32):
        b = budgets_for(path, batch, 3, 3, chunk)[1]
        rt = rt_for(b, batch=batch)
        for system in ("graph", "eager"):
            torch.cuda.reset_peak_memory_stats()
            rows.append(row(system, rt, b, batch, 3, *run_graphrt(rt, system, batch, steps), limits))
        del rt
    for ring in range(2, 9):
        b = budgets_for(path, 1, ring, 2, chunk)[0]
        rt = rt_for(b, ring=ring)
        rows.append(row("graph", rt, b, 1, ring, *run_graphrt(rt, "graph", 1, steps), limits))
        del rt
    rt = rt_for(budgets[0])
    tl = measure_timeline(rt, 1, 2)
    del rt
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=str(path), limits=limits,
                  rows=rows, timeline={k: v for k, v in tl.items() if k != "ops"}, timeline_ops=tl["ops"], mid_budget=mid)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))
    try:
        plot_bench(result, out / "bench.png")
        plot_timeline(tl, out / "timeline.png", "fully streamed decode, 2 steps")
    except ImportError:
        print("matplotlib is not installed (pip install graphrt[plot]): no PNGs", flush=True)
    print(markdown(result))
    return 0


def make_bench_model(out: Path, layers: int) -> Path:
    if not (out / "config.json").is_file():
        cfg = make_config(**dict(PRESETS["llama-3.1-8b"], layers=layers), dtype="bfloat16", max_pos=8192)
        write_checkpoint(out, cfg, random_tensors(cfg, 0, torch.bfloat16, device="cuda"))
    return out


def markdown(res: dict) -> str:
    L = res["limits"]
    lines = [f"# graphrt bench: {res['device']}, torch {res['torch']}", "",
             f"Model: `{res['model']}`. Measured at the start: pinned H2D {L['h2d_GBps']:.1f} GB/s, HBM "
             f"{L['hbm_GBps']:.0f} GB/s; each row's roofline uses the H2D bandwidth measured right after it.", "",
             "| system | budget GiB | batch | N | streamed GB | H2D GB/s | ms/step | tokens/s | % stream roofline | % HBM roofline | host us/token | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        lines.append(f"| {r['system']} | {f('budget_GiB', '{:.1f}')} | {r['batch']} | {f('ring_depth', '{}')} | "
                     f"{f('streamed_GB', '{:.2f}')} | {r['h2d_GBps']:.1f} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{f('pct_stream_roofline', '{:.1f}')} | {f('pct_hbm_roofline', '{:.1f}')} | "
                     f"{r['host_us_per_token']:.0f} | {r['peak_gpu_GiB']:.1f} |")
    t = res["timeline"]
    lines += ["", f"Timeline of two fully streamed steps (events inside the graph): copy engine busy "
              f"{t['copy_busy_pct']:.1f}% of {t['span_ms']:.1f} ms, largest gap between copies "
              f"{t['max_copy_gap_ms'] * 1e3:.0f} us."]
    return "\n".join(lines) + "\n"


def plot_bench(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in res["rows"] if r["batch"] == 1 and r["system"] != "graph" or
            (r["system"] == "graph" and r["batch"] == 1 and r["ring_depth"] == 3)]
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["budget_GiB"], r["tokens_per_s"]) for r in rows if r["system"] == system)
        pts = list(dict((x, y) for x, y in pts).items())
        ax.plot(*zip(*pts), marker="o", label=system)
    roof = sorted({(r["budget_GiB"], 1e3 / r["roofline_ms"]) for r in rows if r["system"] == "graph"})
    ax.plot(*zip(*roof), "k--", label="roofline (streamed/H2D, resident/HBM)")
    ax.set_xlabel("GPU budget (GiB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_yscale("log")
    ax.set_title(f"{res['device']}: {Path(res['model']).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
