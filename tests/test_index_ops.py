"""ops_index.py: GatherElements / GatherND with live (fed or computed) indices, Scatter reductions mul / max /
min, DepthToSpace / SpaceToDepth.  Oracles: PyTorch (torch.gather, scatter_reduce, pixel_shuffle and
autograd), ONNX Runtime and onnx.reference for forward outputs, float64 central differences for gradients,
the official ONNX node cases."""
from __future__ import annotations

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr

torch = pytest.importorskip("torch")


def _central_differences(f, vals, k, eps=1e-6):
    """d f / d vals[k] by float64 central differences (f: list of arrays -> scalar)."""
    v = vals[k]
    out = np.zeros(v.shape)
    for i in np.ndindex(v.shape):
        a, b = [w.copy() for w in vals], [w.copy() for w in vals]
        a[k][i] += eps
        b[k][i] -= eps
        out[i] = (f(a) - f(b)) / (2 * eps)
    return out


def _onnx_model(op, inputs, outputs, inits=(), opset=18, **attrs):
    from onnx import helper
    node = helper.make_node(op, [n for n, _, _ in inputs] + [t.name for t in inits], ["y"], **attrs)
    vis = [helper.make_tensor_value_info(n, et, s) for n, et, s in inputs]
    gr = helper.make_graph([node], op.lower(), vis, [helper.make_tensor_value_info("y", *outputs)], list(inits))
    return helper.make_model(gr, opset_imports=[helper.make_opsetid("", opset)])


# ---------------------------------------------------------------------------------------------------
# GatherElements with live indices

@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_with_fed_indices_matches_torch_gather_and_autograd(axis):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 5, 3))
    n = X.shape[axis]
    ishape = list(X.shape)
    ishape[axis] = 7  # more picks than the axis holds: duplicates, whose gradients add up
    ishape[0 if axis != 0 else 1] -= 1  # smaller than the data outside the axis (torch.gather allows it)
    I = rng.integers(-n, n, ishape)
    R = rng.uniform(0.5, 1.5, ishape)
    g = lc.Graph("ge")
    x = g.param("x", X)
    i = g.input("i", tuple(ishape), dtype="int64")
    y = lc.gather_elements(x, i, axis=axis, name="y")
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    xt = torch.tensor(X, requires_grad=True)
    yt = torch.gather(xt, axis, torch.tensor(I % n))
    (yt * torch.tensor(R)).sum().backward()
    np.testing.assert_array_equal(prog.run({"i": I})["y"], yt.detach().numpy())
    np.testing.assert_allclose(prog.grad({"i": I})["x"], xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_gather_elements_with_computed_indices_picks_the_labels_log_probability():
    # the exported NLL loss pattern: log_softmax, then GatherElements at the (computed) unsqueezed labels
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((6, 4)).astype(np.float32)
    Y = rng.integers(0, 4, 6)
    g = lc.Graph("nll")
    z = g.param("z", Z)
    lab = g.input("labels", (6,), dtype="int64")
    picked = lc.gather_elements(lc.log_softmax(z, axis=1), lc.reshape(lab, (6, 1)) - 4, axis=1)  # negative
    loss = -lc.mean(picked)
    prog = lc.compile(g, loss=loss)
    zt = torch.tensor(Z, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(Y))
    lt.backward()
    np.testing.assert_allclose(prog.run({"labels": Y})["loss"], lt.item(), rtol=1e-6)
    np.testing.assert_allclose(prog.grad({"labels": Y})["z"], zt.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_gather_elements_matches_onnx_runtime_on_an_imported_model():
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3, 4)).astype(np.float32)
    I = rng.integers(-3, 3, (2, 4))
    m = _onnx_model("GatherElements", [("x", TensorProto.FLOAT, (3, 4)), ("i", TensorProto.INT64, (2, 4))],
                    (TensorProto.FLOAT, (2, 4)), axis=0)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X, "i": I})
    prog = lc.compile(lc.import_onnx(m))
    np.testing.assert_array_equal(prog.run({"x": X, "i": I})["y"], want[0])


# ---------------------------------------------------------------------------------------------------
# GatherND with live indices

