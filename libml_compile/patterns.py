"""Recognise decomposed forms of fused operators, before autodiff.

Exporters write GELU and LayerNorm as chains of elementwise ops and reductions (the TorchScript exporter
below opset 20: ``0.5 * x * (1 + erf(x / sqrt(2)))``; older opsets: ReduceMean -> Sub -> Pow -> ReduceMean
-> Add eps -> Sqrt -> Div -> Mul -> Add; RMSNorm: Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul
-> Mul weight).  Compiled as written they cost one VM pass per op forward and
more backward, and the GEMM producing GELU's input cannot take it as an epilogue.  ``recognize`` is a
``clone_graph`` hook: when the node being copied is the end of such a chain, the copy is the fused op of
the chain's input instead (``gelu``, ``gelu_tanh``, ``layer_norm``, ``rms_norm``), so autodiff then sees one op with one
gradient rule.  The chain's inner nodes are copied too; they die (DCE) unless something else reads them.
Nothing of the user's graph changes.

Matching is on op names and scalar constants (within 1e-6 relative), in any operand order.
"""
from __future__ import annotations

import math

import numpy as np

from .ir import FLOAT_DTYPES


def _scalar(t):
    """The value of a scalar float constant, else None."""
    if t.op == "const" and t.value.size == 1 and t.value.dtype.kind == "f":
        return float(t.value.reshape(-1)[0])
    return None


def _close(v, want):
    return v is not None and abs(v - want) <= 1e-6 * abs(want)


def _factors(t, depth=3):
    """The factors of a product tree of ``mul`` nodes (at most ``depth`` levels)."""
    if t.op != "mul" or depth == 0:
        return [t]
    return _factors(t.inputs[0], depth - 1) + _factors(t.inputs[1], depth - 1)


def _one_plus(t):
    """u if t is 1 + u (or u + 1), else None."""
    if t.op == "add":
        a, b = t.inputs
        if _close(_scalar(b), 1.0):
            return a
        if _close(_scalar(a), 1.0):
            return b
    return None


def _scaled_by(t, c):
    """x if t is x * c, c * x or x / (1/c), else None (c: a non-zero float)."""
    if t.op == "mul":
        a, b = t.inputs
        if _close(_scalar(b), c):
            return a
        if _close(_scalar(a), c):
            return b
    if t.op == "div" and _close(_scalar(t.inputs[1]), 1.0 / c):
        return t.inputs[0]
    return None


def _is_cube_of(t, x):
    if t.op == "pow":
        return t.inputs[0] is x and _close(_scalar(t.inputs[1]), 3.0)
    f = _factors(t)
    return len(f) == 3 and all(v is x for v in f)


def _gelu_input(t):
    """(x, "gelu" | "gelu_tanh") if t is 0.5 * x * (1 + erf(x / sqrt 2)) or the tanh form
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), any association of the product."""
    f = _factors(t)
    if len(f) != 3:
        return None
    halves = [v for v in f if _close(_scalar(v), 0.5)]
    if len(halves) != 1:
        return None
    rest = [v for v in f if v is not halves[0]]
    for x, other in (rest, rest[::-1]):
        u = _one_plus(other)
        if u is None or x.dtype not in FLOAT_DTYPES:
            continue
        if u.op == "erf" and _scaled_by(u.inputs[0], 1 / math.sqrt(2)) is x:
            return x, "gelu"
        if u.op == "tanh":
            inner = _scaled_by(u.inputs[0], math.sqrt(2 / math.pi))
            if inner is not None and inner.op == "add":
                for a, b in (inner.inputs, inner.inputs[::-1]):
                    cube = _scaled_by(b, 0.044715)
                    if a is x and cube is not None and _is_cube_of(cube, x):
                        return x, "gelu_tanh"
    return None


def _mean_over_last(t):
    """(x, axis) if t is mean(x) over its last k >= 1 axes with keepdims, else None."""
    if t.op != "sum" or not t.attrs.get("keepdims"):
        return None
    x = t.inputs[0]
    axes = tuple(sorted(t.attrs["axes"]))
    if not axes or axes != tuple(range(x.ndim - len(axes), x.ndim)):
        return None
    n = math.prod(x.shape[a] for a in axes)
    return (x, axes[0]) if n and _close(t.attrs["scale"], 1.0 / n) else None


def _square_of(t):
    if t.op == "square":
        return t.inputs[0]
    if t.op == "pow" and _close(_scalar(t.inputs[1]), 2.0):
        return t.inputs[0]
    if t.op == "mul" and t.inputs[0] is t.inputs[1]:
        return t.inputs[0]
    return None


def _layer_norm_parts(t):
    """(x, axis, eps) if t is (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) over the last axes."""
    if t.op != "div":
        return None
    d, s = t.inputs
    if d.op != "sub" or s.op != "sqrt":
        return None
    x, m = d.inputs
    mx = _mean_over_last(m)
    if mx is None or mx[0] is not x or x.dtype not in FLOAT_DTYPES:
        return None
    v = s.inputs[0]
    if v.op != "add":
        return None
    for var, e in (v.inputs, v.inputs[::-1]):
        eps = _scalar(e)
        mv = _mean_over_last(var)
        if eps is not None and eps >= 0 and mv is not None and mv[1] == mx[1] and _square_of(mv[0]) is d:
            return x, mx[1], eps
    return None


