"""The reduction family (ops_reduce.py): max, min, prod, logsumexp, argmax/argmin, log_softmax (runtime
kernels) and sum_square, l1_norm, l2_norm, log_sum (fused decompositions).

* forward against NumPy in float32 and float64, over single axes, runs of axes, non-contiguous axis sets
  (a transpose first), all axes, keepdims, and empty reductions (the ONNX identities);
* every gradient against float64 central differences (inputs chosen with no ties and no zeros within
  the step, so the function is smooth there);
* PyTorch autograd for max/min with ties (shared evenly), logsumexp, log_softmax and prod with zeros;
* bit-identical results for 1, 2 and 4 threads on inputs large enough to run in parallel;
* NaN and Inf propagation as NumPy.
"""
import numpy as np
import pytest

import libml_compile as lc
from conftest import check_grads_fd

torch = pytest.importorskip("torch")


def _np_lse(x, axis, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    sh = np.where(np.isfinite(m), m, 0)
    r = np.log(np.sum(np.exp(x - sh), axis=axis, keepdims=True)) + sh
    return r if keepdims else np.squeeze(r, axis=axis)


def _np_prod(x, axis, keepdims=False):
    return np.prod(x, axis=axis, keepdims=keepdims)


REDUCERS = {
    "max": (lc.max, lambda x, axis, keepdims=False: np.max(x, axis=axis, keepdims=keepdims)),
    "min": (lc.min, lambda x, axis, keepdims=False: np.min(x, axis=axis, keepdims=keepdims)),
    "prod": (lc.prod, _np_prod),
    "logsumexp": (lc.logsumexp, _np_lse),
    "sum_square": (lc.sum_square, lambda x, axis, keepdims=False: np.sum(x * x, axis=axis, keepdims=keepdims)),
    "l1_norm": (lc.l1_norm, lambda x, axis, keepdims=False: np.sum(np.abs(x), axis=axis, keepdims=keepdims)),
    "l2_norm": (lc.l2_norm, lambda x, axis, keepdims=False: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))),
    "log_sum": (lc.log_sum, lambda x, axis, keepdims=False: np.log(np.sum(x, axis=axis, keepdims=keepdims))),
}
AXES = [None, 0, 1, 2, -1, (0, 1), (1, 2), (0, 2), (0, 1, 2)]


def _distinct(shape, rng, positive=False):
    """Values whose magnitudes are distinct and away from 0 (no ties, no kinks within a FD step) and
    near 1 in magnitude (products stay in range)."""
    n = int(np.prod(shape))
    v = 0.6 + 0.8 * (rng.permutation(n) / max(n, 1))
    if not positive:
        v = v * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return v.reshape(shape)


def _run(build, feeds_np, dtype, nthreads=1):
    g = lc.Graph("r")
    xs = {k: g.input(k, v.shape, dtype=dtype) for k, v in feeds_np.items()}
    out = build(**xs)
    g.output("y", out)
    prog = lc.compile(g, num_threads=nthreads)
    return prog.run({k: v.astype(dtype) for k, v in feeds_np.items()})["y"], out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(REDUCERS))
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_forward_matches_numpy(name, axis, keepdims, dtype):
    fn, ref = REDUCERS[name]
    rng = np.random.default_rng(hash((name, str(axis))) % 2 ** 32)
    x = _distinct((3, 5, 7), rng, positive=name == "log_sum")
    y, t = _run(lambda x: fn(x, axis=axis, keepdims=keepdims), {"x": x}, dtype)
    want = ref(x.astype(dtype).astype(np.float64), axis if axis is not None else (0, 1, 2), keepdims)
    assert y.shape == np.shape(want) == tuple(t.shape) and y.dtype == np.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["max", "min", "prod", "logsumexp"])
