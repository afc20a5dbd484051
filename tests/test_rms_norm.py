"""RMSNorm as one fused kernel forward (y, rstd) and one backward (dx, dscale): ``lc.rms_norm``, ONNX
RMSNormalization, and the decomposed form exporters write for T5 / Llama layers (Pow 2 -> ReduceMean ->
Add eps -> Sqrt -> Reciprocal -> Mul -> Mul weight), recognised by ``patterns.recognize``.

Oracles: PyTorch's ``F.rms_norm`` and autograd, float64 central differences, ONNX Runtime, and modules
exported by ``torch.onnx.export`` (both exporters)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import format as F
from libml_runtime import planfile as PF

torch.set_num_threads(1)


def _graph(shape, axis, dtype, seed=0, rstd_loss=False):
    rng = np.random.default_rng(seed)
    g = lc.Graph("rms")
    x = g.param("x", (rng.standard_normal(shape) * 2 + 0.3).astype(dtype))
    w = g.param("w", rng.standard_normal(shape[axis:]).astype(dtype))
    y, rstd = lc.rms_norm(x, w, axis=axis, eps=1e-5, return_rstd=True)
    loss = lc.mean(y * y * lc.sigmoid(y))
    if rstd_loss:
        loss = loss + lc.sum(rstd * g.const(rng.uniform(0.5, 1.5, rstd.shape).astype(dtype)))
    g.output("y", y)
    g.output("rstd", rstd)
    g.output("loss", loss)
    return g, loss


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((8, 32), 1), ((4, 3, 20), -1), ((2, 3, 4, 5), 2), ((6, 1), 1),
                                        ((5, 37), 1)])
def test_rms_norm_forward_and_gradients_match_pytorch(shape, axis, dtype, tol):
    g, loss = _graph(shape, axis, dtype)
    prog = lc.compile(g, loss)
    assert [r["op"] for r in prog.instructions("run")][0] == "rms_norm"
    x, w = (torch.tensor(g.params[k].value, requires_grad=True) for k in ("x", "w"))
    ax = axis % len(shape)
    y = TF.rms_norm(x, tuple(shape[ax:]), w, eps=1e-5)
    (y * y * torch.sigmoid(y)).mean().backward()
    np.testing.assert_allclose(prog.run({})["y"], y.detach().numpy(), rtol=tol, atol=tol)
    grads = prog.grad({})
    np.testing.assert_allclose(grads["x"], x.grad.numpy(), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(grads["w"], w.grad.numpy(), rtol=tol * 10, atol=tol * 10)


def test_gradients_through_y_and_rstd_match_central_differences():
    g, loss = _graph((3, 7), 1, np.float64, seed=2, rstd_loss=True)
    prog = lc.compile(g, loss)
    grads = prog.grad({})
    x0 = g.params["x"].value.copy()
    h = 1e-6
    num = np.zeros_like(x0)
    for i in np.ndindex(x0.shape):
        vals = []
        for s in (1, -1):
            xv = x0.copy()
            xv[i] += s * h
            g2, l2 = _graph((3, 7), 1, np.float64, seed=2, rstd_loss=True)
            g2.params["x"].value[...] = xv
            vals.append(lc.compile(g2).run({})["loss"])
        num[i] = (vals[0] - vals[1]) / (2 * h)
    np.testing.assert_allclose(grads["x"], num, rtol=1e-6, atol=1e-8)


def test_rms_norm_is_bit_identical_for_one_and_two_threads():
    res = []
    for nt in (1, 2):
        g, loss = _graph((64, 300), 1, np.float32, seed=4)
        prog = lc.compile(g, loss, num_threads=nt)
        res.append((prog.run({})["y"], prog.grad({})))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for k in res[0][1]:
        np.testing.assert_array_equal(res[0][1][k], res[1][1][k])


@pytest.mark.parametrize("form", ["reciprocal_sqrt", "pow", "div", "weight_first"])
def test_decomposed_rms_norm_compiles_to_the_fused_kernels(form):
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((6, 16)).astype(np.float32)
    wv = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    g = lc.Graph("d")
    x = g.input("x", (6, 16))
    w = g.param("w", wv)
    ms = lc.mean(x * x, axis=-1, keepdims=True) + 1e-6
    xn = {"reciprocal_sqrt": lambda: x * lc.reciprocal(lc.sqrt(ms)), "pow": lambda: x * lc.pow(ms, -0.5),
          "div": lambda: x / lc.sqrt(ms), "weight_first": lambda: lc.reciprocal(lc.sqrt(ms)) * x}[form]()
    y = w * xn if form == "weight_first" else xn * w
    g.output("y", y)
    loss = lc.sum(y * y)
    prog = lc.compile(g, loss)
    ops = [r["op"] for r in prog.instructions("grad")]
    assert ops[0] == "rms_norm" and "rms_norm_grad" in ops, ops
    want = TF.rms_norm(torch.tensor(xv), (16,), torch.tensor(wv), eps=1e-6).numpy()
    np.testing.assert_allclose(prog.run({"x": xv})["y"], want, rtol=1e-5, atol=1e-6)


class _Llama(torch.nn.Module):
    """The Hugging Face Llama / T5 RMSNorm as written in their modelling code, between two Linears."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 32)
        self.weight = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.fc2 = torch.nn.Linear(32, 5)

    def forward(self, x):
        h = self.fc1(x)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + 1e-6)
        return self.fc2(self.weight * h)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_exported_llama_rms_norm_imports_fused_and_matches_torch(dynamo):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    mod = _Llama()
    x = torch.randn(8, 12)
    f = io.BytesIO()
    kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
    torch.onnx.export(mod.eval(), (x,), f, input_names=["x"], output_names=["y"], opset_version=18, **kw)
    model = f.getvalue()
    want = ort.InferenceSession(model).run(None, {"x": x.numpy()})[0]
    g = lc.import_onnx(model)
    y = g.outputs["y"]
    R = np.random.default_rng(0).uniform(0.5, 1.5, y.shape).astype(np.float32)
    loss = lc.sum(y * g.const(R))
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss)
    np.testing.assert_allclose(prog.run({"x": x.numpy()})["y"], want, rtol=1e-4, atol=1e-5)
    ops = [r["op"] for r in prog.instructions("grad")]
    assert "rms_norm" in ops and "rms_norm_grad" in ops, ops
    grads = prog.grad({"x": x.numpy()})
    (mod(x) * torch.tensor(R)).sum().backward()
    for tn, p in mod.named_parameters():
        hits = [n for n in grads if np.asarray(g.params[n].value).shape in (p.shape, p.shape[::-1])
                and (np.array_equal(g.params[n].value, p.detach().numpy())
                     or np.array_equal(np.asarray(g.params[n].value).T, p.detach().numpy()))]
        assert len(hits) == 1, (tn, sorted(grads))
        gr = grads[hits[0]]
        np.testing.assert_allclose(gr if gr.shape == p.shape else gr.T, p.grad.numpy(), rtol=2e-4, atol=2e-5,
                                   err_msg=tn)


