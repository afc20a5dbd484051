"""Every operator's forward value against NumPy and its gradient against float64 central differences.

Method (one helper, ``_check_op``): a float64 graph whose operands are params, a scalar loss
``sum(op(...) * R)`` with a fixed random const R (so the upstream gradient is not all ones),
``lc.compile(g, loss=loss)`` without an optimizer, then ``prog.grad`` against central differences computed
with ``prog.run`` on perturbed params (``prog.set_params``).
"""
import zlib

import numpy as np
import pytest

import libml_compile as lc
from conftest import assert_close, check_grads_fd, np_sigmoid, np_softmax

RTOL, ATOL = 1e-6, 1e-8


def _values(shape, rng, kind="any"):
    shape = tuple(shape)
    if kind == "any":
        return rng.standard_normal(shape)
    if kind == "away_from_zero":     # |v| in [0.5, 1.5]: divisors, relu inputs (no kinks within eps)
        mag = 0.5 + rng.random(shape)
        sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
        return np.asarray(sign * mag)
    raise ValueError(kind)


def _check_op(op, np_op, arrays, seed=0, dtype=np.float64, rtol=RTOL, atol=ATOL, grads=True):
    """Build loss = sum(op(params) * R); check forward against np_op and grads against finite diffs."""
    rng = np.random.default_rng(seed + 1000)
    g = lc.Graph("op")
    names = [f"p{i}" for i in range(len(arrays))]
    ts = [g.param(n, np.asarray(a, dtype=dtype)) for n, a in zip(names, arrays)]
    out = op(*ts)
    ref = np.asarray(np_op(*[np.asarray(a, np.float64) for a in arrays]))
    assert tuple(out.shape) == ref.shape, f"declared shape {out.shape}, NumPy gives {ref.shape}"
    assert out.dtype == np.dtype(dtype).name
    R = rng.standard_normal(ref.shape).astype(dtype)
    loss = lc.sum(out * g.const(R))
    assert tuple(loss.shape) == ()
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    res = prog.run({})
    assert res["out"].dtype == np.dtype(dtype)
    assert_close(res["out"], ref, rtol=rtol, atol=atol, what="forward")
    assert_close(np.asarray(res["loss"]), np.sum(ref * R), rtol=rtol, atol=atol, what="loss")
    if grads:
        gr = check_grads_fd(prog, {}, names, rtol=rtol, atol=atol)
        assert set(gr) == set(names)
    return prog


# ----------------------------------------------------------------------------------------------------
# binary elementwise ops, with broadcasting on both sides
# ----------------------------------------------------------------------------------------------------
BINARY = {
    "add": (lc.add, np.add),
    "sub": (lc.sub, np.subtract),
    "mul": (lc.mul, np.multiply),
    "div": (lc.div, np.divide),
}
OPERATOR_FORMS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}
BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),       # (B,N) with (N,)
    ((4,), (3, 4)),
    ((3, 4), (1, 4)),     # (B,N) with (1,N)
    ((1, 4), (3, 4)),
    ((3, 4), (3, 1)),     # (B,N) with (B,1)
    ((3, 1), (3, 4)),
    ((3, 4), ()),         # scalar
    ((), (3, 4)),
    ((3, 1), (1, 4)),     # both sides broadcast
    ((2, 3, 4), (3, 1)),  # rank broadcast + size-1 broadcast
    ((), ()),
]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opname", list(BINARY))
def test_binary_op_grad(opname, shapes):
    rng = np.random.default_rng(zlib.crc32(repr((opname, shapes)).encode()))
    a = _values(shapes[0], rng)
    b = _values(shapes[1], rng, "away_from_zero" if opname == "div" else "any")
    fn, np_fn = BINARY[opname]
    _check_op(fn, np_fn, [a, b])


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (3, 4)), ((), (3, 4))],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opname", list(BINARY))
def test_binary_operator_overloads_grad(opname, shapes):
    rng = np.random.default_rng(7)
    a = _values(shapes[0], rng)
    b = _values(shapes[1], rng, "away_from_zero" if opname == "div" else "any")
    _check_op(OPERATOR_FORMS[opname], BINARY[opname][1], [a, b])


