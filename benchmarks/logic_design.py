"""The logic family's kernel design, measured (one thread; per instruction the best of 5 medians).

    python benchmarks/logic_design.py [--n 4194304] [--repeat 30]

A. ``where(a < b, x * 2, -1e9) * 3`` on float32: the chosen design (one fused kernel, the comparison a
   0/1 mask in a register) against the same graph with one instruction per op (``fuse=False``: the mask
   is stored, cast to one-byte bool and back -- what a design with bool values between ops costs).
B. the boundary cost: ``m = a < b`` returned as bool (fused comparison + cast to bytes) and its parts.
C. ``where(mask, x, y)`` with a fed bool mask on float32: alone it runs as the ``select`` instruction
   (reads the mask bytes directly); with a float consumer (``* 3``) as the VM's WHERE after a cast of
   the mask to 0/1 floats, fused with the consumer; int32 select of the same size for reference.
"""
import argparse

import numpy as np

import libml_compile as lc


def _profile(prog, feeds, repeat, rounds=5):
    """Per instruction, the smallest of ``rounds`` medians over ``repeat`` runs (the machine is shared:
    single medians move by 2x between rounds)."""
    best = None
    for _ in range(rounds):
        p = prog.profile("run", feeds, repeat=repeat, warmup=3)
        rows = [(r["op"], r["median_ms"]) for r in p.rows]
        best = rows if best is None else [(op, min(t, u)) for (op, t), (_, u) in zip(rows, best)]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args(argv)
    n, rep = args.n, args.repeat
    rng = np.random.default_rng(0)
    a, b, x = (rng.standard_normal(n).astype(np.float32) for _ in range(3))

    def graph_a():
        g = lc.Graph("a")
        A, B, X = g.input("a", (n,)), g.input("b", (n,)), g.input("x", (n,))
        g.output("y", lc.where(A < B, X * 2.0, -1e9) * 3.0)
        return g
    feeds = {"a": a, "b": b, "x": x}
    print(f"n = {n} float32 elements, 1 thread, median of {rep} runs per instruction\n")
    for fuse in (True, False):
        rows = _profile(lc.compile(graph_a(), num_threads=1, fuse=fuse), feeds, rep)
        print(f"A. where(a < b, 2x, -1e9) * 3 fuse={fuse}: total {sum(t for _, t in rows):.3f} ms  "
              + ", ".join(f"{op} {t:.3f}" for op, t in rows))

    g = lc.Graph("b")
    A, B = g.input("a", (n,)), g.input("b", (n,))
    g.output("m", A < B)
    rows = _profile(lc.compile(g, num_threads=1), {"a": a, "b": b}, rep)
    print(f"B. m = a < b as bool: total {sum(t for _, t in rows):.3f} ms  "
          + ", ".join(f"{op} {t:.3f}" for op, t in rows))

    mask = rng.random(n) < 0.5
    g = lc.Graph("c")
    M, X, Y = g.input("m", (n,), bool), g.input("x", (n,)), g.input("y", (n,))
    g.output("z", lc.where(M, X, Y))
    rows = _profile(lc.compile(g, num_threads=1), {"m": mask, "x": x, "y": b}, rep)
    print(f"C. where(bool mask, x, y) float32 alone: total {sum(t for _, t in rows):.3f} ms  "
          + ", ".join(f"{op} {t:.3f}" for op, t in rows))
    g = lc.Graph("c1")
    M, X, Y = g.input("m", (n,), bool), g.input("x", (n,)), g.input("y", (n,))
    g.output("z", lc.where(M, X, Y) * 3.0)
    rows = _profile(lc.compile(g, num_threads=1), {"m": mask, "x": x, "y": b}, rep)
    print(f"C. where(bool mask, x, y) * 3 float32: total {sum(t for _, t in rows):.3f} ms  "
          + ", ".join(f"{op} {t:.3f}" for op, t in rows))
    g = lc.Graph("c2")
    M, X, Y = g.input("m", (n,), bool), g.input("x", (n,), "int32"), g.input("y", (n,), "int32")
    g.output("z", lc.where(M, X, Y))
    xi, yi = (rng.integers(0, 100, n).astype(np.int32) for _ in range(2))
    rows = _profile(lc.compile(g, num_threads=1), {"m": mask, "x": xi, "y": yi}, rep)
    print(f"C. where(bool mask, x, y) int32 (select): total {sum(t for _, t in rows):.3f} ms  "
          + ", ".join(f"{op} {t:.3f}" for op, t in rows))


if __name__ == "__main__":
    main()
