"""Convolution (ops_conv.py; runtime opcodes 48-50, format 2.3): forward, input and weight gradients, 1-D and
2-D, every attribute, fused bias + ReLU, the import from ONNX and a LeNet-style model end to end.

Oracles: PyTorch's ``F.conv1d`` / ``F.conv2d`` and autograd, float64 central differences, ONNX Runtime and
``onnx.reference`` (auto_pad, which PyTorch does not have), models exported by ``torch.onnx.export``."""
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
from libml_compile import ops_conv

torch.set_num_threads(1)

#: (x shape, w shape, stride, padding, dilation, groups): PyTorch's arguments (padding symmetric)
CASES = {
    "2d_3x3": ((2, 3, 7, 7), (4, 3, 3, 3), 1, 0, 1, 1),
    "2d_stride2_pad1": ((2, 3, 9, 8), (5, 3, 3, 3), 2, 1, 1, 1),
    "2d_rect_kernel_mixed_attrs": ((2, 4, 9, 10), (6, 2, 3, 2), (2, 1), (1, 2), (2, 1), 2),
    "2d_depthwise": ((2, 4, 9, 8), (4, 1, 3, 3), 1, 1, 1, 4),
    "2d_depthwise_stride2_dilated": ((3, 5, 11, 9), (5, 1, 3, 3), 2, 2, 2, 5),
    "2d_channel_multiplier": ((2, 3, 8, 8), (6, 1, 3, 3), 1, 1, 1, 3),
    "2d_pointwise": ((2, 6, 8, 8), (5, 6, 1, 1), 1, 0, 1, 1),
    "2d_pointwise_grouped": ((2, 6, 5, 7), (4, 3, 1, 1), 1, 0, 1, 2),
    "2d_kernel_equals_input": ((3, 2, 5, 5), (2, 2, 5, 5), 1, 0, 1, 1),
    "2d_single_channel": ((2, 1, 12, 12), (6, 1, 5, 5), 1, 2, 1, 1),
    "2d_stride_larger_than_kernel": ((2, 3, 10, 10), (4, 3, 2, 2), 3, 0, 1, 1),
    "1d": ((2, 3, 11), (5, 3, 3), 1, 1, 1, 1),
    "1d_stride2_dilated_grouped": ((2, 4, 20), (6, 2, 4), 2, 3, 2, 2),
    "1d_depthwise": ((2, 4, 13), (4, 1, 5), 1, 2, 1, 4),
}
#: panels: a conv whose output pixels span several im2col panels (Kc*4 B per pixel over PANEL_BYTES)
CASES["2d_several_panels"] = ((2, 64, 30, 30), (8, 64, 3, 3), 1, 1, 1, 1)
#: the tiled path (algo 1): row blocks of a batch-1 image, stride 2 with dilation (the input gradient as
#: one tap convolution per output phase), stride 3 with a 5x5 kernel and channel counts no microkernel
#: width divides
CASES["2d_tiled_row_blocks_batch1"] = ((1, 8, 40, 37), (9, 8, 3, 3), 1, 1, 1, 1)
CASES["2d_tiled_stride2_dilated"] = ((2, 5, 17, 15), (7, 5, 3, 3), 2, 2, 2, 1)
CASES["2d_tiled_stride3_5x5"] = ((2, 3, 16, 14), (5, 3, 5, 5), 3, 2, 1, 1)


