"""Resize (ops_resize.py; runtime opcodes 56 resize / 57 resize_grad, format 2.3): ONNX Resize (opsets 10-19)
and Upsample (7, 9), ``lc.resize``, forward and gradient with respect to the input.

Oracles: PyTorch's ``F.interpolate`` (nearest, linear, bilinear, bicubic; align_corners) with autograd,
ONNX Runtime on hand-made Resize / Upsample models, float64 central differences, and torch.optim.SGD for
models exported by both PyTorch exporters.  (The official ONNX Resize / Upsample node cases run in
test_onnx_conformance and ``python -m libml_compile.conformance``.)"""
from __future__ import annotations

import io
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as TF
from onnx import TensorProto, helper

import libml_compile as lc

torch.set_num_threads(1)

#: (x shape, F.interpolate's arguments, lc.resize's arguments): the modes where the two coincide
TORCH_CASES = {
    "nearest_x2": ((2, 3, 4, 5), {"scale_factor": 2, "mode": "nearest"}, {"scales": 2}),
    "nearest_x1.5": ((2, 2, 6, 4), {"scale_factor": 1.5, "mode": "nearest"}, {"scales": 1.5}),
    "nearest_sizes_up": ((2, 3, 5, 7), {"size": (8, 11), "mode": "nearest"}, {"sizes": (8, 11)}),
    "nearest_sizes_down": ((1, 2, 8, 10), {"size": (3, 4), "mode": "nearest"}, {"sizes": (3, 4)}),
    # float32(0.6) = 0.60000002: the output coordinate 3 maps to 4.9999998 in float64, meant 5 (and 5 in
    # PyTorch's float32 arithmetic)
    "nearest_x0.6_float32_scale": ((1, 2, 8, 10), {"scale_factor": 0.6, "mode": "nearest"},
                                   {"scales": np.float32(0.6)}),
    "nearest_1d": ((2, 3, 7), {"scale_factor": 3, "mode": "nearest"}, {"scales": 3}),
    "bilinear_x2": ((2, 3, 4, 5), {"scale_factor": 2, "mode": "bilinear", "align_corners": False},
                    {"scales": 2, "mode": "linear"}),
    "bilinear_x2_align": ((2, 3, 4, 5), {"scale_factor": 2, "mode": "bilinear", "align_corners": True},
                          {"scales": 2, "mode": "linear", "align": True}),
    "bilinear_sizes_up": ((2, 3, 5, 7), {"size": (8, 11), "mode": "bilinear", "align_corners": False},
                          {"sizes": (8, 11), "mode": "linear"}),
    "bilinear_sizes_up_align": ((2, 3, 5, 7), {"size": (8, 11), "mode": "bilinear", "align_corners": True},
                                {"sizes": (8, 11), "mode": "linear", "align": True}),
    "bilinear_down": ((2, 2, 9, 10), {"size": (4, 6), "mode": "bilinear", "align_corners": False},
                      {"sizes": (4, 6), "mode": "linear"}),
    "bilinear_down_align": ((2, 2, 9, 10), {"size": (4, 6), "mode": "bilinear", "align_corners": True},
                            {"sizes": (4, 6), "mode": "linear", "align": True}),
    "bilinear_x1.7_x0.6": ((1, 3, 6, 10), {"scale_factor": (1.75, 0.6), "mode": "bilinear", "align_corners": False},
                           {"scales": (1.75, 0.6), "mode": "linear"}),
    "linear_1d_x2.5": ((2, 3, 6), {"scale_factor": 2.5, "mode": "linear", "align_corners": False},
                       {"scales": 2.5, "mode": "linear"}),
    "linear_1d_align": ((2, 3, 6), {"size": 13, "mode": "linear", "align_corners": True},
                        {"sizes": 13, "mode": "linear", "align": True}),
    "bicubic_x2": ((1, 2, 5, 6), {"scale_factor": 2, "mode": "bicubic", "align_corners": False},
                   {"scales": 2, "mode": "cubic"}),
    "bicubic_down_align": ((1, 2, 9, 8), {"size": (5, 3), "mode": "bicubic", "align_corners": True},
                           {"sizes": (5, 3), "mode": "cubic", "align": True}),
}


