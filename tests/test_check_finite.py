"""Issue 5: check_finite=True names the first op (type and node) producing NaN/Inf and leaves params
(and optimizer state) as they were before the step."""
import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr


def graph(d_value, lr_=0.1, opt="sgd"):
    g = lc.Graph("cf")
    x = g.input("x", (4, 3))
    t = g.input("t", (4, 2))
    w = g.param("w", np.arange(6, dtype=np.float32).reshape(3, 2) / 10)
    d = g.param("d", np.full((2,), d_value, np.float32))
    h = lc.matmul(x, w, name="proj")
    q = lc.div(h, d, name="bad_div")
    r = lc.relu(q, name="act")
    loss = lc.mse(r, t, name="loss_mse")
    g.output("q", q)
    o = lc.SGD(lr=lr_, momentum=0.9) if opt == "sgd" else lc.Adam(lr=lr_)
    return lc.compile(g, loss, o, check_finite=True)


FEEDS = {"x": np.ones((4, 3), np.float32), "t": np.ones((4, 2), np.float32)}


def snapshot(p):
    return {k: v.copy() for k, v in p.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_names_first_op_and_restores_params(opt):
    p = graph(1.0, opt=opt)
    p.step(FEEDS)                                   # momentum / moments / step count are non-zero now
    p.set_params({"d": np.zeros(2, np.float32)})    # h / 0 = inf in node bad_div
    before = snapshot(p)
    with pytest.raises(lr.NonFiniteError) as ei:
        p.step(FEEDS)
    msg = str(ei.value)
    assert "'div'" in msg and "'bad_div'" in msg, msg
    assert same(snapshot(p), before), "params or optimizer state changed by the rejected step"
    with pytest.raises(lr.NonFiniteError, match="bad_div"):
        p.run(FEEDS)
    with pytest.raises(lr.NonFiniteError, match="bad_div"):
        p.grad(FEEDS)
    assert same(snapshot(p), before)


def test_nan_input_is_reported_at_first_consumer():
    p = graph(1.0)
    f = dict(FEEDS, x=FEEDS["x"].copy())
    f["x"][1, 2] = np.nan
    before = snapshot(p)
    with pytest.raises(lr.NonFiniteError, match="proj"):
        p.step(f)
    assert same(snapshot(p), before)


def test_overflow_in_update_restores_params():
    p = graph(1.0, lr_=1e38)
    f = dict(FEEDS, t=np.full((4, 2), -1000, np.float32))   # grads ~1e3: lr * g overflows float32
    before = snapshot(p)
    with pytest.raises(lr.NonFiniteError) as ei:
        p.step(f)
    assert "update" in str(ei.value), str(ei.value)
    assert same(snapshot(p), before)


def test_unchecked_program_propagates_silently(tmp_path):
    p = graph(0.0)
    p.save(tmp_path / "p.plan")
    fast = lr.load(tmp_path / "p.plan")              # check_finite off: fused entries, no checks
    assert not np.all(np.isfinite(fast.run(FEEDS)["q"]))
    checked = lr.load(tmp_path / "p.plan", check_finite=True)
    with pytest.raises(lr.NonFiniteError, match="bad_div"):
        checked.run(FEEDS)


@pytest.mark.parametrize("opt", [lc.SGD(lr=0.1), lc.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
                                 lc.Adam(lr=0.05, weight_decay=0.01)], ids=["sgd", "momentum", "adam"])
def test_checked_steps_train_exactly_like_unchecked_ones(opt):
    """check_finite runs an unfused copy of the step; the passes that fold the update into the weight
    GEMMs (SGD) or split it per param (Adam, W0 and W1 >= 64 KiB) must not leak into that copy, or its
    update would skip the folded params."""
    rng = np.random.default_rng(0)
    g = lc.Graph("cf")
    x = g.input("x", (8, 96), dtype="float64")
    W0 = g.param("W0", rng.standard_normal((96, 128)) * 0.1)
    W1 = g.param("W1", rng.standard_normal((128, 80)) * 0.1)
    b = g.param("b", np.zeros(80))
    loss = lc.mean(lc.sigmoid(lc.relu(x @ W0) @ W1 + b))
    g.output("loss", loss)
    fast = lc.compile(g, loss=loss, optimizer=opt)
    checked = lc.compile(g, loss=loss, optimizer=opt, check_finite=True)
    for _ in range(3):
        feeds = {"x": rng.standard_normal((8, 96))}
        assert checked.step(feeds) == pytest.approx(fast.step(feeds), rel=1e-12)
    for k, v in fast.state_dict().items():
        np.testing.assert_allclose(checked.state_dict()[k], v, rtol=1e-10, atol=1e-13, err_msg=k)


def test_check_names_the_single_op_even_where_the_fast_plan_fuses_it():
    """The fast plan runs matmul + bias + relu as one GEMM with an epilogue; the checked plan must still
    blame the bias add, not the fused node named after the relu."""
    g = lc.Graph("cf")
    x = g.input("x", (4, 3))
    t = g.input("t", (4, 2))
    w = g.param("w", np.ones((3, 2), np.float32))
    b = g.param("b", np.zeros(2, np.float32))
    r = lc.relu(lc.add(lc.matmul(x, w, name="proj"), b, name="bias"), name="act")
    loss = lc.mse(r, t, name="loss_mse")
    p = lc.compile(g, loss, lc.SGD(lr=0.1), check_finite=True)
    assert "gemm+bias+relu" in [i["op"] for i in p.instructions("step")]
    p.set_params({"b": np.array([np.inf, 0], np.float32)})
    for entry in ("run", "grad", "step"):
        with pytest.raises(lr.NonFiniteError, match="op 'add' \\(node 'bias'\\)"):
            getattr(p, entry)(FEEDS)