SCALAR_CASES = {
    "t+2.5": (lambda a: a + 2.5, lambda a: a + 2.5),
    "2.5+t": (lambda a: 2.5 + a, lambda a: 2.5 + a),
    "t-1.5": (lambda a: a - 1.5, lambda a: a - 1.5),
    "1.5-t": (lambda a: 1.5 - a, lambda a: 1.5 - a),
    "t*3": (lambda a: a * 3.0, lambda a: a * 3.0),
    "3*t": (lambda a: 3.0 * a, lambda a: 3.0 * a),
    "t/4": (lambda a: a / 4.0, lambda a: a / 4.0),
    "2/t": (lambda a: 2.0 / a, lambda a: 2.0 / a),
    "t*ndarray": (lambda a: a * np.arange(1.0, 5.0), lambda a: a * np.arange(1.0, 5.0)),
    "t-ndarray": (lambda a: a - np.arange(1.0, 5.0), lambda a: a - np.arange(1.0, 5.0)),
}


@pytest.mark.parametrize("case", list(SCALAR_CASES))
def test_python_scalar_and_ndarray_operands(case):
    fn, np_fn = SCALAR_CASES[case]
    rng = np.random.default_rng(3)
    _check_op(fn, np_fn, [_values((3, 4), rng, "away_from_zero")])


# ----------------------------------------------------------------------------------------------------
# matmul: 2-D, batched 3-D, broadcast batch, 1-D operands (ONNX / NumPy matmul semantics)
# ----------------------------------------------------------------------------------------------------
MATMUL_SHAPES = [
    ((3, 4), (4, 5)),
    ((2, 3, 4), (2, 4, 5)),     # batched 3-D
    ((2, 3, 4), (4, 5)),        # broadcast batch on the right
    ((3, 4), (2, 4, 5)),        # broadcast batch on the left
    ((1, 3, 4), (2, 4, 5)),     # size-1 batch broadcast
    ((2, 1, 3, 4), (5, 4, 2)),  # 4-D with batch broadcast on both sides
    ((4,), (4, 5)),             # 1-D left
    ((3, 4), (4,)),             # 1-D right
    ((4,), (4,)),               # dot -> scalar
    ((4,), (2, 4, 5)),
    ((2, 3, 4), (4,)),
    ((1, 4), (4, 1)),
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda s: f"{s[0]}@{s[1]}")
def test_matmul_grad(shapes):
    rng = np.random.default_rng(11)
    a, b = _values(shapes[0], rng), _values(shapes[1], rng)
    _check_op(lc.matmul, np.matmul, [a, b])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4,))],
                         ids=lambda s: f"{s[0]}@{s[1]}")
def test_matmul_operator_grad(shapes):
    rng = np.random.default_rng(12)
    a, b = _values(shapes[0], rng), _values(shapes[1], rng)
    _check_op(lambda x, y: x @ y, np.matmul, [a, b])


def test_matmul_grad_closed_form():
    """Seed formulas directly: dA = G Bᵀ, dB = Aᵀ G with G the upstream gradient R."""
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    R = rng.standard_normal((3, 5))
    g = lc.Graph("mm")
    a, b = g.param("A", A), g.param("B", B)
    loss = lc.sum((a @ b) * g.const(R))
    g.output("loss", loss)
    grads = lc.compile(g, loss=loss).grad({})
    assert_close(grads["A"], R @ B.T, 1e-12, 1e-12, "dA")
    assert_close(grads["B"], A.T @ R, 1e-12, 1e-12, "dB")


# ----------------------------------------------------------------------------------------------------
# unary ops
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (5,)])
def test_relu_grad(shape):
    rng = np.random.default_rng(13)
    _check_op(lc.relu, lambda x: np.maximum(x, 0), [_values(shape, rng, "away_from_zero")])


def test_relu_grad_is_zero_at_zero():
    x = np.array([[-1.0, 0.0, 2.0], [0.0, 3.0, -0.5]])
    R = np.arange(1.0, 7.0).reshape(2, 3)
    g = lc.Graph("relu0")
    p = g.param("x", x)
    out = lc.relu(p)
    loss = lc.sum(out * g.const(R))
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    np.testing.assert_array_equal(prog.run({})["out"], np.maximum(x, 0))
    np.testing.assert_array_equal(prog.grad({})["x"], R * (x > 0))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_sigmoid_grad(shape):
    rng = np.random.default_rng(14)
    _check_op(lc.sigmoid, np_sigmoid, [rng.standard_normal(shape) * 2])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sigmoid_extreme_inputs_are_finite(dtype):
    x = np.array([-1000.0, -80.0, -30.0, 0.0, 30.0, 80.0, 1000.0], dtype=dtype)
    g = lc.Graph("sig")
    p = g.param("x", x)
    out = lc.sigmoid(p)
    loss = lc.sum(out)
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    y = prog.run({})["out"]
    with np.errstate(over="ignore"):
        ref = np_sigmoid(x.astype(np.float64))
    rtol = 1e-6 if dtype == "float64" else 1e-5
    assert np.all(np.isfinite(y)), y
    assert_close(y, ref, rtol=rtol, atol=1e-30, what="sigmoid")
    gr = prog.grad({})["x"]
    assert np.all(np.isfinite(gr)), gr
    # σ(1-σ) from the forward output loses the tail once σ rounds to 1: absolute tolerance there
    assert_close(gr, ref * (1 - ref), rtol=1e-5, atol=1e-15 if dtype == "float64" else 1e-7,
                 what="sigmoid grad")


