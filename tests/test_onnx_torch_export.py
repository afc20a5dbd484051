"""A ``torch.onnx.export``ed module of the elementwise activations, imported into libml.

The module (exported with ``dynamo=True`` and with the TorchScript exporter, ``dynamo=False``) chains
Linear layers with nn.GELU (both approximations), nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus
and torch.clamp.  After ``import_onnx``: the forward outputs match onnxruntime on the same file, and after
``lc.compile`` with a loss the parameter gradients match torch autograd on the original module.
"""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import libml_compile as lc  # noqa: E402
from libml_compile.onnx_import import import_onnx  # noqa: E402

B, D = 5, 6


class Acts(torch.nn.Module):
    def __init__(self, softplus=True):
        super().__init__()
        self.l1 = torch.nn.Linear(D, D)
        self.l2 = torch.nn.Linear(D, D)
        self.l3 = torch.nn.Linear(D, 3)
        acts = [torch.nn.GELU(), torch.nn.GELU(approximate="tanh"), torch.nn.Hardswish(), torch.nn.LeakyReLU(0.2),
                torch.nn.ELU(alpha=0.7), torch.nn.Mish()]
        self.acts = torch.nn.ModuleList(acts + ([torch.nn.Softplus()] if softplus else []))

    def forward(self, x):
        h = self.l1(x)
        # every activation sees the same pre-activation; their sum feeds the next layer
        a = sum(act(h) for act in self.acts)
        h2 = self.l2(torch.clamp(a, -1.5, 2.0))
        return self.l3(torch.nn.functional.gelu(h2) + torch.clamp(h2, min=-0.5))


def _export(module, x, dynamo):
    f = io.BytesIO()
    kw = {"dynamo": dynamo}
    if dynamo:
        kw["external_data"] = False
    torch.onnx.export(module.eval(), (x,), f, input_names=["x"], output_names=["y"], opset_version=20, **kw)
    return onnx.load_model_from_string(f.getvalue())


# nn.Softplus has a threshold (x > 20: x), which the dynamo exporter writes as Where(Greater(x, 20), x,
# Softplus(x)): that variant needs the comparison/Where handlers (the logic family) and is checked to be
# refused, naming Greater, until libml imports them
@pytest.mark.parametrize("dynamo,softplus", [(True, False), (True, True), (False, True)],
                         ids=["dynamo", "dynamo-softplus", "torchscript"])
def test_torch_exported_activations_forward_and_gradients(dynamo, softplus):
    from libml_compile.onnx_import import SUPPORTED_OPS, UnsupportedOperatorError
    torch.manual_seed(0)
    mod = Acts(softplus).double()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, D)) * 2.0
    if dynamo and softplus and not {"Greater", "Where"} <= set(SUPPORTED_OPS):
        m = _export(mod, torch.tensor(x), dynamo)
        assert {"Greater", "Where", "Softplus"} <= {n.op_type for n in m.graph.node}
        with pytest.raises(UnsupportedOperatorError, match="Greater"):
            import_onnx(m, shapes={"x": (B, D)})
        return

    # forward, float32 (onnxruntime has no float64 LeakyRelu): libml against onnxruntime on the same file
    m32 = _export(_copy(mod).float(), torch.tensor(x, dtype=torch.float32), dynamo)
    ops = {n.op_type for n in m32.graph.node}
    # the exporters map these activations onto their ONNX operators (TorchScript writes Mish as
    # x * tanh(softplus(x)))
    want_ops = {"Gelu", "HardSwish", "LeakyRelu", "Elu", "Clip"} | ({"Mish"} if dynamo else {"Softplus", "Tanh"})
    assert want_ops <= ops, ops
    g32 = import_onnx(m32, shapes={"x": (B, D)})
    sess = ort.InferenceSession(m32.SerializeToString(), providers=["CPUExecutionProvider"])
    x32 = x.astype(np.float32)
    (want,) = sess.run(["y"], {"x": x32})
    got = lc.compile(g32).run({"x": x32})["y"]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

    # gradients, float64: of 0.5 * sum((y - t)^2) w.r.t. every parameter, against torch autograd
    m64 = _export(mod, torch.tensor(x), dynamo)
    g = import_onnx(m64, shapes={"x": (B, D)})
    t = rng.standard_normal((B, 3))
    # ONNX float attributes are float32 (LeakyRelu's 0.2, Elu's 0.7): ~1e-8 relative from torch's doubles
    np.testing.assert_allclose(lc.compile(g).run({"x": x})["y"], mod(torch.tensor(x)).detach().numpy(),
                               rtol=1e-6, atol=1e-9)
    target = g.input("target", (B, 3), dtype="float64")
    d = lc.sub(g.tensor("y"), target)
    loss = lc.mul(lc.sum(lc.mul(d, d)), 0.5)
    g.output("loss", loss)
    grads = lc.compile(g, loss=loss).grad({"x": x, "target": t})

    mod.zero_grad()
    y = mod(torch.tensor(x))
    (0.5 * ((y - torch.tensor(t)) ** 2).sum()).backward()
    torch_params = [(p.detach().numpy(), p.grad.numpy()) for _, p in mod.named_parameters()]
    assert set(grads) == set(g.params)
    # the dynamo exporter stores torch.clamp's bounds as float initializers, which libml imports as
    # (scalar) params like every float initializer; the rest are the Linear layers' weights and biases
    weights = [n for n in grads if np.asarray(g.params[n].value).ndim > 0]
    assert len(weights) == len(torch_params), sorted(grads)
    # match libml's params (named by the exporter) to torch's by value (each param's data is unique); the
    # TorchScript exporter may store a Linear weight transposed (MatMul instead of Gemm transB)
    for pname in weights:
        gval = grads[pname]
        data = np.asarray(g.params[pname].value)
        hits = [(v, gr) for v, gr in torch_params if v.shape == data.shape and np.array_equal(v, data)]
        hits += [(v.T, gr.T) for v, gr in torch_params if v.ndim == 2 and v.T.shape == data.shape
                 and np.array_equal(v.T, data)]
        assert len(hits) == 1, (pname, data.shape)
        np.testing.assert_allclose(gval, hits[0][1], rtol=1e-6, atol=1e-9, err_msg=pname)


def _copy(mod):
    import copy
    return copy.deepcopy(mod)
