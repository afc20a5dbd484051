"""Convolution (ONNX Conv, PyTorch ``F.conv1d`` / ``F.conv2d``), NCHW, forward and both gradients.

``conv(x, w, b)`` with x (N, C, *spatial), w (M, C / group, *kernel), b (M,) or absent, for one or two
spatial dims, gives y (N, M, *out) with, per spatial axis of size H, kernel k, stride s, dilation d and
pads (begin, end)::

    out = (H + begin + end - d * (k - 1) - 1) // s + 1
    y[n, m, o] = b[m] + sum_{c, i} w[m, c, i] * x[n, g * C/G + c, o * s - begin + i * d]   (g = m // (M/G))

reading zero outside the input.  Node attrs (normalised at declaration, so every later stage reads the
same numbers): ``strides`` and ``dilations`` (one per spatial dim), ``pads`` (ONNX order: all begins,
then all ends; ``auto_pad`` is resolved into them), ``group``, and the fused epilogue (set by
``fuse_conv_epilogues`` only): ``scaled`` (a fourth input ``scale`` (M,) multiplies each channel before the
bias is added: y = acc * scale[m] + b[m], an eval-mode BatchNorm folded in), ``act`` (None, "relu", or the
name of any registry op with the ``epilogue`` capability and a VM opcode, applied after the bias with
``act_params``, its scalar parameters, as immediates: hard_swish, hard_sigmoid, clip (ReLU6), ...),
``residual`` (a last input r of y's shape added after the bias, before the activation: a ResNet block's
conv -> Add(shortcut) -> ReLU; the bias input is then present, zeros if the conv had none) and
``keep`` (a second output ``pre``: the value before the activation, for a gradient that reads it), and
``shortcut`` (set by ``fuse_conv_shortcuts`` only: strides (s2h, s2w); two last inputs x2 (N, C2, H2, W2)
and w2 (M, C2, 1, 1), a 1x1 convolution of x2 at those strides whose sum joins the accumulator before the
epilogue -- a ResNet block's projection shortcut computed inside the block's second conv, format 2.7's
``conv_shortcut``; 2-D, group 1, no ``scaled``, no ``residual``; the bias input is present).

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
from .ops import OpDef, REGISTRY, _lift, make, output, register, sum as _sum
from libml_runtime import conv_layout

#: bytes of one im2col panel (Kc rows of `panel` output pixels): half of a typical 512 KiB - 1 MiB L2, so
#: the panel and the weight block stay in cache while BLAS multiplies them
PANEL_BYTES = 256 * 1024
#: scratch panels per instruction: at most this many threads run one conv (as the GEMM's 4 panels)
CONV_SLOTS = 4
#: tasks the weight gradient and the input gradient are split into at least (when the sizes allow)
MIN_TASKS = 4
#: the tiled path (algo 1): one thread's slot (input tile + output tile) at most this many bytes, and at
#: least this many row-block tasks when the rows allow (2: a batch-1 conv still splits over two cores,
#: without quartering its tiles)
TILE_BYTES = 256 * 1024
TILE_MIN_TASKS = 2

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


def _plan(geo, dtype, op="conv"):
    """Panel width, scratch slots, input-gradient channel block, weight-gradient chunks and the algorithm
    of instruction ``op``: from the sizes only (the results' bits depend on these, never on the thread
    count).  algo 1 (the tiled microkernels, format 2.4) runs every conv but depthwise (its direct loops)
    and the pointwise one (1x1, stride 1, no padding: BLAS reads x itself); conv_grad_input at stride s
    runs one stride-1 tap convolution of dy per phase of dx (conv_layout.phases).  The forward of a conv
    ``_use_ocv`` accepts runs algo 2 (format 2.5, the channel-vector kernel) instead."""
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
    pointwise = (geo["kh"] == geo["kw"] == 1 and geo["sh"] == geo["sw"] == 1 and geo["ph"] == geo["pw"] == 0
                 and geo["OH"] == geo["H"] and geo["OW"] == geo["W"])
    # the tile holds every stride phase of the input; where the taps use only some (a 1x1 conv at stride
    # 2 reads one phase in four) building it costs more than im2col's panel (measured on W6: 0.37 vs 0.23 ms)
    phases = ({(i * geo["dh"] - geo["ph"]) % geo["sh"] for i in range(geo["kh"])},
              {(j * geo["dw"] - geo["pw"]) % geo["sw"] for j in range(geo["kw"])})
    every_phase = len(phases[0]) == geo["sh"] and len(phases[1]) == geo["sw"]
    # (the input gradient at stride s runs one stride-1 tap convolution per phase of dx instead)
    tiled = not direct and not pointwise and N > 0 and (every_phase or op == "conv_grad_input")
    pl = {"panel": panel, "npan": npan, "cblock": cblock, "nchunks": nchunks, "slot": slot, "kc": kc,
          "isz": isz, "direct": direct, "algo": 0, "rb": 1}
    if op == "conv" and not direct and not pointwise and N > 0 and _use_ocv(geo):
        rb, t = _row_block(geo["OH"], lambda r: conv_layout.ocv(geo, isz, r), N * G, isz)
        pl.update(algo=2, rb=rb, panel=t["slot"], slot=t["slot"], nrb=t["nrb"])
    elif tiled:
        items = N * G if op == "conv" or op == "conv_grad_input" else N
        rb, t = _row_block(conv_layout.rows(op, geo), lambda r: conv_layout.tiles(op, geo, isz, r), items, isz)
        pl.update(algo=1, rb=rb, panel=t["slot"], slot=t["slot"], nrb=t["nrb"],
                  nchunks=max(1, min(MIN_TASKS, N * t["nrb"])))
    return pl


def _row_block(rb, layout, items, isz):
    """(rb, layout(rb)) for the tiled algorithms: from all output rows ``rb``, halved while one thread's
    slot exceeds TILE_BYTES or ``items`` x the row blocks give fewer than TILE_MIN_TASKS tasks."""
    while rb > 1:
        t = layout(rb)
        if t["slot"] * isz <= TILE_BYTES and items * t["nrb"] >= TILE_MIN_TASKS:
            return rb, t
        rb = -(-rb // 2)
    return rb, layout(rb)


#: measurement override (benchmarks and tests): None follows the rule below, True / False forces algo 2 on
#: every conv it can run / never
OCV_FORCE = None


def _use_ocv(geo):
    """Whether the forward runs algo 2 (the channel-vector kernel, conv_layout.ocv) instead of algo 1.

    Measured on AMD EPYC Zen 2 (AVX2, 2 threads; same process, same weights; the sums are the same so the
    bits are too), the W6/W8 3x3 convs in GFLOP/s, algo 1 vs algo 2:
    batch 32: stride 2 16->32 at 32x32 108 vs 131, 32->64 at 16x16 92 vs 135; stride 1 16x16 149 vs 156,
    8x8 125 vs 151; 32x32 149 vs 143; the stem 3->16 96 vs 73.  batch 1: stride 2 50 vs 57 and 42 vs 44,
    8x8 102 vs 68.  Algo 2 vectorises over 16 output channels, so it needs full vectors of them, and the
    per-pixel broadcasts pay off once a tap has enough input channels (not the RGB stem).  A strided 1x1
    conv (the ResNet shortcut) runs algo 2 when it reads no padding (conv_layout.ocv_inplace: the kernel
    then reads x itself, no tile) and the batch is large: alone, 16->32 at 32x32 and 32->64 at 16x16,
    stride 2, algo 0 (im2col + BLAS) vs algo 2, batch 1 13 vs 10 and 9 vs 8 us, batch 32 211 vs 162 and
    142 vs 98 us, batch 256 2.24 vs 1.90 and 1.23 vs 1.07 ms; but inside W8 (alternating processes, whole
    run() calls) batch 256 gained 1.2-1.5 % while batch 1 lost 2-4 % and batch 32 1.6 % (the shortcut
    reads its input after the block's 3x3 conv has; with a tile to copy algo 2 was slower than BLAS
    everywhere, 15-19 vs 27-41 GFLOP/s)."""
    if OCV_FORCE is not None:
        return OCV_FORCE
    Cg, Mg = geo["C"] // geo["G"], geo["M"] // geo["G"]
    if Cg < 8 or Mg < 16:
        return False
    if geo["kh"] * geo["kw"] == 1:
        return (geo["sh"] > 1 or geo["sw"] > 1) and conv_layout.ocv_inplace(geo) and geo["N"] >= 128
    if geo["sh"] > 1 or geo["sw"] > 1:
        return True
    return geo["N"] >= 8 and geo["OH"] * geo["OW"] <= 256


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


def _epilogue_inputs(at, rest):
    """(b, scale, res) of a conv node's inputs after (x, w): (b), (b, scale), (b, [scale,] res); a
    shortcut's (x2, w2) come last and are not among them."""
    if at.get("shortcut"):
        rest = rest[:-2]
    b = rest[0] if rest else None
    scale = rest[1] if at.get("scaled") else None
    res = rest[-1] if at.get("residual") else None
    return b, scale, res