@pytest.mark.parametrize("data_shape, idx_shape, batch_dims", [
    ((4, 3, 2), (5, 2), 0),        # pick rows of 2 elements by (i, j)
    ((4, 3, 2), (2, 2, 3), 0),     # single elements, 2-D positions
    ((3, 4, 2), (3, 5, 1), 1),     # per batch element, rows of it
    ((2, 3, 4, 2), (2, 3, 2, 1), 2),
])
def test_gather_nd_with_fed_indices_matches_onnx_runtime_and_central_differences(data_shape, idx_shape, batch_dims):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto
    rng = np.random.default_rng(3)
    X = rng.standard_normal(data_shape)
    k = idx_shape[-1]
    dims = np.asarray(data_shape[batch_dims:batch_dims + k])
    I = (rng.integers(0, 1 << 30, idx_shape) % (2 * dims)) - dims  # every component within [-d, d)
    out_shape = tuple(idx_shape[:-1]) + tuple(data_shape[batch_dims + k:])
    m = _onnx_model("GatherND", [("x", TensorProto.DOUBLE, data_shape), ("i", TensorProto.INT64, idx_shape)],
                    (TensorProto.DOUBLE, out_shape), batch_dims=batch_dims)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": X, "i": I})[0]
    R = rng.uniform(0.5, 1.5, out_shape)
    g = lc.Graph("gnd")
    x = g.param("x", X)
    i = g.input("i", idx_shape, dtype="int64")
    y = lc.gather_nd(x, i, batch_dims=batch_dims)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    np.testing.assert_array_equal(prog.run({"i": I})["y"], want)
    fd = _central_differences(lambda v: float(np.sum(sess.run(None, {"x": v[0], "i": I})[0] * R)), [X], 0)
    np.testing.assert_allclose(prog.grad({"i": I})["x"], fd, rtol=1e-7, atol=1e-9)


