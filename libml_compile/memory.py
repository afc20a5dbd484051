"""Memory planning: every intermediate of a plan lives in one arena at an offset chosen here.

``plan_arena`` takes a schedule as a generic instruction list (``Instruction``: the storage keys each
instruction reads, the buffers it writes, which inputs' buffers an output may take over, its scratch
buffers) and does the three steps over it: liveness (a buffer is live from the instruction that writes
it to its last reader), in-place reuse (an output takes over an input buffer that dies at that
instruction) and placement (``place``).  It knows nothing of what the instructions compute: the caller
(``lower.lower_entry``) decides which keys name the same storage and which outputs may reuse which inputs.

Placement input: buffers with byte sizes and live intervals ``[start, end]`` in instruction indices
(inclusive; a buffer is written at ``start`` and last read at ``end``).  Two buffers may share bytes only
if their intervals are disjoint.  Placement is greedy by size (largest first, lowest offset that fits
beside the already placed buffers whose intervals overlap), which is the standard heuristic (TFLite,
tinygrad) and lands within a few percent of the liveness lower bound on MLP training graphs.
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


@dataclass
class Instruction:
    """One instruction of a schedule, as the planner sees it.  Keys are the caller's hashable names of
    storage (two keys are two storages: the caller resolves aliases such as views before).

    reads: keys it reads, in operand order (repeats allowed); keys no instruction writes (inputs, params,
    constants: storage outside the arena) are ignored.  writes: ``(key, name, nbytes)`` of each buffer it
    writes, in order (``name`` is the buffer's name in reports).  reuse: ``{write key: [read keys]}``, the
    inputs whose buffer that output may take over instead of a buffer of its own (the caller has checked
    that it may overwrite them element for element); the planner takes the first that dies here, has the
    output's ``nbytes`` and is not taken by another output of this instruction.  scratch: ``(name,
    nbytes)`` of working buffers live during this instruction only; parts: outputs placed inside another
    key's buffer (below)."""
    reads: list
    writes: list
    reuse: dict = field(default_factory=dict)
    scratch: tuple = ()
    # {write key: (outer key, outer name, outer nbytes, byte offset)}: that output is a part of the outer
    # key's buffer, at the byte offset inside it (an assemble written in place by its parts' GEMMs); the
    # outer buffer is created by the first part written and lives to the outer key's last reader
    parts: dict = field(default_factory=dict)


@dataclass
class ArenaPlan:
    """What ``plan_arena`` decided.  buffers: write key -> its Buffer (outputs written in place share
    their input's Buffer); scratch: instruction index -> its scratch Buffers, in ``Instruction.scratch``
    order; unique: every distinct Buffer, in the order first written; arena_bytes: the arena size; inner:
    the byte offset of each part (``Instruction.parts``) inside its buffer (``buffers[key]``)."""
    buffers: dict
    scratch: dict
    unique: list
    arena_bytes: int
    inner: dict = field(default_factory=dict)  # part write key -> byte offset inside its buffer


