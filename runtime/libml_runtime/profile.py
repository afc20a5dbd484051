"""Per-instruction timings of one entry: ``Executable.profile`` / ``Program.profile``.

The interpreter adds each instruction's wall time (``omp_get_wtime`` around it) into a float64 row, one
row per run; nothing else changes on the profiled path, so the figures are those of the normal call
(minus the Python around it, which ``call_ms`` shows).  Medians over runs, because these machines are
noisy: a 2x slowdown of one run says nothing about the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Profile:
    """What one entry's instructions cost.

    rows: one dict per instruction, in plan order: ``index``, ``op`` (instruction kind), ``node`` (the
    graph node it implements), ``kernel`` (the ahead-of-time kernel of vm_aot.txt a fused elementwise
    instruction runs, else None: the VM or the op's own kernel), ``median_ms``, ``min_ms``, ``share`` (of the summed instruction medians);
    ``Program.profile`` adds ``flops``, ``bytes``, ``gflops``, ``gbps`` and ``contents``.
    total_ms: median over runs of the summed instruction times.  call_ms: median wall time of the whole
    runtime call, feed binding and output copies included (the Python around the plan is
    ``call_ms - total_ms``).
    """

    entry: str
    repeat: int
    num_threads: int
    rows: list = field(default_factory=list)
    total_ms: float = 0.0
    call_ms: float = 0.0

    @classmethod
    def from_times(cls, entry, times, calls, ops, nodes, num_threads, kernels=None):
        """times: (repeat, n_instructions) seconds; calls: (repeat,) seconds per whole call; kernels: the
        ahead-of-time kernel's name (or None) per instruction."""
        kernels = kernels or [None] * times.shape[1]
        med, mn = np.median(times, axis=0), times.min(axis=0)
        total = float(np.median(times.sum(axis=1)))
        summed = float(med.sum())  # shares are of the summed medians, as documented (they add up to 1;
        # the median of per-run totals differs from it on a noisy machine: a CI run saw 0.78)
        rows = [dict(index=i, op=ops[i], node=nodes[i], kernel=kernels[i], median_ms=float(med[i]) * 1e3,
                     min_ms=float(mn[i]) * 1e3, share=float(med[i]) / summed if summed > 0 else 0.0)
                for i in range(times.shape[1])]
        return cls(entry, times.shape[0], num_threads, rows, total * 1e3, float(np.median(calls)) * 1e3)

    def top(self, k=5):
        """The ``k`` most expensive instructions (by median)."""
        return sorted(self.rows, key=lambda r: -r["median_ms"])[:k]

    def __str__(self):
        extra = "flops" in (self.rows[0] if self.rows else {})
        head = (f"profile of entry {self.entry!r}: {len(self.rows)} instructions, medians of {self.repeat} runs, "
                f"{self.num_threads} threads; instructions {self.total_ms:.3f} ms, whole call {self.call_ms:.3f} ms")
        cols = f"{'#':>3}  {'instruction':<20} {'ms':>9} {'min ms':>9} {'share':>6}"
        if extra:
            cols += f" {'GFLOP/s':>8} {'GB/s':>7}"
        from .isa import dispatched_isa
        lines = [head, f"kernel ISA: {dispatched_isa()}", cols + "  node"]
        for r in self.rows:
            line = f"{r['index']:>3}  {r['op']:<20} {r['median_ms']:>9.4f} {r['min_ms']:>9.4f} {r['share']:>6.1%}"
            if extra:
                line += f" {r['gflops']:>8.1f} {r['gbps']:>7.1f}"
            aot = f"[aot {r['kernel']}] " if r.get("kernel") else ""
            lines.append(line + "  " + aot + str(r.get("contents") or r["node"]))
        return "\n".join(lines)
