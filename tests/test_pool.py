"""Pooling (ops_pool.py; runtime opcodes 51-54, format 2.3): MaxPool with its indices and AveragePool, 1-D and
2-D, forward and gradients, and LeNet-5 exported by PyTorch.

Oracles: PyTorch's ``F.max_pool1d/2d`` (values, indices) and ``F.avg_pool1d/2d`` with autograd, float64
central differences, ONNX Runtime.  (The official ONNX MaxPool / AveragePool node cases run in
test_onnx_conformance.)"""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as TF

import libml_compile as lc

torch.set_num_threads(1)

#: (x shape, kernel, stride, padding, dilation, ceil_mode): PyTorch's arguments
MAX_CASES = {
    "2x2": ((2, 3, 8, 8), 2, 2, 0, 1, False),
    "3x3_s2_p1": ((2, 3, 9, 7), 3, 2, 1, 1, False),
    "rect_mixed": ((2, 2, 11, 10), (3, 2), (2, 1), (1, 0), (1, 2), False),
    "dilated": ((1, 2, 10, 10), 3, 1, 1, 2, False),
    "ceil": ((2, 3, 8, 9), 3, 2, 0, 1, True),
    "ceil_pad": ((2, 2, 7, 7), 3, 2, 1, 1, True),
    "overlapping": ((2, 2, 6, 6), 3, 1, 0, 1, False),
    "1d": ((2, 3, 15), 3, 2, 1, 1, False),
    "1d_ceil": ((2, 3, 10), 4, 3, 0, 1, True),
}
#: (x shape, kernel, stride, padding, ceil_mode, count_include_pad)
AVG_CASES = {
    "2x2": ((2, 3, 8, 8), 2, 2, 0, False, False),
    "3x3_s2_p1_exclude": ((2, 3, 9, 7), 3, 2, 1, False, False),
    "3x3_s2_p1_include": ((2, 3, 9, 7), 3, 2, 1, False, True),
    "rect": ((2, 2, 11, 10), (3, 2), (2, 1), (1, 0), False, True),
    "ceil_include": ((2, 3, 8, 9), 3, 2, 1, True, True),
    "ceil_exclude": ((2, 3, 8, 9), 3, 2, 1, True, False),
    "1d": ((2, 3, 15), 3, 2, 1, False, True),
}


def _close(got, want, rtol, what):
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


def _program(x, build, dtype, nt=None):
    g = lc.Graph("pool")
    xp = g.param("x", x)
    outs = build(xp)
    y = outs[0] if isinstance(outs, tuple) else outs
    R = np.random.default_rng(1).uniform(-1, 1, y.shape).astype(dtype)
    loss = lc.sum(y * g.const(R))
    g.output("y", y)
    if isinstance(outs, tuple):
        g.output("idx", outs[1])
    return lc.compile(g, loss=loss, num_threads=nt), R


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(MAX_CASES))
def test_max_pool_values_indices_and_gradient_match_pytorch(name, dtype):
    xs, k, s, p, d, ceil = MAX_CASES[name]
    x = np.random.default_rng(0).standard_normal(xs).astype(dtype)
    prog, R = _program(x, lambda t: lc.max_pool(t, k, strides=s, pads=p, dilations=d, ceil_mode=ceil,
                                                return_indices=True), dtype)
    X = torch.tensor(x, requires_grad=True)
    f = TF.max_pool1d if x.ndim == 3 else TF.max_pool2d
    Y, I = f(X, k, s, p, d, ceil_mode=ceil, return_indices=True)
    (Y * torch.tensor(R)).sum().backward()
    out = prog.run({})
    np.testing.assert_array_equal(out["y"], Y.detach().numpy())
    plane = np.arange(xs[0] * xs[1]).reshape(xs[0], xs[1], *([1] * (x.ndim - 2))) * int(np.prod(xs[2:]))
    np.testing.assert_array_equal(out["idx"] - plane, I.numpy())  # ONNX indices are flat over the tensor
    _close(prog.grad({})["x"], X.grad.numpy(), 1e-6 if dtype == np.float32 else 1e-15, f"{name} dx")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(AVG_CASES))
def test_avg_pool_and_gradient_match_pytorch(name, dtype):
    xs, k, s, p, ceil, inc = AVG_CASES[name]
    x = np.random.default_rng(0).standard_normal(xs).astype(dtype)
    prog, R = _program(x, lambda t: lc.avg_pool(t, k, strides=s, pads=p, ceil_mode=ceil, count_include_pad=inc),
                       dtype)
    X = torch.tensor(x, requires_grad=True)
    f = TF.avg_pool1d if x.ndim == 3 else TF.avg_pool2d
    Y = f(X, k, s, p, ceil_mode=ceil, count_include_pad=inc)
    (Y * torch.tensor(R)).sum().backward()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    _close(prog.run({})["y"], Y.detach().numpy(), tol, f"{name} forward")
    _close(prog.grad({})["x"], X.grad.numpy(), tol, f"{name} dx")


