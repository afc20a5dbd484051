"""Frontend hardening (issue 10 items 3, 4, 7, 24, 28): operands are never truncated, user integers are
never wrapped or truncated, hyper-parameters are never NaN/Inf, and bad declarations fail at once with
a message naming the op/input and the value."""
import re
import warnings

import numpy as np
import pytest

import libml_compile as lc
from libml_compile.ops import DoubleSoftmaxWarning, softmax_source


def _int_graph(dtype="int32", shape=(4,)):
    g = lc.Graph("ints")
    return g, g.input("i", shape, dtype=dtype)


# ---- item 3: Python / NumPy operands with typed tensors ------------------------------------------

def test_python_float_with_int_tensor_raises_instead_of_truncating():
    g, i = _int_graph()
    with pytest.raises(TypeError, match=r"mul: the Python float 2\.7 .*lc\.cast"):
        i * 2.7
    with pytest.raises(TypeError, match="add"):
        2.5 + i


@pytest.mark.parametrize("dtype,value", [("int32", 2 ** 40), ("int32", -2 ** 31 - 1), ("uint8", 256),
                                         ("uint8", -1), ("int64", 2 ** 63)])
def test_python_int_that_does_not_fit_the_int_dtype_raises_overflow(dtype, value):
    g, i = _int_graph(dtype)
    with pytest.raises(OverflowError, match=f"add: the Python int {value}"):
        i + value


def test_python_ints_and_bools_that_fit_compute_exactly_like_numpy():
    g, i = _int_graph("int32")
    big = 2 ** 31 - 10
    g.output("a", i + big)
    g.output("m", i * 3)
    g.output("b", i + True)
    x = np.array([0, 1, 5, 9], np.int32)
    out = lc.compile(g).run({"i": x})
    np.testing.assert_array_equal(out["a"], x + np.int32(big))
    np.testing.assert_array_equal(out["m"], x * 3)
    np.testing.assert_array_equal(out["b"], x + 1)
    assert out["a"].dtype == np.int32


def test_python_scalars_keep_a_float_tensors_dtype_but_never_overflow_it_silently():
    g = lc.Graph("f")
    x = g.input("x", (3,))
    y = x * 0.1 + 2 ** 40
    assert y.dtype == "float32"
    with pytest.raises(OverflowError, match=re.escape("mul: the scalar 1e+39")):
        x * 1e39
    with pytest.raises(OverflowError, match="add"):
        x + 10 ** 400
    assert (x * float("inf")).dtype == "float32"  # an infinite scalar is a value, not an overflow


def test_numpy_operands_are_strong_converted_only_when_exact():
    g = lc.Graph("np")
    x = g.input("x", (2,))
    with pytest.raises(ValueError, match=r"mul: the NumPy float64 operand 0\.1 cannot be converted .*float32"):
        x * np.float64(0.1)
    with pytest.raises(ValueError, match=r"add: the NumPy float64 operand of shape \(2,\) .*without changing"):
        x + np.array([1e300, 1.0])
    with pytest.raises(ValueError, match="mul: the NumPy float64 operand of shape"):
        x * [0.1, 0.2]  # a list is an array (strong), as in NumPy
    with pytest.raises(ValueError, match="add"):
        x + np.array([2 ** 25 + 1, 0], np.int64)  # not representable in float32
    g.output("y", x * np.array([1.5, -2.0]) + [3, 4])
    X = np.array([1.0, 2.0], np.float32)
    np.testing.assert_array_equal(lc.compile(g).run({"x": X})["y"], X * np.float32([1.5, -2]) + np.float32([3, 4]))

    g2, i = _int_graph("int32", (2,))
    with pytest.raises(TypeError, match="does not promote integers to floats"):
        i * np.float64(2.0)
    with pytest.raises(ValueError, match="int64 operand 1099511627776"):
        i + np.int64(2 ** 40)
    with pytest.raises(ValueError, match="uint32"):
        _int_graph("uint32", (2,))[1] + np.array([-1, 1])
    g2.output("z", i + np.array([7, -3], np.int64) + np.array([True, False]))
    np.testing.assert_array_equal(lc.compile(g2).run({"i": np.array([1, 2], np.int32)})["z"], [9, -1])