SOFTMAX_CASES = [((3, 4), -1), ((3, 4), 0), ((3, 4), 1), ((2, 3, 4), 0), ((2, 3, 4), 1),
                 ((2, 3, 4), 2), ((2, 3, 4), -1), ((5,), 0)]


@pytest.mark.parametrize("shape,axis", SOFTMAX_CASES, ids=[f"{s}-ax{a}" for s, a in SOFTMAX_CASES])
def test_softmax_grad(shape, axis):
    rng = np.random.default_rng(15)
    _check_op(lambda t: lc.softmax(t, axis=axis), lambda z: np_softmax(z, axis=axis),
              [rng.standard_normal(shape)])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_grad_closed_form(axis):
    """s ⊙ (g − Σ g⊙s) along the axis (operator spec)."""
    rng = np.random.default_rng(16)
    z, R = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    g = lc.Graph("sm")
    p = g.param("z", z)
    loss = lc.sum(lc.softmax(p, axis=axis) * g.const(R))
    g.output("loss", loss)
    s = np_softmax(z, axis=axis)
    expected = s * (R - np.sum(R * s, axis=axis, keepdims=True))
    assert_close(lc.compile(g, loss=loss).grad({})["z"], expected, 1e-12, 1e-14, "softmax grad")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_softmax_huge_logits_stable(dtype):
    z = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], dtype=dtype)
    g = lc.Graph("smbig")
    p = g.param("z", z)
    out = lc.softmax(p, axis=-1)
    loss = lc.sum(out * g.const(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=dtype)))
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    y = prog.run({})["out"]
    assert np.all(np.isfinite(y)), y
    assert_close(y, np_softmax(z.astype(np.float64)), 1e-6, 1e-30, "softmax")
    assert np.all(np.isfinite(prog.grad({})["z"]))


# ----------------------------------------------------------------------------------------------------
# reductions
# ----------------------------------------------------------------------------------------------------
REDUCE_CASES = [(None, False), (0, False), (1, False), (-1, False), ((0, 2), False),
                (None, True), (1, True), ((0, 2), True), (2, True)]


@pytest.mark.parametrize("axis,keepdims", REDUCE_CASES, ids=[f"ax{a}-kd{k}" for a, k in REDUCE_CASES])
@pytest.mark.parametrize("name", ["sum", "mean"])
def test_reduction_grad(name, axis, keepdims):
    rng = np.random.default_rng(17)
    fn = getattr(lc, name)
    np_fn = getattr(np, name)
    _check_op(lambda t: fn(t, axis=axis, keepdims=keepdims),
              lambda x: np_fn(x, axis=axis, keepdims=keepdims), [rng.standard_normal((2, 3, 4))])


def test_reduction_defaults_reduce_to_scalar():
    rng = np.random.default_rng(18)
    _check_op(lambda t: lc.sum(t) * lc.mean(t), lambda x: np.sum(x) * np.mean(x),
              [rng.standard_normal((3, 4))])


# ----------------------------------------------------------------------------------------------------
# shape helpers from the contract
# ----------------------------------------------------------------------------------------------------
def test_reshape_transpose_identity_grad():
    rng = np.random.default_rng(19)
    _check_op(lambda t: lc.transpose(lc.reshape(lc.identity(t), (4, 6)), (1, 0)),
              lambda x: x.reshape(4, 6).T, [rng.standard_normal((2, 3, 4))])
    _check_op(lambda t: lc.transpose(t, (2, 0, 1)), lambda x: np.transpose(x, (2, 0, 1)),
              [rng.standard_normal((2, 3, 4))])


