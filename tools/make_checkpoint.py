#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint of a supported architecture (tests and benchmarks).

Presets give real layer shapes with fewer layers, e.g.
    python tools/make_checkpoint.py /tmp/l8b --preset llama-3.1-8b --num-layers 4 --dtype bfloat16
"""
from __future__ import annotations

import argparse
from pathlib import Path

from graphrt.weights.synthetic import DTYPES, PRESETS, fp8_compressed_tensors, make_config, random_tensors, write_checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny-llama")
    ap.add_argument("--arch", choices=["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
    for name in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        ap.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    ap.add_argument("--num-layers", type=int, dest="layers_alias", help="alias of --layers")
    ap.add_argument("--rope", choices=["default", "llama3"])
    ap.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--layout", choices=["v4", "v5"], default="v4", help="config.json layout (transformers 4.x/5.x)")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", choices=["channel", "tensor"], help="write the compressed-tensors FP8 layout")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    for key, val in (("arch", a.arch), ("hidden", a.hidden), ("intermediate", a.intermediate),
                     ("layers", a.layers_alias or a.layers), ("heads", a.heads), ("kv_heads", a.kv_heads),
                     ("vocab", a.vocab), ("rope", a.rope)):
        if val is not None:
            p[key] = val
    cfg = make_config(**p, tied=a.tied, dtype=a.dtype, layout=a.layout)
    tensors = random_tensors(cfg, a.seed, DTYPES[a.dtype])
    if a.fp8:
        cfg, tensors = fp8_compressed_tensors(cfg, tensors, a.fp8)
    write_checkpoint(a.out, cfg, tensors, a.shards)
    print(f"wrote {a.out} ({p['arch']}, {p['layers']} layers, hidden {p['hidden']}, {a.dtype})")


if __name__ == "__main__":
    main()
