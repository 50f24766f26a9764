"""Where the host's time goes in an eager prompt (prefill) step: cProfile of `generate(ids, 1)` on the default
model's shape (random weights), every layer streamed (bf16, ring 3) and fully resident int4 (the self-draft).

    python3 tools/prompt_host.py [--tokens 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from graphrt import Runtime
from graphrt.bench.run import budgets_for
from graphrt.weights.synthetic import PRESETS, make_config, random_tensors, write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    a = ap.parse_args()
    path = Path("/tmp/graphrt-bench/smollm2-shape")
    if not (path / "config.json").is_file():
        cfg = make_config(**PRESETS["smollm2-135m"], dtype="float32")
        write_checkpoint(path, cfg, random_tensors(cfg, 0, torch.float32, device="cuda"))
    budget = budgets_for(path, 1, 3, 2, 256, max_seq_len=512, dtype="bfloat16")[0]
    runs = {"streamed bf16": dict(gpu_budget=budget, ring_depth=3, stream_unit="layer"),
            "resident int4": dict(quantization="int4")}
    ids = [list(range(5, 5 + a.tokens))]
    report = []
    for label, kw in runs.items():
        rt = Runtime.from_pretrained(path, device="cuda", dtype="bfloat16", max_seq_len=512, **kw)
        for _ in range(3):
            rt.generate(ids, 1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        rt.generate(ids, 1)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
        prof = cProfile.Profile()
        prof.enable()
        rt.generate(ids, 1)
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        report.append(f"## {label}: generate(ids, 1) {wall:.1f} ms\n{s.getvalue()}")
        rt.close()
    text = "\n".join(report)
    print(text)
    (a.out / "prompt_host.txt").write_text(text)


if __name__ == "__main__":
    main()
