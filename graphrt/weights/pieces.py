"""Pieces: a group larger than a ring slot, cut into row ranges of its matrices that each fit one slot.

A plan that computes every non-resident MLP group on the CPU lane streams only attention groups at decode, so its
ring slots are sized for them (a quarter of an 8B MLP group); the memory this frees holds more resident groups.
Prompt steps, whose many tokens cost the CPU more than the copy, still stream those MLP groups over PCIe: as
pieces. Piece i of a group holds rows [r0, r1) of one of its matrices (the group's vectors ride with piece 0), laid
out from byte 0 of a slot, and is filled from the group's host buffer by a few copies: each stored part of a
matrix is cut along its row axis (`format.row_axis`, 0 unless the format says otherwise), which for a part stored
row-major is one range and for one stored [in / G, out, ...] (int4 scales) is one range per leading index.
Row ranges are multiples of ROW_ALIGN, which every packed layout's row tiles divide.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .formats import PartSpec
from .formats.base import row_axis
from .layout import ALIGN, GroupLayout, TensorSpec

ROW_ALIGN = 128

Copy = tuple[int, int, int]   # (byte offset in the group's host buffer, byte offset in the slot, bytes)


@dataclass(frozen=True)
class Piece:
    layout: GroupLayout          # name "<group>/<i>", kind "piece": the sliced matrix (and, in piece 0, the vectors)
    group: str                   # the group it is cut from
    key: str                     # the matrix it holds rows of ("gate_up", "down", ...)
    rows: tuple[int, int]        # [r0, r1) of that matrix
    copies: tuple[Copy, ...]     # what fills a slot with it
    matrix_rows: int             # rows of the whole matrix
    ends_group: bool = False     # the group's last piece


def _cut(spec: TensorSpec, r0: int, r1: int, at: int) -> tuple[TensorSpec, list[Copy], int]:
    """Rows [r0, r1) of a matrix spec as a spec laid out from slot byte `at`: (spec, copies, next free byte)."""
    rows = spec.shape[0]
    sliced = {p.name: p for p in spec.format.parts((r1 - r0, *spec.shape[1:]))}
    parts, copies = [], []
    for full, offset in spec.parts:
        part: PartSpec = sliced[full.name]
        axis = row_axis(spec.format, full.name)
        unit = rows // full.shape[axis]          # matrix rows per index of the row axis (8 for tiles of 8 rows)
        if rows % full.shape[axis] or r0 % unit or (r1 - r0) % unit or part.shape[axis] != (r1 - r0) // unit:
            raise ValueError(f"{spec.key}: part {full.name} {full.shape} cannot be cut at rows {r0}..{r1}")
        outer = 1
        for s in full.shape[:axis]:
            outer *= s
        inner = full.nbytes // (outer * full.shape[axis])     # bytes per index of the row axis
        span = (r1 - r0) // unit * inner
        for o in range(outer):
            src, dst = offset + (o * full.shape[axis] + r0 // unit) * inner, at + o * span
            if copies and copies[-1][0] + copies[-1][2] == src and copies[-1][1] + copies[-1][2] == dst:
                copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + span)
            else:
                copies.append((src, dst, span))
        parts.append((part, at))
        at += -(-part.nbytes // ALIGN) * ALIGN
    return TensorSpec(spec.key, (), (r1 - r0, *spec.shape[1:]), spec.format, tuple(parts)), copies, at


def _vectors(layout: GroupLayout) -> tuple[list[TensorSpec], list[Copy], int]:
    specs, copies, at = [], [], 0
    for t in layout.tensors:
        if t.is_matrix:
            continue
        (part, offset), = t.parts
        specs.append(TensorSpec(t.key, t.sources, t.shape, t.format, ((part, at),)))
        copies.append((offset, at, part.nbytes))
        at += -(-part.nbytes // ALIGN) * ALIGN
    return specs, copies, at


def _row_bytes(spec: TensorSpec) -> float:
    return sum(p.nbytes for p, _ in spec.parts) / spec.shape[0]


def cut_group(layout: GroupLayout, slot_bytes: int) -> list[Piece] | None:
    """The group as pieces that each fit `slot_bytes`, matrices in the group's order, each cut into ranges of
    about equal rows (one piece where it fits whole); None where a matrix cannot be cut (rows not a multiple of
    ROW_ALIGN, or a slot too small for ROW_ALIGN rows and the vectors)."""
    vectors, vector_copies, vector_bytes = _vectors(layout)
    pieces: list[Piece] = []
    for spec in (t for t in layout.tensors if t.is_matrix):
        rows = spec.shape[0]
        room = slot_bytes - (vector_bytes if not pieces else 0) - len(spec.parts) * ALIGN
        fit = int(room // _row_bytes(spec))
        most = fit // ROW_ALIGN * ROW_ALIGN
        if rows <= fit:      # the whole matrix in one piece: any row count
            step = rows
        elif rows % ROW_ALIGN or most < ROW_ALIGN:
            return None
        else:
            count = -(-rows // most)
            step = -(-rows // count // ROW_ALIGN) * ROW_ALIGN
        for r0 in range(0, rows, step):
            first = not pieces
            extra, copies, at = (vectors, list(vector_copies), vector_bytes) if first else ([], [], 0)
            cut, more, end = _cut(spec, r0, min(r0 + step, rows), at)
            if end > slot_bytes:
                return None
            name = f"{layout.name}/{len(pieces)}"
            piece_layout = GroupLayout(name, "piece", layout.layer, tuple(extra) + (cut,), end)
            pieces.append(Piece(piece_layout, layout.name, spec.key, (r0, min(r0 + step, rows)),
                                tuple(copies + more), rows))
    return pieces[:-1] + [replace(pieces[-1], ends_group=True)] if pieces else None
