"""Batch normalisation in training and eval mode (libml_compile/ops_batchnorm.py, opcodes 64/65).

Oracles: PyTorch's BatchNorm1d/2d and autograd (outputs, gradients, running statistics after SGD steps),
float64 central finite differences, ONNX Runtime (exported models); the official ONNX BatchNormalization
node cases run in tests/test_onnx_conformance.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime

torch = pytest.importorskip("torch")

TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11)}
TDT = {"float32": torch.float32, "float64": torch.float64}


def _bn_graph(shape, dtype, training=True, relu=False, momentum=0.1, weights=None, seed=0):
    """x (a param, so grad gives dx), scale and bias params, loss = sum(bn(x) * t) for a fed t."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    x0 = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w0, b0 = weights if weights is not None else (rng.standard_normal(C).astype(dtype),
                                                    rng.standard_normal(C).astype(dtype))
    g = lc.Graph("bn")
    x = g.param("x", x0)
    w, b = g.param("w", w0), g.param("b", b0)
    y = lc.batch_norm(x, w, b, training=training, relu=relu, momentum=momentum, name="bn")
    t = g.input("t", shape, dtype=dtype)
    g.output("y", y)
    return g, lc.sum(y * t), x0, w0, b0


def _torch_bn(shape, dtype, w0, b0, momentum=0.1):
    m = (torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm2d)(shape[1], momentum=momentum)
    m = m.to(TDT[dtype])
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w0))
        m.bias.copy_(torch.from_numpy(b0))
    return m


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 7), (2, 4, 5, 6)])
def test_training_mode_matches_torch_outputs_gradients_and_running_stats(shape, dtype):
    g, loss, x0, w0, b0 = _bn_graph(shape, dtype)
    prog = lc.compile(g, loss=loss)
    t0 = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    m = _torch_bn(shape, dtype, w0, b0).train()
    xt = torch.from_numpy(x0.copy()).requires_grad_(True)
    yt = m(xt)
    (yt * torch.from_numpy(t0)).sum().backward()
    np.testing.assert_allclose(prog.run({"t": t0})["y"], yt.detach().numpy(), **TOL[dtype])
    gr = prog.grad({"t": t0})
    np.testing.assert_allclose(gr["x"], xt.grad.numpy(), **TOL[dtype])
    np.testing.assert_allclose(gr["w"], m.weight.grad.numpy(), **TOL[dtype])
    np.testing.assert_allclose(gr["b"], m.bias.grad.numpy(), **TOL[dtype])
    # one training call = one train-mode forward of the module: the running statistics moved once
    np.testing.assert_allclose(prog.buffers["bn.running_mean"], m.running_mean.numpy(), **TOL[dtype])
    np.testing.assert_allclose(prog.buffers["bn.running_var"], m.running_var.numpy(), **TOL[dtype])


def test_run_is_training_mode_forward_but_leaves_running_stats_alone():
    g, loss, x0, w0, b0 = _bn_graph((6, 3, 4), "float32")
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1))
    before = prog.buffers
    prog.run({"t": np.ones((6, 3, 4), np.float32)})
    after = prog.buffers
    assert all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(after["bn.running_var"], np.ones(3, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("steps", [1, 3])
def test_sgd_steps_follow_torch_including_running_stats(steps, dtype):
    shape = (5, 4, 3, 3)
    g, loss, x0, w0, b0 = _bn_graph(shape, dtype, momentum=0.3)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.05, momentum=0.9))
    m = _torch_bn(shape, dtype, w0, b0, momentum=0.3).train()
    xt = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = torch.optim.SGD([xt, m.weight, m.bias], lr=0.05, momentum=0.9)
    rng = np.random.default_rng(2)
    for _ in range(steps):
        t0 = rng.standard_normal(shape).astype(dtype)
        l1 = prog.step({"t": t0})
        opt.zero_grad()
        lt = (m(xt) * torch.from_numpy(t0)).sum()
        lt.backward()
        opt.step()
        assert l1 == pytest.approx(lt.item(), rel=1e-4, abs=1e-4)
    p = prog.params
    np.testing.assert_allclose(p["x"], xt.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(p["w"], m.weight.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(prog.buffers["bn.running_mean"], m.running_mean.numpy(), **TOL[dtype])
    np.testing.assert_allclose(prog.buffers["bn.running_var"], m.running_var.numpy(), **TOL[dtype])
    # buffers are state, not params: never in params or gradients, never set by set_params
    assert "bn.running_mean" not in p and "bn.running_var" not in prog.grad({"t": t0})
    with pytest.raises(ValueError, match="unknown param 'bn.running_var'"):
        prog.set_params({"bn.running_var": np.ones(4, dtype)})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eval_mode_matches_torch_eval_outputs_and_gradients(dtype):
    shape = (4, 3, 5)
    rng = np.random.default_rng(3)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    g, loss, x0, w0, b0 = None, None, None, None, None
    g = lc.Graph("bn_eval")
    x0 = rng.standard_normal(shape).astype(dtype)
    w0, b0 = rng.standard_normal(3).astype(dtype), rng.standard_normal(3).astype(dtype)
    x, w, b = g.param("x", x0), g.param("w", w0), g.param("b", b0)
    y = lc.batch_norm(x, w, b, g.buffer("rm", rm), g.buffer("rv", rv), training=False, name="y")
    t = g.input("t", shape, dtype=dtype)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * t), optimizer=lc.SGD(0.1))
    m = _torch_bn(shape, dtype, w0, b0)
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(rm))
        m.running_var.copy_(torch.from_numpy(rv))
    m.eval()
    xt = torch.from_numpy(x0.copy()).requires_grad_(True)
    t0 = rng.standard_normal(shape).astype(dtype)
    yt = m(xt)
    (yt * torch.from_numpy(t0)).sum().backward()
    np.testing.assert_allclose(prog.run({"t": t0})["y"], yt.detach().numpy(), **TOL[dtype])
    gr = prog.grad({"t": t0})
    for k, want in (("x", xt.grad), ("w", m.weight.grad), ("b", m.bias.grad)):
        np.testing.assert_allclose(gr[k], want.numpy(), **TOL[dtype])
    prog.step({"t": t0})  # eval mode updates nothing
    np.testing.assert_array_equal(prog.buffers["rm"], rm)
    np.testing.assert_array_equal(prog.buffers["rv"], rv)


