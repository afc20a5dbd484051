"""Rewrites build new nodes (issue 11): no pass edits a node of the graph it reads.

simplify (constant folding, algebraic rules, CSE), ops_logic.lower_logic (bools into float masks) and
passes.order_inplace_writers (in-place updates after the readers of what they overwrite) used to edit the
nodes of the joint graph that every entry of a program (run / grad / step and their checked variants)
reads: inputs rewired, nodes turned into constants or casts, ``inplace_after`` stored in the writers'
attrs.  Now each returns new roots / an {old: new} map and the graph it read is left as it was, so an
entry's lowering depends on the joint graph alone, never on the entries lowered before it."""
import copy
import dataclasses
import itertools

import numpy as np
import pytest

import libml_compile as lc
from libml_compile import ops, ops_logic, passes, program
from libml_compile.passes import topo_from_roots
from libml_runtime import planfile


def _state(t):
    return t.op, t.inputs, repr(sorted(t.attrs.items(), key=str)), id(t.value)


class _Watch:
    """The op, inputs, attrs and value of every node when a pass first reads it."""

    def __init__(self):
        self.seen = {}

    def look(self, nodes):
        for t in nodes:
            if t not in self.seen:
                self.seen[t] = _state(t)

    def changed(self):
        return [(t.name, s[0], t.op) for t, s in self.seen.items() if _state(t) != s]


def _graph():
    """An MLP with the rewrites simplify and lower_logic make: gradients to simplify (signs and scales
    pushed, a mul by one, a reshape chain, a constant product to fold), float comparisons and a float
    ``where`` for lower_logic, a bool output; trained by SGD (an in-place writer)."""
    rng = np.random.default_rng(0)
    g = lc.Graph("immutable")
    x = g.input("x", (8, 6))
    y = g.input("y", (8,), "int64")
    w1 = g.param("w1", (rng.standard_normal((6, 16)) * 0.3).astype(np.float32))
    b1 = g.param("b1", np.zeros(16, np.float32))
    w2 = g.param("w2", (rng.standard_normal((16, 4)) * 0.3).astype(np.float32))
    h = x @ w1 + b1
    h = lc.where(h > 0.0, h, h * 0.1) * 1.0
    h = lc.reshape(lc.reshape(h, (4, 32)), (8, 16))
    logits = (h @ w2) * (g.const(2.0) * g.const(0.25))
    g.output("logits", logits)
    g.output("bad", lc.isnan(logits))
    return g, lc.softmax_cross_entropy(logits, y), {
        "x": rng.standard_normal((8, 6)).astype(np.float32), "y": rng.integers(0, 4, 8)}


def _elementwise_graph():
    """No GEMM: no per-entry rewrite copies the update node, so order_inplace_writers reads the writer of
    the joint graph itself (in the MLP it reads a copy made by absorb_transposes)."""
    rng = np.random.default_rng(2)
    g = lc.Graph("ew")
    x, t = g.input("x", (8, 4)), g.input("t", (8, 4))
    w = g.param("w", rng.standard_normal(4).astype(np.float32))
    b = g.param("b", np.zeros(4, np.float32))
    g.output("pos", (x * w + b) > 0.0)
    d = x * w + b - t
    feeds = {k: rng.standard_normal((8, 4)).astype(np.float32) for k in ("x", "t")}
    return g, lc.mean(d * d), feeds


