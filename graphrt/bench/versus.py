"""`graphrt bench --only peer`: graphrt beside llama.cpp on one GPU: the same 16-layer Llama-3.1-8B-shaped model,
every weight on the GPU and "split" (the budget that leaves HOST_LAYERS of 16 layers' weights in host memory).

graphrt rows (graph path): decode at batch 1 for bf16, int8 and int4 (quantized on load), on the GPU, split
(streaming only) and split+cpu (the same budget, the planner free to use the CPU lane); decode at batch 4, 8 and
16 split and split+cpu (bf16); prefill of a 4096-token prompt on the GPU, split and split+cpu (bf16). The peer
(peer.py, llama.cpp built by tools/llamacpp/build.sh) runs the same model as F16, Q8_0 and Q4_K_M GGUFs. Writes
versus.json and versus.md (both systems, one table; ratios are graphrt / llama.cpp from this run).
"""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..plan.calibrate import clear_cache
from ..plan.placement import BudgetError, plan_placement
from ..runtime import Runtime
from ..weights.formats.policy import quantization_policy
from .quant import step_time
from .run import make_bench_model, measure_limits

LAYERS, HOST_LAYERS, RING = 16, 8, 3
PEER_FORMAT = {"bf16": "F16", "int8": "Q8_0", "int4": "Q4_K_M"}


def split_budget(cfg: ModelConfig, quantization: str | None, batch: int, max_seq_len: int,
                 host_layers: int = HOST_LAYERS) -> int:
    """The smallest GPU budget whose plan streams at most `host_layers` layers (whole layers, RING slots)."""
    policy = quantization_policy(quantization, torch.bfloat16, torch.device("cuda"))
    streamed = lambda b: len(plan_placement(cfg, b, RING, batch, max_seq_len, policy, stream_unit="layer",  # noqa: E731
                                            fused_attention=True).streamed)
    lo, hi = 1 << 30, 200 << 30
    while hi - lo > 16 << 20:
        mid = (lo + hi) // 2
        try:
            ok = streamed(mid) <= host_layers
        except BudgetError:     # below the plan's minimum
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi


def _runtime(path: Path, quantization: str | None, budget: int | None, batch: int, max_seq_len: int,
             cpu_lane: bool = False, lane_options: dict | None = None) -> Runtime:
    """Streaming-only plans stream whole layers; with the CPU lane the planner chooses (MLP groups may go to
    the CPU, which needs attention/MLP groups). lane_options: more RuntimeOptions for the lane's runtimes."""
    gc.collect()
    torch.cuda.empty_cache()
    if cpu_lane:   # the lane calibrates at this load, as a first load does (the host's rates drift between rows)
        clear_cache()
    kw = {"gpu_budget": budget} if budget else {}
    if cpu_lane and lane_options:
        kw.update(lane_options)
    return Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", quantization=quantization,
                                   max_batch_size=batch, max_seq_len=max_seq_len, ring_depth=RING,
                                   stream_unit="auto" if cpu_lane else "layer", cpu_lane=cpu_lane, **kw)


def prefill_time(rt: Runtime, tokens: int) -> float:
    """Seconds for one prompt of `tokens` tokens (after one warm-up prompt of the same length)."""
    ids = torch.randint(3, rt.config.vocab_size, (1, tokens))
    for _ in range(2):
        rt.engine.reset()
        torch.cuda.synchronize()
        t = time.perf_counter()
        rt.engine.prefill(ids, [tokens])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return seconds


