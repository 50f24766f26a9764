"""`graphrt plan`: placement and predicted decode speed of a model under a GPU budget, without a GPU."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .config import DEFAULT_MAX_SEQ_LEN, DTYPES, ModelConfig, parse_bytes, parse_dtype
from .plan.cost import CostModel
from .plan.placement import plan_placement
from .weights.formats.policy import QUANTIZATIONS


def add_plan_flags(p: argparse.ArgumentParser, positive, number, size) -> None:
    p.add_argument("model", type=Path, help="model directory, config.json or .gguf file")
    p.add_argument("--gpu-budget", required=True, type=size, help="e.g. 80GB or 12GiB")
    p.add_argument("--ring-depth", type=positive(2), default=3)
    p.add_argument("--batch", type=positive(), default=1)
    p.add_argument("--max-seq-len", type=positive(), default=None,
                   help=f"default: {DEFAULT_MAX_SEQ_LEN} or the model's positions, whichever is smaller "
                   "(the same default as generate)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="plan quantized weights")
    p.add_argument("--bandwidth", type=number(0, low_open=True), default=55.0,
                   help="host-to-device GB/s (default 55)")
    p.add_argument("--hbm-bandwidth", type=number(0, low_open=True), default=3000.0,
                   help="device memory GB/s (default 3000)")
    p.add_argument("--cpu-rate", type=number(0, low_open=True), default=None,
                   help="plan a CPU lane: GB/s of weights the target's CPU computes (no CPU lane by default)")
    p.add_argument("--tp", type=positive(), default=1, help="tensor parallel: plan one rank of K (its shard of the "
                   "weights and KV cache on its own --gpu-budget and PCIe link); all-reduce time is not modelled")
    p.add_argument("--stream-unit", choices=["auto", "layer", "attn_mlp"], default="auto",
                   help="streamed group: whole layers, attention/MLP halves, or the faster of both (default)")
    p.add_argument("--placement", choices=["auto", "first", "last", "spread", "lane", "lane-split", "lane-beside"],
                   default="auto", help="which plans to compare: all but lane-beside (default), resident layers "
                   "first / last / spread, or with --cpu-rate the CPU lane's plans with whole MLPs on the CPU (lane), "
                   "MLPs split between the GPU and the CPU (lane-split), or every MLP split, its CPU rows computed "
                   "beside its resident GPU rows (lane-beside, asked for only)")


def _model(path: Path, dtype: torch.dtype | None, quantization: str | None):
    """(config, format policy) of a config.json, a model directory or a GGUF file (no weights read)."""
    from .weights.sources import open_source, weight_policy
    if path.is_file() and path.suffix == ".json":
        cfg = ModelConfig.from_file(path)
        source = None
    else:
        source = open_source(path)
        cfg = source.config
    dtype = dtype or cfg.torch_dtype
    if source is None:
        from .weights.formats.policy import quantization_policy
        from .weights.layout import FormatPolicy
        policy = quantization_policy(quantization, dtype, torch.device("cuda")) if quantization else FormatPolicy(dtype)
    else:
        policy = weight_policy(source, quantization, dtype, torch.device("cuda"))
    return cfg, policy


def run_plan(a: argparse.Namespace) -> int:
    if not a.model.exists():
        raise FileNotFoundError(f"{a.model}: no such file or directory (a config.json, model directory or .gguf)")
    cfg, policy = _model(a.model, parse_dtype(a.dtype), a.quantization)
    full = cfg
    if a.tp > 1:
        from .weights.shard import make_shard
        cfg = make_shard(cfg, 0, a.tp).config   # every rank holds an equal shard
    max_seq_len = a.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    cost = CostModel(h2d_bandwidth=a.bandwidth * 1e9, hbm_bandwidth=a.hbm_bandwidth * 1e9, batch_size=a.batch,
                     cpu_rate=(a.cpu_rate or 0) * 1e9)
    p = plan_placement(cfg, parse_bytes(a.gpu_budget), a.ring_depth, a.batch, max_seq_len, policy,
                       stream_unit=a.stream_unit, strategy=a.placement, cost=cost, prefill_chunk=None,
                       fused_attention=True)
    weights = a.quantization or ("stored formats" if policy.per_tensor else str(policy.compute_dtype).replace("torch.", ""))
    if a.tp > 1:
        print(f"tensor parallel {a.tp}: each rank holds {cfg.num_heads} of {full.num_heads} heads, {cfg.num_kv_heads} "
              f"kv heads, {cfg.intermediate_size} of {full.intermediate_size} MLP rows, {cfg.vocab_size} of "
              f"{full.vocab_size} vocabulary rows; the plan below is one rank's")
    print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, weights {weights}, "
          f"batch {a.batch}, max_seq_len {max_seq_len}, ring depth {a.ring_depth}, H2D {a.bandwidth:g} GB/s")
    print(p.describe())
    if p.prediction is not None:
        print(f"predicted decode: {a.batch / p.prediction.step_time:.1f} tokens/s at batch {a.batch}")
    else:
        step = sum(CostModel(hbm_bandwidth=a.hbm_bandwidth * 1e9, batch_size=a.batch).compute_time(g)
                   for g in p.groups)
        print(f"everything is resident: predicted decode {a.batch / step:.1f} tokens/s at batch {a.batch} "
              "(HBM-bound estimate, launch overhead included)")
    return 0
