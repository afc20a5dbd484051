"""Convolution fusions (ops_conv.fuse_conv_epilogues, ops_conv.pointwise_convs_as_gemms,
passes.fold_sgd_into_conv): conv + eval-mode BatchNorm + HardSwish / HardSigmoid / Clip (ReLU6) in one
kernel, the pre-activation kept for a gradient that reads it, squeeze-excitation as GEMMs, plain SGD in
the weight-gradient kernel.  Oracles: PyTorch (forward, autograd, torch.optim.SGD), ONNX Runtime for an
exported MobileNetV3-style block, float64 central differences; the unfused step's bits for the SGD fold."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import libml_compile as lc
from libml_compile import ops, ops_conv, passes

torch.set_num_threads(1)


def _close(got, want, rtol, what):
    """|got - want| <= rtol * max|want| elementwise (sums of many terms: relative to the tensor's scale)."""
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


def _ops(prog, entry):
    return [i["op"] for i in prog.instructions(entry)]


def _convs(prog, entry):
    return [o for o in _ops(prog, entry) if o.startswith("conv")]


# ---------------------------------------------------------------------------------------------------
# PyTorch modules and the same networks declared in libml, sharing the parameter values

class ConvBnAct(torch.nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=torch.nn.Hardswish, bias=False):
        layers = [torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), torch.nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


def conv_act(cin, cout, k, act):
    """Conv2d (with bias) -> act, no BatchNorm."""
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, 1, k // 2), act())


class SE(torch.nn.Module):
    """torchvision MobileNetV3's SqueezeExcitation: GAP -> 1x1 conv -> ReLU -> 1x1 conv -> Hardsigmoid -> * x."""
    def __init__(self, c, s):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Conv2d(c, s, 1), torch.nn.Conv2d(s, c, 1)

    def forward(self, x):
        s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class Block(torch.nn.Module):
    """A MobileNetV3-small inverted residual (expand 1x1, depthwise 3x3, SE, project 1x1) after a stem."""
    def __init__(self, cin=3, c=8, e=24, s=8):
        super().__init__()
        self.stem = ConvBnAct(cin, c, 3, stride=2)
        self.expand = ConvBnAct(c, e, 1)
        self.dw = ConvBnAct(e, e, 3, groups=e)
        self.se = SE(e, s)
        self.project = ConvBnAct(e, c, 1, act=None)

    def forward(self, x):
        h = self.stem(x)
        return h + self.project(self.se(self.dw(self.expand(h))))


class BasicBlock(torch.nn.Module):
    """torchvision ResNet's BasicBlock: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + the shortcut (identity, or
    conv1x1 at the stride -> BN), ReLU; ``bn=False``: the convs with biases, no BatchNorm."""
    def __init__(self, cin, c, stride=1, bn=True):
        super().__init__()
        cba = ConvBnAct if bn else (lambda i, o, k, s=1, act=None: torch.nn.Sequential(
            torch.nn.Conv2d(i, o, k, s, k // 2), *([act()] if act else [])))
        self.a = cba(cin, c, 3, stride, act=torch.nn.ReLU)
        self.b = cba(c, c, 3, act=None)
        self.down = cba(cin, c, 1, stride, act=None) if stride != 1 or cin != c else None

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + (x if self.down is None else self.down(x)))


def _randomise_bn(net, seed):
    """Non-trivial running statistics and affine params (PyTorch's init is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return net.eval()


def _declare(g, x, net, prefix=""):
    """``net``'s forward on ``x`` as libml ops: conv params and BatchNorm scale/bias are params, running
    statistics buffers, named as PyTorch names them."""
    def P(name, t):
        return g.param(prefix + name, t.detach().numpy().astype(np.float32).copy())

    def run(m, h, name):
        if isinstance(m, torch.nn.Conv2d):
            return lc.conv(h, P(f"{name}.weight", m.weight), P(f"{name}.bias", m.bias) if m.bias is not None else None,
                           strides=m.stride, pads=m.padding, group=m.groups)
        if isinstance(m, torch.nn.BatchNorm2d):
            return lc.batch_norm(h, P(f"{name}.weight", m.weight), P(f"{name}.bias", m.bias),
                                 g.buffer(f"{prefix}{name}.running_mean", m.running_mean.numpy().copy()),
                                 g.buffer(f"{prefix}{name}.running_var", m.running_var.numpy().copy()),
                                 training=False, eps=m.eps)
        if isinstance(m, torch.nn.Hardswish):
            return lc.hard_swish(h)
        if isinstance(m, torch.nn.Hardsigmoid):
            return lc.hard_sigmoid(h, 1 / 6, 0.5)
        if isinstance(m, torch.nn.ReLU6):
            return lc.clip(h, 0.0, 6.0)
        if isinstance(m, torch.nn.ReLU):
            return lc.relu(h)
        if isinstance(m, torch.nn.Sequential):
            for k, sub in m.named_children():
                h = run(sub, h, f"{name}.{k}" if name else k)
            return h
        if isinstance(m, SE):
            pre = f"{name}." if name else ""
            s = lc.mean(h, axis=(2, 3), keepdims=True)
            s = lc.relu(run(m.fc1, s, pre + "fc1"))
            return h * lc.hard_sigmoid(run(m.fc2, s, pre + "fc2"), 1 / 6, 0.5)
        if isinstance(m, BasicBlock):
            s = h if m.down is None else run(m.down, h, "down")
            return lc.relu(run(m.b, run(m.a, h, "a"), "b") + s)
        if isinstance(m, Block):
            h = run(m.stem, h, "stem")
            return h + run(m.project, run(m.se, run(m.dw, run(m.expand, h, "expand"), "dw"), "se"), "project")
        raise TypeError(type(m))
    return run(net, x, "")


def _program(net, xs, loss=True, seed=0, **kw):
    """(program, feeds, PyTorch output, PyTorch grads by param name) for loss = sum(y * y * r) / 2 (the
    upstream gradient y * r depends on y, as in a real network)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    g = lc.Graph("net")
    y = _declare(g, g.input("x", xs), net)
    g.output("y", y)
    feeds = {"x": x}
    X = torch.tensor(x)
    if not loss:
        with torch.no_grad():
            return lc.compile(g, **kw), feeds, net(X).numpy(), None
    r = rng.uniform(-1, 1, y.shape).astype(np.float32)
    feeds["r"] = r
    lt = lc.sum(y * y * g.input("r", y.shape)) * 0.5
    prog = lc.compile(g, loss=lt, **kw)
    net.zero_grad()
    Y = net(X)
    (Y * Y * torch.tensor(r)).sum().mul(0.5).backward()
    grads = {n: p.grad.numpy().copy() for n, p in net.named_parameters() if p.grad is not None}
    return prog, feeds, Y.detach().numpy(), grads


def _conv_names(net):
    return [n for n, p in net.named_parameters() if p.ndim == 4 or (n.endswith(".bias") and "fc" in n)]


# ---------------------------------------------------------------------------------------------------
# conv + BatchNorm (eval) + activation

def test_forward_only_conv_bn_hardswish_is_one_conv_kernel_and_matches_pytorch():
    torch.manual_seed(0)
    net = _randomise_bn(ConvBnAct(4, 16, 3), 1)
    prog, feeds, want, _ = _program(net, (2, 4, 12, 12), loss=False)
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    rows = prog.instructions("run")
    assert _convs(prog, "run") == ["conv+bias+scale+hard_swish"], rows
    y_bytes = 2 * 16 * 12 * 12 * 4
    # the rest is the per-channel factor and shift (a few (16,) vectors), never a pass over y
    assert all(r["bytes"] < y_bytes / 8 for r in rows if not r["op"].startswith("conv")), rows
    # the params stay the model's (nothing folded into them): the factors follow a new BN scale
    before = prog.params
    assert np.array_equal(before["0.weight"], net[0].weight.detach().numpy())
    new_scale = (net[1].weight.detach().numpy() * 1.5).astype(np.float32)
    prog.set_params({"1.weight": new_scale})
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(new_scale))
        want2 = net(torch.tensor(feeds["x"])).numpy()
    _close(prog.run(feeds)["y"], want2, 1e-5, "forward after set_params")


def test_constant_bn_statistics_fold_into_compile_time_constants():
    rng = np.random.default_rng(2)
    g = lc.Graph("const_bn")
    x = g.input("x", (2, 3, 8, 8))
    W = (rng.standard_normal((5, 3, 3, 3)) * 0.3).astype(np.float32)
    w = g.param("w", W)
    sc, sh = (1 + 0.1 * rng.standard_normal(5)).astype(np.float32), (0.1 * rng.standard_normal(5)).astype(np.float32)
    rm, rv = (0.1 * rng.standard_normal(5)).astype(np.float32), (1 + rng.random(5)).astype(np.float32)
    y = lc.clip(lc.batch_norm(lc.conv(x, w, pads=1), sc, sh, g.const(rm), g.const(rv), training=False), 0.0, 6.0)
    g.output("y", y)
    prog = lc.compile(g)
    assert _ops(prog, "run") == ["conv+bias+scale+clip"]  # no instruction computes the factors
    X = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    a = sc / np.sqrt(rv + 1e-5)
    ref = torch.nn.functional.conv2d(torch.tensor(X), torch.tensor(W), padding=1).numpy()
    want = np.clip(ref * a.reshape(1, 5, 1, 1) + (sh - rm * a).reshape(1, 5, 1, 1), 0, 6)
    _close(prog.run({"x": X})["y"], want, 1e-5, "forward")


def test_conv_bn_hardswish_gradients_match_pytorch_with_trained_and_with_frozen_bn():
    torch.manual_seed(1)
    net = _randomise_bn(ConvBnAct(4, 16, 3, bias=True), 3)
    # every param trained: BatchNorm's scale gradient reads the conv output, so the BatchNorm stays an
    # elementwise kernel (not fused) and the conv keeps its bias only
    prog, feeds, want, tg = _program(net, (2, 4, 10, 10))
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    assert _convs(prog, "grad")[0] == "conv+bias"
    grads = prog.grad(feeds)
    for k, v in tg.items():
        _close(grads[k], v, 1e-3, f"d {k}")
    # frozen BatchNorm: conv + scale + hard_swish in one kernel, keeping the pre-activation for the backward
    prog2, feeds2, _, tg2 = _program(net, (2, 4, 10, 10), trainable=["0.weight", "0.bias"])
    assert _convs(prog2, "grad")[0] == "conv+bias+scale+hard_swish(keep)"
    grads2 = prog2.grad(feeds2)
    for k in ("0.weight", "0.bias"):
        _close(grads2[k], tg2[k], 1e-3, f"d {k} (frozen BN)")


def test_conv_relu6_as_clip_fuses_forward_and_backward_and_matches_pytorch():
    torch.manual_seed(2)
    net = conv_act(3, 8, 3, torch.nn.ReLU6)
    with torch.no_grad():
        net[0].weight.mul_(6.0)  # outputs on both sides of [0, 6]
    prog, feeds, want, tg = _program(net, (2, 3, 9, 9))
    y = prog.run(feeds)["y"]
    assert (y == 0).mean() > 0.1 and (y == 6).mean() > 0.02
    _close(y, want, 1e-5, "forward")
    assert _convs(prog, "run") == ["conv+bias+clip"]
    assert _convs(prog, "grad")[0] == "conv+bias+clip(keep)"
    assert not any("clip:" in m for r in prog.instructions("run") for m in r.get("members", ()))
    grads = prog.grad(feeds)
    for k, v in tg.items():
        _close(grads[k], v, 1e-3, f"d {k}")


def test_conv_hardsigmoid_gradient_comes_from_the_output_nothing_kept():
    torch.manual_seed(3)
    net = conv_act(3, 6, 3, torch.nn.Hardsigmoid)
    with torch.no_grad():
        net[0].weight.mul_(4.0)
    prog, feeds, want, tg = _program(net, (2, 3, 8, 8))
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    assert _convs(prog, "grad")[0] == "conv+bias+hard_sigmoid"
    grads = prog.grad(feeds)
    for k, v in tg.items():
        _close(grads[k], v, 1e-3, f"d {k}")


def test_depthwise_conv_bn_hardswish_fuses_on_the_direct_path_and_matches_pytorch():
    torch.manual_seed(4)
    net = _randomise_bn(ConvBnAct(12, 12, 3, groups=12), 5)
    prog, feeds, want, tg = _program(net, (2, 12, 9, 9), trainable=["0.weight"])
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    assert _convs(prog, "run") == ["conv+bias+scale+hard_swish(depthwise)"]
    assert _convs(prog, "grad")[0] == "conv+bias+scale+hard_swish(keep)(depthwise)"
    _close(prog.grad(feeds)["0.weight"], tg["0.weight"], 1e-3, "d weight")


def test_float64_central_differences_through_a_fused_scaled_kept_conv():
    rng = np.random.default_rng(6)
    g = lc.Graph("fd")
    x = g.param("x", rng.standard_normal((1, 2, 5, 5)) * 2)
    w = g.param("w", rng.standard_normal((3, 2, 3, 3)))
    b = g.param("b", rng.standard_normal(3))
    a = g.const(rng.uniform(0.5, 1.5, (1, 3, 1, 1)))
    y = lc.hard_swish(lc.conv(x, w, b, pads=1) * a + g.const(rng.standard_normal((1, 3, 1, 1))))
    loss = lc.sum(y * y)
    prog = lc.compile(g, loss=loss)
    assert _convs(prog, "grad")[0] == "conv+bias+scale+hard_swish(keep)"
    grads = prog.grad({})
    p0 = prog.params
    eps = 1e-6
    for name in ("x", "w", "b"):
        flat = p0[name].reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 7)):
            vals = []
            for s in (eps, -eps):
                q = flat.copy()
                q[i] += s
                prog.set_params({name: q.reshape(p0[name].shape)})
                vals.append(float(prog.run({})["loss"]))  # (the graph has no outputs: run returns the loss)
            prog.set_params({name: p0[name]})
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(grads[name].reshape(-1)[i] - fd) <= 1e-6 * max(1.0, abs(fd)), (name, i)


