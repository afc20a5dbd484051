"""The tiled convolutions' scratch layouts (format 2.4, conv instructions with ``algo`` 1; format 2.5, the
forward's ``algo`` 2, ``ocv``; format 2.7, ``conv_shortcut``'s channels beside the tile: the geometry
dict's ``C2``).

Computed here once for the compiler (``libml_compile.ops_conv`` sizes the scratch it asks the arena for)
and for the plan validator (``plan.py`` checks the scratch operand against it); ``_conv.pxi``'s
``_tg_init`` is the C-side copy of the same arithmetic and refuses (ERR_MALFORMED) a ``panel`` smaller
than the slot it needs, so a disagreement fails loudly instead of writing past the scratch.

Each instruction is a "tap convolution" per group (see ``_conv.pxi``): input channels ``Ci`` of
``Hi x Wi``, output channels ``Co`` of ``U x V``, strides, kernel, dilations and pads; the forward and the
weight gradient read x, the input gradient (stride 1 only) reads dy with the kernel flipped.
"""
from __future__ import annotations

import math

#: output channels per forward microkernel (kernels_conv.h LM_CV_MR); packed weights are padded to it
MR = 4
#: the weight gradient's k tiles (a multiple of every ISA copy's LM_CV_DW_KR)
KR = 12
#: the weight gradient's channel padding, elements (a multiple of every ISA copy's vector block)
MV = 16


