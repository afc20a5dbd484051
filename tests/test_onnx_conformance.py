"""ONNX conformance: the official backend node test cases shipped with the ``onnx`` package.

Every case whose operators are all in ``libml_compile.onnx_import.SUPPORTED_OPS`` is discovered
automatically (so a newly supported op brings its cases with it) and run through
``libml_compile.backend`` (import_onnx -> lc.compile -> prog.run); outputs must match the expected ones
at the case's tolerances (the ONNX backend defaults: rtol 1e-3, atol 1e-7) with the same dtype and shape.

Exclusions are explicit, each with its reason (see ``EXCLUDED`` and ``UNSUPPORTED_ELEM_TYPES``):
cases whose tensors have element types libml has no dtype for (float16, bfloat16, the float8/float4
family, 4- and 2-bit ints, strings), and cases whose inputs are not tensors (sequence/optional types).
Run ``pytest tests/test_onnx_conformance.py -s`` to see the counts.
"""
import glob
import os
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

from libml_compile import backend  # noqa: E402
from libml_compile.onnx_import import SUPPORTED_DTYPES, SUPPORTED_OPS  # noqa: E402

# Explicit per-case exclusions (keep minimal; each names the missing feature).
EXCLUDED = {
    "test_identity_sequence": "input is a sequence of tensors; libml graphs hold tensors only",
    "test_identity_opt": "input is an optional type; libml graphs hold tensors only",
}
UNSUPPORTED_ELEM_TYPES_REASON = (
    "uses an element type libml has no dtype for (libml: float32, float64, 8- to 64-bit ints); "
    "float16/bfloat16/float8/float4/int4/int2/string tensors are not supported by the runtime")


def _load_cases():
    """Cases as (name, model, [(inputs, outputs)], rtol, atol), from the generators (onnx >= 1.13-ish) or
    from the files under onnx/backend/test/data/node in older wheels."""
    out = []
    try:
        from onnx.backend.test.case.node import collect_testcases
    except ImportError:  # pragma: no cover - old wheels
        collect_testcases = None
    if collect_testcases is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = collect_testcases()
        for c in cases:
            if c.model is None or c.data_sets is None:
                continue
            out.append((c.name, c.model, c.data_sets, c.rtol, c.atol))
        if out:
            return out
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")  # pragma: no cover
    for d in sorted(glob.glob(os.path.join(root, "test_*"))):  # pragma: no cover
        model = onnx.load(os.path.join(d, "model.onnx"))
        sets = []
        for ds in sorted(glob.glob(os.path.join(d, "test_data_set_*"))):
            def read(prefix):
                arrs = []
                for f in sorted(glob.glob(os.path.join(ds, f"{prefix}_*.pb")),
                                key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0])):
                    t = onnx.TensorProto()
                    with open(f, "rb") as fh:
                        t.ParseFromString(fh.read())
                    arrs.append(t)
                return arrs
            sets.append((read("input"), read("output")))
        out.append((os.path.basename(d), model, sets, 1e-3, 1e-7))
    return out


def _elem_types(model):
    types = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types.append(vi.type.tensor_type.elem_type)
    for t in model.graph.initializer:
        types.append(t.data_type)
    for n in model.graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                types.append(a.i)
            if a.name == "value" and a.HasField("t"):
                types.append(a.t.data_type)
    return types


def _supported_elem(et):
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)).name in SUPPORTED_DTYPES
    except Exception:
        return False


ALL_CASES = _load_cases()
RUNNABLE, SKIPPED = [], {}
for _name, _model, _sets, _rtol, _atol in ALL_CASES:
    if not {n.op_type for n in _model.graph.node} <= set(SUPPORTED_OPS):
        continue  # uses an operator libml does not support: not a conformance case for us
    if _name in EXCLUDED:
        SKIPPED[_name] = EXCLUDED[_name]
    elif not all(_supported_elem(et) for et in _elem_types(_model)):
        SKIPPED[_name] = UNSUPPORTED_ELEM_TYPES_REASON
    else:
        RUNNABLE.append((_name, _model, _sets, _rtol, _atol))


def _arr(v):
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def _run_case(model, sets, rtol, atol):
    rep = backend.prepare(model)
    for inputs, expected in sets:
        got = rep.run([_arr(i) for i in inputs])
        assert len(got) == len(expected), f"{len(got)} outputs, expected {len(expected)}"
        for i, (r, e) in enumerate(zip(got, expected)):
            e = _arr(e)
            r = np.asarray(r)
            assert r.dtype == e.dtype, f"output {i}: dtype {r.dtype}, expected {e.dtype}"
            assert r.shape == e.shape, f"output {i}: shape {r.shape}, expected {e.shape}"
            np.testing.assert_allclose(r, e, rtol=rtol, atol=atol, err_msg=f"output {i}")


_RESULTS = {}


@pytest.fixture(scope="module")
def results():
    """Run every runnable case once; {name: None (passed) or error string}."""
    if not _RESULTS:
        for name, model, sets, rtol, atol in RUNNABLE:
            try:
                _run_case(model, sets, rtol, atol)
                _RESULTS[name] = None
            except Exception as e:  # noqa: BLE001 - reported per case below
                _RESULTS[name] = f"{type(e).__name__}: {e}"
    return _RESULTS


@pytest.mark.parametrize("name", [c[0] for c in RUNNABLE])
def test_conformance_case(results, name):
    err = results[name]
    if err is not None:
        pytest.fail(f"{name}: {err}")


def test_conformance_summary(results, record_property, capsys):
    passed = sum(1 for v in results.values() if v is None)
    failed = {k: v for k, v in results.items() if v is not None}
    reasons = {}
    for k, r in SKIPPED.items():
        reasons.setdefault(r, []).append(k)
    with capsys.disabled():
        print(f"\nONNX conformance (onnx {onnx.__version__}): {passed}/{len(RUNNABLE)} cases with supported "
              f"ops pass; {len(SKIPPED)} excluded:")
        for r, names in reasons.items():
            print(f"  {len(names):4d} excluded: {r}")
    record_property("onnx_conformance_passed", passed)
    record_property("onnx_conformance_excluded", len(SKIPPED))
    assert not failed, f"{len(failed)} conformance cases fail: {failed}"
    # discovery sanity: the seed ops' cases are all there
    names = {c[0] for c in RUNNABLE}
    for must in ("test_add", "test_add_bcast", "test_div_int32_trunc", "test_matmul_1d_1d", "test_gemm_all_attributes",
                 "test_softmax_axis_0", "test_relu", "test_sigmoid", "test_mul_uint8", "test_sub_int8"):
        assert must in names, f"{must} was not discovered"
    assert passed >= 130


def test_backend_api():
    """The Backend class contract: supports_device, prepare on an unsupported op, run_node, run_model."""
    assert backend.LibmlBackend.supports_device("CPU")
    assert not backend.LibmlBackend.supports_device("CUDA")
    h = onnx.helper
    node = h.make_node("Add", ["a", "b"], ["c"])
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.float32([1, 2, 3])
    (c,) = backend.run_node(node, [a, b])
    np.testing.assert_array_equal(c, a + b)
    conv = h.make_model(h.make_graph(
        [h.make_node("Conv", ["x", "w"], ["y"], name="conv0")], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4]),
         h.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [1, 1, 3, 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]),
        opset_imports=[h.make_opsetid("", 13)])
    assert not backend.LibmlBackend.is_compatible(conv)
    from libml_compile.onnx_import import UnsupportedOperatorError
    with pytest.raises(UnsupportedOperatorError, match="Conv"):
        backend.prepare(conv)