def test_gradient_rule_of_a_fused_conv_node_matches_the_unfused_ops():
    """autodiff never meets a fused conv (the passes fuse after it); its rule is still complete: a fused
    node declared directly gets the gradients of conv * scale + bias -> activation."""
    rng = np.random.default_rng(7)
    xs, ws = (2, 3, 6, 6), (4, 3, 3, 3)
    vals = {"x": rng.standard_normal(xs), "w": rng.standard_normal(ws), "b": rng.standard_normal(4),
            "s": rng.uniform(0.5, 2, 4)}
    geo = {"strides": (1, 1), "pads": (1, 1, 1, 1), "dilations": (1, 1), "group": 1}
    for act, params, keep in (("hard_swish", (), False), ("clip", (-0.5, 1.0), True), ("relu", (), False)):
        g = lc.Graph("rule")
        P = {k: g.param(k, v) for k, v in vals.items()}
        y = ops.make("conv", (P["x"], P["w"], P["b"], P["s"]),
                     {**geo, "act": act, "act_params": params, "scaled": True, "keep": keep})
        y = y[0] if keep else y
        loss = lc.sum(y * y)
        got = lc.compile(g, loss=loss, fuse=False).grad({})
        T = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
        v = torch.nn.functional.conv2d(T["x"], T["w"], padding=1) * T["s"].reshape(1, 4, 1, 1) + T["b"].reshape(1, 4, 1, 1)
        out = {"hard_swish": torch.nn.functional.hardswish, "relu": torch.relu,
               "clip": lambda t: torch.clamp(t, *params)}[act](v)
        (out * out).sum().backward()
        for k in vals:
            _close(got[k], T[k].grad.numpy(), 1e-10, f"{act} d{k}")


