"""Transposed convolution (ONNX ConvTranspose, PyTorch ``F.conv_transpose1d`` / ``F.conv_transpose2d``), NCHW.

``conv_transpose(x, w, b)`` with x (N, C_in, *spatial), w (C_in, C_out / group, *kernel), b (C_out,) or absent,
for one or two spatial dims, gives y (N, C_out, *out) with, per spatial axis of size H, kernel k, stride s,
dilation d, pads (begin, end) and output_padding p::

    full = s * (H - 1) + d * (k - 1) + 1
    out = full - begin - end + p
    y[n, g * C_out/G + o, h * s + i * d - begin] += x[n, g * C_in/G + c, h] * w[g * C_in/G + c, o, i]   (+ b[o'])

i.e. every input pixel scatters its kernel window into the output; rows no window reaches (output_padding,
an ``output_shape`` larger than ``full``) are zero.

A transposed convolution IS the input gradient of a convolution: ConvTranspose's weight (C_in, C_out/G, *k) is
conv's (M, C/G, *k) layout with M = C_in, C = C_out, and ``y = conv_grad_input(dy := x, w)`` for the conv whose
input is y, with the conv pads (begin, end - p).  So the node runs ``conv_grad_input``'s kernel (opcode 49,
``_conv.pxi``), and its gradients are the other two conv kernels: dx = conv(g, w), dw = conv_grad_weight(g, x),
with the same geometry.  Node attrs (normalised at declaration): ``strides``, ``dilations``, ``group`` and
``pads`` in that conv view (ONNX order, begins >= 0, then ends = end pad - output_padding, which may be
negative: rows past the last window).  The bias is a broadcast add after the node (its gradient the sum that
autodiff reduces the broadcast to).
"""
from __future__ import annotations

import numpy as np

from .ir import as_int
from .ops import OpDef, make, register
from . import ops_conv as C

AUTO_PADS = C.AUTO_PADS


# ---------------------------------------------------------------------------------------------------
# geometry

def _full(h, k, s, d):
    return s * (h - 1) + d * (k - 1) + 1


def out_spatial(x_shape, w_shape, at):
    """Output spatial dims of the node from its (conv-view) attrs."""
    nd = len(x_shape) - 2
    p = at["pads"]
    return tuple(_full(x_shape[2 + a], w_shape[2 + a], at["strides"][a], at["dilations"][a]) - p[a] - p[nd + a]
                 for a in range(nd))


def resolve(op, x_shape, w_shape, strides, dilations, pads, output_padding, output_shape, auto_pad):
    """Conv-view pads (begins >= 0, then ends - output_padding) for the ONNX attributes, per the ONNX spec as
    ONNX Runtime runs it: with ``output_shape`` (spatial dims; a full (N, C, ...) shape is accepted too) the
    total padding ``full + output_padding - output_shape`` is split with the odd pixel at the end for
    SAME_UPPER and at the beginning otherwise, and a negative total (a larger output) adds zero rows at the
    end; SAME_UPPER / SAME_LOWER without it aim at ``out = H * s`` (never below ``full + output_padding``);
    VALID is no padding; NOTSET uses ``pads`` (an int, one per spatial dim, or begins then ends)."""
    nd = len(x_shape) - 2
    if auto_pad not in AUTO_PADS:
        raise ValueError(f"{op}: auto_pad {auto_pad!r} is not one of {', '.join(AUTO_PADS)}")
    full = [_full(x_shape[2 + a], w_shape[2 + a], strides[a], dilations[a]) + output_padding[a] for a in range(nd)]
    if output_shape is not None:
        target = tuple(as_int(v, f"{op}: output_shape") for v in output_shape)
        if len(target) == nd + 2:
            target = target[2:]
        if len(target) != nd or min(target) < 1:
            raise ValueError(f"{op}: output_shape {tuple(output_shape)} must be {nd} positive spatial dims")
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # (ONNX Runtime: a stride beyond the window gives full, not H * s: the total padding is clipped at 0)
        target = tuple(min(full[a], x_shape[2 + a] * strides[a]) for a in range(nd))
    else:
        target = None
    if target is not None:
        begin, end = [], []
        for a in range(nd):
            total = full[a] - target[a]
            if total < 0:
                begin.append(0)
            else:
                begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
            end.append(total - begin[-1])
        pads = tuple(begin + end)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    else:
        pads = C.resolve_pads(op, x_shape, w_shape, strides, dilations, pads, "NOTSET")
    # the conv view: the output padding is a negative end pad
    return tuple(pads[:nd]) + tuple(pads[nd + a] - output_padding[a] for a in range(nd))