def plan_arena(instructions, live_out=()):
    """Liveness, in-place reuse and placement over ``instructions`` (a list of ``Instruction``, in
    execution order); ``live_out``: keys read after the last instruction (the entry's outputs), which
    stay live to the end and are never overwritten in place.

    A buffer is created at the instruction writing its key (start = end = that index) and its end
    extended to each later instruction reading it.  An output with ``reuse`` candidates takes over the
    first candidate's buffer whose last reader is this instruction, whose ``nbytes`` equal the output's
    and that no other output of this instruction took; the buffer then also holds the output (its
    ``tensors`` list both names) and lives on to the output's last reader.  Rewriting a key drops its
    earlier buffer.  Returns an ``ArenaPlan``; every Buffer's ``offset`` is set (``place``)."""
    n = len(instructions)
    last_read = {}
    for k, ins in enumerate(instructions):
        for key in ins.reads:
            last_read[key] = k
    for key in live_out:
        last_read[key] = n
    buffers, scratch = {}, {}
    outer, inner = {}, {}  # outer key -> its buffer (Instruction.parts); part key -> byte offset in it
    slots = {}  # every buffer under a key of its own (write keys and scratch): `unique` in first-write order
    for k, ins in enumerate(instructions):
        for key in ins.reads:
            b = buffers.get(key)
            if b is not None:
                b.end = max(b.end, k)
        taken = []
        for key, name, nbytes in ins.writes:
            if key in ins.parts:  # a part of another key's buffer
                okey, oname, onbytes, off = ins.parts[key]
                b = outer.get(okey)
                if b is None:
                    b = outer[okey] = buffers[okey] = slots[("write", okey)] = Buffer(oname, onbytes, k, k,
                                                                                   tensors=[oname])
                b.end = max(b.end, k)
                b.tensors.append(name)
                buffers[key] = b
                inner[key] = off
                continue
            b = _reusable(ins.reuse.get(key, ()), k, nbytes, buffers, last_read, taken) if ins.reuse else None
            if b is not None:
                b.tensors.append(name)
                taken.append(b)
            else:
                b = Buffer(name, nbytes, k, k, tensors=[name])
            buffers[key] = slots[("write", key)] = b
        if ins.scratch:
            scratch[k] = [Buffer(name, nbytes, k, k) for name, nbytes in ins.scratch]
            for j, b in enumerate(scratch[k]):
                slots[("scratch", k, j)] = b
    for key in live_out:
        b = buffers.get(key)
        if b is not None:
            b.end = n
    unique = list({id(b): b for b in slots.values()}.values())
    return ArenaPlan(buffers, scratch, unique, place(unique), inner)


def _reusable(candidates, k, nbytes, buffers, last_read, taken):
    """The first candidate key's buffer that instruction ``k`` may write in place: last read here (and
    not live after it), of ``nbytes``, not taken by another output of ``k``; else None."""
    for key in candidates:
        b = buffers.get(key)
        if b is None or last_read.get(key) != k or b.end > k:
            continue
        if b.nbytes != nbytes or any(t is b for t in taken):
            continue
        return b
    return None


GREEDY_PAIR_BUDGET = 300_000  # time-overlapping buffer pairs greedy-by-size may look at


def place(buffers):
    """Assign ``offset`` to every buffer; returns the arena size in bytes.

    Two placements, the smaller arena wins: greedy by size (largest first, lowest offset beside the
    time-overlapping placed buffers: the best on MLP training graphs) when the number of overlapping
    pairs it must look at is within GREEDY_PAIR_BUDGET (its cost is that number times a log), and always a
    sweep over time with a best-fit free list, O(n log n) (what a malloc does, knowing every lifetime)."""
    if not buffers:
        return 0
    arena = _place_sweep(buffers)
    if overlapping_pairs(buffers) <= GREEDY_PAIR_BUDGET:
        swept = [b.offset for b in buffers]
        greedy = _place_greedy(buffers)
        if greedy <= arena:
            return greedy
        for b, off in zip(buffers, swept):
            b.offset = off
    return arena


def overlapping_pairs(buffers):
    """Number of buffer pairs whose live intervals overlap (sweep over sorted starts and ends)."""
    import bisect
    ends = sorted(b.end for b in buffers)
    pairs = 0
    starts = sorted(b.start for b in buffers)
    for b in buffers:
        # buffers that start no later than b ends, minus those that end before b starts, minus b itself
        pairs += bisect.bisect_right(starts, b.end) - bisect.bisect_left(ends, b.start) - 1
    return pairs // 2


def _overlaps(buffers):
    """{index: [indices of the buffers live at the same time]}, by a sweep: O(n log n + pairs)."""
    import heapq
    nb = {i: [] for i in range(len(buffers))}
    active = []  # (end, index)
    for i in sorted(range(len(buffers)), key=lambda i: buffers[i].start):
        b = buffers[i]
        while active and active[0][0] < b.start:
            heapq.heappop(active)
        for _, j in active:
            nb[i].append(j)
            nb[j].append(i)
        heapq.heappush(active, (b.end, i))
    return nb


