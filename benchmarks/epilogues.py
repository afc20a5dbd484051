"""GEMM epilogues for every activation (passes.fuse_vm_epilogues) against the same program without them.

Usage: python benchmarks/epilogues.py [--rounds 9]

A training step of one feed-forward block, softmax_cross_entropy(act(x @ W1 + b1) @ W2) with
x (256, 512), W1 (512, 1024), for act = GELU and tanh, compiled twice in one process: with the VM-step
epilogues (the activation on W1's GEMM forward, its gradient step on the GEMM producing the upstream
gradient backward) and with that pass switched off.  Alternating rounds of 20 steps each; medians and
the same-run ratio are printed with the instruction counts.
"""
import argparse
import time

import numpy as np

import libml_compile as lc
from libml_compile import passes


def build(act, with_epilogues, B=256, D=512, H=1024):
    real = passes.fuse_vm_epilogues
    if not with_epilogues:
        passes.fuse_vm_epilogues = lambda nodes, roots: passes.Rewrite()
    try:
        rng = np.random.default_rng(0)
        g = lc.Graph("ffn")
        x, y = g.input("x", (B, D)), g.input("y", (B,), "int64")
        w1 = g.param("w1", (rng.standard_normal((D, H)) * 0.05).astype(np.float32))
        b1 = g.param("b1", np.zeros(H, np.float32))
        w2 = g.param("w2", (rng.standard_normal((H, 10)) * 0.05).astype(np.float32))
        h = {"gelu": lc.gelu, "tanh": lc.tanh}[act](x @ w1 + b1)
        prog = lc.compile(g, lc.softmax_cross_entropy(h @ w2, y), lc.SGD(0.01))
    finally:
        passes.fuse_vm_epilogues = real
    return prog, {"x": rng.standard_normal((B, D)).astype(np.float32), "y": rng.integers(0, 10, B)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    from libml_runtime.isa import dispatched_isa
    print(f"runtime ISA {dispatched_isa()}")
    for act in ("gelu", "tanh"):
        progs = {u: build(act, u) for u in (False, True)}
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for u in (False, True):
                prog, feeds = progs[u]
                prog.step(feeds)
                t0 = time.perf_counter()
                for _ in range(20):
                    prog.step(feeds)
                times[u].append((time.perf_counter() - t0) / 20 * 1e3)
        off, on = float(np.median(times[False])), float(np.median(times[True]))
        print(f"{act:<5} step ms: without epilogues {off:.3f}, with {on:.3f}, ratio {on / off:.3f}; instructions "
              f"{progs[False][0].instruction_count('step')} -> {progs[True][0].instruction_count('step')}")


if __name__ == "__main__":
    main()