# ---------------------------------------------------------------------------------------------------
# squeeze-excitation: 1x1 convs on (N, C, 1, 1) as GEMMs, the Mul one broadcast pass

def test_squeeze_excitation_runs_as_gemms_and_one_broadcast_multiply():
    torch.manual_seed(8)
    net = SE(16, 8)
    prog, feeds, want, tg = _program(net, (4, 16, 7, 7))
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    assert _ops(prog, "run") == ["sum", "gemm+bias+relu", "gemm+bias+hard_sigmoid", "mul"], prog.summary("run")
    grad_ops = _ops(prog, "grad")
    assert not any(o.startswith("conv") for o in grad_ops), grad_ops
    # the multiply's two gradients (d x = g * s broadcast, d s = sum over the image of g * x) in one pass
    rows = prog.instructions("grad")
    both = [r for r in rows if r["op"] == "fused_elementwise" and sum(m.startswith("sum") for m in r["members"]) >= 2]
    assert both, prog.summary("grad")
    grads = prog.grad(feeds)
    for k, v in tg.items():
        _close(grads[k], v, 1e-3, f"d {k}")


# ---------------------------------------------------------------------------------------------------
# plain SGD folded into the weight-gradient kernel

def _sgd_net(depthwise=False):
    torch.manual_seed(9)
    if depthwise:
        return torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=False))