def host_limit(rt: Runtime, batch: int, cpu_in_step: float = 0.0) -> dict:
    """The step's host-memory limit: the bytes that do not live on the GPU over the H2D bandwidth (measured
    now) or, with a CPU lane, over the two rates measured together: the CPU's calibrated rate with copies running
    beside it (cycling as many whole MLP groups as hold the plan's CPU-lane bytes), or the rate the lane reached in
    the measured steps (`cpu_in_step`, bytes/s) where that is higher, plus the copies' rate with the CPU computing
    beside them (the two-lane limit). The higher of the two CPU rates: where the copy engine idles part of a step
    the CPU reads DRAM faster than beside copies (one H100 run at d11c5ac: 120 GB/s in the step against 100
    calibrated, a step above the limit of the calibrated rates), and a limit under what was measured is none."""
    from ..plan.calibrate import cpu_rate, h2d_beside_cpu, working_groups
    from ..weights.sources import weight_policy
    p = rt.placement
    h2d = measure_limits()["h2d_GBps"] * 1e9
    rate = together = 0.0
    if p.cpu:
        policy = weight_policy(rt.source, rt.options.quantization, rt.dtype, torch.device("cpu"))
        rate = cpu_rate(rt.local_config, policy, rt.options.max_batch_size, concurrent_h2d=True,   # measured by the
                        groups=working_groups(rt.local_config, policy, p.cpu_bytes))   # load: at the plan's bytes
        together, rate = rate, max(rate, cpu_in_step)
        h2d = min(h2d, h2d_beside_cpu(rt.local_config, policy, rt.options.max_batch_size))
    host = p.streamed_bytes + p.cpu_bytes
    return dict(h2d_GBps=h2d / 1e9, cpu_rate_GBps=rate / 1e9, cpu_together_GBps=together / 1e9, host_GB=host / 1e9,
                limit_tokens_per_s=batch * (h2d + rate) / host)


def rates_after(rt: Runtime) -> dict:
    """The CPU lane's rate beside copies (at the plan's working set) and the copies' rate beside the lane, measured
    afresh right after a row's timed steps: whether the lane's in-step shortfall against its load-time calibration
    is the host drifting since the load (these move with it) or the step itself (these stay at the load's)."""
    from ..plan.calibrate import cpu_rate, h2d_beside_cpu, working_groups
    from ..weights.sources import weight_policy
    policy = weight_policy(rt.source, rt.options.quantization, rt.dtype, torch.device("cpu"))
    cfg, batch = rt.local_config, rt.options.max_batch_size
    cpu = cpu_rate(cfg, policy, batch, concurrent_h2d=True, use_cache=False,
                   groups=working_groups(cfg, policy, rt.placement.cpu_bytes))
    return dict(cpu_rate_after_GBps=cpu / 1e9, h2d_beside_after_GBps=h2d_beside_cpu(cfg, policy, batch, False) / 1e9)


