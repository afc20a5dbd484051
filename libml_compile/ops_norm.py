"""Normalisation layers: LayerNorm (ONNX LayerNormalization) as one fused kernel forward and one backward.

``layer_norm(x, scale, bias, axis)`` normalises ``x`` over its dimensions ``axis..`` (the *normalised
shape* ``x.shape[axis:]``, flattened to n elements): each of the ``outer = x.size / n`` rows gets

    mean = sum(x) / n,  rstd = 1 / sqrt(sum((x - mean)^2) / n + eps),  y = (x - mean) * rstd * scale + bias

The node has three outputs, as ONNX's: ``y`` (x's shape), ``mean`` and ``rstd`` (shape
``x.shape[:axis] + (1,) * (ndim - axis)``).  The backward kernel reads the saved mean and rstd instead of
recomputing them; it is itself a three-output node (dx, dscale, dbias).  The runtime kernels
(kernels_tmpl.h ``lm_layer_norm_*``) sum rows in fixed double lanes, so results depend on neither the
thread count nor the ISA.
"""
from __future__ import annotations

import math

import numpy as np

from .ir import FLOAT_DTYPES, Tensor, broadcast_shapes
from .ops import OpDef, _lift, make, output, register, broadcast_to


def _norm_axis(op, x, axis):
    r = x.ndim
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{op}: axis must be an int, got {axis!r}")
    if not -r <= axis < r:
        raise ValueError(f"{op}: axis {axis} is out of range for {x.name!r} of shape {x.shape} "
                         f"(valid: {-r}..{r - 1})")
    return int(axis) % r


def _stat_shape(shape, axis):
    return tuple(shape[:axis]) + (1,) * (len(shape) - axis)


def _s_layer_norm(inp, at):
    x, scale, bias = inp
    ax = at["axis"]
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    norm = x.shape[ax:]
    for t, what in ((scale, "scale"), (bias, "bias")):
        if t.shape != norm or t.dtype != x.dtype:
            raise ValueError(f"layer_norm: {what} {t.name!r} has shape {t.shape} dtype {t.dtype}; expected the "
                             f"normalised shape {norm} of {x.name!r} {x.shape} and dtype {x.dtype}")
    if math.prod(norm) == 0:
        raise ValueError(f"layer_norm: the normalised shape {norm} of {x.name!r} {x.shape} is empty")
    st = _stat_shape(x.shape, ax)
    return [(x.shape, x.dtype), (st, x.dtype), (st, x.dtype)]


def _r_layer_norm(at, x, scale, bias):
    axes = tuple(range(at["axis"], x.ndim))
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    var = np.square(xd - mean).mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(var + at["eps"])
    m, r = mean.astype(x.dtype), rstd.astype(x.dtype)
    return ((x - m) * r * scale + bias).astype(x.dtype), m, r


def _g_layer_norm(n, g):
    """dx, dscale, dbias from the fused backward kernel; gradients reaching the mean / rstd outputs (rare:
    only a graph reading them) add d mean/dx = 1/n and d rstd/dx = -rstd^3 (x - mean) / n as graph ops."""
    gy, gmean, grstd = g
    x, scale, bias = n.inputs
    mean, rstd = output(n, 1), output(n, 2)
    dx = dscale = dbias = None
    if gy is not None:
        dx, dscale, dbias = make("layer_norm_grad", (x, scale, mean, rstd, gy), {"axis": n.attrs["axis"]})
    cnt = float(math.prod(x.shape[n.attrs["axis"]:]))
    extra = None
    if gmean is not None:
        extra = broadcast_to(gmean * (1.0 / cnt), x.shape)
    if grstd is not None:
        term = grstd * (rstd * rstd * rstd) * (x - mean) * (-1.0 / cnt)
        extra = term if extra is None else extra + term
    if extra is not None:
        dx = extra if dx is None else dx + extra
    return dx, dscale, dbias


def _s_layer_norm_grad(inp, at):
    x, scale, mean, rstd, dy = inp
    return [(x.shape, x.dtype), (scale.shape, x.dtype), (scale.shape, x.dtype)]


