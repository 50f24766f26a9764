"""Host cost of a streamed decode step (issue 9): memcpy nodes against copy kernels (`copy_mode`).

    python3 tools/host_cost.py [--out DIR]

bf16 models, batch 1, graph path, the streamed ones with copy_mode="memcpy" and "kernel" (--modes):
  - the 16-layer Llama-3.1-8B shape all resident, and with 8 of its 16 layers streamed;
  - an 80-layer model of small layers (hidden 1024, MLP 2816) with 56 of its 80 layers streamed.
Per row: the host time of one `DecodeGraph.step()` with the GPU idle before the call (median of 30), the GPU
time per step back to back (CUDA events), and the wall time per token of a loop that reads each token back
before the next step (`.item()`): that loop's time beyond the GPU step is what the host adds when nothing
overlaps it. And the timeline of the shipped decode loop (`decode_graph`, the loop `Runtime.generate` runs: blocks
of 8 tokens read back while later replays are queued): CUDA events recorded on the stream just before and just
after each `step()`, so the GPU time between the end of replay i-1 and the start of replay i is the time the GPU
waited for the host. If the host never delays the GPU, each such gap is only the events' own cost (a few us).
Writes host_cost.json and host_cost.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from graphrt import Runtime
from graphrt.exec.decode import decode_graph
from graphrt.sampling import SamplingParams
from graphrt.bench.run import cuda_median, make_bench_model
from graphrt.weights.synthetic import make_config, random_tensors, write_checkpoint

SMALL = dict(arch="LlamaForCausalLM", hidden=1024, intermediate=2816, layers=80, heads=16, kv_heads=4, vocab=32000)


def small_model(out: Path) -> Path:
    if not (out / "config.json").is_file():
        cfg = make_config(**SMALL, dtype="bfloat16")
        write_checkpoint(out, cfg, random_tensors(cfg, 0, torch.bfloat16, device="cuda"))
    return out


def budget_streaming(path: Path, streamed_layers: int, **kw) -> int:
    """Fixed memory, embedding and head, 3 ring slots and the layers that stay resident."""
    p = Runtime.from_pretrained(path, device="cpu", dtype="bfloat16", gpu_budget=1 << 50, **kw).placement
    layers = [g.nbytes for g in p.groups if g.kind == "layer"]
    fixed = sum(p.memory.values()) - p.memory["weights"]
    ends = sum(g.nbytes for g in p.groups if g.kind in ("embed", "head"))
    return fixed + ends + 3 * max(layers) + sum(layers[: len(layers) - streamed_layers]) + (1 << 20)


class TimedGraph:
    """A DecodeGraph whose step() is bracketed by CUDA events (and timed on the host); the rest delegates."""

    def __init__(self, graph):
        self.graph, self.engine, self.marks = graph, graph.engine, []

    def prefill_padded(self, *args, **kwargs):
        return self.graph.prefill_padded(*args, **kwargs)

    def step(self) -> torch.Tensor:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        out = self.graph.step()
        host = time.perf_counter() - t0
        end.record()
        self.marks.append((start, end, host))
        return out


def timeline(rt: Runtime, tokens: int = 96) -> dict:
    """The shipped loop's GPU idle gaps between consecutive replays (see the module doc)."""
    timed = TimedGraph(rt.capture(1))
    ids = torch.randint(3, rt.config.vocab_size, (1, 16))
    for _ in decode_graph(timed, ids, [16], tokens, SamplingParams()):
        pass
    torch.cuda.synchronize()
    m = timed.marks[4:]   # the loop's steady state (the first replays follow the prefill's readback)
    gaps = [1e3 * a[1].elapsed_time(b[0]) for a, b in zip(m, m[1:])]
    steps = [a[0].elapsed_time(a[1]) for a in m]
    return dict(timeline_steps=len(m), gap_us_median=statistics.median(gaps), gap_us_max=max(gaps),
                gap_share_pct=100 * sum(gaps) / (1e3 * a_span(m)), step_ms_min=min(steps),
                host_us_per_step_in_loop=1e6 * statistics.median(x[2] for x in m))


def a_span(m) -> float:
    """ms from the first replay's start to the last one's end."""
    return m[0][0].elapsed_time(m[-1][1])


def measure(rt: Runtime) -> dict:
    g = rt.capture(1)
    g.prefill(torch.randint(3, rt.config.vocab_size, (1, 16)))
    for _ in range(3):
        g.step()
    host = []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.step()
        host.append(1e6 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    gpu = statistics.median(cuda_median(lambda: [g.step() for _ in range(16)], 1) / 16 for _ in range(3))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(32):
        g.step()[0].item()          # the token read back before the next step: nothing overlaps the launch
    synced = (time.perf_counter() - t0) / 32
    return dict(host_us_per_step=statistics.median(host), gpu_ms_per_step=1e3 * gpu, synced_ms_per_token=1e3 * synced,
                host_added_us=1e6 * (synced - gpu), **timeline(rt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-host-cost"))
    ap.add_argument("--modes", default="memcpy,kernel", help="copy modes to run, comma-separated")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    kw = dict(max_seq_len=256, prefill_chunk=64, stream_unit="layer")
    models = [("8B shape, all 16 layers resident", make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), 16), 0),
              ("8B shape, 8 of 16 layers streamed", make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), 16), 8),
              ("80 small layers, 56 streamed", small_model(Path("/tmp/graphrt-bench/small-80")), 56)]
    rows = []
    for label, path, streamed in models:
        budget = budget_streaming(path, streamed, **kw) if streamed else None
        for mode in a.modes.split(",") if streamed else ("memcpy",):
            rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", gpu_budget=budget, copy_mode=mode, **kw)
            row = dict(model=label, copy_mode=mode, streamed_groups=len(rt.placement.streamed),
                       streamed_GB=rt.placement.streamed_bytes / 1e9, **measure(rt))
            rows.append(row)
            print(json.dumps(row), flush=True)
            rt.close()
            del rt
            torch.cuda.empty_cache()
    (a.out / "host_cost.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                          torch=torch.__version__, rows=rows), indent=1))
    md = [f"# host cost of streamed steps: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
          "| model | copies | streamed groups | GB streamed | host us per step() | GPU ms per step | "
          "ms per token, synced each token | host adds (us) | decode loop: GPU idle between replays, median / max us "
          "(% of the run) |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['copy_mode']} | {r['streamed_groups']} | {r['streamed_GB']:.2f} | "
           f"{r['host_us_per_step']:.0f} | {r['gpu_ms_per_step']:.2f} | {r['synced_ms_per_token']:.2f} | "
           f"{r['host_added_us']:.0f} | {r['gap_us_median']:.1f} / {r['gap_us_max']:.1f} ({r['gap_share_pct']:.2f}%) |"
           for r in rows]
    (a.out / "host_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