def _r_conv(at, x, w, *rest):
    b, scale, res = _epilogue_inputs(at, rest)
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
    if at.get("shortcut"):   # + the 1x1 conv of x2 at strides (s2h, s2w), summed before the epilogue
        xs2, ws2 = rest[-2], rest[-1]
        s2h, s2w = at["shortcut"]
        v = xs2.astype(np.float64)[:, :, :OH * s2h:s2h, :OW * s2w:s2w]
        y = y + np.einsum("nchw,mc->nmhw", v, ws2.astype(np.float64).reshape(ws2.shape[:2]))
    return _epilogue_ref(at, y.reshape(shape), b, scale, res, dtype=x.dtype)


def _epilogue_ref(at, acc, b, scale=None, res=None, dtype=None):
    """acc (float64, y's shape) * scale + b, rounded to dtype, + res (in dtype, as the unfused Add), then
    the activation (its own reference); with ``keep`` also the value before it."""
    bshape = (1, acc.shape[1]) + (1,) * (acc.ndim - 2)
    if scale is not None:
        acc = acc * scale.astype(np.float64).reshape(bshape)
    if b is not None:
        acc = acc + b.astype(np.float64).reshape(bshape)
    v = acc.astype(dtype)
    if res is not None:
        v = (v + res.astype(dtype)).astype(dtype)
    act = at.get("act")
    if act is None:
        return v
    y = REGISTRY[act].ref(at, v, *(np.asarray(p, dtype) for p in at.get("act_params", ())))
    return (y, v) if at.get("keep") else y


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
    res = bool(at.get("residual"))
    nsc = 2 if at.get("shortcut") else 0
    if nsc:
        _check_shortcut(x, w, inp, at)
    for t, what in zip(inp[2:len(inp) - res - nsc], ("bias", "scale")):
        if t.shape != (w.shape[0],):
            raise ValueError(f"conv: {what} {t.name!r} has shape {t.shape}; expected ({w.shape[0]},) for "
                             f"weight {w.name!r} {w.shape}")
    if len(inp) - res - nsc != (4 if at.get("scaled") else 3 if res or nsc else min(len(inp) - nsc, 3)):
        raise ValueError(f"conv: inputs {[t.name for t in inp]}: expected (x, w[, bias]), or (x, w, bias, scale) "
                         f"with scaled={bool(at.get('scaled'))}, then the residual with residual=True")
    oshape = out_shape(x.shape, w.shape, at)
    if res and inp[-1].shape != oshape:
        raise ValueError(f"conv: residual {inp[-1].name!r} has shape {inp[-1].shape}; expected the output's "
                         f"{oshape}")
    y = (oshape, dt)
    return [y, y] if at.get("keep") else y


