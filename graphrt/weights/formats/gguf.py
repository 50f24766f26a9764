"""GGUF (llama.cpp) tensor types as weight formats that keep the file's bytes.

GGUF quantizes each row of a matrix independently, in blocks of `block_size` values along `in`; a block is
`type_size` bytes. The one part of an [out, in] matrix is the file's raw rows:
    q  uint8 [out, in / block_size * type_size]
so permuting rows of `q` (llama.cpp's Q/K head interleave) is exact. F32, F16 and BF16 tensors use the same
part (their bytes), so a matrix whose file dtype is not the compute dtype also keeps its bytes.

`dequantize(raw, type)` is pure torch (vectorised, same code on CPU and CUDA, no host syncs, static shapes,
capturable) and bit-exact in float32 with `gguf.quants.dequantize` (the reference llama.cpp layouts in the
`gguf` package's quants.py): every product and sum below is done in float32 in the same order as there.
Block layouts (byte offsets; f16 = little-endian IEEE half, converted exactly to float32):
    Q8_0 (32 values, 34 B)   d f16 @0, qs int8[32] @2                      w = qs * d
    Q4_0 (32, 18 B)          d @0, qs[16] @2                               w = d * (nib - 8)
    Q4_1 (32, 20 B)          d @0, m @2, qs[16] @4                         w = d * nib + m
    Q5_0 (32, 22 B)          d @0, qh u32 @2, qs[16] @6                    w = d * ((nib | hbit << 4) - 16)
    Q5_1 (32, 24 B)          d @0, m @2, qh @4, qs[16] @8                  w = d * (nib | hbit << 4) + m
    Q4_K (256, 144 B)        d @0, dmin @2, scales[12] @4, qs[128] @16     w = (d * sc[s]) * nib - dmin * mn[s]
    Q5_K (256, 176 B)        d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48
                                                                           w = (d * sc[s]) * (nib | hbit << 4) - dmin * mn[s]
    Q6_K (256, 210 B)        ql[128] @0, qh[64] @128, scales int8[16] @192, d @208
                                                                           w = (d * sc[s16]) * ((lo4 | hi2 << 4) - 32)
Nibbles: in a 32-value block, value j < 16 is the low nibble of qs[j], value j >= 16 the high nibble of qs[j-16]
(Q4_K/Q5_K: 4 chunks of 32 bytes, sub-block 2c = low nibbles of chunk c, 2c+1 = high nibbles). Q5 high bits:
value j takes bit j of the 32-bit qh (Q5_K: sub-block s takes bit s of qh[j]). Q4_K/Q5_K 6-bit scales and mins
(8 sub-blocks of 32): bytes 0-3 = scale low 6 bits + 2 high bits of scales 4-7, bytes 4-7 = min likewise,
bytes 8-11 = low 4 bits of scale (low nibble) and min (high nibble) of sub-blocks 4-7. Q6_K: two halves of 128
values; in half h, value 32c + j (c = 0..3) takes lo4 from ql[64h + 32(c%2) + j] (low nibble for c < 2, high
for c >= 2) and hi2 from bits 2c..2c+1 of qh[32h + j]; 16 sub-blocks of 16 values with int8 scales.

linear = dequantize to float32, cast to the compute dtype, `F.linear` (correct; faster kernels come later).
embedding = gather the rows of `q` for the ids, dequantize only those.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import PartSpec

# name -> (ggml type id, values per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210), "BF16": (30, 1, 2),
}
SUPPORTED_TYPES = tuple(GGML_TYPES)
_BY_ID = {v[0]: k for k, v in GGML_TYPES.items()}


def type_name(ggml_type) -> str:
    """'Q4_K' from 'Q4_K', 12 or gguf.GGMLQuantizationType.Q4_K; ValueError for types graphrt cannot read."""
    if isinstance(ggml_type, str):
        name = ggml_type.upper()
    elif isinstance(getattr(ggml_type, "name", None), str):  # gguf.GGMLQuantizationType (an IntEnum)
        name = ggml_type.name
    else:
        name = _BY_ID.get(int(ggml_type), f"type {int(ggml_type)}")
    if name not in GGML_TYPES:
        raise ValueError(f"GGUF tensor type {name} is not supported; graphrt reads {', '.join(SUPPORTED_TYPES)}")
    return name


def row_bytes(ggml_type, in_features: int) -> int:
    name = type_name(ggml_type)
    _, block, size = GGML_TYPES[name]
    if in_features % block:
        raise ValueError(f"a GGUF {name} row of {in_features} values is not a whole number of {block}-value blocks")
    return in_features // block * size


# ---- dequantization -------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """float32 [..., 1] from the little-endian half at byte `at` of each block ([..., type_size] uint8)."""
    return b[..., at:at + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8n] their bits, little-endian (bit i of byte j at 8j + i)."""
    return torch.stack([(b >> i) & 1 for i in range(8)], dim=-1).flatten(-2)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K packed 6-bit scales [..., 12] -> (scales, mins) [..., 8] as float32."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _dq_q8_0(b):
    return b[..., 2:].contiguous().view(torch.int8).to(torch.float32) * _f16(b, 0)