def _place_greedy(buffers):
    nb = _overlaps(buffers)
    placed = [False] * len(buffers)
    for i in sorted(range(len(buffers)), key=lambda i: (-buffers[i].nbytes, buffers[i].start, buffers[i].name)):
        b = buffers[i]
        size = align(b.nbytes)
        busy = sorted((buffers[j].offset, buffers[j].offset + align(buffers[j].nbytes)) for j in nb[i] if placed[j])
        off = 0
        for lo, hi in busy:
            if off + size <= lo:
                break
            off = max(off, hi)
        b.offset = off
        placed[i] = True
    return max(b.offset + align(b.nbytes) for b in buffers)


def _place_sweep(buffers):
    """Walk the schedule: free the buffers whose last read has passed, then place the ones written now
    (largest first) in the smallest free block that fits, else at the top of the arena (growing a free
    block that ends there).  Free blocks are kept sorted by offset and coalesced."""
    import bisect
    import heapq
    free_off, free_len = [], []  # free blocks, sorted by offset, never adjacent
    top = 0
    live = []  # (end, seq, offset, size)

    def release(off, size):
        k = bisect.bisect_left(free_off, off)
        if k > 0 and free_off[k - 1] + free_len[k - 1] == off:  # merge with the block below
            k -= 1
            free_len[k] += size
        else:
            free_off.insert(k, off)
            free_len.insert(k, size)
        if k + 1 < len(free_off) and free_off[k] + free_len[k] == free_off[k + 1]:  # and above
            free_len[k] += free_len.pop(k + 1)
            free_off.pop(k + 1)

    order = sorted(range(len(buffers)), key=lambda i: (buffers[i].start, -buffers[i].nbytes, buffers[i].name))
    for seq, i in enumerate(order):
        b = buffers[i]
        while live and live[0][0] < b.start:
            _, _, off, size = heapq.heappop(live)
            release(off, size)
        size = align(b.nbytes)
        best = -1
        for k, ln in enumerate(free_len):  # fragments are few: the free list stays short
            if ln >= size and (best < 0 or ln < free_len[best]):
                best = k
        if best >= 0:
            off = free_off[best]
            if free_len[best] == size:
                free_off.pop(best)
                free_len.pop(best)
            else:
                free_off[best] += size
                free_len[best] -= size
        elif free_off and free_off[-1] + free_len[-1] == top:  # extend the block at the top
            off = free_off.pop()
            top = off + size
            free_len.pop()
        else:
            off, top = top, top + size
        b.offset = off
        if size:
            heapq.heappush(live, (b.end, seq, off, size))
    return top


def lower_bound(buffers):
    """Peak of live bytes over the schedule: no placement can use less (a sweep over start/end events)."""
    delta = {}
    for b in buffers:
        n = align(b.nbytes)
        delta[b.start] = delta.get(b.start, 0) + n
        delta[b.end + 1] = delta.get(b.end + 1, 0) - n
    peak = cur = 0
    for t in sorted(delta):
        cur += delta[t]
        peak = max(peak, cur)
    return peak


def check_no_overlap(buffers):
    """Raise AssertionError if two buffers that are live at the same time share bytes.

    Sweep over time keeping the live buffers sorted by offset: they never overlap (checked on insertion),
    so a new buffer can only collide with its neighbours in that order."""
    import bisect
    import heapq
    live_off, live_buf, ending = [], [], []
    for seq, b in enumerate(sorted((b for b in buffers if b.nbytes), key=lambda b: (b.start, b.offset))):
        while ending and ending[0][0] < b.start:
            _, _, gone = heapq.heappop(ending)
            k = bisect.bisect_left(live_off, gone.offset)
            while live_buf[k] is not gone:
                k += 1
            live_off.pop(k)
            live_buf.pop(k)
        k = bisect.bisect_left(live_off, b.offset)
        for n in (live_buf[k - 1] if k > 0 else None, live_buf[k] if k < len(live_buf) else None):
            if n is not None and n.offset < b.offset + align(b.nbytes) and b.offset < n.offset + align(n.nbytes):
                raise AssertionError(f"buffers {n.name} and {b.name} overlap in time and space")
        live_off.insert(k, b.offset)
        live_buf.insert(k, b)
        heapq.heappush(ending, (b.end, seq, b))


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
