"""ONNX conformance: the official backend node test cases shipped with the ``onnx`` package.

Every case whose operators are all in ``libml_compile.onnx_import.SUPPORTED_OPS`` is discovered
automatically (so a newly supported op brings its cases with it) and run through
``libml_compile.onnx_backend`` (import_onnx -> lc.compile -> prog.run); outputs must match the expected ones
at the case's tolerances (the ONNX backend defaults: rtol 1e-3, atol 1e-7) with the same dtype and shape.

Exclusions are explicit, each with its reason (``backend.EXCLUDED_CASES`` and the element-type rule in
``backend.discover_conformance_cases``): cases whose tensors have element types libml has no dtype for
(float16, bfloat16, the float8/float4 family, 4- and 2-bit ints), and cases whose inputs are not tensors
(sequence/optional types).  ``pytest tests/test_onnx_conformance.py -s`` or
``python -m libml_compile.onnx_backend`` prints the counts.
"""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from libml_compile import onnx_backend as backend  # noqa: E402

RUNNABLE, EXCLUDED = backend.discover_conformance_cases()
_RESULTS = {}


@pytest.fixture(scope="module")
def results():
    """Run every runnable case once; {name: None (passed) or error string}."""
    if not _RESULTS:
        for case in RUNNABLE:
            try:
                backend.run_conformance_case(case)
                _RESULTS[case[0]] = None
            except Exception as e:  # noqa: BLE001 - reported per case below
                _RESULTS[case[0]] = f"{type(e).__name__}: {e}"
    return _RESULTS


@pytest.mark.parametrize("name", [c[0] for c in RUNNABLE])
def test_conformance_case(results, name):
    err = results[name]
    if err is not None:
        pytest.fail(err)


def test_conformance_summary(results, record_property, capsys):
    passed = sum(1 for v in results.values() if v is None)
    failed = {k: v for k, v in results.items() if v is not None}
    reasons = {}
    for k, r in EXCLUDED.items():
        reasons.setdefault(r, []).append(k)
    with capsys.disabled():
        print(f"\nONNX conformance (onnx {onnx.__version__}): {passed}/{len(RUNNABLE)} cases with supported "
              f"ops pass; {len(EXCLUDED)} excluded:")
        for r, names in reasons.items():
            print(f"  {len(names):4d} excluded: {r}")
    record_property("onnx_conformance_passed", passed)
    record_property("onnx_conformance_excluded", len(EXCLUDED))
    assert not failed, f"{len(failed)} conformance cases fail: {failed}"
    names = {c[0] for c in RUNNABLE}
    for must in ("test_add", "test_add_bcast", "test_div_int32_trunc", "test_div_uint8", "test_matmul_1d_1d",
                 "test_matmul_1d_3d", "test_gemm_all_attributes", "test_softmax_axis_0", "test_relu",
                 "test_sigmoid", "test_mul_uint64", "test_sub_int8", "test_reshape_negative_dim",
                 "test_flatten_axis0", "test_transpose_default", "test_unsqueeze_negative_axes"):
        assert must in names, f"{must} was not discovered"
    assert passed >= 130
    # every exclusion has a reason, and the per-case list stays minimal
    assert all(EXCLUDED.values()) and len(backend.EXCLUDED_CASES) <= 2


def test_backend_api():
    """The Backend class contract: supports_device, is_compatible, prepare on an unsupported op, run_node."""
    assert backend.LibmlBackend.supports_device("CPU")
    assert not backend.LibmlBackend.supports_device("CUDA")
    h = onnx.helper
    node = h.make_node("Add", ["a", "b"], ["c"])
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.float32([1, 2, 3])
    (c,) = backend.run_node(node, [a, b])
    np.testing.assert_array_equal(c, a + b)
    conv = h.make_model(h.make_graph(
        [h.make_node("LpPool", ["x"], ["y"], name="pool0", kernel_shape=[3, 3])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 2, 2])]),
        opset_imports=[h.make_opsetid("", 13)])
    assert not backend.LibmlBackend.is_compatible(conv)
    from libml_compile.onnx_import import UnsupportedOperatorError
    with pytest.raises(UnsupportedOperatorError, match="LpPool"):
        backend.prepare(conv)
    # run_model with a dict feed; a second shape compiles a second program
    relu = h.make_model(h.make_graph(
        [h.make_node("Relu", ["x"], ["y"])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])]), opset_imports=[h.make_opsetid("", 14)])
    rep = backend.prepare(relu)
    for n in (3, 5):
        x = np.linspace(-1, 1, n).astype(np.float32)
        np.testing.assert_array_equal(rep.run({"x": x})[0], np.maximum(x, 0))
