"""Where a captured speculative round's time goes (issue 12): per-kernel GPU time of rounds, against plain steps.

    python3 tools/profile_round.py [--dtype float32] [--k 4] [--ring 3] [--out DIR]

The default model's shape with random weights (the "smollm2-135m" preset), every layer streamed (the smallest
budget), batch 1; the self-int4 draft. Profiles one `generate` of 64 tokens with captured rounds and one plain
(graph) `generate`, and prints per round (per step) the GPU time of the top kernels and copies, the wall time, and
from the trace how busy the compute kernels and the copies kept the GPU (busy: the union of their intervals) and
the kernels' count. Then the same for one step of the draft alone (its own plain graph decode). Writes
profile_round.json.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from graphrt import Runtime
from graphrt.bench.run import budgets_for
from graphrt.exec.speculative import SpecStats
from graphrt.speculative import Speculative
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint


def busy(trace: Path, per: int) -> dict:
    """Per round (step), from the chrome trace: the span of GPU activity, the union of kernel intervals and of
    copy intervals, and the number of kernels (us)."""
    events = json.loads(trace.read_text())["traceEvents"]
    out = {}
    for label, cats in (("kernels", {"kernel"}), ("copies", {"gpu_memcpy"})):
        spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") in cats)
        total, end = 0.0, None
        for a, b in spans:
            if end is None or a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        out[f"{label}_busy_us"] = total / per
        out[f"{label}_count"] = len(spans) / per
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if gpu:
        out["span_us"] = (max(e["ts"] + e.get("dur", 0) for e in gpu) - min(e["ts"] for e in gpu)) / per
    return out


def kernels(fn, per: int, top: int = 24, trace: Path | None = None) -> tuple[float, list]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    by_name: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            by_name[ev.name[:90]][0] += 1
            by_name[ev.name[:90]][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = sorted(((v[1] / per, v[0] / per, k) for k, v in by_name.items()), reverse=True)[:top]
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ring", type=int, default=3, help="ring slots of the streamed plan")
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-profile-round"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = Path("/tmp/graphrt-bench/smollm2-shape")
    if not (path / "config.json").is_file():
        cfg = make_config(**PRESETS["smollm2-135m"], dtype="float32")
        write_checkpoint(path, cfg, random_tensors(cfg, 0, torch.float32, device="cuda"))
    budget = budgets_for(path, 1, a.ring, 2, 256, max_seq_len=512, dtype=a.dtype)[0]
    rt = Runtime.from_pretrained(path, device="cuda", dtype=a.dtype, gpu_budget=budget, ring_depth=a.ring, max_seq_len=512,
                                 stream_unit="layer")
    ids = [list(range(5, 45))]
    spec = Speculative("self-int4", k=a.k)
    rt.generate(ids, 16)
    rt.generate(ids, 16, speculative=spec)
    stats = SpecStats()
    res = {}
    trace = a.out / "trace.json"

    def unprofiled_ms(fn, repeats: int = 5) -> float:   # the profiler's tracing slows small kernels in graphs
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    wall, rows = kernels(lambda: rt.generate(ids, 64), 64, trace=trace)
    res["plain"] = dict(wall_ms_per_token=1e3 * wall / 64, unprofiled_ms_per_token=unprofiled_ms(
        lambda: rt.generate(ids, 64)) / 64, **busy(trace, 64), per_step=rows)
    wall, rows = kernels(lambda: rt.generate(ids, 64, speculative=spec, speculative_stats=stats), 1, trace=trace)
    rounds = stats.rounds
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"]
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    # the whole speculative generate: (start, duration, stream, name) of every GPU activity
    (a.out / "round_timeline.json").write_text(json.dumps(
        [(e["ts"], e.get("dur", 0), e["args"].get("stream"), e["name"][:24]) for e in events]))
    res["spec"] = dict(rounds=rounds, tokens_per_pass=stats.tokens_per_pass, wall_ms=1e3 * wall,
                       unprofiled_ms=unprofiled_ms(lambda: rt.generate(ids, 64, speculative=spec)),
                       **busy(trace, rounds), per_round=[(us / rounds, n / rounds, name) for us, n, name in rows])
    draft = next(iter(rt.speculation.drafts.values()))      # the self-int4 runtime, fully resident
    draft.generate(ids, 16)
    wall, rows = kernels(lambda: draft.generate(ids, 64), 64, trace=trace)
    # the draft's step: 64 tokens less 8 (the prompt and the first tokens cancel), per token, unprofiled
    per_step = (unprofiled_ms(lambda: draft.generate(ids, 64)) - unprofiled_ms(lambda: draft.generate(ids, 8))) / 56
    res["draft"] = dict(wall_ms_per_token=1e3 * wall / 64, unprofiled_ms_per_step=per_step,
                        prompt_ms=unprofiled_ms(lambda: draft.generate(ids, 1)),
                        target_prompt_ms=unprofiled_ms(lambda: rt.generate(ids, 1)), **busy(trace, 64),
                        per_step=rows)
    trace.unlink()
    for label, r in res.items():
        print(f"## {label}: " + json.dumps({k: v for k, v in r.items() if not k.startswith("per_")}))
        for us, n, name in r.get("per_step", r.get("per_round", [])):
            print(f"  {us:9.1f} us  x{n:6.1f}  {name}")
    (a.out / "profile_round.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