def _lc_kwargs(spec):
    kw = dict(spec)
    align = kw.pop("align", False)
    if kw.get("mode", "nearest") == "nearest":  # PyTorch's nearest
        kw.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        kw["coordinate_transformation_mode"] = "align_corners" if align else "pytorch_half_pixel"
    return kw


def _program(x, build, nt=None):
    g = lc.Graph("resize")
    xp = g.param("x", x)
    y = build(xp)
    R = np.random.default_rng(1).uniform(-1, 1, y.shape).astype(x.dtype)
    g.output("y", y)
    return lc.compile(g, loss=lc.sum(y * g.const(R)), num_threads=nt), R


def _close(got, want, rtol, what):
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_forward_and_input_gradient_match_torch_interpolate(name, dtype):
    shape, tkw, spec = TORCH_CASES[name]
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    prog, R = _program(x, lambda t: lc.resize(t, **_lc_kwargs(spec)))
    X = torch.tensor(x, requires_grad=True)
    Y = TF.interpolate(X, **tkw)
    (Y * torch.tensor(R)).sum().backward()
    y = prog.run({})["y"]
    assert y.shape == tuple(Y.shape)
    if tkw["mode"] == "nearest":
        np.testing.assert_array_equal(y, Y.detach().numpy())  # a copy of the chosen elements
    tol = 2e-6 if dtype == np.float32 else 1e-13
    _close(y, Y.detach().numpy(), tol, f"{name} forward")
    _close(prog.grad({})["x"], X.grad.numpy(), tol, f"{name} dx")


# ---------------------------------------------------------------------------------------------------
# ONNX Runtime on hand-made models