def _sgd_program(net, xs, opt, num_threads=None):
    g = lc.Graph("sgd")
    y = _declare(g, g.input("x", xs), net)
    lt = lc.sum(y * y * g.input("r", y.shape)) * 0.5
    return lc.compile(g, loss=lt, optimizer=opt, num_threads=num_threads)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_sgd_folded_conv_training_follows_torch_sgd_for_3_steps(depthwise):
    net = _sgd_net(depthwise)
    xs = (2, 8 if depthwise else 3, 10, 10)
    prog = _sgd_program(net, xs, lc.SGD(0.05, weight_decay=0.01))
    ops_step = _ops(prog, "step")
    assert ops_step.count("conv_grad_weight+sgd" + ("(depthwise)" if depthwise else "")) == 2, ops_step
    assert not any(o.startswith("conv_grad_weight") and "+sgd" not in o for o in ops_step), ops_step
    opt = torch.optim.SGD(net.parameters(), lr=0.05, weight_decay=0.01)
    rng = np.random.default_rng(10)
    for _ in range(3):
        x = rng.standard_normal(xs).astype(np.float32)
        r = rng.uniform(-1, 1, prog.plan.graph_inputs[1][2]).astype(np.float32)
        prog.step({"x": x, "r": r})
        opt.zero_grad()
        Y = net(torch.tensor(x))
        (Y * Y * torch.tensor(r)).sum().mul(0.5).backward()
        opt.step()
    got = prog.params
    for n, p in net.named_parameters():
        _close(got[n], p.detach().numpy(), 1e-5, f"{n} after 3 steps")


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_fold_changes_no_bit_of_the_update(monkeypatch, depthwise, wd):
    xs = (2, 8 if depthwise else 3, 10, 10)
    rng = np.random.default_rng(11)
    batches = [(rng.standard_normal(xs).astype(np.float32), None) for _ in range(3)]
    out = []
    for fold in (True, False):
        if not fold:
            monkeypatch.setattr(passes, "fold_sgd_into_conv", lambda nodes, roots: roots)
        prog = _sgd_program(_sgd_net(depthwise), xs, lc.SGD(0.05, weight_decay=wd))
        assert any("+sgd" in o for o in _ops(prog, "step")) == fold
        shape = prog.plan.graph_inputs[1][2]
        for k, (x, _) in enumerate(batches):
            prog.step({"x": x, "r": np.random.default_rng(k).uniform(-1, 1, shape).astype(np.float32)})
        out.append(prog.params)
    for n in out[0]:
        assert out[0][n].tobytes() == out[1][n].tobytes(), f"{n}: the folded step differs from the unfused one"