# ----------------------------------------------------------------------------------------------------
# composite graphs: gradient accumulation for tensors used several times
# ----------------------------------------------------------------------------------------------------
def test_reused_tensors_accumulate_gradients():
    rng = np.random.default_rng(20)
    A, B = rng.standard_normal((3, 4)), rng.standard_normal((4, 4))

    def f(a, b):
        return lc.sigmoid(a @ b) * a + a @ (b * b) - a / (lc.softmax(a, axis=0) + 1.0)

    def np_f(a, b):
        return np_sigmoid(a @ b) * a + a @ (b * b) - a / (np_softmax(a, axis=0) + 1.0)

    _check_op(f, np_f, [A, B])


def test_same_tensor_both_operands():
    rng = np.random.default_rng(21)
    A = rng.standard_normal((4, 4))
    _check_op(lambda a: a * a + a @ a - a, lambda a: a * a + a @ a - a, [A])


def test_deep_chain_grad():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((4, 5))
    W = rng.standard_normal((5, 5)) * 0.5
    b = rng.standard_normal(5) * 0.1

    def f(x, W, b):
        h = x
        for _ in range(4):
            h = lc.sigmoid(h @ W + b)
        return lc.mean(h, axis=0)

    def np_f(x, W, b):
        h = x
        for _ in range(4):
            h = np_sigmoid(h @ W + b)
        return h.mean(axis=0)

    _check_op(f, np_f, [x, W, b])


# ----------------------------------------------------------------------------------------------------
# float32 forward for every op, and integer forward
# ----------------------------------------------------------------------------------------------------
F32_CASES = {
    "add": (lc.add, np.add, [(3, 4), (4,)]),
    "sub": (lc.sub, np.subtract, [(3, 1), (3, 4)]),
    "mul": (lc.mul, np.multiply, [(3, 4), ()]),
    "div": (lc.div, np.divide, [(3, 4), (1, 4)]),
    "matmul": (lc.matmul, np.matmul, [(2, 3, 4), (4, 5)]),
    "relu": (lc.relu, lambda x: np.maximum(x, 0), [(3, 4)]),
    "sigmoid": (lc.sigmoid, np_sigmoid, [(3, 4)]),
    "softmax": (lambda t: lc.softmax(t, axis=1), lambda x: np_softmax(x, axis=1), [(2, 3, 4)]),
    "sum": (lambda t: lc.sum(t, axis=1), lambda x: x.sum(axis=1), [(3, 4)]),
    "mean": (lambda t: lc.mean(t), np.mean, [(3, 4)]),
}


@pytest.mark.parametrize("opname", list(F32_CASES))
def test_float32_forward_and_grad(opname):
    """float32 programs: forward vs NumPy (float64) and grads vs finite differences, loose tolerance."""
    fn, np_fn, shapes = F32_CASES[opname]
    rng = np.random.default_rng(23)
    arrays = [_values(s, rng, "away_from_zero").astype(np.float32) for s in shapes]
    prog = _check_op(fn, np_fn, arrays, dtype=np.float32, rtol=1e-5, atol=1e-6, grads=False)
    grads = prog.grad({})
    for i, a in enumerate(arrays):
        assert grads[f"p{i}"].dtype == np.float32
        assert grads[f"p{i}"].shape == a.shape


def test_integer_forward_ops():
    """int64 add/sub/mul/div forward; div truncates toward zero like C / ONNX."""
    a = np.array([[7, -7, 9, -9], [1, 0, -1, 100]], dtype=np.int64)
    b = np.array([2, 2, -4, -4], dtype=np.int64)
    g = lc.Graph("ints")
    ta = g.input("a", a.shape, dtype="int64")
    tb = g.input("b", b.shape, dtype="int64")
    g.output("add", ta + tb)
    g.output("sub", ta - tb)
    g.output("mul", ta * tb)
    g.output("div", ta / tb)
    res = lc.compile(g).run({"a": a, "b": b})
    np.testing.assert_array_equal(res["add"], a + b)
    np.testing.assert_array_equal(res["sub"], a - b)
    np.testing.assert_array_equal(res["mul"], a * b)
    np.testing.assert_array_equal(res["div"], np.trunc(a / b).astype(np.int64))
    assert res["div"].dtype == np.int64


# ----------------------------------------------------------------------------------------------------
# larger, odd sizes (parallel / SIMD paths, tails) against closed-form NumPy VJPs, on 2 threads
# ----------------------------------------------------------------------------------------------------
def _unbroadcast(g, shape):
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(axis=i, keepdims=True)
    return g.reshape(shape)


LARGE_BINARY = [((257, 131), (257, 131)), ((257, 131), (131,)), ((257, 131), (1, 131)),
                ((257, 131), (257, 1)), ((257, 131), ()), ((257, 1), (1, 131))]
