"""Shape glue on live tensors, forward and backward: Tile, Pad (constant/reflect/edge/wrap, negative pads),
Slice with steps, ScatterND / ScatterElements with constant indices.  Forward against NumPy and the
official ONNX node cases (conformance); gradients against float64 central differences."""
from __future__ import annotations

import numpy as np
import pytest

import libml_compile as lc
from libml_compile import ops


def _fd_check(build, ref, shapes, seed=0):
    """Compile sum(build(*xs) * R); forward against ref, gradient of every input against differences."""
    rng = np.random.default_rng(seed)
    vals = [rng.standard_normal(s) for s in shapes]
    g = lc.Graph("glue")
    xs = [g.param(f"p{k}", v) for k, v in enumerate(vals)]
    y = build(*xs)
    R = rng.uniform(0.5, 1.5, y.shape)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    np.testing.assert_allclose(prog.run({})["y"], ref(*vals), rtol=1e-12, atol=1e-12)
    grads = prog.grad({})
    for k, v in enumerate(vals):
        fd = np.zeros(v.shape)
        for i in np.ndindex(v.shape):
            a, b = [w.copy() for w in vals], [w.copy() for w in vals]
            a[k][i] += 1e-6
            b[k][i] -= 1e-6
            fd[i] = (np.sum(ref(*a) * R) - np.sum(ref(*b) * R)) / 2e-6
        np.testing.assert_allclose(grads[f"p{k}"], fd, rtol=1e-6, atol=1e-8, err_msg=f"operand {k}")


def test_tile_forward_and_gradient():
    _fd_check(lambda x: ops.tile(x, (2, 1, 3)), lambda x: np.tile(x, (2, 1, 3)), [(2, 3, 2)])


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_forward_and_gradient(mode):
    pads = [(1, 2), (3, 0)]
    kw = {"constant_values": 0.5} if mode == "constant" else {}
    _fd_check(lambda x: ops.pad(x, pads, mode, 0.5), lambda x: np.pad(x, pads, mode=mode, **kw), [(3, 4)])


def test_strided_and_reversed_slices_forward_and_gradient():
    _fd_check(lambda x: x[::-2, 1:4:2] * 1.0, lambda x: x[::-2, 1:4:2] * 1.0, [(5, 6)])


def _onnx_scatter(op, d, idx, u, **attrs):
    """A one-node model whose data and updates are initializers (so imported as params: gradients)."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node(op, ["d", "i", "u"], ["y"], **attrs)
    gr = helper.make_graph([node], "s", [], [helper.make_tensor_value_info("y", TensorProto.DOUBLE, d.shape)],
                           [numpy_helper.from_array(d, "d"), numpy_helper.from_array(idx, "i"),
                            numpy_helper.from_array(u, "u")])
    return helper.make_model(gr, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("op,idx,upd_shape,attrs", [
    ("ScatterND", np.array([[1], [3], [1]], np.int64), (3, 4), {}),              # the last write wins
    ("ScatterND", np.array([[0, 2], [3, -1]], np.int64), (2,), {"reduction": "add"}),
    ("ScatterElements", np.array([[1, 0, 3, 3]], np.int64), (1, 4), {"axis": 0}),
    ("ScatterElements", np.array([[1, 1], [0, 2]], np.int64), (2, 2), {"axis": 1, "reduction": "add"}),
])
def test_imported_scatter_matches_the_onnx_reference_and_has_gradients(op, idx, upd_shape, attrs):
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(1)
    d, u = rng.standard_normal((4, 4)), rng.standard_normal(upd_shape)

    def ref(dv, uv):
        return ReferenceEvaluator(_onnx_scatter(op, dv, idx, uv, **attrs)).run(None, {})[0]
    # (a graph of initializers only is all constants to the classifier: params= makes d and u trainable)
    g = lc.import_onnx(_onnx_scatter(op, d, idx, u, **attrs), params=["d", "u"])
    assert sorted(g.params) == ["d", "u"]
    y = g.outputs["y"]
    R = rng.uniform(0.5, 1.5, y.shape)
    prog = lc.compile(g, loss=lc.sum(y * g.const(R)))
    np.testing.assert_allclose(prog.run({})["y"], ref(d, u), rtol=1e-12)
    grads = prog.grad({})
    for name, base in (("d", d), ("u", u)):
        fd = np.zeros(base.shape)
        for i in np.ndindex(base.shape):
            a, b = base.copy(), base.copy()
            a[i] += 1e-6
            b[i] -= 1e-6
            fa, fb = (ref(a, u), ref(b, u)) if name == "d" else (ref(d, a), ref(d, b))
            fd[i] = np.sum((fa - fb) * R) / 2e-6
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)