def test_momentum_keeps_the_conv_weight_gradient():
    prog = _sgd_program(_sgd_net(), (2, 3, 10, 10), lc.SGD(0.05, momentum=0.9))
    assert not any("+sgd" in o for o in _ops(prog, "step"))
    prog = _sgd_program(_sgd_net(), (2, 3, 10, 10), lc.Adam(1e-3))
    assert not any("+sgd" in o for o in _ops(prog, "step"))


# ---------------------------------------------------------------------------------------------------
# a MobileNetV3-small block: every fusion at once; threads; ONNX

def test_mobilenet_block_fuses_every_conv_and_matches_pytorch():
    torch.manual_seed(12)
    net = _randomise_bn(Block(), 13)
    convs = [n for n, p in net.named_parameters() if p.ndim == 4 and "fc" not in n]
    prog, feeds, want, tg = _program(net, (2, 3, 16, 16), trainable=convs + ["se.fc1.weight", "se.fc1.bias",
                                                                          "se.fc2.weight", "se.fc2.bias"])
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    assert _convs(prog, "run") == ["conv+bias+scale+hard_swish", "conv+bias+scale+hard_swish",
                                   "conv+bias+scale+hard_swish(depthwise)", "conv+bias+scale+res"], prog.summary("run")
    assert [o for o in _ops(prog, "run") if o.startswith("gemm")] == ["gemm+bias+relu", "gemm+bias+hard_sigmoid"]
    grads = prog.grad(feeds)
    for k in grads:
        _close(grads[k], tg[k], 1e-3, f"d {k}")