def _dq_q4_0(b):
    return _f16(b, 0) * (_nibbles(b[..., 2:]).to(torch.int8) - 8).to(torch.float32)


def _dq_q4_1(b):
    return _f16(b, 0) * _nibbles(b[..., 4:]).to(torch.float32) + _f16(b, 2)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return _nibbles(qs) | (_bits(qh) << 4)


def _dq_q5_0(b):
    return _f16(b, 0) * (_q5(b[..., 2:6], b[..., 6:]).to(torch.int8) - 16).to(torch.float32)


def _dq_q5_1(b):
    return _f16(b, 0) * _q5(b[..., 4:8], b[..., 8:]).to(torch.float32) + _f16(b, 2)


def _dq_k(b, q):
    """Q4_K / Q5_K: q [..., 8, 32] codes -> [..., 256]."""
    sc, mn = _k_scales(b[..., 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)
    dm = (_f16(b, 2) * mn).unsqueeze(-1)
    return (d * q.to(torch.float32) - dm).flatten(-2)


def _dq_q4_k(b):
    qs = b[..., 16:].unflatten(-1, (4, 32))                           # 4 chunks of 32 bytes
    q = torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-3, -2)       # [..., 8, 32]
    return _dq_k(b, q)


def _dq_q5_k(b):
    qh = b[..., 16:48]
    qs = b[..., 48:].unflatten(-1, (4, 32))
    lo = torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-3, -2)      # [..., 8, 32]
    hi = torch.stack([(qh >> s) & 1 for s in range(8)], dim=-2)       # [..., 8, 32]
    return _dq_k(b, lo | (hi << 4))


def _dq_q6_k(b):
    ql = b[..., 0:128].unflatten(-1, (2, 64))                         # 2 halves
    qh = b[..., 128:192].unflatten(-1, (2, 32))
    sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_f16(b, 208) * sc).unsqueeze(-1)                              # [..., 16, 1]
    lo = torch.cat([ql & 15, ql >> 4], dim=-1).unflatten(-1, (4, 32))  # [..., 2, 4, 32]
    hi = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)   # [..., 2, 4, 32]
    q = ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
    return (d * q.flatten(-3).unflatten(-1, (16, 16))).flatten(-2)


_DEQUANT = {"Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
            "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(raw: torch.Tensor, ggml_type) -> torch.Tensor:
    """GGUF rows, uint8 [rows, bytes_per_row] -> float32 [rows, in] (bit-exact with gguf.quants.dequantize)."""
    name = type_name(ggml_type)
    _, block, size = GGML_TYPES[name]
    rows, nbytes = raw.shape
    if nbytes % size:
        raise ValueError(f"GGUF {name} rows of {nbytes} bytes are not whole {size}-byte blocks")
    if name in _FLOAT:
        return raw.contiguous().view(_FLOAT[name]).to(torch.float32)
    blocks = raw.reshape(rows, nbytes // size, size)
    return _DEQUANT[name](blocks).reshape(rows, nbytes // size * block)


@dataclass(frozen=True)
class GGUFQuant:
    """A matrix stored as GGUF `ggml_type` rows (name like "Q4_K", a type id, or a gguf.GGMLQuantizationType)."""
    ggml_type: str
    compute_dtype: torch.dtype
    name: str = field(default="", init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ggml_type", type_name(self.ggml_type))
        object.__setattr__(self, "name", f"gguf-{self.ggml_type.lower()}")

    @property
    def block(self) -> tuple[int, int]:
        """(values, bytes) per block."""
        return GGML_TYPES[self.ggml_type][1:]

    def parts(self, shape: tuple[int, int]) -> tuple[PartSpec, ...]:
        out, inp = (int(s) for s in shape)
        return (PartSpec("q", (out, row_bytes(self.ggml_type, inp)), torch.uint8),)

    def encode(self, dense: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Float matrix -> GGUF rows (with the `gguf` package's quantizer: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
        float types; GGUF files bring their rows already encoded)."""
        w = dense.detach().to("cpu", torch.float32)
        if self.ggml_type in _FLOAT:
            return {"q": w.to(_FLOAT[self.ggml_type]).contiguous().view(torch.uint8)}
        import gguf
        qtype = gguf.GGMLQuantizationType[self.ggml_type]
        try:
            raw = gguf.quants.quantize(w.numpy(), qtype)
        except NotImplementedError:
            raise ValueError(f"cannot quantize to GGUF {self.ggml_type} (the gguf package has no quantizer for "
                             "it); load the GGUF file's own rows instead") from None
        return {"q": torch.from_numpy(raw.copy())}

    def dense(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(parts["q"], self.ggml_type).to(dtype)

    def linear(self, x: torch.Tensor, parts: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dense(parts, x.dtype), bias)

    def embedding(self, ids: torch.Tensor, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        rows = parts["q"].index_select(0, ids.reshape(-1))
        return dequantize(rows, self.ggml_type).view(*ids.shape, -1).to(dtype)
