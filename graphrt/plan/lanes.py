"""The CPU lane's plans: whole MLP groups on the CPU (`lane_candidates`), and MLPs split by intermediate rows
between the GPU and the CPU (`split_candidates`).

A lane plan moves whole MLP groups (336 MiB each at the 8B shape in bf16) between homes, so the copy engine and the
CPU rarely finish together: at batch 1 the CPU is the longer lane and the copy engine idles a third of the step; at
16 sequences the copy engine is the longer one. Splitting an MLP by intermediate rows (gate and up rows, down
columns; weights/layout.mlp_parts) moves bytes between them in small steps:
  - "streamed": each lane MLP keeps its first `c` rows on the GPU, streamed through the ring in an attention-sized
    slot; the CPU computes the rest. Bytes move from the CPU to the copy engine.
  - "resident": one resident MLP keeps `c` rows resident and gives the rest to the CPU; the memory this frees holds
    more attention groups resident, which then no longer stream. Bytes move from the copy engine to the CPU.
  - "beside" (`beside_candidates`): every MLP keeps its first `c` rows resident and gives the rest to the CPU, the
    attention groups that fit stay resident and the others stream. Where the lane lets the GPU go on after posting
    (signalled nodes), the CPU computes a layer's rows while the GPU computes the layer's resident rows, so the CPU
    is idle only while the GPU runs attention, the head and the lane's round trips, not the resident MLPs. Its
    16 smaller CPU groups pay a cost per group (plan/group_cost.py, priced): 0.12-0.15 ms on the H100 host while
    host functions ran Python, 0-35 us as C programs (weights/formats/cpu_program.py). Asked for only (placement
    "lane-beside"; docs/results/2026-11-26-session16.md): with auto weighing it, one H100 run took it for bf16 at
    batch 1 at 94% of the two-lane limit and the next at 81%, at 4 sequences 14% slower than predicted; and each
    split MLP rounds two partial products, so the default model's bf16 logits with every MLP split were 2.4% off
    the whole MLPs' (issue 17 bounds the lane's at 2%).
The GPU part (norm and its rows, "mlp.i:gpu") runs first, or beside the CPU part where it is resident
(placement.beside_groups); the CPU part ("mlp.i:cpu") reads its normed input, and the two products add to the
residual. Every candidate is priced by the simulator like any other plan.
"""
from __future__ import annotations

from typing import Callable, Iterator

from ..config import ModelConfig
from ..weights.layout import FormatPolicy, GroupLayout, mlp_parts, model_groups
from ..weights.pieces import cut_group

ROWS_UNIT = 256   # split points are multiples of this (GGUF K-quant blocks, int4 groups, CPU row tiles divide it)


def spread(seq: list, count: int) -> list:
    """`count` items of seq evenly over its length."""
    return [seq[int((i + 0.5) * len(seq) / count)] for i in range(count)]


def lane_candidates(groups, must, room: int, ring_depth: int):
    """(resident, cpu) sets where every non-resident MLP group is computed on the CPU lane, so decode streams only
    attention groups (and streamed ends) and the slots are sized for those; the memory smaller slots free holds more
    resident groups: m of the MLP groups (spread over the depth) and as many attention groups as the rest holds,
    for every m. Prompt steps stream the lane's groups in pieces (weights/pieces.py): only where they can be cut."""
    attns, mlps = [g for g in groups if g.kind == "attn"], [g for g in groups if g.kind == "mlp"]
    ends = [g for g in groups if g.kind in ("embed", "head") and g not in must]
    if not attns or not mlps:
        return
    for mask in range(1 << len(ends)):
        chosen = list(must) + [g for j, g in enumerate(ends) if mask >> j & 1]
        streamed_ends = [g for g in ends if g not in chosen]
        slot = max(g.nbytes for g in attns + streamed_ends)
        left = room - ring_depth * slot - sum(g.nbytes for g in chosen)
        for m in range(len(mlps) + 1):
            kept = spread(mlps, m)
            rest = left - sum(g.nbytes for g in kept)
            if rest < 0:
                break
            a = len(attns) - (0 if streamed_ends else 1)     # something must stream
            while a > 0 and sum(g.nbytes for g in spread(attns, a)) > rest:
                a -= 1
            resident = frozenset(g.name for g in chosen + kept + spread(attns, a))
            cpu = [g for g in mlps if g.name not in resident]
            ring = max(g.nbytes for g in attns + streamed_ends if g.name not in resident)   # the slot that results
            if all(g.nbytes <= ring or cut_group(g, ring) is not None for g in cpu):
                yield resident, frozenset(g.name for g in cpu)


def _part_bytes(cfg: ModelConfig, policy: FormatPolicy, layer: int, rows: int) -> int:
    return mlp_parts(cfg, layer, policy, rows)[0].nbytes


def _rows_grid(cfg: ModelConfig, policy: FormatPolicy, layer: int, limit: int, count: int = 16) -> list[int]:
    """Split points (GPU rows) whose GPU part fits `limit` bytes, at most `count` of them, evenly spaced."""
    f = cfg.intermediate_size
    points = [r for r in range(ROWS_UNIT, f, ROWS_UNIT) if _part_bytes(cfg, policy, layer, r) <= limit]
    if len(points) <= count:
        return points
    return [points[int((i + 0.5) * len(points) / count)] for i in range(count)]