def _r16(n):
    return -(-n // 16) * 16


def _taps(k, s, d, p, a):
    """The kernel taps i < k reaching output phase a of a stride-s input gradient: (count, largest i,
    i step, dilation of the phase's stride-1 conv, its pad) -- (0, ...) when none does."""
    ii = [i for i in range(k) if (a + p - i * d) % s == 0]
    if not ii:
        return 0, 0, 1, 1, 0
    g = math.gcd(s, d)
    return len(ii), ii[-1], s // g, d // g, -((a + p - ii[-1] * d) // s)


def phases(op, d):
    """The tap convolutions of instruction ``op``: [(a, b, geometry), ...] with geometry (Ci, Hi, Wi, Co,
    U, V, sh, sw, kh, kw, dh, dw, ph, pw, i0, istep, j0, jstep); one entry, (0, 0, ...), but for
    conv_grad_input at stride > 1, which has one stride-1 convolution of dy per output phase (a, b) of
    dx: the taps i0, i0 - istep, ... (rows) and j0, j0 - jstep, ... (columns), phases no tap reaches
    left out (their dx is zero)."""
    Cg, Mg = d["C"] // d["G"], d["M"] // d["G"]
    if op != "conv_grad_input":
        return [(0, 0, (Cg, d["H"], d["W"], Mg, d["OH"], d["OW"], d["sh"], d["sw"], d["kh"], d["kw"],
                        d["dh"], d["dw"], d["ph"], d["pw"], 0, -1, 0, -1))]
    if d["sh"] == d["sw"] == 1:
        return [(0, 0, (Mg, d["OH"], d["OW"], Cg, d["H"], d["W"], 1, 1, d["kh"], d["kw"], d["dh"], d["dw"],
                        (d["kh"] - 1) * d["dh"] - d["ph"], (d["kw"] - 1) * d["dw"] - d["pw"],
                        d["kh"] - 1, 1, d["kw"] - 1, 1))]
    out = []
    for a in range(min(d["sh"], d["H"])):
        ka, i0, ist, dh, ph = _taps(d["kh"], d["sh"], d["dh"], d["ph"], a)
        for b in range(min(d["sw"], d["W"])):
            kb, j0, jst, dw, pw = _taps(d["kw"], d["sw"], d["dw"], d["pw"], b)
            if ka and kb:
                out.append((a, b, (Mg, d["OH"], d["OW"], Cg, -(-(d["H"] - a) // d["sh"]),
                                   -(-(d["W"] - b) // d["sw"]), 1, 1, ka, kb, dh, dw, ph, pw, i0, ist, j0, jst)))
    return out


def rows(op, d):
    """Output rows of the largest tap convolution (``rb`` is at most this)."""
    return max((p[2][4] for p in phases(op, d)), default=1)


def _tiles1(geo, isz, rb, dwgrad, C2=0):
    Ci, Hi, Wi, Co, U, V, sh, sw, kh, kw, dh, dw, ph, pw = geo[:14]
    rmin, cmin = (-ph) // sh, (-pw) // sw
    Rq = rb + ((kh - 1) * dh - ph) // sh - rmin
    Wq = V + ((kw - 1) * dw - pw) // sw - cmin
    Kc = Ci * kh * kw + C2
    Kp = -(-Kc // KR) * KR
    Mp = -(-Co // MR) * MR
    Mv = -(-Co // MV) * MV
    Qp = _r16(rb * Wq)
    # (conv_shortcut: the shortcut's C2 channels after the tile, Qp virtual pixels each)
    t0 = _r16(Ci * sh * sw * Rq * Wq + Wq + 32)
    tile = t0 + C2 * Qp
    return {"tile": tile, "t0": t0, "Qp": Qp, "Mp": Mp, "Mv": Mv, "Kc": Kc, "Kp": Kp,
            "noff": _r16(-(-(Kp * 8) // isz)), "slot": tile + (Qp * Mv if dwgrad else Mp * Qp), "nrb": -(-U // rb),
            "wp": Mp * Kc}


def tiles(op, d, isz, rb):
    """The sizes _tg_init derives (elements of the dtype), the largest over the tap convolutions: Kc, Kp,
    Mv, noff (the offsets), wp (one group's packed weights), slot (what one thread needs: ``panel`` must be
    at least that) and nrb (row blocks)."""
    rb = max(1, rb)
    dwgrad = op in ("conv_grad_weight", "conv_sgd")
    C2 = d.get("C2", 0) if op == "conv" else 0
    ts = [_tiles1(p[2], isz, rb, dwgrad, C2) for p in phases(op, d)] or [_tiles1((1,) * 14, isz, 1, dwgrad)]
    return {k: max(t[k] for t in ts) for k in ts[0]}


def scratch_elements(op, d, isz, rb, nslots, panel, nchunks=1, sgd=False):
    """Elements of scratch the tiled instruction uses: offsets, packed weights (forward / input
    gradient) or partials (+ the summed gradient with sgd: weight gradient), and nslots slots of panel."""
    t = tiles(op, d, isz, rb)
    if op in ("conv_grad_weight", "conv_sgd"):
        return t["noff"] + nslots * panel + nchunks * d["G"] * t["Kp"] * t["Mv"] + (d["M"] * t["Kc"] if sgd else 0)
    return t["noff"] + _r16(d["G"] * t["wp"]) + nslots * panel


def ocv(d, isz, rb):
    """algo 2 (the channel-vector forward, conv only; _conv.pxi ``_og_init``): Rt x Wt the padded input
    tile of one block of rb output rows, Mv the channels padded to 16, slot (``panel`` must be at least
    that): the tile plus the block's output, pixel-major, rows padded to 24; wt the packed weights.
    conv_shortcut (``C2`` > 0): the shortcut's C2 channels follow the tile at t0, Rs x Wt each (the
    output pixel (r, c) of the block at row r*sh, column c*sw, as the tile's taps address it), and the
    reduction is Kc = Cg*kh*kw + C2 long; the tile is then always a copy."""
    rb = max(1, rb)
    Cg, Mg = d["C"] // d["G"], d["M"] // d["G"]
    C2 = d.get("C2", 0)
    Kc = Cg * d["kh"] * d["kw"] + C2
    Mv = -(-Mg // MV) * MV
    Rs = (rb - 1) * d["sh"] + 1
    if ocv_inplace(d):   # no tap reads padding: the kernel reads x itself (tile = the image, no copy)
        Rt, Wt, t0 = d["H"], d["W"], 0
    else:
        Rt = (rb - 1) * d["sh"] + (d["kh"] - 1) * d["dh"] + 1
        Wt = (d["OW"] - 1) * d["sw"] + (d["kw"] - 1) * d["dw"] + 1
        t0 = _r16(Cg * Rt * Wt)
    tile = t0 + (_r16(C2 * Rs * Wt) if C2 else 0)
    return {"Rt": Rt, "Wt": Wt, "Rs": Rs, "Kc": Kc, "Mv": Mv, "t0": t0, "tile": tile,
            "slot": tile + -(-(rb * d["OW"]) // 24) * 24 * Mv, "noff": _r16(-(-(Kc * 8) // isz)),
            "wt": d["G"] * Kc * Mv, "nrb": -(-d["OH"] // rb)}


def ocv_inplace(d):
    """Whether algo 2 reads the input in place: no padding before, and the last tap of the last output
    pixel inside the input (so no padding after either), and no shortcut channels to place beside it."""
    return (not d.get("C2", 0) and d["ph"] == 0 and d["pw"] == 0 and (d["OH"] - 1) * d["sh"] + (d["kh"] - 1) * d["dh"] < d["H"]
            and (d["OW"] - 1) * d["sw"] + (d["kw"] - 1) * d["dw"] < d["W"])


def ocv_scratch_elements(d, isz, rb, nslots, panel):
    """Elements of scratch algo 2 uses: offsets, packed weights, nslots slots of panel."""
    t = ocv(d, isz, rb)
    return t["noff"] + t["wt"] + nslots * panel
