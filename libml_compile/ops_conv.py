"""Convolution (ONNX Conv, PyTorch ``F.conv1d`` / ``F.conv2d``), NCHW, forward and both gradients.

``conv(x, w, b)`` with x (N, C, *spatial), w (M, C / group, *kernel), b (M,) or absent, for one or two
spatial dims, gives y (N, M, *out) with, per spatial axis of size H, kernel k, stride s, dilation d and
pads (begin, end)::

    out = (H + begin + end - d * (k - 1) - 1) // s + 1
    y[n, m, o] = b[m] + sum_{c, i} w[m, c, i] * x[n, g * C/G + c, o * s - begin + i * d]   (g = m // (M/G))

reading zero outside the input.  Node attrs (normalised at declaration, so every later stage reads the
same numbers): ``strides`` and ``dilations`` (one per spatial dim), ``pads`` (ONNX order: all begins,
then all ends; ``auto_pad`` is resolved into them), ``group``, ``act`` (None, or "relu" after the bias:
set by ``fuse_conv_relu`` only).

Gradients are two kernels of their own: ``conv_grad_input`` (dy, w) -> dx and ``conv_grad_weight``
(x, dy) -> dw; the bias gradient is ``sum(dy, over N and the spatial dims)`` (a deterministic fused
reduction that also takes a ReLU's gradient mask).  The runtime (``_conv.pxi``, format 2.3 opcodes 48-50)
runs GEMMs over im2col panels: the panel width (output pixels per panel) comes from ``PANEL_BYTES`` and
the sizes, and each instruction asks the arena for ``CONV_SLOTS`` panels (``OpDef.scratch``), one per
thread; every split depends on the sizes only, so any thread count gives the same bits.
"""
from __future__ import annotations

import math

import numpy as np

from .ir import FLOAT_DTYPES, Tensor, as_int
from .ops import OpDef, REGISTRY, make, register, sum as _sum

#: bytes of one im2col panel (Kc rows of `panel` output pixels): half of a typical 512 KiB - 1 MiB L2, so
#: the panel and the weight block stay in cache while BLAS multiplies them
PANEL_BYTES = 256 * 1024
#: scratch panels per instruction: at most this many threads run one conv (as the GEMM's 4 panels)
CONV_SLOTS = 4
#: tasks the weight gradient and the input gradient are split into at least (when the sizes allow)
MIN_TASKS = 4

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


# ---------------------------------------------------------------------------------------------------
# geometry

