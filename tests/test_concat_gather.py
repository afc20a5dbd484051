"""Concat, slice and gather are copies (issue 10, item 5).

They used to be products with 0/1 selection matrices: an Inf in one input turned unrelated outputs into
NaN (Inf * 0), and the matrices grew with the square of the size (two (1, 8000) inputs: 2 GB to compile).
Now each is a native kernel (copy_nd, gather, scatter_add), forward and backward.  Oracles: NumPy for
forward values, PyTorch autograd and float64 central differences for gradients, ONNX Runtime for
imported models.
"""
import tracemalloc

import numpy as np
import pytest

import libml_compile as lc
from conftest import central_diff_grad

torch = pytest.importorskip("torch")


def test_an_inf_in_one_concat_input_stays_in_its_own_element():
    g = lc.Graph("inf")
    a, b = g.input("a", (2, 3)), g.input("b", (2, 2))
    g.output("c", lc.concat([a, b], axis=1))
    A = np.ones((2, 3), np.float32)
    A[0, 1] = np.inf
    B = np.arange(4, dtype=np.float32).reshape(2, 2)
    out = lc.compile(g).run({"a": A, "b": B})["c"]
    np.testing.assert_array_equal(out, np.concatenate([A, B], axis=1))
    assert np.isfinite(out).sum() == out.size - 1


def test_an_inf_in_a_gathered_table_stays_in_its_rows():
    g = lc.Graph("inf_gather")
    x = g.input("x", (4, 3), dtype="float64")
    g.output("y", lc.gather(x, [3, 0, 3], axis=0))
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    X[0, 2] = -np.inf
    np.testing.assert_array_equal(lc.compile(g).run({"x": X})["y"], X[[3, 0, 3]])


