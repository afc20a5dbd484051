"""Static shapes and dtypes: inference follows NumPy broadcasting and ONNX MatMul; a mismatch raises
ValueError at declaration naming the op and both shapes."""

import numpy as np
import pytest

import libml_compile as lc
from conftest import mentions_shape as _mentions_shape




def _two(sa, sb, dtype="float32"):
    g = lc.Graph("s")
    return g, g.input("a", sa, dtype=dtype), g.input("b", sb, dtype=dtype)


BAD_BINARY = [((3, 4), (5, 4)), ((3, 4), (3,)), ((2, 3, 4), (3, 3, 4)), ((4,), (5,))]
FORMS = {
    "add": (lc.add, lambda a, b: a + b),
    "sub": (lc.sub, lambda a, b: a - b),
    "mul": (lc.mul, lambda a, b: a * b),
    "div": (lc.div, lambda a, b: a / b),
}


@pytest.mark.parametrize("style", ["function", "operator"])
@pytest.mark.parametrize("shapes", BAD_BINARY, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("op", list(FORMS))
def test_elementwise_mismatch_raises_at_declaration(op, shapes, style):
    g, a, b = _two(*shapes)
    fn = FORMS[op][0 if style == "function" else 1]
    with pytest.raises(ValueError) as ei:
        fn(a, b)
    msg = str(ei.value)
    assert op in msg.lower(), f"message does not name the op {op!r}: {msg!r}"
    for s in shapes:
        assert _mentions_shape(msg, s), f"message does not mention shape {s}: {msg!r}"


BAD_MATMUL = [((3, 4), (5, 6)), ((4,), (5,)), ((3, 4), (5,)), ((4,), (3, 5)),
              ((2, 3, 4), (3, 4, 5)), ((2, 3, 4), (2, 5, 6)), ((3, 2, 3, 4), (2, 2, 4, 5))]


@pytest.mark.parametrize("style", ["function", "operator"])
@pytest.mark.parametrize("shapes", BAD_MATMUL, ids=lambda s: f"{s[0]}@{s[1]}")
def test_matmul_mismatch_raises_at_declaration(shapes, style):
    g, a, b = _two(*shapes)
    with pytest.raises(ValueError) as ei:
        lc.matmul(a, b) if style == "function" else a @ b
    msg = str(ei.value)
    assert "matmul" in msg.lower(), f"message does not name MatMul: {msg!r}"
    for s in shapes:
        assert _mentions_shape(msg, s), f"message does not mention shape {s}: {msg!r}"


def test_mismatch_with_const_operand():
    g = lc.Graph("s")
    a = g.input("a", (3, 4))
    with pytest.raises(ValueError) as ei:
        a + np.zeros((2, 4), np.float32)
    assert _mentions_shape(str(ei.value), (3, 4)) and _mentions_shape(str(ei.value), (2, 4))


def test_loss_shape_mismatch_raises():
    g = lc.Graph("s")
    z = g.input("z", (4, 3))
    y = g.input("y", (5,), dtype="int64")
    with pytest.raises(ValueError) as ei:
        lc.softmax_cross_entropy(z, y)
    assert _mentions_shape(str(ei.value), (4, 3)) and _mentions_shape(str(ei.value), (5,))
    p, t = g.input("p", (4, 3)), g.input("t", (4, 2))
    with pytest.raises(ValueError) as ei:
        lc.mse(p, t)
    assert "mse" in str(ei.value).lower()
    assert _mentions_shape(str(ei.value), (4, 3)) and _mentions_shape(str(ei.value), (4, 2))


@pytest.mark.parametrize("shape,axis", [((3, 4), 2), ((3, 4), -3), ((5,), 1)])
def test_bad_axis_raises(shape, axis):
    g = lc.Graph("s")
    a = g.input("a", shape)
    for fn in (lambda t: lc.softmax(t, axis=axis), lambda t: lc.sum(t, axis=axis),
               lambda t: lc.mean(t, axis=axis)):
        with pytest.raises(ValueError):
            fn(a)


def test_reshape_size_mismatch_raises():
    g = lc.Graph("s")
    a = g.input("a", (3, 4))
    with pytest.raises(ValueError):
        lc.reshape(a, (5, 2))


# ----------------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------------
GOOD_BINARY = [((3, 4), (4,)), ((3, 4), (1, 4)), ((3, 4), (3, 1)), ((3, 4), ()), ((), (3, 4)),
               ((3, 1), (1, 4)), ((2, 1, 4), (3, 1)), ((1,), (3, 4))]


@pytest.mark.parametrize("shapes", GOOD_BINARY, ids=lambda s: f"{s[0]}-{s[1]}")
@pytest.mark.parametrize("op", list(FORMS))
def test_broadcast_shape_inference(op, shapes):
    g, a, b = _two(*shapes, dtype="float64")
    out = FORMS[op][0](a, b)
    expected = np.broadcast_shapes(*shapes)
    assert tuple(out.shape) == expected
    assert out.dtype == "float64"
    assert isinstance(out.shape, tuple)


GOOD_MATMUL = [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)),
               ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((2, 1, 3, 4), (5, 4, 2)), ((4,), (2, 4, 5))]