def _spatial(x_shape, w_shape, at):
    """Per spatial dim: (H, k, s, d, pad begin, pad end, out)."""
    nd = len(x_shape) - 2
    pads = at["pads"]
    return [(x_shape[2 + a], w_shape[2 + a], at["strides"][a], at["dilations"][a], pads[a], pads[nd + a],
             (x_shape[2 + a] + pads[a] + pads[nd + a] - at["dilations"][a] * (w_shape[2 + a] - 1) - 1)
             // at["strides"][a] + 1) for a in range(nd)]


def out_shape(x_shape, w_shape, at):
    return (x_shape[0], w_shape[0]) + tuple(sp[-1] for sp in _spatial(x_shape, w_shape, at))


def check_geometry(op, x_shape, w_shape, at, xname="x", wname="w"):
    """Raise ValueError naming ``op``, the tensors and the shapes unless conv(x, w) is well defined."""
    if len(x_shape) not in (3, 4):
        raise ValueError(f"{op}: input {xname!r} has shape {tuple(x_shape)}; expected (N, C, L) or (N, C, H, W)")
    if len(w_shape) != len(x_shape):
        raise ValueError(f"{op}: weight {wname!r} has shape {tuple(w_shape)}; expected a {len(x_shape)}-D "
                         f"(M, C/group, *kernel) weight for input {xname!r} {tuple(x_shape)}")
    G = at["group"]
    C, M = x_shape[1], w_shape[0]
    if G < 1 or C % G or M % G:
        raise ValueError(f"{op}: group {G} must divide the input channels {C} of {xname!r} {tuple(x_shape)} and "
                         f"the output channels {M} of {wname!r} {tuple(w_shape)}")
    if w_shape[1] * G != C:
        raise ValueError(f"{op}: weight {wname!r} {tuple(w_shape)} expects {w_shape[1] * G} input channels "
                         f"({w_shape[1]} per group x group {G}), input {xname!r} {tuple(x_shape)} has {C}")
    if 0 in w_shape or C == 0:
        raise ValueError(f"{op}: empty weight {wname!r} {tuple(w_shape)} or input {xname!r} {tuple(x_shape)}")
    for a, (H, k, s, d, pb, pe, o) in enumerate(_spatial(x_shape, w_shape, at)):
        if (k - 1) * d + 1 > H + pb + pe:
            raise ValueError(f"{op}: kernel {tuple(w_shape[2:])} (dilation {tuple(at['dilations'])}) is larger "
                             f"than the padded input along spatial axis {a} of {xname!r} {tuple(x_shape)}: "
                             f"{(k - 1) * d + 1} > {H} + pads {pb} + {pe}")


def geometry(x_shape, w_shape, at) -> dict:
    """The runtime's 2-D geometry fields (a 1-D conv is H = kh = 1)."""
    sp = _spatial(x_shape, w_shape, at)
    if len(sp) == 1:
        sp = [(1, 1, 1, 1, 0, 0, 1)] + sp
    (H, kh, sh, dh, ph, _, OH), (W, kw, sw, dw, pw, _, OW) = sp
    return {"N": x_shape[0], "C": x_shape[1], "H": H, "W": W, "M": w_shape[0], "G": at["group"], "kh": kh,
            "kw": kw, "sh": sh, "sw": sw, "ph": ph, "pw": pw, "dh": dh, "dw": dw, "OH": OH, "OW": OW}


def _plan(geo, dtype):
    """Panel width, scratch slots, input-gradient channel block and weight-gradient chunks: from the sizes
    only (the results' bits depend on these, never on the thread count)."""
    isz = np.dtype(dtype).itemsize
    N, C, M, G = geo["N"], geo["C"], geo["M"], geo["G"]
    Cg = C // G
    kc = Cg * geo["kh"] * geo["kw"]
    P = geo["OH"] * geo["OW"]
    panel = max(16, PANEL_BYTES // (kc * isz)) // 16 * 16
    panel = min(panel, P)
    npan = -(-P // panel)
    ncb = min(Cg, -(-MIN_TASKS // max(N * G, 1)))
    cblock = -(-Cg // max(ncb, 1))
    nchunks = max(1, min(MIN_TASKS, N * npan))
    slot = -(-(kc * panel) // 16) * 16
    direct = G > 1 and Cg == 1
    return {"panel": panel, "npan": npan, "cblock": cblock, "nchunks": nchunks, "slot": slot, "kc": kc,
            "isz": isz, "direct": direct}


def _slots(tasks):
    return max(1, min(CONV_SLOTS, tasks))


# ---------------------------------------------------------------------------------------------------
# NumPy references (constant folding and test oracles): sums over the kernel taps of strided views

def _as2d(x_shape, w_shape, at):
    """(x reshape, w reshape, attrs) of a 1-D conv as a 2-D one with H = kh = 1."""
    if len(x_shape) == 4:
        return x_shape, w_shape, at
    nd = 1
    at2 = {"strides": (1,) + tuple(at["strides"]), "dilations": (1,) + tuple(at["dilations"]),
           "pads": (0, at["pads"][0], 0, at["pads"][nd]), "group": at["group"]}
    return (x_shape[0], x_shape[1], 1, x_shape[2]), (w_shape[0], w_shape[1], 1, w_shape[2]), at2


def _taps(x_shape, w_shape, at):
    """For each kernel tap (i, j): the slices of the padded input it reads for every output pixel."""
    (H, kh, sh, dh, ph, qh, OH), (W, kw, sw, dw, pw, qw, OW) = _spatial(x_shape, w_shape, at)
    for i in range(kh):
        for j in range(kw):
            yield i, j, (slice(i * dh, i * dh + sh * (OH - 1) + 1, sh), slice(j * dw, j * dw + sw * (OW - 1) + 1, sw))


def _pad_width(x_shape, w_shape, at):
    (H, kh, sh, dh, ph, qh, OH), (W, kw, sw, dw, pw, qw, OW) = _spatial(x_shape, w_shape, at)
    # end padding large enough for the last tap's slice (it may reach beyond H + qh when the stride
    # does not divide evenly: those rows are never read, only sliced); a negative end pad (the convs of
    # ops_conv_transpose: input rows past the last window) pads nothing
    eh = max(qh, dh * (kh - 1) + sh * (OH - 1) + 1 - H - ph, 0)
    ew = max(qw, dw * (kw - 1) + sw * (OW - 1) + 1 - W - pw, 0)
    return ((0, 0), (0, 0), (ph, eh), (pw, ew))


def _r_conv(at, x, w, b=None):
    shape = out_shape(x.shape, w.shape, at)
    xs, ws, a2 = _as2d(x.shape, w.shape, at)
    x2, w2 = x.reshape(xs), w.reshape(ws)
    G = a2["group"]
    N, C = xs[:2]
    M = ws[0]
    pw = _pad_width(xs, ws, a2)
    xp = np.pad(x2.astype(np.float64), pw)
    OH, OW = out_shape(xs, ws, a2)[2:]
    y = np.zeros((N, G, M // G, OH, OW))
    wg = w2.astype(np.float64).reshape(G, M // G, C // G, ws[2], ws[3])
    for i, j, (si, sj) in _taps(xs, ws, a2):
        v = xp[:, :, si, sj].reshape(N, G, C // G, OH, OW)
        y += np.einsum("ngchw,gmc->ngmhw", v, wg[:, :, :, i, j])
    y = y.reshape(N, M, OH, OW)
    if b is not None:
        y = y + b.astype(np.float64).reshape(1, M, 1, 1)
    if at.get("act") == "relu":
        y = np.maximum(y, 0)
    return y.reshape(shape).astype(x.dtype)


def _r_conv_grad_input(at, dy, w):
    x_shape = tuple(at["x_shape"])
    xs, ws, a2 = _as2d(x_shape, w.shape, at)
    G = a2["group"]
    N, C, H, W = xs
    M = ws[0]
    OH, OW = out_shape(xs, ws, a2)[2:]
    pw = _pad_width(xs, ws, a2)
    dxp = np.zeros((N, C, H + pw[2][0] + pw[2][1], W + pw[3][0] + pw[3][1]))
    dyg = dy.astype(np.float64).reshape(N, G, M // G, OH, OW)
    wg = w.astype(np.float64).reshape(G, M // G, C // G, ws[2], ws[3])
    for i, j, (si, sj) in _taps(xs, ws, a2):
        dxp[:, :, si, sj] += np.einsum("ngmhw,gmc->ngchw", dyg, wg[:, :, :, i, j]).reshape(N, C, OH, OW)
    dx = dxp[:, :, pw[2][0]:pw[2][0] + H, pw[3][0]:pw[3][0] + W]
    return dx.reshape(x_shape).astype(dy.dtype)


def _r_conv_grad_weight(at, x, dy):
    w_shape = tuple(at["w_shape"])
    xs, ws, a2 = _as2d(x.shape, w_shape, at)
    G = a2["group"]
    N, C = xs[:2]
    M = ws[0]
    OH, OW = out_shape(xs, ws, a2)[2:]
    xp = np.pad(x.reshape(xs).astype(np.float64), _pad_width(xs, ws, a2))
    dyg = dy.astype(np.float64).reshape(N, G, M // G, OH, OW)
    dw = np.zeros((G, M // G, C // G, ws[2], ws[3]))
    for i, j, (si, sj) in _taps(xs, ws, a2):
        v = xp[:, :, si, sj].reshape(N, G, C // G, OH, OW)
        dw[:, :, :, i, j] = np.einsum("ngmhw,ngchw->gmc", dyg, v)
    return dw.reshape(w_shape).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# shape rules

def _float_same(op, *ts):
    for t in ts:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: needs floating tensors, got {t.name!r} of dtype {t.dtype}")
        if t.dtype != ts[0].dtype:
            raise TypeError(f"{op}: operand dtypes differ ({ts[0].name!r} {ts[0].dtype}, {t.name!r} {t.dtype}); "
                            f"cast one explicitly")
    return ts[0].dtype


def _s_conv(inp, at):
    x, w = inp[:2]
    dt = _float_same("conv", *inp)
    check_geometry("conv", x.shape, w.shape, at, x.name, w.name)
    if len(inp) == 3 and inp[2].shape != (w.shape[0],):
        raise ValueError(f"conv: bias {inp[2].name!r} has shape {inp[2].shape}; expected ({w.shape[0]},) for "
                         f"weight {w.name!r} {w.shape}")
    return out_shape(x.shape, w.shape, at), dt


def _s_conv_grad_input(inp, at):
    dy, w = inp
    return tuple(at["x_shape"]), _float_same("conv_grad_input", dy, w)


def _s_conv_grad_weight(inp, at):
    x, dy = inp
    return tuple(at["w_shape"]), _float_same("conv_grad_weight", x, dy)


# ---------------------------------------------------------------------------------------------------
# gradient rule

_GEOM_ATTRS = ("strides", "pads", "dilations", "group")


def _g_conv(n, g):
    """dx = conv_grad_input(dy, w), dw = conv_grad_weight(x, dy), db = sum of dy over N and space.  A
    conv with a fused ReLU (act) masks g by its output first (relu' from the output, as ops.relu)."""
    x, w = n.inputs[:2]
    if n.attrs.get("act") == "relu":
        from .ops import mul, step
        g = mul(g, step(n))
    geo = {k: n.attrs[k] for k in _GEOM_ATTRS}
    dx = make("conv_grad_input", (g, w), {**geo, "x_shape": x.shape})
    dw = make("conv_grad_weight", (x, g), {**geo, "w_shape": w.shape})
    if len(n.inputs) == 2:
        return dx, dw
    return dx, dw, _sum(g, axis=(0,) + tuple(range(2, g.ndim)))


# ---------------------------------------------------------------------------------------------------
# scratch and emission

def _node_plan(t):
    if t.op == "conv_grad_input":
        xs, ws = t.attrs["x_shape"], t.inputs[1].shape
    elif t.op == "conv_grad_weight":
        xs, ws = t.inputs[0].shape, t.attrs["w_shape"]
    else:
        xs, ws = t.inputs[0].shape, t.inputs[1].shape
    geo = geometry(xs, ws, t.attrs)
    return geo, _plan(geo, t.dtype)


def _tasks(t, geo, pl):
    if t.op == "conv":
        return geo["N"] * geo["G"] * pl["npan"]
    if t.op == "conv_grad_input":
        return geo["N"] * geo["G"] * -(-(geo["C"] // geo["G"]) // pl["cblock"])
    return pl["nchunks"]


def _scratch(t):
    geo, pl = _node_plan(t)
    if pl["direct"] or geo["N"] == 0:
        return []
    nb = _slots(_tasks(t, geo, pl)) * pl["slot"]
    if t.op == "conv_grad_weight":
        nb += pl["nchunks"] * geo["M"] * pl["kc"]
    return [nb * pl["isz"]]


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    geo, pl = _node_plan(t)
    scratch = em.scratch[0] if em.scratch else (F.SLOT_ARENA, 0)
    values = {"dtype": F.DTYPE_CODE[t.dtype], **geo, "panel": pl["panel"],
              "nslots": _slots(_tasks(t, geo, pl)), **_opnd("scratch", scratch)}
    if t.op == "conv":
        x, w = t.inputs[:2]
        b = loc(t.inputs[2]) if len(t.inputs) == 3 else (-1, 0)
        values.update({"act": 1 if t.attrs.get("act") == "relu" else 0, **_opnd("x", loc(x)), **_opnd("w", loc(w)),
                       **_opnd("b", b), **_opnd("y", outs[0])})
        ops = [x, w] + list(t.inputs[2:]) + [t]
    elif t.op == "conv_grad_input":
        dy, w = t.inputs
        values.update({"cblock": pl["cblock"], **_opnd("w", loc(w)), **_opnd("dy", loc(dy)), **_opnd("dx", outs[0])})
        ops = [dy, w, t]
    else:
        x, dy = t.inputs
        values.update({"nchunks": pl["nchunks"], **_opnd("x", loc(x)), **_opnd("dy", loc(dy)),
                       **_opnd("dw", outs[0])})
        ops = [x, dy, t]
    em.emit(t.op, nid, values)
    flops = 2 * geo["N"] * geo["M"] * geo["OH"] * geo["OW"] * pl["kc"]
    name = t.op + ("+bias" if t.op == "conv" and len(t.inputs) == 3 else "") + \
        ("+relu" if t.attrs.get("act") == "relu" else "") + ("(depthwise)" if pl["direct"] else "")
    return {"op": name, "node": t.name, "flops": flops,
            "bytes": int(sum(o.size * np.dtype(o.dtype).itemsize for o in ops))}


register(OpDef("conv", "conv", _s_conv, _r_conv, _g_conv, emit=_emit, scratch=_scratch,
               doc="N-C-spatial convolution (ONNX Conv, 1-D and 2-D): strides, pads, dilations, group, optional "
                   "bias; attr act 'relu' after the bias (fuse_conv_relu)"))
register(OpDef("conv_grad_input", "conv", _s_conv_grad_input, _r_conv_grad_input, None, emit=_emit,
               scratch=_scratch, doc="conv's gradient with respect to its input: (dy, w) -> dx (col2im of W^T dy)"))
register(OpDef("conv_grad_weight", "conv", _s_conv_grad_weight, _r_conv_grad_weight, None, emit=_emit,
               scratch=_scratch, doc="conv's gradient with respect to its weight: (x, dy) -> dw (dy @ im2col(x)^T)"))


# ---------------------------------------------------------------------------------------------------
# fusion: conv [+ bias] -> relu in one instruction

def fuse_conv_relu(nodes, roots):
    """conv -> relu  ==>  one ``conv`` node with act "relu": the kernel applies it to each output panel
    right after the GEMM and the bias, while the panel is in cache.  Only when the relu is the conv's
    sole reader and the conv itself is not an output.  Returns a ``passes.Rewrite`` (the graph read is
    not changed: the relu is replaced by a new conv node)."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for c in nodes:
        if c.op != "conv" or c.attrs.get("act") or c in keep:
            continue
        cons = consumers.get(c, ())
        if len(cons) == 1 and cons[0].op == "relu":
            rw.replace(cons[0], "conv", c.inputs, {**c.attrs, "act": "relu"})
    return rw


# ---------------------------------------------------------------------------------------------------
# the user function

def _per_axis(op, what, v, nd, lo):
    vals = (v,) * nd if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else tuple(v)
    vals = tuple(as_int(a, f"{op}: {what}") for a in vals)
    if len(vals) != nd or any(a < lo for a in vals):
        raise ValueError(f"{op}: {what} {v!r} must be {nd} integer(s) >= {lo}, one per spatial dim")
    return vals


def resolve_pads(op, x_shape, w_shape, strides, dilations, pads, auto_pad):
    """Explicit ONNX pads (begins, then ends) for ``pads`` (an int, one per spatial dim, or 2 per dim in
    ONNX order) and ``auto_pad`` (SAME_UPPER / SAME_LOWER: out = ceil(H / s), the odd pad at the end /
    the beginning; VALID: none)."""
    nd = len(x_shape) - 2
    if auto_pad not in AUTO_PADS:
        raise ValueError(f"{op}: auto_pad {auto_pad!r} is not one of {', '.join(AUTO_PADS)}")
    if auto_pad == "VALID":
        return (0,) * (2 * nd)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for a in range(nd):
            H, k, s, d = x_shape[2 + a], w_shape[2 + a], strides[a], dilations[a]
            total = max(0, (-(-H // s) - 1) * s + (k - 1) * d + 1 - H)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return tuple(begin + end)
    if isinstance(pads, (int, np.integer)) and not isinstance(pads, bool):
        pads = (pads,) * (2 * nd)
    pads = tuple(as_int(p, f"{op}: pads") for p in pads)
    if len(pads) == nd:
        pads = pads + pads
    if len(pads) != 2 * nd or min(pads) < 0:
        raise ValueError(f"{op}: pads {pads} must be non-negative: one per spatial dim, or begins then ends "
                         f"(ONNX order, {2 * nd} values)")
    return pads


def conv(x, w, b=None, strides=1, pads=0, dilations=1, group=1, auto_pad="NOTSET", name=None):
    """Convolution of ``x`` (N, C, L) or (N, C, H, W) with ``w`` (M, C / group, *kernel), plus ``b`` (M,)
    (ONNX Conv; PyTorch's ``F.conv1d`` / ``F.conv2d`` with ``padding=p`` is ``pads=p``).

    ``strides``, ``dilations``: an int or one per spatial dim; ``pads``: an int, one per spatial dim
    (symmetric) or begins then ends (ONNX); ``auto_pad``: "NOTSET" (use ``pads``), "SAME_UPPER",
    "SAME_LOWER" or "VALID".  ``group`` must divide C and M (group = C = M: depthwise).  ``w`` and ``b``
    may be tensors or arrays (arrays become constants).  Returns y (N, M, *out); errors name the op and
    the shapes."""
    from .ops import _lift
    if not isinstance(x, Tensor):
        raise TypeError(f"conv: x must be a symbolic Tensor, got {type(x).__name__}")
    w = _lift(w, x, "conv")
    if x.ndim not in (3, 4):
        raise ValueError(f"conv: input {x.name!r} has shape {x.shape}; expected (N, C, L) or (N, C, H, W)")
    nd = x.ndim - 2
    if w.ndim != x.ndim:
        raise ValueError(f"conv: weight {w.name!r} has shape {w.shape}; expected a {x.ndim}-D "
                         f"(M, C/group, *kernel) weight for input {x.name!r} {x.shape}")
    strides = _per_axis("conv", "strides", strides, nd, 1)
    dilations = _per_axis("conv", "dilations", dilations, nd, 1)
    group = as_int(group, "conv: group")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    pads = resolve_pads("conv", x.shape, w.shape, strides, dilations, pads, auto_pad)
    inputs = (x, w) if b is None else (x, w, _lift(b, x, "conv"))
    return make("conv", inputs, {"strides": strides, "pads": pads, "dilations": dilations, "group": group,
                                 "act": None}, name)


PUBLIC = {"conv": conv}
EXPORTS = list(PUBLIC)