def _torch_conv(x, w, b, stride, padding, dilation, groups):
    f = TF.conv1d if x.ndim == 3 else TF.conv2d
    return f(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _case(name, dtype, bias=True, relu=False, seed=0, num_threads=None):
    """(program, feeds, torch outputs and grads) for loss = sum(conv(x, w, b) * R) with x, w, b params."""
    xs, ws, stride, pad, dil, groups = CASES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[1:]))).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    g = lc.Graph("conv")
    xp, wp = g.param("x", x), g.param("w", w)
    bp = g.param("b", b) if bias else None
    y = lc.conv(xp, wp, bp, strides=stride, pads=pad, dilations=dil, group=groups)
    if relu:
        y = lc.relu(y)
    R = rng.uniform(-1, 1, y.shape).astype(dtype)
    r = g.input("r", y.shape, dtype=np.dtype(dtype).name)
    loss = lc.sum(y * r)
    g.output("y", y)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, num_threads=num_threads)
    X, W, B = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    Y = _torch_conv(X, W, B if bias else None, stride, pad, dil, groups)
    if relu:
        Y = torch.relu(Y)
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
def test_forward_and_both_gradients_match_pytorch(name, dtype):
    prog, feeds, want = _case(name, dtype)
    fwd, grad = (1e-4, 1e-3) if dtype == np.float32 else (1e-12, 1e-12)
    _close(prog.run(feeds)["y"], want["y"], fwd, f"{name} forward")
    grads = prog.grad(feeds)
    for k in ("x", "w", "b"):
        _close(grads[k], want[k], grad, f"{name} d{k}")


@pytest.mark.parametrize("name", ["2d_3x3", "1d", "2d_depthwise", "2d_pointwise"])
def test_without_bias_matches_pytorch(name):
    prog, feeds, want = _case(name, np.float64, bias=False)
    _close(prog.run(feeds)["y"], want["y"], 1e-12, f"{name} forward")
    grads = prog.grad(feeds)
    assert set(grads) == {"x", "w"}
    for k in ("x", "w"):
        _close(grads[k], want[k], 1e-12, f"{name} d{k}")


@pytest.mark.parametrize("name", ["2d_stride2_pad1", "2d_depthwise", "1d"])
def test_relu_after_conv_is_its_epilogue_and_matches_pytorch(name):
    prog, feeds, want = _case(name, np.float64, relu=True)
    rows = prog.instructions("run")
    assert any(r["op"].startswith("conv+bias+relu") for r in rows), rows
    assert not any(m.startswith("relu") for r in rows for m in r.get("members", ())), rows  # no relu of its own
    _close(prog.run(feeds)["y"], want["y"], 1e-12, f"{name} forward")
    grads = prog.grad(feeds)
    for k in ("x", "w", "b"):
        _close(grads[k], want[k], 1e-12, f"{name} d{k}")


def test_float64_central_differences_of_a_tiny_conv():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 5, 6))
    w = rng.standard_normal((4, 1, 2, 3))
    b = rng.standard_normal(4)
    R = rng.uniform(0.5, 1.5, (1, 4, 3, 3))
    at = {"strides": (2, 1), "pads": (1, 0, 1, 1), "dilations": (1, 2), "group": 2, "act": None}

    def loss_of(xv, wv, bv):
        return float((ops_conv._r_conv(at, xv, wv, bv) * R).sum())
    g = lc.Graph("fd")
    xp, wp, bp = g.param("x", x), g.param("w", w), g.param("b", b)
    y = lc.conv(xp, wp, bp, strides=(2, 1), pads=(1, 0, 1, 1), dilations=(1, 2), group=2)
    assert y.shape == R.shape
    loss = lc.sum(y * g.const(R))
    grads = lc.compile(g, loss=loss).grad({})
    arrays = {"x": x, "w": w, "b": b}
    h = 1e-6
    for k, a in arrays.items():
        fd = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            args = {n: v.copy() for n, v in arrays.items()}
            args[k][i] += h
            up = loss_of(args["x"], args["w"], args["b"])
            args[k][i] -= 2 * h
            fd[i] = (up - loss_of(args["x"], args["w"], args["b"])) / (2 * h)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-7, atol=1e-8, err_msg=f"d{k}")


