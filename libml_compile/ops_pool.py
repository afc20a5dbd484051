"""Pooling (ONNX MaxPool / AveragePool, PyTorch ``F.max_pool1d/2d`` and ``F.avg_pool1d/2d``), NCHW, with
gradients; 1-D and 2-D.

A window of output (oh, ow) covers the input rows ``oh * s - pad_begin + i * d`` for i < k (and likewise
the columns); the output size per spatial dim is ``(H + begin + end - d * (k - 1) - 1) / s + 1`` rounded
down, or up with ``ceil_mode`` -- then a last window starting beyond the input and its begin padding is
dropped (PyTorch's rule, which ONNX follows).

* ``max_pool`` has two outputs, as ONNX MaxPool: y and the int64 indices of the maxima, flat over the
  whole input (row-major, or column-major within each plane with ``storage_order`` 1).  Padding never
  wins; a NaN does (the last NaN, as PyTorch); among equal maxima the first.  The backward
  (``max_pool_grad``) adds each output's gradient at its saved index, in output order.
* ``avg_pool``: the mean over the window's taps inside the input (``count_include_pad`` False) or inside
  the padded input (True; not beyond it in ceil mode, as PyTorch).  ``avg_pool_grad`` spreads each
  output's gradient over its taps.

Runtime: format 2.3 opcodes 51-54 (``_pool.pxi``), one task per (image, channel) plane, so results do
not depend on the thread count.  Global pooling needs no kernel: GlobalAveragePool / GlobalMaxPool are
means / maxima over the spatial dims (``onnx_import.op_global_pool``).
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, Tensor, as_int
from .ops import OpDef, make, output, register
from .ops_conv import _per_axis, resolve_pads

_GEOM = ("kernel", "strides", "pads", "dilations", "ceil_mode")


def _spatial(x_shape, at):
    """Per spatial dim: (H, k, s, d, begin, end, out)."""
    nd = len(x_shape) - 2
    out = []
    for a in range(nd):
        H, k, s, d = x_shape[2 + a], at["kernel"][a], at["strides"][a], at["dilations"][a]
        pb, pe = at["pads"][a], at["pads"][nd + a]
        span = H + pb + pe - d * (k - 1) - 1
        o = (-(-span // s) if at["ceil_mode"] else span // s) + 1
        if at["ceil_mode"] and (o - 1) * s >= H + pb:
            o -= 1
        out.append((H, k, s, d, pb, pe, o))
    return out


def out_shape(x_shape, at):
    return tuple(x_shape[:2]) + tuple(sp[-1] for sp in _spatial(x_shape, at))


def _check(op, x, at):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{op}: input {x.name!r} has shape {x.shape}; expected (N, C, L) or (N, C, H, W)")
    for a, (H, k, s, d, pb, pe, o) in enumerate(_spatial(x.shape, at)):
        if (k - 1) * d + 1 > H + pb + pe:
            raise ValueError(f"{op}: kernel {tuple(at['kernel'])} (dilation {tuple(at['dilations'])}) is larger than "
                             f"the padded input along spatial axis {a} of {x.name!r} {x.shape}: "
                             f"{(k - 1) * d + 1} > {H} + pads {pb} + {pe}")


def geometry(x_shape, at) -> dict:
    sp = _spatial(x_shape, at)
    if len(sp) == 1:
        sp = [(1, 1, 1, 1, 0, 0, 1)] + sp
    (H, kh, sh, dh, ph, eh, OH), (W, kw, sw, dw, pw, ew, OW) = sp
    return {"N": x_shape[0], "C": x_shape[1], "H": H, "W": W, "kh": kh, "kw": kw, "sh": sh, "sw": sw, "ph": ph,
            "pw": pw, "eh": eh, "ew": ew, "dh": dh, "dw": dw, "OH": OH, "OW": OW}


# ---------------------------------------------------------------------------------------------------
# NumPy references (constant folding and test oracles), written from the definitions above

def _windows(x_shape, at):
    """For each tap (i, j): (rows (OH,), cols (OW,)) of the input it reads per output, or out of range."""
    g = geometry(x_shape, at)
    oh, ow = np.arange(g["OH"]), np.arange(g["OW"])
    for i in range(g["kh"]):
        for j in range(g["kw"]):
            yield (oh * g["sh"] - g["ph"] + i * g["dh"], ow * g["sw"] - g["pw"] + j * g["dw"])


def _as4(x, at):
    return x.reshape(x.shape[:2] + (1,) + x.shape[2:]) if x.ndim == 3 else x


def _r_max_pool(at, x):
    g = geometry(x.shape, at)
    x4 = _as4(x, at).astype(np.float64)
    N, C, H, W = x4.shape
    best = np.full((N, C, g["OH"], g["OW"]), -np.inf)
    bidx = np.full(best.shape, -1, np.int64)
    plane = (np.arange(N * C, dtype=np.int64) * H * W).reshape(N, C, 1, 1)
    for rows, cols in _windows(x.shape, at):
        vr, vc = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
        valid = vr[:, None] & vc[None, :]
        v = x4[:, :, np.clip(rows, 0, H - 1)][:, :, :, np.clip(cols, 0, W - 1)]
        take = valid & ((v > best) | np.isnan(v) | (bidx < 0))
        within = (cols[None, :] * H + rows[:, None]) if at.get("storage_order") else (rows[:, None] * W + cols[None, :])
        best = np.where(take, v, best)
        bidx = np.where(take, plane + within, bidx)
    shape = out_shape(x.shape, at)
    return best.reshape(shape).astype(x.dtype), bidx.reshape(shape)


def _r_max_pool_grad(at, dy, idx):
    x_shape = tuple(at["x_shape"])
    dx = np.zeros(int(np.prod(x_shape)))
    flat, g = idx.reshape(-1), dy.reshape(-1).astype(np.float64)
    keep = flat >= 0
    target = flat[keep]
    if at.get("storage_order"):
        H, W = (1,) + x_shape[2:] if len(x_shape) == 3 else x_shape[2:]
        plane, r = np.divmod(target, H * W)
        target = plane * H * W + (r % H) * W + r // H
    np.add.at(dx, target, g[keep])
    return dx.reshape(x_shape).astype(dy.dtype)


def _counts(x_shape, at):
    """(OH, OW) divisors of avg_pool and each tap's validity."""
    g = geometry(x_shape, at)
    H, W = g["H"], g["W"]
    inc = at["count_include_pad"]
    cnt = np.zeros((g["OH"], g["OW"]))
    for rows, cols in _windows(x_shape, at):
        if inc:
            vr = (rows >= -g["ph"]) & (rows < H + g["eh"])
            vc = (cols >= -g["pw"]) & (cols < W + g["ew"])
        else:
            vr, vc = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
        cnt += vr[:, None] & vc[None, :]
    return cnt


