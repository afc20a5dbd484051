"""Reverse-mode automatic differentiation as a graph-to-graph transform.

``grad_graph`` appends the backward nodes to a graph, built only from registry gradient rules (one per
op, in ``ops.py``).  The driver does the three things no rule does on its own:

* it visits nodes in reverse topological order, only those on a path from a trainable param to the loss
  (nothing is computed for inputs, consts or frozen params);
* it accumulates the gradients of tensors used several times (``add``);
* it reduces the gradient of a broadcast operand to the operand's shape, once, here (``unbroadcast``);
* it hands a node with several outputs the gradients of all of them at once: the gradient of an
  ``output`` projection is kept for its node (projections come after their node in topological order,
  so they are visited first), whose rule then receives one gradient per output (``None`` where the loss
  does not depend on that output).
"""
from __future__ import annotations

from . import ops
from .ir import FLOAT_DTYPES, Tensor


def unbroadcast(g: Tensor, shape: tuple) -> Tensor:
    """Sum ``g`` over the axes NumPy broadcasting added or stretched, so the result has ``shape``."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1]
    r = ops.sum(g, axis=axes, keepdims=True) if axes else g
    return ops.reshape(r, shape)


def grad_graph(loss: Tensor, wrt: list[Tensor]) -> dict[Tensor, Tensor]:
    """Append d loss / d w for every ``w`` in ``wrt`` to ``loss.graph``; returns {w: gradient tensor}.

    ``loss`` must be a floating scalar.  A ``w`` the loss does not depend on gets a zero gradient const.
    """
    g = loss.graph
    if loss.shape != () or loss.dtype not in FLOAT_DTYPES:
        raise ValueError(f"loss {loss.name!r} must be a floating scalar, got shape {loss.shape} dtype {loss.dtype}")
    wrt_set = set(wrt)
    # forward pass over the topological order: which nodes depend on a tensor we differentiate for
    needs = set()
    for t in g.nodes:
        if t in wrt_set or (t.dtype in FLOAT_DTYPES and any(i in needs for i in t.inputs)):
            needs.add(t)
        if t is loss:
            break
    nodes = g.nodes[: g.nodes.index(loss) + 1]
    contrib: dict[Tensor, list[Tensor]] = {loss: [g.const(1.0, dtype=loss.dtype)]}
    out_grads: dict[Tensor, dict[int, Tensor]] = {}  # node -> {output index >= 1: its gradient}
    for t in reversed(nodes):
        if t not in needs or (t not in contrib and t not in out_grads):
            continue
        gt = None
        if t in contrib:
            parts = contrib.pop(t)
            gt = parts[0]
            for p in parts[1:]:
                gt = ops.add(gt, p)
            contrib[t] = [gt]
        if t.op in ("param", "input", "const", "buffer"):
            continue
        if t.op == "output":
            out_grads.setdefault(t.inputs[0], {})[t.attrs["index"]] = gt
            continue
        rule = ops.REGISTRY[t.op].grad
        if rule is None:
            raise NotImplementedError(f"op {t.op!r} (node {t.name!r}) has no gradient rule")
        n_out = len(ops.out_specs(t))
        if n_out > 1:
            got = out_grads.pop(t, {})
            gins = rule(t, (gt,) + tuple(got.get(k) for k in range(1, n_out)))
        else:
            gins = rule(t, gt)
        for x, gx in zip(t.inputs, gins):
            if gx is None or x not in needs:
                continue
            contrib.setdefault(x, []).append(unbroadcast(gx, x.shape))
    out = {}
    for w in wrt:
        if w in contrib:
            out[w] = contrib[w][0]
        else:
            import numpy as np
            out[w] = g.const(np.zeros(w.shape, w.dtype))
    return out