def _check_shortcut(x, w, inp, at):
    """A fused shortcut's operands: x2 (N, C2, H2, W2) covering the output at strides (s2h, s2w), w2 (M,
    C2, 1, 1); the conv 2-D, group 1, with a bias input and no scale or residual."""
    x2, w2 = inp[-2:]
    s2h, s2w = at["shortcut"]
    oshape = out_shape(x.shape, w.shape, at)
    if x.ndim != 4 or at["group"] != 1 or at.get("scaled") or at.get("residual") or len(inp) != 5:
        raise ValueError(f"conv: a shortcut needs a 2-D conv of group 1 with inputs (x, w, bias, x2, w2), no "
                         f"scale or residual; got inputs {[t.name for t in inp]}, group {at['group']}")
    if (x2.ndim != 4 or x2.shape[0] != x.shape[0] or w2.shape != (w.shape[0], x2.shape[1], 1, 1)
            or s2h < 1 or s2w < 1 or (oshape[2] - 1) * s2h >= x2.shape[2] or (oshape[3] - 1) * s2w >= x2.shape[3]):
        raise ValueError(f"conv: shortcut input {x2.name!r} {x2.shape} with weight {w2.name!r} {w2.shape} at "
                         f"strides {(s2h, s2w)} does not give the output {oshape}")


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
    conv with a fused epilogue (autodiff never meets one: the passes fuse after it; this keeps the rule
    complete) takes the activation's own gradient rule at the pre-activation v (the ``pre`` output, or
    recomputed), then the per-channel scale's: d acc = dv * scale, d scale = sum(dv * acc)."""
    from .ops import mul, reshape
    x, w = n.inputs[:2]
    at = n.attrs
    gy, gpre = g if at.get("keep") else (g, None)
    geo = {k: at[k] for k in _GEOM_ATTRS}
    plain = {**geo, "act": None}
    dv = gy
    if at.get("act") is not None and gy is not None:
        v = output(n, 1) if at.get("keep") else make("conv", n.inputs, {**plain, "scaled": at.get("scaled", False),
                                                                        "residual": at.get("residual", False),
                                                                        "shortcut": at.get("shortcut")})
        params = tuple(_lift(float(p), v, "conv") for p in at.get("act_params", ()))
        dv = REGISTRY[at["act"]].grad(make(at["act"], (v,) + params), gy)[0]
    if gpre is not None:
        dv = gpre if dv is None else dv + gpre
    if dv is None:
        return (None,) * len(n.inputs)
    axes = (0,) + tuple(range(2, dv.ndim))
    bshape = (1, w.shape[0]) + (1,) * (dv.ndim - 2)
    dacc, dscale = dv, None
    if at.get("scaled"):
        dacc = mul(dv, reshape(n.inputs[3], bshape))
        dscale = _sum(mul(dv, make("conv", (x, w), plain)), axis=axes)
    dx = make("conv_grad_input", (dacc, w), {**geo, "x_shape": x.shape})
    dw = make("conv_grad_weight", (x, dacc), {**geo, "w_shape": w.shape})
    if len(n.inputs) == 2:
        return dx, dw
    db = _sum(dv, axis=axes)
    sc = ()
    if at.get("shortcut"):   # the 1x1 strided conv's own rule at dv
        x2, w2 = n.inputs[-2:]
        geo2 = {"strides": tuple(at["shortcut"]), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1}
        sc = (make("conv_grad_input", (dv, w2), {**geo2, "x_shape": x2.shape}),
              make("conv_grad_weight", (x2, dv), {**geo2, "w_shape": w2.shape}))
    return (dx, dw, db) + ((dscale,) if at.get("scaled") else ()) + ((dv,) if at.get("residual") else ()) + sc