# ---- item 4: integers taken from users -------------------------------------------------------------

@pytest.mark.parametrize("perm", [(3, 4), (0, 2), (-3, 0)])
def test_transpose_out_of_range_perm_raises_instead_of_wrapping(perm):
    g = lc.Graph("t")
    x = g.input("x", (2, 3))
    with pytest.raises(ValueError, match=rf"transpose: axis -?\d .* out of range for a 2-D tensor"):
        lc.transpose(x, perm)


@pytest.mark.parametrize("bad", [2.5, "4", True, np.float64(3.9), np.bool_(True)])
def test_non_integer_dims_are_refused_naming_the_op_and_value(bad):
    g = lc.Graph("t")
    x = g.input("x", (2, 3))
    for call, op in [(lambda: lc.transpose(x, (bad, 0)), "transpose"),
                     (lambda: lc.reshape(x, (bad, 3)), "reshape"),
                     (lambda: lc.broadcast_to(x, (bad, 2, 3)), "broadcast_to"),
                     (lambda: lc.sum(x, axis=bad), "sum"),
                     (lambda: lc.mean(x, axis=(bad,)), "mean"),
                     (lambda: lc.softmax(x, axis=bad), "softmax"),
                     (lambda: g.input("y", (bad, 3)), "input 'y'")]:
        with pytest.raises(TypeError, match=f"{re.escape(op)}.*expected an integer, got .*{re.escape(repr(bad))}"):
            call()


def test_softmax_axis_float_names_softmax_not_iterable():
    g = lc.Graph("t")
    x = g.input("x", (2, 3))
    with pytest.raises(TypeError, match=r"softmax: axis: expected an integer, got float 1\.5"):
        lc.softmax(x, axis=1.5)


def test_negative_perms_in_range_reshape_minus_one_and_numpy_ints_work_like_numpy():
    g = lc.Graph("t")
    x = g.input("x", (2, 3, 4))
    g.output("t", lc.transpose(x, (-1, np.int64(0), 1)))
    g.output("r", lc.reshape(x, (np.int32(4), -1)))
    g.output("s", lc.softmax(x, axis=np.int64(-2)))
    X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = lc.compile(g).run({"x": X})
    np.testing.assert_array_equal(out["t"], X.transpose(-1, 0, 1))
    np.testing.assert_array_equal(out["r"], X.reshape(4, -1))
    e = np.exp(X - X.max(axis=-2, keepdims=True))
    np.testing.assert_allclose(out["s"], e / e.sum(axis=-2, keepdims=True), rtol=1e-6)


def test_negative_dims_in_reshape_and_broadcast_to_are_refused_naming_the_op():
    g = lc.Graph("t")
    x = g.input("x", (4, 4))
    with pytest.raises(ValueError, match=r"reshape: shape \(-4, -4\) has a negative dimension"):
        lc.reshape(x, (-4, -4))
    with pytest.raises(ValueError, match="reshape: shape .-1, -1. has a negative dimension .only one -1"):
        lc.reshape(x, (-1, -1))
    with pytest.raises(ValueError, match=r"reshape: cannot reshape \(4, 4\)"):
        lc.reshape(x, (3, -1))
    with pytest.raises(ValueError, match=r"broadcast_to: shape \(2, -1, 4\) has a negative dimension"):
        lc.broadcast_to(x, (2, -1, 4))


