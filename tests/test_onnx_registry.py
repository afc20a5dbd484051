"""The ONNX mapping derives from the operator registry ("one operator, one place").

* every registry op declaring ``OpDef.onnx`` is importable, and SUPPORTED_OPS / ``info`` / the backend's
  conformance discovery are exactly the registry's ONNX types plus the hand-written HANDLERS;
* ``OpDef.params`` defaults equal the defaults of the ONNX schema (float32 attribute values);
* constant folding goes through ``OpDef.ref`` (no second NumPy copy of op semantics in onnx_import);
* the generic path's ONNX-specific rules: Clip's attribute (opset < 11) and input (>= 11) forms, Gelu's
  approximate selecting gelu / gelu_tanh, variadic Max/Min/Sum/Mean, Pow's mixed dtypes, PRelu's
  unidirectional slope, Selu's defaults; each checked against onnxruntime.
"""
import dataclasses
import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import libml_compile as lc  # noqa: E402
from libml_compile import onnx_import  # noqa: E402
from libml_compile.onnx_import import ONNXImportError, import_onnx  # noqa: E402
from libml_compile.ops import REGISTRY  # noqa: E402


def _model(nodes, inputs, outputs, opset=20, inits=()):
    """A float model; the outputs' types come from ONNX shape inference."""
    m = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_empty_tensor_value_info(n) for n in outputs], initializer=list(inits)),
        opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _run_both(m, feeds):
    """(libml outputs, onnxruntime outputs) of model ``m``."""
    g = import_onnx(m, shapes={k: v.shape for k, v in feeds.items()})
    got = lc.compile(g).run(feeds)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in m.graph.output]
    return [got[n] for n in names], sess.run(names, feeds), g


def test_supported_ops_are_the_registry_plus_handlers():
    declared = {d.onnx[0] for d in REGISTRY.values() if d.onnx}
    assert set(onnx_import.SUPPORTED_OPS) == declared | set(onnx_import.HANDLERS)
    assert not declared & set(onnx_import.HANDLERS)
    for op in ("Selu", "Neg", "Exp", "Log", "Tanh", "Gelu", "Clip", "PRelu", "Max", "Min", "Sum", "Mean", "Pow",
               "Add", "Relu", "Sigmoid", "Identity"):
        assert op in onnx_import.SUPPORTED_OPS, op
    for op in onnx_import.SUPPORTED_OPS:  # every name is a real ONNX operator
        onnx.defs.get_schema(op)
    emits = onnx_import.onnx_to_libml()
    assert emits["Gelu"] == ("gelu", "gelu_tanh") and emits["Selu"] == ("selu",) and emits["Shape"] is None
    # the backend discovers conformance cases from the same list
    from libml_compile import onnx_backend as backend
    runnable, _ = backend.discover_conformance_cases()
    for op in ("Selu", "Mish", "Clip", "PRelu", "Mean", "Pow"):
        assert any(any(n.op_type == op for n in c[1].graph.node) for c in runnable), op


def test_info_lists_registry_ops_as_supported(tmp_path):
    from libml_compile.cli import model_info
    m = _model([helper.make_node("Selu", ["x"], ["a"]), helper.make_node("Mish", ["a"], ["b"]),
                helper.make_node("Floor", ["b"], ["y"]), helper.make_node("Hardmax", ["y"], ["z"])],
               [("x", [2, 3])], ["z"])
    info = model_info(m)
    assert info["unsupported_ops"] == ["Hardmax"]
    assert "Selu" not in info["ops_without_gradient"] and "Floor" not in info["ops_without_gradient"]


def test_param_defaults_equal_onnx_schema_defaults():
    checked = 0
    for d in REGISTRY.values():
        if not d.onnx:
            continue
        schema = onnx.defs.get_schema(d.onnx[0])
        defaults = dict(d.params)
        for attr, param in d.onnx[1].items():
            assert param in defaults, (d.name, attr)
            if attr in schema.attributes:  # Clip's min/max are inputs at the current opset
                dv = helper.get_attribute_value(schema.attributes[attr].default_value)
                assert np.float32(defaults[param]) == np.float32(dv), (d.name, attr, defaults[param], dv)
                checked += 1
        for attr, value in (d.onnx[2] if len(d.onnx) > 2 else {}).items():
            assert attr in schema.attributes, (d.name, attr)
    assert checked >= 8  # Elu, Celu, LeakyRelu, ThresholdedRelu, HardSigmoid x2, Selu x2
    # Clip's optional min/max inputs: absent means numeric_limits lowest()/max() (Clip-11 and later), which
    # depend on the dtype: the importer's absent_Clip, not the params (lc.clip's defaults are -inf/+inf)
    assert "numeric_limits::lowest() and numeric_limits::max()" in onnx.defs.get_schema("Clip").doc
    assert REGISTRY["clip"].params == (("min", -math.inf), ("max", math.inf))
    # the Gelu default (approximate="none") selects the exact form
    assert helper.get_attribute_value(onnx.defs.get_schema("Gelu").attributes["approximate"].default_value) \
        == b"none" and REGISTRY["gelu"].onnx[2] == {"approximate": "none"}


def test_no_second_numpy_copy_of_op_semantics():
    src = open(onnx_import.__file__).read()
    for name in ("_int_div", "_np_softmax", "np.exp(", "np.maximum(", "np.take(", "np.concatenate(", "lambda a, b"):
        assert name not in src, name


def test_constant_folding_goes_through_the_registry_reference(monkeypatch):
    # Elu of a Constant folds at import; a marked reference proves which function computed it
    c = numpy_helper.from_array(np.float32([-1.0, 0.5, 2.0]), name="c")
    m = _model([helper.make_node("Constant", [], ["k"], value=c), helper.make_node("Elu", ["k"], ["e"], alpha=0.5),
                helper.make_node("Add", ["x", "e"], ["y"])], [("x", [3])], ["y"])
    x = np.float32([1, 2, 3])
    got, want, g = _run_both(m, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert not any(t.op == "elu" for t in g.nodes)
    calls = []
    orig = REGISTRY["elu"]

    def ref(at, *xs):
        calls.append(xs)
        return orig.ref(at, *xs)
    monkeypatch.setitem(REGISTRY, "elu", dataclasses.replace(orig, ref=ref))
    g2 = import_onnx(m, shapes={"x": (3,)})
    assert len(calls) == 1 and calls[0][1] == np.float32(0.5)
    np.testing.assert_allclose(lc.compile(g2).run({"x": x})["y"], want[0], rtol=1e-6)


def test_integer_division_folds_through_the_registry():
    a = numpy_helper.from_array(np.int64([-7, 7, -8]), name="a")
    b = numpy_helper.from_array(np.int64([2, -2, 3]), name="b")
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "qf"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], initializer=[a, b]),
        opset_imports=[helper.make_opsetid("", 17)])
    g = import_onnx(m)
    np.testing.assert_array_equal(lc.compile(g).run({"x": np.zeros(3, np.float32)})["y"], [-3, -3, -2])


@pytest.mark.parametrize("opset", [10, 11, 13])
def test_clip_attribute_and_input_forms(opset):
    x = np.float32([[-3, -0.5, 0.25], [1.5, 4, np.inf]])
    if opset < 11:
        nodes = [helper.make_node("Clip", ["x"], ["y"], min=-1.0, max=2.0),
                 helper.make_node("Clip", ["x"], ["z"], max=0.5),   # min absent: ONNX-6's default
                 helper.make_node("Clip", ["x"], ["w"])]
        inits = []
    else:
        lo = numpy_helper.from_array(np.float32(-1.0), name="lo")
        hi = numpy_helper.from_array(np.float32(2.0), name="hi")
        nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"]),
                 helper.make_node("Clip", ["x", "", "hi"], ["z"]),  # min absent: -inf
                 helper.make_node("Clip", ["x"], ["w"])]
        inits = [lo, hi]
    m = _model(nodes, [("x", [2, 3])], ["y", "z", "w"], opset=opset, inits=inits)
    got, want, _ = _run_both(m, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # absent bounds are -/+FLT_MAX: Clip-6's attribute defaults, Clip-11's numeric_limits (+inf -> FLT_MAX)
    np.testing.assert_array_equal(got[2], np.minimum(x, np.finfo(np.float32).max))


def test_clip_min_as_a_graph_input():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Clip", ["x", "lo"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("lo", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]), opset_imports=[helper.make_opsetid("", 13)])
    x = np.float32([-2, -1, 0, 1])
    got, want, _ = _run_both(m, {"x": x, "lo": np.array(-0.5, np.float32)})
    np.testing.assert_array_equal(got[0], want[0])


def test_variadic_max_min_sum_mean_broadcast():
    shapes = [("a", [2, 1, 3]), ("b", [4, 1]), ("c", [3])]
    nodes = [helper.make_node(op, ["a", "b", "c"], [op.lower()]) for op in ("Max", "Min", "Sum", "Mean")]
    nodes += [helper.make_node(op, ["a"], [op.lower() + "1"]) for op in ("Max", "Min", "Sum", "Mean")]
    outs = [op.lower() + s for op in ("Max", "Min", "Sum", "Mean") for s in ("", "1")]
    m = _model(nodes, shapes, outs, opset=13)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes}
    got, want, _ = _run_both(m, feeds)
    for o, a, b in zip(outs, got, want):
        assert a.shape == b.shape, o
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=o)


def test_variadic_gradients_reach_every_operand():
    m = _model([helper.make_node("Max", ["x", "w1", "w2"], ["y"])], [("x", [3])], ["y"], opset=13,
               inits=[numpy_helper.from_array(np.float32([0.5, -2, 1]), name="w1"),
                      numpy_helper.from_array(np.float32([0.0, 3, -1]), name="w2")])
    g = import_onnx(m)
    loss = lc.sum(g.tensor("y"))
    grads = lc.compile(g, loss=loss).grad({"x": np.float32([1, 0, 2])})
    np.testing.assert_array_equal(grads["w1"], [0, 0, 0])
    np.testing.assert_array_equal(grads["w2"], [0, 1, 0])


