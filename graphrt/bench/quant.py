"""`graphrt bench --only quant`: decode speed of each weight format, resident and streamed, in one run.

For bf16, int8, fp8 and int4 (quantized on load from the same bf16 checkpoint), batch 1, graph path:
  - resident: every weight on the GPU (the HBM roofline: the resident bytes a step reads, the embedding table
    excluded but for tied models, / measured HBM bandwidth);
  - streamed: the smallest budget of that format (embedding and head resident, every layer streamed
    through 3 slots): the PCIe roofline is that format's streamed bytes / measured H2D bandwidth.
Ratios are to the bf16 row of the same mode, measured in the same run. Also times each format's
linear at decode shapes (the kernels the formats choose). Writes quant.json and quant.md.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
from pathlib import Path

import torch

from ..config import ModelConfig
from ..plan.memory import essentials
from ..runtime import Runtime
from ..weights.formats.policy import int4_packing, quantization_policy
from ..weights.layout import model_groups
from .run import cuda_median, make_bench_model, measure_limits, resident_read_bytes

FORMATS = (None, "int8", "fp8", "int4")
MAX_SEQ_LEN, CHUNK, RING = 256, 64, 3


def all_streamed_budget(path: Path | ModelConfig, quantization: str | None, ring: int = RING) -> int:
    """Embedding and head resident, `ring` slots of one layer, KV and activations: every layer streams.
    `path`: a checkpoint directory or file, or the config itself (a tensor-parallel rank's, for example)."""
    cfg = path if isinstance(path, ModelConfig) else ModelConfig.from_file(path)
    groups = model_groups(cfg, quantization_policy(quantization, torch.bfloat16, torch.device("cuda")), "layer")
    fixed = sum(essentials(cfg, torch.bfloat16, 1, MAX_SEQ_LEN, CHUNK, fused_attention=True).values())
    layers = [g.nbytes for g in groups if g.kind == "layer"]
    ends = sum(g.nbytes for g in groups if g.kind in ("embed", "head"))
    return fixed + ring * max(layers) + ends


def step_time(rt: Runtime, steps: int = 24, repeats: int = 5, batch: int = 1, prompt: int = 16) -> float:
    """Median over `repeats` windows of the mean time of `steps` back-to-back graph replays of `batch` rows."""
    g = rt.capture(batch)
    g.prefill(torch.randint(3, rt.config.vocab_size, (batch, prompt)))
    for _ in range(3):
        g.step()
    return statistics.median(cuda_median(lambda: [g.step() for _ in range(steps)], 1) / steps
                             for _ in range(repeats))


def kernel_times(shape=(28672, 8192)) -> dict[str, float]:
    """Microseconds of one linear at M=1 for each format (median of 20, CUDA events); for int4 also each kernel
    that could serve it: ATen's tinygemm ("cuda" packing), the Triton GEMV and the NVRTC row kernel ("blocked")."""
    from ..weights.formats import int4_cuda, linear
    from ..weights.formats.base import Weight
    from ..weights.formats.int4 import Int4
    from ..weights.formats.int4_gemv import int4_gemv
    w = torch.randn(shape, device="cuda") * 0.02
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
    out = {}
    for q in FORMATS:
        fmt = quantization_policy(q, torch.bfloat16, torch.device("cuda")).format_of("x")
        parts = {k: v.cuda() for k, v in fmt.encode(w.cpu(), torch.device("cuda")).items()}
        weight = Weight(fmt, parts, shape)
        linear(x, weight)
        out[q or "bf16"] = 1e6 * cuda_median(lambda: linear(x, weight), 20)
    tiny = Int4(torch.bfloat16, 128, packing="cuda")
    tparts = {k: v.cuda() for k, v in tiny.encode(w.cpu(), torch.device("cuda")).items()}
    out["int4 tinygemm"] = 1e6 * cuda_median(lambda: tiny.linear(x, tparts, None), 20)
    blocked = Int4(torch.bfloat16, 128, packing="blocked")
    bparts = {k: v.cuda() for k, v in blocked.encode(w.cpu(), torch.device("cuda")).items()}
    out["int4 triton"] = 1e6 * cuda_median(lambda: int4_gemv(x, bparts["w"], bparts["scales_and_zeros"]), 20)
    if int4_cuda.supports(x, bparts["w"], bparts["scales_and_zeros"]):
        out["int4 nvrtc-row"] = 1e6 * cuda_median(
            lambda: int4_cuda.int4_gemv_row(x, bparts["w"], bparts["scales_and_zeros"]), 20)
    return out


def run_quant_bench(out: Path, layers: int, model: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = model or make_bench_model(Path("/tmp/graphrt-bench/llama8b"), layers)
    limits = measure_limits()
    print(f"limits: {limits}", flush=True)
    rows = []
    # the int4 rows run on the policy's kernel; "int4 tinygemm" (resident) is ATen's kernel in the same run
    runs = [(mode, q) for mode in ("resident", "streamed") for q in FORMATS]
    if int4_packing(torch.device("cuda"), torch.bfloat16) != "cuda":
        runs.insert(len(FORMATS), ("resident", "int4 tinygemm"))
    for mode, q in runs:
        gc.collect()
        torch.cuda.empty_cache()
        budget = all_streamed_budget(path, q) if mode == "streamed" else None
        if q == "int4 tinygemm":
            os.environ["GRAPHRT_INT4_PACKING"] = "cuda"
        try:
            rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", quantization=q.split()[0] if q else q,
                                         max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, ring_depth=RING,
                                         stream_unit="layer", **({"gpu_budget": budget} if budget else {}))
        finally:
            os.environ.pop("GRAPHRT_INT4_PACKING", None)
        p = rt.placement
        assert (mode == "resident") == (not p.streamed), p.describe()
        t = step_time(rt)
        lim = measure_limits()  # right after the row it is compared with
        roof = (p.streamed_bytes / (lim["h2d_GBps"] * 1e9) if mode == "streamed"
                else resident_read_bytes(p, rt.config.tie_word_embeddings) / (lim["hbm_GBps"] * 1e9))
        rows.append(dict(format=q or "bf16", mode=mode, budget_GiB=(budget or 0) / 2**30,
                         streamed_GB=p.streamed_bytes / 1e9, resident_GB=p.resident_bytes / 1e9,
                         ms_per_step=1e3 * t, tokens_per_s=1 / t, roofline_ms=1e3 * roof,
                         pct_of_roofline=100 * roof / t, h2d_GBps=lim["h2d_GBps"], hbm_GBps=lim["hbm_GBps"]))
        print(json.dumps(rows[-1]), flush=True)
        rt.close()
        del rt
    for r in rows:
        base = next(b for b in rows if b["mode"] == r["mode"] and b["format"] == "bf16")
        r["x_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=str(path), layers=layers,
                  limits=limits, rows=rows, linear_us_m1_28672x8192=kernel_times())
    (out / "quant.json").write_text(json.dumps(result, indent=2))
    (out / "quant.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(res: dict) -> str:
    lines = [f"# graphrt quantized decode: {res['device']}, torch {res['torch']}", "",
             f"Model: Llama-3.1-8B shape, {res['layers']} layers, quantized on load from bf16; batch 1, graph path. "
             f"Streamed rows: every layer streamed through {RING} slots (each format at its own smallest budget).", "",
             "| format | mode | budget GiB | streamed GB | ms/step | tokens/s | x bf16 | roofline ms | % of roofline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['format']} | {r['mode']} | {r['budget_GiB']:.2f} | {r['streamed_GB']:.2f} | "
                     f"{r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | {r['x_bf16']:.2f} | {r['roofline_ms']:.2f} | "
                     f"{r['pct_of_roofline']:.1f} |")
    k = res["linear_us_m1_28672x8192"]
    lines += ["", "One linear at decode shape (M=1, 28672x8192), us: " +
              ", ".join(f"{name} {us:.0f}" for name, us in k.items())]
    return "\n".join(lines) + "\n"
