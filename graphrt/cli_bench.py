"""`graphrt bench`: the GPU benchmarks (bench/), behind one subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import ConfigError


def run(a: argparse.Namespace) -> int:
    import torch
    if not torch.cuda.is_available():
        raise ConfigError("graphrt bench measures GPU decoding and needs a CUDA device; none is available here")
    if a.only == "quant":
        from .bench.quant import run_quant_bench
        run_quant_bench(a.out, a.layers, a.model)
        return 0
    if a.only == "spec":
        from .bench.spec import run_spec_bench
        run_spec_bench(a.out, a.model)
        return 0
    if a.only == "prefill":
        from .bench.prefill import run_prefill_bench
        run_prefill_bench(a.out, a.model)
        return 0
    if a.only == "peer":
        from .bench.versus import run_versus
        run_versus(a.out, a.model, a.peer_bin, a.threads, a.graphrt_json)
        return 0
    from .bench.run import run_bench
    return run_bench(a)


def add_bench_parser(sub, _positive) -> None:
    b = sub.add_parser("bench", help="benchmark every decode system on the GPU",
                       description="Measure H2D and HBM bandwidth, then graphrt (graph, eager, sync copies, "
                       "predecessor scheme) and transformers (resident / accelerate offload) over GPU budgets, "
                       "batch sizes and ring depths; write bench.json, bench.md, bench.png, timeline.png.")
    b.add_argument("--model", type=Path, help="checkpoint directory (default: a random Llama-3.1-8B-shaped one)")
    b.add_argument("--layers", type=_positive(), default=8, help="layers of the default bench model")
    b.add_argument("--out", type=Path, default=Path("bench-results"))
    b.add_argument("--quick", action="store_true", help="fewer budgets and steps")
    b.add_argument("--only", choices=["quant", "peer", "spec", "prefill"], help="prefill: 512- and 4096-token prompts "
                   "on a streamed 16-layer 8B-shaped plan against max(one pass over the streamed weights, the "
                   "arithmetic) (prefill.json, prefill.md); spec: speculative against plain decoding on "
                   "the default model, all layers streamed (spec.json, spec.md); quant: bf16/int8/fp8/int4, resident "
                   "and streamed "
                   "(quant.json, quant.md); peer: graphrt beside llama.cpp on a 16-layer 8B-shaped model, all on "
                   "the GPU and with 8 layers in host memory (versus.json, versus.md; llama.cpp built by "
                   "tools/llamacpp/build.sh)")
    b.add_argument("--peer-bin", type=Path, help="llama.cpp's build/bin (default: /tmp/keep/llama.cpp/build/bin)")
    b.add_argument("--threads", type=_positive(), help="llama.cpp CPU threads (default: all cores)")
    b.add_argument("--graphrt-json", type=Path, help="graphrt's peer rows from an earlier run (versus_graphrt.json)")
    b.set_defaults(fn=run)