def _fd(f, x, h=1e-6):
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        out[i] = (f(xp) - f(xm)) / (2 * h)
    return out


@pytest.mark.parametrize("relu", [False, True])
def test_float64_gradients_match_central_differences(relu):
    shape = (3, 2, 4)
    g, loss, x0, w0, b0 = _bn_graph(shape, "float64", relu=relu)
    t0 = np.random.default_rng(4).standard_normal(shape)
    prog = lc.compile(g, loss=loss)
    gr = prog.grad({"t": t0})
    ref = lc.compile(*_bn_graph(shape, "float64", relu=relu)[:2])

    def f(name):
        def loss_of(v):
            ref.set_params({name: v})
            return float((ref.run({"t": t0})["y"] * t0).sum())
        return loss_of
    np.testing.assert_allclose(gr["x"], _fd(f("x"), x0), rtol=1e-6, atol=1e-7)
    ref.set_params({"x": x0})
    np.testing.assert_allclose(gr["w"], _fd(f("w"), w0), rtol=1e-6, atol=1e-7)


def test_gradients_through_the_statistics_outputs_match_central_differences():
    """A loss reading the batch mean, rstd and the new running statistics (only a graph reading them)."""
    shape = (4, 3, 2)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(shape)

    def build():
        g = lc.Graph("stats")
        x = g.param("x", x0)
        y, mean, rstd, nm, nv = lc.batch_norm(x, running_mean=g.param("rm", np.full(3, 0.5)),
                                              running_var=g.param("rv", np.full(3, 2.0)), return_stats=True,
                                              momentum=0.2)
        c = [g.const(rng.standard_normal(3)) for _ in range(4)]
        loss = lc.sum(y * y) + lc.sum(mean * c[0]) + lc.sum(rstd * c[1]) + lc.sum(nm * c[2]) + lc.sum(nv * c[3])
        g.output("loss", loss)
        return g, loss
    rng = np.random.default_rng(6)
    g, loss = build()
    prog = lc.compile(g, loss=loss)
    gr = prog.grad({})

    def f(name):
        def lo(v):
            prog.set_params({name: v})
            r = float(prog.run({})["loss"])
            return r
        return lo
    for name, v0 in (("x", x0), ("rm", np.full(3, 0.5)), ("rv", np.full(3, 2.0))):
        np.testing.assert_allclose(gr[name], _fd(f(name), v0), rtol=1e-6, atol=1e-7)
        prog.set_params({name: v0})


_THREADS_SCRIPT = r"""
import sys, numpy as np, libml_compile as lc
rng = np.random.default_rng(0)
shape = (16, 8, 24, 24)   # 73,728 elements: above the runtime's parallel threshold
g = lc.Graph("bn_threads")
x = g.param("x", rng.standard_normal(shape).astype(np.float32))
w = g.param("w", rng.standard_normal(8).astype(np.float32))
y = lc.batch_norm(x, w, None, relu=True, name="bn")
t = g.input("t", shape)
prog = lc.compile(g, loss=lc.sum(y * t), optimizer=lc.SGD(0.01), num_threads=int(sys.argv[1]))
for _ in range(2):
    prog.step({"t": rng.standard_normal(shape).astype(np.float32)})
np.savez(sys.argv[2], **prog.state_dict())
"""


