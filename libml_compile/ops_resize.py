"""Resize (ONNX Resize opsets 10-19 and Upsample, PyTorch ``F.interpolate``) with its gradient.

An output coordinate ``o`` of an axis of length ``n_in -> n_out`` maps to the input coordinate ``c(o)`` of
the ``coord`` mode (s: the axis's scale, ``n_out / n_in`` when sizes are given; ``w = s * n_in``):

    half_pixel            (o + 0.5) / s - 0.5
    half_pixel_symmetric  n_in / 2 * (1 - n_out / w) + (o + 0.5) / s - 0.5
    pytorch_half_pixel    (o + 0.5) / s - 0.5, or 0 when n_out is 1
    align_corners         o * (n_in - 1) / (w - 1), or 0 when w is 1
    asymmetric            o / s
    tf_half_pixel_for_nn  (o + 0.5) / s
    tf_crop_and_resize    roi_start * (n_in - 1) + o * (roi_end - roi_start) * (n_in - 1) / (w - 1); an output
                          whose c is outside [0, n_in - 1] is ``extrapolation_value``

Then ``mode`` "nearest" reads the input at c rounded by ``nearest_mode`` (round_prefer_floor,
round_prefer_ceil, floor, ceil; "simple": floor when the axis grows, ceil when it shrinks -- ONNX
Runtime's rule for Resize-10 and Upsample, which have no nearest_mode) and clamped into [0, n_in); "linear"
and "cubic" weigh the taps around c as ONNX's reference does (edge taps clamped, ``cubic_coeff_a``,
``exclude_outside``, ``antialias``: the filter stretched by 1 / s when shrinking).  The axes are
separable: every axis is a table of (source index, weight) per output coordinate and tap, computed here
once (``axis_table``), and the 2-D result is the product of two such tables.  An axis whose scale is 1
and length unchanged is the identity.  Only the last two axes may be resized; the leading ones are planes.

align_corners and tf_crop_and_resize divide by ``w - 1`` as ONNX's reference and its node cases do (ONNX
Runtime by ``n_out - 1``: the two differ when ``s * n_in`` is not an integer).

PyTorch's ``F.interpolate`` is ``mode="nearest"`` with asymmetric + floor (its "nearest"), or
"linear"/"bilinear" with ``align_corners`` (align_corners=True) or ``pytorch_half_pixel``
(align_corners=False); "bicubic" is cubic with A = -0.75 in the same two modes.

Runtime: format 2.3 opcodes 56 ``resize`` / 57 ``resize_grad`` (``_resize.pxi``), the tables in the plan's
constant pool.  The gradient (w.r.t. x) is the transpose, a scatter-add one plane per task: bit-identical
for any thread count.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .ir import FLOAT_DTYPES, Tensor
from .ops import OpDef, make, register

MODES = ("nearest", "linear", "cubic")
COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_half_pixel_for_nn", "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
#: a node's attrs: sizes, scales and roi (a (start, end) pair) per axis, then what every axis shares
_MODE_KEYS = ("mode", "coord", "nearest_mode", "cubic_a", "exclude_outside", "antialias")
_KEYS = ("sizes", "scales", "roi", "extrapolation") + _MODE_KEYS
_MAX_TAPS = 4096  # per axis (plan.py's bound on kh / kw)


# ---------------------------------------------------------------------------------------------------
# the per-axis tables (shared by the references, the emitter and the tests)

def _coords(n_in, n_out, s, coord, roi):
    """Input coordinates (float64, one per output) and the extrapolated mask (tf_crop_and_resize)."""
    o = np.arange(n_out, dtype=np.float64)
    w = s * n_in
    ext = None
    if coord == "half_pixel":
        c = (o + 0.5) / s - 0.5
    elif coord == "half_pixel_symmetric":
        c = n_in / 2 * (1 - n_out / w) + (o + 0.5) / s - 0.5
    elif coord == "pytorch_half_pixel":
        c = (o + 0.5) / s - 0.5 if n_out > 1 else np.zeros(n_out)
    elif coord == "align_corners":
        c = np.zeros(n_out) if w == 1 else o * (n_in - 1) / (w - 1)
    elif coord == "asymmetric":
        c = o / s
    elif coord == "tf_half_pixel_for_nn":
        c = (o + 0.5) / s
    else:  # tf_crop_and_resize
        r0, r1 = roi
        c = (np.full(n_out, (r1 - r0) * (n_in - 1) / 2) if w == 1 else o * (r1 - r0) * (n_in - 1) / (w - 1))
        c = c + r0 * (n_in - 1)
        ext = (c < 0) | (c > n_in - 1)
    return c, ext


def _nearest(c, s, nm):
    # a coordinate within float32 rounding of an integer or a tie is that value: an ONNX scale is a float32
    # (0.6 is 0.60000002), so 3 / s lands just below 5 in float64, where ONNX Runtime and PyTorch, computing
    # in float32, land on 5 -- and the intended 3 / 0.6 is 5
    half = np.round(c * 2) / 2
    c = np.where(np.abs(c - half) <= 4 * 2.0 ** -24 * np.maximum(np.abs(c), 1), half, c)
    f = np.floor(c)
    if nm == "simple":
        nm = "floor" if s >= 1 else "ceil"
    if nm == "round_prefer_floor":
        return np.where(c - f <= 0.5, f, f + 1)
    if nm == "round_prefer_ceil":
        return np.where(c - f < 0.5, f, f + 1)
    return f if nm == "floor" else np.ceil(c)


def _weights(ratio, s, at):
    """(n_out, n) weights of the linear / cubic taps ``floor(c) + 1 - n / 2 + k`` (ONNX's reference
    coefficients; ratio = c - floor(c) in (0, 1]: 1 at an integer c, whose taps start one further left)."""
    A = at["cubic_a"]
    if not at["antialias"]:
        r = ratio[:, None]
        if at["mode"] == "linear":
            return np.hstack([1 - r, r])
        q = 1 - r
        return np.hstack([((A * (r + 1) - 5 * A) * (r + 1) + 8 * A) * (r + 1) - 4 * A,
                          ((A + 2) * r - (A + 3)) * r * r + 1,
                          ((A + 2) * q - (A + 3)) * q * q + 1,
                          ((A * (q + 1) - 5 * A) * (q + 1) + 8 * A) * (q + 1) - 4 * A])
    s = min(s, 1.0)
    support = 1 if at["mode"] == "linear" else 2
    start = int(np.floor(-support / s) + 1)
    t = np.abs((np.arange(start, 2 - start)[None, :] - ratio[:, None]) * s)
    if at["mode"] == "linear":
        k = np.clip(1 - t, 0, 1)
    else:
        k = np.where(t <= 1, (A + 2) * t ** 3 - (A + 3) * t ** 2 + 1,
                     np.where(t < 2, A * t ** 3 - 5 * A * t ** 2 + 8 * A * t - 4 * A, 0.0))
    return k / k.sum(axis=1, keepdims=True)


@lru_cache(maxsize=256)
def axis_table(n_in, n_out, s, roi, mode_items):
    """(idx (n_out, taps) int64, weights (n_out, taps) float64, extrapolated (n_out,) bool or None) of one
    axis; ``mode_items``: the node's _MODE_KEYS attrs as items (cacheable).  Read-only arrays."""
    at = dict(mode_items)
    if math.isclose(s, 1.0) and n_out == n_in and (
            at["coord"] != "tf_crop_and_resize" or (math.isclose(roi[0], 0) and math.isclose(roi[1], 1))):
        return np.arange(n_in, dtype=np.int64)[:, None], np.ones((n_in, 1)), None
    c, ext = _coords(n_in, n_out, s, at["coord"], roi)
    if at["mode"] == "nearest":
        idx = _nearest(c, s, at["nearest_mode"])[:, None]
        w = np.ones((n_out, 1))
    else:
        f = np.floor(c)
        whole = c == f
        ratio = np.where(whole, 1.0, c - f)
        w = _weights(ratio, s, at)
        n = w.shape[1]
        # the n taps nearest to c, the left one preferred (ONNX's reference)
        idx = (f - whole + 1 - n // 2)[:, None] + np.arange(n)[None, :]
        if at["exclude_outside"]:
            w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
            tot = w.sum(axis=1, keepdims=True)
            w = w / np.where(tot == 0, 1.0, tot)
    idx = np.clip(idx, 0, n_in - 1).astype(np.int64)
    if ext is not None and not ext.any():
        ext = None
    for a in (idx, w) + ((ext,) if ext is not None else ()):
        a.flags.writeable = False
    return idx, w, ext


def _items(at):
    return tuple((k, at[k]) for k in _MODE_KEYS)


def plan(x_shape, at):
    """(P, H, W, OH, OW, row table, column table) of ``x_shape`` resized by ``at``: the last two axes
    (a 1-D tensor: H = 1); ValueError when an axis before them is not the identity."""
    r = len(x_shape)
    sizes, scales = at["sizes"], at["scales"]
    items = _items(at)
    for a in range(r - 2):
        idx, w, ext = axis_table(x_shape[a], sizes[a], scales[a], at["roi"][a], items)
        if sizes[a] != x_shape[a] or ext is not None or idx.shape[1] != 1 or \
                not np.array_equal(idx[:, 0], np.arange(x_shape[a])):
            raise ValueError(f"resize: only the last two axes can be resized; axis {a} of shape {tuple(x_shape)} "
                             f"would go {x_shape[a]} -> {sizes[a]} (scale {scales[a]:g}, mode {at['mode']}, "
                             f"{at['coord']})")
    one = (np.zeros((1, 1), np.int64), np.ones((1, 1)), None)
    th = axis_table(x_shape[-2], sizes[-2], scales[-2], at["roi"][-2], items) if r >= 2 else one
    tw = axis_table(x_shape[-1], sizes[-1], scales[-1], at["roi"][-1], items)
    if max(th[0].shape[1], tw[0].shape[1]) > _MAX_TAPS:
        raise ValueError(f"resize: antialiased shrinking of {tuple(x_shape)} to {tuple(sizes)} needs "
                         f"{max(th[0].shape[1], tw[0].shape[1])} taps per axis, more than the runtime's {_MAX_TAPS}")
    H, W = (x_shape[-2] if r >= 2 else 1), x_shape[-1]
    P = int(np.prod(x_shape[:-2])) if r > 2 else 1
    return P, H, W, th[0].shape[0], tw[0].shape[0], th, tw


# ---------------------------------------------------------------------------------------------------
# NumPy references (constant folding and test oracles)

def _r_resize(at, x):
    P, H, W, OH, OW, (ih, wh, eh), (iw, ww, ew) = plan(x.shape, at)
    x3 = x.reshape(P, H, W).astype(np.float64)
    # along the columns, then the rows, each sum from its first term: the kernel's order
    with np.errstate(all="ignore"):
        t = ww[:, 0] * x3[:, :, iw[:, 0]]                                  # (P, H, OW)
        for j in range(1, iw.shape[1]):
            t = t + ww[:, j] * x3[:, :, iw[:, j]]
        y = wh[:, 0, None] * t[:, ih[:, 0], :]                              # (P, OH, OW)
        for i in range(1, ih.shape[1]):
            y = y + wh[:, i, None] * t[:, ih[:, i], :]
    if eh is not None:
        y[:, eh, :] = at["extrapolation"]
    if ew is not None:
        y[:, :, ew] = at["extrapolation"]
    return y.reshape(tuple(at["sizes"])).astype(x.dtype)


def _r_resize_grad(at, dy):
    x_shape = tuple(at["x_shape"])
    P, H, W, OH, OW, (ih, wh, eh), (iw, ww, ew) = plan(x_shape, at)
    d = dy.reshape(P, OH, OW).astype(np.float64)
    if eh is not None:
        d[:, eh, :] = 0
    if ew is not None:
        d[:, :, ew] = 0
    u = np.zeros((P, H, OW))   # the rows' transpose, then the columns'
    dx = np.zeros((P, H, W))
    with np.errstate(all="ignore"):
        for i in range(ih.shape[1]):
            np.add.at(u, (slice(None), ih[:, i]), wh[:, i, None] * d)
        for j in range(iw.shape[1]):
            np.add.at(dx, (slice(None), slice(None), iw[:, j]), ww[:, j] * u)
    return dx.reshape(x_shape).astype(dy.dtype)


# ---------------------------------------------------------------------------------------------------
# shape rules, gradient rule, emission

def _s_resize(inp, at):
    (x,) = inp
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"resize: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    if x.ndim == 0 or not len(at["sizes"]) == len(at["scales"]) == len(at["roi"]) == x.ndim:
        raise ValueError(f"resize: {x.name!r} of shape {x.shape} needs one size and scale per axis, got sizes "
                         f"{at['sizes']} and scales {at['scales']}")
    try:
        plan(x.shape, at)
    except ValueError as e:
        raise ValueError(f"{e} ({x.name!r})") from None
    return tuple(at["sizes"]), x.dtype


def _s_resize_grad(inp, at):
    return tuple(at["x_shape"]), inp[0].dtype


def _g_resize(n, g):
    return (make("resize_grad", (g,), {**{k: n.attrs[k] for k in _KEYS}, "x_shape": n.inputs[0].shape}),)


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x_shape = tuple(t.attrs["x_shape"]) if t.op == "resize_grad" else t.inputs[0].shape
    P, H, W, OH, OW, (ih, wh, eh), (iw, ww, ew) = plan(x_shape, t.attrs)
    ih, iw = ih.astype(np.float64), iw.astype(np.float64)
    extrap = -1
    if eh is not None or ew is not None:
        extrap = em.const(t.attrs["extrapolation"])
        if eh is not None:
            ih[eh, 0] = -1
        if ew is not None:
            iw[ew, 0] = -1
    # the tables go to the constant pool as one run (not deduplicated: the kernel reads them in order)
    tab = len(em.consts)
    em.consts.extend(float(v) for a in (ih, wh, iw, ww) for v in a.reshape(-1))
    v = {"dtype": F.DTYPE_CODE[t.dtype], "P": P, "H": H, "W": W, "OH": OH, "OW": OW, "kh": ih.shape[1],
         "kw": iw.shape[1], "tab": tab, "extrap": extrap}
    if t.op == "resize":
        v.update({**_opnd("x", loc(t.inputs[0])), **_opnd("y", outs[0])})
    else:
        v.update({**_opnd("dy", loc(t.inputs[0])), **_opnd("dx", outs[0])})
    em.emit(t.op, nid, v)
    n_out = P * OH * OW
    return {"op": t.op, "node": t.name, "flops": 2 * n_out * ih.shape[1] * iw.shape[1],
            "bytes": int((P * H * W + n_out) * np.dtype(t.dtype).itemsize)}


register(OpDef("resize", "resize", _s_resize, _r_resize, _g_resize, emit=_emit,
               doc="separable resize of the last two axes (ONNX Resize / Upsample): nearest, linear, cubic"))
register(OpDef("resize_grad", "resize", _s_resize_grad, _r_resize_grad, None, emit=_emit,
               doc="resize's backward: dy scattered back through the same taps (the transpose)"))


# ---------------------------------------------------------------------------------------------------
# user function

def _per_axis(what, v, shape, axes, default_axes, cast):
    """{axis: value} from a scalar (for ``axes``, or the default axes), one value per ``axes``, per trailing
    axis or per axis."""
    r = len(shape)
    if np.ndim(v) == 0:
        ax = axes if axes is not None else default_axes
        vals = [v] * len(ax)
    else:
        vals = list(np.asarray(v).reshape(-1).tolist())
        ax = axes if axes is not None else (list(range(r)) if len(vals) == r else list(range(r - len(vals), r)))
        if len(vals) != len(ax) or len(vals) > r:
            raise ValueError(f"resize: {what} {tuple(vals)} do not fit the axes {tuple(ax)} of shape {shape}")
    return {a: cast(x) for a, x in zip(ax, vals)}


def resolve(x_shape, scales=None, sizes=None, axes=None, keep_aspect_ratio_policy="stretch",
            coordinate_transformation_mode="half_pixel", roi=None):
    """(sizes, scales, roi pairs) per axis, the ONNX rules: sizes win (scale = size / n, with
    keep_aspect_ratio_policy over ``axes``); otherwise size = floor(n * scale) (times the roi's extent
    with tf_crop_and_resize)."""
    r = len(x_shape)
    if (scales is None) == (sizes is None):
        raise ValueError("resize: give exactly one of scales and sizes")
    if axes is not None:
        axes = [int(a) + (r if int(a) < 0 else 0) for a in np.asarray(axes).reshape(-1).tolist()]
        if any(not 0 <= a < r for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"resize: axes {axes} are not distinct axes of shape {tuple(x_shape)}")
    default = list(range(2, r)) if r >= 3 else list(range(r))
    rois = [(0.0, 1.0)] * r
    if roi is not None and coordinate_transformation_mode == "tf_crop_and_resize":
        rv = [float(v) for v in np.asarray(roi, np.float64).reshape(-1)]
        ax = axes if axes is not None else list(range(r))
        if len(rv) != 2 * len(ax):
            raise ValueError(f"resize: roi {rv} needs a start and an end per axis {tuple(ax)}")
        for k, a in enumerate(ax):
            rois[a] = (rv[k], rv[k + len(ax)])
    if sizes is not None:
        def _size(v):
            if float(v) != int(v) or int(v) < 1:
                raise ValueError(f"resize: sizes must be positive integers, got {v!r}")
            return int(v)
        given = _per_axis("sizes", sizes, x_shape, axes, default, _size)
        out = [given.get(a, x_shape[a]) for a in range(r)]
        sc = [out[a] / x_shape[a] for a in range(r)]
        if keep_aspect_ratio_policy not in ("stretch", "not_larger", "not_smaller"):
            raise ValueError(f"resize: keep_aspect_ratio_policy {keep_aspect_ratio_policy!r} is not one of "
                             f"stretch, not_larger, not_smaller")
        if keep_aspect_ratio_policy != "stretch":
            ax = sorted(given)
            s = (min if keep_aspect_ratio_policy == "not_larger" else max)(sc[a] for a in ax)
            sc = [s if a in ax else 1.0 for a in range(r)]
            out = [int(s * x_shape[a] + 0.5) if a in ax else x_shape[a] for a in range(r)]
    else:
        def _scale(v):
            v = float(v)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"resize: scales must be finite and positive, got {v!r}")
            return v
        given = _per_axis("scales", scales, x_shape, axes, default, _scale)
        sc = [given.get(a, 1.0) for a in range(r)]
        out = [int(math.floor(x_shape[a] * (rois[a][1] - rois[a][0]) * sc[a])) for a in range(r)]
    if any(o < 1 for o in out):
        raise ValueError(f"resize: the output shape {tuple(out)} of {tuple(x_shape)} (scales "
                         f"{tuple(round(s, 6) for s in sc)}) has an empty axis")
    return tuple(out), tuple(sc), tuple(rois)


