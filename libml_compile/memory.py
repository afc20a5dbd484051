"""Memory planning: every intermediate of a plan lives in one arena at an offset chosen here.

Input: buffers with byte sizes and live intervals ``[start, end]`` in instruction indices (inclusive;
a buffer is written at ``start`` and last read at ``end``).  Two buffers may share bytes only if their
intervals are disjoint.  Placement is greedy by size (largest first, lowest offset that fits beside the
already placed buffers whose intervals overlap), which is the standard heuristic (TFLite, tinygrad) and
lands within a few percent of the liveness lower bound on MLP training graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALIGN = 64


def align(n, a=ALIGN):
    return (int(n) + a - 1) // a * a


@dataclass
class Buffer:
    name: str
    nbytes: int
    start: int
    end: int
    offset: int = -1
    tensors: list = field(default_factory=list)


def place(buffers):
    """Assign ``offset`` to every buffer; returns the arena size in bytes."""
    placed = []
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.start, b.name)):
        size = align(b.nbytes)
        busy = sorted((p.offset, p.offset + align(p.nbytes)) for p in placed
                      if p.start <= b.end and b.start <= p.end)
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        b.offset = off
        placed.append(b)
    return max((b.offset + align(b.nbytes) for b in buffers), default=0)


def lower_bound(buffers):
    """Peak of live bytes over the schedule: no placement can use less."""
    if not buffers:
        return 0
    last = max(b.end for b in buffers)
    return max(sum(align(b.nbytes) for b in buffers if b.start <= t <= b.end) for t in range(last + 1))


def check_no_overlap(buffers):
    """Raise AssertionError if two buffers that are live at the same time share bytes."""
    bs = sorted(buffers, key=lambda b: b.offset)
    for i, a in enumerate(bs):
        for b in bs[i + 1:]:
            if b.offset >= a.offset + align(a.nbytes):
                break
            if a.start <= b.end and b.start <= a.end and a.nbytes and b.nbytes:
                raise AssertionError(f"buffers {a.name} and {b.name} overlap in time and space")


@dataclass
class MemoryReport:
    """What the planner did for one entry (``prog.memory_report()``).

    arena_bytes: the arena size; lower_bound_bytes: peak live bytes of the planned buffers (no placement
    does better); naive_bytes: the sum of all intermediates of the unfused graph, one buffer each (what an
    executor without fusion or reuse allocates); intervals: [(buffer, offset, nbytes, first instruction,
    last instruction, tensors sharing it)]; buffers_bytes: the sum of the planned buffers (after fusion
    and in-place reuse, before sharing by liveness).
    """
    entry: str
    arena_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    intervals: list
    buffers_bytes: int = 0

    def __str__(self):
        return (f"memory[{self.entry}]: arena {self.arena_bytes / 1e6:.3f} MB, liveness lower bound "
                f"{self.lower_bound_bytes / 1e6:.3f} MB, naive {self.naive_bytes / 1e6:.3f} MB "
                f"({len(self.intervals)} buffers)")

    __repr__ = __str__

    def plot(self, path):
        """Draw the memory timeline (instruction index vs arena offset) to ``path`` (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("memory_report().plot needs matplotlib: pip install 'libml[plot]'") from e
        fig, ax = plt.subplots(figsize=(10, 5))
        for name, off, nbytes, s, e, _ in self.intervals:
            ax.add_patch(plt.Rectangle((s - 0.4, off / 1e6), e - s + 0.8, max(nbytes, 1) / 1e6, alpha=0.6,
                                       edgecolor="k", linewidth=0.3))
        ax.set_xlim(-1, max((iv[4] for iv in self.intervals), default=0) + 1)
        ax.set_ylim(0, max(self.arena_bytes, 1) / 1e6 * 1.05)
        ax.axhline(self.lower_bound_bytes / 1e6, color="r", linestyle="--", label="liveness lower bound")
        ax.set_xlabel("instruction")
        ax.set_ylabel("arena offset (MB)")
        ax.set_title(str(self))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