def test_results_are_bit_identical_for_one_and_two_threads(tmp_path):
    outs = []
    for n in (1, 2):
        path = tmp_path / f"s{n}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(n), str(path)], check=True, env=env)
        outs.append(dict(np.load(path)))
    assert set(outs[0]) == set(outs[1]) and "bn.running_var" in outs[0]
    for k in outs[0]:
        assert np.array_equal(outs[0][k], outs[1][k]), k


def test_checkpoint_and_plan_file_keep_the_running_stats(tmp_path):
    shape = (4, 3, 5)
    g, loss, x0, w0, b0 = _bn_graph(shape, "float32")
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1))
    t0 = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    prog.step({"t": t0})
    trained = prog.buffers
    prog.save_checkpoint(tmp_path / "c.ckpt")
    prog.save(tmp_path / "p.plan")
    prog.step({"t": t0})
    assert not np.array_equal(prog.buffers["bn.running_mean"], trained["bn.running_mean"])
    prog.load_checkpoint(tmp_path / "c.ckpt")
    for k, v in trained.items():
        np.testing.assert_array_equal(prog.buffers[k], v)
    exe = libml_runtime.load(tmp_path / "p.plan")
    assert exe.plan.buffers == ["bn.running_mean", "bn.running_var"]
    for k, v in trained.items():
        np.testing.assert_array_equal(exe.buffers[k], v)
    # the loaded plan trains on exactly as the program: the same running statistics after the same step
    exe.step({"t": t0})
    prog.step({"t": t0})
    for k in trained:
        np.testing.assert_array_equal(exe.buffers[k], prog.buffers[k])


def test_bad_channel_count_is_a_clear_error():
    g = lc.Graph("bad")
    x = g.input("x", (4, 3, 5))
    with pytest.raises(ValueError, match=r"batch_norm: scale .* has shape \(4,\); expected \(3,\).*\(4, 3, 5\)"):
        lc.batch_norm(x, np.ones(4, np.float32), name="bn")
    with pytest.raises(ValueError, match=r"running_var .* \(2,\); expected \(3,\)"):
        lc.batch_norm(x, running_mean=g.buffer("rm", np.zeros(3, np.float32)),
                      running_var=g.buffer("rv", np.ones(2, np.float32)))
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        lc.batch_norm(g.input("v", (5,)), name="bn1")
    with pytest.raises(ValueError, match="one value per channel"):
        lc.batch_norm(g.input("one", (1, 3)), name="bn2")  # unbiased running variance of one value


def test_fused_relu_is_one_kernel_each_way():
    g = lc.Graph("bn_relu")
    x = g.param("x", np.random.default_rng(10).standard_normal((4, 3, 5)).astype(np.float32))
    r = lc.relu(lc.batch_norm(x, name="bn"))
    prog = lc.compile(g, loss=lc.sum(r * g.input("t", (4, 3, 5))))
    ins = prog.instructions("grad")
    # the forward kernel, the loss (a fused sum of r * t, no relu in it), the backward kernel
    assert [i["op"] for i in ins] == ["batch_norm+relu", "fused_elementwise", "batch_norm_grad+relu"]
    assert not any(m.startswith("relu") for m in ins[1]["members"])
    # a normalised tensor with another reader keeps its own node (a second node would update twice)
    g2 = lc.Graph("bn_two")
    x2 = g2.param("x", np.random.default_rng(11).standard_normal((4, 3)).astype(np.float32))
    y2 = lc.batch_norm(x2, name="bn")
    prog2 = lc.compile(g2, loss=lc.sum(lc.relu(y2) * y2))
    assert [i["op"] for i in prog2.instructions("grad")].count("batch_norm") == 1


# ---------------------------------------------------------------------------------------------------
# ONNX: the TorchScript exporter in training mode, import, training, export, ONNX Runtime

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _export_train(model, x, path):
    model.train()
    torch.onnx.export(model, (x,), str(path), dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, input_names=["x"], output_names=["out"])


