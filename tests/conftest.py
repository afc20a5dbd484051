"""Shared helpers for the libml test suite (issue 2).

Plain functions, imported by the test modules with ``from conftest import ...``; this file puts its own
folder on ``sys.path`` so that works under plain ``pytest`` from the repository root as well as under
``pytest tests/<file>``.

The oracles here are independent of libml: NumPy forward/backward references written out by hand,
central finite differences in float64, and NumPy versions of PyTorch's SGD / AdamW update formulas.
"""
import re
import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def _torchvision_without_its_c_extension():
    """Register ``torchvision`` as a bare package, without running its ``__init__``.

    torchvision's wheel for torch 2.13 CPU fails to import its C extension (``import torchvision`` raises
    "operator torchvision::nms does not exist"), and ``transformers`` imports torchvision whenever it is
    installed (``image_utils``), so BERT would not build.  The model code the tests use
    (``torchvision.models.resnet``, ``.mobilenetv3``) and the transforms transformers reads are pure
    Python and import fine from the bare package."""
    import importlib.util
    import types
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType("torchvision")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__, pkg.__spec__ = spec.origin, spec
    sys.modules["torchvision"] = pkg


_torchvision_without_its_c_extension()


# ----------------------------------------------------------------------------------------------------
# finite differences
# ----------------------------------------------------------------------------------------------------
def central_diff_grad(prog, feeds, param_name, loss_output="loss", eps=1e-6):
    """d loss / d param by float64 central differences, using only prog.run and prog.set_params.

    Restores the parameter's original value afterwards.
    """
    base = np.array(prog.params[param_name], dtype=np.float64, copy=True)
    dtype = prog.params[param_name].dtype
    grad = np.zeros_like(base)
    flat = base.reshape(-1)
    gflat = grad.reshape(-1)
    try:
        for i in range(flat.size):
            plus = flat.copy()
            plus[i] += eps
            prog.set_params({param_name: plus.reshape(base.shape).astype(dtype)})
            lp = float(prog.run(feeds)[loss_output])
            minus = flat.copy()
            minus[i] -= eps
            prog.set_params({param_name: minus.reshape(base.shape).astype(dtype)})
            lm = float(prog.run(feeds)[loss_output])
            gflat[i] = (lp - lm) / (2.0 * eps)
    finally:
        prog.set_params({param_name: base.astype(dtype)})
    return grad


def assert_close(actual, expected, rtol, atol, what=""):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values {actual}"
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        err = np.abs(actual - expected)
        i = np.unravel_index(np.argmax(err), err.shape) if err.ndim else ()
        raise AssertionError(
            f"{what}: max abs err {err.max():.3e} at {i}: got {actual[i]!r}, expected {expected[i]!r} "
            f"(rtol={rtol}, atol={atol})\n got:\n{actual}\n expected:\n{expected}")


def check_grads_fd(prog, feeds, param_names, loss_output="loss", eps=1e-6, rtol=1e-6, atol=1e-8):
    """prog.grad(feeds) against central differences for every name in param_names."""
    grads = prog.grad(feeds)
    for name in param_names:
        assert name in grads, f"no gradient for param {name!r}; got keys {sorted(grads)}"
        fd = central_diff_grad(prog, feeds, name, loss_output=loss_output, eps=eps)
        assert_close(grads[name], fd, rtol=rtol, atol=atol, what=f"d loss / d {name}")
    return grads


# ----------------------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------------------
def np_softmax(z, axis=-1):
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_softmax_ce(logits, labels):
    """(loss, dloss/dlogits) of the batch-mean softmax cross-entropy, the stable way."""
    B = logits.shape[0]
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    loss = np.mean(lse - logits[np.arange(B), labels])
    onehot = np.zeros_like(logits)
    onehot[np.arange(B), labels] = 1.0
    return loss, (np_softmax(logits, axis=1) - onehot) / B


