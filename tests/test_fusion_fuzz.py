"""Fused graphs always compile to kernels the runtime accepts (passes.fuse splits groups to fit every
limit of OP_EW: operands <= LM_MAXIO, registers <= LM_MAXREG, no dim broadcast in every operand ...),
and compute what NumPy and the unfused compile compute.  Random graphs, seeded."""
import itertools

import numpy as np
import pytest

import libml_compile as lc
from libml_runtime import format as F


class NpOps:
    """The lc functions the random graphs use, on NumPy arrays."""
    relu = staticmethod(lambda x: np.maximum(x, 0))
    sigmoid = staticmethod(lambda x: 1 / (1 + np.exp(-x)))
    exp = staticmethod(np.exp)
    sum = staticmethod(lambda x, axis=None, keepdims=False: np.sum(x, axis=axis, keepdims=keepdims))
    mean = staticmethod(lambda x, axis=None, keepdims=False: np.mean(x, axis=axis, keepdims=keepdims))


def _bshape(rng, shape):
    """A shape that broadcasts to ``shape``: some dims 1, maybe fewer leading dims."""
    s = [1 if rng.random() < 0.4 else d for d in shape]
    return tuple(s[int(rng.integers(0, len(s) + 1)):]) if rng.random() < 0.5 else tuple(s)


def _random_graph(rng):
    """(input shape, param values, builder(ops, x, params) -> list of outputs)."""
    nd = int(rng.integers(1, 5))
    shape = tuple(int(rng.choice([1, 1, 2, 3, 5])) for _ in range(nd))
    values, steps = {}, []
    for _ in range(int(rng.integers(1, 7))):
        k = rng.choice(["add", "mul", "sub", "relu", "sigmoid", "scale", "fanout"])
        if k in ("add", "mul", "sub"):
            name = f"p{len(values)}"
            values[name] = rng.standard_normal(_bshape(rng, shape)) * 0.5
            steps.append((k, name))
        elif k == "scale":
            steps.append((k, float(rng.uniform(-2, 2))))
        elif k == "fanout":
            steps.append((k, (int(rng.integers(20, 70)), bool(rng.integers(2)))))
        else:
            steps.append((k, None))
    axes = [c for r in range(nd + 1) for c in itertools.combinations(range(nd), r)]
    red_axes = axes[int(rng.integers(len(axes)))]
    keep = bool(rng.integers(2))

    def build(o, x, p):
        y, outs = x, []
        for k, arg in steps:
            if k == "add":
                y = y + p[arg]
            elif k == "mul":
                y = y * p[arg]
            elif k == "sub":
                y = p[arg] - y
            elif k == "scale":
                y = y * arg
            elif k == "fanout":  # many elementwise results of one tensor, all outputs
                n, simple = arg
                outs += [y * (0.1 * j + 0.5) if simple or j % 2 else o.sigmoid(y * (0.1 * j) + 0.01 * j)
                         for j in range(n)]
            else:
                y = getattr(o, k)(y)
        outs.append(o.sum(y, axis=red_axes, keepdims=keep))
        if p:  # a reduction straight over a broadcast param: its gradient reduces a broadcast
            name = sorted(p)[-1]
            outs.append(o.sum(x + p[name], axis=red_axes) * 2.0)
        outs.append(o.mean(y * y))
        return outs

    return shape, values, build


def _compile(shape, values, build, fuse):
    g = lc.Graph("fz")
    x = g.input("x", shape, "float64")
    ps = {k: g.param(k, v) for k, v in values.items()}
    outs = build(lc, x, ps)
    for j, t in enumerate(outs):
        g.output(f"o{j}", t)
    loss = lc.mean(outs[-1])
    for t in outs[-3:]:  # the reductions (and the squared mean): their gradients broadcast back
        loss = loss + lc.sum(t * t)
    return lc.compile(g, loss, lc.SGD(0.1), fuse=fuse)


@pytest.mark.parametrize("seed", range(150))
def test_random_fused_graphs_compile_and_match_numpy(seed):
    rng = np.random.default_rng(seed)
    shape, values, build = _random_graph(rng)
    xv = rng.standard_normal(shape)
    want = build(NpOps, xv, values)
    fused, plain = _compile(shape, values, build, True), _compile(shape, values, build, False)
    got = fused.run({"x": xv})
    for j, w in enumerate(want):
        np.testing.assert_allclose(got[f"o{j}"], w, rtol=1e-12, atol=1e-12, err_msg=f"o{j}")
    gf, gp = fused.grad({"x": xv}), plain.grad({"x": xv})
    for k in gp:
        np.testing.assert_allclose(gf[k], gp[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_sum_over_broadcast_param_axis_compiles():
    """lc.sum(x + b, axis=0) with a param b: the gradient group of b iterates over a dim nothing moves along."""
    g = lc.Graph("s")
    x, b = g.input("x", (5, 3), "float64"), g.param("b", np.arange(3.0))
    y = lc.sum(x + b, axis=0)
    prog = lc.compile(g, lc.sum(y * y), lc.SGD(0.01))
    prog.step({"x": np.ones((5, 3))})
    # d/db sum_j (sum_i (1 + b_j))^2 = 2 * 5 * 5 (1 + b_j)
    np.testing.assert_allclose(prog.params["b"], np.arange(3.0) - 0.01 * 50 * (1 + np.arange(3.0)), atol=1e-12)


@pytest.mark.parametrize("n", [F.LM_MAXIO - 1, F.LM_MAXIO + 7, 3 * F.LM_MAXIO])
def test_wide_fanout_is_split_into_legal_kernels(n):
    g = lc.Graph("w")
    x = g.input("x", (4, 3), "float64")
    for j in range(n):
        g.output(f"o{j}", lc.sigmoid(x * float(j)) + float(j))
    xv = np.linspace(-1, 1, 12).reshape(4, 3)
    got = lc.compile(g).run({"x": xv})
    for j in range(n):
        np.testing.assert_allclose(got[f"o{j}"], 1 / (1 + np.exp(-xv * j)) + j, rtol=1e-13)
