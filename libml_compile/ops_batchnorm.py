"""Batch normalisation (PyTorch's ``BatchNorm1d/2d/3d``, ONNX BatchNormalization), training and eval mode.

``x`` is ``(N, C, *spatial)``; the channel axis is 1 and every statistic is per channel, over the
``M = N * prod(spatial)`` elements of that channel.

**Training mode** (``training=True``, PyTorch's ``module.train()``, ONNX ``training_mode=1``) is one node,
``batch_norm``, with five outputs: ``y`` (x's shape), the batch ``mean`` and ``rstd = 1 / sqrt(var + eps)``
(``(C,)``, saved for the backward; ``var`` the biased batch variance) and the new running statistics
``(1 - momentum) * running + momentum * batch statistic`` (``(C,)``; ONNX's optional outputs running_mean /
running_var).  PyTorch updates the running variance with the *unbiased* batch variance (``var * M / (M -
1)``, ``unbiased=True``, the default here); the ONNX specification and ONNX Runtime with the biased one.
The forward is one kernel (``batch_norm``, opcode 64: per channel a fixed-order double reduction, then the
normalisation), the backward another (``batch_norm_grad``, opcode 65: dx, dscale, dbias in two passes);
both split the work by channel only, so results are bit-identical for any thread count.

**The running statistics are buffers** (``Graph.buffer``): persistent, non-trainable state next to the
optimizer state, so ``state_dict``, plan files and checkpoints carry them and ``prog.buffers`` reads them;
no gradient reaches them and no optimizer touches them.  Every training call (``grad`` and ``step``: a
forward in train mode, as in PyTorch) writes the new running statistics over the buffers, in the forward
kernel; ``run`` computes the same outputs and writes nothing (as ONNX Runtime running a training-mode
graph).  Only buffers are updated: running statistics given as inputs or constants (ONNX's test cases feed
them) only feed the running-statistics outputs.  A node whose output the loss does not reach is not
computed by ``grad``/``step`` and so leaves its buffers as they were.

**Eval mode** (``training=False``) normalises with the running statistics and updates nothing: it is
written as elementwise graph ops, ``y = x * a + (bias - running_mean * a)`` with ``a = scale / sqrt(running_var +
eps)`` per channel (PyTorch's CPU kernel computes the same folded form), which fuse into one pass and whose
gradients are the ordinary elementwise ones (PyTorch's eval-mode backward).

``relu=True`` fuses a following ReLU: the forward writes ``max(y, 0)`` in the same pass and the backward
applies the ``y > 0`` mask to ``dy`` in its passes (the ONNX importer fuses BatchNormalization -> Relu
where the normalised tensor has no other reader).
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from .ir import FLOAT_DTYPES, Tensor
from .ops import OpDef, _lift, add, broadcast_to, make, mul, output, register, relu as _relu, reshape, sub


def _channels(op, x):
    """(N, C, S) of ``x`` (S: the product of the spatial dims), or the error naming ``x`` and its shape."""
    if x.ndim < 2:
        raise ValueError(f"{op}: x {x.name!r} of shape {x.shape} needs at least 2 dims (N, C, *spatial): the "
                         f"channel axis is 1")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _check_operands(op, x, others, names):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    N, C, S = _channels(op, x)
    for t, what in zip(others, names):
        if t.shape != (C,) or t.dtype != x.dtype:
            raise ValueError(f"{op}: {what} {t.name!r} has shape {t.shape} dtype {t.dtype}; expected ({C},) "
                             f"{x.dtype}: one value per channel of {x.name!r} {x.shape} (channel axis 1)")
    return N, C, S


_STAT_NAMES = ("scale", "bias", "running_mean", "running_var")


def _s_batch_norm(inp, at):
    x, *stats = inp
    N, C, S = _check_operands("batch_norm", x, stats, _STAT_NAMES)
    if N * S == 0:
        raise ValueError(f"batch_norm: x {x.name!r} of shape {x.shape} has no elements per channel")
    if at["unbiased"] and N * S == 1:
        raise ValueError(f"batch_norm: x {x.name!r} of shape {x.shape} has one value per channel; the unbiased "
                         f"running variance needs more than one (PyTorch refuses it too in training mode)")
    st = ((C,), x.dtype)
    return [(x.shape, x.dtype), st, st, st, st]


def _bshape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _r_batch_norm(at, x, scale, bias, rmean, rvar):
    """The training-mode outputs (y, mean, rstd, new running mean, new running var), statistics in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    b = _bshape(x)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes)
    var = np.square(xd - mean.reshape(b)).mean(axis=axes)
    rstd = 1.0 / np.sqrt(var + at["eps"])
    m, r = mean.astype(x.dtype), rstd.astype(x.dtype)
    y = ((x - m.reshape(b)) * (r * scale).reshape(b) + bias.reshape(b)).astype(x.dtype)
    if at["relu"]:
        y = np.where(y < 0, np.zeros_like(y), y)
    M = x.size // x.shape[1]
    mom = at["momentum"]
    vb = var * M / (M - 1) if at["unbiased"] else var
    nm = ((1 - mom) * rmean.astype(np.float64) + mom * mean).astype(x.dtype)
    nv = ((1 - mom) * rvar.astype(np.float64) + mom * vb).astype(x.dtype)
    return y, m, r, nm, nv


