"""`graphrt bench --only spec`: speculative decoding against plain decoding, same runtime, one run.

The default model (real text, so drafts can be right) with every layer streamed (the smallest budget: each
token's step is a pass over the streamed weights), batch 1, in bf16 and in float32 (the dtype its file holds,
which `graphrt generate` runs; twice the bytes per pass, while the int4 self-draft costs about the same). Prompts of the kind where drafts work
(summarise, rewrite, continue a given text). Rows: plain decode on the graph path; greedy speculative rounds
captured as graphs with prompt lookup and with the model's own int4 copy as the draft, k = 4 and 8, and the same
rounds run eagerly (self-int4, k = 4, bf16, ring 3) for comparison; each dtype with 3 ring slots and with 16, and
plain decoding at the 16-slot plan's memory with 3 slots (more layers resident: the fair plain baseline there).
Reports tokens/s, tokens per target pass, acceptance, and
the ratio to the plain graph row. Writes spec.json and spec.md.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..exec.speculative import SpecStats
from ..runtime import Runtime
from ..speculative import Speculative
from .run import budgets_for

PROMPTS = {
    "continue": "Continue this text exactly as it goes on: The quick brown fox jumps over the lazy dog. The quick "
                "brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "rewrite": "Rewrite in plain words: The committee has determined that the proposal, as submitted, does not "
               "satisfy the requirements set out in the call for proposals, and therefore it cannot be funded.",
    "summarise": "Summarise: graphrt keeps the weights that fit in GPU memory resident and streams the rest from "
                 "pinned host memory into a ring of static GPU slots, and captures each decode step as one CUDA "
                 "graph that the host replays per token.",
}
NEW_TOKENS = 64


REPEATS = 5   # each timing is the median of this many runs (a shared host's PCIe rate drifts between runs)


def _timed(fn) -> float:
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_difference(rt: Runtime, plain: list[int], got: list[int], prompt_len: int) -> dict:
    """Where speculative output (prompt + new tokens) leaves plain output, counted in new tokens (bf16: a
    k+1-token pass rounds unlike a 1-token step), and the plain run's top-1 minus top-2 logit there: a near-tie
    explains the difference."""
    at = next((i for i, (a, b) in enumerate(zip(plain, got)) if a != b), None)
    if at is None:
        return {}
    top2 = rt.logits(torch.tensor([plain[:at]]))[0, -1].topk(2).values
    return dict(first_difference_at=at - prompt_len, logit_margin_there=(top2[0] - top2[1]).item())


# (compute dtype, ring depth): every layer streams in each. A deeper ring lets the copy engine prefetch the next
# round's first layers while the draft's k steps compute (a round's copy engine otherwise waits for them).
RUNS = (("bfloat16", 3), ("float32", 3), ("bfloat16", 16), ("float32", 16))


def run_spec_bench(out: Path, model: Path | None = None) -> dict:
    from ..default_model import fetch_default
    out.mkdir(parents=True, exist_ok=True)
    path = model or fetch_default()
    rows, plans = [], {}
    for dtype, ring in RUNS:
        budget = budgets_for(path, 1, ring, 2, 256, max_seq_len=512, dtype=dtype)[0]
        rt = Runtime.from_pretrained(path, device="cuda", dtype=dtype, gpu_budget=budget, ring_depth=ring,
                                     max_seq_len=512, stream_unit="layer")
        label = f"{dtype}, ring {ring}"
        plans[label] = rt.placement.describe().splitlines()[1]
        rows += _rows(rt, label, eager=(dtype, ring) == RUNS[0])
        rt.close()
        del rt
        torch.cuda.empty_cache()
        if ring > 3:   # the same GPU memory, 3 slots: the planner keeps the other slots' worth of layers resident
            rt = Runtime.from_pretrained(path, device="cuda", dtype=dtype, gpu_budget=budget, ring_depth=3,
                                         max_seq_len=512, stream_unit="layer")
            plans[f"{label}, its memory with 3 slots"] = rt.placement.describe().splitlines()[1]
            rows += _rows(rt, label, eager=False, plain_only=f"graph, plain, this memory with 3 slots "
                                                           f"({len(rt.placement.streamed)} streamed)")
            rt.close()
            del rt
            torch.cuda.empty_cache()
    for r in rows:
        same = [p for p in rows if p["prompt"] == r["prompt"] and p["dtype"] == r["dtype"]
                and p["system"].startswith("graph, plain")]
        r["x_plain"] = r["tokens_per_s"] / same[0]["tokens_per_s"]
        r["x_best_plain"] = r["tokens_per_s"] / max(p["tokens_per_s"] for p in same)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=str(path), plans=plans, rows=rows)
    (out / "spec.json").write_text(json.dumps(res, indent=1))
    lines = [f"# speculative decoding: {res['device']}, torch {res['torch']}", "", f"Model `{path}`, batch 1, "
             f"{NEW_TOKENS} new tokens; plans:", ""] + [f"- {d}: {p}" for d, p in plans.items()] + [
             "", f"Each tokens/s is the median of {REPEATS} runs. x plain: against plain decoding on the same plan; x best "
             "plain: against the faster plain row at the same GPU memory (rings of 16 slots: also the same memory "
             "with 3 slots, where the planner keeps more layers resident).", "",
             "| dtype, ring | prompt | system | tokens/s | x plain | x best plain | tokens per pass | acceptance | same "
             "tokens (else: first difference, plain run's logit margin there) |", "|---" * 9 + "|"]
    for r in rows:
        same = r.get("same_tokens_as_plain", "-")
        if same is False:
            same = f"from token {r['first_difference_at']} (margin {r['logit_margin_there']:.3f})"
        lines.append(f"| {r['dtype']} | {r['prompt']} | {r['system']} | {r['tokens_per_s']:.1f} | {r['x_plain']:.2f} | "
                     f"{r['x_best_plain']:.2f} | "
                     f"{r['tokens_per_pass']:.2f} | {r.get('acceptance', 1.0):.2f} | {same} |")
    (out / "spec.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


def _rows(rt: Runtime, dtype: str, eager: bool, plain_only: str | None = None) -> list[dict]:
    """Plain graph decoding and every speculative configuration, for each prompt, on one runtime (`plain_only`:
    just the plain row, under that name)."""
    rows = []
    for name, text in PROMPTS.items():
        ids = [rt.encode(rt.apply_chat_template([{"role": "user", "content": text}]))]
        rt.generate(ids, 8)                                           # warm-up: capture, first loads
        plain_s = _timed(lambda: rt.generate(ids, NEW_TOKENS))
        plain = rt.generate(ids, NEW_TOKENS)
        base = dict(dtype=dtype, prompt=name, prompt_tokens=len(ids[0]), streamed_GB=rt.placement.streamed_bytes / 1e9)
        rows.append(dict(base, system=plain_only or "graph, plain", tokens_per_s=NEW_TOKENS / plain_s,
                         tokens_per_pass=1.0))
        if plain_only:
            continue
        configs = [("lookup", 4, True), ("lookup", 8, True), ("self-int4", 4, True), ("self-int4", 8, True)]
        for draft, k, graph in configs + ([("self-int4", 4, False)] if eager else []):
            spec = Speculative(draft, k=k)
            rt.generate(ids, 8, speculative=spec, use_graph=graph)   # loads the draft, captures the rounds
            stats = SpecStats()
            s = _timed(lambda: rt.generate(ids, NEW_TOKENS, speculative=spec, speculative_stats=stats,
                                           use_graph=graph))
            got = rt.generate(ids, NEW_TOKENS, speculative=spec, use_graph=graph)
            system = f"speculative {draft} k={k}" + ("" if graph else " (eager rounds)")
            rows.append(dict(base, system=system, tokens_per_s=NEW_TOKENS / s,
                             tokens_per_pass=stats.tokens_per_pass, acceptance=stats.acceptance,
                             same_tokens_as_plain=got == plain,
                             **first_difference(rt, plain[0], got[0], len(ids[0]))))
            print(json.dumps(rows[-1]), flush=True)
    return rows
