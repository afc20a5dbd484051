"""The fused elementwise VM runs each instruction as a micro-program (kernels.h, lm_ew_microprog): the
plan's steps as threaded code, then one op per output.  For whole blocks a column-sum output (the bias
gradients of a broadcast param) is fused into the step that produces its register -- "step+colsum" when
a later step or output still reads the register, "colsum-only step" (no store) when nothing does; a
whole-tensor sum (a mean loss) likewise, into a row of per-column sums added up at the end of each chunk
("step+sum").  These tests pin which programs get fused, that fusing changes no bit of a column sum (a
whole sum's additions are reordered, still the same for any thread count), and the values against the
unfused compile (one instruction per op, separate reduction kernels)."""
import numpy as np
import pytest

import libml_compile as lc
from libml_runtime import _exec
from libml_runtime import format as F


def _microprograms(prog, entry, fold):
    code = np.ascontiguousarray(prog.plan.entries[entry].code, dtype=np.int64)
    return [_exec.ew_microprog(code, pc, fold) for pc, name, _, _ in F.instructions(code)
            if name == "fused_elementwise"]


def _kinds(mp):
    return sorted(k for k, *_ in mp)


def _w4(dtype, nt, cols=1024 + 37, fuse=True):
    """W4 (../shared/bench/workloads.md) at 96 rows; 1061 columns: 8 whole blocks and a partial one."""
    rng = np.random.default_rng(0)
    g = lc.Graph("w4")
    x = g.input("x", (96, cols), dtype=dtype)
    a, b, c = (g.param(n, rng.standard_normal(cols).astype(dtype)) for n in "abc")
    y = lc.sigmoid(x * a + b) / (1 + lc.relu(x - c))
    prog = lc.compile(g, loss=lc.mean(y), optimizer=lc.SGD(0.01), num_threads=nt, fuse=fuse)
    return prog, {"x": rng.standard_normal((96, cols)).astype(dtype)}


def _steps(prog, feeds, n=3):
    losses = [float(prog.step(feeds)) for _ in range(n)]
    return losses, {k: v.copy() for k, v in prog.params.items()}


@pytest.fixture
def fold_off():
    old = _exec.set_ew_fold(0)
    yield
    _exec.set_ew_fold(old)


def test_w4_step_fuses_its_three_column_sums_into_their_steps():
    prog, _ = _w4("float32", 2)
    (full,) = _microprograms(prog, "step", 1)
    kinds = _kinds(full)
    # d a and d c are read by nothing after their steps; d b (gz) is also the factor of d a = gz * x
    assert kinds.count("colsum-only step") == 2 and kinds.count("step+colsum") == 1
    # the loss, a whole-tensor sum of y, in y's step (a lane row of sums); y is still read by d c's step
    assert "colsum" not in kinds and "sum" not in kinds and kinds.count("step+sum") == 1
    (part,) = _microprograms(prog, "step", 0)
    assert _kinds(part).count("colsum") == 3 and _kinds(part).count("sum") == 1
    assert not any("step+" in k or "only" in k for k in _kinds(part))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nt", [1, 2])
def test_fused_column_sums_change_no_bit(dtype, nt):
    prog, feeds = _w4(dtype, nt)
    fused = _steps(prog, feeds)
    prog2, _ = _w4(dtype, nt)
    old = _exec.set_ew_fold(0)
    try:
        plain = _steps(prog2, feeds)
    finally:
        _exec.set_ew_fold(old)
    # the loss (a whole sum) is added in another order when fused, the column sums in the same one
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6 if dtype == "float32" else 1e-14)
    for k in fused[1]:
        assert np.array_equal(fused[1][k], plain[1][k]), k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_column_sums_are_bit_identical_for_any_thread_count(dtype):
    one = _steps(*_w4(dtype, 1))
    two = _steps(*_w4(dtype, 2))
    assert one[0] == two[0]
    for k in one[1]:
        assert np.array_equal(one[1][k], two[1][k]), k


@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-5), ("float64", 1e-12)])
def test_fused_w4_gradients_match_the_unfused_compile(dtype, rtol):
    prog, feeds = _w4(dtype, 2)
    ref, _ = _w4(dtype, 2, fuse=False)
    g, r = prog.grad(feeds), ref.grad(feeds)
    assert set(g) == set(r) == {"a", "b", "c"}
    for k in g:
        np.testing.assert_allclose(g[k], r[k], rtol=rtol, atol=rtol * np.abs(r[k]).max(), err_msg=k)


