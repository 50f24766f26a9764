"""Does the memory a CPU-lane group lives in change how fast the CPU reads it? (issue 17: in the decode step the
lane's groups ran 1.2-1.45x slower than the calibration priced them.)

    python3 tools/lane_memory_probe.py [--out DIR] [--rows 1,8] [--seconds S]

Bf16 MLP groups of the 8B shape (as many as calibrate.cycle_bytes holds), computed by the lane's math
(calibrate.measure: groups taken in turn, pinned H2D copies running beside on CUDA) from buffers of each kind:
  torch         torch.empty (glibc malloc: a private mapping; huge pages only where the kernel's THP is "always")
  shared-pinned Python's default anonymous mmap (a shared mapping: shmem, 4 KiB pages), cudaHostRegister'ed: what
                graphrt's pinned buffers were
  huge          weights.store.host_empty: private, advised to huge pages (the lane's buffers now)
  huge-pinned   weights.store.pinned_empty: the same, registered (lane groups that prompts also stream)
Prints and writes lane_memory_probe.json: GB/s per kind and row count, and the host's THP settings.
"""
from __future__ import annotations

import argparse
import json
import mmap
from pathlib import Path

import torch

from graphrt.config import ModelConfig
from graphrt.plan.calibrate import random_buffer, cycle_bytes, measure
from graphrt.weights.formats import for_cpu
from graphrt.weights.formats.policy import quantization_policy
from graphrt.weights.layout import model_groups
from graphrt.weights.store import host_empty, pinned_empty, unpin
from graphrt.weights.synthetic import PRESETS, make_config


def buffer(kind: str, nbytes: int) -> torch.Tensor:
    if kind == "torch":
        return torch.empty(nbytes, dtype=torch.uint8)
    if kind == "huge":
        return host_empty(nbytes)
    if kind == "huge-pinned":
        return pinned_empty(nbytes)
    size = -(-nbytes // 4096) * 4096
    buf = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
    if torch.cuda.is_available():
        torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0)
    return buf[:nbytes]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/graphrt-lane-memory"))
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--kinds", default="torch,shared-pinned,huge,huge-pinned")
    a = ap.parse_args()
    cfg = ModelConfig.from_dict(make_config(**dict(PRESETS["llama-3.1-8b"], layers=1), dtype="bfloat16"))
    policy = quantization_policy(None, torch.bfloat16, "cpu", in_features=(4096, 4096, 14336))
    g = next(x for x in model_groups(cfg, policy, "attn_mlp") if x.kind == "mlp")
    source = random_buffer(g)
    thp = {f: Path(f"/sys/kernel/mm/transparent_hugepage/{f}").read_text().strip()
           for f in ("enabled", "shmem_enabled") if Path(f"/sys/kernel/mm/transparent_hugepage/{f}").exists()}
    rows = []
    for m in (int(r) for r in a.rows.split(",")):
        for _ in range(2):   # each kind twice, alternated
            for kind in a.kinds.split(","):
                bufs = [buffer(kind, g.nbytes) for _ in range(-(-cycle_bytes() // g.nbytes))]
                for b in bufs:
                    b.copy_(source)
                rate = measure(cfg, policy, m, seconds=a.seconds, concurrent_h2d=torch.cuda.is_available(),
                               group=(g.nbytes, [for_cpu(g.views(b), m) for b in bufs]))
                if kind.endswith("pinned") and torch.cuda.is_available():
                    for b in bufs:
                        unpin(b)
                rows.append(dict(kind=kind, rows=m, threads=torch.get_num_threads(), GBps=rate / 1e9))
                print(json.dumps(rows[-1]), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "lane_memory_probe.json").write_text(json.dumps(dict(thp=thp, rows=rows), indent=1))
    print("THP:", thp)


if __name__ == "__main__":
    main()