def test_bool_casts_and_inputs_are_supported_and_other_dtypes_refused_by_name_not_keyerror():
    # (bool became a runtime dtype with the logic family: tests/test_logic_ops.py covers its values)
    g = lc.Graph("b")
    x = g.input("x", (3,))
    assert lc.cast(x, "bool").dtype == "bool"
    assert g.input("flags", (3,), dtype=bool).dtype == "bool"
    with pytest.raises(TypeError, match="unsupported dtype"):
        lc.cast(x, "complex64")
    with pytest.raises(TypeError, match="unsupported dtype 'float16'"):
        g.input("h", (3,), dtype="float16")


# ---- item 7 (optimizer part) ------------------------------------------------------------------------

@pytest.mark.parametrize("opt,field,bad,exc", [
    (lc.SGD, "lr", float("nan"), ValueError), (lc.SGD, "lr", float("inf"), ValueError),
    (lc.SGD, "lr", 0.0, ValueError), (lc.SGD, "lr", "0.1", TypeError), (lc.SGD, "lr", 0.1j, TypeError),
    (lc.SGD, "lr", True, TypeError), (lc.SGD, "momentum", -0.1, ValueError),
    (lc.SGD, "momentum", float("nan"), ValueError), (lc.SGD, "weight_decay", float("-inf"), ValueError),
    (lc.Adam, "lr", float("nan"), ValueError), (lc.Adam, "eps", 0.0, ValueError),
    (lc.Adam, "eps", float("inf"), ValueError), (lc.Adam, "betas", (0.9, float("nan")), ValueError),
    (lc.Adam, "betas", (1.0, 0.999), ValueError), (lc.Adam, "betas", (0.9,), TypeError),
    (lc.Adam, "betas", "ab", TypeError), (lc.Adam, "weight_decay", float("nan"), ValueError),
])
def test_optimizer_hyper_parameters_are_validated_at_construction_and_assignment(opt, field, bad, exc):
    with pytest.raises(exc, match=f"{opt.__name__}: {field}"):
        opt(**{field: bad})
    o = opt()
    before = getattr(o, field)
    with pytest.raises(exc, match=f"{opt.__name__}: {field}"):
        setattr(o, field, bad)
    assert getattr(o, field) == before


def test_valid_hyper_parameters_set_after_construction_reach_the_plan():
    g = lc.Graph("o")
    w = g.param("w", np.array([1.0, 2.0], np.float32))
    loss = lc.sum(w * w)
    opt = lc.SGD(0.1)
    opt.lr = np.float32(0.25)
    prog = lc.compile(g, loss=loss, optimizer=opt)
    prog.step({})
    np.testing.assert_allclose(prog.params["w"], [0.5, 1.0])  # w - 0.25 * 2w


# ---- item 24: double softmax --------------------------------------------------------------------------

def _xent_graph():
    g = lc.Graph("x")
    x = g.input("x", (4, 3))
    y = g.input("y", (4,), dtype="int64")
    return g, x, y


@pytest.mark.parametrize("through", ["direct", "identity", "reshape"])
def test_softmax_cross_entropy_on_a_softmax_output_warns(through):
    g, x, y = _xent_graph()
    p = lc.softmax(x)
    if through == "identity":
        p = lc.identity(p)
    elif through == "reshape":
        p = lc.reshape(lc.reshape(p, (12,)), (4, 3))
    with pytest.warns(DoubleSoftmaxWarning, match="pre-softmax tensor 'x'"):
        lc.softmax_cross_entropy(p, y)
    assert issubclass(lc.DoubleSoftmaxWarning, UserWarning)


def test_softmax_cross_entropy_on_logits_does_not_warn():
    g, x, y = _xent_graph()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lc.softmax_cross_entropy(lc.relu(x), y)
        lc.softmax_cross_entropy(lc.transpose(lc.softmax(lc.transpose(x), axis=1)), y)  # not over the classes
    assert softmax_source(lc.softmax(x, axis=0)) is None


