"""A ResNet block's projection shortcut inside the block's second conv (ops_conv.fuse_conv_shortcuts,
format 2.7 ``conv_shortcut``): conv3x3(h) + conv1x1_s2(x) -> ReLU as one instruction whose reduction runs
over the conv's taps and then the shortcut's channels, on both tiled kernels (algo 1, algo 2).

Oracles: PyTorch (forward and autograd through the fused forward), the unfused compile in float64, and the
plan validator's refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import libml_compile as lc
from libml_compile import ops_conv

torch.set_num_threads(1)


class DownBlock(torch.nn.Module):
    """torchvision's BasicBlock with a projection shortcut, convs with biases instead of BatchNorm (an
    eval-mode export folds BatchNorm into them: what W8's ``W6_eval.onnx`` holds)."""
    def __init__(self, cin, c, stride):
        super().__init__()
        self.a = torch.nn.Conv2d(cin, c, 3, stride, 1)
        self.b = torch.nn.Conv2d(c, c, 3, 1, 1)
        self.down = torch.nn.Conv2d(cin, c, 1, stride, 0)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.down(x))


def _declare(g, x, net, dtype=np.float32):
    def conv(m, h, name):
        return lc.conv(h, g.param(f"{name}.weight", m.weight.detach().numpy().astype(dtype)),
                       g.param(f"{name}.bias", m.bias.detach().numpy().astype(dtype)), strides=m.stride,
                       pads=m.padding)
    return lc.relu(conv(net.b, lc.relu(conv(net.a, x, "a")), "b") + conv(net.down, x, "down"))


def _compile(net, xs, dtype=np.float32, loss=True, **kw):
    g = lc.Graph("block")
    y = _declare(g, g.input("x", xs, dtype), net, dtype)
    g.output("y", y)
    if not loss:
        return lc.compile(g, **kw)
    return lc.compile(g, loss=lc.sum(y * y * g.input("r", y.shape, dtype)) * 0.5, **kw)


def _convs(prog, entry):
    return [i["op"] for i in prog.instructions(entry) if i["op"].startswith("conv")]


def _close(got, want, rtol, what):
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


@pytest.fixture(params=[False, True], ids=["algo1", "algo2"])
def algo(request, monkeypatch):
    """algo 1 (OCV_FORCE False) or algo 2 (True) on every conv that can run it."""
    monkeypatch.setattr(ops_conv, "OCV_FORCE", request.param)
    return 2 if request.param else 1


@pytest.mark.parametrize("cin,c,stride,xs", [(8, 16, 2, (2, 8, 12, 12)), (16, 16, 2, (3, 16, 13, 11)),
                                             (8, 16, 1, (2, 8, 9, 10))], ids=["s2", "s2_odd", "s1_projection"])
def test_projection_shortcut_runs_inside_the_block_conv_and_matches_pytorch(algo, cin, c, stride, xs):
    torch.manual_seed(30)
    net = DownBlock(cin, c, stride)
    prog = _compile(net, xs)
    rng = np.random.default_rng(31)
    x = rng.standard_normal(xs).astype(np.float32)
    X = torch.tensor(x)
    Y = net(X)
    r = rng.uniform(-1, 1, tuple(Y.shape)).astype(np.float32)
    for entry in ("run", "grad"):
        names = _convs(prog, entry)
        # the shortcut's own conv is gone from the forward: conv a, then the fused block conv
        assert names[:2] == ["conv+bias+relu", "conv+bias+shortcut+relu"], (entry, names)
        assert not any(o.startswith("conv+bias") for o in names[2:]), (entry, names)
    _close(prog.run({"x": x})["y"], Y.detach().numpy(), 1e-5, "forward")
    net.zero_grad()
    (Y * Y * torch.tensor(r)).sum().mul(0.5).backward()
    grads = prog.grad({"x": x, "r": r})
    for k, p in net.named_parameters():
        _close(grads[k], p.grad.numpy(), 1e-4, f"d {k}")
    step = [o for o in prog.instructions("run") if o["op"] == "conv+bias+shortcut+relu"]
    assert step and all(o["flops"] > 0 for o in step)


def test_fused_shortcut_agrees_with_the_unfused_compile_in_float64_and_for_any_thread_count(algo, monkeypatch):
    torch.manual_seed(32)
    net = DownBlock(8, 16, 2).double()
    xs = (5, 8, 14, 10)
    x = np.random.default_rng(33).standard_normal(xs)
    out = {}
    for fuse, nt in ((False, 1), (True, 1), (True, 2)):
        monkeypatch.setattr(ops_conv, "FUSE_SHORTCUT", fuse)
        prog = _compile(net, xs, np.float64, loss=False, num_threads=nt)
        assert any("+shortcut" in o for o in _convs(prog, "run")) == fuse
        out[fuse, nt] = prog.run({"x": x})["y"]
    np.testing.assert_allclose(out[True, 1], out[False, 1], rtol=1e-13, atol=1e-13)
    assert out[True, 1].tobytes() == out[True, 2].tobytes()
    with torch.no_grad():
        np.testing.assert_allclose(out[True, 1], net(torch.tensor(x)).numpy(), rtol=1e-12, atol=1e-12)


def test_a_shortcut_read_elsewhere_or_padded_stays_a_conv_of_its_own():
    g = lc.Graph("no")
    x = g.input("x", (2, 8, 12, 12))
    w3 = g.param("w3", np.ones((16, 8, 3, 3), np.float32))
    w = g.param("w", np.ones((16, 16, 3, 3), np.float32))
    ws = g.param("ws", np.ones((16, 8, 1, 1), np.float32))
    h = lc.relu(lc.conv(x, w3, strides=2, pads=1))
    s = lc.conv(x, ws, strides=2)
    g.output("y", lc.relu(lc.conv(h, w, pads=1) + s))
    g.output("s", s)                                       # the shortcut is an output itself
    s2 = lc.conv(x, g.param("wp", np.ones((16, 8, 3, 3), np.float32)), strides=2, pads=1)   # not 1x1
    g.output("z", lc.relu(lc.conv(h, g.param("w2", np.ones((16, 16, 3, 3), np.float32)), pads=1) + s2))
    prog = lc.compile(g)
    assert not any("+shortcut" in o for o in _convs(prog, "run")), prog.summary("run")
    assert sum("+res" in o for o in _convs(prog, "run")) == 2, prog.summary("run")


def test_the_plan_validator_refuses_bad_shortcut_fields():
    from libml_runtime import PlanError
    from libml_runtime import format as F
    from libml_runtime.plan import validate
    torch.manual_seed(34)
    prog = _compile(DownBlock(8, 16, 2), (2, 8, 12, 12), loss=False)
    e = prog.plan.entries["run"]
    pc = next(pc for pc, op, _, _ in F.instructions(e.code) if op == "conv_shortcut")
    where = F.locate(e.code, pc)[1]
    for field, value, msg in (("algo", 0, "tiled kernels"), ("s2h", 3, "does not cover"), ("C2", 4096, "scratch slot needs|x2"),
                              ("G", 2, "group 1"), ("res.slot", None, "res.slot must be -1"),
                              ("s2w", 0, "s2w")):
        saved = int(e.code[where[field]])
        e.code[where[field]] = e.code[where["x.slot"]] if value is None else value
        try:
            with pytest.raises(PlanError, match=msg):
                validate(prog.plan)
        finally:
            e.code[where[field]] = saved
    validate(prog.plan)
