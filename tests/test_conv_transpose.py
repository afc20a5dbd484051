"""Transposed convolution (ops_conv_transpose.py: conv_grad_input's kernel, opcode 49, with x as dy): forward
and the gradients of x, w and b, 1-D and 2-D, every attribute, ONNX import (models from both PyTorch exporters
and handmade ones for output_shape / auto_pad), a small autoencoder trained against torch.optim.SGD and its
export.

Oracles: PyTorch's ``F.conv_transpose1d`` / ``F.conv_transpose2d`` and autograd, float64 central differences,
ONNX Runtime."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as TF
from onnx import TensorProto, helper

import libml_compile as lc

torch.set_num_threads(1)

#: (x shape, w shape, stride, padding, output_padding, dilation, groups): PyTorch's arguments
CASES = {
    "2d_3x3": ((2, 3, 5, 5), (3, 4, 3, 3), 1, 0, 0, 1, 1),
    "2d_stride2_pad1_outpad1": ((2, 3, 5, 4), (3, 4, 3, 3), 2, 1, 1, 1, 1),
    "2d_rect_kernel_mixed_attrs": ((2, 4, 5, 6), (4, 3, 3, 2), (2, 1), (1, 0), (1, 0), (1, 2), 2),
    "2d_stride_larger_than_kernel": ((2, 3, 4, 4), (3, 2, 2, 2), 3, 0, 2, 1, 1),
    "2d_depthwise": ((2, 4, 5, 5), (4, 1, 3, 3), 2, 1, 1, 1, 4),
    "2d_depthwise_dilated_outpad": ((2, 3, 4, 5), (3, 1, 3, 3), 1, 1, 1, 2, 3),
    "2d_channel_multiplier": ((2, 3, 4, 4), (3, 2, 3, 3), 2, 0, 0, 1, 3),
    "2d_pointwise": ((2, 6, 4, 5), (6, 3, 1, 1), 1, 0, 0, 1, 1),
    "2d_pointwise_stride2": ((2, 6, 4, 5), (6, 3, 1, 1), 2, 0, 1, 1, 1),
    "2d_several_panels": ((2, 8, 20, 20), (8, 64, 3, 3), 1, 1, 0, 1, 1),
    "1d": ((2, 3, 7), (3, 5, 3), 1, 1, 0, 1, 1),
    "1d_stride2_dilated_grouped": ((2, 4, 9), (4, 3, 4), 2, 3, 1, 2, 2),
    "1d_outpad_below_dilation": ((2, 3, 6), (3, 2, 3), 1, 0, 1, 2, 1),
}


def _torch_ct(x, w, b, stride, padding, output_padding, dilation, groups):
    f = TF.conv_transpose1d if x.ndim == 3 else TF.conv_transpose2d
    return f(x, w, b, stride=stride, padding=padding, output_padding=output_padding, groups=groups,
             dilation=dilation)


def _case(name, dtype, bias=True, seed=0, num_threads=None):
    """(program, feeds, torch output and grads) for loss = sum(conv_transpose(x, w, b) * R), x, w, b params."""
    xs, ws, stride, pad, opad, dil, groups = CASES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(dtype)
    b = rng.standard_normal(ws[1] * groups).astype(dtype)
    g = lc.Graph("convt")
    xp, wp = g.param("x", x), g.param("w", w)
    bp = g.param("b", b) if bias else None
    y = lc.conv_transpose(xp, wp, bp, strides=stride, pads=pad, output_padding=opad, dilations=dil, group=groups)
    X, W, B = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    Y = _torch_ct(X, W, B if bias else None, stride, pad, opad, dil, groups)
    assert y.shape == tuple(Y.shape), f"{name}: shape {y.shape}, PyTorch {tuple(Y.shape)}"
    R = rng.uniform(-1, 1, y.shape).astype(dtype)
    r = g.input("r", y.shape, dtype=np.dtype(dtype).name)
    loss = lc.sum(y * r)
    g.output("y", y)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, num_threads=num_threads)
    (Y * torch.tensor(R)).sum().backward()
    want = {"y": Y.detach().numpy(), "x": X.grad.numpy(), "w": W.grad.numpy()}
    if bias:
        want["b"] = B.grad.numpy()
    return prog, {"r": R}, want


def _close(got, want, rtol, what):
    """|got - want| <= rtol * max|want| elementwise (sums of many terms: relative to the tensor's scale)."""
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_of_x_w_b_match_pytorch(name, dtype):
    prog, feeds, want = _case(name, dtype)
    fwd, grad = (1e-5, 1e-5) if dtype == np.float32 else (1e-13, 1e-13)
    _close(prog.run(feeds)["y"], want["y"], fwd, f"{name} forward")
    grads = prog.grad(feeds)
    for k in ("x", "w", "b"):
        _close(grads[k], want[k], grad, f"{name} d{k}")


@pytest.mark.parametrize("name", ["2d_stride2_pad1_outpad1", "1d", "2d_depthwise", "2d_pointwise"])
def test_without_bias_matches_pytorch(name):
    prog, feeds, want = _case(name, np.float64, bias=False)
    _close(prog.run(feeds)["y"], want["y"], 1e-13, f"{name} forward")
    grads = prog.grad(feeds)
    assert sorted(grads) == ["w", "x"]
    for k in ("x", "w"):
        _close(grads[k], want[k], 1e-13, f"{name} d{k}")


def test_runs_conv_grad_input_kernel_and_its_gradients_are_the_conv_kernels():
    prog, feeds, _ = _case("2d_stride2_pad1_outpad1", np.float64)
    assert [i["op"] for i in prog.instructions("run") if "conv" in i["op"]] == ["conv_transpose"]
    step_ops = {i["op"] for i in prog.instructions("grad")}
    assert {"conv_transpose", "conv", "conv_grad_weight"} <= step_ops, step_ops


def test_float64_central_differences_of_a_tiny_conv_transpose():
    """d loss / d (x, w, b) against central differences of the program's own forward, for a grouped, strided,
    dilated case with pads and an output padding."""
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((1, 4, 3, 3)), rng.standard_normal((4, 1, 2, 3)), rng.standard_normal(2)
    R = rng.uniform(0.5, 1.5, (1, 2, 6, 8))

    def build(vals):
        g = lc.Graph("fd")
        ps = [g.param(k, v) for k, v in zip("xwb", vals)]
        y = lc.conv_transpose(*ps, strides=(2, 2), pads=(0, 1, 1, 0), output_padding=(1, 0), dilations=(1, 2),
                              group=2)
        assert y.shape == R.shape, y.shape
        loss = lc.sum(y * g.const(R))
        g.output("loss", loss)
        return lc.compile(g, loss=loss)

    vals = [x, w, b]
    grads = build(vals).grad({})
    for k, name in enumerate("xwb"):
        fd = np.zeros(vals[k].shape)
        for i in np.ndindex(vals[k].shape):
            f = []
            for s in (1e-6, -1e-6):
                v = [a.copy() for a in vals]
                v[k][i] += s
                f.append(float(build(v).run({})["loss"]))
            fd[i] = (f[0] - f[1]) / 2e-6
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


@pytest.mark.parametrize("name", ["2d_big", "2d_depthwise_big"])
def test_results_are_bit_identical_for_1_and_2_threads(name):
    """Sizes above the runtime's parallel threshold, so 2 threads split the work."""
    CASES.setdefault("2d_big", ((4, 32, 16, 16), (32, 32, 4, 4), 2, 1, 0, 1, 1))
    CASES.setdefault("2d_depthwise_big", ((8, 32, 40, 40), (32, 1, 3, 3), 1, 1, 0, 1, 32))
    runs = []
    for nt in (1, 2):
        prog, feeds, _ = _case(name, np.float32, seed=7, num_threads=nt)
        runs.append((prog.run(feeds)["y"], prog.grad(feeds)))
    (y1, g1), (y2, g2) = runs
    assert y1.tobytes() == y2.tobytes(), f"{name}: forward differs between 1 and 2 threads"
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes(), f"{name}: d{k} differs between 1 and 2 threads"


def test_plan_file_roundtrip_runs_the_conv_transpose(tmp_path):
    import libml_runtime
    prog, feeds, want = _case("2d_rect_kernel_mixed_attrs", np.float64)
    prog.save(str(tmp_path / "ct.plan"))
    loaded = libml_runtime.load(str(tmp_path / "ct.plan"))
    _close(loaded.run(feeds)["y"], want["y"], 1e-13, "loaded plan forward")
    _close(loaded.grad(feeds)["w"], want["w"], 1e-13, "loaded plan dw")


# ---------------------------------------------------------------------------------------------------
# ONNX: output_shape, auto_pad and output_padding through handmade models, against ONNX Runtime

def _onnx_ct_model(xs, ws, attrs, bias=False, opset=22):
    inits = [helper.make_tensor("W", TensorProto.FLOAT, ws,
                                np.random.default_rng(1).standard_normal(ws).astype(np.float32).ravel())]
    ins = ["X", "W"]
    if bias:
        cout = ws[1] * attrs.get("group", 1)
        inits.append(helper.make_tensor("B", TensorProto.FLOAT, (cout,),
                                        np.random.default_rng(2).standard_normal(cout).astype(np.float32)))
        ins.append("B")
    node = helper.make_node("ConvTranspose", ins, ["Y"], name="ct0", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, xs)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", "c", "h", "w", "d"][:len(xs)])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


#: (x shape, w shape, attrs): each output_shape / auto_pad rule of the ONNX spec, odd totals included
ONNX_CASES = {
    "output_shape_odd_total_begin_gets_more": ((1, 2, 3, 3), (2, 3, 4, 3), {"strides": [2, 2], "output_shape": [5, 6]}),
    "output_shape_larger_adds_zeros_at_end": ((1, 1, 3, 3), (1, 2, 3, 3), {"strides": [3, 2], "output_shape": [10, 8]}),
    "output_shape_ignores_pads": ((1, 2, 3, 4), (2, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                               "output_shape": [6, 8]}),
    "output_shape_with_output_padding": ((1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "output_padding": [1, 1],
                                                                      "output_shape": [7, 6]}),
    "same_upper_odd_total_end_gets_more": ((1, 2, 3, 4), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower_odd_total_begin_gets_more": ((1, 2, 3, 4), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "same_upper_with_output_shape": ((1, 2, 3, 3), (2, 2, 4, 4), {"strides": [2, 2], "auto_pad": "SAME_UPPER",
                                                                  "output_shape": [5, 5]}),
    "same_upper_with_output_padding": ((1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER",
                                                                    "output_padding": [1, 1]}),
    "same_lower_dilated_grouped": ((1, 4, 3, 4), (4, 1, 3, 3), {"strides": [2, 1], "dilations": [2, 1], "group": 2,
                                                                "auto_pad": "SAME_LOWER"}),
    "same_upper_stride_beyond_window": ((1, 2, 3, 3), (2, 2, 2, 2), {"strides": [3, 3], "auto_pad": "SAME_UPPER"}),
    "valid": ((1, 2, 3, 4), (2, 3, 3, 3), {"strides": [2, 1], "auto_pad": "VALID"}),
    "pads_and_output_padding": ((1, 3, 4, 4), (3, 2, 3, 3), {"strides": [2, 3], "pads": [1, 0, 2, 1],
                                                             "output_padding": [1, 2]}),
    "1d_output_shape": ((1, 2, 5), (2, 3, 3), {"strides": [2], "output_shape": [10]}),
    "1d_same_upper": ((1, 2, 5), (2, 3, 4), {"strides": [2], "auto_pad": "SAME_UPPER"}),
}