def test_concat_of_two_long_rows_compiles_in_linear_memory():
    g = lc.Graph("long")
    a, b = g.input("a", (1, 8000)), g.input("b", (1, 8000))
    g.output("c", lc.concat([a, b], axis=1))
    tracemalloc.start()
    try:
        prog = lc.compile(g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"compiling a 64 KB concat allocated {peak / 1e6:.1f} MB"
    assert prog.memory_report("run").arena_bytes <= 2 * 16000 * 4 + 64


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_concat_slice_and_gather_forward_match_numpy(dtype, axis):
    rng = np.random.default_rng(abs(axis) + len(dtype))
    shapes = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    shapes = [tuple(s[:axis % 3] + (k + 1,) + s[axis % 3 + 1:]) for k, s in enumerate(shapes)]
    vals = [(rng.standard_normal(s) * 10).astype(dtype) for s in shapes]
    g = lc.Graph("fwd")
    xs = [g.input(f"x{k}", s, dtype=dtype) for k, s in enumerate(shapes)]
    c = lc.concat(xs, axis=axis)
    g.output("c", c)
    n = c.shape[axis]
    idx = np.array([[n - 1, 0], [-1, 2]])
    g.output("g", lc.gather(c, idx, axis=axis))
    out = lc.compile(g).run({f"x{k}": v for k, v in enumerate(vals)})
    ref = np.concatenate(vals, axis=axis)
    np.testing.assert_array_equal(out["c"], ref)
    np.testing.assert_array_equal(out["g"], np.take(ref, idx, axis=axis))


def _torch_grads(shapes, axis, idx, values):
    T = [torch.tensor(v, requires_grad=True) for v in values]
    c = torch.cat(T, dim=axis)
    gathered = torch.index_select(c, axis, torch.tensor(np.where(idx < 0, idx + c.shape[axis], idx)))
    loss = (torch.sigmoid(gathered) * torch.sigmoid(c).sum()).mean()
    loss.backward()
    return [t.grad.numpy() for t in T]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_gradients_through_concat_and_gather_match_pytorch(axis, fuse):
    rng = np.random.default_rng(axis)
    shapes = [(3, 4), (2, 4)] if axis == 0 else [(3, 4), (3, 1)]
    values = [rng.standard_normal(s) for s in shapes]
    idx = np.array([0, -1, 2, 2, 0])  # repeats: the scatter-add must sum them
    g = lc.Graph("grads")
    ps = [g.param(f"p{k}", v) for k, v in enumerate(values)]
    c = lc.concat(ps, axis=axis)
    loss = lc.mean(lc.sigmoid(lc.gather(c, idx, axis=axis)) * lc.sum(lc.sigmoid(c)))
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, fuse=fuse)
    got = prog.grad({})
    want = _torch_grads(shapes, axis, idx, values)
    for k in range(len(ps)):
        np.testing.assert_allclose(got[f"p{k}"], want[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[f"p{k}"], central_diff_grad(prog, {}, f"p{k}"), rtol=1e-6, atol=1e-8)


def test_embedding_style_gather_of_a_param_trains_like_pytorch():
    rng = np.random.default_rng(5)
    E0 = rng.standard_normal((10, 4)).astype(np.float32)
    W0 = rng.standard_normal((4, 3)).astype(np.float32)
    tokens = np.array([[1, 3, 3], [9, 0, 1]])
    g = lc.Graph("emb")
    E, W = g.param("E", E0), g.param("W", W0)
    h = lc.mean(lc.gather(E, tokens, axis=0), axis=1)   # (2, 4)
    loss = lc.softmax_cross_entropy(h @ W, g.input("y", (2,), dtype="int64"))
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.5))
    y = np.array([2, 0])
    Et, Wt = torch.tensor(E0, requires_grad=True), torch.tensor(W0, requires_grad=True)
    opt = torch.optim.SGD([Et, Wt], lr=0.5)
    for _ in range(3):
        prog.step({"y": y})
        opt.zero_grad()
        torch.nn.functional.cross_entropy(torch.nn.functional.embedding(torch.tensor(tokens), Et).mean(1) @ Wt,
                                          torch.tensor(y)).backward()
        opt.step()
    np.testing.assert_allclose(prog.params["E"], Et.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prog.params["W"], Wt.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_results_are_bit_identical_for_one_and_two_threads():
    rng = np.random.default_rng(3)
    g = lc.Graph("threads")
    p = g.param("p", rng.standard_normal((64, 33)).astype(np.float32))
    x = g.input("x", (64, 33))
    c = lc.concat([p, x, p * x], axis=0)
    idx = rng.integers(-192, 192, 500)
    loss = lc.mean(lc.sigmoid(lc.gather(c, idx, axis=0)))
    g.output("loss", loss)
    feeds = {"x": rng.standard_normal((64, 33)).astype(np.float32)}
    grads = [lc.compile(g, loss=loss, num_threads=n).grad(feeds)["p"] for n in (1, 2)]
    assert grads[0].tobytes() == grads[1].tobytes()


def test_constant_indices_out_of_range_are_refused_at_declaration():
    g = lc.Graph("oob")
    x = g.input("x", (4, 3))
    with pytest.raises(ValueError, match=r"gather: indices \[0, 4\] out of range for axis 0 of size 4"):
        lc.gather(x, [0, 4])
    with pytest.raises(TypeError, match="integers"):
        lc.gather(x, [0.5])


def test_fed_indices_out_of_range_are_refused_at_the_feed_naming_the_input_value_and_range():
    g = lc.Graph("fed")
    x = g.input("x", (4, 3))
    i = g.input("i", (2,), dtype="int32")
    g.output("y", lc.gather(x, i, axis=0, name="lookup"))
    prog = lc.compile(g)
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(prog.run({"x": X, "i": np.array([-1, 2], np.int32)})["y"], X[[3, 2]])
    for bad, v in (([1, 4], 4), ([-5, 0], -5)):
        with pytest.raises(ValueError, match=rf"feed 'i': indices must be in \[-4, 4\).*got {v} at \({bad.index(v)},\)"):
            prog.run({"x": X, "i": np.array(bad, np.int32)})


def test_computed_indices_out_of_range_stop_the_call_naming_the_node():
    g = lc.Graph("computed")
    x = g.input("x", (4, 3))
    i = g.input("i", (2,), dtype="int64")
    g.output("y", lc.gather(x, i + 1, axis=0, name="lookup"))
    prog = lc.compile(g)
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(prog.run({"x": X, "i": np.array([2, 0])})["y"], X[[3, 1]])
    with pytest.raises(IndexError, match="'lookup'"):
        prog.run({"x": X, "i": np.array([1, 3])})


def test_concat_shape_errors_name_the_op_and_shapes():
    g = lc.Graph("bad")
    a, b = g.input("a", (2, 3)), g.input("b", (3, 3))
    with pytest.raises(ValueError, match=r"concat: shapes \(2, 3\) and \(3, 3\) differ outside axis 1"):
        lc.concat([a, b], axis=1)


def test_imported_concat_and_gather_of_live_tensors_match_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper
    idx = numpy_helper.from_array(np.array([4, 0, -2], np.int64), "idx")
    nodes = [helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Concat", ["ra", "b"], ["c"], axis=1),
             helper.make_node("Gather", ["c", "idx"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "cg", [helper.make_tensor_value_info("a", TensorProto.FLOAT, (2, 3)),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, (2, 2))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 3))], [idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"a": np.array([[1, -2, np.inf], [4, 5, -6]], np.float32), "b": np.ones((2, 2), np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    prog = lc.compile(lc.import_onnx(model))
    ops = {r["op"] for r in prog.instructions("run")}
    assert "gemm" not in ops and {"concat", "gather"} <= ops
    np.testing.assert_array_equal(prog.run(feeds)["y"], want)
