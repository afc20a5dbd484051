"""Attention: the masked softmax as one kernel, and the passes that shape attention's plan.

* ``softmax_masked(x, m)``: softmax over the last axis of ``x + m`` (mode ``add``: BERT's additive mask,
  (B, 1, 1, S) broadcast over heads and query rows), or of ``m != 0 ? x : fill`` (mode ``keep``) /
  ``m != 0 ? fill : x`` (mode ``drop``): a ``Where`` mask in the float VM's 0/1 form
  (``ops_logic.lower_logic``) with a scalar fill such as -inf or finfo.min.  One pass reads the scores and
  the mask and writes the probabilities (format 2.3 opcode 44, ``_attention.pxi``); the masked scores are
  never a tensor in memory.  The kernel runs the softmax opcode's row arithmetic on the masked row, so the
  fused op equals the unfused add / where + softmax bit for bit (an all -inf row is NaN, a row of
  finfo.min the uniform distribution, both as PyTorch).  The backward of softmax needs only its output:
  the mask costs nothing there.  Made by ``fuse_masked_softmax`` from ONNX's Add + Softmax or Where +
  Softmax (so the ONNX mapping is those operators, through the pass); users may also build it directly.
* ``fuse_masked_softmax``: that rewrite.  The attention scale stays folded in the QK^T GEMM's alpha
  (``passes.fold_gemm_scales`` runs before it).
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, broadcast_shapes
from .ops import OpDef, make, mul, register, sub, sum as _sum

MODES = ("add", "keep", "drop")


def _s_softmax_masked(inp, attrs):
    x, m = inp
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"softmax_masked: scores {x.name!r} must be floating, got {x.dtype}")
    if m.dtype != x.dtype:
        raise TypeError(f"softmax_masked: mask {m.name!r} has dtype {m.dtype}, scores {x.name!r} {x.dtype}")
    if x.ndim < 1:
        raise ValueError("softmax_masked: needs at least a 1-D tensor, got shape ()")
    if attrs.get("mode") not in MODES:
        raise ValueError(f"softmax_masked: mode must be one of {MODES}, got {attrs.get('mode')!r}")
    try:
        fits = m.ndim <= x.ndim and broadcast_shapes("softmax_masked", x.shape, m.shape) == tuple(x.shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"softmax_masked: mask {m.name!r} {m.shape} does not broadcast to the scores "
                         f"{x.name!r} {x.shape}")
    return x.shape, x.dtype


def _masked(attrs, x, m):
    mode = attrs["mode"]
    if mode == "add":
        return x + m
    fill = np.asarray(attrs["fill"], x.dtype)
    return np.where(m != 0, x, fill) if mode == "keep" else np.where(m != 0, fill, x)


def _r_softmax_masked(attrs, x, m):
    v = _masked(attrs, x, m).astype(x.dtype)
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def _g_softmax_masked(n, g):
    # the softmax rule from the output s: dv = s * (g - sum(g * s)); v = x + m passes dv to both (autodiff
    # reduces it to the mask's shape), a select passes it where x was taken
    s = n
    dv = mul(s, sub(g, _sum(mul(g, s), axis=-1, keepdims=True)))
    mode = n.attrs["mode"]
    if mode == "add":
        return dv, dv
    m = n.inputs[1]
    zero = n.graph.const(np.zeros((), n.dtype))
    dx = make("where_mask", (m, dv, zero) if mode == "keep" else (m, zero, dv))
    return dx, None


def _emit(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import broadcast_strides, operand_fields as _opnd
    x, m = t.inputs
    dims = list(x.shape)
    em.emit("softmax_masked", nid, {"dtype": F.DTYPE_CODE[t.dtype], "mode": MODES.index(t.attrs["mode"]),
                                    "ndim": len(dims), "dims": dims, **_opnd("x", loc(x)), **_opnd("m", loc(m)),
                                    "m.stride": broadcast_strides(m.shape, x.shape),
                                    "fill": em.const(float(t.attrs.get("fill", 0.0))), **_opnd("y", outs[0])})
    isz = np.dtype(t.dtype).itemsize
    return {"op": "softmax+mask", "node": t.name, "flops": 5 * t.size, "bytes": (2 * t.size + m.size) * isz}


register(OpDef("softmax_masked", "softmax", _s_softmax_masked, _r_softmax_masked, _g_softmax_masked, emit=_emit,
               doc="softmax over the last axis of x + m (mode add) or of a select between x and attrs['fill'] "
                   "on m != 0 (keep: x where m is set; drop: fill where m is set), m broadcast to x; one "
                   "kernel (ONNX Add / Where + Softmax, through ops_attention.fuse_masked_softmax)"))


def softmax_masked(x, mask, mode="add", fill=0.0, name=None):
    """softmax(x + mask) over the last axis (mode "add"), or of ``where(mask != 0, x, fill)`` ("keep") /
    ``where(mask != 0, fill, x)`` ("drop"); ``mask`` broadcasts to ``x`` (same float dtype)."""
    return make("softmax_masked", (x, mask), {"mode": mode, "fill": float(fill)}, name)


# ---------------------------------------------------------------------------------------------------
# passes

def _scalar(t):
    return t.op == "const" and t.value.size == 1


def fuse_masked_softmax(nodes, roots):
    """softmax(x + m) and softmax(where_mask(c, x, fill)) over the last axis, the sum / select read by
    the softmax alone -> ``softmax_masked``: no masked-scores buffer, one pass.  x is the full-size
    operand, m (c) broadcasts to it; the fill is a scalar constant.  Returns a Rewrite."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for s in nodes:
        if s.op != "softmax" or s.attrs["axis"] != s.ndim - 1 or s.dtype not in FLOAT_DTYPES:
            continue
        p = s.inputs[0]
        if p in keep or consumers.get(p) != [s] or p.shape != s.shape:
            continue
        got = None
        if p.op == "add":
            a, b = p.inputs
            for x, m in ((a, b), (b, a)):
                if x.shape == p.shape and m.dtype == p.dtype and m.ndim <= p.ndim:
                    got = (x, m, {"mode": "add", "fill": 0.0})
                    break
        elif p.op == "where_mask":
            c, a, b = p.inputs
            if c.dtype == p.dtype and c.ndim <= p.ndim:
                if a.shape == p.shape and _scalar(b):
                    got = (a, c, {"mode": "keep", "fill": float(b.value.reshape(-1)[0])})
                elif b.shape == p.shape and _scalar(a):
                    got = (b, c, {"mode": "drop", "fill": float(a.value.reshape(-1)[0])})
        if got is not None:
            x, m, attrs = got
            rw.replace(s, "softmax_masked", (x, m), attrs)
    return rw