def np_mlp_ref(weights, x, y, act="relu"):
    """Forward + backward of an MLP  h_{k+1} = act(h_k @ W_k + b_k), last layer linear,
    softmax cross-entropy (batch mean).  weights: list of (W, b).
    Returns (loss, logits, [(dW, db), ...])."""
    hs = [x]          # input of each layer
    zs = []
    h = x
    for k, (W, b) in enumerate(weights):
        z = h @ W + b
        zs.append(z)
        if k < len(weights) - 1:
            if act == "relu":
                h = np.maximum(z, 0)
            elif act == "sigmoid":
                h = np_sigmoid(z)
            else:
                raise ValueError(act)
            hs.append(h)
    logits = zs[-1]
    loss, g = np_softmax_ce(logits, y)
    grads = [None] * len(weights)
    for k in range(len(weights) - 1, -1, -1):
        W, b = weights[k]
        grads[k] = (hs[k].T @ g, g.sum(axis=0))
        if k > 0:
            gh = g @ W.T
            if act == "relu":
                g = gh * (zs[k - 1] > 0)
            else:
                s = np_sigmoid(zs[k - 1])
                g = gh * s * (1 - s)
    return loss, logits, grads


class NpSGD:
    """torch.optim.SGD(lr, momentum, weight_decay) (dampening=0, nesterov=False) in NumPy."""

    def __init__(self, lr, momentum=0.0, weight_decay=0.0):
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.buf = {}

    def update(self, params, grads):
        for k in params:
            g = grads[k] + self.wd * params[k] if self.wd else grads[k]
            if self.momentum:
                if k not in self.buf:
                    self.buf[k] = g.copy()
                else:
                    self.buf[k] = self.momentum * self.buf[k] + g
                g = self.buf[k]
            params[k] = params[k] - self.lr * g


class NpAdamW:
    """torch.optim.AdamW(lr, betas, eps, weight_decay) in NumPy (decoupled decay; amsgrad=False)."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.v, self.t = {}, {}, 0

    def update(self, params, grads):
        self.t += 1
        t = self.t
        for k in params:
            p, g = params[k], grads[k]
            p = p * (1 - self.lr * self.wd)
            m = self.b1 * self.m.get(k, np.zeros_like(p)) + (1 - self.b1) * g
            v = self.b2 * self.v.get(k, np.zeros_like(p)) + (1 - self.b2) * g * g
            self.m[k], self.v[k] = m, v
            bc1 = 1 - self.b1 ** t
            bc2 = 1 - self.b2 ** t
            denom = np.sqrt(v) / np.sqrt(bc2) + self.eps
            params[k] = p - (self.lr / bc1) * m / denom


# ----------------------------------------------------------------------------------------------------
# graph builders
# ----------------------------------------------------------------------------------------------------
def make_mlp_params(sizes, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    ws = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype)
        b = (rng.standard_normal(n_out) * 0.1).astype(dtype)
        ws.append((W, b))
    return ws


def build_mlp(weights, batch, dtype="float64", act="relu", label_dtype="int64", x_name="x", y_name="y"):
    """Graph for np_mlp_ref: params w0,b0,w1,b1,...; outputs 'logits' and 'loss'. Returns (g, loss)."""
    import libml_compile as lc

    g = lc.Graph("mlp")
    n_in = weights[0][0].shape[0]
    x = g.input(x_name, (batch, n_in), dtype=dtype)
    y = g.input(y_name, (batch,), dtype=label_dtype)
    h = x
    for k, (W, b) in enumerate(weights):
        w_t = g.param(f"w{k}", W.copy())
        b_t = g.param(f"b{k}", b.copy())
        h = h @ w_t + b_t
        if k < len(weights) - 1:
            h = lc.relu(h) if act == "relu" else lc.sigmoid(h)
    loss = lc.softmax_cross_entropy(h, y)
    g.output("logits", h)
    g.output("loss", loss)
    return g, loss


def mlp_param_dict(weights):
    d = {}
    for k, (W, b) in enumerate(weights):
        d[f"w{k}"] = W
        d[f"b{k}"] = b
    return d


def mlp_weights_from_dict(d, n_layers):
    return [(d[f"w{k}"], d[f"b{k}"]) for k in range(n_layers)]


def teacher_task(n=64, n_in=8, n_classes=3, dtype=np.float32, seed=0):
    """A learnable synthetic classification task: labels = argmax of a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in)).astype(dtype)
    teacher = rng.standard_normal((n_in, n_classes))
    y = np.argmax(x.astype(np.float64) @ teacher, axis=1).astype(np.int64)
    return x, y


def mentions_shape(msg, shape):
    """True if an error message spells ``shape`` in any usual form: (2, 3), [2, 3], 2x3, 2×3."""
    shape = tuple(shape)
    forms = {str(shape).replace(" ", ""), str(list(shape)).replace(" ", "")}
    if len(shape) > 1:
        forms |= {"x".join(map(str, shape)), "×".join(map(str, shape))}
    return any(f in re.sub(r"\s", "", msg) for f in forms)