# ---------------------------------------------------------------------------------------------------
# scratch and emission

def _node_plan(t):
    if t.op == "conv_grad_input":
        xs, ws = t.attrs["x_shape"], t.inputs[1].shape
    elif t.op in ("conv_grad_weight", "conv_sgd"):
        xs, ws = t.inputs[0].shape, t.attrs["w_shape"]
    else:
        xs, ws = t.inputs[0].shape, t.inputs[1].shape
    geo = geometry(xs, ws, t.attrs)
    if t.op == "conv" and t.attrs.get("shortcut"):
        geo.update(_shortcut_geo(t.inputs[-2].shape, t.attrs["shortcut"]))
    return geo, _plan(geo, t.dtype, t.op)


def _shortcut_geo(x2_shape, strides):
    """conv_shortcut's fields (format 2.7) beyond conv's: the shortcut input's C2, H2, W2 and strides."""
    return {"C2": x2_shape[1], "H2": x2_shape[2], "W2": x2_shape[3], "s2h": strides[0], "s2w": strides[1]}


def _tasks(op, geo, pl):
    if pl["algo"] == 2:
        return geo["N"] * geo["G"] * pl["nrb"]
    if pl["algo"] == 1:
        return geo["N"] * geo["G"] * pl["nrb"] if op in ("conv", "conv_grad_input") else pl["nchunks"]
    if op == "conv":
        return geo["N"] * geo["G"] * pl["npan"]
    if op == "conv_grad_input":
        return geo["N"] * geo["G"] * -(-(geo["C"] // geo["G"]) // pl["cblock"])
    return pl["nchunks"]


def scratch_bytes(op, geo, pl):
    """Bytes of scratch instruction ``op`` (conv, conv_grad_input, conv_grad_weight, conv_sgd) needs."""
    if pl["direct"] and op == "conv_sgd":  # the gradient, summed before the step
        return geo["M"] * pl["kc"] * pl["isz"]
    if pl["direct"] or geo["N"] == 0:
        return 0
    nslots = _slots(_tasks(op, geo, pl))
    if pl["algo"] == 2:
        return conv_layout.ocv_scratch_elements(geo, pl["isz"], pl["rb"], nslots, pl["panel"]) * pl["isz"]
    if pl["algo"] == 1:
        return conv_layout.scratch_elements(op, geo, pl["isz"], pl["rb"], nslots, pl["panel"], pl["nchunks"],
                                            op == "conv_sgd") * pl["isz"]
    nb = nslots * pl["slot"]
    if op in ("conv_grad_weight", "conv_sgd"):
        nb += pl["nchunks"] * geo["M"] * pl["kc"]
    return nb * pl["isz"]


def plan_fields(op, geo, pl):
    """The instruction fields the plan decides (beyond the geometry)."""
    return {"panel": pl["panel"], "nslots": _slots(_tasks(op, geo, pl)), "algo": pl["algo"], "rb": pl["rb"]}


def _scratch(t):
    geo, pl = _node_plan(t)
    nb = scratch_bytes(t.op, geo, pl)
    return [nb] if nb else []


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    geo, pl = _node_plan(t)
    scratch = em.scratch[0] if em.scratch else (F.SLOT_ARENA, 0)
    values = {"dtype": F.DTYPE_CODE[t.dtype], **geo, **plan_fields(t.op, geo, pl), **_opnd("scratch", scratch)}
    at = t.attrs
    if t.op == "conv":
        x, w = t.inputs[:2]
        bt = t.inputs[2] if len(t.inputs) >= 3 else None
        # (the zero bias the fusion adds to hold the input position: not read, so v + r is the unfused
        # graph's exact sum, -0 included)
        zero = bt is not None and bt.op == "const" and not np.any(bt.value)
        b = loc(bt) if bt is not None and not zero else (-1, 0)
        scale = loc(t.inputs[3]) if at.get("scaled") else (-1, 0)
        res = loc(t.inputs[-1]) if at.get("residual") else (-1, 0)
        act, epi = _act_fields(em, at)
        values.update({"act": act, **epi, **_opnd("x", loc(x)), **_opnd("w", loc(w)), **_opnd("b", b),
                       **_opnd("scale", scale), **_opnd("y", outs[0]),
                       **_opnd("pre", outs[1] if at.get("keep") else (-1, 0)), **_opnd("res", res)})
        if at.get("shortcut"):
            values.update({**_opnd("x2", loc(t.inputs[-2])), **_opnd("w2", loc(t.inputs[-1]))})
        ops = [x, w] + list(t.inputs[2:]) + [t] * (2 if at.get("keep") else 1)
    elif t.op == "conv_grad_input":
        dy, w = t.inputs
        values.update({"cblock": pl["cblock"], **_opnd("w", loc(w)), **_opnd("dy", loc(dy)), **_opnd("dx", outs[0])})
        ops = [dy, w, t]
    else:
        x, dy = t.inputs[:2]
        sgd = t.op == "conv_sgd"
        values.update({"nchunks": pl["nchunks"], "sgd": int(sgd), "lr": em.const(at["lr"] if sgd else 0.0),
                       "weight_decay": em.const(at["weight_decay"] if sgd else 0.0), **_opnd("x", loc(x)),
                       **_opnd("dy", loc(dy)), **_opnd("dw", loc(t.inputs[2]) if sgd else outs[0])})
        ops = [x, dy, t.inputs[2], t.inputs[2]] if sgd else [x, dy, t]
    opname = "conv_grad_weight" if t.op == "conv_sgd" else "conv_shortcut" if at.get("shortcut") else t.op
    em.emit(opname, nid, values)
    flops = 2 * geo["N"] * geo["M"] * geo["OH"] * geo["OW"] * (pl["kc"] + geo.get("C2", 0))
    name = ("conv_grad_weight+sgd" if t.op == "conv_sgd" else t.op) + \
        ("+bias" if t.op == "conv" and len(t.inputs) >= 3 else "") + ("+scale" if at.get("scaled") else "") + \
        ("+res" if at.get("residual") else "") + ("+shortcut" if at.get("shortcut") else "") + (f"+{at['act']}" if t.op == "conv" and at.get("act") else "") + ("(keep)" if at.get("keep") else "") + \
        ("(depthwise)" if pl["direct"] else "")
    return {"op": name, "node": t.name, "flops": flops,
            "bytes": int(sum(o.size * np.dtype(o.dtype).itemsize for o in ops))}


def _act_fields(em, at):
    """(act code, epi fields) of a conv's activation: 1 relu, 3 a VM step with its immediates."""
    from libml_runtime import format as F
    act = at.get("act")
    if act is None:
        return 0, {"epi.vm": -1, "epi.b": 0, "epi.c": 0}
    if act == "relu":
        return 1, {"epi.vm": -1, "epi.b": 0, "epi.c": 0}
    ops = [-(em.const(float(v)) + 1) for v in at.get("act_params", ())] + [0, 0]
    return 3, {"epi.vm": F.VM_OPS[REGISTRY[act].vm], "epi.b": ops[0], "epi.c": ops[1]}


register(OpDef("conv", "conv", _s_conv, _r_conv, _g_conv, emit=_emit, scratch=_scratch,
               doc="N-C-spatial convolution (ONNX Conv, 1-D and 2-D): strides, pads, dilations, group, optional "
                   "bias; fused epilogue (fuse_conv_epilogues): per-channel scale, activation act with its "
                   "act_params, keep: the pre-activation as a second output"))
register(OpDef("conv_grad_input", "conv", _s_conv_grad_input, _r_conv_grad_input, None, emit=_emit,
               scratch=_scratch, doc="conv's gradient with respect to its input: (dy, w) -> dx (col2im of W^T dy)"))
register(OpDef("conv_grad_weight", "conv", _s_conv_grad_weight, _r_conv_grad_weight, None, emit=_emit,
               scratch=_scratch, doc="conv's gradient with respect to its weight: (x, dy) -> dw (dy @ im2col(x)^T)"))
register(OpDef("conv_sgd", "opt", lambda inp, at: ((), inp[0].dtype), None, None, emit=_emit, scratch=_scratch,
               doc="p -= lr * (dw + weight_decay * p) with dw = conv_grad_weight(x, dy), inputs (x, dy, p): plain "
                   "SGD folded into the weight-gradient kernel (passes.fold_sgd_into_conv), no gradient buffer; "
                   "passes.order_inplace_writers schedules every other reader of p before it"))


# ---------------------------------------------------------------------------------------------------
# fusion: conv [+ bias] [* per-channel scale + per-channel shift] [-> activation] in one instruction

#: keep the pre-activation as the conv's second output when the activation's gradient reads it (training
#: with hard_swish, clip, ...): the conv writes both while the panel is in cache instead of an elementwise
#: pass re-reading the conv's output (see tests/test_conv_fusion.py and the report for the measurement)
KEEP_PRE = True

#: conv [+ affine] -> add(r) [-> activation] as one instruction: the residual row is added while the output
#: row is in cache (W8 at batch 256: the separate add + relu passes over the block outputs cost ~1.5 ms)
FUSE_RESIDUAL = True


def _per_channel(t, c):
    """``t`` reshaped to (M,) when it broadcasts against conv output ``c`` along the channel axis only
    ((1, M, 1, ..), (M, 1, ..), ...), else None."""
    if t.dtype != c.dtype or t.ndim > c.ndim:
        return None
    shape = (1,) * (c.ndim - t.ndim) + tuple(t.shape)
    M = c.shape[1]
    if shape[1] != M or any(d != 1 for k, d in enumerate(shape) if k != 1):
        return None
    return t


def _vec(op, a, b, M):
    """op(a, b) on per-channel vectors as (M,): folded now when both are constants (compile-time
    constants: a frozen BatchNorm's factors), else a graph op (a tiny elementwise kernel each call, so a
    later set_params / load_state_dict is honoured)."""
    from .ops import reshape
    a = a if a.shape == (M,) else reshape(a, (M,))
    b = b if b.shape == (M,) else reshape(b, (M,))
    if a.op == "const" and b.op == "const":
        return a.graph.const(REGISTRY[op].ref({}, a.value, b.value))
    return make(op, (a, b))


def _activation(d, v):
    """(act name, params) when node ``d`` can run as a conv epilogue on its operand 0 ``v``: the
    ``epilogue`` capability with a VM opcode (or relu), the other operands scalar constants, the
    same shape and dtype; else None."""
    spec = REGISTRY.get(d.op)
    if spec is None or not d.inputs or d.inputs[0] is not v or d.shape != v.shape or d.dtype != v.dtype:
        return None
    if d.op == "relu":
        return "relu", ()
    if not spec.epilogue or spec.vm is None or len(d.inputs) > 3:
        return None
    from libml_runtime import format as F
    if F.VM_OPS.get(spec.vm) in F.VM_MASK_OPERAND:
        return None
    params = []
    for x in d.inputs[1:]:
        if x.op != "const" or x.value.size != 1:
            return None
        params.append(float(x.value.reshape(-1)[0]))
    return d.op, tuple(params)


def fuse_conv_epilogues(nodes, roots):
    """conv [+ bias] -> x * a + s (per-channel a and s: an eval-mode BatchNorm, or any per-channel affine)
    -> activation  ==>  one ``conv`` node: the kernel applies scale, bias and activation to each output
    panel right after its GEMM (or each plane of the direct loop) while it is in cache.

    Each absorbed intermediate must be read by the next step alone and not be an output, so a training
    graph whose BatchNorm scale is trained (its gradient reads the conv's output) keeps the BatchNorm as an
    elementwise kernel; frozen or constant statistics fold (the backward's d conv = g * a reads only a).
    The activation is any op with the ``epilogue`` capability and a VM opcode whose other operands are
    scalar constants (relu, hard_swish, hard_sigmoid, clip = ReLU6, leaky_relu, ...).  When the gradient
    reads the activation's input v (hard_swish, clip: training), the conv keeps v as its second output
    (``keep``, KEEP_PRE) for its other readers; a gradient computed from the output (relu, hard_sigmoid)
    needs nothing kept.  Returns a ``passes.Rewrite``."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for c in nodes:
        if c.op != "conv" or c.attrs.get("act") or c.attrs.get("scaled") or c.attrs.get("residual") or c in keep:
            continue
        M = c.shape[1]
        cur, scale, bias = c, None, (c.inputs[2] if len(c.inputs) == 3 else None)
        while True:  # the per-channel affine steps
            cons = consumers.get(cur, ())
            if len(cons) != 1 or cur in keep:
                break
            d = cons[0]
            if d.op not in ("mul", "add") or d.shape != c.shape or len(d.inputs) != 2:
                break
            other = d.inputs[1] if d.inputs[0] is cur else d.inputs[0]
            if other is cur or _per_channel(other, c) is None:
                break
            if d.op == "mul":
                scale = other if scale is None else _vec("mul", scale, other, M)
                bias = None if bias is None else _vec("mul", bias, other, M)
            else:
                bias = other if bias is None else _vec("add", bias, other, M)
            cur = d
        from .ops import reshape
        if scale is not None and scale.shape != (M,):
            scale = reshape(scale, (M,))
        if bias is not None and bias.shape != (M,):
            bias = reshape(bias, (M,))
        if scale is not None and bias is None:
            bias = c.graph.const(np.zeros((M,), c.dtype))
        inputs = tuple(c.inputs[:2]) + ((bias,) if bias is not None else ()) + ((scale,) if scale is not None else ())
        attrs = {**c.attrs, "act": None, "scaled": scale is not None}
        _fuse_activation(rw, c, cur, consumers, keep, inputs, attrs)
    return rw


def _fuse_activation(rw, c, cur, consumers, keep, inputs, attrs):
    """Replace ``cur`` (the last absorbed step of conv ``c``, or ``c``) and its activation, if it has one,
    by one conv node of ``inputs`` / ``attrs``; ``cur is c`` and no activation: nothing to do (False)."""
    cons = consumers.get(cur, ())
    acts = [(d, a) for d in cons if (a := _activation(d, cur)) is not None] if cur not in keep else []
    out = cur
    if acts:
        d, (act, params) = acts[0]
        others = [o for o in cons if o is not d]
        if not others:
            out, attrs = d, {**attrs, "act": act, "act_params": params}
        elif KEEP_PRE:
            # (no cycle can form: d reads only v and constants, so none of v's other readers is
            # upstream of the conv)
            rw.replace(d, "conv", inputs, {**attrs, "act": act, "act_params": params, "keep": True})
            rw.replace(cur, "output", (d,), {"index": 1})
            return True
    if out is c:
        return False
    rw.replace(out, "conv", inputs, attrs)
    return True


def fuse_conv_residuals(nodes, roots):
    """conv (its epilogue so far, no activation) -> + r -> [activation]  ==>  one ``conv`` node with the
    residual r (a tensor of the conv's shape: a ResNet block's shortcut) as its last input, added to each
    output row after the bias and before the activation while the row is in cache.  Runs after
    ``fuse_conv_epilogues``, so a residual that is itself a conv's output is that conv's final, fused
    value; when both operands of the add are convs the first in order takes it.  Returns a
    ``passes.Rewrite``."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    if not FUSE_RESIDUAL:
        return rw
    consumers = consumer_map(nodes)
    keep = set(roots)
    taken = set()
    for c in nodes:
        if c.op != "conv" or c.attrs.get("act") or c.attrs.get("residual") or c.attrs.get("keep") or c in keep:
            continue
        cons = consumers.get(c, ())
        if len(cons) != 1 or cons[0] in taken:
            continue
        d = cons[0]
        other = (d.inputs[1] if d.inputs[0] is c else d.inputs[0]) if len(d.inputs) == 2 else None
        if (d.op != "add" or other is None or other is c or d.shape != c.shape or other.shape != c.shape
                or other.dtype != c.dtype):
            continue
        M = c.shape[1]
        bias = c.inputs[2] if len(c.inputs) >= 3 else c.graph.const(np.zeros((M,), c.dtype))
        inputs = tuple(c.inputs[:2]) + (bias,) + tuple(c.inputs[3:]) + (other,)
        taken.add(d)
        _fuse_activation(rw, c, d, consumers, keep, inputs, {**c.attrs, "residual": True})
    return rw


#: conv -> Add(a 1x1 strided conv of another tensor) [-> activation] as one conv_shortcut instruction
#: (format 2.7): the projection shortcut's channels join the block conv's reduction, so its output is never
#: written and read back (W8 at batch 256: two shortcut convs of 1.3-1.7 ms, memory-bound at 40-50 GFLOP/s)
FUSE_SHORTCUT = True


def _shortcut_conv(s, c, consumers, keep):
    """Whether conv node ``s`` (an operand of the add reading conv ``c``) can run inside c's reduction: a
    1x1 conv, group 1, no padding, no fused epilogue but a bias, read by that add alone, of c's shape."""
    at = s.attrs
    return (s.op == "conv" and s is not c and s not in keep and len(consumers.get(s, ())) == 1
            and s.inputs[0].ndim == 4 and tuple(s.inputs[1].shape[2:]) == (1, 1) and at["group"] == 1
            and not any(at["pads"]) and s.shape == c.shape and s.dtype == c.dtype
            and not any(at.get(k) for k in ("act", "scaled", "residual", "keep", "shortcut")))


def fuse_conv_shortcuts(nodes, roots):
    """conv c (its epilogue so far: a bias) -> + s -> [activation], s = conv1x1(x2, w2, strides) [+ b2]
    read by the add alone  ==>  one ``conv`` node with ``shortcut`` = s's strides and inputs (x, w, b + b2,
    x2, w2): the kernel sums w2 . x2 into each output's accumulator after c's own taps (a longer
    reduction over the same tile), so the shortcut's output is never stored.  Only where the instruction
    runs the tiled kernels (``_plan``: algo 1 or 2) and c is 2-D, group 1, unscaled; runs before
    ``fuse_conv_residuals``, which takes the adds left.  Returns a ``passes.Rewrite``."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    if not FUSE_SHORTCUT:
        return rw
    consumers = consumer_map(nodes)
    keep = set(roots)
    taken = set()
    for c in nodes:
        if (c.op != "conv" or c in keep or c.inputs[0].ndim != 4 or c.attrs["group"] != 1
                or any(c.attrs.get(k) for k in ("act", "scaled", "residual", "keep", "shortcut"))):
            continue
        cons = consumers.get(c, ())
        if len(cons) != 1 or cons[0] in taken:
            continue
        d = cons[0]
        if d.op != "add" or len(d.inputs) != 2 or d.shape != c.shape:
            continue
        s = d.inputs[1] if d.inputs[0] is c else d.inputs[0]
        if not _shortcut_conv(s, c, consumers, keep):
            continue
        strides = tuple(s.attrs["strides"])
        geo = {**geometry(c.inputs[0].shape, c.inputs[1].shape, c.attrs), **_shortcut_geo(s.inputs[0].shape, strides)}
        if _plan(geo, c.dtype)["algo"] not in (1, 2):
            continue
        M = c.shape[1]
        biases = [t.inputs[2] for t in (c, s) if len(t.inputs) == 3]
        bias = (c.graph.const(np.zeros((M,), c.dtype)) if not biases else biases[0] if len(biases) == 1
                else _vec("add", biases[0], biases[1], M))
        taken.add(d)
        _fuse_activation(rw, c, d, consumers, keep, (c.inputs[0], c.inputs[1], bias, s.inputs[0], s.inputs[1]),
                         {**c.attrs, "shortcut": strides})
    return rw


def _pointwise_gemm(t):
    """Whether a conv / conv_grad_input / conv_grad_weight node is a 1x1 conv over 1x1 images, group 1 (the
    squeeze-excitation convs on (N, C, 1, 1)): then it is one GEMM over the batch."""
    xs, ws = (t.attrs["x_shape"], t.inputs[1].shape) if t.op == "conv_grad_input" else \
        (t.inputs[0].shape, t.attrs["w_shape"]) if t.op == "conv_grad_weight" else (t.inputs[0].shape, t.inputs[1].shape)
    return (t.attrs["group"] == 1 and all(d == 1 for d in xs[2:]) and all(d == 1 for d in ws[2:])
            and not any(t.attrs["pads"]))


def pointwise_convs_as_gemms(nodes, roots):
    """1x1 convs on (N, C, 1, 1) tensors (squeeze-excitation) and their gradient kernels  ==>  GEMMs over
    the batch: y = reshape(x (N, C) @ w (M, C)^T + b), dx = dy (N, M) @ w (M, C), dw = dy^T @ x.  A
    following activation (epilogue capability, scalar-constant operands) moves before the reshape, so the
    GEMM passes fuse bias and activation into the GEMM (fuse_epilogues / fuse_vm_epilogues) and the relu
    mask into the backward GEMM.  Returns a ``passes.Rewrite``."""
    from .ops import add, reshape, transpose
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for t in nodes:
        if t.op not in ("conv", "conv_grad_input", "conv_grad_weight") or not _pointwise_gemm(t):
            continue
        if t.op == "conv":
            if t.attrs.get("act") or t.attrs.get("scaled") or t.attrs.get("residual"):
                continue
            x, w = t.inputs[:2]
            N, C, M = x.shape[0], x.shape[1], w.shape[0]
            z = make("matmul", (reshape(x, (N, C)), transpose(reshape(w, (M, C)), (1, 0))))
            if len(t.inputs) == 3:
                z = add(z, t.inputs[2])
            cons = consumers.get(t, ())
            a = _activation(cons[0], t) if len(cons) == 1 and t not in keep else None
            if a is not None:
                d = cons[0]
                zz = make(d.op, (z,) + tuple(d.inputs[1:]), dict(d.attrs))
                rw.replace(d, "reshape", (zz,), {"shape": d.shape})
            else:
                rw.replace(t, "reshape", (z,), {"shape": t.shape})
        elif t.op == "conv_grad_input":
            dy, w = t.inputs
            N, M, C = dy.shape[0], w.shape[0], w.shape[1]
            rw.replace(t, "reshape", (make("matmul", (reshape(dy, (N, M)), reshape(w, (M, C)))),),
                       {"shape": t.shape})
        else:
            x, dy = t.inputs
            N, C, M = x.shape[0], x.shape[1], dy.shape[1]
            g = make("matmul", (transpose(reshape(dy, (N, M)), (1, 0)), reshape(x, (N, C))))
            rw.replace(t, "reshape", (g,), {"shape": t.shape})
    return rw


# ---------------------------------------------------------------------------------------------------
# the user function

def conv_operands(op, x, w, cin, wlayout):
    """(w as a Tensor, spatial rank) after checking x is a 3-D / 4-D symbolic tensor and w has its rank;
    ``cin`` / ``wlayout`` name the channel and weight layout in the messages ("C", "M, C/group")."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a symbolic Tensor, got {type(x).__name__}")
    w = _lift(w, x, op.split()[0])
    if x.ndim not in (3, 4):
        raise ValueError(f"{op}: input {x.name!r} has shape {x.shape}; expected (N, {cin}, L) or (N, {cin}, H, W)")
    if w.ndim != x.ndim:
        raise ValueError(f"{op}: weight {w.name!r} has shape {w.shape}; expected a {x.ndim}-D "
                         f"({wlayout}, *kernel) weight for input {x.name!r} {x.shape}")
    return w, x.ndim - 2


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
    w, nd = conv_operands("conv", x, w, "C", "M, C/group")
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
