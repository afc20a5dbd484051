"""The same graph compiled twice gives byte-identical plan files: in one process (whatever else it
compiled before) and in two processes.  Auto names come from a per-graph counter, never a process-wide
one, and no pass iterates over an identity-ordered set where the order reaches the plan."""
import subprocess
import sys
import textwrap

import numpy as np

import libml_compile as lc
from libml_runtime import planfile

# builds a small graph with auto-named nodes of every kind the passes rewrite (GEMM epilogues, a
# reduction, a softmax head, element-wise chains) and prints the plan file's bytes as hex
BUILD = textwrap.dedent('''
    import numpy as np
    import libml_compile as lc
    from libml_runtime import planfile

    def plan_bytes():
        rng = np.random.default_rng(0)
        g = lc.Graph("det")
        x = g.input("x", (8, 16))
        y = g.input("y", (8,), "int64")
        w1 = g.param("w1", rng.standard_normal((16, 32)).astype(np.float32))
        b1 = g.param("b1", np.zeros(32, np.float32))
        w2 = g.param("w2", rng.standard_normal((32, 4)).astype(np.float32))
        h = lc.relu(x @ w1 + b1)
        h = h * lc.sigmoid(h - lc.sum(h, axis=1, keepdims=True) * (1 / 32))
        logits = h @ w2
        g.output("logits", logits)
        loss = lc.softmax_cross_entropy(logits, y) + 0.01 * lc.mean(w1 * w1)
        prog = lc.compile(g, loss, lc.Adam(1e-3))
        return planfile.dumps(prog.plan)
''')


def _plan_bytes():
    ns = {}
    exec(BUILD, ns)
    return ns["plan_bytes"]()


def test_same_graph_twice_in_one_process_gives_identical_plan_bytes():
    first = _plan_bytes()
    # other graphs built in between must not shift any name or offset of the next compile
    for n in (3, 50):
        g = lc.Graph(f"other{n}")
        x = g.input("x", (n,))
        lc.compile(g, lc.mean(lc.sigmoid(x) * 2.0))
    assert _plan_bytes() == first


def test_same_graph_in_two_processes_gives_identical_plan_bytes():
    code = BUILD + "\nimport sys\nsys.stdout.write(plan_bytes().hex())\n"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert outs[0] and outs[0] == outs[1]
    assert bytes.fromhex(outs[0]) == _plan_bytes()


def test_lowering_an_entry_never_changes_the_joint_graph_other_entries_read(monkeypatch):
    """The per-entry rewrites build new nodes (passes.Rewrite, path copying): after any entry is lowered,
    fused or checked, every node of the joint graph has the op, inputs and attrs it had before.  Before,
    fusions rewrote shared nodes in place, so the entries lowered later saw (and recomputed) the run
    entry's fused GEMMs, and checked entries had to be lowered first."""
    from libml_compile import program
    from libml_compile.passes import topo_from_roots
    rng = np.random.default_rng(3)
    g = lc.Graph("order")
    x = g.input("x", (8, 16))
    w1 = g.param("w1", rng.standard_normal((16, 16)).astype(np.float32))
    w2 = g.param("w2", rng.standard_normal((16, 16)).astype(np.float32))
    b = g.param("b", np.zeros(16, np.float32))
    v = x @ w1 + b
    h = v * lc.sigmoid(x @ w2)  # v also feeds the backward pass (d sigmoid = g * v)
    g.output("h", h)
    loss = lc.mean(lc.gelu(h) * h)

    def snapshot(roots):
        return [(t, t.op, t.inputs, repr(sorted(t.attrs.items(), key=str))) for t in topo_from_roots(roots)]

    real, seen = program.lower_entry, []

    def checking(kind, roots, outputs, *a, **k):
        before = snapshot(roots)
        out = real(kind, roots, outputs, *a, **k)
        assert snapshot(roots) == before, f"lowering {kind!r} (fuse={k.get('fuse')}) changed the joint graph"
        seen.append(kind)
        return out
    monkeypatch.setattr(program, "lower_entry", checking)
    prog = lc.compile(g, loss, lc.SGD(0.1), check_finite=True)
    assert sorted(seen) == sorted(["run", "grad", "step"] * 2)
    # the run entry fuses v * sigmoid(.) into v's GEMM; grad and step must not inherit it (v is read by the
    # backward pass too, so there the GEMM would run twice)
    assert any("+mul" in r["op"] for r in prog.instructions("run"))
    for kind in ("grad", "step"):
        assert not any(r["op"].startswith("gemm") and "+mul" in r["op"] for r in prog.instructions(kind))