def test_a_register_that_is_also_stored_is_column_summed_without_losing_its_store():
    """y is an output and its column sum another; x*a is summed and still read by y's step."""
    rng = np.random.default_rng(3)
    rows, cols = 40, 2 * 128 + 5
    g = lc.Graph("stored")
    x = g.input("x", (rows, cols), dtype="float64")
    a = g.param("a", rng.standard_normal(cols))
    b = g.param("b", rng.standard_normal(cols))
    xa = x * a
    y = lc.relu(xa + b)
    g.output("y", y)
    g.output("sy", lc.sum(y, axis=0))
    g.output("sxa", lc.sum(xa, axis=0))
    g.output("total", lc.sum(lc.sigmoid(xa)))
    prog = lc.compile(g, num_threads=2)
    mps = _microprograms(prog, "run", 1)
    kinds = [k for mp in mps for k in _kinds(mp)]
    assert "step+colsum" in kinds, mps
    xv = rng.standard_normal((rows, cols))
    out = prog.run({"x": xv})
    av, bv = prog.params["a"], prog.params["b"]
    yv = np.maximum(xv * av + bv, 0)
    np.testing.assert_allclose(out["y"], yv, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(out["sy"], yv.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out["sxa"], (xv * av).sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["total"], (1 / (1 + np.exp(-xv * av))).sum(), rtol=1e-12)
    old = _exec.set_ew_fold(0)
    try:
        plain = prog.run({"x": xv})
    finally:
        _exec.set_ew_fold(old)
    for k in out:
        if k == "total":  # a whole sum: reordered when fused
            np.testing.assert_allclose(out[k], plain[k], rtol=1e-14)
        else:
            assert np.array_equal(out[k], plain[k]), k


@pytest.mark.parametrize("cols", [3 * 128 + 7, 8192 + 128])
def test_whole_sums_fuse_into_lane_rows_up_to_lm_lane_max_columns(cols):
    """Two whole sums and a column sum in one mode-2 kernel: fused (lane rows) for rows of up to 8192
    columns (kernels.h LM_LANE_MAX), a pass of their own beyond; the same values either way, for 1 and
    2 threads bit for bit."""
    rng = np.random.default_rng(5)
    rows = 24
    xv = rng.standard_normal((rows, cols))
    got = []
    for nt in (1, 2):
        g = lc.Graph("lanes")
        x = g.input("x", (rows, cols), dtype="float64")
        a = g.param("a", np.linspace(-1, 1, cols))
        xa = x * a
        g.output("s1", lc.sum(lc.sigmoid(xa)))
        g.output("s2", lc.sum(xa * xa))
        g.output("col", lc.sum(xa, axis=0))
        prog = lc.compile(g, num_threads=nt)
        kinds = [k for mp in _microprograms(prog, "run", 1) for k in _kinds(mp)]
        fused = sum(k in ("step+sum", "sum-only step") for k in kinds)
        assert fused == (2 if cols <= 8192 else 0), kinds
        got.append(prog.run({"x": xv}))
    av = np.linspace(-1, 1, cols)
    want = {"s1": (1 / (1 + np.exp(-xv * av))).sum(), "s2": ((xv * av) ** 2).sum(), "col": (xv * av).sum(0)}
    for k, w in want.items():
        np.testing.assert_allclose(got[0][k], w, rtol=1e-12, atol=1e-12, err_msg=k)
        assert np.array_equal(got[0][k], got[1][k]), k


def test_ew_microprog_refuses_what_is_not_a_fused_elementwise_instruction():
    prog, _ = _w4("float32", 1)
    code = np.ascontiguousarray(prog.plan.entries["step"].code, dtype=np.int64)
    sgd = [pc for pc, name, _, _ in F.instructions(code) if name != "fused_elementwise"][0]
    with pytest.raises(ValueError, match="no fused_elementwise instruction at"):
        _exec.ew_microprog(code, sgd, 1)
    with pytest.raises(ValueError, match="no fused_elementwise instruction at"):
        _exec.ew_microprog(code, len(code) + 5, 1)


def test_a_program_longer_than_the_stack_buffer_runs_from_the_heap():
    """_exec._ew keeps micro-programs of up to 48 records (steps + outputs) on its stack and mallocs
    longer ones: a fused chain of 28 steps, each also an output, with a column sum and a whole sum,
    against NumPy, on 1 and 2 threads."""
    rng = np.random.default_rng(7)
    xv = rng.standard_normal((16, 300))
    outs = []
    for nt in (1, 2):
        g = lc.Graph("long")
        x = g.input("x", (16, 300), dtype="float64")
        h, want = x, {}
        w = xv
        for k in range(28):
            h = h * 1.01 if k % 2 else h - 0.25
            w = w * 1.01 if k % 2 else w - 0.25
            g.output(f"h{k}", h)
            want[f"h{k}"] = w
        g.output("col", lc.sum(h, axis=0))
        g.output("tot", lc.sum(h))
        want["col"], want["tot"] = w.sum(0), w.sum()
        prog = lc.compile(g, num_threads=nt)
        sizes = [len(mp) for mp in _microprograms(prog, "run", 1)]
        assert max(sizes) > 48, sizes
        outs.append(prog.run({"x": xv}))
    for k, v in want.items():
        np.testing.assert_allclose(outs[0][k], v, rtol=1e-12, atol=1e-12, err_msg=k)
        assert np.array_equal(outs[0][k], outs[1][k]), k
