"""An MLP's loss, logits and gradients against a NumPy forward/backward written out in conftest.np_mlp_ref."""
import numpy as np
import pytest

import libml_compile as lc
from conftest import (assert_close, build_mlp, check_grads_fd, make_mlp_params, mlp_param_dict,
                      np_mlp_ref)

CASES = [
    ([6, 16, 4], "relu"),
    ([5, 12, 10, 3], "relu"),
    ([5, 12, 10, 3], "sigmoid"),
]


def _data(sizes, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
    return x, y


@pytest.mark.parametrize("sizes,act", CASES, ids=[f"{'-'.join(map(str, s))}-{a}" for s, a in CASES])
def test_mlp_grads_float64(sizes, act):
    batch = 8
    weights = make_mlp_params(sizes, np.float64, seed=len(sizes))
    x, y = _data(sizes, batch, seed=1)
    g, loss = build_mlp(weights, batch, dtype="float64", act=act)
    prog = lc.compile(g, loss=loss)
    feeds = {"x": x, "y": y}
    ref_loss, ref_logits, ref_grads = np_mlp_ref(weights, x, y, act=act)
    out = prog.run(feeds)
    assert_close(out["logits"], ref_logits, 1e-12, 1e-12, "logits")
    assert_close(out["loss"], ref_loss, 1e-12, 1e-12, "loss")
    grads = prog.grad(feeds)
    assert set(grads) == set(mlp_param_dict(weights))
    for k, (dW, db) in enumerate(ref_grads):
        assert_close(grads[f"w{k}"], dW, 1e-9, 1e-12, f"dw{k}")
        assert_close(grads[f"b{k}"], db, 1e-9, 1e-12, f"db{k}")


def test_mlp_grads_float64_finite_differences():
    """Independent of the hand-written reference: central differences on a small MLP."""
    sizes = [3, 5, 3]
    weights = make_mlp_params(sizes, np.float64, seed=9)
    x, y = _data(sizes, 4, seed=2)
    g, loss = build_mlp(weights, 4, dtype="float64", act="sigmoid")
    prog = lc.compile(g, loss=loss)
    check_grads_fd(prog, {"x": x, "y": y}, ["w0", "b0", "w1", "b1"])


@pytest.mark.parametrize("sizes,act", CASES, ids=[f"{'-'.join(map(str, s))}-{a}" for s, a in CASES])
def test_mlp_grads_float32(sizes, act):
    batch = 16
    weights32 = make_mlp_params(sizes, np.float32, seed=len(sizes) + 10)
    weights64 = [(W.astype(np.float64), b.astype(np.float64)) for W, b in weights32]
    x, y = _data(sizes, batch, seed=3)
    x32 = x.astype(np.float32)
    g, loss = build_mlp(weights32, batch, dtype="float32", act=act)
    assert g.inputs["x"].dtype == "float32"
    prog = lc.compile(g, loss=loss)
    feeds = {"x": x32, "y": y}
    ref_loss, ref_logits, ref_grads = np_mlp_ref(weights64, x32.astype(np.float64), y, act=act)
    out = prog.run(feeds)
    assert out["logits"].dtype == np.float32
    assert_close(out["logits"], ref_logits, 1e-4, 1e-5, "logits")
    assert_close(out["loss"], ref_loss, 1e-4, 1e-5, "loss")
    grads = prog.grad(feeds)
    for k, (dW, db) in enumerate(ref_grads):
        assert grads[f"w{k}"].dtype == np.float32
        assert_close(grads[f"w{k}"], dW, 1e-3, 1e-5, f"dw{k}")
        assert_close(grads[f"b{k}"], db, 1e-3, 1e-5, f"db{k}")


def test_mlp_grads_larger_batch_float64():
    """Sizes big enough for the parallel / BLAS paths (several threads, non-tiny GEMMs)."""
    sizes = [64, 128, 10]
    batch = 256
    weights = make_mlp_params(sizes, np.float64, seed=4)
    x, y = _data(sizes, batch, seed=5)
    g, loss = build_mlp(weights, batch, dtype="float64")
    prog = lc.compile(g, loss=loss)
    feeds = {"x": x, "y": y}
    ref_loss, _, ref_grads = np_mlp_ref(weights, x, y)
    assert_close(prog.run(feeds)["loss"], ref_loss, 1e-11, 1e-12, "loss")
    grads = prog.grad(feeds)
    for k, (dW, db) in enumerate(ref_grads):
        assert_close(grads[f"w{k}"], dW, 1e-8, 1e-12, f"dw{k}")
        assert_close(grads[f"b{k}"], db, 1e-8, 1e-12, f"db{k}")


def test_mlp_grads_track_set_params():
    """After set_params the gradient is the reference gradient at the new values."""
    sizes = [6, 8, 3]
    weights = make_mlp_params(sizes, np.float64, seed=6)
    x, y = _data(sizes, 5, seed=7)
    g, loss = build_mlp(weights, 5)
    prog = lc.compile(g, loss=loss)
    new = make_mlp_params(sizes, np.float64, seed=8)
    prog.set_params(mlp_param_dict(new))
    for k, v in mlp_param_dict(new).items():
        np.testing.assert_array_equal(prog.params[k], v)
    _, _, ref_grads = np_mlp_ref(new, x, y)
    grads = prog.grad({"x": x, "y": y})
    for k, (dW, db) in enumerate(ref_grads):
        assert_close(grads[f"w{k}"], dW, 1e-9, 1e-12, f"dw{k}")
        assert_close(grads[f"b{k}"], db, 1e-9, 1e-12, f"db{k}")
