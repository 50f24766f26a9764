"""Zeroed int32 counters for kernels whose programs count themselves done and merge in the last one."""
from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def zeroed_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros on `device`, shared by the kernels whose programs count themselves done (the last one
    merges the partial results) and that zero their counters again before they end (attention.py,
    dense_gemv.py). Kernels of one stream run one after another; the runtime issues them on one compute stream
    per device. Buffers are never freed: graphs captured with one keep its address."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 15), dtype=torch.int32, device=device))
    return bufs[-1]