def _check(op, x_shape, w_shape, at, xname="x", wname="w"):
    """Raise ValueError naming ``op``, the tensors and the shapes unless the node is well defined."""
    if len(x_shape) not in (3, 4):
        raise ValueError(f"{op}: input {xname!r} has shape {tuple(x_shape)}; expected (N, C_in, L) or (N, C_in, H, W)")
    if len(w_shape) != len(x_shape):
        raise ValueError(f"{op}: weight {wname!r} has shape {tuple(w_shape)}; expected a {len(x_shape)}-D "
                         f"(C_in, C_out/group, *kernel) weight for input {xname!r} {tuple(x_shape)}")
    G = at["group"]
    cin = x_shape[1]
    if w_shape[0] != cin:
        raise ValueError(f"{op}: weight {wname!r} {tuple(w_shape)} has {w_shape[0]} input channels (its dim 0), "
                         f"input {xname!r} {tuple(x_shape)} has {cin}")
    if G < 1 or cin % G:
        raise ValueError(f"{op}: group {G} must divide the input channels {cin} of {xname!r} {tuple(x_shape)}")
    if 0 in w_shape or 0 in x_shape[1:]:
        raise ValueError(f"{op}: empty weight {wname!r} {tuple(w_shape)} or input {xname!r} {tuple(x_shape)}")
    nd = len(x_shape) - 2
    if min(at["pads"][:nd]) < 0:
        raise ValueError(f"{op}: pads {tuple(at['pads'])} must have begins >= 0")
    out = out_spatial(x_shape, w_shape, at)
    if min(out) < 1:
        raise ValueError(f"{op}: input {xname!r} {tuple(x_shape)} with weight {wname!r} {tuple(w_shape)} gives "
                         f"output spatial dims {out} (pads too large: begins then ends {tuple(at['pads'])})")
    return (x_shape[0], w_shape[1] * G) + out


def _view(x_shape, w_shape, at):
    """(the conv's input shape, i.e. this node's output, w shape) of the conv this node is the input gradient of."""
    return (x_shape[0], w_shape[1] * at["group"]) + out_spatial(x_shape, w_shape, at), tuple(w_shape)


# ---------------------------------------------------------------------------------------------------
# NumPy reference (constant folding and test oracle): every input pixel scatters its window, written from
# the definition above (not from conv's references)

def _r_conv_transpose(at, x, w):
    nd = x.ndim - 2
    G = at["group"]
    N, cin = x.shape[:2]
    cog = w.shape[1]
    xs, ws = x.astype(np.float64), w.astype(np.float64)
    if nd == 1:
        xs, ws = xs[:, :, None, :], ws[:, :, None, :]
        s, d, p = (1,) + tuple(at["strides"]), (1,) + tuple(at["dilations"]), at["pads"]
        pb, pe = (0, p[0]), (0, p[1])
    else:
        s, d, p = tuple(at["strides"]), tuple(at["dilations"]), at["pads"]
        pb, pe = p[:2], p[2:]
    H, W = xs.shape[2:]
    kh, kw = ws.shape[2:]
    full = (_full(H, kh, s[0], d[0]), _full(W, kw, s[1], d[1]))
    # room for negative end pads (rows past the last window stay zero)
    yf = np.zeros((N, G, cog, full[0] + max(0, -pe[0]), full[1] + max(0, -pe[1])))
    xg = xs.reshape(N, G, cin // G, H, W)
    wg = ws.reshape(G, cin // G, cog, kh, kw)
    for i in range(kh):
        for j in range(kw):
            yf[:, :, :, i * d[0]:i * d[0] + s[0] * (H - 1) + 1:s[0], j * d[1]:j * d[1] + s[1] * (W - 1) + 1:s[1]] += \
                np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j])
    oh, ow = full[0] - pb[0] - pe[0], full[1] - pb[1] - pe[1]
    y = yf[:, :, :, pb[0]:pb[0] + oh, pb[1]:pb[1] + ow].reshape(N, G * cog, oh, ow)
    return (y[:, :, 0, :] if nd == 1 else y).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# shape rule, gradient rule

def _s_conv_transpose(inp, at):
    x, w = inp
    dt = C._float_same("conv_transpose", x, w)
    return _check("conv_transpose", x.shape, w.shape, at, x.name, w.name), dt


_GEOM_ATTRS = ("strides", "pads", "dilations", "group")


def _g_conv_transpose(n, g):
    """y = conv_grad_input(x, w) of the conv from y's shape: dx = conv(g, w), dw = conv_grad_weight(g, x)."""
    x, w = n.inputs
    geo = {k: n.attrs[k] for k in _GEOM_ATTRS}
    dx = make("conv", (g, w), {**geo, "act": None})
    dw = make("conv_grad_weight", (g, x), {**geo, "w_shape": w.shape})
    return dx, dw