def _resize_model(x_shape, opset=19, op="Resize", scales=None, sizes=None, roi=None, **attrs):
    """A one-node float32 model; scales / sizes / roi as initializers (Upsample-7: scales an attribute)."""
    inits, ins = [], ["x"]
    if op == "Upsample" and opset < 9:
        attrs["scales"] = [float(s) for s in scales]
    elif op == "Upsample" or opset == 10:
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [len(scales)], list(scales)))
        ins.append("scales")
    else:
        if roi is None and opset < 13:  # (roi is a required input before opset 13: empty)
            roi = ()
        if roi is not None:
            inits.append(helper.make_tensor("roi", TensorProto.FLOAT, [len(roi)], list(roi)))
        ins += ["roi" if roi is not None else ""]
        if scales is not None:
            inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [len(scales)], list(scales)))
        ins += ["scales" if scales is not None else ""]
        if sizes is not None:
            inits.append(helper.make_tensor("sizes", TensorProto.INT64, [len(sizes)], list(sizes)))
            ins.append("sizes")
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node(op, ins, ["y"], name="rs", **attrs)
    g = helper.make_graph([node], "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vs_ort(m, x, exact):
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = lc.compile(lc.import_onnx(m)).run({"x": x})["y"]
    assert got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
#: (x shape, scales, sizes): an exact x2 (ties at .5 under asymmetric), non-integer growth, shrinking
# (scale * n_in is an integer in each: align_corners divides by it minus 1 as ONNX's reference and node
# cases do, ONNX Runtime by the output length minus 1, and the two differ when they differ; the scales are
# exact in float32: where float32 rounding moves a coordinate across an integer or a tie, ONNX Runtime's
# float32 arithmetic decides it one way or the other -- test_a_float32_scale_rounds_as_the_scale_intends)
GEOMS = {"x2": ((1, 2, 4, 5), (1, 1, 2, 2), None), "sizes": ((2, 1, 4, 6), None, (2, 1, 6, 4)),
         "down": ((1, 2, 8, 12), (1, 1, 0.5, 0.75), None)}


@pytest.mark.parametrize("geom", sorted(GEOMS))
@pytest.mark.parametrize("coord,nearest_mode", list(itertools.product(COORDS, NEAREST)))
def test_nearest_matches_onnxruntime_for_every_nearest_mode_and_coordinate_mode(coord, nearest_mode, geom):
    shape, scales, sizes = GEOMS[geom]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    m = _resize_model(shape, scales=scales, sizes=sizes, mode="nearest", coordinate_transformation_mode=coord,
                      nearest_mode=nearest_mode)
    _vs_ort(m, x, exact=True)


@pytest.mark.parametrize("geom", sorted(GEOMS))
@pytest.mark.parametrize("mode,coord", list(itertools.product(["linear", "cubic"],
                                                              COORDS[:4] + ("half_pixel_symmetric",))))
def test_linear_and_cubic_match_onnxruntime_for_every_coordinate_mode(mode, coord, geom):
    shape, scales, sizes = GEOMS[geom]
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    _vs_ort(_resize_model(shape, scales=scales, sizes=sizes, mode=mode, coordinate_transformation_mode=coord), x,
            exact=False)


@pytest.mark.parametrize("case", ["linear_antialias", "cubic_antialias", "cubic_exclude_outside", "crop_and_resize",
                                  "axes_keep_aspect", "3d_input"])
def test_the_opset_18_attributes_match_onnxruntime(case):
    shape = (1, 2, 9, 12)
    kw = {"linear_antialias": dict(scales=(1, 1, 0.4, 0.3), mode="linear", antialias=1),
          "cubic_antialias": dict(scales=(1, 1, 0.5, 0.7), mode="cubic", antialias=1),
          "cubic_exclude_outside": dict(scales=(1, 1, 1.6, 2), mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5),
          "crop_and_resize": dict(sizes=(1, 2, 5, 7), roi=(0, 0, 0.2, -0.1, 1, 1, 0.9, 1.2), mode="linear",
                                  coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=3.0),
          "axes_keep_aspect": dict(sizes=(8, 5), axes=(3, 2), keep_aspect_ratio_policy="not_larger", mode="linear"),
          "3d_input": dict(scales=(1, 1, 2.5), mode="linear")}[case]
    if case == "3d_input":
        shape = (2, 3, 7)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    _vs_ort(_resize_model(shape, opset=19, **kw), x, exact=False)


@pytest.mark.parametrize("op,opset,mode,scales", [
    ("Upsample", 7, "nearest", (1, 1, 2, 3)), ("Upsample", 9, "nearest", (1, 1, 3, 2)),
    ("Upsample", 9, "linear", (1, 1, 2, 1.5)), ("Resize", 10, "nearest", (1, 1, 2, 3)),
    ("Resize", 10, "nearest", (1, 1, 0.5, 0.6)), ("Resize", 10, "linear", (1, 1, 0.6, 1.5)),
    ("Resize", 11, "linear", (1, 1, 1.5, 2)), ("Resize", 13, "nearest", (1, 1, 0.6, 2.5))])
def test_upsample_and_early_resize_opsets_match_onnxruntime(op, opset, mode, scales):
    shape = (1, 2, 5, 6)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    _vs_ort(_resize_model(shape, opset=opset, op=op, scales=scales, mode=mode), x, exact=mode == "nearest")


# ---------------------------------------------------------------------------------------------------
# gradients, threads

@pytest.mark.parametrize("spec", [dict(scales=(1.6, 0.7), mode="linear"),
                                  dict(sizes=(4, 9), mode="linear", coordinate_transformation_mode="align_corners"),
                                  dict(scales=(1.5, 0.5), mode="linear", antialias=True),
                                  dict(scales=(1.4, 1.7), mode="cubic", exclude_outside=True),
                                  dict(scales=1.5, mode="nearest")], ids=["linear", "align", "antialias", "cubic",
                                                                          "nearest"])
def test_float64_central_differences_of_the_input_gradient(spec):
    x = np.random.default_rng(6).standard_normal((2, 1, 5, 6))
    prog, R = _program(x, lambda t: lc.resize(t, **spec))
    g = prog.grad({})["x"]
    fwd = lc.Graph("fd")
    fwd.output("y", lc.resize(fwd.input("x", x.shape, "float64"), **spec))
    run = lc.compile(fwd).run
    fd = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(x.shape):
        vals = []
        for sgn in (1, -1):
            xx = x.copy()
            xx[i] += sgn * h
            vals.append(float((run({"x": xx})["y"] * R).sum()))
        fd[i] = (vals[0] - vals[1]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("spec", [dict(scales=2), dict(scales=(1.7, 0.6), mode="linear"),
                                  dict(sizes=(37, 50), mode="cubic")], ids=["nearest", "linear", "cubic"])
def test_forward_and_gradient_are_bit_identical_for_1_and_2_threads(spec):
    x = np.random.default_rng(7).standard_normal((4, 8, 24, 32)).astype(np.float32)
    res = []
    for nt in (1, 2):
        prog, _ = _program(x, lambda t: lc.resize(t, **spec), nt)
        res.append((prog.run({})["y"], prog.grad({})["x"]))
    assert res[0][0].tobytes() == res[1][0].tobytes()
    assert res[0][1].tobytes() == res[1][1].tobytes()


def test_nearest_copies_nan_inf_and_signed_zero_exactly():
    x = np.array([[[[np.nan, -0.0], [np.inf, -np.inf]]]], np.float32)
    g = lc.Graph("edge")
    g.output("y", lc.resize(g.input("x", x.shape), scales=2, coordinate_transformation_mode="asymmetric",
                            nearest_mode="floor"))
    y = lc.compile(g).run({"x": x})["y"]
    want = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
    assert y.tobytes() == want.tobytes()


# ---------------------------------------------------------------------------------------------------
# models exported by PyTorch: import, train, export

class UpNet(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.up = torch.nn.Upsample(scale_factor=2, mode=mode)
        self.c2 = torch.nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.c2(torch.tanh(self.up(self.c1(x))))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample_model_from_both_exporters_trains_as_torch_sgd_and_exports(mode, dynamo, tmp_path):
    torch.manual_seed(0)
    net = UpNet(mode)
    x = torch.randn(2, 2, 5, 6)
    target = torch.randn(2, 2, 8, 10)
    f = io.BytesIO()
    kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False, "opset_version": 17}
    torch.onnx.export(net.eval(), (x,), f, input_names=["x"], output_names=["y"], **kw)
    m = onnx.load_from_string(f.getvalue())
    assert "Resize" in {n.op_type for n in m.graph.node}
    g = lc.import_onnx(m)
    assert sorted(g.params) == sorted(n for n, _ in net.named_parameters())
    loss = lc.mse(g.outputs["y"], g.input("target", tuple(target.shape)))
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    feeds = {"x": x.numpy(), "target": target.numpy()}
    np.testing.assert_allclose(prog.run(feeds)["y"], net(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        want = TF.mse_loss(net(x), target)
        want.backward()
        opt.step()
        got = prog.step(feeds)
        assert abs(got - want.item()) <= 1e-5 * abs(want.item())
    for name, p in net.named_parameters():
        _close(prog.params[name], p.detach().numpy(), 1e-5, f"{name} after 3 SGD steps")
    path = lc.export_onnx(prog, tmp_path / "up.onnx")
    ort_y = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(prog.run(feeds)["y"], ort_y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# bad input

def test_bad_resize_arguments_are_refused_naming_the_op_and_shapes():
    g = lc.Graph("bad")
    x = g.input("x", (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"only the last two axes can be resized; axis 1 of shape \(2, 3, 4, 4\) "
                                         r"would go 3 -> 6"):
        lc.resize(x, scales=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="give exactly one of scales and sizes"):
        lc.resize(x, scales=2, sizes=(8, 8))
    with pytest.raises(ValueError, match="mode 'area' is not one of nearest, linear, cubic"):
        lc.resize(x, scales=2, mode="area")
    with pytest.raises(ValueError, match="nearest_mode 'round' is not one of"):
        lc.resize(x, scales=2, nearest_mode="round")
    with pytest.raises(ValueError, match=r"output shape \(2, 3, 0, 0\) of \(2, 3, 4, 4\).*empty axis"):
        lc.resize(x, scales=0.2)
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        lc.resize(x, scales=-1.0)
    with pytest.raises(TypeError, match="resize: needs a floating tensor, got 'i' of dtype int64"):
        lc.resize(g.input("i", (1, 1, 2, 2), dtype="int64"), scales=2)


def test_onnx_resize_errors_name_the_node():
    m = _resize_model((1, 2, 4, 4), scales=(1, 2, 2, 2), mode="nearest")
    with pytest.raises(lc.onnx_import.ONNXImportError, match=r"node 'rs' \(Resize\).*only the last two axes"):
        lc.import_onnx(m)
    live = helper.make_model(helper.make_graph(
        [helper.make_node("Resize", ["x", "", "s"], ["y"], name="rs")], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 1, 2, 2)),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, (4,))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]),
        opset_imports=[helper.make_opsetid("", 19)])
    with pytest.raises(lc.onnx_import.ONNXImportError, match=r"node 'rs' \(Resize\).*scales \(input 2\) is "
                                                             r"data-dependent"):
        lc.import_onnx(live)
    crop = _resize_model((1, 2, 4, 4), sizes=(1, 2, 3, 3), mode="linear",
                         coordinate_transformation_mode="tf_crop_and_resize")
    with pytest.raises(lc.onnx_import.ONNXImportError, match=r"node 'rs' \(Resize\).*needs the roi"):
        lc.import_onnx(crop)


def test_a_tampered_table_index_is_refused_by_the_kernel_naming_the_node():
    g = lc.Graph("tamper")
    g.output("y", lc.resize(g.input("x", (1, 1, 3, 3)), scales=2, name="up"))
    prog = lc.compile(g)
    x = np.ones((1, 1, 3, 3), np.float32)
    e = prog.plan.entries["run"]
    e.consts[:] = np.where(e.consts == 2.0, 3.0, e.consts)  # a row index 2 of 3 rows becomes 3
    with pytest.raises(IndexError, match=r"op 'resize' \(node 'up'\)"):
        prog.run({"x": x})


def test_the_validator_refuses_a_table_outside_the_constant_pool():
    from libml_runtime import format as F
    from libml_runtime.plan import PlanError, validate
    g = lc.Graph("tab")
    g.output("y", lc.resize(g.input("x", (1, 1, 3, 4)), sizes=(5, 7), mode="linear"))
    prog = lc.compile(g)
    e = prog.plan.entries["run"]
    pc = next(pc for pc, op, _, _ in F.instructions(e.code) if op == "resize")
    _, where = F.locate(e.code, pc)
    e.code[where["tab"]] = len(e.consts) - 3
    with pytest.raises(PlanError, match=r"tab = \d+ is outside \[0, \d+\]"):
        validate(prog.plan)


def test_a_saved_plan_with_check_finite_runs_the_same_resize(tmp_path):
    import libml_runtime
    x = np.random.default_rng(8).standard_normal((2, 3, 5, 6)).astype(np.float32)
    g = lc.Graph("saved")
    xp = g.param("x", x)
    y = lc.resize(xp, scales=(1.4, 0.7), mode="cubic", name="up")
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * y), check_finite=True)
    prog.save(tmp_path / "r.plan")
    exe = libml_runtime.load(tmp_path / "r.plan", check_finite=True)
    assert exe.run({})["y"].tobytes() == prog.run({})["y"].tobytes()
    assert exe.grad({})["x"].tobytes() == prog.grad({})["x"].tobytes()


def test_antialiased_shrinking_beyond_the_runtimes_tap_limit_is_refused():
    g = lc.Graph("taps")
    with pytest.raises(ValueError, match=r"antialiased shrinking of \(1, 1, 4, 20000\) to \(1, 1, 4, 8\) needs 5000 "
                                         r"taps per axis, more than the runtime's 4096 \('x'\)"):
        lc.resize(g.input("x", (1, 1, 4, 20000)), sizes=(4, 8), mode="linear", antialias=True)