def _onnx_conv_model(xs, ws, attrs, bias=True, dtype=TensorProto.FLOAT):
    rng = np.random.default_rng(5)
    npdt = np.float32 if dtype == TensorProto.FLOAT else np.float64
    w = rng.standard_normal(ws).astype(npdt)
    b = rng.standard_normal(ws[0]).astype(npdt)
    inits = [onnx.numpy_helper.from_array(w, "W")] + ([onnx.numpy_helper.from_array(b, "B")] if bias else [])
    node = helper.make_node("Conv", ["X", "W"] + (["B"] if bias else []), ["Y"], name="conv0", **attrs)
    graph = helper.make_graph([node], "c", [helper.make_tensor_value_info("X", dtype, xs)],
                              [helper.make_tensor_value_info("Y", dtype, [None] * len(xs))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("auto_pad,strides,dil", [("SAME_UPPER", (2, 2), (1, 1)), ("SAME_LOWER", (2, 2), (1, 1)),
                                                  ("SAME_UPPER", (1, 2), (2, 1)), ("SAME_LOWER", (3, 1), (1, 1)),
                                                  ("VALID", (2, 1), (1, 2))])
def test_auto_pad_matches_onnx_reference_and_runtime(auto_pad, strides, dil):
    from onnx.reference import ReferenceEvaluator
    xs, ws = (2, 3, 8, 7), (4, 3, 3, 2)
    m = _onnx_conv_model(xs, ws, {"auto_pad": auto_pad, "strides": strides, "dilations": dil})
    x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
    want = ReferenceEvaluator(m).run(None, {"X": x})[0]
    if auto_pad == "VALID" or dil == (1, 1):  # (ONNX Runtime refuses SAME_* with dilations)
        ort_y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
        np.testing.assert_allclose(ort_y, want, rtol=1e-4, atol=1e-5)
    g = lc.import_onnx(m)
    got = lc.compile(g).run({"X": x})["Y"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_onnx_conv1d_float64_without_bias_imports():
    m = _onnx_conv_model((2, 3, 12), (4, 3, 3), {"strides": [2], "pads": [2, 1], "dilations": [2]}, bias=False,
                         dtype=TensorProto.DOUBLE)
    from onnx.reference import ReferenceEvaluator  # (ONNX Runtime has no float64 Conv)
    x = np.random.default_rng(2).standard_normal((2, 3, 12))
    want = ReferenceEvaluator(m).run(None, {"X": x})[0]
    np.testing.assert_allclose(lc.compile(lc.import_onnx(m)).run({"X": x})["Y"], want, rtol=1e-12, atol=1e-12)


def _determinism_case(name, nt):
    prog, feeds, _ = _case(name, np.float32, seed=7, num_threads=nt)
    return prog.run(feeds)["y"], prog.grad(feeds)


@pytest.mark.parametrize("name", ["2d_several_panels", "2d_depthwise_big", "1d_big", "2d_tiled_big_stride2"])
def test_results_are_bit_identical_for_1_and_2_threads(name):
    CASES.setdefault("2d_depthwise_big", ((8, 32, 40, 40), (32, 1, 3, 3), 1, 1, 1, 32))
    CASES.setdefault("1d_big", ((16, 32, 600), (48, 32, 5), 1, 2, 1, 1))
    CASES.setdefault("2d_tiled_big_stride2", ((6, 16, 34, 30), (24, 16, 3, 3), 2, 1, 1, 1))
    y1, g1 = _determinism_case(name, 1)
    y2, g2 = _determinism_case(name, 2)
    assert y1.tobytes() == y2.tobytes(), f"{name}: forward differs between 1 and 2 threads"
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes(), f"{name}: d{k} differs between 1 and 2 threads"


def test_the_plan_picks_the_tiled_kernels_except_for_pointwise_depthwise_and_unused_stride_phases():
    from libml_runtime import format as F

    def algos(xs, ws, **at):
        g = lc.Graph("a")
        x = g.param("x", np.zeros(xs, np.float32))
        w = g.param("w", np.zeros(ws, np.float32))
        prog = lc.compile(g, loss=lc.sum(lc.conv(x, w, **at)))
        return {name: d["algo"] for _, name, _, d in F.instructions(prog.plan.entries["grad"].code)
                if name.startswith("conv")}

    assert algos((2, 8, 12, 12), (8, 8, 3, 3), pads=1) == dict.fromkeys(
        ["conv", "conv_grad_input", "conv_grad_weight"], 1)
    assert algos((2, 8, 12, 12), (8, 8, 3, 3), pads=1, strides=2) == dict.fromkeys(
        ["conv", "conv_grad_input", "conv_grad_weight"], 1)
    # a 1x1 conv at stride 2 reads one input phase in four: im2col (its dx is one tap convolution)
    assert algos((2, 8, 12, 12), (8, 8, 1, 1), strides=2) == {"conv": 0, "conv_grad_input": 1, "conv_grad_weight": 0}
    assert set(algos((2, 8, 12, 12), (8, 8, 1, 1)).values()) == {0}          # pointwise: BLAS on x itself
    assert set(algos((2, 8, 12, 12), (8, 1, 3, 3), pads=1, group=8).values()) == {0}   # depthwise loops


def test_tiled_scratch_is_one_row_block_tile_per_thread_not_an_im2col_buffer():
    """The tiled path's scratch per thread is one block of input rows (all taps read it at offsets)
    plus its output rows: the arena stays far below one full im2col matrix."""
    xs, ws = (8, 64, 32, 32), (64, 64, 3, 3)
    g = lc.Graph("big")
    x = g.param("x", np.zeros(xs, np.float32))
    w = g.param("w", np.zeros(ws, np.float32))
    prog = lc.compile(g, loss=lc.sum(lc.conv(x, w, pads=1)))
    full_im2col = 8 * 64 * 9 * 32 * 32 * 4
    tensors = 4 * (2 * 8 * 64 * 32 * 32 + 2 * 64 * 64 * 9)
    slots = ops_conv.CONV_SLOTS * ops_conv.TILE_BYTES
    assert prog.memory_report("grad").arena_bytes < tensors + slots + 4 * 64 * 64 * 9 * 4 + 64 * 1024
    assert prog.memory_report("grad").arena_bytes < full_im2col / 2


def test_im2col_scratch_is_panels_not_a_full_im2col_buffer():
    """The arena holds x, y, their gradients and a few panels: far less than one full im2col matrix."""
    xs, ws = (8, 64, 32, 32), (64, 64, 3, 3)
    g = lc.Graph("big")
    x = g.param("x", np.zeros(xs, np.float32))
    w = g.param("w", np.zeros(ws, np.float32))
    y = lc.conv(x, w, pads=1)
    loss = lc.sum(y)
    prog = lc.compile(g, loss=loss)
    full_im2col = 8 * 64 * 9 * 32 * 32 * 4
    slots = ops_conv.CONV_SLOTS * ops_conv.PANEL_BYTES
    assert prog.memory_report("grad").arena_bytes < 2 * y.size * 4 + 2 * slots + 4 * 64 * 64 * 9 * 4 + 4096
    assert prog.memory_report("grad").arena_bytes < full_im2col / 2


def test_plan_file_roundtrip_runs_the_conv(tmp_path):
    import libml_runtime
    prog, feeds, want = _case("2d_stride2_pad1", np.float64)
    prog.save(str(tmp_path / "c.plan"))
    loaded = libml_runtime.load(str(tmp_path / "c.plan"))
    _close(loaded.run(feeds)["y"], want["y"], 1e-12, "loaded plan forward")


# ---------------------------------------------------------------------------------------------------
# bad input: errors at declaration, naming the op, the tensors and the shapes

def _decl(xs, ws, **kw):
    g = lc.Graph("bad")
    return lc.conv(g.input("x", xs), g.param("w", np.zeros(ws, np.float32)), **kw)


def test_channel_mismatch_names_the_op_and_shapes():
    with pytest.raises(ValueError, match=r"conv: weight 'w' \(4, 2, 3, 3\) expects 2 input channels.*'x' \(1, 3, 8, 8\)"):
        _decl((1, 3, 8, 8), (4, 2, 3, 3))


def test_group_that_does_not_divide_the_channels_is_refused():
    with pytest.raises(ValueError, match=r"conv: group 2 must divide the input channels 3 of 'x' \(1, 3, 8, 8\)"):
        _decl((1, 3, 8, 8), (4, 1, 3, 3), group=2)
    with pytest.raises(ValueError, match=r"conv: group 2 must divide .* output channels 3 of 'w' \(3, 2, 3, 3\)"):
        _decl((1, 4, 8, 8), (3, 2, 3, 3), group=2)


def test_kernel_larger_than_the_padded_input_is_refused():
    with pytest.raises(ValueError, match=r"conv: kernel \(5, 5\).*larger than the padded input along spatial axis 0 "
                                         r"of 'x' \(1, 3, 4, 8\): 5 > 4 \+ pads 0 \+ 0"):
        _decl((1, 3, 4, 8), (2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"dilation \(1, 3\).*spatial axis 1.*7 > 5 \+ pads 0 \+ 1"):
        _decl((1, 3, 8, 5), (2, 3, 3, 3), dilations=(1, 3), pads=(0, 0, 0, 1))
    _decl((1, 3, 4, 8), (2, 3, 5, 5), pads=1)  # padded to 6 x 10: fine


def test_bad_rank_auto_pad_bias_and_dtype_are_refused():
    with pytest.raises(ValueError, match=r"conv: input 'x' has shape \(3, 8\); expected \(N, C, L\) or"):
        _decl((3, 8), (4, 3, 3))
    with pytest.raises(ValueError, match=r"conv: weight 'w' has shape \(4, 3, 3\); expected a 4-D"):
        _decl((1, 3, 8, 8), (4, 3, 3))
    with pytest.raises(ValueError, match=r"conv: auto_pad 'SAME' is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID"):
        _decl((1, 3, 8, 8), (4, 3, 3, 3), auto_pad="SAME")
    with pytest.raises(ValueError, match=r"conv: bias .* has shape \(3,\); expected \(4,\)"):
        _decl((1, 3, 8, 8), (4, 3, 3, 3), b=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"conv: strides \(0, 1\) must be 2 integer"):
        _decl((1, 3, 8, 8), (4, 3, 3, 3), strides=(0, 1))
    g = lc.Graph("dt")
    with pytest.raises(TypeError, match=r"conv: operand dtypes differ"):
        lc.conv(g.input("x", (1, 3, 8, 8)), g.param("w", np.zeros((4, 3, 3, 3))))


def test_onnx_import_errors_name_the_node():
    m = _onnx_conv_model((1, 3, 8, 8), (4, 2, 3, 3), {})
    with pytest.raises(Exception, match=r"conv0.*expects 2 input channels"):
        lc.import_onnx(m)
    m = _onnx_conv_model((1, 3, 4, 4, 4), (2, 3, 3, 3, 3), {})
    with pytest.raises(Exception, match=r"conv0.*1-D and 2-D convolutions"):
        lc.import_onnx(m)
    m = _onnx_conv_model((1, 3, 8, 8), (4, 3, 3, 3), {"kernel_shape": [2, 2]})
    with pytest.raises(Exception, match=r"conv0.*kernel_shape \(2, 2\) does not match"):
        lc.import_onnx(m)


# ---------------------------------------------------------------------------------------------------
# end to end: a LeNet-style model exported by PyTorch

class LeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = torch.nn.Conv2d(6, 16, 5, stride=2)
        self.fc = torch.nn.Linear(16 * 5 * 5, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(torch.flatten(h, 1))


def test_lenet_exported_by_pytorch_runs_trains_and_exports(tmp_path):
    torch.manual_seed(0)
    net = LeNet()
    x = torch.randn(8, 1, 14, 14)
    labels = np.random.default_rng(0).integers(0, 10, 8)
    f = io.BytesIO()
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    m = onnx.load_from_string(f.getvalue())
    g = lc.import_onnx(m)
    assert len(g.params) == len(list(net.parameters()))
    lab = g.input("labels", (8,), dtype="int64")
    loss = lc.softmax_cross_entropy(g.outputs["logits"], lab)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.05))
    feeds = {"x": x.numpy(), "labels": labels}
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(prog.run(feeds)["logits"], ort_logits, rtol=1e-4, atol=1e-5)
    ops = [r["op"] for r in prog.instructions("run")]
    assert sum(op == "conv+bias+relu" for op in ops) == 2, ops

    out = net(x)
    TF.cross_entropy(out, torch.tensor(labels)).backward()
    grads = prog.grad(feeds)
    for name, p in net.named_parameters():
        _close(grads[name], p.grad.numpy(), 1e-3, f"d {name}")

    prog.step(feeds)
    path = lc.export_onnx(prog, str(tmp_path / "lenet.onnx"))
    sess2 = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess2.run(None, {"x": x.numpy()})[0], prog.run(feeds)["logits"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(sess2.run(None, {"x": x.numpy()})[0], ort_logits, atol=1e-4)  # it did train


def test_conv_then_global_average_pool_exported_by_pytorch_matches_autograd():
    """Conv (depthwise, then pointwise) -> ReLU -> AdaptiveAvgPool2d(1) (ONNX GlobalAveragePool: a mean over the
    spatial dims) -> Linear."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4), torch.nn.Conv2d(4, 8, 1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 3))
    x = torch.randn(4, 4, 9, 9)
    f = io.BytesIO()
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    m = onnx.load_from_string(f.getvalue())
    assert "GlobalAveragePool" in {n.op_type for n in m.graph.node}
    g = lc.import_onnx(m)
    labels = np.array([0, 2, 1, 2])
    loss = lc.softmax_cross_entropy(g.outputs["logits"], g.input("labels", (4,), dtype="int64"))
    prog = lc.compile(g, loss=loss)
    feeds = {"x": x.numpy(), "labels": labels}
    ort_logits = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(prog.run(feeds)["logits"], ort_logits, rtol=1e-4, atol=1e-5)
    TF.cross_entropy(net(x), torch.tensor(labels)).backward()
    grads = prog.grad(feeds)
    for name, p in net.named_parameters():
        _close(grads[name], p.grad.numpy(), 1e-3, f"d {name}")


def assert_validator_refuses(plan, entry, cases):
    """Each (op name, field, value, message) of ``cases`` written into the first such instruction of
    ``entry`` makes the validator raise PlanError matching the message; the plan is restored after each
    and validates again at the end."""
    from libml_runtime import PlanError
    from libml_runtime import format as F
    from libml_runtime.plan import validate
    e = plan.entries[entry]
    for opname, field, value, msg in cases:
        pc = next(pc for pc, op, _, _ in F.instructions(e.code) if op == opname)
        where = F.locate(e.code, pc)[1]
        saved = int(e.code[where[field]])
        e.code[where[field]] = value
        try:
            with pytest.raises(PlanError, match=msg):
                validate(plan)
        finally:
            e.code[where[field]] = saved
    validate(plan)


def test_the_plan_validator_refuses_bad_conv_fields():
    prog, _, _ = _case("2d_stride2_pad1", np.float32)
    assert_validator_refuses(prog.plan, "grad", (("conv", "G", 2, "group 2 does not divide"), ("conv", "y.offset", 1 << 45, "y spans"),
                                      ("conv_grad_input", "cblock", 99, "cblock = 99"),
                                      ("conv_grad_weight", "nslots", 1000, "nslots = 1000"),
                                      ("conv_grad_weight", "panel", 16, "panel = 16: algo 1's scratch slot needs"),
                                      ("conv_grad_weight", "rb", 10 ** 6, "rb = 1000000 is more than the output rows"),
                                      ("conv_grad_weight", "algo", 2, "algo 2 .* is for conv only"),
                                      ("conv_grad_input", "algo", 0, "is larger than OH\\*OW"),
                                      ("conv", "scratch.offset", 1 << 45, "scratch spans")))
