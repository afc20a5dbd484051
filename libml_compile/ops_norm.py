"""Normalisation layers: LayerNorm (ONNX LayerNormalization) and RMSNorm (RMSNormalization), each one fused
kernel forward and one backward.

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


def _norm_operand(op, x, norm, v, fill, what):
    """A scale / bias operand of a normalisation of ``x`` over the shape ``norm``: a constant filled with
    ``fill`` when ``v`` is None, else ``v`` (tensor or array) broadcast to ``norm`` (a ValueError naming
    ``op`` and the shapes when it does not broadcast)."""
    if v is None:
        return x.graph.const(np.full(norm, fill, dtype=x.dtype))
    v = _lift(v, x, op)
    try:
        ok = broadcast_shapes(op, v.shape, norm) == tuple(norm)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {what} {v.name!r} of shape {v.shape} does not broadcast to the "
                         f"normalised shape {norm} of {x.name!r} {x.shape}")
    return v if v.shape == tuple(norm) else broadcast_to(v, norm)


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
    outs = make("layer_norm", (x, _norm_operand("layer_norm", x, norm, scale, 1, "scale"),
                               _norm_operand("layer_norm", x, norm, bias, 0, "bias")),
                {"axis": ax, "eps": eps}, name)
    return outs if return_stats else outs[0]


# ---- RMS normalisation --------------------------------------------------------------------------------
# rms_norm(x, scale, axis): rstd = 1 / sqrt(mean(x^2) + eps) per row of the normalised dims, y = x * rstd *
# scale (ONNX RMSNormalization, PyTorch nn.RMSNorm, the T5 / Llama layer).  Two outputs: y and rstd (shape
# as layer_norm's stats); the backward kernel reads the saved rstd: dx, dscale.

def _s_rms_norm(inp, at):
    x, scale = inp
    ax = at["axis"]
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rms_norm: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    norm = x.shape[ax:]
    if scale.shape != norm or scale.dtype != x.dtype:
        raise ValueError(f"rms_norm: scale {scale.name!r} has shape {scale.shape} dtype {scale.dtype}; expected "
                         f"the normalised shape {norm} of {x.name!r} {x.shape} and dtype {x.dtype}")
    if math.prod(norm) == 0:
        raise ValueError(f"rms_norm: the normalised shape {norm} of {x.name!r} {x.shape} is empty")
    return [(x.shape, x.dtype), (_stat_shape(x.shape, ax), x.dtype)]


def _r_rms_norm(at, x, scale):
    axes = tuple(range(at["axis"], x.ndim))
    xd = x.astype(np.float64)
    r = (1.0 / np.sqrt(np.square(xd).mean(axis=axes, keepdims=True) + at["eps"])).astype(x.dtype)
    return (x * r * scale).astype(x.dtype), r


def _g_rms_norm(n, g):
    """dx, dscale from the fused backward kernel; a gradient reaching rstd (a graph reading it) adds
    d rstd/dx = -rstd^3 x / n as graph ops."""
    gy, grstd = g
    x, scale = n.inputs
    rstd = output(n, 1)
    dx = dscale = None
    if gy is not None:
        dx, dscale = make("rms_norm_grad", (x, scale, rstd, gy), {"axis": n.attrs["axis"]})
    if grstd is not None:
        cnt = float(math.prod(x.shape[n.attrs["axis"]:]))
        term = grstd * (rstd * rstd * rstd) * x * (-1.0 / cnt)
        dx = term if dx is None else dx + term
    return dx, dscale


def _s_rms_norm_grad(inp, at):
    x, scale, rstd, dy = inp
    return [(x.shape, x.dtype), (scale.shape, x.dtype)]


def _r_rms_norm_grad(at, x, scale, rstd, dy):
    ax = at["axis"]
    axes, lead = tuple(range(ax, x.ndim)), tuple(range(ax))
    xh = x * rstd
    gs = dy * scale
    return rstd * (gs - xh * (gs * xh).mean(axis=axes, keepdims=True)), (dy * xh).sum(axis=lead)


def _emit_rms_norm(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale = t.inputs
    outer, n = _rows(x, t.attrs["axis"])
    em.emit("rms_norm", nid, {"dtype": F.DTYPE_CODE[t.dtype], "outer": outer, "n": n,
                              "eps": em.const(t.attrs["eps"]), **_opnd("x", loc(x)), **_opnd("scale", loc(scale)),
                              **_opnd("y", outs[0]), **_opnd("rstd", outs[1])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "rms_norm", "node": t.name, "flops": 4 * x.size, "bytes": 2 * x.size * isz}


def _emit_rms_norm_grad(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale, rstd, dy = t.inputs
    outer, n = _rows(x, t.attrs["axis"])
    em.emit("rms_norm_grad", nid, {"dtype": F.DTYPE_CODE[t.dtype], "outer": outer, "n": n,
                                   **_opnd("x", loc(x)), **_opnd("scale", loc(scale)), **_opnd("rstd", loc(rstd)),
                                   **_opnd("dy", loc(dy)), **_opnd("dx", outs[0]), **_opnd("dscale", outs[1])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "rms_norm_grad", "node": t.name, "flops": 9 * x.size, "bytes": 4 * x.size * isz}


register(OpDef("rms_norm", "norm", _s_rms_norm, _r_rms_norm, _g_rms_norm, emit=_emit_rms_norm,
               doc="x * rstd * scale, rstd = 1/sqrt(mean(x^2) + eps) over dims axis..; outputs y, rstd (ONNX "
                   "RMSNormalization)"))
register(OpDef("rms_norm_grad", "norm", _s_rms_norm_grad, _r_rms_norm_grad, None, emit=_emit_rms_norm_grad,
               doc="rms_norm's backward: outputs dx, dscale, from the saved rstd"))


def rms_norm(x, scale=None, axis=-1, eps=1e-5, return_rstd=False, name=None):
    """RMS normalisation of ``x`` over its dimensions ``axis..`` (PyTorch's ``F.rms_norm`` with
    ``normalized_shape = x.shape[axis:]``; ONNX RMSNormalization): ``x / sqrt(mean(x^2) + eps) * scale``.

    ``scale`` (tensor or array; default 1) must broadcast to the normalised shape.  Returns ``y``, or
    ``(y, rstd)`` with ``return_rstd`` (rstd of shape ``x.shape[:axis] + (1,) * (x.ndim - axis)``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"rms_norm: x must be a symbolic Tensor, got {type(x).__name__}")
    ax = _norm_axis("rms_norm", x, axis)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"rms_norm: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    eps = float(eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"rms_norm: eps must be a finite non-negative number, got {eps!r}")
    outs = make("rms_norm", (x, _norm_operand("rms_norm", x, x.shape[ax:], scale, 1, "scale")),
                {"axis": ax, "eps": eps}, name)
    return outs if return_rstd else outs[0]


PUBLIC = {"layer_norm": layer_norm, "rms_norm": rms_norm}
EXPORTS = list(PUBLIC)
