"""Command line: `graphrt generate`, `graphrt plan`, `graphrt fetch-default`, `graphrt bench`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .default_model import DEFAULT_DIR


def _generate(a: argparse.Namespace) -> int:
    import torch

    from . import Runtime
    from .tokenizer import chat_prompt, default_system_prompt

    if a.model == DEFAULT_DIR and not (a.model / "config.json").is_file():
        print(f"{a.model} does not exist yet: run `graphrt fetch-default` first", file=sys.stderr)
        return 2
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        print("[graphrt] no CUDA device: running the same model eagerly on the CPU", file=sys.stderr)
    options = dict(max_seq_len=a.max_seq_len, ring_depth=a.ring_depth)
    if a.gpu_budget:
        options["gpu_budget"] = a.gpu_budget
    rt = Runtime.from_pretrained(a.model, device=device, dtype=a.dtype, **options)
    if rt.tokenizer is None:
        print(f"{a.model} has no tokenizer.json; graphrt generate needs one", file=sys.stderr)
        return 2
    text = chat_prompt([{"role": "user", "content": a.prompt}], a.system or default_system_prompt(a.model)) \
        if a.chat else a.prompt
    ids = torch.tensor([rt.tokenizer.encode(text).ids])
    use_graph = device.startswith("cuda") and not a.eager
    mode = "cuda-graph" if use_graph else "eager"
    start = time.perf_counter()
    printed, n = 0, 0
    for tokens in _stream(rt, ids, a, use_graph):
        n = tokens.shape[1] - ids.shape[1]
        new = rt.tokenizer.decode(tokens[0, ids.shape[1]:].tolist())
        print(new[printed:], end="", flush=True)
        printed = len(new)
    elapsed = time.perf_counter() - start
    print(f"\n[graphrt] {n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s, device {rt.device}, "
          f"mode {mode}, {len(rt.placement.streamed)} streamed groups", file=sys.stderr)
    return 0


def _stream(rt, ids, a, use_graph):
    """Yields the growing token sequence (prompt included) as tokens are produced."""
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_at_eos=a.chat or a.stop_at_eos)
    if use_graph:
        from .graph import stream_with_graph
        yield from stream_with_graph(rt, ids, a.max_new_tokens, chunk=8, **kw)
    else:
        yield from rt.stream(ids, a.max_new_tokens, **kw)


def _plan(a: argparse.Namespace) -> int:
    from .config import ModelConfig, parse_bytes, parse_dtype
    from .placement import CostModel, plan_placement

    cfg = ModelConfig.from_file(a.model)
    dtype = parse_dtype(a.dtype) or cfg.torch_dtype
    cost = CostModel(h2d_bandwidth=a.bandwidth * 1e9, hbm_bandwidth=a.hbm_bandwidth * 1e9, batch_size=a.batch)
    p = plan_placement(cfg, parse_bytes(a.gpu_budget), a.ring_depth, a.batch, a.max_seq_len, dtype,
                       stream_unit=a.stream_unit, cost=cost)
    print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {dtype}, batch {a.batch}, "
          f"max_seq_len {a.max_seq_len}, ring depth {a.ring_depth}, H2D {a.bandwidth:g} GB/s")
    print(p.describe())
    if p.prediction is not None:
        print(f"predicted decode: {a.batch / p.prediction.step_time:.1f} tokens/s at batch {a.batch}")
    else:
        print("everything is resident: the step is bound by HBM bandwidth and launch overhead")
    return 0


def _fetch(a: argparse.Namespace) -> int:
    from .default_model import fetch_default
    print(f"default model ready in {fetch_default(a.out, force=a.force)}")
    return 0


def _bench(a: argparse.Namespace) -> int:
    import torch
    if not torch.cuda.is_available():
        print("graphrt bench measures GPU decoding and needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    from .bench import run_bench
    return run_bench(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="graphrt", description="Decode LLMs larger than the GPU, one graph replay per token.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt", description="Generate text, printing tokens as they come.")
    g.add_argument("prompt")
    g.add_argument("--model", type=Path, default=DEFAULT_DIR, help="Hugging Face model directory (default: %(default)s)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template and stop at end of turn")
    g.add_argument("--system", help="system message for --chat (default: the checkpoint's own)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--top-p", type=float, default=1.0, help="1 disables")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-at-eos", action="store_true")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", help="compute dtype: bfloat16, float16, float32 (default: checkpoint's on CUDA, float32 on CPU)")
    g.add_argument("--gpu-budget", help="GPU memory for graphrt, e.g. 12GiB (default: free memory minus 1 GiB)")
    g.add_argument("--ring-depth", type=int, default=3)
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--eager", action="store_true", help="on CUDA, run the eager executor instead of the graph")
    g.set_defaults(fn=_generate)
    p = sub.add_parser("plan", help="print placement and predicted speed", description="Placement and predicted decode speed for a checkpoint or config.json.")
    p.add_argument("model", type=Path, help="model directory or config.json")
    p.add_argument("--gpu-budget", required=True, help="e.g. 80GB or 12GiB")
    p.add_argument("--ring-depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--dtype", help="default: the checkpoint's")
    p.add_argument("--bandwidth", type=float, default=55.0, help="host-to-device GB/s (default 55)")
    p.add_argument("--hbm-bandwidth", type=float, default=3000.0, help="device memory GB/s (default 3000)")
    p.add_argument("--stream-unit", choices=["auto", "layer", "attn_mlp"], default="auto",
                   help="streamed group: whole layers, attention/MLP halves, or the faster of both (default)")
    p.set_defaults(fn=_plan)
    f = sub.add_parser("fetch-default", help="install and convert the default model (SmolLM2-135M-Instruct)")
    f.add_argument("--out", type=Path, default=DEFAULT_DIR)
    f.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    f.set_defaults(fn=_fetch)
    b = sub.add_parser("bench", help="benchmark every decode system on the GPU",
                       description="Measure H2D and HBM bandwidth, then graphrt (graph, eager, sync copies, "
                       "predecessor scheme) and transformers (resident / accelerate offload) over GPU budgets, "
                       "batch sizes and ring depths; write bench.json, bench.md, bench.png, timeline.png.")
    b.add_argument("--model", type=Path, help="checkpoint directory (default: a random Llama-3.1-8B-shaped one)")
    b.add_argument("--layers", type=int, default=8, help="layers of the default bench model (default 8)")
    b.add_argument("--out", type=Path, default=Path("bench-results"))
    b.add_argument("--quick", action="store_true", help="fewer budgets and steps")
    b.set_defaults(fn=_bench)
    a = ap.parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        return a.fn(a)
    except (CheckpointError, ConfigError, FileNotFoundError, MemoryError) as e:
        print(f"graphrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
