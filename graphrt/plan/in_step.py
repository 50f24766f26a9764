"""The CPU lane's rate inside the captured step against its calibration: a factor that later plans take.

The calibration (calibrate.py) prices the lane from products called directly, with copies beside them. Inside a
decode step the products run in host functions, on the CUDA driver's thread, between the GPU's work. On the H100
host their rate was 0.78 to 1.05 times the calibration, depending on the machine and the format
(docs/results/2026-11-26-session12.md). So the runtime measures the lane in its first replays
(exec/lane_check.py). Where that rate differs from the plan's by more than IN_STEP_TOLERANCE, the runtime plans
again with it and stores measured / calibrated here, beside the rates (keyed like them). Every later plan for that
machine, group shape and batch multiplies its calibrated rate by this factor.
"""
from __future__ import annotations

from ..config import ModelConfig
from ..weights.layout import FormatPolicy
from .calibrate import _key, read_cache, store

IN_STEP_TOLERANCE = 0.05   # a measured rate this close to the plan's keeps the plan (and its prediction)


def _factor_key(cfg: ModelConfig, policy: FormatPolicy, batch: int) -> str:
    return _key(cfg, policy, batch, True) + "|in-step"


def in_step_factor(cfg: ModelConfig, policy: FormatPolicy, batch: int) -> float:
    """Rate in the step / calibrated rate, as last measured on this machine (1.0 where never measured)."""
    return float(read_cache().get(_factor_key(cfg, policy, batch), 1.0))


def store_in_step_factor(cfg: ModelConfig, policy: FormatPolicy, batch: int, factor: float) -> None:
    if not factor > 0:
        raise ValueError(f"an in-step factor must be > 0, got {factor}")
    store(_factor_key(cfg, policy, batch), factor)