@pytest.mark.parametrize("build,writer", [(_graph, "sgd_update"), (_elementwise_graph, "adam_update")])
def test_lowering_leaves_every_node_of_the_joint_graph_as_it_was(monkeypatch, build, writer):
    """Every node simplify, lower_logic or an entry's lowering reads keeps its op, inputs, attrs and
    value until the program is compiled (run, grad, step, fused and checked)."""
    watch = _Watch()
    real_simplify, real_logic, real_lower = passes.simplify, ops_logic.lower_logic, program.lower_entry
    ops_lowered = set()

    def simplify(roots, *a, **k):
        watch.look(topo_from_roots(roots))
        out = real_simplify(roots, *a, **k)
        watch.look(out[0])
        return out

    def lower_logic(nodes):
        watch.look(nodes)
        return real_logic(nodes)

    def lower_entry(kind, roots, outputs, *a, **k):
        nodes = topo_from_roots(roots)
        watch.look(nodes)
        ops_lowered.update((kind, k.get("fuse"), t.op) for t in nodes)
        return real_lower(kind, roots, outputs, *a, **k)

    monkeypatch.setattr(passes, "simplify", simplify)
    monkeypatch.setattr(ops_logic, "lower_logic", lower_logic)
    monkeypatch.setattr(program, "lower_entry", lower_entry)
    g, loss, feeds = build()
    prog = lc.compile(g, loss, lc.SGD(0.1) if writer == "sgd_update" else lc.Adam(0.01), check_finite=True)
    # the passes had work to do: bools became masks, the update (a writer) reached both step entries
    assert ("run", True, "cast") in ops_lowered
    assert ("step", False, writer) in ops_lowered and ("step", True, writer) in ops_lowered
    assert watch.changed() == []
    assert len(watch.seen) > 40
    # and the program still computes what the graph says
    out = prog.run(feeds)
    assert all(v.dtype == bool for k, v in out.items() if k in ("bad", "pos"))
    losses = [prog.step(feeds) for _ in range(5)]
    assert losses[-1] < losses[0]


def _state_copy(state):
    st = copy.copy(state)
    st.chunks, st.params, st.opt_state, st.where = (list(state.chunks), list(state.params),
                                                    list(state.opt_state), dict(state.where))
    return st


def test_entries_lowered_in_another_order_give_identical_plan_bytes(monkeypatch):
    """Every entry of a compiled program lowered again, in the reverse order, from the joint graph as
    compile left it: the plan's bytes are the same.  (Nodes the lowering makes are auto-named from the
    graph's counter: each entry is lowered again from the counter and name tables it started from, and
    from the final state layout, so offsets of state allocated by another entry stay as they were.)"""
    calls, real = [], program.lower_entry

    def recording(kind, roots, outputs, *a, **k):
        g = roots[0].graph
        n = next(g._ids)
        g._ids = itertools.count(n)
        calls.append((kind, roots, outputs, a, k, (n, list(g.nodes), dict(g._by_name), dict(g._outputs))))
        return real(kind, roots, outputs, *a, **k)

    monkeypatch.setattr(program, "lower_entry", recording)
    g, loss, _ = _graph()
    prog = lc.compile(g, loss, lc.SGD(0.1, momentum=0.9), check_finite=True)
    assert [(c[0], c[4].get("check_finite", False)) for c in calls] == \
        [(k, True) for k in ("run", "grad", "step")] + [(k, False) for k in ("run", "grad", "step")]
    state = calls[0][3][0]
    again = {}
    for kind, roots, outputs, a, k, (n, nodes, by_name, outs) in reversed(calls):
        tg = roots[0].graph
        tg._ids, tg.nodes, tg._by_name, tg._outputs = itertools.count(n), list(nodes), dict(by_name), dict(outs)
        st = _state_copy(state)
        again[kind, k.get("check_finite", False)] = real(kind, roots, outputs, st, *a[1:], **k)[0]
        assert st.where.keys() == state.where.keys() and st.size == state.size
    entries = {}
    for kind in ("run", "grad", "step"):
        entries[kind] = again[kind, False]
        entries[kind].checked = again[kind, True]
    assert planfile.dumps(dataclasses.replace(prog.plan, entries=entries)) == planfile.dumps(prog.plan)


