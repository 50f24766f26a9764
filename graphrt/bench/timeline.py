"""Timeline of decode steps measured inside the CUDA graph.

A profiling variant of the step graph is captured with timing events (`external=True`, so they become
graph nodes) around every copy and compute; consecutive steps are replayed back to back, so the
timeline also shows the boundary between two tokens.
"""
from __future__ import annotations

import torch

from ..runtime import Runtime


def measure_timeline(rt: Runtime, batch_size: int = 1, num_steps: int = 2, prompt_len: int = 16) -> dict:
    """Returns {"ops": [...], "copy_busy_pct", "span_ms", "stall_ms_by_group", "max_copy_gap_ms"}."""
    g = rt.capture(batch_size)
    g.prefill(torch.randint(3, rt.config.vocab_size, (batch_size, prompt_len)))
    g.step()  # the ring is now in steady state
    engine, cache, graphs = rt.engine, rt.graph_cache, []
    for i in range(num_steps):
        phase = (engine.ring_step + i) % len(engine.plans)
        ctx = engine.context(g.length + i)
        engine.executor.trace = []
        begin, end = (torch.cuda.Event(enable_timing=True, external=True) for _ in range(2))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=cache.pool, stream=cache.stream, capture_error_mode="global"):
            begin.record()
            cache.step_body(g.bucket, phase, ctx, g.greedy)
            end.record()
        graphs.append((graph, begin, end, engine.executor.trace))
        engine.executor.trace = None
    for graph, *_ in graphs:
        graph.replay()
        engine.ring_step += 1
        g.length += 1
    torch.cuda.synchronize()
    t0 = graphs[0][1]
    ops = []
    for step, (_, begin, end, trace) in enumerate(graphs):
        ops.append(dict(step=step, stream="compute", kind="step", group="step",
                        start=t0.elapsed_time(begin), end=t0.elapsed_time(end)))
        for op, a, b in trace:
            ops.append(dict(step=step, stream=op.stream, kind=op.kind, group=op.group, slot=op.slot,
                            start=t0.elapsed_time(a), end=t0.elapsed_time(b)))
    return summarize(ops)


def summarize(ops: list[dict]) -> dict:
    steps = [o for o in ops if o["kind"] == "step"]
    span = steps[-1]["end"] - steps[0]["start"]
    copies = sorted((o for o in ops if o["kind"] == "copy"), key=lambda o: o["start"])
    computes = sorted((o for o in ops if o["kind"] == "compute"), key=lambda o: o["start"])
    busy = sum(o["end"] - o["start"] for o in copies)
    gaps = [b["start"] - a["end"] for a, b in zip(copies, copies[1:])]
    stall: dict[str, float] = {}
    for a, b in zip(computes, computes[1:]):
        stall[b["group"]] = stall.get(b["group"], 0.0) + max(0.0, b["start"] - a["end"]) / len(steps)
    first_copy = copies[0]["start"] if copies else 0.0
    covered = (copies[-1]["end"] - first_copy) if copies else 0.0
    return dict(ops=ops, span_ms=span, copy_busy_pct=100 * busy / span if span else 0.0,
                copy_busy_while_copying_pct=100 * busy / covered if covered else 0.0,
                max_copy_gap_ms=max(gaps, default=0.0), stall_ms_by_group=stall)


def plot_timeline(tl: dict, path, title: str = "") -> None:
    """Gantt chart, one row per stream (needs matplotlib: the `plot` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"copy": 1, "compute": 0}
    fig, ax = plt.subplots(figsize=(14, 3.2))
    colors = {"copy": "tab:green", "compute": "tab:blue"}
    for o in tl["ops"]:
        if o["kind"] == "step":
            ax.axvline(o["start"], color="k", lw=0.8, ls="--")
            ax.axvline(o["end"], color="k", lw=0.8, ls=":")
            continue
        ax.barh(rows[o["stream"]], o["end"] - o["start"], left=o["start"], height=0.6,
                color=colors[o["kind"]], edgecolor="white", linewidth=0.5)
        if o["end"] - o["start"] > 0.04 * tl["span_ms"]:
            ax.text((o["start"] + o["end"]) / 2, rows[o["stream"]], o["group"], ha="center", va="center",
                    fontsize=7, color="white")
    ax.set_yticks([0, 1], ["compute stream", "copy stream"])
    ax.set_xlabel("ms (dashed: step start, dotted: step end)")
    ax.set_title(f"{title}  copy engine busy {tl['copy_busy_pct']:.1f}% of {tl['span_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