@pytest.mark.parametrize("name", sorted(ONNX_CASES))
def test_output_shape_auto_pad_and_output_padding_match_onnxruntime(name):
    xs, ws, attrs = ONNX_CASES[name]
    m = _onnx_ct_model(xs, ws, attrs, bias=True)
    x = np.random.default_rng(0).standard_normal(xs).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    got = lc.compile(lc.import_onnx(m)).run({"X": x})["Y"]
    assert got.shape == want.shape, f"{name}: shape {got.shape}, ONNX Runtime {want.shape}"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_opset_1_conv_transpose_imports():
    m = _onnx_ct_model((1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, opset=7)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(lc.compile(lc.import_onnx(m)).run({"X": x})["Y"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_exported_conv_transpose2d_imports_and_matches_onnxruntime_and_autograd(dynamo):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                              torch.nn.ReLU(),
                              torch.nn.ConvTranspose2d(4, 6, (2, 3), stride=(1, 2), groups=2, dilation=(2, 1)))
    x = torch.randn(2, 3, 5, 4)
    f = io.BytesIO()
    kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False, "opset_version": 17}
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["y"], **kw)
    m = onnx.load_from_string(f.getvalue())
    assert sum(n.op_type == "ConvTranspose" for n in m.graph.node) == 2
    g = lc.import_onnx(m)
    assert len(g.params) == len(list(net.parameters()))
    y = g.outputs["y"]
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x.numpy()})[0]
    R = np.random.default_rng(1).uniform(-1, 1, y.shape).astype(np.float32)
    loss = lc.sum(y * g.const(R))
    prog = lc.compile(g, loss=loss)
    np.testing.assert_allclose(prog.run({"x": x.numpy()})["y"], want, rtol=1e-5, atol=1e-5)
    (net(x) * torch.tensor(R)).sum().backward()
    grads = prog.grad({"x": x.numpy()})
    for pname, p in net.named_parameters():
        _close(grads[pname], p.grad.numpy(), 1e-5, f"d {pname}")


