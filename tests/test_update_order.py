"""In-place updates run only after every reader of the value they overwrite (issue 10, item 1).

Plain SGD folds a weight gradient GEMM into the param (p -= lr * A B, BLAS beta = 1): the param is
overwritten in place.  When both operands of a MatMul are params (A @ B, A^T @ B, U @ V^T, the LoRA
pattern x @ A @ B), one param's folded GEMM reads the other param, so the order of the two updates
decides the result.  The oracle is PyTorch autograd + torch.optim in float64, over hand-picked patterns
and random graphs, for SGD, SGD with momentum and AdamW, fused and unfused.
"""
import numpy as np
import pytest

import libml_compile as lc

torch = pytest.importorskip("torch")

OPTIMIZERS = {
    "sgd": (lambda: lc.SGD(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "momentum": (lambda: lc.SGD(0.1, momentum=0.9, weight_decay=0.01),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adam": (lambda: lc.Adam(0.05, weight_decay=0.01),
             lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)),
}


class _TorchOps:
    """The handful of functions the graph builders use, for torch tensors."""
    relu = staticmethod(torch.relu)
    sigmoid = staticmethod(torch.sigmoid)

    @staticmethod
    def mean(x):
        return x.mean()


def _train_both(values, feeds, build, opt, fuse, steps=3):
    """Params after ``steps`` steps of libml and of PyTorch on the loss mean(build(...)**2)."""
    g = lc.Graph("order")
    P = {k: g.param(k, v) for k, v in values.items()}
    P.update({k: g.input(k, v.shape, dtype=v.dtype) for k, v in feeds.items()})
    y = build(P, lc)
    loss = lc.mean(y * y)
    g.output("loss", loss)
    make_lc, make_torch = OPTIMIZERS[opt]
    prog = lc.compile(g, loss=loss, optimizer=make_lc(), fuse=fuse, num_threads=1)
    T = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    T.update({k: torch.tensor(v) for k, v in feeds.items()})
    topt = make_torch([T[k] for k in values])
    for _ in range(steps):
        lc_loss = prog.step(feeds)
        topt.zero_grad()
        yt = build(T, _TorchOps)
        tl = (yt * yt).mean()
        tl.backward()
        topt.step()
        tl = tl.item()
        assert abs(lc_loss - tl) <= 1e-9 * max(1.0, abs(tl))
    return prog.params, {k: T[k].detach().numpy() for k in values}


PATTERNS = {
    "A@B": ({"A": (4, 5), "B": (5, 3)}, lambda P, m: P["A"] @ P["B"]),
    "At@B": ({"A": (5, 4), "B": (5, 3)}, lambda P, m: P["A"].T @ P["B"]),
    "A@Bt": ({"A": (4, 5), "B": (3, 5)}, lambda P, m: P["A"] @ P["B"].T),
    "U@Vt": ({"U": (6, 2), "V": (7, 2)}, lambda P, m: P["U"] @ P["V"].T),
    "x@A@B (LoRA)": ({"x": (6, 4), "A": (4, 5), "B": (5, 3)}, lambda P, m: P["x"] @ P["A"] @ P["B"]),
    "relu(x@A)@B": ({"x": (6, 4), "A": (4, 5), "B": (5, 3)}, lambda P, m: m.relu(P["x"] @ P["A"]) @ P["B"]),
}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_update_waits_for_every_reader_of_the_old_param(pattern, opt, fuse):
    shapes, build = PATTERNS[pattern]
    rng = np.random.default_rng(abs(hash(pattern)) % 2 ** 32)
    values = {k: rng.standard_normal(s) for k, s in shapes.items()}
    got, want = _train_both(values, {}, build, opt, fuse)
    for k in values:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-11, err_msg=f"{pattern} {opt} {k}")


def _random_graph(rng):
    """A random MLP-like graph in which params appear on either side of MatMuls, transposed or not,
    several per MatMul, with activations and broadcast biases.  Returns (param values, feeds, build)."""
    n_layers = int(rng.integers(2, 5))
    B = int(rng.integers(2, 6))
    dims = [int(d) for d in rng.integers(2, 7, n_layers + 1)]
    values, feeds, layers = {}, {}, []
    if rng.random() < 0.5:
        feeds["x"] = rng.standard_normal((B, dims[0]))
    else:
        values["x"] = rng.standard_normal((B, dims[0]))
    for k in range(n_layers):
        kind = rng.choice(["w", "wt", "lora", "lora_t"])
        name = f"w{k}"
        if kind == "w":
            values[name] = rng.standard_normal((dims[k], dims[k + 1])) * 0.5
        elif kind == "wt":
            values[name] = rng.standard_normal((dims[k + 1], dims[k])) * 0.5
        else:  # a low-rank product of two params, read by the next MatMul
            r = int(rng.integers(1, 4))
            values[name + "a"] = rng.standard_normal((dims[k], r)) * 0.5
            values[name + "b"] = rng.standard_normal(((r, dims[k + 1]) if kind == "lora" else (dims[k + 1], r))) * 0.5
        bias = rng.random() < 0.5
        if bias:
            values[f"b{k}"] = rng.standard_normal(dims[k + 1]) * 0.1
        act = rng.choice(["none", "relu", "sigmoid"])
        layers.append((kind, name, bias, act))

    def build(P, m):
        h = P["x"]
        for k, (kind, name, bias, act) in enumerate(layers):
            if kind == "w":
                h = h @ P[name]
            elif kind == "wt":
                h = h @ P[name].T
            elif kind == "lora":
                h = h @ (P[name + "a"] @ P[name + "b"])
            else:
                h = (h @ P[name + "a"]) @ P[name + "b"].T
            if bias:
                h = h + P[f"b{k}"]
            if act == "relu":
                h = m.relu(h)
            elif act == "sigmoid":
                h = m.sigmoid(h)
        return h
    return values, feeds, build


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_random_graphs_with_several_params_per_matmul_train_like_pytorch(opt):
    rng = np.random.default_rng({"sgd": 1, "momentum": 2, "adam": 3}[opt])
    for case in range(12):
        values, feeds, build = _random_graph(rng)
        for fuse in (True, False):
            got, want = _train_both(values, feeds, build, opt, fuse, steps=2)
            for k in values:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-8, atol=1e-10,
                                           err_msg=f"case {case} {opt} fuse={fuse} param {k}")
