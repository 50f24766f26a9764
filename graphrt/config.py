"""Model configuration (parsed from a Hugging Face config.json) and runtime options."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A config.json or an option graphrt cannot use; the message says what and how to fix it."""


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r}; use one of {sorted(DTYPES)}")
    return DTYPES[value]


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 parameters, or None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    torch_dtype: torch.dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config value {name}={getattr(self, name)} must be positive")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {arch!r}; graphrt supports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
            rope = _rope_parameters(raw)
            sliding = raw.get("sliding_window")
            if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
                sliding = None
            if arch == "LlamaForCausalLM":
                sliding = None
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=_llama3_scaling(rope, source),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                torch_dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                sliding_window=int(sliding) if sliding else None,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required key {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found; a model directory needs the "
                              "Hugging Face config.json next to its safetensors files")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, str(path))

    # ---- sizes used by placement --------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_parameters(raw: dict) -> dict:
    """Both layouts: transformers 5.x `rope_parameters`, 4.x top-level rope_theta/rope_scaling."""
    if isinstance(raw.get("rope_parameters"), dict):
        params = dict(raw["rope_parameters"])
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
        return params
    params = dict(raw.get("rope_scaling") or {})
    params["rope_theta"] = raw.get("rope_theta", 10000.0)
    return params


def _llama3_scaling(rope: dict, source: str) -> dict | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (default and llama3 are)")
    return {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")}


def context_bucket(length: int, max_seq_len: int) -> int:
    """Attended context length for a step whose last position is length - 1: a power of two >= 64."""
    return min(max_seq_len, max(64, 1 << (max(length, 1) - 1).bit_length()))


def context_buckets(max_seq_len: int) -> list[int]:
    """Every value context_bucket takes for lengths 1..max_seq_len, longest first (without visiting each length:
    a runtime of 128k positions would otherwise walk them all before each generate)."""
    buckets, b = {max_seq_len}, 64
    while b < max_seq_len:
        buckets.add(b)
        b *= 2
    return sorted(buckets, reverse=True)


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """`12GiB`, `500MB`, `1.5GB` or a plain number of bytes."""
    if isinstance(value, (int, float)):
        if value < 0 or math.isnan(value):
            raise ConfigError(f"a byte count must be >= 0, got {value}")
        return int(value)
    m = _SIZE.match(value)
    if not m:
        raise ConfigError(f"cannot read {value!r} as a size; write e.g. '12GiB', '800MB' or 4000000000")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclass
class RuntimeOptions:
    """Options of `Runtime.from_pretrained` beyond path/device/dtype; unknown names raise."""
    max_batch_size: int = 1
    max_seq_len: int | None = None          # None: min(2048, the model's max_position_embeddings)
    gpu_budget: int | str | None = None     # bytes, "12GiB"; None: all free device memory minus a margin
    ring_depth: int = 3                     # N static weight slots for streamed groups
    stream_unit: str = "auto"               # "layer", "attn_mlp" (predecessor's split) or "auto"
    placement: str = "auto"                 # "auto" | "first" | "last" | "spread" | "lane" | "lane-split" |
                                            # "lane-beside" (the CPU lane's plans: whole MLPs, MLPs split with the
                                            # GPU, every MLP split beside its resident rows; plan/lanes.py)
    prefill_chunk: int | None = None        # prompt tokens per prefill step (one pass over streamed weights);
                                            # None: the most the memory left after placement holds, >= 256
    progress: bool | None = None            # progress bar on loads; None: when stderr is a terminal
    h2d_bandwidth: float = 55e9             # bytes/s; planning estimate until measured
    hbm_bandwidth: float = 3.0e12           # bytes/s; planning estimate
    poison_freed_slots: bool = False        # debug: fill a slot with NaN after its last read
    quantization: str | None = None         # quantize on load: "int8", "fp8", "int4"; None keeps the file's
    cpu_lane: bool = False                  # let the planner compute MLP groups on the CPU from host memory
    cpu_rate: float | None = None           # bytes/s of weights the CPU computes; None: calibrate (cached)
    cpu_threads: int | None = None          # torch CPU threads for the CPU lane; None: calibrated (GPU)
    lane_in_step: bool = True               # CUDA: measure the CPU lane in the first replays of the step and plan
                                            # again where it ran >5% off the calibrated rate (plan/in_step.py)
    lane_nodes: str = "auto"                # how a captured step reaches the CPU lane: "signal" (kernels and graphrt's
                                            # serving thread, exec/lane_signal.py), "host" (CUDA host nodes), "auto"
    tensor_parallel: int = 1                # ranks (one process each, torchrun) sharing the model Megatron-style
    copy_mode: str = "memcpy"               # streamed groups' host-to-device copies: "memcpy" (copy engine) or
                                            # "kernel" (a kernel reads mapped host memory: flat graph launch cost)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.ring_depth < 2:
            raise ConfigError(f"ring_depth must be >= 2 (one slot computes while the next loads), "
                              f"got {self.ring_depth}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.stream_unit not in ("auto", "layer", "attn_mlp"):
            raise ConfigError(f"stream_unit must be 'auto', 'layer' or 'attn_mlp', got {self.stream_unit!r}")
        if self.placement not in ("auto", "first", "last", "spread", "lane", "lane-split", "lane-beside"):
            raise ConfigError(f"placement must be auto, first, last, spread, lane, lane-split or lane-beside, got "
                              f"{self.placement!r}")
        if self.placement.startswith("lane") and not self.cpu_lane:
            raise ConfigError(f"placement {self.placement} computes MLPs on the CPU lane; set cpu_lane=True (--cpu-lane)")
        if self.gpu_budget is not None:
            self.gpu_budget = parse_bytes(self.gpu_budget)
        if self.cpu_rate is not None and not self.cpu_rate > 0:
            raise ConfigError(f"cpu_rate must be > 0 bytes/s (or None to calibrate), got {self.cpu_rate}")
        if isinstance(self.tensor_parallel, bool) or not isinstance(self.tensor_parallel, int) \
                or self.tensor_parallel < 1:
            raise ConfigError(f"tensor_parallel must be an integer >= 1, got {self.tensor_parallel!r}")
        if self.copy_mode not in ("memcpy", "kernel"):
            raise ConfigError(f"copy_mode must be 'memcpy' or 'kernel', got {self.copy_mode!r}")
        if self.lane_nodes not in ("auto", "signal", "host"):
            raise ConfigError(f"lane_nodes must be 'auto', 'signal' or 'host', got {self.lane_nodes!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "RuntimeOptions":
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        return cls(**kwargs)


DEFAULT_MAX_SEQ_LEN = 2048


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cuda', 'cuda:1', 'cpu' or None (CUDA when available); anything else is a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device={device!r}; use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r} is not supported; graphrt runs on 'cuda' or 'cpu'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} was asked for but CUDA is not available; use device='cpu'")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def resolve_max_seq_len(opts: RuntimeOptions, cfg: ModelConfig) -> RuntimeOptions:
    """max_seq_len None -> min(2048, the model's positions); larger than the model's positions: error."""
    if opts.max_seq_len is None:
        return replace(opts, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings))
    if opts.max_seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"max_seq_len={opts.max_seq_len} exceeds the model's {cfg.max_position_embeddings} "
                          "positions (max_position_embeddings in its config); use at most that")
    return opts