@pytest.mark.parametrize("shapes", GOOD_MATMUL, ids=lambda s: f"{s[0]}@{s[1]}")
def test_matmul_shape_inference(shapes):
    g, a, b = _two(*shapes)
    out = a @ b
    expected = np.matmul(np.zeros(shapes[0]), np.zeros(shapes[1])).shape
    assert tuple(out.shape) == expected
    assert out.dtype == "float32"


@pytest.mark.parametrize("axis,keepdims", [(None, False), (None, True), (0, False), (-1, True),
                                           ((0, 2), False), ((1,), True)])
def test_reduction_shape_inference(axis, keepdims):
    g = lc.Graph("s")
    a = g.input("a", (2, 3, 4))
    expected = np.sum(np.zeros((2, 3, 4)), axis=axis, keepdims=keepdims).shape
    assert tuple(lc.sum(a, axis=axis, keepdims=keepdims).shape) == expected
    assert tuple(lc.mean(a, axis=axis, keepdims=keepdims).shape) == expected


def test_unary_and_loss_shapes():
    g = lc.Graph("s")
    z = g.input("z", (5, 3), dtype="float64")
    y = g.input("y", (5,), dtype="int64")
    assert tuple(lc.relu(z).shape) == (5, 3)
    assert tuple(lc.sigmoid(z).shape) == (5, 3)
    assert tuple(lc.softmax(z, axis=0).shape) == (5, 3)
    ce = lc.softmax_cross_entropy(z, y)
    assert tuple(ce.shape) == () and ce.dtype == "float64"
    m = lc.mse(z, g.input("t", (5, 3), dtype="float64"))
    assert tuple(m.shape) == () and m.dtype == "float64"
    assert tuple(lc.transpose(z).shape) == (3, 5)
    assert tuple(lc.reshape(z, (15,)).shape) == (15,)


def test_graph_bookkeeping():
    g = lc.Graph("book")
    x = g.input("x", (2, 3))
    w = g.param("w", np.ones((3, 4), np.float32))
    assert x.dtype == "float32" and x.shape == (2, 3) and x.name == "x" and x.graph is g
    assert set(g.inputs) == {"x"} and set(g.params) == {"w"}
    np.testing.assert_array_equal(g.params["w"].value, np.ones((3, 4), np.float32))
    h = lc.relu(x @ w, name="hidden")
    assert h.name == "hidden"
    assert g.tensor("hidden") is h
    g.output("out", h)
    assert set(g.outputs) == {"out"} and g.outputs["out"] is h
    prog = lc.compile(g)
    assert prog.graph is g
    res = prog.run({"x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(res["out"], np.full((2, 4), 3.0, np.float32))


def test_param_dtype_from_array():
    g = lc.Graph("s")
    assert g.param("p64", np.zeros((2, 2))).dtype == "float64"
    assert g.param("p32", np.zeros((2, 2), np.float32)).dtype == "float32"