# ---------------------------------------------------------------------------------------------------
# a small autoencoder: Conv stride 2 -> ReLU -> ConvTranspose stride 2, trained as torch.optim.SGD trains it

class AutoEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(2, 6, 3, stride=2, padding=1)
        self.dec = torch.nn.ConvTranspose2d(6, 2, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_autoencoder_trains_three_sgd_steps_as_torch_and_exports_to_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = AutoEncoder()
    x = torch.randn(4, 2, 8, 8)
    f = io.BytesIO()
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    g = lc.import_onnx(onnx.load_from_string(f.getvalue()))
    assert g.outputs["y"].shape == (4, 2, 8, 8)
    target = g.input("target", (4, 2, 8, 8))
    loss = lc.mse(g.outputs["y"], target)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    feeds = {"x": x.numpy(), "target": x.numpy()}
    for step in range(3):
        opt.zero_grad()
        tl = TF.mse_loss(net(x), x)
        tl.backward()
        opt.step()
        got = prog.step(feeds)
        assert abs(float(got) - tl.item()) <= 1e-5 * abs(tl.item()), f"step {step}: loss {got} vs {tl.item()}"
        for pname, p in net.named_parameters():
            _close(prog.params[pname], p.detach().numpy(), 1e-5, f"{pname} after step {step + 1}")
    path = lc.export_onnx(prog, str(tmp_path / "ae.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], prog.run(feeds)["y"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# bad input: errors at declaration, naming the op, the node and the shapes

def _decl(xs, ws, **kw):
    g = lc.Graph("bad")
    return lc.conv_transpose(g.input("x", xs), g.param("w", np.zeros(ws, np.float32)), **kw)


def test_wrong_weight_channel_count_names_the_node_and_shapes():
    with pytest.raises(ValueError, match=r"conv_transpose 'up1': weight 'w' \(4, 2, 3, 3\) has 4 input channels.*"
                                         r"'x' \(1, 3, 8, 8\) has 3"):
        _decl((1, 3, 8, 8), (4, 2, 3, 3), name="up1")
    m = _onnx_ct_model((1, 3, 8, 8), (4, 2, 3, 3), {})
    with pytest.raises(Exception, match=r"ct0.*\(4, 2, 3, 3\) has 4 input channels.*\(1, 3, 8, 8\)"):
        lc.import_onnx(m)


def test_output_padding_not_below_stride_or_dilation_is_refused():
    with pytest.raises(ValueError, match=r"conv_transpose 'up': output_padding \(2, 0\) must be smaller than the "
                                         r"stride \(2, 2\).*axis 0.*\(1, 3, 4, 4\).*\(3, 2, 3, 3\)"):
        _decl((1, 3, 4, 4), (3, 2, 3, 3), strides=2, output_padding=(2, 0), name="up")
    m = _onnx_ct_model((1, 3, 4, 4), (3, 2, 3, 3), {"strides": [2, 2], "output_padding": [0, 2]})
    with pytest.raises(Exception, match=r"ct0.*output_padding \(0, 2\) must be smaller"):
        lc.import_onnx(m)


def test_group_bias_pads_rank_and_dtype_errors_name_the_op_and_shapes():
    with pytest.raises(ValueError, match=r"group 2 must divide the input channels 3"):
        _decl((1, 3, 4, 4), (3, 2, 3, 3), group=2)
    with pytest.raises(ValueError, match=r"bias 'b' has shape \(3,\); expected \(4,\).*\(2, 2, 3, 3\) with group 2"):
        g = lc.Graph("b")
        lc.conv_transpose(g.input("x", (1, 2, 4, 4)), g.param("w", np.zeros((2, 2, 3, 3), np.float32)),
                          g.param("b", np.zeros(3, np.float32)), group=2)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2\).*output spatial dims \(-3, 1\)"):
        _decl((1, 2, 2, 2), (2, 1, 2, 2), pads=(3, 1, 3, 1))
    with pytest.raises(ValueError, match=r"expected \(N, C_in, L\) or \(N, C_in, H, W\)"):
        _decl((1, 2, 2, 2, 2), (2, 1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"auto_pad 'SAME'"):
        _decl((1, 2, 4, 4), (2, 1, 2, 2), auto_pad="SAME")
    with pytest.raises(TypeError, match=r"conv_transpose: operand dtypes differ"):
        g = lc.Graph("t")
        lc.conv_transpose(g.input("x", (1, 2, 4, 4)), g.param("w", np.zeros((2, 1, 2, 2), np.float64)))


def test_onnx_import_refuses_3d_and_a_wrong_kernel_shape_naming_the_node():
    m = _onnx_ct_model((1, 2, 3, 3, 3), (2, 2, 2, 2, 2), {})
    with pytest.raises(Exception, match=r"ct0.*1-D and 2-D transposed convolutions"):
        lc.import_onnx(m)
    m = _onnx_ct_model((1, 2, 3, 3), (2, 2, 3, 3), {"kernel_shape": [2, 2]})
    with pytest.raises(Exception, match=r"ct0.*kernel_shape \(2, 2\) does not match"):
        lc.import_onnx(m)


def test_official_onnx_convtranspose_node_cases_pass():
    from libml_compile.onnx_backend import discover_conformance_cases, run_conformance_case
    runnable, excluded = discover_conformance_cases()
    cases = [c for c in runnable if c[0].startswith("test_convtranspose")]
    assert len(cases) >= 10, [c[0] for c in cases]
    for c in cases:
        run_conformance_case(c)
    assert [k for k in excluded if k.startswith("test_convtranspose")] == ["test_convtranspose_3d"]