def _mean_square_plus_eps(v):
    """(x, axis, eps) if v is mean(x^2) + eps over the last axes, else None."""
    if v.op != "add":
        return None
    for ms, e in (v.inputs, v.inputs[::-1]):
        eps = _scalar(e)
        hit = _mean_over_last(ms)
        if eps is not None and eps >= 0 and hit is not None:
            x = _square_of(hit[0])
            if x is not None and x.dtype in FLOAT_DTYPES:
                return x, hit[1], eps
    return None


def _rms_norm_parts(t):
    """(x, axis, eps) if t is x * reciprocal(sqrt(mean(x^2) + eps)), x * (1 / sqrt(.)), x * (.)^-0.5 or
    x / sqrt(mean(x^2) + eps) over the last axes (the T5 / Llama RMSNorm as exporters write it)."""
    if t.op == "div":
        x, s = t.inputs
        hit = _mean_square_plus_eps(s.inputs[0]) if s.op == "sqrt" else None
        return hit if hit is not None and hit[0] is x else None
    if t.op != "mul":
        return None
    for x, r in (t.inputs, t.inputs[::-1]):
        hit = None
        if r.op == "reciprocal" and r.inputs[0].op == "sqrt":
            hit = _mean_square_plus_eps(r.inputs[0].inputs[0])
        elif r.op == "div" and _close(_scalar(r.inputs[0]), 1.0) and r.inputs[1].op == "sqrt":
            hit = _mean_square_plus_eps(r.inputs[1].inputs[0])  # (TorchScript's rsqrt: 1 / sqrt(.))
        elif r.op == "pow" and _close(_scalar(r.inputs[1]), -0.5):
            hit = _mean_square_plus_eps(r.inputs[0])
        if hit is not None and hit[0] is x:
            return hit
    return None


def recognize(t, m):
    """``clone_graph`` hook: the fused replacement of node ``t`` (built from the copies ``m``), or None."""
    from . import ops, ops_attention, ops_norm
    if t.op in ("transpose", "add", "matmul"):  # seq-first attention's row permutations (ops_attention)
        r = ops_attention.recognize_row_order(t, m)
        if r is not None:
            return r
    if t.op in ("mul", "div") and (t.op == "mul" or _layer_norm_parts(t) is None):
        # ((x - mean) / sqrt(mean((x - mean)^2) + eps) is the RMS norm of the centred x: a layer_norm)
        hit = _rms_norm_parts(t)
        if hit is not None and hit[0].shape == t.shape:
            x, axis, eps = hit
            return ops_norm.rms_norm(m[x], axis=axis, eps=eps)
    if t.op == "relu" and t.inputs[0].op == "batch_norm":
        from .ops_batchnorm import fuse_relu  # BN -> ReLU as one batch_norm with its ReLU fused
        return fuse_relu(t, m)
    if t.op == "mul":
        hit = _gelu_input(t)
        if hit is not None and hit[0].shape == t.shape:
            return ops.make(hit[1], (m[hit[0]],))
        # (x / rms(x)) * w  ->  rms_norm with scale w
        for a, w in (t.inputs, t.inputs[::-1]):
            rn = m.get(a)
            if (rn is not None and rn.op == "rms_norm" and _unit(rn.inputs[1], 1.0)
                    and w.shape == rn.inputs[1].shape and w.dtype == rn.dtype and t.shape == rn.shape):
                return ops_norm.rms_norm(rn.inputs[0], m[w], axis=rn.attrs["axis"], eps=rn.attrs["eps"])
        # (x_hat) * w  ->  layer_norm with scale w, when x_hat is a recognised layer_norm without one
        for a, w in (t.inputs, t.inputs[::-1]):
            ln = m.get(a)
            if (ln is not None and ln.op == "layer_norm" and _unit(ln.inputs[1], 1.0) and _unit(ln.inputs[2], 0.0)
                    and w.shape == ln.inputs[1].shape and w.dtype == ln.dtype and t.shape == ln.shape):
                return ops_norm.layer_norm(ln.inputs[0], m[w], None, axis=ln.attrs["axis"], eps=ln.attrs["eps"])
    if t.op == "add":
        for a, b in (t.inputs, t.inputs[::-1]):
            ln = m.get(a)
            if (ln is not None and ln.op == "layer_norm" and _unit(ln.inputs[2], 0.0)
                    and b.shape == ln.inputs[2].shape and b.dtype == ln.dtype and t.shape == ln.shape):
                return ops_norm.layer_norm(ln.inputs[0], ln.inputs[1], m[b], axis=ln.attrs["axis"],
                                           eps=ln.attrs["eps"])
    if t.op == "div":
        hit = _layer_norm_parts(t)
        if hit is not None:
            x, axis, eps = hit
            return ops_norm.layer_norm(m[x], axis=axis, eps=eps)
    return None


def _unit(t, v):
    """Whether t is a constant filled with v (layer_norm's default scale 1 / bias 0)."""
    return t.op == "const" and bool(np.all(t.value == v))
