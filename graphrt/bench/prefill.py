"""`graphrt bench --only prefill`: prompt throughput on a streamed plan against its two limits (issue 9).

The 16-layer Llama-3.1-8B shape in bf16, gpu_budget 10 GiB, max_seq_len 4096, max_batch_size 8 (the plan
streams about half the layers), one prompt of T = 512 and T = 4096 tokens, prefill only (the logits of the last
position), on two plans of that budget: the default (placement first, chunks widened into the memory it left:
2048 tokens per step at batch 1), and `prefill_chunk=512`, whose activations for 4096 tokens per step are
reserved before placement (one pass for any prompt up to max_seq_len, a layer or so more streamed per decode step). The limit of a prompt is
    T / max(streamed bytes / H2D bandwidth, 2 x matrix parameters x T / dense bf16 FLOP/s)
with both rates measured in the same run (pinned 1 GiB copies; an 8192 x 8192 x 8192 bf16 matmul): one pass over
the streamed weights, or the arithmetic, whichever is longer. Also the peak memory a prompt step allocates beyond
what was allocated before it, against the plan's activation estimate for that many tokens (the estimate decides
the chunk). Writes prefill.json and prefill.md.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ..runtime import Runtime
from ..plan.memory import essentials
from .run import cuda_median, make_bench_model, measure_limits

LAYERS, BUDGET, MAX_SEQ, MAX_BATCH = 16, "10GiB", 4096, 8
PROMPTS = (512, 4096)


def dense_flops() -> float:
    """bf16 FLOP/s of one large matmul (median of 10)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    a @ b
    return 2 * 8192**3 / cuda_median(lambda: a @ b)


def matrix_params(rt: Runtime) -> int:
    """Parameters that multiply activations: every layer's matrices and the LM head (the embedding is a lookup)."""
    c = rt.config
    per_layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size


PLANS = (("decode-first (prefill_chunk auto)", None),
         # 512 tokens per row at max_batch_size 8: a prompt of 4096 tokens at batch 1 in one step
         ("long prompts (prefill_chunk 512)", MAX_SEQ // MAX_BATCH))


def run_prefill_bench(out: Path, model: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = model or make_bench_model(Path(f"/tmp/graphrt-bench/llama8b-{LAYERS}"), LAYERS)
    flops = dense_flops()
    rows, plans = [], []
    for label, chunk in PLANS:
        rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", gpu_budget=BUDGET, max_seq_len=MAX_SEQ,
                                     max_batch_size=MAX_BATCH, prefill_chunk=chunk)
        p = rt.placement
        plans.append(dict(plan=label, streamed_GB=p.streamed_bytes / 1e9, describe=p.describe(),
                          decode_step_ms_predicted=1e3 * p.prediction.step_time if p.prediction else None))
        for T in PROMPTS:
            rows.append(dict(plan=label, streamed_GB=p.streamed_bytes / 1e9, **_prompt_row(rt, T, flops)))
            print(json.dumps(rows[-1]), flush=True)
        rt.close()
        del rt
        torch.cuda.empty_cache()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, layers=LAYERS, budget=BUDGET,
               max_seq_len=MAX_SEQ, max_batch_size=MAX_BATCH, dense_bf16_TFLOPs=flops / 1e12, plans=plans, rows=rows)
    md = [f"# prefill on a streamed plan: {res['device']}, torch {res['torch']}", "",
          f"16-layer Llama-3.1-8B shape, bf16, gpu_budget {BUDGET}, max_seq_len {MAX_SEQ}, max_batch_size "
          f"{MAX_BATCH}; dense bf16 {res['dense_bf16_TFLOPs']:.0f} TFLOP/s measured. Two plans of the same budget:", ""]
    for pl in plans:
        md += [f"{pl['plan']}: {pl['streamed_GB']:.2f} GB streamed per pass, decode step predicted "
               f"{pl['decode_step_ms_predicted'] or 0:.1f} ms", "", "```", pl["describe"], "```", ""]
    md += ["| plan | prompt tokens | prompt steps (chunk) | ms | tokens/s | stream pass ms | math ms | limit tokens/s "
           "| % of limit | peak GiB beyond the weights (estimate) |", "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['plan']} | {r['prompt_tokens']} | {r['prompt_steps']} ({r['chunk_tokens']}) | {1e3 * r['seconds']:.1f} | "
           f"{r['tokens_per_s']:,.0f} | {1e3 * r['stream_s']:.1f} | {1e3 * r['math_s']:.1f} | "
           f"{r['limit_tokens_per_s']:,.0f} | {r['pct_of_limit']:.1f} | {r['peak_step_GiB']:.2f} "
           f"({r['estimate_GiB']:.2f}) |" for r in rows]
    (out / "prefill.json").write_text(json.dumps(res, indent=2))
    (out / "prefill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return res


def _prompt_row(rt: Runtime, T: int, flops: float) -> dict:
    """One prompt of T tokens: time, peak memory against the estimate, and the limit (see the module doc)."""
    ids = torch.randint(3, rt.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    run = lambda: rt.engine.prefill(ids, [T])   # noqa: E731
    run()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    peak = torch.cuda.max_memory_allocated() - before
    t = statistics.median(cuda_median(run, 1) for _ in range(3))
    step_tokens = min(T, rt.engine.chunk_len(1))
    estimate = essentials(rt.config, torch.bfloat16, 1, MAX_SEQ, step_tokens, fused_attention=True)
    estimate = estimate["activations"] + estimate["logits"]
    lim = measure_limits()   # right after the row it is compared with
    stream_s = rt.placement.streamed_bytes / (lim["h2d_GBps"] * 1e9)
    math_s = 2 * matrix_params(rt) * T / flops
    limit = T / max(stream_s, math_s)
    return dict(prompt_tokens=T, seconds=t, tokens_per_s=T / t, prompt_steps=-(-T // rt.engine.chunk_len(1)),
                chunk_tokens=rt.engine.chunk_len(1), stream_s=stream_s, math_s=math_s, limit_tokens_per_s=limit,
                pct_of_limit=100 * (T / t) / limit, h2d_GBps=lim["h2d_GBps"], peak_step_GiB=peak / 2**30,
                estimate_GiB=estimate / 2**30)