def test_gather_nd_gradient_matches_torch_advanced_indexing_with_duplicates():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((5, 4, 3)).astype(np.float32)
    I = np.array([[0, 1], [4, 3], [0, 1], [-1, -1], [2, 0], [0, 1]])  # (0, 1) three times
    g = lc.Graph("gnd_dup")
    x = g.param("x", X)
    i = g.input("i", I.shape, dtype="int64")
    loss = lc.sum(lc.tanh(lc.gather_nd(x, i)))
    prog = lc.compile(g, loss=loss)
    xt = torch.tensor(X, requires_grad=True)
    It = torch.tensor(I % np.array([5, 4]))
    torch.tanh(xt[It[:, 0], It[:, 1]]).sum().backward()
    np.testing.assert_allclose(prog.grad({"i": I})["x"], xt.grad.numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# bad indices

def _step_program(kind):
    g = lc.Graph("bad")
    w = g.param("w", np.arange(12, dtype=np.float64).reshape(4, 3) / 10)
    if kind == "elements":
        i = g.input("i", (2, 3), dtype="int64")
        y = lc.gather_elements(w, i, axis=0, name="picked")
    else:
        i = g.input("i", (2, 2), dtype="int32")
        y = lc.gather_nd(w, i, name="picked")
    return lc.compile(g, loss=lc.sum(y * y), optimizer=lc.SGD(0.1))


@pytest.mark.parametrize("bad, value, at", [([[0, 1, 2], [3, 4, 0]], 4, r"\(1, 1\)"),
                                            ([[-5, 0, 0], [0, 0, 0]], -5, r"\(0, 0\)")])
def test_fed_gather_elements_indices_out_of_range_raise_naming_input_value_and_range(bad, value, at):
    prog = _step_program("elements")
    before = prog.params["w"]
    with pytest.raises(ValueError, match=rf"feed 'i': indices must be in \[-4, 4\).*got {value} at {at}"):
        prog.step({"i": np.array(bad)})
    np.testing.assert_array_equal(prog.params["w"], before)


def test_fed_gather_nd_indices_are_checked_per_component_against_their_own_dim():
    prog = _step_program("nd")
    before = prog.params["w"]
    ok = np.array([[3, 2], [-4, -3]], np.int32)  # row index in [-4, 4), column index in [-3, 3)
    prog.step({"i": ok})
    after_ok = prog.params["w"]
    assert not np.array_equal(after_ok, before)
    with pytest.raises(ValueError, match=r"feed 'i': indices\[\.\.\., 1\] .*must be in \[-3, 3\).*got 3 at \(1, 1\)"):
        prog.step({"i": np.array([[0, 2], [1, 3]], np.int32)})
    np.testing.assert_array_equal(prog.params["w"], after_ok)


def test_fed_labels_seen_through_an_unsqueeze_are_checked_at_the_feed():
    # the exported NLL pattern GatherElements(log_probs, Unsqueeze(labels)): a reshape keeps the values
    g = lc.Graph("nll_fed")
    z = g.param("z", np.zeros((3, 4), np.float32))
    lab = g.input("labels", (3,), dtype="int32")
    loss = -lc.mean(lc.gather_elements(lc.log_softmax(z, axis=1), lc.reshape(lab, (3, 1)), axis=1))
    prog = lc.compile(g, loss=loss)
    assert prog.plan.index_inputs == {"labels": (-4, 4)}
    with pytest.raises(ValueError, match=r"feed 'labels': indices must be in \[-4, 4\).*got 4 at \(2,\)"):
        prog.grad({"labels": np.array([0, 1, 4], np.int32)})


def test_computed_out_of_range_indices_stop_the_call_in_the_kernel_naming_node_value_and_range():
    g = lc.Graph("computed")
    w = g.param("w", np.ones((4, 3)))
    i = g.input("i", (2, 3), dtype="int64")
    y = lc.gather_elements(w, i * 2, axis=0, name="picked")  # computed: the feed check cannot see it
    prog = lc.compile(g, loss=lc.sum(y * y), optimizer=lc.SGD(0.1))
    prog.step({"i": np.array([[0, 1, -2], [1, 0, 1]])})
    before = prog.params["w"]
    with pytest.raises(IndexError, match=r"index 4 at position 4 of the indices of node 'picked/indices'.*"
                                         r"out of range \[-4, 4\); nothing was updated"):
        prog.step({"i": np.array([[0, 1, 0], [1, 2, 1]])})
    np.testing.assert_array_equal(prog.params["w"], before)


def test_constant_and_malformed_indices_are_refused_at_declaration_naming_the_op():
    g = lc.Graph("decl")
    x = g.input("x", (4, 3))
    with pytest.raises(ValueError, match=r"gather_elements of 'x' \(4, 3\): index 4 at \(1, 0\) is out of range \[-4, 4\)"):
        lc.gather_elements(x, [[0, 1, 2], [4, 0, 0]], axis=0)
    with pytest.raises(ValueError, match=r"gather_elements: indices of shape \(3,\) do not fit 'x' of shape \(4, 3\)"):
        lc.gather_elements(x, [0, 1, 2])
    with pytest.raises(TypeError, match="gather_nd: indices must be integers"):
        lc.gather_nd(x, g.input("f", (2, 1)))
    with pytest.raises(ValueError, match=r"gather_nd: indices of shape \(2, 3\) do not fit"):
        lc.gather_nd(x, np.zeros((2, 3), np.int64))


def test_plan_file_keeps_per_component_index_ranges(tmp_path):
    prog = _step_program("nd")
    prog.save(tmp_path / "nd.plan")
    exe = lr.load(tmp_path / "nd.plan")
    assert exe.plan.index_inputs["i"] == ((-4, 4), (-3, 3))
    with pytest.raises(ValueError, match=r"indices\[\.\.\., 0\] .*must be in \[-4, 4\).*got 4"):
        exe.run({"i": np.array([[4, 0], [0, 0]], np.int32)})


def test_validator_refuses_an_index_flat_whose_positions_could_overflow():
    from libml_runtime import format as F
    from libml_runtime.plan import PlanError, validate
    g = lc.Graph("v")
    x = g.input("x", (4, 3))
    i = g.input("i", (2, 1), dtype="int64")
    g.output("y", lc.gather_nd(x, i))
    prog = lc.compile(g)
    entry = prog.plan.entries["run"]
    for pc, name, _, _ in F.instructions(entry.code):
        if name == "index_flat":
            _, where = F.locate(entry.code, pc)
            entry.code[where["mult"][0]] = 2 ** 40
            entry.code[where["dims"][0]] = 2 ** 30
    with pytest.raises(PlanError, match=r"the largest flat position exceeds 2\^62"):
        validate(prog.plan)


def test_gather_gradients_are_bit_identical_for_one_and_two_threads():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 70)).astype(np.float32)
    I = rng.integers(-300, 300, (2000, 70))     # many duplicates per column
    J = rng.integers(-300, 300, (4000, 1))
    g = lc.Graph("threads")
    x = g.param("x", X)
    i = g.input("i", I.shape, dtype="int64")
    j = g.input("j", J.shape, dtype="int64")
    loss = lc.mean(lc.sigmoid(lc.gather_elements(x, i, axis=0))) + lc.mean(lc.tanh(lc.gather_nd(x, j)))
    feeds = {"i": I, "j": J}
    grads = [lc.compile(g, loss=loss, num_threads=n).grad(feeds)["x"] for n in (1, 2)]
    assert grads[0].tobytes() == grads[1].tobytes()