@pytest.mark.parametrize("stride,cin,bn", [(1, 8, True), (2, 8, True), (1, 8, False), (2, 4, False)],
                         ids=["identity_bn", "downsample_bn", "identity_bias", "downsample_bias"])
def test_resnet_block_adds_its_shortcut_in_the_conv_epilogue_and_matches_pytorch(stride, cin, bn):
    torch.manual_seed(20)
    net = BasicBlock(cin, 8, stride, bn)
    net = _randomise_bn(net, 21) if bn else net.eval()
    convs = [n for n, p in net.named_parameters() if p.ndim == 4 or not bn]
    prog, feeds, want, tg = _program(net, (2, cin, 12, 12), trainable=convs)
    # (a projection shortcut without BatchNorm runs inside the block's conv: test_conv_shortcut.py)
    fused = "+shortcut+relu" if net.down is not None and not bn else "+res+relu"
    for entry in ("run", "grad"):
        names = _convs(prog, entry)
        assert sum(fused in o for o in names) == 1, (entry, names)
        assert not any(m.startswith("add") for r in prog.instructions(entry) if r["op"] == "fused_elementwise"
                       for m in r.get("members", ()) if "relu" in str(r.get("members"))), prog.summary(entry)
    _close(prog.run(feeds)["y"], want, 1e-5, "forward")
    grads = prog.grad(feeds)
    assert set(grads) == set(convs)
    for k in convs:
        _close(grads[k], tg[k], 1e-3, f"d {k}")


def test_residual_epilogue_changes_no_bit_of_the_forward_or_the_gradients(monkeypatch):
    torch.manual_seed(22)
    net = _randomise_bn(BasicBlock(8, 16, 2), 23)
    convs = [n for n, p in net.named_parameters() if p.ndim == 4]
    out = {}
    for fuse in (False, True):
        monkeypatch.setattr(ops_conv, "FUSE_RESIDUAL", fuse)
        prog, feeds, _, _ = _program(net, (3, 8, 13, 11), trainable=convs)
        assert any("+res" in o for o in _convs(prog, "run")) == fuse
        out[fuse] = (prog.run(feeds)["y"], prog.grad(feeds))
    assert out[True][0].tobytes() == out[False][0].tobytes()
    for k in out[False][1]:
        assert out[True][1][k].tobytes() == out[False][1][k].tobytes(), k


def test_a_conv_output_read_elsewhere_or_a_broadcast_add_is_not_a_residual():
    g = lc.Graph("r")
    x = g.input("x", (2, 4, 8, 8))
    w = g.param("w", np.ones((4, 4, 3, 3), np.float32))
    c = lc.conv(x, w, pads=1)
    g.output("y", lc.relu(c + x))
    g.output("c", c)                                           # the conv's output is an output itself
    g.output("z", lc.relu(lc.conv(x, w, pads=1) + g.param("row", np.ones((1, 1, 1, 8), np.float32))))
    prog = lc.compile(g)
    assert not any("+res" in o for o in _convs(prog, "run")), prog.summary("run")


def test_the_plan_validator_refuses_a_residual_overlapping_the_output():
    from libml_runtime import PlanError
    from libml_runtime import format as F
    from libml_runtime.plan import validate
    torch.manual_seed(24)
    prog, _, _, _ = _program(BasicBlock(8, 8, 1, bn=False).eval(), (2, 8, 6, 6), loss=False)
    e = prog.plan.entries["run"]
    pc = next(pc for pc, op, _, d in F.instructions(e.code) if op == "conv" and d["res.slot"] >= 0)
    where = F.locate(e.code, pc)[1]
    saved = [int(e.code[where[f]]) for f in ("res.slot", "res.offset")]
    e.code[where["res.slot"]], e.code[where["res.offset"]] = e.code[where["y.slot"]], e.code[where["y.offset"]]
    try:
        with pytest.raises(PlanError, match="res overlaps y"):
            validate(prog.plan)
    finally:
        e.code[where["res.slot"]], e.code[where["res.offset"]] = saved
    validate(prog.plan)