def _r_avg_pool(at, x):
    g = geometry(x.shape, at)
    x4 = _as4(x, at).astype(np.float64)
    N, C, H, W = x4.shape
    s = np.zeros((N, C, g["OH"], g["OW"]))
    for rows, cols in _windows(x.shape, at):
        valid = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
        v = x4[:, :, np.clip(rows, 0, H - 1)][:, :, :, np.clip(cols, 0, W - 1)]
        s += np.where(valid, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = s / _counts(x.shape, at)
    return y.reshape(out_shape(x.shape, at)).astype(x.dtype)


def _r_avg_pool_grad(at, dy):
    x_shape = tuple(at["x_shape"])
    g = geometry(x_shape, at)
    H, W = g["H"], g["W"]
    N, C = x_shape[:2]
    cnt = _counts(x_shape, at)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(cnt > 0, dy.reshape(N, C, g["OH"], g["OW"]).astype(np.float64) / cnt, 0.0)
    dx = np.zeros((N, C, H, W))
    for rows, cols in _windows(x_shape, at):
        vr, vc = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
        rr, cc = np.meshgrid(rows[vr], cols[vc], indexing="ij")
        np.add.at(dx, (slice(None), slice(None), rr, cc), v[:, :, vr][:, :, :, vc])
    return dx.reshape(x_shape).astype(dy.dtype)


# ---------------------------------------------------------------------------------------------------
# shape rules, gradient rules, emission

def _s_max_pool(inp, at):
    (x,) = inp
    _check("max_pool", x, at)
    s = out_shape(x.shape, at)
    return [(s, x.dtype), (s, "int64")]


def _s_avg_pool(inp, at):
    (x,) = inp
    _check("avg_pool", x, at)
    return out_shape(x.shape, at), x.dtype


def _s_grad(inp, at):
    return tuple(at["x_shape"]), inp[0].dtype


def _g_max_pool(n, g):
    gy, _ = g  # (the indices output has no gradient)
    if gy is None:
        return (None,)
    keys = _GEOM + ("storage_order",)
    return (make("max_pool_grad", (gy, output(n, 1)), {**{k: n.attrs[k] for k in keys},
                                                        "x_shape": n.inputs[0].shape}),)


def _g_avg_pool(n, g):
    keys = _GEOM + ("count_include_pad",)
    return (make("avg_pool_grad", (g,), {**{k: n.attrs[k] for k in keys}, "x_shape": n.inputs[0].shape}),)


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x_shape = t.attrs["x_shape"] if t.op.endswith("_grad") else t.inputs[0].shape
    geo = geometry(x_shape, t.attrs)
    v = {"dtype": F.DTYPE_CODE[t.dtype], **geo}
    if t.op == "max_pool":
        v.update({"order": int(t.attrs["storage_order"]), **_opnd("x", loc(t.inputs[0])), **_opnd("y", outs[0]),
                  **_opnd("idx", outs[1])})
    elif t.op == "max_pool_grad":
        v.update({"order": int(t.attrs["storage_order"]), **_opnd("dy", loc(t.inputs[0])),
                  **_opnd("idx", loc(t.inputs[1])), **_opnd("dx", outs[0])})
    elif t.op == "avg_pool":
        v.update({"include_pad": int(t.attrs["count_include_pad"]), **_opnd("x", loc(t.inputs[0])),
                  **_opnd("y", outs[0])})
    else:
        v.update({"include_pad": int(t.attrs["count_include_pad"]), **_opnd("dy", loc(t.inputs[0])),
                  **_opnd("dx", outs[0])})
    em.emit(t.op, nid, v)
    n_out = geo["N"] * geo["C"] * geo["OH"] * geo["OW"]
    isz = np.dtype(t.dtype).itemsize
    return {"op": t.op, "node": t.name, "flops": n_out * geo["kh"] * geo["kw"],
            "bytes": int((int(np.prod(x_shape)) + n_out) * isz + (8 * n_out if "max" in t.op else 0))}


register(OpDef("max_pool", "pool", _s_max_pool, _r_max_pool, _g_max_pool, emit=_emit,
               doc="max over each window (ONNX MaxPool): outputs y and the int64 flat indices of the maxima"))
register(OpDef("max_pool_grad", "pool", _s_grad, _r_max_pool_grad, None, emit=_emit,
               doc="max_pool's backward: dy added at the saved indices, in output order"))
register(OpDef("avg_pool", "pool", _s_avg_pool, _r_avg_pool, _g_avg_pool, emit=_emit,
               doc="mean over each window (ONNX AveragePool, count_include_pad)"))
register(OpDef("avg_pool_grad", "pool", _s_grad, _r_avg_pool_grad, None, emit=_emit,
               doc="avg_pool's backward: each output's gradient spread over its window's taps"))


# ---------------------------------------------------------------------------------------------------
# user functions

def _attrs(op, x, kernel, strides, pads, dilations, ceil_mode, auto_pad):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a symbolic Tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{op}: input {x.name!r} has shape {x.shape}; expected (N, C, L) or (N, C, H, W)")
    nd = x.ndim - 2
    kernel = _per_axis(op, "kernel_shape", kernel, nd, 1)
    strides = kernel if strides is None else _per_axis(op, "strides", strides, nd, 1)
    dilations = _per_axis(op, "dilations", dilations, nd, 1)
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    pads = resolve_pads(op, x.shape, (0, 0) + kernel, strides, dilations, pads, auto_pad)
    return {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dilations,
            "ceil_mode": bool(ceil_mode if isinstance(ceil_mode, (bool, np.bool_)) else as_int(ceil_mode, f"{op}: ceil_mode"))}


def max_pool(x, kernel_shape, strides=None, pads=0, dilations=1, ceil_mode=False, auto_pad="NOTSET",
             storage_order=0, return_indices=False, name=None):
    """Max pooling of ``x`` (N, C, L) or (N, C, H, W) over windows of ``kernel_shape`` (ONNX MaxPool;
    ``strides`` default: the kernel, as PyTorch).  pads / auto_pad as ``lc.conv``.  Returns y, or
    ``(y, indices)`` with ``return_indices`` (int64, flat over x; ``storage_order`` 1: column-major within
    each plane, as ONNX)."""
    at = _attrs("max_pool", x, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    order = as_int(storage_order, "max_pool: storage_order")
    if order not in (0, 1):
        raise ValueError(f"max_pool: storage_order must be 0 or 1, got {storage_order!r}")
    outs = make("max_pool", (x,), {**at, "storage_order": order}, name)
    return outs if return_indices else outs[0]


def avg_pool(x, kernel_shape, strides=None, pads=0, dilations=1, ceil_mode=False, count_include_pad=False,
             auto_pad="NOTSET", name=None):
    """Average pooling of ``x`` (N, C, L) or (N, C, H, W) (ONNX AveragePool; ``strides`` default: the
    kernel).  ``count_include_pad``: divide by the taps inside the padded input instead of those inside
    the input."""
    at = _attrs("avg_pool", x, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    return make("avg_pool", (x,), {**at, "count_include_pad": bool(count_include_pad)}, name)


PUBLIC = {"max_pool": max_pool, "avg_pool": avg_pool}
EXPORTS = list(PUBLIC)
