"""Which fused elementwise programs get an ahead-of-time kernel: collect them from the compiled workloads.

    LIBML_BENCH_MODELS=../shared/bench/models python benchmarks/vm_aot_collect.py [--top 8] [--write]

Compiles every benchmark workload (worker.libml_program: the plans the benchmarks time), reads each
fused_elementwise instruction's micro-program (``_exec.ew_microprog``, column sums fused as at run time),
and ranks the distinct programs by elements x VM steps summed over their occurrences.  Programs of fewer
than MIN_STEPS steps are left to the VM (one or two passes over a block is what one loop costs too), as
are programs with whole-block sums (vm_aot.py).  Prints the ranking; ``--write`` rewrites
runtime/libml_runtime/vm_aot.txt with the top ones (then rebuild: the kernels are generated at build
time).  tests/test_vm_aot.py checks that every listed program is still what its workload compiles to.
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402
import worker  # noqa: E402

MIN_STEPS = 4
KIND_MOP = {"step": 0, "step+colsum": 256, "step+sum": 256, "colsum-only step": 512, "sum-only step": 512,
            "store": 768, "sum": 769, "rowsum": 770, "colsum": 771}


def fused_programs(prog):
    """Yield (entry, node names, numel, dtype code, n_in, micro-program records) per fused instruction."""
    from libml_runtime import _exec, format as F
    for name, ent in prog.plan.entries.items():
        code = np.ascontiguousarray(ent.code, dtype=np.int64)
        pc = 0
        while pc < code.shape[0]:
            if code[pc] == F.OP_EW:
                f = pc + F.HEADER
                dtype, ndim = int(code[f]), int(code[f + 1])
                numel = int(np.prod(code[f + 2:f + 2 + ndim]))
                n_in = int(code[f + 2 + ndim])
                recs = [(KIND_MOP[r[0]] + (r[1] if r[1] >= 0 else 0), *r[2:]) for r in _exec.ew_microprog(code, pc, 1)]
                node = ent.nodes[int(code[pc + 2])][1] if ent.nodes else "?"
                yield name, node, numel, dtype, n_in, recs
            pc += int(code[pc + 1])


def collect(workloads):
    from libml_runtime import format as F, vm_aot
    progs = {}
    for wid in workloads:
        try:
            prog, *_ = worker.libml_program(wid, common.WORKLOADS[wid])
        except worker.Skip as e:
            print(f"{wid}: skipped ({e})", file=sys.stderr)
            continue
        for entry, node, numel, dtype, n_in, recs in fused_programs(prog):
            sig = tuple(vm_aot.normalise(F, r) for r in recs)
            steps = sum(1 for r in sig if r[0] < vm_aot.MOP_OUT_STORE)
            p = progs.setdefault((n_in, sig), dict(score=0, steps=steps, where=[], n_in=n_in, sig=sig))
            p["score"] += numel * steps
            p["where"].append(f"{wid} {entry} {node} ({numel} elements)")
    return progs


def eligible(F, p):
    from libml_runtime import vm_aot
    if p["steps"] < MIN_STEPS:
        return False
    try:
        [vm_aot.format_record(F, r) for r in p["sig"]]
    except vm_aot.ProgramError:
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(common.ORDER))
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--write", action="store_true", help="rewrite runtime/libml_runtime/vm_aot.txt")
    a = ap.parse_args(argv)
    from libml_runtime import format as F, vm_aot
    progs = collect(common.expand_workloads(a.workloads))
    ranked = sorted(progs.values(), key=lambda p: -p["score"])
    chosen = [p for p in ranked if eligible(F, p)][:a.top]
    for p in ranked:
        mark = "*" if any(p is c for c in chosen) else " "
        print(f"{mark} {p['score']:>12} {p['steps']:>3} steps  {p['where'][0]}"
              + (f" (+{len(p['where']) - 1} more)" if len(p["where"]) > 1 else ""))
    if not a.write:
        return
    lines = ["# Fused elementwise programs compiled ahead of time into the runtime (vm_aot.py).",
             "# Written by benchmarks/vm_aot_collect.py: the programs of the benchmark workloads with the most",
             f"# elements x VM steps (at least {MIN_STEPS} steps, no whole-block sums).  Rebuild after editing.", ""]
    used = set()
    for p in chosen:
        base = "_".join(p["where"][0].split()[:2]).lower()
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        for w in p["where"][:4]:
            lines.append(f"# {w}")
        lines.append(f"{name} n_in={p['n_in']}: " + "; ".join(vm_aot.format_record(F, r) for r in p["sig"]))
        lines.append("")
    with open(vm_aot.PROGRAMS, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {len(chosen)} programs to {vm_aot.PROGRAMS}")


if __name__ == "__main__":
    main()
