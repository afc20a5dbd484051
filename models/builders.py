"""Graph builders for the benchmark workloads (defined in benchmarks/README.md) and examples.

``mlp(layers, batch, loss, seed, dtype)`` and ``w4(seed)`` return ``(Graph, loss_tensor)`` built with the
libml API.  ``mlp_init`` / ``w4_init`` give the same initial values as plain NumPy arrays so that other
systems (the benchmark competitors, tests) can start from identical parameters.

``libml_compile`` is imported lazily inside the builders, so importing this module needs only NumPy.
"""
import numpy as np

__all__ = ["mlp_init", "mlp", "mlp_forward", "w4_init", "w4", "W4_SHAPE", "mlp_weight_elements"]

W4_SHAPE = (4096, 1024)


def mlp_init(layers, seed=0, dtype="float32"):
    """Initial ``[(w0, b0), (w1, b1), ...]`` for an MLP with sizes ``layers`` (e.g. ``[784, 512, 512, 10]``).

    ``w{i}`` has shape ``(fan_in, fan_out)`` (used as ``x @ w``), ``b{i}`` shape ``(fan_out,)``; both uniform
    in ``±1/sqrt(fan_in)`` like ``torch.nn.Linear``, drawn from ``np.random.default_rng(seed)`` in the order
    w0, b0, w1, b1, ...
    """
    layers = [int(n) for n in layers]
    if len(layers) < 2 or min(layers) < 1:
        raise ValueError(f"mlp needs at least two positive layer sizes, got {layers}")
    rng = np.random.default_rng(seed)
    out = []
    for fan_in, fan_out in zip(layers[:-1], layers[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(dtype)
        b = rng.uniform(-bound, bound, size=(fan_out,)).astype(dtype)
        out.append((w, b))
    return out


def mlp_weight_elements(layers):
    """Number of weight-matrix elements (biases excluded), as used for the FLOP count."""
    return sum(int(a) * int(b) for a, b in zip(layers[:-1], layers[1:]))


def mlp(layers, batch, loss="xent", seed=0, dtype="float32"):
    """Build an MLP training graph; returns ``(Graph, loss_tensor)``.

    Inputs: ``x`` (batch, layers[0]) of ``dtype``; ``y`` int64 labels (batch,) for ``loss="xent"``
    (softmax cross-entropy, mean) or a ``dtype`` target (batch, layers[-1]) for ``loss="mse"``.
    Params ``w{i}``, ``b{i}`` from :func:`mlp_init`; ReLU between layers (none after the last).
    Outputs ``logits`` and ``loss``.
    """
    import libml_compile as lc

    if loss not in ("xent", "mse"):
        raise ValueError(f"loss must be 'xent' or 'mse', got {loss!r}")
    layers = [int(n) for n in layers]
    inits = mlp_init(layers, seed=seed, dtype=dtype)
    g = lc.Graph(f"mlp_{'_'.join(map(str, layers))}_b{batch}_{loss}")
    x = g.input("x", (batch, layers[0]), dtype=dtype)
    if loss == "xent":
        y = g.input("y", (batch,), dtype="int64")
    else:
        y = g.input("y", (batch, layers[-1]), dtype=dtype)
    h = x
    n = len(inits)
    for i, (w0, b0) in enumerate(inits):
        w = g.param(f"w{i}", w0)
        b = g.param(f"b{i}", b0)
        h = lc.matmul(h, w) + b
        if i < n - 1:
            h = lc.relu(h)
    logits = lc.identity(h, name="logits")
    if loss == "xent":
        L = lc.softmax_cross_entropy(logits, y, name="loss")
    else:
        L = lc.mse(logits, y, name="loss")
    g.output("logits", logits)
    g.output("loss", L)
    return g, L


def w4_init(seed=0, dtype="float32"):
    """Initial ``(a, b, c)``, each (1024,), uniform ±1/sqrt(1024), from ``default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    n = W4_SHAPE[1]
    bound = 1.0 / np.sqrt(n)
    return tuple(rng.uniform(-bound, bound, size=(n,)).astype(dtype) for _ in range(3))


def w4(seed=0, output_y=False):
    """The W4 elementwise workload: ``y = sigmoid(x*a + b) / (1 + relu(x - c))``, ``loss = mean(y)``.

    ``x`` is an input (4096, 1024) float32; ``a``, ``b``, ``c`` are trainable (1024,) params broadcast over
    rows.  Outputs ``loss`` (and ``y`` if ``output_y``).  Returns ``(Graph, loss_tensor)``.
    """
    import libml_compile as lc

    a0, b0, c0 = w4_init(seed)
    g = lc.Graph("w4")
    x = g.input("x", W4_SHAPE)
    a = g.param("a", a0)
    b = g.param("b", b0)
    c = g.param("c", c0)
    y = lc.div(lc.sigmoid(x * a + b), 1.0 + lc.relu(x - c), name="y")
    L = lc.mean(y, name="loss")
    if output_y:
        g.output("y", y)
    g.output("loss", L)
    return g, L


def mlp_forward(layers, batch, seed=0, dtype="float32"):
    """Forward-only MLP graph (W5): input ``x`` (batch, layers[0]), output ``logits``; same params as
    :func:`mlp`.  Returns the Graph."""
    import libml_compile as lc

    layers = [int(n) for n in layers]
    inits = mlp_init(layers, seed=seed, dtype=dtype)
    g = lc.Graph(f"mlp_fwd_{'_'.join(map(str, layers))}_b{batch}")
    h = g.input("x", (batch, layers[0]), dtype=dtype)
    n = len(inits)
    for i, (w0, b0) in enumerate(inits):
        h = lc.matmul(h, g.param(f"w{i}", w0)) + g.param(f"b{i}", b0)
        if i < n - 1:
            h = lc.relu(h)
    g.output("logits", lc.identity(h, name="logits"))
    return g