# ---------------------------------------------------------------------------------------------------
# assembling parts into one buffer: the packed q/k/v gradient

def _s_assemble(inp, attrs):
    shape = tuple(attrs["shape"])
    for x in inp[1:]:
        if x.dtype != inp[0].dtype:
            raise TypeError(f"assemble: part dtypes differ ({inp[0].dtype} and {x.dtype})")
    return shape, inp[0].dtype


def _r_assemble(attrs, *parts):
    out = np.zeros(attrs["shape"], parts[0].dtype)
    flat = out.reshape(-1)
    isz = flat.itemsize
    for x, v in zip(parts, attrs["views"]):
        dst = np.lib.stride_tricks.as_strided(flat[v.offset:], v.shape, [s * isz for s in v.strides])
        dst[...] = x.reshape(v.shape)
    return out


def _emit_assemble(em, nid, t, loc, outs):
    from .backend_cpu import _emit_copy_nd, contiguous_strides
    slot, off = outs[0]
    isz = np.dtype(t.dtype).itemsize
    descs = []
    for k, (x, v) in enumerate(zip(t.inputs, t.attrs["views"])):
        if x.size:
            _emit_copy_nd(em, em.node(t.op, t.name) if k else nid, t.dtype, v.shape, loc(x),
                          contiguous_strides(v.shape), (slot, off + v.offset * isz), list(v.strides))
            descs.append({"op": "assemble", "node": t.name, "flops": 0, "bytes": 2 * x.size * isz})
    return descs


register(OpDef("assemble", "concat", _s_assemble, _r_assemble, None, int_ok=True, emit=_emit_assemble,
               doc="parts placed into one tensor of attrs['shape']: part k (its elements in row-major order) "
                   "at the strided View attrs['views'][k] of the output, the parts tiling it (concat in any "
                   "layout: the packed q/k/v gradient of an in-projection, assemble_scatter_sums).  One copy "
                   "per part, or none with attrs['in_place']: the parts' GEMMs then write into the output "
                   "(assemble_in_place; the parts are those GEMMs and the memory planner places them there)"))