def _r_layer_norm_grad(at, x, scale, mean, rstd, dy):
    ax = at["axis"]
    axes, lead = tuple(range(ax, x.ndim)), tuple(range(ax))
    xh = (x - mean) * rstd
    gs = dy * scale
    dx = rstd * (gs - gs.mean(axis=axes, keepdims=True) - xh * (gs * xh).mean(axis=axes, keepdims=True))
    return dx, (dy * xh).sum(axis=lead), dy.sum(axis=lead)


def _rows(x, axis):
    n = math.prod(x.shape[axis:])
    return x.size // n, n


def _emit_layer_norm(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale, bias = t.inputs
    outer, n = _rows(x, t.attrs["axis"])
    em.emit("layer_norm", nid, {"dtype": F.DTYPE_CODE[t.dtype], "outer": outer, "n": n,
                                "eps": em.const(t.attrs["eps"]), **_opnd("x", loc(x)), **_opnd("scale", loc(scale)),
                                **_opnd("bias", loc(bias)), **_opnd("y", outs[0]), **_opnd("mean", outs[1]),
                                **_opnd("rstd", outs[2])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "layer_norm", "node": t.name, "flops": 8 * x.size, "bytes": 2 * x.size * isz}


def _emit_layer_norm_grad(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale, mean, rstd, dy = t.inputs
    outer, n = _rows(x, t.attrs["axis"])
    em.emit("layer_norm_grad", nid, {"dtype": F.DTYPE_CODE[t.dtype], "outer": outer, "n": n,
                                     **_opnd("x", loc(x)), **_opnd("scale", loc(scale)), **_opnd("mean", loc(mean)),
                                     **_opnd("rstd", loc(rstd)), **_opnd("dy", loc(dy)), **_opnd("dx", outs[0]),
                                     **_opnd("dscale", outs[1]), **_opnd("dbias", outs[2])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "layer_norm_grad", "node": t.name, "flops": 14 * x.size, "bytes": 5 * x.size * isz}


register(OpDef("layer_norm", "norm", _s_layer_norm, _r_layer_norm, _g_layer_norm, emit=_emit_layer_norm,
               doc="(x - mean) * rstd * scale + bias over dims axis..; outputs y, mean, rstd (ONNX "
                   "LayerNormalization)"))
register(OpDef("layer_norm_grad", "norm", _s_layer_norm_grad, _r_layer_norm_grad, None, emit=_emit_layer_norm_grad,
               doc="layer_norm's backward: outputs dx, dscale, dbias, from the saved mean and rstd"))


def layer_norm(x, scale=None, bias=None, axis=-1, eps=1e-5, return_stats=False, name=None):
    """Layer normalisation of ``x`` over its dimensions ``axis..`` (PyTorch's ``F.layer_norm`` with
    ``normalized_shape = x.shape[axis:]``; ONNX LayerNormalization).

    ``scale`` / ``bias`` (tensors or arrays; default 1 / 0) must broadcast to the normalised shape.
    Returns ``y``, or ``(y, mean, rstd)`` with ``return_stats`` (mean and rstd of shape
    ``x.shape[:axis] + (1,) * (x.ndim - axis)``, as ONNX's Mean and InvStdDev).  ``name``: y's name, or
    a list of up to three names."""
    if not isinstance(x, Tensor):
        raise TypeError(f"layer_norm: x must be a symbolic Tensor, got {type(x).__name__}")
    ax = _norm_axis("layer_norm", x, axis)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"layer_norm: eps must be a finite non-negative number, got {eps!r}")
    norm = x.shape[ax:]

    def operand(v, fill, what):
        if v is None:
            return x.graph.const(np.full(norm, fill, dtype=x.dtype))
        v = _lift(v, x, "layer_norm")
        try:
            ok = broadcast_shapes("layer_norm", v.shape, norm) == tuple(norm)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"layer_norm: {what} {v.name!r} of shape {v.shape} does not broadcast to the "
                             f"normalised shape {norm} of {x.name!r} {x.shape}")
        return v if v.shape == tuple(norm) else broadcast_to(v, norm)

    outs = make("layer_norm", (x, operand(scale, 1, "scale"), operand(bias, 0, "bias")),
                {"axis": ax, "eps": eps}, name)
    return outs if return_stats else outs[0]


PUBLIC = {"layer_norm": layer_norm}
EXPORTS = list(PUBLIC)
