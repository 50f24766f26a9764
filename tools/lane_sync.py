"""Does a spinning waiter slow the CPU lane? (issue 17: the bf16 lane's step ran 31% over its prediction.)

    python3 tools/lane_sync.py [--out DIR]

The 16-layer 8B shape, bf16, the split budget of `graphrt bench --only peer` (8 of 16 layers' weights in host
memory), the CPU lane on, batch 1 and 8: tokens/s of back-to-back graph replays (the timing thread waits on CUDA
events) with the context's waiting threads spinning and sleeping (`cpu_lane.set_blocking_sync`), alternated
three times in one process, beside the plan's prediction. Writes lane_sync.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from graphrt.bench.quant import step_time
from graphrt.bench.run import make_bench_model
from graphrt.bench.versus import LAYERS, _runtime, split_budget
from graphrt.config import ModelConfig
from graphrt.exec.cpu_lane import set_blocking_sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-lane-sync"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = make_bench_model(Path(f"/tmp/graphrt-bench/llama8b-{LAYERS}"), LAYERS)
    cfg = ModelConfig.from_file(path / "config.json")
    rows = []
    for batch in (1, 8):
        rt = _runtime(path, None, split_budget(cfg, None, batch, 512), batch, 512, cpu_lane=True)
        p = rt.placement
        print(p.describe(), flush=True)
        for _ in range(3):
            for blocking in (False, True):
                set_blocking_sync(rt.device, blocking)
                tps = batch / step_time(rt, steps=8, repeats=3, batch=batch)
                rows.append(dict(batch=batch, blocking_sync=blocking, tokens_per_s=tps, cpu_groups=len(p.cpu),
                                 predicted_tokens_per_s=batch / p.prediction.step_time))
                print(json.dumps(rows[-1]), flush=True)
        rt.close()
    (a.out / "lane_sync.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
