"""Where weights live: resident device buffers, pinned host buffers for streamed groups, the ring."""
from __future__ import annotations

import mmap
import sys

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint
from ..config import ConfigError
from .copy_kernel import available as copy_kernel_available, copy_h2d
from .formats import for_cpu
from .layout import GroupLayout
from .pieces import Piece


class PinnedMemoryError(MemoryError):
    """Host memory for streamed weights could not be page-locked."""


PAGE = 4096


def host_mapping(size: int) -> mmap.mmap:
    """`size` bytes of private anonymous memory, advised to sit on huge pages where the kernel allows (the CPU lane
    reads its weights from such buffers, hundreds of MB a step; on the H100 host the CPU read them no faster than
    4 KiB pages within the noise of a run). Python's default anonymous mmap is a shared mapping, which Linux backs
    with shared memory."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:   # kernels without transparent huge pages
            pass
    return m


def host_empty(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer of exactly `nbytes` in a `host_mapping` of its own (not pinned): the CPU lane's weights."""
    try:
        return torch.frombuffer(host_mapping(-(-max(nbytes, 1) // PAGE) * PAGE), dtype=torch.uint8)[:nbytes]
    except (OSError, ValueError) as e:
        raise MemoryError(f"cannot allocate {nbytes / 2**30:.2f} GiB of host memory for CPU-lane weights ({e}); "
                          "free host RAM, or give a larger gpu_budget so fewer groups stay in host memory") from None


def pinned_empty(nbytes: int, mapped: bool = False) -> torch.Tensor:
    """A uint8 host buffer of exactly `nbytes`, page-locked with cudaHostRegister. The memory is an
    anonymous mapping of its own (`host_mapping`: page-aligned, never shared with another allocation), so the
    whole storage is registered and torch sees it as pinned; the caching host allocator would instead round
    large requests up to a power of two. Call `unpin` before dropping it."""
    size = -(-max(nbytes, 1) // PAGE) * PAGE
    try:
        buf = torch.frombuffer(host_mapping(size), dtype=torch.uint8)
    except (OSError, ValueError, RuntimeError) as e:
        raise PinnedMemoryError(f"cannot allocate {nbytes / 2**30:.2f} GiB of host memory for streamed "
                                f"weights ({e}); free host RAM or give a larger gpu_budget") from None
    # mapped (flags portable | mapped): kernels may read it through its address (copy_kernel.py)
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 3 if mapped else 0)
    if int(err) != 0:
        raise PinnedMemoryError(
            f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (error {int(err)}): page-locked memory is "
            "limited by RAM and by `ulimit -l`; raise the limit, free RAM, or give a larger gpu_budget")
    return buf[:nbytes]


def unpin(buf: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


class RingBuffer:
    """N static device slots of equal size; each holds one streamed group at a time."""

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device):
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]

    def __len__(self) -> int:
        return len(self.slots)

    def poison(self, slot: int) -> None:
        """Fill a slot with 0xFF bytes: NaN in every float dtype and scale (debugging: a read that does
        not wait for its copy then shows)."""
        self.slots[slot].fill_(255)


class WeightStore:
    """Typed views of every group: resident ones on the device, streamed ones in ring slots, CPU-lane ones in
    host memory (in the formats of the CPU's policy)."""

    def __init__(self, ckpt: Checkpoint, groups: tuple[GroupLayout, ...], resident: frozenset[str],
                 ring_depth: int, slot_bytes: int, device: torch.device, progress: bool | None,
                 cpu: frozenset[str] = frozenset(), shard=None, prompt_streamed: frozenset[str] = frozenset(),
                 copy_mode: str = "memcpy", cpu_rows: int = 1, pieces: dict[str, Piece] | None = None):
        """prompt_streamed: CPU-lane groups that prompt steps also copy into ring slots (their one host buffer
        is pinned on CUDA and serves both), `pieces` of them (by piece name) where a slot is smaller. cpu_rows: the
        rows a CPU-lane step computes (the batch), for the CPU kernels' packed copies (`for_cpu`)."""
        self.device = device
        self.copy_kernel = copy_mode == "kernel" and device.type == "cuda"   # else a copy-engine memcpy
        mapped = self.copy_kernel
        if mapped and not copy_kernel_available(device.index or 0):
            raise ConfigError("copy_mode='kernel' needs NVRTC and torch.cuda._compile_kernel (torch >= 2.8) on this "
                              "GPU; use copy_mode='memcpy'")
        self.pieces: dict[str, Piece] = dict(pieces or {})
        self.layouts: dict[str, GroupLayout] = {g.name: g for g in groups} | {
            n: c.layout for n, c in self.pieces.items()}
        self.resident: dict[str, torch.Tensor] = {}
        self.host: dict[str, torch.Tensor] = {}       # streamed groups (pinned on CUDA)
        self.cpu = frozenset(cpu)                       # groups the CPU lane computes, from `cpu_buffers`
        self.cpu_buffers: dict[str, torch.Tensor] = {}
        streamed = [g for g in groups if g.name not in resident and g.name not in self.cpu]
        self.ring = RingBuffer(ring_depth, slot_bytes, device) if streamed else None
        staging: dict[str, torch.Tensor] = {}

        def buffer_for(g: GroupLayout) -> torch.Tensor:
            if g.name in self.cpu:
                if g.name in prompt_streamed and self.ring is not None:
                    buf = pinned_empty(g.nbytes, mapped) if device.type == "cuda" else host_empty(g.nbytes)
                    self.host[g.name] = buf
                else:
                    buf = host_empty(g.nbytes)
                self.cpu_buffers[g.name] = buf
                return buf
            if g.name in resident:
                staging[g.name] = torch.empty(g.nbytes, dtype=torch.uint8)
                return staging[g.name]
            host = pinned_empty(g.nbytes, mapped) if device.type == "cuda" else torch.empty(g.nbytes, dtype=torch.uint8)
            self.host[g.name] = host
            return host

        total = sum(g.nbytes for g in groups)
        show = sys.stderr.isatty() and total > 2**30 if progress is None else progress
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show)
        for g in ckpt.fill_groups(list(groups), buffer_for, device, **({"shard": shard} if shard else {})):
            if g.name in resident:
                self.resident[g.name] = staging.pop(g.name).to(device)
            bar.update(g.nbytes)
        bar.close()
        self._resident_views = {n: self.layouts[n].views(b) for n, b in self.resident.items()}
        self._resident_views.update({n: for_cpu(self.layouts[n].views(b), cpu_rows) for n, b in self.cpu_buffers.items()})
        self._slot_views = {(n, s): self.layouts[n].views(self.ring.slots[s])
                            for n in [*self.host, *self.pieces] for s in range(len(self.ring))
                            if self.layouts[n].nbytes <= slot_bytes} if self.ring else {}  # (groups in pieces: no)

    def views(self, group: str, slot: int | None = None) -> dict[str, torch.Tensor]:
        return self._resident_views[group] if slot is None else self._slot_views[(group, slot)]

    def copy_to_slot(self, group: str, slot: int) -> None:
        """One copy moves the whole group (on the current stream): a memcpy, or the copy kernel (copy_mode). A piece
        takes a few copies from its group's host buffer."""
        piece = self.pieces.get(group)
        src = self.host[piece.group if piece else group]
        for at, to, n in piece.copies if piece else [(0, 0, src.numel())]:
            if self.copy_kernel:
                copy_h2d(self.ring.slots[slot][to:to + n], src[at:at + n])
            else:
                self.ring.slots[slot][to:to + n].copy_(src[at:at + n], non_blocking=True)

    def release(self) -> None:
        """Unregister the pinned host buffers (before their memory goes back to the allocator)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still read them
            for buf in self.host.values():
                unpin(buf)
        self.host.clear()
        self._slot_views = {}

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass
