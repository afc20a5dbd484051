"""ONNX import/export: forward outputs vs ONNX Runtime, gradients vs finite differences, the fine-tuning
round trip (import -> train -> export -> ONNX Runtime), and clear errors for bad input."""
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import libml_compile as lc  # noqa: E402
from libml_compile.onnx_import import ONNXImportError, UnsupportedOperatorError, import_onnx  # noqa: E402
from libml_compile.onnx_export import export_onnx  # noqa: E402

F32 = TensorProto.FLOAT


def _ort():
    return pytest.importorskip("onnxruntime")


def ort_run(model_or_path, feeds):
    ort = _ort()
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _finish(nodes, inputs, outputs, inits, opset=17, ir=8, name="test"):
    m = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", opset)], producer_name="libml-tests")
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m


def build_all_ops_mlp(dtype=np.float32, seed=0, with_casts=True):
    """An MLP using every supported op, with broadcasting: input x (batch, 12) -> logits/probs (batch, 10)."""
    rng = np.random.default_rng(seed)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    P = lambda name, *shape, s=0.4: numpy_helper.from_array((rng.standard_normal(shape) * s).astype(dtype), name)  # noqa: E731
    inits = [
        P("W1", 12, 16), P("b1", 16), P("scale", 1, 16),
        numpy_helper.from_array((rng.uniform(1.0, 2.0, 16)).astype(dtype), "divisor"),
        P("W2", 10, 16), P("b2", 10), P("Wg", 16, 16),
        numpy_helper.from_array(np.array([3, 4], np.int64), "tail_shape"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        # Shape -> Gather -> Unsqueeze -> Concat folds to the constant (batch, 3, 4)
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Constant", [], ["g_idx"], name="const_idx",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["x_shape", "g_idx"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch1"], name="unsq_b"),
        helper.make_node("Concat", ["batch1", "tail_shape"], ["shape3"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "shape3"], ["x3"], name="reshape"),
        helper.make_node("Transpose", ["x3"], ["x3t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("Flatten", ["x3t"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "W1"], ["mm1"], name="mm1"),
        helper.make_node("Add", ["mm1", "b1"], ["a1"], name="add_b1"),               # (B,16) + (16,)
        helper.make_node("Relu", ["a1"], ["h1"], name="relu"),
        helper.make_node("Mul", ["h1", "scale"], ["h2"], name="mul_scale"),          # (B,16) * (1,16)
        helper.make_node("Constant", [], ["shift"], name="const_shift",
                         value=numpy_helper.from_array(np.array(0.25, dtype))),
        helper.make_node("Sub", ["h2", "shift"], ["h3"], name="sub_shift"),          # (B,16) - ()
        helper.make_node("Div", ["h3", "divisor"], ["h4"], name="div"),              # (B,16) / (16,)
        helper.make_node("MatMul", ["h4", "Wg"], ["gpre"], name="mm_gate"),
        helper.make_node("Sigmoid", ["gpre"], ["gate"], name="sigmoid"),
        helper.make_node("Mul", ["h4", "gate"], ["h5"], name="gated"),
        helper.make_node("Gemm", ["h5", "W2", "b2"], ["g2"], name="gemm", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Unsqueeze", ["g2", "axis1"], ["g3"], name="unsq"),
        helper.make_node("Squeeze", ["g3", "axis1"], ["g4"], name="sq"),
    ]
    last = "g4"
    if with_casts:
        other = TensorProto.DOUBLE if dtype == np.float32 else TensorProto.FLOAT
        nodes += [helper.make_node("Cast", ["g4"], ["g5"], name="cast_up", to=other),
                  helper.make_node("Cast", ["g5"], ["g6"], name="cast_back", to=et)]
        last = "g6"
    nodes += [helper.make_node("Identity", [last], ["logits"], name="identity"),
              helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    return _finish(nodes, [helper.make_tensor_value_info("x", et, ["batch", 12])],
                   [helper.make_tensor_value_info("logits", et, ["batch", 10]),
                    helper.make_tensor_value_info("probs", et, ["batch", 10])], inits, name="all_ops_mlp")


def build_gemm_classifier(opset=17, seed=1, softmax_end=False, inits_as_inputs=False):
    """Gemm+Relu 20-32-5 classifier like a PyTorch export; optionally ending in Softmax (probabilities)."""
    rng = np.random.default_rng(seed)
    ws = {"fc1.weight": (rng.standard_normal((32, 20)) * 0.3).astype(np.float32),
          "fc1.bias": (rng.standard_normal(32) * 0.1).astype(np.float32),
          "fc2.weight": (rng.standard_normal((5, 32)) * 0.3).astype(np.float32),
          "fc2.bias": (rng.standard_normal(5) * 0.1).astype(np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in ws.items()]
    out = "probabilities" if softmax_end else "logits"
    nodes = [helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu"),
             helper.make_node("Gemm", ["hr", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1)]
    if softmax_end:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    inputs = [helper.make_tensor_value_info("input", F32, ["N", 20])]
    if inits_as_inputs:  # the pre-IR-4 convention: every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(k, F32, list(v.shape)) for k, v in ws.items()]
    return _finish(nodes, inputs, [helper.make_tensor_value_info(out, F32, ["N", 5])], inits, opset=opset,
                   ir=8 if opset >= 13 else 6, name="gemm_classifier")


# ------------------------------------------------------------------------------------------------------
# forward vs ONNX Runtime

def test_all_ops_mlp_matches_onnxruntime():
    m = build_all_ops_mlp()
    g = import_onnx(m, shapes={"x": (7, 12)})
    assert set(g.outputs) == {"logits", "probs"}
    assert set(g.params) == {"W1", "b1", "scale", "divisor", "W2", "b2", "Wg"}
    for name in ("h4", "gate", "g2", "flat"):
        assert g.tensor(name) is not None  # ONNX names are kept
    prog = lc.compile(g)
    x = np.random.default_rng(5).standard_normal((7, 12)).astype(np.float32)
    got = prog.run({"x": x})
    ref = ort_run(m, {"x": x})
    for k in ("logits", "probs"):
        assert got[k].dtype == np.float32 and got[k].shape == (7, 10)
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("softmax_end", [False, True])
def test_gemm_classifier_matches_onnxruntime(opset, softmax_end):
    m = build_gemm_classifier(opset=opset, softmax_end=softmax_end)
    g = import_onnx(m, shapes={"input": (9, 20)})
    prog = lc.compile(g)
    x = np.random.default_rng(2).standard_normal((9, 20)).astype(np.float32)
    got = prog.run({"input": x})
    ref = ort_run(m, {"input": x})
    (name,) = ref
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)


def test_bundled_classifier_matches_onnxruntime():
    from libml_compile.demo import classifier_path
    path = classifier_path()
    g = import_onnx(path, shapes={"batch": 5})
    assert g.inputs["input"].shape == (5, 64)
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    got = lc.compile(g).run({"input": x})["logits"]
    np.testing.assert_allclose(got, ort_run(path, {"input": x})["logits"], rtol=1e-5, atol=1e-6)


def test_softmax_opset_semantics():
    """opset < 13 Softmax flattens to 2-D from `axis`; opset >= 13 normalises along one axis."""
    x = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    for opset in (11, 13):
        m = _finish([helper.make_node("Softmax", ["x"], ["y"], axis=1)],
                    [helper.make_tensor_value_info("x", F32, [2, 3, 4])],
                    [helper.make_tensor_value_info("y", F32, [2, 3, 4])], [], opset=opset, ir=7)
        got = lc.compile(import_onnx(m)).run({"x": x})["y"]
        np.testing.assert_allclose(got, ort_run(m, {"x": x})["y"], rtol=1e-5, atol=1e-6)
        if opset == 11:
            np.testing.assert_allclose(got.reshape(2, 12).sum(1), 1, rtol=1e-5)
        else:
            np.testing.assert_allclose(got.sum(1), 1, rtol=1e-5)


def test_initializers_listed_as_inputs_are_params():
    m = build_gemm_classifier(opset=11, inits_as_inputs=True)
    g = import_onnx(m, shapes={"input": (4, 20)})
    assert list(g.inputs) == ["input"]
    assert set(g.params) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    x = np.ones((4, 20), np.float32)
    np.testing.assert_allclose(lc.compile(g).run({"input": x})["logits"],
                               ort_run(m, {"input": x})["logits"], rtol=1e-5, atol=1e-6)


def test_integer_initializers_are_constants():
    g = import_onnx(build_all_ops_mlp(), shapes={"x": (3, 12)})
    assert "tail_shape" not in g.params and "axis0" not in g.params


# ------------------------------------------------------------------------------------------------------
# training: gradients, fine-tuning a subset, export round trip

def test_gradients_match_finite_differences_float64():
    m = build_all_ops_mlp(dtype=np.float64, with_casts=False)
    B = 4
    g = import_onnx(m, shapes={"x": (B, 12)})
    labels = g.input("labels", (B,), dtype="int64")
    loss = lc.softmax_cross_entropy(g.tensor("logits"), labels)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((B, 12)), "labels": rng.integers(0, 10, B).astype(np.int64)}
    grads = prog.grad(feeds)
    assert set(grads) == set(g.params)
    base = prog.params
    eps = 1e-6

    def loss_at(params):
        prog.set_params(params)
        return float(prog.run(feeds)["loss"])

    for name in ("W1", "scale", "divisor", "Wg", "W2", "b2"):
        p = base[name]
        fd = np.zeros_like(p)
        for idx in list(np.ndindex(p.shape))[:12]:
            plus, minus = dict(base), dict(base)
            plus[name] = p.copy(); plus[name][idx] += eps      # noqa: E702
            minus[name] = p.copy(); minus[name][idx] -= eps    # noqa: E702
            fd[idx] = (loss_at(plus) - loss_at(minus)) / (2 * eps)
            assert grads[name][idx] == pytest.approx(fd[idx], rel=1e-5, abs=1e-8), (name, idx)
    prog.set_params(base)


def _classifier_training_setup(tmp_path, B=16, trainable=None, softmax_end=False):
    m = build_gemm_classifier(softmax_end=softmax_end)
    path = str(tmp_path / "clf.onnx")
    onnx.save_model(m, path)
    g = import_onnx(path, shapes={"input": (B, 20)})
    labels = g.input("labels", (B,), dtype="int64")
    loss = lc.softmax_cross_entropy(g.tensor("logits"), labels)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9), trainable=trainable)
    rng = np.random.default_rng(11)
    X = rng.standard_normal((B, 20)).astype(np.float32)
    y = rng.integers(0, 5, B).astype(np.int64)
    return m, path, g, prog, X, y


@pytest.mark.parametrize("softmax_end", [False, True])
def test_round_trip_train_export_onnxruntime(tmp_path, softmax_end):
    m, path, g, prog, X, y = _classifier_training_setup(tmp_path, softmax_end=softmax_end)
    before = prog.params
    losses = [prog.step({"input": X, "labels": y}) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = prog.params
    assert any(not np.array_equal(before[k], after[k]) for k in after)
    out = str(tmp_path / "out" / "tuned.onnx")
    assert export_onnx(prog, out) == out
    exported = onnx.load(out)
    onnx.checker.check_model(exported)
    # same names, opset, IR, inputs/outputs; initializers equal prog.params
    assert [o.version for o in exported.opset_import] == [o.version for o in m.opset_import]
    assert exported.ir_version == m.ir_version
    assert [i.name for i in exported.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in m.graph.output]
    assert [n.op_type for n in exported.graph.node] == [n.op_type for n in m.graph.node]
    inits = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    assert set(inits) == set(after)
    for k, v in after.items():
        np.testing.assert_array_equal(inits[k], v)
    # ONNX Runtime on the exported file matches prog.run
    outname = m.graph.output[0].name
    feeds = {"input": X, "labels": y}
    ours = prog.run(feeds)[outname] if outname in prog.graph.outputs else None
    ref = ort_run(out, {"input": X})[outname]
    fwd = lc.compile(import_onnx(out, shapes={"input": X.shape})).run({"input": X})[outname]
    np.testing.assert_allclose(fwd, ref, rtol=1e-5, atol=1e-6)
    if ours is not None:
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert not [f for f in os.listdir(tmp_path / "out") if f != "tuned.onnx"]  # no temp files left


def test_finetune_last_layer_only(tmp_path):
    m, path, g, prog, X, y = _classifier_training_setup(tmp_path, trainable=["fc2.weight", "fc2.bias"])
    before = prog.params
    for _ in range(3):
        prog.step({"input": X, "labels": y})
    after = prog.params
    np.testing.assert_array_equal(before["fc1.weight"], after["fc1.weight"])
    np.testing.assert_array_equal(before["fc1.bias"], after["fc1.bias"])
    assert not np.array_equal(before["fc2.weight"], after["fc2.weight"])
    out = str(tmp_path / "last.onnx")
    export_onnx(prog, out)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(inits["fc1.weight"], before["fc1.weight"])
    np.testing.assert_array_equal(inits["fc2.weight"], after["fc2.weight"])


def test_export_keeps_metadata(tmp_path):
    m = build_gemm_classifier()
    m.doc_string = "a doc"
    helper.set_model_props(m, {"author": "tests"})
    g = import_onnx(m, shapes={"input": (2, 20)})
    prog = lc.compile(g)
    out = str(tmp_path / "meta.onnx")
    export_onnx(prog, out)
    e = onnx.load(out)
    assert e.doc_string == "a doc"
    assert {p.key: p.value for p in e.metadata_props} == {"author": "tests"}
    assert e.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # symbolic batch kept


def test_export_requires_imported_graph(tmp_path):
    g = lc.Graph("plain")
    x = g.input("x", (2, 3))
    w = g.param("w", np.ones((3, 2), np.float32))
    g.output("y", x @ w)
    with pytest.raises(ValueError, match="import"):
        export_onnx(lc.compile(g), str(tmp_path / "x.onnx"))


# ------------------------------------------------------------------------------------------------------
# bad input

def _single_op_model(op, inputs, attrs=None, name="bad_node", opset=17):
    return helper.make_model(helper.make_graph(
        [helper.make_node(op, [i[0] for i in inputs], ["y"], name=name, **(attrs or {}))], "g",
        [helper.make_tensor_value_info(n, F32, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", F32, [])]), opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op,inputs,attrs", [
    ("LpPool", [("x", [1, 1, 5, 5])], {"kernel_shape": [3, 3]}),
    ("LSTM", [("x", [2, 1, 3]), ("w", [1, 8, 3]), ("r", [1, 8, 2])], {"hidden_size": 2}),
])
def test_unsupported_operator(op, inputs, attrs, tmp_path):
    m = _single_op_model(op, inputs, attrs, name=f"my_{op.lower()}")
    with pytest.raises(UnsupportedOperatorError) as ei:
        import_onnx(m)
    msg = str(ei.value)
    assert op in msg and f"my_{op.lower()}" in msg and "opset 17" in msg and "Gemm" in msg
    assert ei.value.op_type == op and ei.value.node_name == f"my_{op.lower()}" and ei.value.opset == 17
    assert "Relu" in ei.value.supported
    assert issubclass(UnsupportedOperatorError, ValueError)
    assert lc.UnsupportedOperatorError is UnsupportedOperatorError
    path = str(tmp_path / "m.onnx")
    onnx.save_model(m, path)
    with pytest.raises(UnsupportedOperatorError, match=op):
        import_onnx(path)


def test_unsupported_operator_before_any_work(tmp_path):
    """The op check comes first: a model that would also fail the checker reports the op."""
    m = _single_op_model("LpPool", [("x", [1, 1, 5, 5])], {"kernel_shape": [3, 3]})
    m.graph.node[0].input.append("undefined_tensor")
    with pytest.raises(UnsupportedOperatorError, match="LpPool"):
        import_onnx(m)


def test_truncated_file(tmp_path):
    data = build_gemm_classifier().SerializeToString()
    path = str(tmp_path / "truncated.onnx")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ONNXImportError, match="truncated.onnx"):
        import_onnx(path)


def test_non_onnx_file(tmp_path):
    path = str(tmp_path / "notes.onnx")
    with open(path, "w") as f:
        f.write("this is not an ONNX model, just some text\n" * 10)
    with pytest.raises(ONNXImportError, match="notes.onnx"):
        import_onnx(path)
    npz = str(tmp_path / "data.npz")
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(ONNXImportError, match="data.npz"):
        import_onnx(npz)


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(ONNXImportError, match="nope.onnx"):
        import_onnx(str(tmp_path / "nope.onnx"))
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ONNXImportError, match="empty.onnx"):
        import_onnx(str(empty))


def test_shape_conflicts_name_the_input():
    m = build_gemm_classifier()
    with pytest.raises(ONNXImportError, match="'input'"):
        import_onnx(m, shapes={"input": (8, 32)})      # feature dim is 20 in the model
    with pytest.raises(ONNXImportError, match="'input'"):
        import_onnx(m, shapes={"input": (8, 20, 1)})   # rank
    with pytest.raises(ONNXImportError, match="'input'"):
        import_onnx(m)                                 # symbolic batch left unbound
    with pytest.raises(ONNXImportError, match="'nosuch'"):
        import_onnx(m, shapes={"nosuch": (1, 2)})
    g = import_onnx(m, shapes={"N": 3})                # binding a dim_param by name
    assert g.inputs["input"].shape == (3, 20)


def test_data_dependent_shape_names_the_node():
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="dyn_reshape")], "g",
        [helper.make_tensor_value_info("x", F32, [2, 6]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", F32, [3, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ONNXImportError, match="dyn_reshape"):
        import_onnx(m)


def test_unsupported_dtype_names_the_input():
    m = _single_op_model("Relu", [("x", [2, 3])])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ONNXImportError, match="'x'.*FLOAT16"):
        import_onnx(m)


def test_external_data_is_loaded(tmp_path):
    m = build_gemm_classifier()
    w = numpy_helper.to_array(m.graph.initializer[0])
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(build_gemm_classifier(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
                    size_threshold=0)
    assert os.path.exists(tmp_path / "ext.data")
    g = import_onnx(path, shapes={"input": (3, 20)})
    np.testing.assert_array_equal(g.params["fc1.weight"].value, w)
    x = np.ones((3, 20), np.float32)
    np.testing.assert_allclose(lc.compile(g).run({"input": x})["logits"], ort_run(m, {"input": x})["logits"],
                               rtol=1e-5, atol=1e-6)
    out = str(tmp_path / "ext_out.onnx")
    export_onnx(lc.compile(g), out)                   # exported self-contained
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(out).graph.initializer[0]), w)
