"""Compile time of lc.compile against graph size (item: compile time must grow ~n log n, not n^2).

Usage: python benchmarks/compile_time.py [--quick]

Rows: elementwise chains that fuse in part, a chain that does not fuse at all (matmul + softmax), a
graph with many params, a BERT-base-sized graph; each compiled for training (loss + SGD: forward,
backward and update entries).  Every family is timed at several sizes and the growth exponent is the
log-log slope between the smallest and the largest (1 = linear, 2 = quadratic).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

import libml_compile as lc


def ew_chain(n):
    """~n forward ops: x*w + c, relu, sigmoid, sub... over (8, 16); every 7th op is a reduction-and-
    broadcast back, so fusion groups end there (a chain that fuses in part)."""
    g = lc.Graph("ew_chain")
    x = g.input("x", (8, 16), "float32")
    w = g.param("w", np.full((16,), 0.5, np.float32))
    y, ops = x, 0
    while ops < n:
        k = ops % 7
        if k == 0:
            y = y * w
        elif k == 1:
            y = y + 0.1
        elif k == 2:
            y = lc.relu(y)
        elif k == 3:
            y = lc.sigmoid(y)
        elif k == 4:
            y = y - 0.25
        elif k == 5:
            y = lc.sum(y, axis=1, keepdims=True)
        else:
            y = y * x
        ops += 1
    return g, lc.mean(y * y)


def mm_chain(n):
    """~n forward ops that never fuse: y = softmax(y @ W) with one shared (16, 16) W."""
    g = lc.Graph("mm_chain")
    x = g.input("x", (4, 16), "float32")
    w = g.param("w", np.eye(16, dtype=np.float32) * 0.9)
    y = x
    for _ in range(n // 2):
        y = lc.softmax(y @ w)
    return g, lc.mean(y * y)


def many_params(n):
    """n params of shape (4,), all added into one sum: n params, ~2n forward ops."""
    g = lc.Graph("many_params")
    x = g.input("x", (4,), "float32")
    acc = x
    for k in range(n):
        acc = acc + g.param(f"p{k}", np.full((4,), 0.01 * (k % 7), np.float32))
    return g, lc.mean(acc * acc)


def bert_like(blocks=12, width=64, batch=8):
    """A BERT-base-sized graph: blocks of 4 dense layers (matmul + bias + relu/sigmoid), a gated residual
    and reductions: ~2,000 ops with the backward pass, 204 params."""
    g = lc.Graph("bert_like")
    rng = np.random.default_rng(0)
    x = g.input("x", (batch, width), "float32")
    h = x
    for b in range(blocks):
        def dense(t, j, d_in, d_out):
            w = g.param(f"b{b}_w{j}", (rng.standard_normal((d_in, d_out)) * 0.1).astype(np.float32))
            c = g.param(f"b{b}_c{j}", np.zeros(d_out, np.float32))
            return t @ w + c
        u = lc.relu(dense(h, 0, width, 2 * width))
        v = dense(u, 1, 2 * width, width)
        gate = lc.sigmoid(dense(h, 2, width, width))
        r = h + v * gate
        s = lc.sum(r, axis=1, keepdims=True) * (1.0 / width)
        nrm = g.param(f"b{b}_n", np.ones(width, np.float32))
        q = lc.relu(dense((r - s) * nrm, 3, width, width))
        for k in range(8):
            q = lc.sigmoid(q * g.param(f"b{b}_s{k}", np.ones(width, np.float32)) + 0.1 * k)
        h = r + q
    return g, lc.mean(h * h)


def compile_seconds(build, n=None, repeat=1):
    """Best wall time of lc.compile(graph, loss, SGD) over ``repeat`` runs, and the forward op count."""
    best = math.inf
    for _ in range(repeat):
        g, loss = build(n) if n is not None else build()
        t0 = time.perf_counter()
        lc.compile(g, loss, lc.SGD(0.01))
        best = min(best, time.perf_counter() - t0)
    return best, len(g.nodes)


def growth_exponent(rows):
    """log-log slope of (ops, seconds) between the first and the last row."""
    (n0, t0), (n1, t1) = rows[0], rows[-1]
    return math.log(t1 / t0) / math.log(n1 / n0)


def main(quick=False):
    fams = [("ew_chain", ew_chain, [1000, 5000, 20000]), ("mm_chain", mm_chain, [1000, 5000, 20000]),
            ("many_params", many_params, [1000, 5000, 10000])]
    if quick:
        fams = [(name, f, [s // 4 for s in sizes]) for name, f, sizes in fams]
    print(f"{'graph':<14} {'size':>7} {'fwd nodes':>10} {'compile s':>10}")
    for name, f, sizes in fams:
        rows = []
        for n in sizes:
            sec, nodes = compile_seconds(f, n)
            rows.append((nodes, sec))
            print(f"{name:<14} {n:>7} {nodes:>10} {sec:>10.3f}", flush=True)
        print(f"{name:<14} growth exponent (log-log slope {sizes[0]}..{sizes[-1]}): {growth_exponent(rows):.2f}")
    sec, nodes = compile_seconds(bert_like)
    print(f"{'bert_like':<14} {'12 blk':>7} {nodes:>10} {sec:>10.3f}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
