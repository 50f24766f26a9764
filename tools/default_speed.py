"""Time per token of the default model, fully resident, graph replay, batch 1 (issue 9: "the default model >= 2x
faster per token than today, graph replay, same GPU").

    python3 tools/default_speed.py LABEL [MODEL_DIR] [--out DIR]

Uses whichever `graphrt` is first on PYTHONPATH, so the same call can time an old commit's package (exported with
`git archive`) and this one, one after the other on the same GPU. Only the API every version has is used:
Runtime.from_pretrained, capture(1), prefill, step. 200 replays back to back between two CUDA events, median of 5.
Appends one json line to DIR/default_speed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import graphrt
from graphrt import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label")
    ap.add_argument("model", nargs="?", type=Path, default=Path("weights/smollm2-135m-instruct"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-default-speed"))
    a = ap.parse_args()
    rt = Runtime.from_pretrained(a.model, device="cuda", dtype="bfloat16", max_seq_len=512)
    g = rt.capture(1)
    g.prefill(torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)))
    times = []
    for _ in range(5):
        g.prefill(torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)))
        for _ in range(5):
            g.step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            g.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 200)
    row = dict(label=a.label, package=str(Path(graphrt.__file__).parent), device=torch.cuda.get_device_name(),
               torch=torch.__version__, ms_per_token=statistics.median(times), all_ms=times)
    print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "default_speed.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