def _g_batch_norm(n, g):
    """dx, dscale, dbias from the fused backward kernel (it reads the saved mean / rstd, and y for the fused
    ReLU's mask).  Gradients reaching the other outputs (only a graph reading them: the running statistics
    are buffers, which carry none) add their terms as graph ops: d mean / dx = 1 / M, d rstd / dx = -rstd^3
    (x - mean) / M, d var / dx = 2 (x - mean) / M; the running inputs get (1 - momentum) times theirs."""
    gy, gmean, grstd, gnm, gnv = g
    x, scale, bias, rmean, rvar = n.inputs
    at = n.attrs
    mean, rstd = output(n, 1), output(n, 2)
    dx = dscale = dbias = drm = drv = None
    if gy is not None:
        ins = (x, scale, mean, rstd, gy) + ((n,) if at["relu"] else ())
        dx, dscale, dbias = make("batch_norm_grad", ins, {"relu": at["relu"]})
    M = x.size // x.shape[1]
    mom = at["momentum"]
    const = centered = None  # per-channel coefficients of 1 and of (x - mean) in the extra dx terms
    for gk, k in ((gmean, 1.0 / M), (gnm, mom / M)):
        if gk is not None:
            const = mul(gk, k) if const is None else add(const, mul(gk, k))
    if grstd is not None:
        centered = mul(mul(grstd, mul(rstd, mul(rstd, rstd))), -1.0 / M)
    if gnv is not None:
        c = M / (M - 1) if at["unbiased"] else 1.0
        term = mul(gnv, 2.0 * mom * c / M)
        centered = term if centered is None else add(centered, term)
    b = _bshape(x)
    extra = None
    if const is not None:
        extra = broadcast_to(reshape(const, b), x.shape)
    if centered is not None:
        term = mul(reshape(centered, b), sub(x, reshape(mean, b)))
        extra = term if extra is None else add(extra, term)
    if extra is not None:
        dx = extra if dx is None else add(dx, extra)
    if gnm is not None:
        drm = mul(gnm, 1.0 - mom)
    if gnv is not None:
        drv = mul(gnv, 1.0 - mom)
    return dx, dscale, dbias, drm, drv


def _s_batch_norm_grad(inp, at):
    x, scale = inp[0], inp[1]
    st = (scale.shape, x.dtype)
    return [(x.shape, x.dtype), st, st]


def _r_batch_norm_grad(at, x, scale, mean, rstd, dy, *y):
    axes = (0,) + tuple(range(2, x.ndim))
    b = _bshape(x)
    if at["relu"]:
        dy = np.where(y[0] > 0, dy, np.zeros_like(dy))
    M = x.size // x.shape[1]
    xh = (x - mean.reshape(b)) * rstd.reshape(b)
    sb, sx = dy.sum(axis=axes), (dy * xh).sum(axis=axes)
    dx = (scale * rstd).reshape(b) * (dy - (sb / M).reshape(b) - xh * (sx / M).reshape(b))
    return dx.astype(x.dtype), sx.astype(x.dtype), sb.astype(x.dtype)


def _updates_buffers(t, kind):
    """Whether training-mode node ``t`` writes its running statistics over their buffers in entry ``kind``:
    in the training calls (grad, step), when both are buffers."""
    return kind != "run" and t.inputs[3].op == "buffer" and t.inputs[4].op == "buffer"