# ---------------------------------------------------------------------------------------------------
# scratch and emission: conv_grad_input's instruction with this node's input as dy and its output as dx

def _node_plan(t):
    ys, ws = _view(t.inputs[0].shape, t.inputs[1].shape, t.attrs)
    geo = C.geometry(ys, ws, t.attrs)
    return geo, C._plan(geo, t.dtype, "conv_grad_input")


def _scratch(t):
    geo, pl = _node_plan(t)
    nb = C.scratch_bytes("conv_grad_input", geo, pl)
    return [nb] if nb else []


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    geo, pl = _node_plan(t)
    x, w = t.inputs
    scratch = em.scratch[0] if em.scratch else (F.SLOT_ARENA, 0)
    em.emit("conv_grad_input", nid, {"dtype": F.DTYPE_CODE[t.dtype], **geo,
                                     **C.plan_fields("conv_grad_input", geo, pl), **_opnd("scratch", scratch),
                                     "cblock": pl["cblock"], **_opnd("w", loc(w)), **_opnd("dy", loc(x)),
                                     **_opnd("dx", outs[0])})
    flops = 2 * geo["N"] * geo["M"] * geo["OH"] * geo["OW"] * pl["kc"]
    return {"op": "conv_transpose" + ("(depthwise)" if pl["direct"] else ""), "node": t.name, "flops": flops,
            "bytes": int(sum(o.size * np.dtype(o.dtype).itemsize for o in (x, w, t)))}


register(OpDef("conv_transpose", "conv", _s_conv_transpose, _r_conv_transpose, _g_conv_transpose, emit=_emit,
               scratch=_scratch,
               doc="N-C-spatial transposed convolution (ONNX ConvTranspose without B, 1-D and 2-D): conv_grad_input's "
                   "kernel with x as dy; attrs strides, dilations, group, conv-view pads (ends minus output_padding)"))


# ---------------------------------------------------------------------------------------------------
# the user function

def conv_transpose(x, w, b=None, strides=1, pads=0, dilations=1, group=1, output_padding=0, output_shape=None,
                   auto_pad="NOTSET", name=None):
    """Transposed convolution of ``x`` (N, C_in, L) or (N, C_in, H, W) with ``w`` (C_in, C_out / group,
    *kernel), plus ``b`` (C_out,) (ONNX ConvTranspose; PyTorch's ``F.conv_transpose1d/2d`` with ``padding=p,
    output_padding=q`` is ``pads=p, output_padding=q``).

    ``strides``, ``dilations``, ``output_padding``: an int or one per spatial dim (output_padding < max(stride,
    dilation), as PyTorch and ONNX require); ``pads``: an int, one per spatial dim or begins then ends (ONNX);
    ``output_shape``: the spatial output dims, which replace ``pads`` (ONNX's rule, see ``resolve``);
    ``auto_pad``: "NOTSET", "SAME_UPPER", "SAME_LOWER" or "VALID".  ``group`` must divide C_in (group = C_in =
    C_out: depthwise).  Returns y (N, C_out, *out); errors name the op, the node and the shapes."""
    from .ops import _lift, add, reshape
    op = "conv_transpose" + (f" {name!r}" if name else "")
    w, nd = C.conv_operands(op, x, w, "C_in", "C_in, C_out/group")
    strides = C._per_axis(op, "strides", strides, nd, 1)
    dilations = C._per_axis(op, "dilations", dilations, nd, 1)
    output_padding = C._per_axis(op, "output_padding", output_padding, nd, 0)
    for a in range(nd):
        if output_padding[a] >= max(strides[a], dilations[a]):
            raise ValueError(f"{op}: output_padding {output_padding} must be smaller than the stride {strides} or "
                             f"the dilation {dilations} along spatial axis {a} (input {x.name!r} {x.shape}, "
                             f"weight {w.name!r} {w.shape})")
    group = as_int(group, f"{op}: group")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    at = {"strides": strides, "dilations": dilations, "group": group,
          "pads": resolve(op, x.shape, w.shape, strides, dilations, pads, output_padding, output_shape, auto_pad)}
    _check(op, x.shape, w.shape, at, x.name, w.name)
    if b is None:
        return make("conv_transpose", (x, w), at, name)
    b = _lift(b, x, "conv_transpose")
    cout = w.shape[1] * group
    if b.shape != (cout,):
        raise ValueError(f"{op}: bias {b.name!r} has shape {b.shape}; expected ({cout},) for weight {w.name!r} "
                         f"{w.shape} with group {group}")
    y = make("conv_transpose", (x, w), at)
    return add(y, reshape(b, (cout,) + (1,) * nd), name=name)


PUBLIC = {"conv_transpose": conv_transpose}
EXPORTS = list(PUBLIC)