def _fit_view(pos):
    """View(shape, offset, strides) with offset + sum(i_j * strides_j) == pos[i] for every index i of the
    integer array ``pos``, or None when the positions are not one strided pattern."""
    from .views import View
    if pos.size == 0:
        return None
    off = int(pos.reshape(-1)[0])
    strides = []
    want = np.full(pos.shape, off, np.int64)
    for j, n in enumerate(pos.shape):
        st = 0
        if n > 1:
            e = [0] * pos.ndim
            e[j] = 1
            st = int(pos[tuple(e)]) - off
        strides.append(st)
        shape = [1] * pos.ndim
        shape[j] = n
        want = want + (np.arange(n, dtype=np.int64) * st).reshape(shape)
    if not np.array_equal(want, pos):
        return None
    return View(tuple(pos.shape), off, tuple(strides))


def _apply_views_numerically(idx, chain):
    """``idx`` (an integer array) through the reshape / transpose nodes of ``chain``, in order."""
    for n in chain:
        idx = idx.reshape(n.shape) if n.op == "reshape" else idx.transpose(n.attrs["perm"])
    return idx


#: parts of at most this many elements are placed by computing their positions (compile-time NumPy)
ASSEMBLE_MAX_ELEMENTS = 1 << 24


def _add_leaves(r, consumers):
    """The operands of the tree of adds rooted at ``r`` whose inner adds are read by their parent only."""
    out, stack = [], [r]
    while stack:
        t = stack.pop()
        if t.op == "add" and (t is r or len(consumers.get(t, ())) == 1) and t.shape == r.shape:
            stack.extend(reversed(t.inputs))
        else:
            out.append(t)
    return out


