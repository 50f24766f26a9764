"""The planner's cost model: how long a weight group takes to copy, to compute on the GPU, or on the CPU lane."""
from __future__ import annotations

from dataclasses import dataclass

from ..weights.layout import GroupLayout


# A CPU-lane group's cost in a captured step beyond its host function: activation D2H, reaching the CPU, result H2D.
# tools/lane_probe.py at 7853398 on the H100 host, 16 empty groups in one graph: 21 us a group signalled
# (exec/lane_signal.py), 70-95 us through CUDA host nodes; host nodes inside decode steps averaged about 0.2 ms.
NODE_COST = {"signal": 30e-6, "host": 200e-6}


@dataclass(frozen=True)
class CostModel:
    """Planning estimates: copy and compute time of a group for one decode step."""
    h2d_bandwidth: float = 55e9      # bytes/s, pinned host -> device
    hbm_bandwidth: float = 3.0e12    # bytes/s, device memory
    flops: float = 400e12            # dense matmul FLOP/s reachable at decode shapes
    group_overhead: float = 10e-6    # kernel launches per group inside a graph
    batch_size: int = 1
    gpu_rate: float = 0.0            # bytes/s of weights the GPU computes at this batch in their formats (measured,
                                     # plan/gpu_calibrate.py); 0: hbm_bandwidth
    cpu_rate: float = 0.0            # bytes/s of weights the CPU lane computes at this batch while the copy engine
                                     # streams beside it; 0: no CPU lane
    cpu_rate_alone: float = 0.0      # bytes/s of the same with the copy engine idle; 0: cpu_rate
    cpu_overhead: float = NODE_COST["signal"]   # per CPU group beyond its host function (NODE_COST)
    h2d_beside_cpu: float = 0.0      # bytes/s of the copy engine while the CPU lane computes (DRAM is shared); 0:
                                     # h2d_bandwidth
    cpu_group_cost: float = 0.0      # seconds a CPU-lane group takes beyond its bytes at cpu_rate (the kernels'
                                     # dispatch and ramp, the host function's Python: plan/group_cost.py); with it,
                                     # cpu_rate is the marginal rate
    lane_beside: bool = True         # a split MLP's CPU rows run beside its resident GPU rows (signalled nodes: the
                                     # compute stream goes on after posting; a host node holds it)

    def copy_time(self, g: GroupLayout) -> float:
        return g.nbytes / self.h2d_bandwidth

    def copy_times(self, g: GroupLayout) -> tuple[float, float]:
        """(alone, beside the CPU lane): a copy reads host memory, and slows while the CPU reads it too."""
        return g.nbytes / self.h2d_bandwidth, g.nbytes / (self.h2d_beside_cpu or self.h2d_bandwidth)

    def cpu_time(self, g: GroupLayout) -> float:
        """The compute stream waits this long for a group computed on the CPU while copies run beside it (it reads
        its weights once)."""
        return g.nbytes / self.cpu_rate + self.cpu_overhead + self.cpu_group_cost

    def cpu_times(self, g: GroupLayout) -> tuple[float, float]:
        """(alone, beside copies) for a group computed on the CPU."""
        return (g.nbytes / (self.cpu_rate_alone or self.cpu_rate) + self.cpu_overhead + self.cpu_group_cost,
                self.cpu_time(g))

    def compute_time(self, g: GroupLayout) -> float:
        params = g.num_params if g.kind != "embed" else 0  # the embedding reads B rows
        nbytes = g.nbytes if g.kind != "embed" else 0
        return max(nbytes / (self.gpu_rate or self.hbm_bandwidth),
                   2 * self.batch_size * params / self.flops) + self.group_overhead