# ---------------------------------------------------------------------------------------------------
# Scatter reductions

_TORCH_REDUCE = {"mul": "prod", "max": "amax", "min": "amin", "add": "sum"}


@pytest.mark.parametrize("reduction", ["mul", "max", "min", "add"])
def test_scatter_elements_reductions_match_torch_scatter_reduce_forward_and_gradients(reduction):
    rng = np.random.default_rng(6)
    D = rng.standard_normal((4, 5))
    U = rng.standard_normal((3, 5))
    I = np.array([[0, 1, 3, 3, 0], [0, 1, 2, 3, 0], [3, 1, 2, -1, 0]])  # duplicates; a negative index
    if reduction in ("max", "min"):
        U[1, 1] = U[0, 1]          # a tie between two updates ...
        D[0, 4] = U[2, 4]          # ... and between the data and an update
    R = rng.uniform(0.5, 1.5, D.shape)
    g = lc.Graph("se")
    d, u = g.param("d", D), g.param("u", U)
    y = lc.scatter_elements(d, I, u, axis=0, reduction=reduction)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    dt, ut = torch.tensor(D, requires_grad=True), torch.tensor(U, requires_grad=True)
    yt = dt.scatter_reduce(0, torch.tensor(I % 4), ut, _TORCH_REDUCE[reduction], include_self=True)
    (yt * torch.tensor(R)).sum().backward()
    np.testing.assert_allclose(prog.run({})["y"], yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    grads = prog.grad({})
    np.testing.assert_allclose(grads["d"], dt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["u"], ut.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_scatter_mul_gradient_is_exact_with_a_zero_update():
    D = np.array([2.0, 3.0, 5.0])
    U = np.array([0.0, 4.0, 7.0])
    I = np.array([0, 0, 2])
    g = lc.Graph("zero")
    d, u = g.param("d", D), g.param("u", U)
    prog = lc.compile(g, loss=lc.sum(lc.scatter_elements(d, I, u, reduction="mul")))
    dt, ut = torch.tensor(D, requires_grad=True), torch.tensor(U, requires_grad=True)
    dt.scatter_reduce(0, torch.tensor(I), ut, "prod", include_self=True).sum().backward()
    grads = prog.grad({})
    np.testing.assert_allclose(grads["d"], dt.grad.numpy())
    np.testing.assert_allclose(grads["u"], ut.grad.numpy())


@pytest.mark.parametrize("reduction", ["mul", "max", "min"])
def test_scatter_nd_reductions_match_the_onnx_reference_and_central_differences(reduction):
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(7)
    D = rng.standard_normal((4, 3, 2))
    I = np.array([[[0, 1]], [[3, 2]], [[0, 1]], [[-4, 1]]])   # (0, 1) three times (once as -4)
    U = rng.standard_normal((4, 1, 2))
    m = _onnx_model("ScatterND", [("d", TensorProto.DOUBLE, D.shape), ("u", TensorProto.DOUBLE, U.shape)],
                    (TensorProto.DOUBLE, D.shape), inits=[numpy_helper.from_array(I, "i")], reduction=reduction)
    # (the node's inputs are d, u, i: put indices second as ScatterND wants)
    m.graph.node[0].input[:] = ["d", "i", "u"]
    ref = ReferenceEvaluator(m)
    want = ref.run(None, {"d": D, "u": U})[0]
    R = rng.uniform(0.5, 1.5, D.shape)
    g = lc.Graph("snd")
    d, u = g.param("d", D), g.param("u", U)
    y = lc.scatter_nd(d, I, u, reduction=reduction)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    np.testing.assert_allclose(prog.run({})["y"], want, rtol=1e-14)
    grads = prog.grad({})
    f = lambda v: float(np.sum(ref.run(None, {"d": v[0], "u": v[1]})[0] * R))  # noqa: E731
    for k, nm in enumerate("du"):
        np.testing.assert_allclose(grads[nm], _central_differences(f, [D, U], k), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reduction", ["add", "mul", "max", "min"])
def test_integer_scatter_reductions_match_the_onnx_reference_exactly(reduction):
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(8)
    D = rng.integers(-9, 9, (3, 4))
    U = rng.integers(-9, 9, (3, 4))
    I = rng.integers(-3, 3, (3, 4))
    m = _onnx_model("ScatterElements", [("d", TensorProto.INT64, D.shape), ("u", TensorProto.INT64, U.shape)],
                    (TensorProto.INT64, D.shape), inits=[numpy_helper.from_array(I, "i")], reduction=reduction,
                    axis=0)
    m.graph.node[0].input[:] = ["d", "i", "u"]
    want = ReferenceEvaluator(m).run(None, {"d": D, "u": U})[0]
    prog = lc.compile(lc.import_onnx(m))
    np.testing.assert_array_equal(prog.run({"d": D, "u": U})["y"], want)


def test_scatter_refuses_live_indices_and_unknown_reductions_naming_the_op():
    g = lc.Graph("s")
    d = g.input("d", (3,))
    with pytest.raises(TypeError, match="scatter_elements: indices must be constant"):
        lc.scatter_elements(d, g.input("i", (2,), dtype="int64"), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="scatter_nd: reduction must be one of"):
        lc.scatter_nd(d, [[0]], np.zeros(1, np.float32), reduction="mean")


# ---------------------------------------------------------------------------------------------------
# DepthToSpace / SpaceToDepth

def test_depth_to_space_crd_is_torch_pixel_shuffle_forward_and_backward():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((2, 12, 3, 4))
    R = rng.uniform(0.5, 1.5, (2, 3, 6, 8))
    g = lc.Graph("d2s")
    x = g.param("x", X)
    y = lc.depth_to_space(x, 2, mode="CRD")
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    xt = torch.tensor(X, requires_grad=True)
    yt = torch.nn.functional.pixel_shuffle(xt, 2)
    (yt * torch.tensor(R)).sum().backward()
    np.testing.assert_array_equal(prog.run({})["y"], yt.detach().numpy())
    np.testing.assert_array_equal(prog.grad({})["x"], xt.grad.numpy())


def test_space_to_depth_crd_is_torch_pixel_unshuffle_and_inverts_depth_to_space():
    rng = np.random.default_rng(10)
    X = rng.standard_normal((2, 3, 6, 4)).astype(np.float32)
    g = lc.Graph("s2d")
    x = g.input("x", X.shape)
    g.output("crd", lc.space_to_depth(x, 2, mode="CRD"))
    g.output("back", lc.depth_to_space(lc.space_to_depth(x, 2), 2))
    out = lc.compile(g).run({"x": X})
    np.testing.assert_array_equal(out["crd"], torch.nn.functional.pixel_unshuffle(torch.tensor(X), 2).numpy())
    np.testing.assert_array_equal(out["back"], X)


@pytest.mark.parametrize("op, mode, shape", [("DepthToSpace", "DCR", (1, 8, 2, 3)), ("DepthToSpace", "CRD", (2, 18, 2, 2)),
                                             ("SpaceToDepth", None, (2, 3, 4, 6))])
def test_depth_space_imports_match_onnx_runtime(op, mode, shape):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto
    b = 3 if shape[1] == 18 else 2
    attrs = {"blocksize": b, **({"mode": mode} if mode else {})}
    X = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    N, C, H, W = shape
    out = (N, C // (b * b), H * b, W * b) if op == "DepthToSpace" else (N, C * b * b, H // b, W // b)
    m = _onnx_model(op, [("x", TensorProto.FLOAT, shape)], (TensorProto.FLOAT, out), opset=13, **attrs)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_array_equal(lc.compile(lc.import_onnx(m)).run({"x": X})["y"], want)


def test_depth_to_space_refuses_channels_that_are_not_a_multiple_of_the_block():
    g = lc.Graph("bad")
    with pytest.raises(ValueError, match=r"depth_to_space: channels 6 of 'x' \(1, 6, 2, 2\) are not a multiple"):
        lc.depth_to_space(g.input("x", (1, 6, 2, 2)), 2)


# ---------------------------------------------------------------------------------------------------
# the official node cases

def test_official_node_cases_of_these_ops_run_and_pass():
    from libml_compile import onnx_backend as backend
    names = ("gather_elements", "gathernd", "scatter_elements", "scatternd", "depthtospace", "spacetodepth",
             "nllloss")
    cases = [c for c in backend.load_node_cases() if any(n in c[0] for n in names)]
    runnable, excluded = backend.discover_conformance_cases(cases)
    ran = {c[0] for c in runnable}
    for c in runnable:
        backend.run_conformance_case(c)
    for must in ("test_scatternd_multiply", "test_scatter_elements_with_reduction_max", "test_depthtospace_example",
                 "test_depthtospace_crd_mode_example", "test_spacetodepth", "test_gathernd_example_int32_batch_dim1",
                 "test_gather_elements_negative_indices", "test_nllloss_NCd1d2d3_sum_weight_high_ii_expanded"):
        assert must in ran, (must, excluded.get(must))