def assemble_scatter_sums(nodes, roots):
    """sum_k gather_grad(g_k, index k, axis a) over every index k of axis a -> ``assemble`` of the g_k: the
    gradient of selecting q, k and v from a packed (.., 3, ..) in-projection output is the three head
    gradients side by side, not three zero-filled scatters and two adds.  The reshapes and transposes that
    alone read the sum (exporters' seq-first (3, S, B, E) -> (S, B, 3E)) are taken into the parts' views,
    so the assemble is written in their final layout.  Runs before the transpose and view passes, which
    then let the head-gradient GEMMs write their parts in that layout.  Returns a Rewrite."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for r in nodes:
        if r.op != "add" or r.size > ASSEMBLE_MAX_ELEMENTS:
            continue
        cs = consumers.get(r, ())
        if len(cs) == 1 and cs[0].op == "add" and cs[0].shape == r.shape:
            continue  # not the root of its tree
        leaves = _add_leaves(r, consumers)
        if len(leaves) < 2 or any(t.op != "gather_grad" or t in keep or len(consumers.get(t, ())) != 1
                                  for t in leaves):
            continue
        ax = leaves[0].attrs["axis"]
        n = r.shape[ax]
        picks = {}
        for t in leaves:
            idx = t.inputs[1]
            if (t.attrs["axis"] != ax or tuple(t.attrs["shape"]) != r.shape or idx.op != "const"
                    or idx.value.size != 1):
                break
            k = int(idx.value.reshape(-1)[0])
            k = k + n if k < 0 else k
            if k in picks or not 0 <= k < n:
                break
            picks[k] = t.inputs[0]
        else:
            if sorted(picks) != list(range(n)):
                continue
            # the view chain that alone reads the sum, up to its last transpose
            chain, cur = [], r
            while cur not in keep:  # (a root is materialised: the chain ends there)
                c = consumers.get(cur, ())
                if len(c) != 1 or c[0].op not in ("reshape", "transpose"):
                    break
                cur = c[0]
                chain.append(cur)
            while chain and chain[-1].op != "transpose":
                chain.pop()
            end = chain[-1] if chain else r
            flat = _apply_views_numerically(np.arange(r.size, dtype=np.int64).reshape(r.shape), chain)
            pos = np.empty(r.size, np.int64)
            pos[flat.reshape(-1)] = np.arange(r.size, dtype=np.int64)
            pos = pos.reshape(r.shape)
            views = []
            for k in range(n):
                part = picks[k]
                v = _fit_view(np.take(pos, k, axis=ax).reshape(part.shape))
                if v is None:
                    break
                views.append(v)
            else:
                rw.replace(end, "assemble", [picks[k] for k in range(n)],
                           {"shape": tuple(end.shape), "views": tuple(views)})
    return rw


_PLACEABLE = ("matmul", "linear")  # GEMMs whose C may be any strided layout (gemm / gemm_strided)


def _place_part(x, view, consumers, keep):
    """(GEMM node, its inputs, attrs) writing part ``x`` of an assemble straight into the output at
    ``view``, found through the reshapes / transposes that alone lead from a GEMM to ``x``; None where the
    GEMM cannot write that layout (C's rows must be contiguous, or its columns: the GEMM is then flipped,
    (AB)^T = B^T A^T)."""
    from .views import View, matrix_layout
    if x in keep or len(consumers.get(x, ())) != 1:
        return None  # (x itself is read elsewhere too: its GEMM must keep its own layout)
    chain, cur = [], x
    while cur.op in ("reshape", "transpose"):
        chain.append(cur)
        cur = cur.inputs[0]
        if cur in keep or len(consumers.get(cur, ())) != 1:
            return None
    g = cur
    if g.op not in _PLACEABLE or g in keep or len(consumers.get(g, ())) != 1 or g.size == 0 or g.ndim < 2:
        return None
    if g.op == "linear" and (g.attrs.get("act") not in (None, "none", "relu") or g.attrs.get("colsum")):
        return None
    # positions (in the assemble) of x's elements, walked back down the chain to g's dense output
    pos = (view.offset + sum(np.arange(n, dtype=np.int64).reshape([-1 if j == i else 1 for j in range(len(view.shape))])
                             * s for i, (n, s) in enumerate(zip(view.shape, view.strides)))).reshape(x.shape)
    pos = np.broadcast_to(pos, x.shape)
    for n in chain:
        if n.op == "reshape":
            pos = pos.reshape(n.inputs[0].shape)
        else:
            pos = pos.transpose(np.argsort(n.attrs["perm"]))
    # g's logical result -> its dense output (its own out_view) -> the assemble
    ov = g.attrs.get("out_view")
    if ov is not None:
        lidx = sum(np.arange(n, dtype=np.int64).reshape([-1 if j == i else 1 for j in range(len(ov.shape))]) * s
                   for i, (n, s) in enumerate(zip(ov.shape, ov.strides))) + ov.offset
        pos = pos.reshape(-1)[np.broadcast_to(lidx, ov.shape)]
    v = _fit_view(np.ascontiguousarray(pos))
    if v is None:
        return None
    attrs = dict(g.attrs)
    ins = list(g.inputs)
    if matrix_layout(View(v.shape, 0, v.strides)) is None or (v.shape[-1] > 1 and v.strides[-1] != 1):
        # columns contiguous: compute the transpose, B^T A^T, whose rows are
        if g.op != "matmul" or v.shape[-2] > 1 and v.strides[-2] != 1:
            return None
        perm = list(range(len(v.shape)))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        v = View(tuple(v.shape[p] for p in perm), v.offset, tuple(v.strides[p] for p in perm))
        ins = ins[::-1]
        ta, tb = attrs.get("ta", False), attrs.get("tb", False)
        attrs["ta"], attrs["tb"] = not tb, not ta
        if attrs.get("views"):
            attrs["views"] = {1 - k: w for k, w in attrs["views"].items()}
    if v.shape[-2] > 1 and v.strides[-2] < v.shape[-1] or any(s < 0 for s in v.strides):
        return None
    attrs["out_view"] = View(v.shape, 0, v.strides)
    attrs["placed_at"] = v.offset  # element offset in the assemble's output (lower: the part's storage)
    return g, ins, attrs


def assemble_in_place(nodes, roots):
    """An ``assemble`` whose every part is computed by a GEMM read only for it (through reshapes and
    transposes) is written by those GEMMs: each gets the strided layout of its part as ``out_view`` (and
    ``placed_at``, the part's element offset), the assemble reads the GEMMs themselves and is marked
    ``in_place`` -- no instruction, no copies, and the transposes on the way vanish.  The memory planner
    places each GEMM's output inside the assemble's buffer (``lower.lower_entry``).  Runs after
    ``views.absorb_views``.  Returns a Rewrite."""
    from .passes import Rewrite, consumer_map
    rw = Rewrite()
    consumers = consumer_map(nodes)
    keep = set(roots)
    for a in nodes:
        if a.op != "assemble" or a.attrs.get("in_place"):
            continue
        placed = [_place_part(x, v, consumers, keep) for x, v in zip(a.inputs, a.attrs["views"])]
        if any(p is None for p in placed) or len({id(p[0]) for p in placed}) != len(placed):
            continue
        for g, ins, attrs in placed:
            rw.replace(g, "matmul" if g.op == "matmul" else g.op, ins, attrs)
        rw.replace(a, "assemble", [p[0] for p in placed], dict(a.attrs, in_place=True))
    return rw


# ---------------------------------------------------------------------------------------------------
# seq-first exports: row permutations moved off the projections (before autodiff, patterns.recognize)

_READERS: list = [None, 0, {}]  # the graph last counted, its node count then, {node: reads}


def _reads(t):
    """How many node inputs of ``t``'s graph read ``t`` (a graph output counts as one more read); counted
    once per graph (clone_graph visits every node of one graph in turn)."""
    g = t.graph
    if _READERS[0] is not g or _READERS[1] != len(g.nodes):
        counts = {}
        for n in g.nodes:
            for i in n.inputs:
                counts[i] = counts.get(i, 0) + 1
        for o in g.outputs.values():
            counts[o] = counts.get(o, 0) + 1
        _READERS[:] = [g, len(g.nodes), counts]
    return _READERS[2].get(t, 0)


def _row_perm(t):
    """Whether ``t`` is a transpose of leading dims only (the last dim stays: rows move, not elements)."""
    return (t.op == "transpose" and t.ndim >= 3 and t.attrs["perm"][-1] == t.ndim - 1
            and tuple(t.attrs["perm"]) != tuple(range(t.ndim)))


def _projection(z):
    """(a, w, bias or None) when ``z`` is a @ w [+ bias] with w 2-D, bias a row vector (N,) / (1, N) and
    the product read by the bias add alone."""
    bias = None
    if z.op == "add":
        for p, b in (z.inputs, z.inputs[::-1]):
            if (p.op == "matmul" and b.shape in ((z.shape[-1],), (1, z.shape[-1])) and p.shape == z.shape
                    and _reads(p) == 1):
                z, bias = p, b
                break
        else:
            return None
    if z.op != "matmul" or z.inputs[1].ndim != 2 or z.inputs[0].ndim != z.ndim:
        return None
    return z.inputs[0], z.inputs[1], bias


def _project(a, w, bias):
    from .ops import add, matmul
    y = matmul(a, w)
    return add(y, bias) if bias is not None else y


def recognize_row_order(t, m):
    """``clone_graph`` hook (via ``patterns.recognize``): the seq-first layout of an exported
    ``nn.MultiheadAttention`` (PyTorch's ``batch_first`` modules transpose to (S, B, E) and back) moved
    off the row-wise projections, so no row permutation is ever a copy, forward or backward:

    * in-projection: ``transpose(X, p) @ W + b -> transpose(X @ W + b, p)`` (p a permutation of leading
      dims): the GEMM reads X dense, the head split reads the permuted rows as views, and the weight
      gradient reads X as it is (it was the transposed copy);
    * out-projection: ``transpose(reshape(reshape(P, (R, K)) @ W + b, (S, B, N)), p)`` -> the same
      projection of P's rows taken in p's order: the context GEMM writes them in that order (a view), the
      projection's output and its gradient are in the residual stream's layout (both were copies).

    Row-wise products commute with row permutations: values are unchanged; the weight gradients sum the
    same rows in another order.  Returns the replacement of ``t`` (built from the copies ``m``) or None."""
    from .ops import reshape, transpose
    if t.dtype not in FLOAT_DTYPES:
        return None
    # out-projection: t = transpose(y3, p), y3 = reshape(z, (.., N)), z = a2 @ w + b, a2 = reshape(P, (R, K))
    if _row_perm(t):
        y3 = t.inputs[0]
        if y3.op == "reshape" and _reads(y3) == 1 and y3.inputs[0].ndim == 2:
            z = y3.inputs[0]
            proj = _projection(z)
            if (proj is not None and _reads(z) == 1 and proj[0].op == "reshape" and _reads(proj[0]) == 1
                    and z.shape[-1] == y3.shape[-1]):
                a2, w, bias = proj
                a3 = transpose(reshape(m[a2.inputs[0]], y3.shape[:-1] + (a2.shape[-1],)), t.attrs["perm"])
                rows = reshape(a3, (a2.shape[0], a2.shape[-1]))
                return reshape(_project(rows, m[w], None if bias is None else m[bias]), t.shape)
    # in-projection: t = transpose(x, p) @ w [+ b]
    proj = _projection(t) if t.op in ("add", "matmul") else None
    if proj is not None and _row_perm(proj[0]) and _reads(proj[0]) == 1:
        a, w, bias = proj
        if t.op == "matmul" and _reads(t) == 1:
            return None  # (if a bias add reads it, that add moves the permutation past both)
        return transpose(_project(m[a.inputs[0]], m[w], None if bias is None else m[bias]), a.attrs["perm"])
    return None