def _emit_batch_norm(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale, bias, rmean, rvar = t.inputs
    N, C, S = _channels("batch_norm", x)
    at = t.attrs
    flags = int(_updates_buffers(t, em.kind)) | (2 if at["unbiased"] else 0) | (4 if at["relu"] else 0)
    em.emit("batch_norm", nid, {"dtype": F.DTYPE_CODE[t.dtype], "N": N, "C": C, "S": S, "flags": flags,
                                "eps": em.const(at["eps"]), "momentum": em.const(at["momentum"]),
                                **_opnd("x", loc(x)), **_opnd("scale", loc(scale)), **_opnd("bias", loc(bias)),
                                **_opnd("rmean", loc(rmean)), **_opnd("rvar", loc(rvar)), **_opnd("y", outs[0]),
                                **_opnd("mean", outs[1]), **_opnd("rstd", outs[2]), **_opnd("nmean", outs[3]),
                                **_opnd("nvar", outs[4])})
    isz = np.dtype(t.dtype).itemsize
    op = "batch_norm+relu" if at["relu"] else "batch_norm"
    return {"op": op, "node": t.name, "flops": 8 * x.size, "bytes": 4 * x.size * isz}


def _emit_batch_norm_grad(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, scale, mean, rstd, dy = t.inputs[:5]
    y = t.inputs[5] if t.attrs["relu"] else dy  # (unread without the ReLU: any operand of x's extent)
    N, C, S = _channels("batch_norm_grad", x)
    em.emit("batch_norm_grad", nid, {"dtype": F.DTYPE_CODE[t.dtype], "N": N, "C": C, "S": S,
                                     "flags": 4 if t.attrs["relu"] else 0, **_opnd("x", loc(x)),
                                     **_opnd("scale", loc(scale)), **_opnd("mean", loc(mean)),
                                     **_opnd("rstd", loc(rstd)), **_opnd("dy", loc(dy)), **_opnd("y", loc(y)),
                                     **_opnd("dx", outs[0]), **_opnd("dscale", outs[1]),
                                     **_opnd("dbias", outs[2])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "batch_norm_grad" + ("+relu" if t.attrs["relu"] else ""), "node": t.name,
            "flops": 12 * x.size, "bytes": (6 + t.attrs["relu"] * 2) * x.size * isz}


register(OpDef("batch_norm", "norm", _s_batch_norm, _r_batch_norm, _g_batch_norm, emit=_emit_batch_norm,
               doc="training-mode batch normalisation over all axes but 1: outputs y, mean, rstd, new running "
                   "mean, new running var; grad/step also write the new running statistics over their buffers"))
register(OpDef("batch_norm_grad", "norm", _s_batch_norm_grad, _r_batch_norm_grad, None, emit=_emit_batch_norm_grad,
               doc="batch_norm's backward: outputs dx, dscale, dbias, from the saved mean and rstd (and y for "
                   "the fused ReLU's mask)"))


# ---------------------------------------------------------------------------------------------------
# BN -> ReLU fusion (patterns.recognize, before autodiff)

#: per graph: (node count when computed, {node: its readers}), so one compile scans the graph once
_READERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _readers(g):
    hit = _READERS.get(g)
    if hit is None or hit[0] != len(g.nodes):
        r = {}
        for t in g.nodes:
            for i in t.inputs:
                r.setdefault(i, []).append(t)
        hit = _READERS[g] = (len(g.nodes), r)
    return hit[1]


def fuse_relu(t, m):
    """``clone_graph`` hook (patterns.recognize): for ``t = relu(y)`` with ``y`` the output of a training-mode
    ``batch_norm`` that nothing else reads (no other reader, none of its other outputs read, not a graph
    output), the copy of ``t`` is one batch_norm with ``relu`` set, built from the copies ``m``; the plain
    copy of the batch_norm then dies (DCE).  Otherwise None (and both nodes stay as they are: a second
    batch_norm node would update the running statistics twice)."""
    bn, g = t.inputs[0], t.graph
    readers, outs = _readers(g), set(g.outputs.values())
    others = [r for r in readers.get(bn, ()) if r is not t]
    # the other outputs' projections (every lc.batch_norm declares them) may exist, unread
    if bn.attrs["relu"] or bn in outs or any(r.op != "output" or readers.get(r) or r in outs for r in others):
        return None
    return make("batch_norm", tuple(m[i] for i in bn.inputs), dict(bn.attrs, relu=True))[0]


# ---------------------------------------------------------------------------------------------------
# the user function

def _real(what, v, lo, hi):
    from .optim import _real as real
    return real("batch_norm", what, v, lo, hi)


def batch_norm(x, scale=None, bias=None, running_mean=None, running_var=None, training=True, momentum=0.1,
               eps=1e-5, unbiased=True, relu=False, return_stats=False, name=None):
    """Batch normalisation of ``x`` (N, C, *spatial) per channel (axis 1): PyTorch's ``BatchNorm1d/2d/3d``.

    ``scale`` / ``bias``: (C,) tensors or arrays (default ones / zeros, constants: pass params to train
    them).  ``running_mean`` / ``running_var``: (C,) tensors, normally buffers (``g.buffer``); None creates
    buffers named ``f"{name}.running_mean"`` / ``".running_var"`` (``name`` is then required) with PyTorch's
    initial zeros / ones.  ``training``: batch statistics, with the running statistics updated by every
    ``grad`` / ``step`` call (module docstring); False: eval mode, the running statistics normalise.
    ``momentum`` is PyTorch's (the new batch statistic's weight; ONNX's momentum is ``1 - momentum``),
    ``unbiased`` whether the running variance takes the unbiased batch variance (PyTorch: yes; ONNX: no).
    ``relu``: a fused ReLU on the output.  Returns ``y``, or with ``return_stats`` (training mode only) all
    five outputs ``(y, mean, rstd, new_running_mean, new_running_var)``.  ``name``: y's name (training mode:
    or a list of up to five names)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm: x must be a symbolic Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"batch_norm: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    N, C, S = _channels("batch_norm", x)
    eps = _real("eps", eps, 0.0, math.inf)
    momentum = _real("momentum", momentum, 0.0, 1.0)
    g = x.graph
    base = name[0] if isinstance(name, (list, tuple)) else name

    def operand(v, fill, what):
        if v is None:
            return g.const(np.full((C,), fill, dtype=x.dtype))
        v = _lift(v, x, "batch_norm")
        if v.shape != (C,):
            raise ValueError(f"batch_norm: {what} {v.name!r} has shape {v.shape}; expected ({C},): one value per "
                             f"channel of {x.name!r} {x.shape} (channel axis 1)")
        return v

    def running(v, fill, what):
        if v is not None:
            return operand(v, fill, what)
        if base is None:
            raise ValueError(f"batch_norm: give running_mean and running_var (g.buffer(...)), or a name to "
                             f"create buffers {{name}}.running_mean / .running_var for x {x.name!r}")
        return g.buffer(f"{base}.{what}", np.full((C,), fill, dtype=x.dtype))

    ins = (x, operand(scale, 1, "scale"), operand(bias, 0, "bias"), running(running_mean, 0, "running_mean"),
           running(running_var, 1, "running_var"))
    _check_operands("batch_norm", x, ins[1:], _STAT_NAMES)
    if not training:
        if return_stats:
            raise ValueError("batch_norm: return_stats needs training mode (eval mode has no batch statistics)")
        return _eval_mode(ins, eps, relu, base)
    outs = make("batch_norm", ins, {"eps": eps, "momentum": momentum, "unbiased": bool(unbiased),
                                    "relu": bool(relu)}, name)
    return outs if return_stats else outs[0]


def _eval_mode(ins, eps, relu, name):
    """Eval mode as elementwise graph ops: ``x * a + (bias - running_mean * a)``, a = scale / sqrt(var + eps)."""
    from .ops_ew import PUBLIC as EW
    x, scale, bias, rmean, rvar = ins
    a = mul(scale, EW["reciprocal"](EW["sqrt"](add(rvar, eps))))
    shift = sub(bias, mul(rmean, a))
    b = _bshape(x)
    y = add(mul(x, reshape(a, b)), reshape(shift, b))
    if relu:
        return _relu(y, name=name)
    return y if name is None else make("identity", (y,), name=name)


PUBLIC = {"batch_norm": batch_norm}
EXPORTS = list(PUBLIC)
