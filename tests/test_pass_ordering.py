"""In-place writers (SGD folded into a GEMM, fused/split SGD and Adam updates) run only after every
reader of the value they overwrite, readers made by the passes included (passes.order_inplace_writers).

Oracle: one optimizer step in PyTorch (float64), to 1e-10."""
import numpy as np
import pytest
import torch

import libml_compile as lc

OPTS = {"sgd": lambda: lc.SGD(0.1), "momentum": lambda: lc.SGD(0.1, momentum=0.9, weight_decay=0.01),
        "adam": lambda: lc.Adam(0.05, weight_decay=0.01)}


def torch_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)


def check_step(build, values, kind, fuse, check_finite, steps=2, feeds=None):
    """Compile ``build(graph_params) -> loss`` with libml and run the same in torch; compare params."""
    g = lc.Graph("t")
    ps = {k: g.param(k, v) for k, v in values.items()}
    ins = {k: g.input(k, v.shape, "float64") for k, v in (feeds or {}).items()}
    loss = build(lc, dict(ps, **ins))
    prog = lc.compile(g, loss, OPTS[kind](), fuse=fuse, check_finite=check_finite)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    tin = {k: torch.tensor(v) for k, v in (feeds or {}).items()}
    opt = torch_opt(kind, list(tp.values()))
    for _ in range(steps):
        prog.step(feeds or {})
        opt.zero_grad()
        build(TorchOps, dict(tp, **tin)).backward()
        opt.step()
    for k in values:
        np.testing.assert_allclose(prog.params[k], tp[k].detach().numpy(), rtol=0, atol=1e-10, err_msg=k)


class TorchOps:
    """The subset of the lc API the test graphs use, on torch tensors."""
    mean = staticmethod(lambda x: x.mean())
    sum = staticmethod(lambda x: x.sum())
    relu = staticmethod(torch.relu)
    sigmoid = staticmethod(torch.sigmoid)
    transpose = staticmethod(lambda x: x.T)


def _sq(ops, x):
    return ops.mean(x * x)


GRAPHS = {  # name -> (params used, loss builder)
    "A@B": ("AB", lambda o, p: _sq(o, p["A"] @ p["B"])),
    "At@B": ("CB", lambda o, p: _sq(o, o.transpose(p["C"]) @ p["B"])),
    "A@Bt": ("AD", lambda o, p: _sq(o, p["A"] @ o.transpose(p["D"]))),
    "x@A@B (LoRA)": ("EAB", lambda o, p: _sq(o, p["x"] @ p["E"] @ p["A"] @ p["B"])),
    "U@Vt + bias, relu": ("ADb", lambda o, p: _sq(o, o.relu(p["A"] @ o.transpose(p["D"]) + p["b"]))),
}
RNG = np.random.default_rng(7)
VALUES = {"A": RNG.standard_normal((4, 5)), "B": RNG.standard_normal((5, 3)), "C": RNG.standard_normal((5, 4)),
          "D": RNG.standard_normal((3, 5)), "E": RNG.standard_normal((6, 4)), "b": RNG.standard_normal(3)}
FEEDS = {"x": RNG.standard_normal((2, 6))}


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("fuse,check_finite", [(True, False), (False, False), (True, True)])
def test_sgd_fold_waits_for_every_reader_of_the_old_param(name, kind, fuse, check_finite):
    used, build = GRAPHS[name]
    check_step(build, {k: VALUES[k] for k in used}, kind, fuse, check_finite,
               feeds=FEEDS if "x@" in name else None)


def test_two_folded_gemms_reading_each_others_param_get_a_copy():
    """dA = G Bᵀ and dB = Aᵀ G: each folded GEMM reads the other's param, an impossible order; one
    operand is copied before any write and the plan still runs as one GEMM per param."""
    g = lc.Graph("ab")
    A, B = g.param("A", VALUES["A"]), g.param("B", VALUES["B"])
    y = A @ B
    prog = lc.compile(g, lc.mean(y * y), lc.SGD(0.1))
    ops = [r["op"] for r in prog.instructions("step")]
    assert ops.count("gemm+sgd") == 2 and "identity" in ops, ops


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("fuse", [True, False])
def test_update_reading_a_param_as_another_params_gradient(kind, fuse):
    """loss = sum(A * B): A's gradient is (a scaled) B; the update must read B's old value."""
    vals = {"A": VALUES["A"], "B": RNG.standard_normal((4, 5))}
    check_step(lambda o, p: o.sum(p["A"] * p["B"]), vals, kind, fuse, False)


def _random_program(rng):
    """A random chain over a fed x (B, d): matmuls by one or a product of two or three params (some
    transposed), broadcast biases, elementwise products with params, relu/sigmoid.  Returns (param
    values, feeds, builder) where builder(ops, tensors) -> scalar loss works for lc and torch alike."""
    B, d = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    x = rng.standard_normal((B, d))
    values, steps = {}, []

    def new(shape):
        name = f"p{len(values)}"
        values[name] = rng.standard_normal(shape) * 0.7
        return name

    for _ in range(int(rng.integers(1, 5))):
        kind = rng.choice(["mm", "mm2", "mm3", "bias", "mulp", "relu", "sigmoid"])
        if kind.startswith("mm"):
            n_f = {"mm": 1, "mm2": 2, "mm3": 3}[kind]
            dims = [d] + [int(rng.integers(1, 6)) for _ in range(n_f)]
            factors = []
            for a, b in zip(dims, dims[1:]):
                tr = bool(rng.integers(2))
                factors.append((new((b, a) if tr else (a, b)), tr))
            steps.append(("mm", factors))
            d = dims[-1]
        elif kind == "bias":
            steps.append(("bias", new((d,) if rng.integers(2) else (1, d))))
        elif kind == "mulp":
            steps.append(("mulp", new((B, d))))
        else:
            steps.append((kind, None))

    def build(o, p):
        y = p["x"]
        for kind, arg in steps:
            if kind == "mm":
                w = None
                for name, tr in arg:
                    f = o.transpose(p[name]) if tr else p[name]
                    w = f if w is None else w @ f
                y = y @ w
            elif kind == "bias":
                y = y + p[arg]
            elif kind == "mulp":
                y = y * p[arg]
            else:
                y = getattr(o, kind)(y)
        return o.mean(y * y)

    return values, {"x": x}, build


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs_with_several_params_per_matmul_match_torch(seed):
    rng = np.random.default_rng(1000 + seed)
    values, feeds, build = _random_program(rng)
    if not values:
        values["p_extra"] = rng.standard_normal(feeds["x"].shape)
        inner = build
        build = lambda o, p: inner(o, dict(p, x=p["x"] * p["p_extra"]))  # noqa: E731
    for kind in OPTS:
        for fuse in (True, False):
            check_step(build, values, kind, fuse, False, feeds=feeds)
