"""LayerNorm, the first operator with several outputs (y, mean, rstd), and what multi-output nodes need
from the IR, autodiff, simplify, lowering and memory planning.

Oracles: PyTorch's ``F.layer_norm`` and autograd, float64 central differences, ONNX Runtime, and models
exported by ``torch.onnx.export`` (both exporters)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import libml_compile as lc
from libml_compile import ops
from libml_runtime import format as FMT

torch.set_num_threads(1)


def _graph(shape, axis, dtype=np.float32, seed=0, stats_loss=False):
    """loss = mean(y^2 * sigmoid(y)) [+ sum(mean * R1) + sum(rstd * R2)] for y, mean, rstd = layer_norm(x)."""
    rng = np.random.default_rng(seed)
    norm = shape[axis:]
    g = lc.Graph("ln")
    x = g.param("x", (rng.standard_normal(shape) * 2 + 0.5).astype(dtype))
    w = g.param("w", rng.standard_normal(norm).astype(dtype))
    b = g.param("b", rng.standard_normal(norm).astype(dtype))
    y, mean, rstd = lc.layer_norm(x, w, b, axis=axis, eps=1e-5, return_stats=True)
    loss = lc.mean(y * y * lc.sigmoid(y))
    if stats_loss:
        r1 = rng.uniform(0.5, 1.5, mean.shape).astype(dtype)
        r2 = rng.uniform(0.5, 1.5, rstd.shape).astype(dtype)
        loss = loss + lc.sum(mean * g.const(r1)) + lc.sum(rstd * g.const(r2))
    g.output("y", y)
    g.output("mean", mean)
    g.output("rstd", rstd)
    g.output("loss", loss)
    return g, loss


def _torch(g, axis, stats_loss=False):
    x, w, b = (torch.tensor(g.params[k].value, requires_grad=True) for k in ("x", "w", "b"))
    norm = tuple(x.shape[axis:])
    y = TF.layer_norm(x, norm, w, b, eps=1e-5)
    dims = tuple(range(axis, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    rstd = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + 1e-5)
    loss = (y * y * torch.sigmoid(y)).mean()
    return x, w, b, y, mean, rstd, loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,axis", [((8, 32), 1), ((4, 3, 20), 1), ((4, 3, 20), -1), ((2, 3, 4, 5), 2),
                                        ((6, 1), 1), ((5, 37), 1)])
def test_layer_norm_forward_and_gradients_match_pytorch(shape, axis, dtype):
    g, loss = _graph(shape, axis, dtype)
    prog = lc.compile(g, loss=loss)
    out = prog.run({})
    grads = prog.grad({})
    x, w, b, y, mean, rstd, tl = _torch(g, axis % len(shape))
    tl.backward()
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(out["y"], y.detach().numpy(), **tol)
    np.testing.assert_allclose(out["mean"], mean.detach().numpy(), **tol)
    np.testing.assert_allclose(out["rstd"], rstd.detach().numpy(), **tol)
    for k, t in (("x", x), ("w", w), ("b", b)):
        np.testing.assert_allclose(grads[k], t.grad.numpy(), **tol, err_msg=f"d loss / d {k}")


def test_gradients_through_the_mean_and_rstd_outputs_match_central_differences():
    """A loss reading all three outputs: the rule gets one gradient per output (float64 differences)."""
    shape, axis = (3, 4, 5), 1
    g, loss = _graph(shape, axis, np.float64, seed=3, stats_loss=True)
    grads = lc.compile(g, loss=loss).grad({})
    ref = ops.REGISTRY["layer_norm"].ref
    rng = np.random.default_rng(3)
    arrays = {k: g.params[k].value.copy() for k in ("x", "w", "b")}
    rng.standard_normal(shape), rng.standard_normal(shape[axis:]), rng.standard_normal(shape[axis:])
    r1 = rng.uniform(0.5, 1.5, (3, 1, 1))
    r2 = rng.uniform(0.5, 1.5, (3, 1, 1))

    def f(a):
        y, m, r = ref({"axis": axis, "eps": 1e-5}, a["x"], a["w"], a["b"])
        return float(np.mean(y * y / (1 + np.exp(-y))) + np.sum(m * r1) + np.sum(r * r2))
    for k in ("x", "w", "b"):
        fd = np.zeros(arrays[k].shape)
        for i in np.ndindex(arrays[k].shape):
            vals = []
            for s in (1e-6, -1e-6):
                a = {n: v.copy() for n, v in arrays.items()}
                a[k][i] += s
                vals.append(f(a))
            fd[i] = (vals[0] - vals[1]) / 2e-6
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-8, err_msg=f"d loss / d {k}")


def test_layer_norm_is_bit_identical_for_one_and_two_threads():
    g, loss = _graph((512, 768), 1, np.float32, seed=1)
    res = []
    for nt in (1, 2):
        prog = lc.compile(g, loss=loss, num_threads=nt)
        res.append((prog.run({}), prog.grad({})))
    for k in ("y", "mean", "rstd"):
        assert res[0][0][k].tobytes() == res[1][0][k].tobytes(), k
    for k in ("x", "w", "b"):
        assert res[0][1][k].tobytes() == res[1][1][k].tobytes(), k


def test_the_backward_reads_the_saved_statistics_instead_of_recomputing_them():
    g, loss = _graph((8, 16), 1)
    code = lc.compile(g, loss=loss).plan.entries["grad"].code
    names = [name for _, name, _, _ in FMT.instructions(code)]
    assert names.count("layer_norm") == 1 and names.count("layer_norm_grad") == 1, names


def test_multi_output_node_ir():
    g = lc.Graph("mo")
    x = g.input("x", (4, 6))
    y, mean, rstd = lc.layer_norm(x, return_stats=True, name=["y", "m", "r"])
    assert (y.name, mean.name, rstd.name) == ("y", "m", "r")
    assert mean.op == "output" and mean.attrs == {"index": 1} and mean.inputs == (y,)
    assert mean.shape == (4, 1) and rstd.shape == (4, 1) and y.shape == (4, 6)
    assert ops.output(y, 1) is mean and ops.output(y, 2) is rstd and ops.output(y, 0) is y
    assert [s for s, _ in ops.out_specs(y)] == [(4, 6), (4, 1), (4, 1)]
    with pytest.raises(ValueError, match="has 3 output.*index 3"):
        ops.output(y, 3)
    with pytest.raises(ValueError, match="already named 'm'"):
        ops.output(y, 1, name="other")


def test_unused_outputs_are_written_to_scratch_and_a_lone_statistic_can_be_an_output():
    """Only rstd is a graph output: the kernel still writes y and mean (scratch), the values are right."""
    rng = np.random.default_rng(5)
    xv = rng.standard_normal((6, 10)).astype(np.float32)
    g = lc.Graph("lone")
    x = g.input("x", (6, 10))
    _, _, rstd = lc.layer_norm(x, return_stats=True)
    g.output("rstd", rstd)
    got = lc.compile(g).run({"x": xv})["rstd"]
    want = 1 / np.sqrt(xv.astype(np.float64).var(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_constant_layer_norm_folds_every_output():
    rng = np.random.default_rng(6)
    xv = rng.standard_normal((3, 7))
    g = lc.Graph("fold")
    inp = g.input("z", (3, 1), dtype="float64")
    y, mean, rstd = lc.layer_norm(g.const(xv), return_stats=True)
    g.output("out", y * inp + mean + rstd)
    prog = lc.compile(g)
    assert "layer_norm" not in prog.summary()  # folded at compile time, through the reference
    zv = rng.standard_normal((3, 1))
    m = xv.mean(axis=1, keepdims=True)
    r = 1 / np.sqrt(xv.var(axis=1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(prog.run({"z": zv})["out"], (xv - m) * r * zv + m + r, rtol=1e-12)


def test_declaration_errors_name_the_op_and_shapes():
    g = lc.Graph("bad")
    x = g.input("x", (4, 6))
    with pytest.raises(ValueError, match="layer_norm: axis 2 is out of range"):
        lc.layer_norm(x, axis=2)
    with pytest.raises(ValueError, match=r"scale .* \(5,\) does not broadcast to the normalised shape \(6,\)"):
        lc.layer_norm(x, np.ones(5, np.float32))
    with pytest.raises(TypeError, match="floating"):
        lc.layer_norm(g.input("i", (4, 6), dtype="int32"))
    with pytest.raises(ValueError, match="empty"):
        lc.layer_norm(g.input("e", (4, 0)))


def test_plan_validator_refuses_a_layer_norm_reading_outside_its_buffer():
    import libml_runtime as lr
    from libml_runtime import planfile as PF
    g, loss = _graph((8, 16), 1)
    plan = lc.compile(g, loss=loss).plan
    p = PF.loads(PF.dumps(plan))
    code = p.entries["run"].code
    (pc,) = [pc for pc, name, _, _ in FMT.instructions(code) if name == "layer_norm"]
    where = FMT.locate(code, pc)[1]
    code[where["n"]] *= 1000
    with pytest.raises(lr.PlanError, match=r"instruction 0 .*x spans bytes"):
        lr.validate(p)


# ---------------------------------------------------------------------------------------------------
# ONNX: the official node cases run in the conformance suite; here, models as exporters write them

class _LnMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 32)
        self.ln = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(TF.gelu(self.ln(self.fc1(x))))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_exported_layernorm_gelu_mlp_forward_and_gradients(dynamo):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    mod = _LnMlp()
    with torch.no_grad():  # non-trivial LayerNorm params (PyTorch initialises them to ones and zeros)
        mod.ln.weight.uniform_(0.5, 1.5)
        mod.ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(8, 12)
    f = io.BytesIO()
    kw = {"dynamo": True} if dynamo else {"dynamo": False}
    torch.onnx.export(mod.eval(), (x,), f, input_names=["x"], output_names=["y"], opset_version=20, **kw)
    model = f.getvalue()
    want = ort.InferenceSession(model).run(None, {"x": x.numpy()})[0]
    g = lc.import_onnx(model)
    assert "layer_norm" in {t.op for t in g.nodes}, "LayerNormalization was not imported as one node"
    y = g.outputs["y"]
    got = lc.compile(g).run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # gradients of sum(y * R) against PyTorch autograd, for every param
    R = np.random.default_rng(0).uniform(0.5, 1.5, y.shape).astype(np.float32)
    loss = lc.sum(y * g.const(R))
    g.output("loss", loss)
    grads = lc.compile(g, loss=loss).grad({"x": x.numpy()})
    out = mod(x)
    (out * torch.tensor(R)).sum().backward()
    torch_params = [(p.detach().numpy(), p.grad.numpy()) for _, p in mod.named_parameters()]
    # (the dynamo exporter stores constants such as GELU's 0.5 as scalar initializers: params too)
    weights = [n for n in grads if np.asarray(g.params[n].value).ndim > 0]
    assert len(weights) == len(torch_params), sorted(grads)
    for pname in weights:  # matched by value (each param's data is unique); a Linear weight may be transposed
        data = np.asarray(g.params[pname].value)
        hits = [gr for v, gr in torch_params if v.shape == data.shape and np.array_equal(v, data)]
        hits += [gr.T for v, gr in torch_params if v.ndim == 2 and v.T.shape == data.shape and np.array_equal(v.T, data)]
        assert len(hits) == 1, (pname, data.shape)
        np.testing.assert_allclose(grads[pname], hits[0], rtol=2e-4, atol=2e-5, err_msg=pname)