def test_exact_values(name):
    """max/min are exact (the same element), prod and logsumexp match NumPy's float64 to rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 129))
    fn, ref = REDUCERS[name]
    for axis in (0, 1):
        y, _ = _run(lambda x: fn(x, axis=axis), {"x": x}, "float64")
        if name in ("max", "min"):
            np.testing.assert_array_equal(y, ref(x, axis))
        else:
            np.testing.assert_allclose(y, ref(x, axis), rtol=1e-13)


@pytest.mark.parametrize("name", sorted(REDUCERS))
@pytest.mark.parametrize("axis", [None, 1, (0, 2)], ids=str)
def test_gradient_finite_differences(name, axis):
    fn, _ = REDUCERS[name]
    rng = np.random.default_rng(11)
    g = lc.Graph("fd")
    p = g.param("p", _distinct((3, 4, 5), rng, positive=name == "log_sum"))
    y = fn(p, axis=axis)
    R = rng.standard_normal(y.shape)
    loss = lc.sum(y * g.const(R))
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    check_grads_fd(prog, {}, ["p"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_log_softmax_forward_and_fd(axis):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 3)) * 3
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-13)):
        y, _ = _run(lambda x: lc.log_softmax(x, axis=axis), {"x": x}, dtype)
        xd = x.astype(dtype).astype(np.float64)
        np.testing.assert_allclose(y, xd - _np_lse(xd, axis, keepdims=True), rtol=tol, atol=tol)
    g = lc.Graph("fd")
    p = g.param("p", x)
    y = lc.log_softmax(p, axis=axis)
    loss = lc.sum(y * g.const(rng.standard_normal(x.shape)))
    g.output("loss", loss)
    check_grads_fd(lc.compile(g, loss=loss), {}, ["p"], rtol=1e-6, atol=1e-8)


def test_log_softmax_is_one_kernel():
    g = lc.Graph("k")
    x = g.input("x", (8, 10))
    g.output("y", lc.log_softmax(x))
    from libml_runtime import format as F
    code = lc.compile(g).plan.entries["run"].code
    assert [n for _, n, _, _ in F.instructions(code)] == ["log_softmax"]


def _torch_grad(tfn, x, w):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (tfn(xt) * torch.tensor(w)).sum().backward()
    return xt.grad.numpy()


def _lc_grad(fn, x, w):
    g = lc.Graph("t")
    p = g.param("p", x)
    y = fn(p)
    loss = lc.sum(y * g.const(np.asarray(w, np.float64)))
    g.output("loss", loss)
    return lc.compile(g, loss=loss).grad({})["p"]


TIES = np.array([[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 0.0], [-1.0, -1.0, 2.0, -1.0]])


@pytest.mark.parametrize("case", [
    ("max", lambda x: lc.max(x, axis=1), lambda t: torch.amax(t, dim=1)),
    ("min", lambda x: lc.min(x, axis=1), lambda t: torch.amin(t, dim=1)),
    ("max0", lambda x: lc.max(x, axis=0, keepdims=True), lambda t: torch.amax(t, dim=0, keepdim=True)),
    ("max_all", lambda x: lc.max(x), lambda t: torch.amax(t)),
    ("min_all", lambda x: lc.min(x), lambda t: torch.amin(t)),
    ("min_cols", lambda x: lc.min(x, axis=0), lambda t: torch.amin(t, dim=0)),
], ids=lambda c: c[0])
def test_ties_share_the_gradient_as_torch(case):
    _, fn, tfn = case
    x = np.concatenate([TIES, TIES[::-1] * 0.5])  # ties within rows, columns and across the tensor
    w = np.arange(1.0, 1.0 + np.asarray(tfn(torch.tensor(x)).shape).prod()).reshape(tfn(torch.tensor(x)).shape)
    got, want = _lc_grad(fn, x, w), _torch_grad(tfn, x, w)
    np.testing.assert_array_equal(got, want)


def test_logsumexp_and_log_softmax_match_torch():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 7)) * 10
    w = rng.standard_normal(5)
    np.testing.assert_allclose(_lc_grad(lambda p: lc.logsumexp(p, axis=1), x, w),
                               _torch_grad(lambda t: torch.logsumexp(t, dim=1), x, w), rtol=1e-13, atol=1e-15)
    w2 = rng.standard_normal((5, 7))
    np.testing.assert_allclose(_lc_grad(lambda p: lc.log_softmax(p, axis=0), x, w2),
                               _torch_grad(lambda t: torch.log_softmax(t, dim=0), x, w2), rtol=1e-12,
                               atol=1e-14)
    # large logits: no overflow (the max shift), as torch
    big = x * 100
    y, _ = _run(lambda x: lc.logsumexp(x, axis=1), {"x": big}, "float64")
    np.testing.assert_allclose(y, torch.logsumexp(torch.tensor(big), 1).numpy(), rtol=1e-14)
    y, _ = _run(lambda x: lc.log_softmax(x, axis=1), {"x": big}, "float32")
    np.testing.assert_allclose(y, torch.log_softmax(torch.tensor(big, dtype=torch.float32), 1).numpy(),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("row", [[2.0, 3.0, 0.5, 4.0], [2.0, 0.0, 0.5, 4.0], [0.0, 3.0, 0.0, 4.0],
                                 [0.0, 0.0, 0.0, 0.0], [-0.0, 1.5, 2.0, -3.0]], ids=str)
def test_prod_gradient_with_zeros_as_torch(row):
    x = np.array([row, [1.0, 2.0, 3.0, 4.0]])
    w = np.array([1.5, -2.0])
    got = _lc_grad(lambda p: lc.prod(p, axis=1), x, w)
    want = _torch_grad(lambda t: torch.prod(t, dim=1), x, w)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    got = _lc_grad(lambda p: lc.prod(p), x, 2.5)
    want = _torch_grad(lambda t: torch.prod(t), x, 2.5)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("last", [False, True])
def test_argmax_argmin(op, last, dtype):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (6, 9, 5)).astype(np.float64)  # many ties
    fn = getattr(lc, op)
    npfn = getattr(np, op)
    for axis in (0, 1, 2, -1):
        for keepdims in (False, True):
            y, t = _run(lambda x: fn(x, axis=axis, keepdims=keepdims, select_last=last), {"x": x}, dtype)
            if last:
                want = x.shape[axis] - 1 - npfn(np.flip(x, axis), axis=axis)
            else:
                want = npfn(x, axis=axis)
            if keepdims:
                want = np.expand_dims(want, axis)
            assert y.dtype == np.int64 and t.dtype == "int64"
            np.testing.assert_array_equal(y, want)
    y, _ = _run(lambda x: fn(x), {"x": x}, dtype)  # axis None: the flattened index, as NumPy
    assert y.shape == () and int(y) == npfn(x)


def test_argmax_rejects_an_empty_axis():
    g = lc.Graph("e")
    x = g.input("x", (3, 0))
    with pytest.raises(ValueError, match="empty"):
        lc.argmax(x, axis=1)


def test_nan_and_inf_propagate_as_numpy():
    nan, inf = np.nan, np.inf
    x = np.array([[1.0, nan, 3.0, nan], [1.0, inf, -inf, 2.0], [-inf, -inf, -inf, -inf],
                  [inf, inf, 1.0, 0.0], [0.0, -1.0, 2.0, 2.0]])
    for dtype in ("float32", "float64"):
        xd = x.astype(dtype)
        with np.errstate(all="ignore"):
            for fn, ref in ((lc.max, np.max), (lc.min, np.min), (lc.prod, np.prod)):
                for axis in (0, 1):
                    y, _ = _run(lambda x: fn(x, axis=axis), {"x": x}, dtype)
                    np.testing.assert_array_equal(y, ref(xd, axis=axis))
            for axis in (0, 1):
                y, _ = _run(lambda x: lc.logsumexp(x, axis=axis), {"x": x}, dtype)
                want = torch.logsumexp(torch.tensor(xd), dim=axis).numpy()
                np.testing.assert_array_equal(y, want)
                y, _ = _run(lambda x: lc.log_softmax(x, axis=axis), {"x": x}, dtype)
                # NaN and +-inf where torch has them, finite values to rounding
                np.testing.assert_allclose(y, torch.log_softmax(torch.tensor(xd), axis).numpy(), rtol=1e-6)
                for op in ("argmax", "argmin"):
                    for last in (False, True):
                        y, _ = _run(lambda x: getattr(lc, op)(x, axis=axis, select_last=last), {"x": x}, dtype)
                        npfn = getattr(np, op)
                        want = (x.shape[axis] - 1 - npfn(np.flip(xd, axis), axis=axis)) if last else npfn(xd, axis=axis)
                        np.testing.assert_array_equal(y, want, err_msg=f"{op} last={last} axis={axis}")


def test_empty_reductions_are_the_identities():
    x = np.zeros((2, 0, 3))
    for fn, want in ((lc.max, -np.inf), (lc.min, np.inf), (lc.prod, 1.0), (lc.logsumexp, -np.inf),
                     (lc.sum_square, 0.0), (lc.l1_norm, 0.0), (lc.l2_norm, 0.0)):
        for dtype in ("float32", "float64"):
            y, _ = _run(lambda x: fn(x, axis=1, keepdims=True), {"x": x}, dtype)
            assert y.shape == (2, 1, 3)
            np.testing.assert_array_equal(y, np.full((2, 1, 3), want))


def test_empty_axes_is_the_identity():
    x = np.arange(6.0).reshape(2, 3)
    for fn in (lc.max, lc.min, lc.prod, lc.logsumexp):
        y, _ = _run(lambda x: fn(x, axis=()), {"x": x}, "float64")
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bit_identical_for_any_thread_count(dtype):
    """Large enough to run in parallel (>= 32768 elements), with ties, forward and backward."""
    rng = np.random.default_rng(9)
    x = np.round(rng.standard_normal((96, 700)), 1)  # rounded: many ties
    results = []
    for nt in (1, 2, 4):
        g = lc.Graph("bits")
        p = g.param("p", x.astype(dtype))
        outs = {
            "max0": lc.max(p, axis=0), "max1": lc.max(p, axis=1), "min_all": lc.min(p),
            "prod1": lc.prod(p * 0.01 + 1.0, axis=1), "prod0": lc.prod(p * 0.01 + 1.0, axis=0),
            "lse0": lc.logsumexp(p, axis=0), "lse1": lc.logsumexp(p, axis=1),
            "ls0": lc.log_softmax(p, axis=0), "ls1": lc.log_softmax(p, axis=1),
            "am0": lc.argmax(p, axis=0), "am1": lc.argmin(p, axis=1, select_last=True),
            "l2": lc.l2_norm(p, axis=0),
        }
        loss = lc.sum(outs["max0"]) + lc.sum(outs["min_all"]) + lc.sum(outs["prod1"]) + \
            lc.sum(outs["lse0"]) + lc.sum(outs["ls1"] * p) + lc.sum(outs["l2"]) + lc.sum(outs["max1"] * 0.5)
        for k, v in outs.items():
            g.output(k, v)
        g.output("loss", loss)
        prog = lc.compile(g, loss=loss, num_threads=nt)
        res = prog.run({})
        res["grad"] = prog.grad({})["p"]
        results.append(res)
    for k in results[0]:
        for r in results[1:]:
            assert np.asarray(results[0][k]).tobytes() == np.asarray(r[k]).tobytes(), k


def test_noncontiguous_axes_and_names():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    y, t = _run(lambda x: lc.max(x, axis=(0, 2), keepdims=True, name="m"), {"x": x}, "float64")
    np.testing.assert_array_equal(y, np.max(x, axis=(0, 2), keepdims=True))
    assert t.name == "m"


def test_errors_name_the_op():
    g = lc.Graph("e")
    x = g.input("x", (3, 4))
    i = g.input("i", (3,), dtype="int64")
    with pytest.raises(ValueError, match="max: axis 2 is out of range"):
        lc.max(x, axis=2)
    with pytest.raises(TypeError, match="argmax: needs a floating tensor"):
        lc.argmax(i)
    with pytest.raises(TypeError, match="prod: expected a symbolic Tensor"):
        lc.prod(np.ones(3))


def test_plan_validator_checks_the_reduction_instructions():
    """Every field of reduce / arg_reduce / log_softmax is proven in range before a plan runs."""
    from libml_runtime import format as F
    from libml_runtime import planfile as PF
    from libml_runtime.plan import PlanError, validate
    g = lc.Graph("v")
    x = g.input("x", (4, 6))
    for k, y in enumerate((lc.max(x, axis=1), lc.argmin(x, axis=0), lc.log_softmax(x, axis=0))):
        g.output(f"y{k}", y)
    plan = lc.compile(g).plan
    validate(plan)
    code = plan.entries["run"].code
    where = {name: F.locate(code, pc)[1] for pc, name, _, _ in F.instructions(code)}
    assert set(where) == {"reduce", "arg_reduce", "log_softmax"}
    cases = [("reduce", "kind", 4, "kind"), ("reduce", "K", 7, "outside buffer"),
             ("reduce", "y.slot", 2, "writes into a fed input"), ("reduce", "dtype", 2, "dtype"),
             ("arg_reduce", "kind", 2, "kind"), ("arg_reduce", "select_last", 2, "select_last"),
             ("arg_reduce", "K", 0, "K = 0"), ("arg_reduce", "inner", 7, "outside buffer"),
             ("log_softmax", "outer", 5, "outside buffer"), ("log_softmax", "y.offset", 3, "aligned")]
    for op, field, value, msg in cases:
        p = PF.loads(PF.dumps(plan))
        p.entries["run"].code[where[op][field]] = value
        with pytest.raises(PlanError, match=msg):
            validate(p)


# ---- ONNX import: axes as attribute or input by opset, keepdims, noop_with_empty_axes, LogSoftmax axis

def _onnx_run(node, opset, x, extra_inits=(), out="DOUBLE", rank=None):
    """Run one node; the output's rank (``rank``, default x's) with symbolic dims (the checker needs it)."""
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in extra_inits]
    m = h.make_model(h.make_graph([node], "g", [h.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, x.shape)],
                                  [h.make_tensor_value_info("y", getattr(onnx.TensorProto, out),
                                                                [f"d{i}" for i in range(x.ndim if rank is None else rank)])],
                                  inits),
                     opset_imports=[h.make_opsetid("", opset)])
    g = lc.import_onnx(m)
    return lc.compile(g).run({"x": x})["y"]


def test_onnx_reduce_axes_attribute_and_input():
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    # opset 13: axes an attribute (ReduceSum: an input since 13)
    y = _onnx_run(h.make_node("ReduceMax", ["x"], ["y"], axes=[0, 2], keepdims=0), 13, x, rank=1)
    np.testing.assert_array_equal(y, np.max(x, axis=(0, 2)))
    y = _onnx_run(h.make_node("ReduceSum", ["x"], ["y"], axes=[-1]), 11, x)
    np.testing.assert_allclose(y, np.sum(x, axis=-1, keepdims=True), rtol=1e-14)
    y = _onnx_run(h.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=0), 13, x, [("a", np.int64([1]))], rank=2)
    np.testing.assert_allclose(y, np.sum(x, axis=1), rtol=1e-14)
    # opset 18: an input; absent = all axes, or the identity with noop_with_empty_axes
    y = _onnx_run(h.make_node("ReduceProd", ["x", "a"], ["y"]), 18, x, [("a", np.int64([1]))])
    np.testing.assert_allclose(y, np.prod(x, axis=1, keepdims=True), rtol=1e-14)
    y = _onnx_run(h.make_node("ReduceLogSumExp", ["x"], ["y"], keepdims=0), 18, x, rank=0)
    np.testing.assert_allclose(y, _np_lse(x, (0, 1, 2)), rtol=1e-14)
    y = _onnx_run(h.make_node("ReduceMin", ["x"], ["y"], noop_with_empty_axes=1), 18, x)
    np.testing.assert_array_equal(y, x)
    y = _onnx_run(h.make_node("ReduceL2", ["x", "a"], ["y"]), 18, x, [("a", np.int64([0, 2]))])
    np.testing.assert_allclose(y, np.sqrt(np.sum(x * x, axis=(0, 2), keepdims=True)), rtol=1e-14)


def test_onnx_log_softmax_axis_semantics_by_opset():
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    x = np.random.default_rng(1).standard_normal((2, 3, 4))
    # opset < 13: the input is coerced to 2-D at `axis` (default 1): normalised over axes 1 and 2 together
    y = _onnx_run(h.make_node("LogSoftmax", ["x"], ["y"]), 11, x)
    flat = x.reshape(2, 12)
    np.testing.assert_allclose(y, (flat - _np_lse(flat, 1, keepdims=True)).reshape(x.shape), rtol=1e-13)
    # opset >= 13: one axis (default -1)
    y = _onnx_run(h.make_node("LogSoftmax", ["x"], ["y"], axis=1), 13, x)
    np.testing.assert_allclose(y, x - _np_lse(x, 1, keepdims=True), rtol=1e-13)


def test_onnx_argmax_attributes():
    onnx = pytest.importorskip("onnx")
    h = onnx.helper
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])
    y = _onnx_run(h.make_node("ArgMax", ["x"], ["y"], axis=1, select_last_index=1), 13, x, out="INT64")
    np.testing.assert_array_equal(y, [[2], [1]])
    y = _onnx_run(h.make_node("ArgMin", ["x"], ["y"], keepdims=0), 13, x, out="INT64", rank=1)
    np.testing.assert_array_equal(y, [0, 1, 1])


@pytest.mark.parametrize("K", [1, 15, 16, 17, 33, 100, 1000])
def test_argmax_long_rows_ties_and_nans(K):
    """Rows along the contiguous axis (the kernel's lane path): many ties, NaNs at random places, every
    select_last choice, against NumPy (the first NaN / the last NaN wins)."""
    rng = np.random.default_rng(K)
    x = rng.integers(0, 4, (9, K)).astype(np.float64)
    x[rng.random(x.shape) < 0.02] = np.nan
    x[1, rng.integers(0, K, 2)] = np.nan          # rows with one or two NaNs
    x[2] = np.inf
    x[3] = -np.inf
    for dtype in ("float32", "float64"):
        xd = x.astype(dtype)
        for op in ("argmax", "argmin"):
            npfn = getattr(np, op)
            for last in (False, True):
                y, _ = _run(lambda x: getattr(lc, op)(x, axis=1, select_last=last), {"x": x}, dtype)
                want = (K - 1 - npfn(np.flip(xd, 1), axis=1)) if last else npfn(xd, axis=1)
                np.testing.assert_array_equal(y, want, err_msg=f"{op} last={last} {dtype}")