def _layer(name: str) -> int:
    return int(name.split(".")[1])


Evaluate = Callable[[list[GroupLayout], frozenset, frozenset, dict[int, int]], object]   # -> Placement


def split_candidates(cfg: ModelConfig, policy: FormatPolicy, lane, room: int, evaluate: Evaluate) -> Iterator:
    """Placements derived from the lane plan `lane` (a Placement with CPU groups, attn_mlp units): its lane MLPs with
    GPU parts streamed, and one of its resident MLPs split with a resident GPU part. `room`: bytes the resident
    groups and the ring may take. evaluate(groups, resident, cpu, split {layer: GPU rows}) prices a candidate."""
    if cfg.intermediate_size < 2 * ROWS_UNIT or lane.split or not lane.cpu:
        return
    by_name = {g.name: g for g in lane.groups}
    cpu_layers = sorted(_layer(n) for n in lane.cpu)
    if lane.slot_bytes:   # streamed GPU parts in the ring's slots as they are
        for rows in _rows_grid(cfg, policy, cpu_layers[0], lane.slot_bytes):
            split = {i: rows for i in cpu_layers}
            groups = model_groups(cfg, policy, "attn_mlp", split=split)
            cpu = frozenset(f"mlp.{i}:cpu" for i in cpu_layers)
            yield evaluate(groups, lane.resident, cpu, split)
    kept = [g for g in lane.groups if g.kind == "mlp" and g.name in lane.resident]
    attns = [g for g in lane.groups if g.kind == "attn" and g.name not in lane.resident]
    if not kept or not attns:
        return
    chosen = kept[len(kept) // 2]
    i = _layer(chosen.name)
    used = sum(by_name[n].nbytes for n in lane.resident) + lane.ring_depth * lane.slot_bytes
    for rows in _rows_grid(cfg, policy, i, chosen.nbytes):
        gpu_part, cpu_part = mlp_parts(cfg, i, policy, rows)
        free = room - used + chosen.nbytes - gpu_part.nbytes
        more, left = [], attns[:-1]   # one attention group keeps streaming (the slots stay as they are)
        while left and free >= 0:
            g = left[len(left) // 2]
            if g.nbytes > free:
                break
            more.append(g.name)
            free -= g.nbytes
            left.remove(g)
        if not more:
            continue
        split = {i: rows}
        groups = model_groups(cfg, policy, "attn_mlp", split=split)
        resident = (lane.resident - {chosen.name}) | {gpu_part.name, *more}
        yield evaluate(groups, frozenset(resident), lane.cpu | {cpu_part.name}, split)


def beside_candidates(cfg: ModelConfig, policy: FormatPolicy, groups: list[GroupLayout], must, room: int,
                      ring_depth: int, evaluate: Evaluate) -> Iterator:
    """Placements where every MLP is split: its first `c` rows resident, the rest on the CPU lane; with the ends
    resident or not and `a` attention groups resident (spread over the depth), c the most rows the rest of `room`
    holds in every layer."""
    f, layers = cfg.intermediate_size, cfg.num_layers
    attns = [g for g in groups if g.kind == "attn"]
    if f < 2 * ROWS_UNIT or not attns:
        return
    ends = [g for g in groups if g.kind in ("embed", "head") and g not in must]
    unit = _part_bytes(cfg, policy, 0, 2 * ROWS_UNIT) - _part_bytes(cfg, policy, 0, ROWS_UNIT)   # per ROWS_UNIT rows
    base = _part_bytes(cfg, policy, 0, ROWS_UNIT) - unit                                         # the norm
    for mask in range(1 << len(ends)):
        chosen = list(must) + [g for j, g in enumerate(ends) if mask >> j & 1]
        streamed_ends = [g for g in ends if g not in chosen]
        slot = max(g.nbytes for g in attns + streamed_ends)
        for a in range(len(attns) - (0 if streamed_ends else 1), -1, -1):   # something streams
            kept = spread(attns, a) if a else []
            left = room - ring_depth * slot - sum(g.nbytes for g in chosen + kept)
            units = min((left // layers - base) // unit, f // ROWS_UNIT - 1) if left > 0 else 0
            if units < 1:
                continue
            split = {i: units * ROWS_UNIT for i in range(layers)}
            parts = model_groups(cfg, policy, "attn_mlp", split=split)
            resident = {g.name for g in chosen + kept} | {g.name for g in parts if g.kind == "mlp_gpu"}
            cpu = frozenset(g.name for g in parts if g.kind == "mlp_cpu")
            yield evaluate(parts, frozenset(resident), cpu, split)


def beside_groups(groups, streamed: set[str], cpu: frozenset[str], cost) -> frozenset[str]:
    """The CPU-lane parts of split MLPs whose GPU part is resident, where the lane lets the GPU go on
    (cost.lane_beside): each is posted before its GPU part and computed while it runs."""
    if cost is None or not cost.lane_beside or not cpu:
        return frozenset()
    return frozenset(g.name for prev, g in zip(groups, groups[1:]) if g.kind == "mlp_cpu" and g.name in cpu
                     and prev.kind == "mlp_gpu" and prev.name not in streamed and prev.name not in cpu)