def test_fused_programs_are_bit_identical_for_1_and_2_threads():
    torch.manual_seed(14)
    net = _randomise_bn(Block(cin=3, c=16, e=48, s=16), 15)
    convs = [n for n, p in net.named_parameters() if p.ndim == 4]
    res = []
    for nt in (1, 2):
        prog, feeds, _, _ = _program(net, (8, 3, 64, 64), trainable=convs, num_threads=nt)
        g = lc.Graph("sgd_nt")
        y = _declare(g, g.input("x", (8, 3, 64, 64)), net)
        lt = lc.sum(y * y * g.input("r", y.shape)) * 0.5
        sgd = lc.compile(g, loss=lt, optimizer=lc.SGD(0.01), trainable=convs, num_threads=nt)
        sgd.step(feeds)
        res.append((prog.run(feeds)["y"], prog.grad(feeds), sgd.params))
    (y1, g1, p1), (y2, g2, p2) = res
    assert y1.tobytes() == y2.tobytes()
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes(), f"d {k} differs between 1 and 2 threads"
    for k in p1:
        assert p1[k].tobytes() == p2[k].tobytes(), f"{k} after an SGD step differs between 1 and 2 threads"


def test_mobilenet_block_exported_by_pytorch_fuses_and_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(16)
    net = _randomise_bn(Block(), 17)
    x = torch.randn(2, 3, 16, 16)
    f = io.BytesIO()
    torch.onnx.export(net, (x,), f, dynamo=False, do_constant_folding=False, input_names=["x"], output_names=["y"])
    prog = lc.compile(lc.import_onnx(f.getvalue()))
    convs = _convs(prog, "run")
    assert sum("hard_swish" in c for c in convs) == 3 and all("+scale" in c for c in convs), prog.summary("run")
    assert "gemm+bias+hard_sigmoid" in _ops(prog, "run")
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x.numpy()})[0]
    got = prog.run({"x": x.numpy()})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# the validator refuses epilogue fields the kernels do not implement

def test_the_plan_validator_refuses_bad_epilogue_and_sgd_fields():
    from libml_runtime import PlanError
    from libml_runtime import format as F
    from libml_runtime.plan import validate
    torch.manual_seed(18)
    net = conv_act(3, 8, 3, torch.nn.ReLU6)
    g = lc.Graph("v")
    y = _declare(g, g.input("x", (2, 3, 8, 8)), net)
    prog = lc.compile(g, loss=lc.sum(y * y), optimizer=lc.SGD(0.1))
    plan = prog.plan
    for entry, opname, field, value, msg in (
            ("step", "conv", "act", 2, "act = 2 is not a conv epilogue"),
            ("step", "conv", "epi.vm", 999, "epi.vm = 999 is not a VM opcode"),
            ("step", "conv", "epi.c", 0, "epi.c is unused but VM opcode"),
            ("step", "conv", "act", 0, "pre .* needs an activation"),
            ("step", "conv", "scale.offset", 1 << 45, "scale spans"),
            ("step", "conv_grad_weight", "sgd", 2, "sgd = 2"),
            ("step", "conv_grad_weight", "lr", 10 ** 6, "lr = 1000000")):
        e = plan.entries[entry]
        pc = next(pc for pc, op, _, _ in F.instructions(e.code) if op == opname)
        where = F.locate(e.code, pc)[1]
        saved = int(e.code[where[field]])
        if field == "scale.offset":
            e.code[where["scale.slot"]], saved_slot = 0, int(e.code[where["scale.slot"]])
        e.code[where[field]] = value
        try:
            with pytest.raises(PlanError, match=msg):
                validate(plan)
        finally:
            e.code[where[field]] = saved
            if field == "scale.offset":
                e.code[where["scale.slot"]] = saved_slot
    validate(plan)
