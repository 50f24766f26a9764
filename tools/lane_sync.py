"""Does a spinning waiter slow the CPU lane? (issue 17: the bf16 lane's step ran 31% over its prediction.)

    python3 tools/lane_sync.py [--out DIR]

The 16-layer 8B shape, bf16, the split budget of `graphrt bench --only peer` (8 of 16 layers' weights in host
memory), the CPU lane on, batch 1 and 8: tokens/s of back-to-back graph replays (the timing thread waits on CUDA
events) with the context's waiting threads spinning and sleeping (`set_blocking_sync` below), alternated
three times in one process, beside the plan's prediction. Writes lane_sync.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import torch

from graphrt.bench.quant import step_time
from graphrt.bench.run import make_bench_model
from graphrt.bench.versus import LAYERS, _runtime, split_budget
from graphrt.config import ModelConfig
from graphrt.exec.cpu_lane import _libcuda


SCHED_MASK, SCHED_SPIN, SCHED_BLOCKING_SYNC = 0x7, 0x1, 0x4   # CUctx_flags' scheduling bits


def set_blocking_sync(device: torch.device, blocking: bool) -> bool:
    """Make host threads that wait for this device's work (event / stream / device synchronize) sleep instead of
    spin (blocking), or spin again. A spinning waiter could hold a core the CPU lane's threads need; measured on
    the H200 host (docs/results/2026-11-26-session5.md) it made no difference, so graphrt leaves the driver's
    default. Applies to the context current on this thread
    (torch's primary context of `device`); other flags are kept. Returns False where the driver lacks
    cuCtxSetFlags (CUDA < 12.1): nothing changed."""
    lib = _libcuda()   # the driver library the CPU lane already loaded through ctypes
    if not hasattr(lib, "cuCtxSetFlags"):
        return False
    torch.cuda.set_device(device)
    torch.empty(1, device=device)            # the primary context exists and is current here
    flags = ctypes.c_uint(0)
    if lib.cuCtxGetFlags(ctypes.byref(flags)) != 0:
        return False
    new = (flags.value & ~SCHED_MASK) | (SCHED_BLOCKING_SYNC if blocking else SCHED_SPIN)
    return lib.cuCtxSetFlags(ctypes.c_uint(new)) == 0


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