class _Pool(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["mlp", "bn2d"])
def test_torchscript_training_export_trains_like_torch(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 3))
        shape = (8, 6)
    else:
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(), _Pool(), torch.nn.Linear(3, 3))
        shape = (4, 3, 5, 5)
    _export_train(model, torch.randn(shape), tmp_path / "m.onnx")
    g = lc.import_onnx(str(tmp_path / "m.onnx"))
    bn = [n for n in model if isinstance(n, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))][0]
    prefix = "1" if kind == "mlp" else "0"
    assert sorted(g.buffers) == [f"{prefix}.running_mean", f"{prefix}.running_var"]
    assert not set(g.buffers) & set(g.params)
    labels = g.input("labels", (shape[0],), dtype="int64")
    prog = lc.compile(g, loss=lc.softmax_cross_entropy(g.outputs["out"], labels), optimizer=lc.SGD(0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = np.random.default_rng(8)
    for _ in range(3):
        xs = rng.standard_normal(shape).astype(np.float32)
        ys = rng.integers(0, 3, shape[0])
        l1 = prog.step({"x": xs, "labels": ys})
        opt.zero_grad()
        lt = torch.nn.functional.cross_entropy(model(torch.from_numpy(xs)), torch.from_numpy(ys))
        lt.backward()
        opt.step()
        assert l1 == pytest.approx(lt.item(), rel=1e-5)
    np.testing.assert_allclose(prog.buffers[f"{prefix}.running_mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prog.buffers[f"{prefix}.running_var"], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        if k in prog.params:
            np.testing.assert_allclose(prog.params[k], v.numpy(), rtol=1e-5, atol=1e-6)

    # export: the trained params and running statistics are the initializers.  A training-mode graph in ONNX
    # Runtime normalises with batch statistics, as prog.run; switched to eval mode it uses the exported
    # running statistics, as PyTorch's model.eval()
    lc.export_onnx(prog, tmp_path / "trained.onnx")
    exported = onnx.load(str(tmp_path / "trained.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in exported.graph.initializer}
    np.testing.assert_array_equal(inits[f"{prefix}.running_var"], prog.buffers[f"{prefix}.running_var"])
    xs = rng.standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": xs})[0], prog.run({"x": xs})["out"], rtol=1e-4, atol=1e-5)
    for node in exported.graph.node:
        if node.op_type == "BatchNormalization":
            del node.output[1:]
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
    onnx.save(exported, str(tmp_path / "eval.onnx"))
    ev = lc.compile(lc.import_onnx(str(tmp_path / "eval.onnx")))
    sess = ort.InferenceSession(str(tmp_path / "eval.onnx"), providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": xs})[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ev.run({"x": xs})["out"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_eval_mode_export_fine_tunes_and_matches_onnxruntime(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    torch.onnx.export(model, (torch.randn(4, 5),), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                      output_names=["out"], do_constant_folding=False)
    g = lc.import_onnx(str(tmp_path / "m.onnx"))
    assert sorted(g.buffers) == ["1.running_mean", "1.running_var"]
    labels = g.input("labels", (4,), dtype="int64")
    prog = lc.compile(g, loss=lc.softmax_cross_entropy(g.outputs["out"], labels), optimizer=lc.SGD(0.5))
    rng = np.random.default_rng(9)
    for _ in range(3):
        prog.step({"x": rng.standard_normal((4, 5)).astype(np.float32), "labels": rng.integers(0, 2, 4)})
    np.testing.assert_array_equal(prog.buffers["1.running_var"], model[1].running_var.numpy())
    lc.export_onnx(prog, tmp_path / "tuned.onnx")
    xs = rng.standard_normal((4, 5)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "tuned.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": xs})[0], prog.run({"x": xs})["out"], rtol=1e-4, atol=1e-5)


def test_onnx_import_names_the_node_on_a_wrong_channel_count():
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn0")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    from libml_compile.onnx_import import ONNXImportError
    with pytest.raises(ONNXImportError, match=r"node name: bn0.*between 4 and 3"):  # (ONNX shape inference's)
        lc.import_onnx(model)


def test_plan_validator_refuses_a_running_stats_update_into_a_fed_input():
    """Running statistics fed as inputs (ONNX's test cases) are only read; a plan whose batch_norm claims to
    write over them is refused before it runs."""
    from libml_runtime import format as F
    from libml_runtime.plan import PlanError, validate
    g = lc.Graph("fed_stats")
    x = g.param("x", np.random.default_rng(12).standard_normal((4, 3)).astype(np.float32))
    y = lc.batch_norm(x, running_mean=g.input("rm", (3,)), running_var=g.input("rv", (3,)))
    prog = lc.compile(g, loss=lc.sum(y * y))
    e = prog.plan.entries["grad"]
    pc = next(pc for pc, op, _, _ in F.instructions(e.code) if op == "batch_norm")
    _, where = F.locate(e.code, pc)
    assert e.code[where["flags"]] & 1 == 0 and e.code[where["rmean.slot"]] >= F.SLOT_INPUT0
    e.code[where["flags"]] |= 1
    with pytest.raises(PlanError, match="rmean writes into a fed input"):
        validate(prog.plan)