VJPS = {
    "add": lambda A, B, R: (R, R),
    "sub": lambda A, B, R: (R, -R),
    "mul": lambda A, B, R: (R * B, R * A),
    "div": lambda A, B, R: (R / B, -R * A / B ** 2),
}


@pytest.mark.parametrize("shapes", LARGE_BINARY, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opname", list(BINARY))
def test_large_binary_closed_form(opname, shapes):
    rng = np.random.default_rng(50)
    A = _values(shapes[0], rng)
    B = _values(shapes[1], rng, "away_from_zero" if opname == "div" else "any")
    fn, np_fn = BINARY[opname]
    ref = np_fn(A, B)
    R = rng.standard_normal(ref.shape)
    g = lc.Graph("big")
    a, b = g.param("a", A), g.param("b", B)
    out = fn(a, b)
    loss = lc.sum(out * g.const(R))
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, num_threads=2)
    assert_close(prog.run({})["out"], ref, 1e-12, 1e-12, "forward")
    grads = prog.grad({})
    dA, dB = VJPS[opname](A, B, R)
    assert_close(grads["a"], _unbroadcast(dA, A.shape), 1e-10, 1e-10, "d/da")
    assert_close(grads["b"], _unbroadcast(dB, B.shape), 1e-10, 1e-10, "d/db")


@pytest.mark.parametrize("shapes", [((67, 129), (129, 33)), ((3, 67, 129), (129, 33)),
                                    ((67, 129), (3, 129, 33)), ((3, 67, 129), (3, 129, 33))],
                         ids=lambda s: f"{s[0]}@{s[1]}")
def test_large_matmul_closed_form(shapes):
    rng = np.random.default_rng(51)
    A, B = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    ref = A @ B
    R = rng.standard_normal(ref.shape)
    g = lc.Graph("bigmm")
    a, b = g.param("a", A), g.param("b", B)
    out = a @ b
    loss = lc.sum(out * g.const(R))
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, num_threads=2)
    assert_close(prog.run({})["out"], ref, 1e-12, 1e-11, "forward")
    grads = prog.grad({})
    assert_close(grads["a"], _unbroadcast(R @ np.swapaxes(B, -1, -2), A.shape), 1e-10, 1e-10, "dA = G Bᵀ")
    assert_close(grads["b"], _unbroadcast(np.swapaxes(A, -1, -2) @ R, B.shape), 1e-10, 1e-10, "dB = Aᵀ G")


LARGE_UNARY = {
    "relu": (lc.relu, lambda x: np.maximum(x, 0), lambda x, y, R: R * (x > 0)),
    "sigmoid": (lc.sigmoid, np_sigmoid, lambda x, y, R: R * y * (1 - y)),
    "softmax_ax0": (lambda t: lc.softmax(t, axis=0), lambda x: np_softmax(x, axis=0),
                    lambda x, y, R: y * (R - np.sum(R * y, axis=0, keepdims=True))),
    "softmax_ax-1": (lambda t: lc.softmax(t, axis=-1), lambda x: np_softmax(x, axis=-1),
                     lambda x, y, R: y * (R - np.sum(R * y, axis=-1, keepdims=True))),
    "sum_ax0": (lambda t: lc.sum(t, axis=0), lambda x: x.sum(axis=0),
                lambda x, y, R: np.broadcast_to(R, x.shape)),
    "mean_ax1_kd": (lambda t: lc.mean(t, axis=1, keepdims=True), lambda x: x.mean(axis=1, keepdims=True),
                    lambda x, y, R: np.broadcast_to(R, x.shape) / x.shape[1]),
    "sum_all": (lambda t: lc.sum(t), np.sum, lambda x, y, R: np.broadcast_to(R, x.shape)),
}


@pytest.mark.parametrize("opname", list(LARGE_UNARY))
def test_large_unary_closed_form(opname):
    rng = np.random.default_rng(52)
    X = rng.standard_normal((257, 131)) * 3
    fn, np_fn, vjp = LARGE_UNARY[opname]
    ref = np.asarray(np_fn(X))
    R = rng.standard_normal(ref.shape)
    g = lc.Graph("bigu")
    x = g.param("x", X)
    out = fn(x)
    loss = lc.sum(out * g.const(R))
    g.output("out", out)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, num_threads=2)
    assert_close(prog.run({})["out"], ref, 1e-12, 1e-12, "forward")
    assert_close(prog.grad({})["x"], vjp(X, ref, R), 1e-10, 1e-12, "grad")
