"""softmax_cross_entropy and mse: values and gradients against closed forms; stability with huge logits."""
import numpy as np
import pytest

import libml_compile as lc
from conftest import assert_close, check_grads_fd, np_softmax, np_softmax_ce


def _ce_prog(logits, labels, label_dtype="int64"):
    dtype = logits.dtype.name
    g = lc.Graph("ce")
    z = g.param("z", logits)
    y = g.input("y", labels.shape, dtype=label_dtype)
    loss = lc.softmax_cross_entropy(z, y)
    assert tuple(loss.shape) == ()
    assert loss.dtype == dtype
    g.output("loss", loss)
    return lc.compile(g, loss=loss)


@pytest.mark.parametrize("B,C", [(5, 3), (1, 4), (8, 10)])
def test_softmax_cross_entropy_value_and_grad(B, C):
    rng = np.random.default_rng(B * 100 + C)
    z = rng.standard_normal((B, C)) * 2
    labels = rng.integers(0, C, size=B).astype(np.int64)
    prog = _ce_prog(z, labels)
    feeds = {"y": labels}
    loss, grad = np_softmax_ce(z, labels)
    # closed forms: mean(logsumexp(z) - z[y]) and (softmax(z) - onehot) / B
    onehot = np.eye(C)[labels]
    assert_close(grad, (np_softmax(z, axis=1) - onehot) / B, 1e-12, 1e-15, "reference self-check")
    assert_close(prog.run(feeds)["loss"], loss, 1e-10, 1e-12, "loss value")
    assert_close(prog.grad(feeds)["z"], grad, 1e-9, 1e-12, "d loss / d logits")
    check_grads_fd(prog, feeds, ["z"])


def test_softmax_cross_entropy_int32_labels():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 4))
    labels = rng.integers(0, 4, size=6)
    prog = _ce_prog(z, labels.astype(np.int32), label_dtype="int32")
    feeds = {"y": labels.astype(np.int32)}
    loss, grad = np_softmax_ce(z, labels)
    assert_close(prog.run(feeds)["loss"], loss, 1e-10, 1e-12, "loss value")
    assert_close(prog.grad(feeds)["z"], grad, 1e-9, 1e-12, "d loss / d logits")


def test_softmax_cross_entropy_through_logits_graph():
    """The loss gradient flows into an upstream matmul + bias (not only into a param fed directly)."""
    rng = np.random.default_rng(2)
    X, W, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)
    labels = rng.integers(0, 3, size=6).astype(np.int64)
    g = lc.Graph("ce2")
    x = g.input("x", X.shape, dtype="float64")
    y = g.input("y", labels.shape, dtype="int64")
    w_t, b_t = g.param("W", W), g.param("b", b)
    loss = lc.softmax_cross_entropy(x @ w_t + b_t, y)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    feeds = {"x": X, "y": labels}
    loss_ref, G = np_softmax_ce(X @ W + b, labels)
    grads = prog.grad(feeds)
    assert set(grads) == {"W", "b"}
    assert_close(prog.run(feeds)["loss"], loss_ref, 1e-10, 1e-12, "loss")
    assert_close(grads["W"], X.T @ G, 1e-9, 1e-12, "dW")
    assert_close(grads["b"], G.sum(axis=0), 1e-9, 1e-12, "db")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_huge_logits_stable(dtype):
    z = np.array([[1e4, 0.0, -1e4],
                  [-1e4, 1e4, 0.0],
                  [1e4, 1e4, -1e4],
                  [-1e4, -1e4, -1e4]], dtype=dtype)
    labels = np.array([0, 2, 1, 2], dtype=np.int64)
    prog = _ce_prog(z, labels)
    feeds = {"y": labels}
    loss = float(prog.run(feeds)["loss"])
    grad = prog.grad(feeds)["z"]
    ref_loss, ref_grad = np_softmax_ce(z.astype(np.float64), labels)
    assert np.isfinite(loss), loss
    assert np.all(np.isfinite(grad)), grad
    # row losses: 0, 1e4, log 2, log 3 -> mean ~ 2500.45
    assert_close(loss, ref_loss, 1e-6, 1e-6, "loss")
    assert_close(grad, ref_grad, 1e-5, 1e-7, "grad")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_cross_entropy_huge_logits_training_step_finite(dtype):
    z = (np.random.default_rng(3).standard_normal((4, 5)) * 1e4).astype(dtype)
    labels = np.array([0, 1, 2, 3], dtype=np.int64)
    g = lc.Graph("ce3")
    p = g.param("z", z)
    y = g.input("y", (4,), dtype="int64")
    loss = lc.softmax_cross_entropy(p, y)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    val = prog.step({"y": labels})
    assert isinstance(val, float)
    assert np.isfinite(val)
    assert np.all(np.isfinite(prog.params["z"]))


# ----------------------------------------------------------------------------------------------------
# mse
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3), (7,), (2, 3, 4)])
def test_mse_value_and_grad(shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[0])
    P, T = rng.standard_normal(shape), rng.standard_normal(shape)
    g = lc.Graph("mse")
    p = g.param("p", P)
    t = g.input("t", shape, dtype="float64")
    loss = lc.mse(p, t)
    assert tuple(loss.shape) == ()
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    feeds = {"t": T}
    N = P.size
    assert_close(prog.run(feeds)["loss"], np.mean((P - T) ** 2), 1e-12, 1e-14, "mse value")
    grads = prog.grad(feeds)
    assert set(grads) == {"p"}
    assert_close(grads["p"], 2 * (P - T) / N, 1e-12, 1e-14, "d mse / d pred")
    check_grads_fd(prog, feeds, ["p"])


def test_mse_grad_both_operands_params():
    rng = np.random.default_rng(4)
    P, T = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    g = lc.Graph("mse2")
    p, t = g.param("p", P), g.param("t", T)
    loss = lc.mse(p, t)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    grads = prog.grad({})
    assert_close(grads["p"], 2 * (P - T) / P.size, 1e-12, 1e-14, "d/dpred")
    assert_close(grads["t"], -2 * (P - T) / P.size, 1e-12, 1e-14, "d/dtarget")


def test_mse_float32():
    rng = np.random.default_rng(5)
    P, T = rng.standard_normal((16, 4)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    g = lc.Graph("mse3")
    p = g.param("p", P)
    t = g.input("t", T.shape)          # default dtype float32
    assert t.dtype == "float32"
    loss = lc.mse(p, t)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    P64, T64 = P.astype(np.float64), T.astype(np.float64)
    assert_close(prog.run({"t": T})["loss"], np.mean((P64 - T64) ** 2), 1e-5, 1e-7, "mse f32")
    gr = prog.grad({"t": T})["p"]
    assert gr.dtype == np.float32
    assert_close(gr, 2 * (P64 - T64) / P.size, 1e-5, 1e-7, "mse grad f32")


def test_mse_large_values_finite():
    P = np.array([[1e4, -1e4], [3e4, 0.0]])
    T = np.zeros((2, 2))
    g = lc.Graph("mse4")
    p = g.param("p", P)
    t = g.input("t", (2, 2), dtype="float64")
    loss = lc.mse(p, t)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    assert_close(prog.run({"t": T})["loss"], np.mean(P ** 2), 1e-12, 0, "mse")
    assert_close(prog.grad({"t": T})["p"], 2 * P / 4, 1e-12, 0, "mse grad")
