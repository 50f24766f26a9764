"""The packed int4 layouts of ATen's kernels, recovered without the kernels' help: the CUDA tinygemm layout by its
formula, the CPU layout (which depends on the CPU's vector ISA) by probing the pack op. Used by int4.py's `unpack`
and `encode` and by the tests."""
from __future__ import annotations

import functools

import torch


# ---- the CUDA (tinygemm, m16n8k16) layout -----------------------------------------------------------
def _to_uint8_pairs(q: torch.Tensor) -> torch.Tensor:
    """int32 codes [n, k] -> uint8 [n, k/2], byte j = q[2j] << 4 | q[2j+1] (the CUDA pack op's input)."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)


def _tinygemm_index(n: int, k: int, tiles: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """For the packed int32 tensor [n/8, k/(16T), 32, T/2] and its 8 nibbles (slot s = bits 4s..4s+3), the flat
    index n_idx * k + k_idx of the weight each nibble holds: [n/8, k/(16T), 32, T/2, 8] int64.

    From matrix_to_m16n8k16_Bint4_layout (aten/src/ATen/native/cuda/int4mm.cu): lane t of n-tile nt, outer
    k-tile ko, inner pair j reads row nt*8 + t//4 and the bytes kb(s') = (ko*T + 2j)*8 + 4*s' + t%4, s' = 0..3;
    slot s' holds the byte's high nibble (even k = 2*kb), slot s'+4 its low nibble (odd k = 2*kb + 1)."""
    kt = k // (16 * tiles)
    ar = functools.partial(torch.arange, device=device)
    nt = ar(n // 8).view(-1, 1, 1, 1, 1)
    ko = ar(kt).view(1, -1, 1, 1, 1)
    lane = ar(32).view(1, 1, -1, 1, 1)
    j = ar(tiles // 2).view(1, 1, 1, -1, 1)
    s = ar(8).view(1, 1, 1, 1, -1)
    row = nt * 8 + lane // 4
    byte = (ko * tiles + 2 * j) * 8 + 4 * (s % 4) + lane % 4
    col = 2 * byte + (s >= 4).long()
    return row * k + col


def pack_tinygemm(q: torch.Tensor, tiles: int) -> torch.Tensor:
    """Pure-torch equivalent of `_convert_weight_to_int4pack(_to_uint8_pairs(q), tiles)` (int32 codes in)."""
    n, k = q.shape
    nib = q.reshape(-1).to(torch.int64)[_tinygemm_index(n, k, tiles, q.device)]
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=q.device)
    word = (nib << shifts).sum(dim=-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_tinygemm(w: torch.Tensor) -> torch.Tensor:
    """Packed int32 [n/8, k/(16T), 32, T/2] -> int32 codes [n, k]."""
    nt, kt, _, half = w.shape
    tiles = 2 * half
    n, k = nt * 8, kt * 16 * tiles
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=w.device)
    nib = (w.unsqueeze(-1) >> shifts) & 15
    q = torch.empty(n * k, dtype=torch.int32, device=w.device)
    q[_tinygemm_index(n, k, tiles, w.device).reshape(-1)] = nib.reshape(-1)
    return q.view(n, k)


# ---- the CPU layout -----------------------------------------------------------------------------
def _probe_positions(n: int, k: int) -> torch.Tensor:
    """Nibble position (2 * byte + (1 if high nibble)) in `_convert_weight_to_int4pack_for_cpu`'s output of every
    weight (n_idx, k_idx) of an [n, k] matrix, found by packing the flat index 4 bits at a time."""
    total = n * k
    flat = torch.arange(total, dtype=torch.int64).view(n, k)
    source = torch.zeros(total, dtype=torch.int64)
    for p in range((max(total - 1, 1).bit_length() + 3) // 4):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((flat >> (4 * p)) & 15).to(torch.int32), 2)
        source |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << (4 * p)
    position = torch.empty(total, dtype=torch.int64)
    position[source] = torch.arange(total)
    return position.view(n, k)


@functools.lru_cache(maxsize=64)
def _cpu_row_model(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU layout packs rows in blocks: nibble position of (row, col) in an [n, k] matrix is
    block_start[row] * k + 2 * col * block_rows_half[row] + offset[row]. Measured from the op at k = 2 and
    k = 4, then checked at k = 6 (a layout that does not follow this model raises rather than misreads)."""
    p2, p4, p6 = _probe_positions(n, 2), _probe_positions(n, 4), _probe_positions(n, 6)
    start = (p4[:, 0] - p2[:, 0]) // 2          # block_start (rows before this row's block)
    stride = p2[:, 1] - p2[:, 0]                # nibbles per column within the block
    offset = p2[:, 0] - 2 * start
    cols = torch.arange(6)
    model = start[:, None] * 6 + cols[None, :] * stride[:, None] + offset[:, None]
    if not torch.equal(model, p6):
        raise RuntimeError("this torch build packs int4 weights for the CPU in a layout graphrt does not know; "
                           "use quantization='int8' on the CPU")
    return start, stride, offset


def _cpu_nibble_index(n: int, k: int, device: torch.device) -> torch.Tensor:
    """[n, k] int64: position of each weight's nibble in the flattened nibbles of the CPU-packed [n, k/2] bytes."""
    start, stride, offset = _cpu_row_model(n)
    cols = torch.arange(k, dtype=torch.int64)
    return (start[:, None] * k + cols[None, :] * stride[:, None] + offset[:, None]).to(device)