def test_finetune_takes_the_loss_under_a_softmax_seen_through_flatten(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from libml_compile.cli import finetune_arrays
    from libml_compile.demo import classifier_path, load_digits
    src = onnx.load(classifier_path())
    src.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    src.graph.node.append(helper.make_node("Flatten", ["probs"], ["flat_probs"], name="flat_probs", axis=1))
    src.graph.output[0].name = "flat_probs"
    Xtr, ytr, _, _ = load_digits()
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DoubleSoftmaxWarning)
        prog, hist = finetune_arrays(src, Xtr[:64], ytr[:64], epochs=1, lr=0.05, batch_size=16,
                                     progress=False, log=logs.append)
    assert any("pre-softmax tensor 'logits'" in m for m in logs), logs
    assert hist and np.isfinite(hist[-1]["loss"])


# ---- item 28: messages naming the input/op -----------------------------------------------------------

def test_cross_graph_operands_are_refused_naming_both_graphs():
    g1, x, _ = _xent_graph()
    g2 = lc.Graph("other")
    y2 = g2.input("labels", (4,), dtype="int64")
    with pytest.raises(ValueError, match="softmax_cross_entropy: operands belong to different graphs .*'other'"):
        lc.softmax_cross_entropy(x, y2)
    with pytest.raises(ValueError, match="different graphs"):
        lc.matmul(x, g2.input("w", (3, 3)))


def test_zero_size_batch_for_cross_entropy_is_refused_naming_the_logits():
    g = lc.Graph("z")
    x = g.input("x", (0, 3))
    y = g.input("y", (0,), dtype="int64")
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: logits 'x' have shape \(0, 3\)"):
        lc.softmax_cross_entropy(x, y)


def test_huge_shapes_are_refused_at_declaration_with_the_byte_count():
    g = lc.Graph("h")
    with pytest.raises(ValueError, match=rf"input 'x': shape .* has {2 ** 41} elements \({2 ** 43} bytes\)"):
        g.input("x", (2 ** 21, 2 ** 20))
    x = g.input("x", (2 ** 20, 1))
    with pytest.raises(ValueError, match=rf"broadcast_to .*{2 ** 40} elements \({2 ** 42} bytes\)"):
        lc.broadcast_to(x, (2 ** 20, 2 ** 20))


def test_auto_generated_names_never_collide_with_user_names():
    g = lc.Graph("n")
    x = g.input("x", (2,))
    a = x + 1.0                       # auto-named, e.g. add_123
    taken = a.name
    b = lc.mul(x, 2.0, name=taken)    # the user's name wins; the auto-named tensor is renamed
    assert b.name == taken and a.name != taken
    # the other way round: user names that look like the next auto names
    nxt = b.id + 1
    users = [g.input(f"{op}_{k}", (2,)) for op in ("const", "add") for k in range(nxt, nxt + 8)]
    c = x + users[-1]
    assert c.name not in {u.name for u in users}
    g.output("a", a)
    g.output("b", b)
    g.output("c", c)
    X = np.array([1.0, 2.0], np.float32)
    feeds = {"x": X, **{u.name: X for u in users}}
    out = lc.compile(g).run(feeds)
    np.testing.assert_array_equal(out["a"], X + 1)
    np.testing.assert_array_equal(out["b"], X * 2)
    np.testing.assert_array_equal(out["c"], X + X)


@pytest.mark.parametrize("bad", [2.5, True, "4", (2.5, 64), None])
def test_import_onnx_shapes_values_are_checked_naming_the_key(bad):
    pytest.importorskip("onnx")
    from libml_compile.demo import classifier_path
    from libml_compile.onnx_import import ONNXImportError
    key = "batch" if not isinstance(bad, tuple) else "input"
    with pytest.raises(ONNXImportError, match=f"shapes={{'{key}'"):
        lc.import_onnx(classifier_path(), shapes={key: bad})
    assert lc.import_onnx(classifier_path(), shapes={"batch": np.int64(3)}).inputs["input"].shape == (3, 64)