def test_gelu_approximate_selects_the_registry_op():
    x = np.linspace(-4, 4, 17).astype(np.float32)
    m = _model([helper.make_node("Gelu", ["x"], ["e"]), helper.make_node("Gelu", ["x"], ["t"], approximate="tanh")],
               [("x", [17])], ["e", "t"])
    got, want, g = _run_both(m, {"x": x})
    assert g.tensor("e").op == "gelu" and g.tensor("t").op == "gelu_tanh"
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    bad = _model([helper.make_node("Gelu", ["x"], ["y"], approximate="sigmoid")], [("x", [3])], ["y"])
    with pytest.raises(ONNXImportError):
        import_onnx(bad)


def test_selu_defaults_and_attributes():
    x = np.linspace(-3, 3, 13).astype(np.float32)
    m = _model([helper.make_node("Selu", ["x"], ["d"]), helper.make_node("Selu", ["x"], ["a"], alpha=2.0, gamma=3.0)],
               [("x", [13])], ["d", "a"], opset=13)
    got, want, _ = _run_both(m, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the gradient gamma * elu'(x, alpha), against finite differences in float64
    g = lc.Graph("s")
    xi = g.param("x", np.linspace(-2, 2, 9))
    loss = lc.sum(lc.selu(xi, 1.5, 2.0))
    grad = lc.compile(g, loss=loss).grad({})["x"]
    xs = np.linspace(-2, 2, 9)
    want = np.where(xs > 0, 2.0, 2.0 * 1.5 * np.exp(xs))
    np.testing.assert_allclose(grad, want, rtol=1e-12)


def test_pow_mixed_dtypes_and_prelu_slope():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Pow", ["x", "e"], ["p"]), helper.make_node("PRelu", ["x", "s"], ["r"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("e", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.float32([0.1, 0.2, 0.3]), name="s")]),
        opset_imports=[helper.make_opsetid("", 16)])
    x = np.float32([[1.5, -2, 3], [0.5, 2, -1]])
    e = np.int64([2, 3, -1])
    got, want, g = _run_both(m, {"x": x, "e": e})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert "s" in g.params  # PRelu's slope initializer is trainable
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("PRelu", ["x", "s"], ["r"], name="pr")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [3])]), opset_imports=[helper.make_opsetid("", 16)])
    with pytest.raises(ONNXImportError, match="pr.*slope"):
        import_onnx(bad)


def test_integer_max_imports_and_an_integer_float_only_op_names_the_node():
    # Max/Min on integers run in the integer kernel (lc.maximum / lc.minimum with int_ok)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Max", ["a", "b"], ["y"], name="mx")], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT32, [3]),
         helper.make_tensor_value_info("b", TensorProto.INT32, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [3])]), opset_imports=[helper.make_opsetid("", 13)])
    a, b = np.int32([-(2 ** 31), 5, 7]), np.int32([3, 2 ** 31 - 1, 7])
    np.testing.assert_array_equal(lc.compile(import_onnx(m)).run({"a": a, "b": b})["y"], np.maximum(a, b))
    assert onnx_import.integer_capable("Max") and onnx_import.integer_capable("Add")
    # integer Pow: exact and wrapping as NumPy for exponents >= 0; a negative exponent truncates 1 / x^k
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Pow", ["a", "b"], ["y"], name="pw")], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT32, [6]),
         helper.make_tensor_value_info("b", TensorProto.INT32, [6])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [6])]), opset_imports=[helper.make_opsetid("", 13)])
    prog = lc.compile(import_onnx(m))
    a, b = np.int32([3, -2, 7, 1, -1, 2]), np.int32([4, 3, 20, -5, -3, -1])
    want = np.where(b >= 0, np.power(a, np.maximum(b, 0)), np.where(a == 1, 1, np.where(a == -1, (-1) ** (-b % 2), 0)))
    np.testing.assert_array_equal(prog.run({"a": a, "b": b})["y"], want.astype(np.int32))
    assert onnx_import.integer_capable("Pow")
    # a floating-point-only op on integers is refused naming the node and the op
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Abs", ["a"], ["y"], name="ab")], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT32, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [3])]), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ONNXImportError, match="'ab'.*abs"):
        import_onnx(m)
    assert not onnx_import.integer_capable("Abs")


def test_conformance_command_prints_the_count(capsys):
    from libml_compile import conformance
    rc = conformance.main([])
    out = capsys.readouterr().out.splitlines()
    import re
    mt = re.match(r"(\d+) of (\d+) official ONNX node cases pass \((\d+) skipped: .*; (\d+) fail\)", out[0])
    assert mt, out[0]
    passed, total, skipped, failed = map(int, mt.groups())
    assert passed + skipped + failed == total and total > 1000 and passed >= 220
    assert rc == (1 if failed else 0)
