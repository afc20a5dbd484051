"""lc.compile grows ~linearly with the graph (item 20), and the faster memory planner never grows the
arena of MLP training plans (the greedy-by-size placement is still taken whenever it is better)."""
import os
import sys

import numpy as np
import pytest

import libml_compile as lc
from libml_compile import memory
from libml_compile.memory import Buffer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import compile_time as CT  # noqa: E402


@pytest.mark.parametrize("family,small,large", [(CT.ew_chain, 2000, 8000), (CT.mm_chain, 1000, 4000),
                                                (CT.many_params, 2500, 10000)])
def test_compile_time_grows_about_linearly(family, small, large):
    """Log-log slope of compile time between two sizes 4x apart: 1 is linear, 2 quadratic (the old
    planner and fusion reachability were quadratic: 20,000-op chain 370 s)."""
    rows = [CT.compile_seconds(family, n) for n in (small, large)]
    rows = [(nodes, sec) for sec, nodes in rows]
    assert CT.growth_exponent(rows) < 1.5, rows


def test_bert_sized_graph_and_10k_params_compile_fast():
    sec, _ = CT.compile_seconds(CT.bert_like)
    assert sec < 2.0, sec
    sec, _ = CT.compile_seconds(CT.many_params, 10000)
    assert sec < 5.0, sec


def _mlp(layers, batch, opt):
    g = lc.Graph("m")
    rng = np.random.default_rng(0)
    x, y = g.input("x", (batch, layers[0])), g.input("y", (batch,), "int64")
    h = x
    for i, (a, b) in enumerate(zip(layers, layers[1:])):
        h = h @ g.param(f"w{i}", (rng.standard_normal((a, b)) * 0.1).astype(np.float32)) + \
            g.param(f"b{i}", np.zeros(b, np.float32))
        if i < len(layers) - 2:
            h = lc.relu(h)
    return lc.compile(g, lc.softmax_cross_entropy(h, y), opt)


@pytest.mark.parametrize("layers,batch", [([64, 128, 128, 10], 32), ([784, 512, 512, 10], 128)])
@pytest.mark.parametrize("opt", [lc.SGD(0.01), lc.SGD(0.01, momentum=0.9), lc.Adam(1e-3)])
def test_arena_of_mlp_training_does_not_grow(layers, batch, opt):
    """Every entry's arena is at most what greedy-by-size alone gives on the same buffers (the placement
    of every earlier version), and the plan's buffers never collide."""
    prog = _mlp(layers, batch, opt)
    for entry in ("run", "grad", "step"):
        rep = prog.memory_report(entry)
        bufs = [Buffer(n, nb, s, e) for n, _, nb, s, e, _ in rep.intervals]
        assert rep.arena_bytes <= memory._place_greedy(bufs), entry
        placed = [Buffer(n, nb, s, e, off) for n, off, nb, s, e, _ in rep.intervals]
        memory.check_no_overlap(placed)
        assert rep.arena_bytes >= rep.lower_bound_bytes


def test_sweep_placement_is_valid_when_greedy_is_over_budget(monkeypatch):
    """Random lifetimes, with the greedy budget at zero: the sweep allocator alone places them without
    overlap, and lower_bound / check_no_overlap (now sweeps) agree with brute force."""
    rng = np.random.default_rng(3)
    monkeypatch.setattr(memory, "GREEDY_PAIR_BUDGET", 0)
    for _ in range(30):
        bufs = []
        for k in range(int(rng.integers(1, 60))):
            s = int(rng.integers(0, 40))
            bufs.append(Buffer(f"b{k}", int(rng.integers(0, 5000)), s, s + int(rng.integers(0, 15))))
        arena = memory.place(bufs)
        memory.check_no_overlap(bufs)
        assert all(b.offset + memory.align(b.nbytes) <= arena for b in bufs)
        brute = max(sum(memory.align(b.nbytes) for b in bufs if b.start <= t <= b.end)
                    for t in range(max(b.end for b in bufs) + 1))
        assert memory.lower_bound(bufs) == brute <= arena
        pairs = sum(1 for i, a in enumerate(bufs) for b in bufs[i + 1:] if a.start <= b.end and b.start <= a.end)
        assert memory.overlapping_pairs(bufs) == pairs


def test_check_no_overlap_still_catches_collisions():
    with pytest.raises(AssertionError, match="overlap"):
        memory.check_no_overlap([Buffer("a", 100, 0, 3, 0), Buffer("c", 10, 0, 9, 1000),
                                 Buffer("b", 100, 2, 5, 64)])


@pytest.mark.parametrize("enabled", [True, False])
def test_compile_restores_the_garbage_collectors_state_even_when_it_raises(enabled):
    import gc
    g = lc.Graph("gc")
    x = g.input("x", (2, 2))
    g.output("y", x + 1.0)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        lc.compile(g)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            lc.compile(g, loss=x)  # not a scalar
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