def test_max_pool_propagates_nan_and_takes_the_first_of_equal_maxima():
    x = np.array([[[[1, 3, 3, 0], [np.nan, 2, 3, 3], [0, 0, 5, 5], [0, 0, 5, 5]]]], np.float32)
    prog, _ = _program(x, lambda t: lc.max_pool(t, 2, return_indices=True), np.float32)
    out = prog.run({})
    Y, I = TF.max_pool2d(torch.tensor(x), 2, return_indices=True)
    np.testing.assert_array_equal(out["y"], Y.numpy())
    np.testing.assert_array_equal(out["idx"], I.numpy())


def test_float64_central_differences_of_both_pools():
    rng = np.random.default_rng(4)
    x = rng.permutation(70).reshape(1, 2, 5, 7) * 0.1  # distinct values: no ties at the max
    for build in (lambda t: lc.max_pool(t, (2, 3), strides=(2, 1), pads=(1, 0, 0, 1)),
                  lambda t: lc.avg_pool(t, (3, 2), strides=(1, 2), pads=1, count_include_pad=True)):
        prog, R = _program(x, build, np.float64)
        g = prog.grad({})["x"]
        fd = np.zeros_like(x)
        h = 1e-6
        for i in np.ndindex(x.shape):
            vals = []
            for sgn in (1, -1):
                xx = x.copy()
                xx[i] += sgn * h
                p2, _ = _program(xx, build, np.float64)
                vals.append(float((p2.run({})["y"] * R).sum()))
            fd[i] = (vals[0] - vals[1]) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_results_are_bit_identical_for_1_and_2_threads(pool):
    x = np.random.default_rng(2).standard_normal((16, 32, 40, 40)).astype(np.float32)
    build = (lambda t: lc.max_pool(t, 3, strides=2, pads=1)) if pool == "max" else \
        (lambda t: lc.avg_pool(t, 3, strides=2, pads=1, count_include_pad=True))
    res = []
    for nt in (1, 2):
        prog, _ = _program(x, build, np.float32, nt)
        res.append((prog.run({})["y"], prog.grad({})["x"]))
    assert res[0][0].tobytes() == res[1][0].tobytes()
    assert res[0][1].tobytes() == res[1][1].tobytes()


def test_bad_pool_arguments_are_refused_at_declaration():
    g = lc.Graph("bad")
    x = g.input("x", (1, 3, 4, 8))
    with pytest.raises(ValueError, match=r"max_pool: kernel \(5, 5\).*larger than the padded input along spatial "
                                         r"axis 0 of 'x' \(1, 3, 4, 8\): 5 > 4 \+ pads 0 \+ 0"):
        lc.max_pool(x, 5)
    with pytest.raises(ValueError, match=r"avg_pool: input 'y' has shape \(3, 8\)"):
        lc.avg_pool(g.input("y", (3, 8)), 2)
    with pytest.raises(ValueError, match=r"max_pool: kernel_shape \(2, 0\) must be 2 integer"):
        lc.max_pool(x, (2, 0))
    with pytest.raises(ValueError, match=r"max_pool: auto_pad 'SAME'"):
        lc.max_pool(x, 2, auto_pad="SAME")


class LeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = torch.nn.Conv2d(6, 16, 5)
        self.f1 = torch.nn.Linear(16 * 5 * 5, 120)
        self.f2 = torch.nn.Linear(120, 10)

    def forward(self, x):
        h = TF.max_pool2d(torch.relu(self.c1(x)), 2)
        h = TF.max_pool2d(torch.relu(self.c2(h)), 2)
        return self.f2(torch.relu(self.f1(torch.flatten(h, 1))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_lenet5_exported_by_pytorch_runs_and_gets_pytorchs_gradients(dynamo):
    torch.manual_seed(0)
    net = LeNet5()
    x = torch.randn(8, 1, 28, 28)
    labels = np.random.default_rng(0).integers(0, 10, 8)
    f = io.BytesIO()
    kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False, "opset_version": 17}
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["logits"], **kw)
    m = onnx.load_from_string(f.getvalue())
    assert {"Conv", "MaxPool", "Relu", "Gemm"} <= {n.op_type for n in m.graph.node}
    g = lc.import_onnx(m)
    assert len(g.params) == len(list(net.parameters()))
    loss = lc.softmax_cross_entropy(g.outputs["logits"], g.input("labels", (8,), dtype="int64"))
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.05))
    feeds = {"x": x.numpy(), "labels": labels}
    ort_logits = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(prog.run(feeds)["logits"], ort_logits, rtol=1e-4, atol=1e-5)
    TF.cross_entropy(net(x), torch.tensor(labels)).backward()
    grads = prog.grad(feeds)
    for name, p in net.named_parameters():
        _close(grads[name], p.grad.numpy(), 1e-3, f"d {name}")