def test_simplify_returns_new_nodes_and_folds_multi_output_nodes_through_them():
    """simplify on a graph with a node of two outputs (xent_grad with its loss): folded when its inputs
    are constants (both outputs at once), copied when an input is rewired (its projection then reads the
    copy); the graph it read is unchanged and the map names every node's new version."""
    g = lc.Graph("s")
    rng = np.random.default_rng(1)
    z = g.input("z", (4, 3))
    labels = g.const(np.array([0, 2, 1, 0]), dtype="int64")
    one = g.const(1.0)
    zc = g.const(rng.standard_normal((4, 3)).astype(np.float32))
    live, live_loss = ops.make("xent_grad", (z * 1.0, labels, one), {"with_loss": True})
    folded, folded_loss = ops.make("xent_grad", (zc, labels, one), {"with_loss": True})
    roots = [lc.relu(live) + folded, live_loss + folded_loss]
    nodes = topo_from_roots(roots)
    before = [(t, _state(t)) for t in nodes]
    out, rep = passes.simplify(roots)
    assert [(t, _state(t)) for t in nodes] == before
    new_roots = [rep.get(r, r) for r in roots]
    assert topo_from_roots(new_roots) == out
    assert all(r in rep for r in roots)  # both read a rewritten node
    # the folded node and its loss are constants of the right values, named as before
    want, want_loss = ops.ref_outputs(folded, [zc.value, labels.value, one.value])
    assert rep[folded].op == "const" and rep[folded].name == folded.name
    np.testing.assert_array_equal(rep[folded].value, want)
    assert rep[folded_loss].op == "const" and rep[folded_loss].value == want_loss
    # the live node reads z directly now; its projection reads the copy, not the old node
    new_live, new_loss = rep[live], rep[live_loss]
    assert new_live.op == "xent_grad" and new_live.inputs[0] is z and new_live.name == live.name
    assert new_loss.op == "output" and new_loss.inputs == (new_live,)
    assert live.inputs[0].op == "mul" and live_loss.inputs == (live,)
    assert {t.op for t in out} >= {"xent_grad", "output", "const"} and live not in out and folded not in out


def test_lower_logic_returns_new_nodes():
    g = lc.Graph("l")
    x = g.input("x", (5,))
    m = x > 0.5
    roots = [lc.where(m, x, x * 2.0) + 1.0, lc.logical_not(lc.isnan(x))]
    nodes = topo_from_roots(roots)
    before = [(t, _state(t)) for t in nodes]
    new = ops_logic.lower_logic(nodes)
    assert [(t, _state(t)) for t in nodes] == before
    assert new[m].op == "cast" and new[m].inputs[0].op != m.op and new[m].name == m.name
    after = topo_from_roots([new.get(r, r) for r in roots])
    assert "where_mask" in {t.op for t in after} and not {"where", "greater", "isnan"} & {t.op for t in after}


def test_order_inplace_writers_copies_the_writer_and_returns_the_ordering():
    """A writer reading what it overwrites (here: param b as the gradient of param a) reads a copy taken
    before the update; the writer with that operand is a new node, and the readers it must wait for are
    returned, not stored in its attrs."""
    g = lc.Graph("w")
    a = g.param("a", np.ones(4, np.float32))
    b = g.param("b", np.ones(4, np.float32))
    x = g.input("x", (4,))
    reader = a * x
    upd = ops.make("sgd_update", (a, b, b, x), {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0})
    roots = [upd, reader]  # (source order alone would run the update first)
    before = [(t, _state(t)) for t in topo_from_roots(roots)]
    nodes, new, after = passes.order_inplace_writers(roots)
    assert [(t, _state(t)) for t in topo_from_roots(roots)] == before
    w = new[upd]
    assert w.op == "sgd_update" and w.inputs[:2] == (a, b) and w.inputs[3] is x
    assert w.inputs[2].op == "identity" and w.inputs[2].inputs == (b,)
    assert list(after) == [w] and set(after[w]) == {reader, w.inputs[2]} and "inplace_after" not in w.attrs
    order = [x for _, x in passes.schedule(nodes, {})]
    assert order.index(w) < order.index(reader)
    order = [x for _, x in passes.schedule(nodes, {}, after)]
    assert order.index(reader) < order.index(w)