def resize(x, scales=None, sizes=None, mode="nearest", coordinate_transformation_mode="half_pixel",
           nearest_mode="round_prefer_floor", cubic_coeff_a=-0.75, exclude_outside=False, antialias=False,
           axes=None, keep_aspect_ratio_policy="stretch", roi=None, extrapolation_value=0.0, name=None):
    """Resize ``x`` (ONNX Resize; module docstring): ``scales`` or ``sizes`` as one number (the spatial
    axes 2..: (N, C, L) / (N, C, H, W)), one per ``axes``, one per trailing axis, or one per axis.
    ``mode`` "nearest", "linear" (also "bilinear") or "cubic" ("bicubic").  PyTorch's
    ``F.interpolate(x, scale_factor=2)`` is ``resize(x, 2, coordinate_transformation_mode="asymmetric",
    nearest_mode="floor")``; ``mode="bilinear", align_corners=False`` is ``resize(x, 2, mode="linear",
    coordinate_transformation_mode="pytorch_half_pixel")``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"resize: x must be a symbolic Tensor, got {type(x).__name__}")
    dec = [v.decode() if isinstance(v, bytes) else v for v in (mode, coordinate_transformation_mode, nearest_mode,
                                                                keep_aspect_ratio_policy)]
    mode, coord, nm, policy = dec
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    for what, v, allowed in (("mode", mode, MODES), ("coordinate_transformation_mode", coord, COORD_MODES),
                             ("nearest_mode", nm, NEAREST_MODES)):
        if v not in allowed:
            raise ValueError(f"resize: {what} {v!r} is not one of {', '.join(allowed)}")
    sizes_, scales_, rois = resolve(x.shape, scales, sizes, axes, policy, coord, roi)
    a = float(cubic_coeff_a)
    at = {"sizes": sizes_, "scales": scales_, "mode": mode, "coord": coord,
          "nearest_mode": nm if mode == "nearest" else "round_prefer_floor",
          "cubic_a": a if mode == "cubic" else -0.75, "exclude_outside": bool(exclude_outside) and mode == "cubic",
          "antialias": bool(antialias) and mode != "nearest", "roi": rois,
          "extrapolation": float(extrapolation_value) if coord == "tf_crop_and_resize" else 0.0}
    return make("resize", (x,), at, name)


PUBLIC = {"resize": resize}
EXPORTS = list(PUBLIC)