def graphrt_rows(path: Path, keep: Path | None = None, lane_options: dict | None = None) -> list[dict]:
    """Every graphrt row. With `keep`, rows are saved there as they come and rows already there are not run
    again (a device call that ran out of time resumes); a row that fails is kept with its error. lane_options:
    more RuntimeOptions for the rows with the CPU lane (e.g. lane_nodes="host")."""
    cfg = ModelConfig.from_file(path / "config.json")
    rows = json.loads(keep.read_text()) if keep is not None and keep.exists() else []
    done = {(r["format"], r["placement"], r["test"], r["batch"]) for r in rows}

    def row(fmt: str, place: str, test: str, batch: int, load, measure) -> None:
        """load() -> Runtime; measure(rt) -> tokens/s."""
        if (fmt, place, test, batch) in done:
            return
        r = dict(system="graphrt", format=fmt, placement=place, test=test, batch=batch)
        rt = None
        try:
            rt = load()
            lane = rt.engine.cpu_lane
            if lane is not None:
                lane.start_trace()   # each host function's start and end while the step is measured
            r["tokens_per_s"] = measure(rt)
            p = rt.placement
            spans = lane.stop_trace() if lane is not None else []
            if spans and p.cpu:
                steps = len(spans) / len(p.cpu)   # the lane's bytes per step over its time per step
                r.update(cpu_in_step_GBps=p.cpu_bytes * steps / sum(e - s for s, e in spans) / 1e9,
                         cpu_calibrated_GBps=p.cost.cpu_rate / 1e9 if p.cost else None,
                         cpu_first_replays_GBps=rt.lane_in_step_rate / 1e9 if rt.lane_in_step_rate else None)
            pred = p.prediction.step_time if p.prediction is not None and p.prediction.step_time else None
            r.update(host_limit(rt, batch, 1e9 * r.get("cpu_in_step_GBps", 0.0))
                     if test == "decode" and (p.streamed or p.cpu) else {})
            if test == "decode" and p.cpu:   # the two rates measured again now (the limit's are the load's)
                r.update(rates_after(rt))
            r.update(streamed_layers=len({g.layer for g in p.groups if g.layer is not None and g.name not in p.resident}),
                     streamed_GB=p.streamed_bytes / 1e9, cpu_GB=p.cpu_bytes / 1e9, cpu_groups=len(p.cpu),
                     split_mlps=len(p.split),
                     budget_GiB=p.budget / 2**30, plan=p.describe(), torch_threads=torch.get_num_threads(),
                     lane_threads=rt.engine.cpu_lane.host_threads if rt.engine.cpu_lane is not None else None,
                     predicted_tokens_per_s=batch / pred if pred and test == "decode" else None)
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            r["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            if rt is not None:
                rt.close()
        rows.append(r)
        print(json.dumps(r), flush=True)
        if keep is not None:
            keep.write_text(json.dumps(rows, indent=1))

    for fmt, q in (("bf16", None), ("int8", "int8"), ("int4", "int4")):
        for place in ("gpu", "split", "split+cpu"):
            budget = (lambda q=q: split_budget(cfg, q, 1, 512)) if place != "gpu" else (lambda: None)
            row(fmt, place, "decode", 1,
                lambda q=q, b=budget, c=place == "split+cpu": _runtime(path, q, b(), 1, 512, c, lane_options),
                lambda rt: 1 / step_time(rt))
    for batch, place in [(b, p) for b in (4, 8, 16) for p in ("split", "split+cpu")]:
        row("bf16", place, "decode", batch,
            lambda b=batch, c=place == "split+cpu": _runtime(path, None, split_budget(cfg, None, b, 512), b, 512,
                                                              c, lane_options),
            lambda rt, b=batch: b / step_time(rt, steps=24, repeats=5, batch=b, prompt=128))
    for place in ("gpu", "split", "split+cpu"):   # split+cpu: prompts stream the lane's groups (prompt plans)
        row("bf16", place, "prefill", 1,
            lambda pl=place: _runtime(path, None, split_budget(cfg, None, 1, 4352) if pl != "gpu" else None, 1, 4352,
                                      pl == "split+cpu", lane_options),
            lambda rt: 4096 / prefill_time(rt, 4096))
    return rows


def peer_rows(peer: dict) -> list[dict]:
    """llama.cpp's results as rows of the same shape as graphrt's."""
    rows = []
    back = {v: k for k, v in PEER_FORMAT.items()}
    for r in peer.get("runs", []):
        if "tokens_per_s" in r:
            rows.append(dict(system="llama.cpp", format=back[r["format"]], placement=r["placement"], test=r["test"],
                             batch=1, tokens_per_s=r["tokens_per_s"]))
    for b in peer.get("batched", []):
        for row in b.get("rows", []):
            rows.append(dict(system="llama.cpp", format=back[b["format"]], placement=b["placement"], test="decode",
                             batch=int(row["b"]), tokens_per_s=row["s_tg_tps"], batched_bench=True))
    return rows


def markdown(res: dict) -> str:
    mine = {(r["format"], r["placement"], r["test"], r["batch"]): r for r in res["graphrt"]}
    peer = {}
    for r in res["llama_cpp"]:  # batch 1 decode: llama-bench's figure (batched-bench's B=1 row is kept in json)
        peer.setdefault((r["format"], r["placement"], r["test"], r["batch"]), r)
        if r["placement"] == "split":  # graphrt's hybrid rows face the same llama.cpp split
            peer.setdefault((r["format"], "split+cpu", r["test"], r["batch"]), r)
    lines = [f"# graphrt vs llama.cpp: {res['device']}, torch {res['torch']}", "",
             f"Model: Llama-3.1-8B shape, {LAYERS} layers, random weights. split = the first {HOST_LAYERS} layers' "
             f"weights in host memory (graphrt: the smallest budget streaming <= {HOST_LAYERS} layers through "
             f"{RING} slots). Pinned H2D {res['limits']['h2d_GBps']:.1f} GB/s. llama.cpp: {res['peer_source']}.", "",
             "split+cpu = the same budget with graphrt's CPU lane (MLP groups computed on the CPU from host memory).", "",
             "limit = batch x (H2D bandwidth + the CPU lane's calibrated rate) / bytes not on the GPU (streamed and "
             "CPU-lane): the two-lane limit with the lane, the PCIe roofline without.", "",
             "plan's prediction: tokens/s (step error = measured step / predicted step - 1); with the lane, the rate "
             "the CPU computed its groups at in the measured steps, the rate the plan priced (the calibration, "
             "scaled where the lane ran >5% off it in the runtime's first replays: plan/in_step.py) and the "
             "calibration beside copies.", "",
             "| test | weights (graphrt / llama.cpp) | placement | batch | graphrt tok/s | plan's prediction | limit "
             "(% reached) | llama.cpp tok/s | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in mine.items():
        fmt, place, test, batch = key
        if "error" in r:
            lines.append(f"| {test} | {fmt} / {PEER_FORMAT[fmt]} | {place} | {batch} | failed: {r['error'][:120]} "
                         "| - | - | - | - |")
            continue
        p = peer.get(key)
        theirs = f"{p['tokens_per_s']:.1f}" if p else "not run"
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}" if p else "-"
        where = f"{r['streamed_layers']} layers in host memory" + (
            f", {r['cpu_groups']} MLPs on the CPU" if r.get("cpu_groups") else "") + (
            f" ({r['split_mlps']} split with the GPU)" if r.get("split_mlps") else "")
        pred = f"{r['predicted_tokens_per_s']:.1f}" if r.get("predicted_tokens_per_s") else "-"
        if r.get("predicted_tokens_per_s"):
            pred += f" ({100 * (r['predicted_tokens_per_s'] / r['tokens_per_s'] - 1):+.1f}%)"   # step error
        if r.get("cpu_in_step_GBps") and r.get("cpu_calibrated_GBps"):
            pred += (f"; CPU {r['cpu_in_step_GBps']:.0f} in the step / {r['cpu_calibrated_GBps']:.0f} planned GB/s"
                     + (f" ({r['cpu_together_GBps']:.0f} calibrated beside copies)" if r.get("cpu_together_GBps")
                        else ""))
        limit = (f"{r['limit_tokens_per_s']:.1f} ({100 * r['tokens_per_s'] / r['limit_tokens_per_s']:.0f}%)"
                 if r.get("limit_tokens_per_s") else "-")
        lines.append(f"| {test} | {fmt} / {PEER_FORMAT[fmt]} | {place} ({where}) | {batch} | "
                     f"{r['tokens_per_s']:.1f} | {pred} | {limit} | {theirs} | {ratio} |")
    if res.get("peer_errors"):
        lines += ["", "llama.cpp errors:", ""] + [f"- {e}" for e in res["peer_errors"]]
    return "\n".join(lines) + "\n"


def run_versus(out: Path, model: Path | None = None, peer_bin: Path | None = None, threads: int | None = None,
               graphrt_json: Path | None = None) -> dict:
    """graphrt's rows (or those saved in `graphrt_json` by an earlier call), then the peer, then the table."""
    from .peer import KEEP, run_peer
    out.mkdir(parents=True, exist_ok=True)
    path = model or make_bench_model(Path("/tmp/graphrt-bench/llama8b-16"), LAYERS)
    limits = measure_limits()
    mine = json.loads(graphrt_json.read_text()) if graphrt_json else graphrt_rows(path)
    (out / "versus_graphrt.json").write_text(json.dumps(mine, indent=1))
    peer = run_peer(path, out, peer_bin or KEEP / "llama.cpp" / "build" / "bin", threads=threads,
                    host_layers=HOST_LAYERS, reps=3)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, limits=limits, graphrt=mine,
               llama_cpp=peer_rows(peer), peer_source=peer.get("llama_cpp", "unknown"), peer_errors=peer["errors"])
    (out / "versus.json").write_text(json.dumps(res, indent=1))
    (out / "versus.md").write_text(markdown(res))
    print(markdown(res))
    return res
