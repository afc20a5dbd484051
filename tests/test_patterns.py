"""Decomposed GELU and LayerNorm chains compile to the fused ops (patterns.recognize), with the values and
gradients of the chain as written; near misses stay as written."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

import libml_compile as lc

torch.set_num_threads(1)


def _ops(prog, entry="grad"):
    return [r["op"] for r in prog.instructions(entry)] + [m.split(":")[0] for r in prog.instructions(entry)
                                                          for m in r.get("members", ())]


def _check(build, ref, want_op, shape=(6, 10), seed=0):
    """Compile ``build(x)`` as a loss sum(out * R); values and gradient against the NumPy chain ``ref``
    (float64 central differences), and ``want_op`` in the plan (or absent when None)."""
    rng = np.random.default_rng(seed)
    xv = rng.standard_normal(shape) * 2
    R = rng.uniform(0.5, 1.5, shape)
    g = lc.Graph("p")
    x = g.param("x", xv)
    y = build(x)
    g.output("y", y)
    loss = lc.sum(y * g.const(R))
    prog = lc.compile(g, loss=loss)
    np.testing.assert_allclose(prog.run({})["y"], ref(xv), rtol=1e-10, atol=1e-12)
    fd = np.zeros(shape)
    for i in np.ndindex(shape):
        a, b = xv.copy(), xv.copy()
        a[i] += 1e-6
        b[i] -= 1e-6
        fd[i] = (np.sum(ref(a) * R) - np.sum(ref(b) * R)) / 2e-6
    np.testing.assert_allclose(prog.grad({})["x"], fd, rtol=1e-6, atol=1e-7)
    ops = _ops(prog)
    if want_op is None:
        assert not any(o.startswith(("gelu", "layer_norm")) for o in ops), ops
    else:
        assert want_op in ops and "erf" not in ops and "tanh" not in ops and "sqrt" not in ops, ops
    return ops


def _erf(v):
    return np.vectorize(math.erf)(v)


GELU = lambda v: 0.5 * v * (1 + _erf(v / math.sqrt(2)))  # noqa: E731
GELU_TANH = lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731


@pytest.mark.parametrize("form", ["torchscript", "x_half_first", "div_sqrt2", "half_last"])
def test_erf_gelu_chains_become_gelu(form):
    def build(x):
        e = lc.erf(x / math.sqrt(2)) if form in ("torchscript", "div_sqrt2") else lc.erf(x * (1 / math.sqrt(2)))
        if form == "torchscript":
            return (x * (e + 1.0)) * 0.5
        if form == "x_half_first":
            return (x * 0.5) * (1.0 + e)
        if form == "div_sqrt2":
            return 0.5 * (x * (e + 1.0))
        return x * ((e + 1.0) * 0.5)
    _check(build, GELU, "gelu")


def test_tanh_gelu_chain_becomes_gelu_tanh():
    c = math.sqrt(2 / math.pi)
    _check(lambda x: 0.5 * x * (1.0 + lc.tanh(c * (x + 0.044715 * lc.pow(x, 3.0)))), GELU_TANH, "gelu_tanh")
    _check(lambda x: 0.5 * x * (1.0 + lc.tanh((x + (x * x * x) * 0.044715) * c)), GELU_TANH, "gelu_tanh")


def test_a_near_miss_stays_as_written():
    _check(lambda x: (x * (lc.erf(x / 1.5) + 1.0)) * 0.5, lambda v: 0.5 * v * (1 + _erf(v / 1.5)), None)
    _check(lambda x: (x * (lc.erf(x / math.sqrt(2)) + 1.0)) * 0.6,
           lambda v: 0.6 * v * (1 + _erf(v / math.sqrt(2))), None)


@pytest.mark.parametrize("square", ["pow", "mul", "square"])
def test_decomposed_layer_norm_becomes_layer_norm_with_its_scale_and_bias(square):
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal(10), rng.standard_normal(10)

    def build(x):
        g = x.graph
        mu = lc.mean(x, axis=-1, keepdims=True)
        d = x - mu
        sq = {"pow": lambda t: lc.pow(t, 2.0), "mul": lambda t: t * t, "square": lc.square}[square](d)
        var = lc.mean(sq, axis=-1, keepdims=True)
        return d / lc.sqrt(var + 1e-5) * g.const(w) + g.const(b)

    def ref(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b
    ops = _check(build, ref, "layer_norm")
    assert ops.count("layer_norm") == 1, ops


def test_torchscript_opset14_layernorm_gelu_mlp_compiles_to_the_fused_kernels():
    """Opset 14 has no LayerNormalization: the exporter decomposes it, and GELU becomes the Erf form."""
    ort = pytest.importorskip("onnxruntime")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.ln, self.fc = torch.nn.Linear(12, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(torch.nn.functional.gelu(self.ln(self.fc0(x))))
    torch.manual_seed(0)
    mod = M().eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.uniform_(-0.5, 0.5)
    x = torch.randn(8, 12)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (x,), f, input_names=["x"], output_names=["y"], opset_version=14, dynamo=False)
    g = lc.import_onnx(f.getvalue())
    y = g.outputs["y"]
    prog = lc.compile(g, loss=lc.sum(y * y))
    ops = [r["op"] for r in prog.instructions("grad")]
    assert "layer_norm" in ops and "layer_norm_grad" in ops and "gelu" in ops, ops
    np.testing.assert_allclose(prog.run({"x": x.numpy()})["y"],
                               ort.InferenceSession(f.getvalue()).run(None, {"x": x.numpy()})[0], rtol=1e-4, atol=1e-6)
    out = mod(x)
    (out * out).sum().backward()
    grads = prog.grad({"x": x.numpy()})
    np.testing.assert_allclose(grads["fc0.weight"], mod.fc0.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["ln.weight"], mod.ln.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