def test_onnx_rms_normalization_node_matches_onnxruntime_and_reference():
    import onnx
    from onnx import helper, TensorProto
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(1)
    xv = rng.standard_normal((2, 3, 10)).astype(np.float32)
    sv = rng.uniform(0.5, 1.5, (3, 10)).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=1, epsilon=1e-4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xv.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, xv.shape)],
                              [onnx.numpy_helper.from_array(sv, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    want = ReferenceEvaluator(model).run(None, {"x": xv})[0]
    got = lc.compile(lc.import_onnx(model.SerializeToString())).run({"x": xv})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_declaration_errors_name_the_op_and_shapes():
    g = lc.Graph("e")
    x = g.input("x", (4, 6))
    with pytest.raises(ValueError, match=r"rms_norm: scale .* \(5,\) does not broadcast .* \(6,\)"):
        lc.rms_norm(x, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="rms_norm: axis 2 is out of range"):
        lc.rms_norm(x, axis=2)
    with pytest.raises(TypeError, match="rms_norm: needs a floating tensor"):
        lc.rms_norm(g.input("i", (3,), "int64"))


def test_plan_validator_refuses_an_rms_norm_reading_outside_its_buffer():
    g, loss = _graph((8, 32), 1, np.float32)
    plan = lc.compile(g, loss).plan
    p = PF.loads(PF.dumps(plan))
    code = p.entries["run"].code
    for pc, op, _, val in F.instructions(code):
        if op == "rms_norm":
            code[F.locate(code, pc)[1]["n"]] = 1 << 20
            break
    else:
        raise AssertionError("no rms_norm instruction")
    with pytest.raises(lr.PlanError, match="outside"):
        lr.validate(p)
