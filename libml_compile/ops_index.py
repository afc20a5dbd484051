"""Indexing ops of real exports: GatherElements and GatherND with constant or live indices, ScatterElements /
ScatterND with every ONNX reduction (none, add, mul, max, min), DepthToSpace / SpaceToDepth.

**Gathers.** Both view the data as a table of rows (GatherElements: single elements; GatherND: the slices
``data.shape[batch_dims + k:]``) and pick rows by flat position with ``gather`` (NumPy's ``take`` on axis 0),
whose gradient w.r.t. the data is the scatter-add kernel (``gather_grad``): zeros, then each gathered row
added back in index order, the columns split over threads -- no atomics, the same bits for any thread count.

* Constant indices (int arrays) are checked now (``ValueError`` naming the value and range) and folded into
  constant flat positions.
* Live indices (an integer Tensor, fed or computed) go through ``index_flat`` (format 2.3, opcode 40): one
  runtime pass that maps each index (tuple) to its flat position, negative indices counting from the end as
  in ONNX.  Out-of-range indices are **checked in the kernel** (no clamping): the first one, in position
  order, stops the call with an ``IndexError`` naming the node, the value and the valid range, before the
  gather reads anything with it, and nothing is updated.  Indices fed straight from a graph input are also
  checked before anything runs (``OpDef.fed_index_range`` -> the plan's ``index_inputs``): a ``ValueError``
  naming the input, the value, its position and the range; GatherND's index tuples get one range per
  component (position along the indices' last axis).

**Scatters** (constant indices; ``targets`` = the flat data position of every update, in update order):
``none`` is one gather from data and updates side by side (the last write wins, as the ONNX reference);
``add`` adds the updates summed into their targets by the scatter-add kernel (in update order); ``mul``,
``max``, ``min`` gather, per target, the data element followed by its updates in update order into a row
(one matrix per multiplicity, so no padding) and reduce each row with ``prod`` / ``max`` / ``min``
(ops_reduce: PyTorch's ``scatter_reduce(include_self=True)`` gradients -- ties of max/min share the
gradient evenly, prod's is exact with zeros); integer data (no gradient; the scatter-add kernel is
float-only) is reduced by a chain of ``add`` / ``mul`` / ``maximum`` / ``minimum`` over the row, in order.

**DepthToSpace / SpaceToDepth** are reshape -> transpose -> reshape (their gradients are those ops').
"""
from __future__ import annotations

import math

import numpy as np

from .ir import FLOAT_DTYPES, INT_DTYPES, Tensor, dense_strides
from .ops import (OpDef, _lift, _norm_axes, add, cast, concat, gather, make, mul, register, reshape, transpose)

#: user functions declared here, by name (``libml_compile`` exports them)
PUBLIC: dict = {}


def _public(f):
    PUBLIC[f.__name__] = f
    return f


# ---------------------------------------------------------------------------------------------------
# index_flat: live indices -> flat row positions (format 2.3, opcode 40)
#
# attrs: dims (k) the indexed dims, mult (k) the flat stride of each, pos_strides (one per output dim: the
# flat offset each position coordinate contributes), tuples (True: k components along the indices' last axis,
# GatherND; False: k == 1, every element one index, GatherElements).  Output: int64 of the positions' shape.

def _pos_shape(idx_shape, at):
    return tuple(idx_shape[:-1]) if at["tuples"] else tuple(idx_shape)


def _s_index_flat(inp, at):
    (idx,) = inp
    if idx.dtype != "int64":
        raise TypeError(f"index_flat: indices must be int64, got {idx.name!r} of dtype {idx.dtype}")
    k = len(at["dims"])
    if at["tuples"] and (idx.ndim == 0 or idx.shape[-1] != k):
        raise ValueError(f"index_flat: indices {idx.name!r} of shape {idx.shape} do not end in {k} components")
    if not at["tuples"] and k != 1:
        raise ValueError(f"index_flat: element indices index one dim, got dims {at['dims']}")
    pos = _pos_shape(idx.shape, at)
    if len(at["pos_strides"]) != len(pos):
        raise ValueError(f"index_flat: {len(at['pos_strides'])} position strides for positions of shape {pos}")
    return pos, "int64"


def flat_positions(at, idx, error=IndexError, what="indices"):
    """NumPy: the flat positions ``index_flat`` computes from int ``idx`` (its reference), raising ``error``
    naming the first out-of-range value, its position and the valid range."""
    dims = np.asarray(at["dims"], np.int64)
    k = len(dims)
    idx = np.asarray(idx).astype(np.int64)
    pos = _pos_shape(idx.shape, at)
    v = idx.reshape(-1, k)
    v = np.where(v < 0, v + dims, v)
    bad = np.flatnonzero(((v < 0) | (v >= dims)).reshape(-1))
    if bad.size:
        p, j = int(bad[0]), int(bad[0]) % k
        at_pos = tuple(int(i) for i in np.unravel_index(p, idx.shape)) if idx.size else ()
        raise error(f"{what}: index {idx.reshape(-1)[p]} at {at_pos} is out of range [{-dims[j]}, {dims[j]})"
                    + (f" for component {j} (dims {tuple(int(d) for d in dims)})" if at["tuples"] else ""))
    base = np.zeros(pos, np.int64)
    for d, st in enumerate(at["pos_strides"]):
        if st:
            shp = [1] * len(pos)
            shp[d] = pos[d]
            base = base + np.arange(pos[d], dtype=np.int64).reshape(shp) * st
    return base + (v @ np.asarray(at["mult"], np.int64)).reshape(pos)


def _fed_range(n):
    """The fed-index range of index_flat's input: one (lo, hi) when every component indexes a dim of one
    size, else one per component (position along the indices' last axis)."""
    dims = n.attrs["dims"]
    if len(set(dims)) == 1:
        return 0, (-dims[0], dims[0])
    return 0, tuple((-d, d) for d in dims)


def _collapse(pos, strides):
    """Merge adjacent position dims whose strides chain (and drop size-1 dims): fewer kernel loops."""
    out = []
    for d, st in zip(pos, strides):
        if d == 1:
            continue
        if out and out[-1][1] == st * d:
            out[-1] = (out[-1][0] * d, st)
        else:
            out.append((d, st))
    if any(d == 0 for d in pos):
        out = [(0, 0)]
    return [d for d, _ in out], [s for _, s in out]


def _emit_index_flat(em, nid, t, loc, outs):
    from .backend_cpu import operand_fields as _opnd
    (idx,) = t.inputs
    pos, st = _collapse(t.shape, t.attrs["pos_strides"])
    k = len(t.attrs["dims"])
    em.emit("index_flat", nid, {"k": k, "ndim": len(pos), **_opnd("idx", loc(idx)), **_opnd("out", outs[0]),
                                "dims": list(t.attrs["dims"]), "mult": list(t.attrs["mult"]), "pos_dims": pos,
                                "pos_strides": st})
    return {"op": "index_flat", "node": t.name, "flops": 0, "bytes": 8 * (idx.size + t.size)}


register(OpDef("index_flat", "index", _s_index_flat, lambda at, idx: flat_positions(at, idx),
               lambda n, g: (None,), int_ok=True, emit=_emit_index_flat, fed_index_range=_fed_range,
               doc="int64 flat row positions of live GatherElements / GatherND indices, range-checked "
                   "(negative from the end); format 2.3 opcode 40"))


def _indices(op, indices):
    """``indices`` as an int64 array (constant) or int64 Tensor (live), TypeError for anything else."""
    if isinstance(indices, Tensor):
        if indices.dtype not in INT_DTYPES:
            raise TypeError(f"{op}: indices must be integers, got {indices.name!r} of dtype {indices.dtype}")
        return cast(indices, "int64")
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{op}: indices must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _flat_index(op, x, idx, at, name):
    """The flat positions for ``idx`` (a constant array: checked now, ValueError; a Tensor: index_flat)."""
    if not isinstance(idx, Tensor):
        return x.graph.const(flat_positions(at, idx, ValueError, f"{op} of {x.name!r} {x.shape}"))
    iname = None
    if name is not None and f"{name}/indices" not in x.graph._by_name:
        iname = f"{name}/indices"
    return make("index_flat", (idx,), at, iname)


@_public
def gather_elements(x, indices, axis=0, name=None):
    """ONNX GatherElements / ``torch.gather(x, axis, indices)`` / ``np.take_along_axis``: ``y[p] = x[p with
    its axis coordinate replaced by indices[p]]``; ``indices`` has x's rank, any size along ``axis`` and at
    most x's size along the others; y has its shape.  Negative indices count from the end.

    ``indices``: an int array (checked now) or an integer Tensor (live: checked by the runtime, fed ones
    before anything runs).  The gradient w.r.t. ``x`` is the deterministic scatter-add."""
    if not isinstance(x, Tensor):
        raise TypeError(f"gather_elements: expected a symbolic Tensor, got {type(x).__name__}")
    (ax,) = _norm_axes("gather_elements", axis, x.ndim)
    idx = _indices("gather_elements", indices)
    ishape = tuple(idx.shape)
    if len(ishape) != x.ndim or any(ishape[d] > x.shape[d] for d in range(x.ndim) if d != ax):
        raise ValueError(f"gather_elements: indices of shape {ishape} do not fit {x.name!r} of shape {x.shape} "
                         f"along axis {ax} (same rank, at most its size outside the axis)")
    cs = dense_strides(x.shape)
    at = {"dims": (x.shape[ax],), "mult": (cs[ax],), "tuples": False,
          "pos_strides": tuple(0 if d == ax else cs[d] for d in range(x.ndim))}
    flat = _flat_index("gather_elements", x, idx, at, name)
    return gather(reshape(x, (x.size,)), flat, axis=0, name=name)


@_public
def gather_nd(x, indices, batch_dims=0, name=None):
    """ONNX GatherND: ``indices`` of shape ``x.shape[:b] + M + (k,)`` picks, per batch element, the slices
    ``x[batch, i_0, ..., i_{k-1}]``; y has shape ``x.shape[:b] + M + x.shape[b + k:]`` (b = batch_dims).
    Negative indices count from the end.  ``indices``: an int array or an integer Tensor, as
    ``gather_elements``; a fed one is range-checked per component (its dim)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"gather_nd: expected a symbolic Tensor, got {type(x).__name__}")
    idx = _indices("gather_nd", indices)
    ishape, r, b = tuple(idx.shape), x.ndim, int(batch_dims)
    k = ishape[-1] if ishape else 0
    if not ishape or not 0 <= b < min(len(ishape), r) or not 1 <= k <= r - b or ishape[:b] != x.shape[:b]:
        raise ValueError(f"gather_nd: indices of shape {ishape} do not fit {x.name!r} of shape {x.shape} with "
                         f"batch_dims {b} (indices: the batch dims, then any, then k in 1..{r - b} components)")
    dims, rest = x.shape[b:b + k], x.shape[b + k:]
    per = math.prod(dims)
    bstr = dense_strides(x.shape[:b])
    at = {"dims": tuple(dims), "mult": dense_strides(dims), "tuples": True,
          "pos_strides": tuple(per * bstr[d] if d < b else 0 for d in range(len(ishape) - 1))}
    flat = _flat_index("gather_nd", x, idx, at, name)
    rows = reshape(x, (math.prod(x.shape[:b]) * per,) + tuple(rest))
    return gather(rows, flat, axis=0, name=name)


# ---------------------------------------------------------------------------------------------------
# scatters with constant indices

REDUCTIONS = ("none", "add", "mul", "max", "min")


def _scatter(op, data, updates, targets, reduction, name):
    """data with the updates (flattened, in order) applied at the flat data positions ``targets``."""
    from . import ops_ew, ops_reduce
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    n, T = data.size, targets.size
    d1, u1 = reshape(data, (n,)), reshape(updates, (T,))
    g = data.graph
    if reduction == "add" and data.dtype in FLOAT_DTYPES:  # summed into the targets by the scatter-add kernel
        acc = make("gather_grad", (u1, g.const(targets)), {"axis": 0, "shape": (n,)})
        return reshape(add(d1, acc), data.shape, name=name)
    src = np.arange(n, dtype=np.int64)
    if reduction == "none" or T == 0:
        src[targets] = n + np.arange(T)  # (assignment in order: the last write wins)
        return reshape(gather(concat([d1, u1]), src), data.shape, name=name)
    both = concat([d1, u1])
    order = np.argsort(targets, kind="stable")      # updates grouped by target, each group in update order
    hit, first, count = np.unique(targets[order], return_index=True, return_counts=True)
    parts, off = [d1], n
    for c in np.unique(count):
        sel = np.flatnonzero(count == c)
        rows = np.empty((sel.size, c + 1), np.int64)
        rows[:, 0] = hit[sel]
        rows[:, 1:] = n + order[first[sel][:, None] + np.arange(c)]
        m = gather(both, rows)                      # (targets of multiplicity c, data + its c updates)
        if data.dtype in FLOAT_DTYPES:
            fn = {"mul": ops_reduce.prod, "max": ops_reduce.max, "min": ops_reduce.min}[reduction]
            red = fn(m, axis=1)
        else:  # integers (no gradient): the row in order, exactly as the ONNX reference
            fn = {"add": add, "mul": mul, "max": ops_ew.PUBLIC["maximum"], "min": ops_ew.PUBLIC["minimum"]}[reduction]
            red = m[:, 0]
            for j in range(1, c + 1):
                red = fn(red, m[:, j])
        parts.append(red)
        src[hit[sel]] = off + np.arange(sel.size)
        off += sel.size
    return reshape(gather(concat(parts), src), data.shape, name=name)


def _scatter_operands(op, data, updates):
    if not isinstance(data, Tensor):
        raise TypeError(f"{op}: data must be a symbolic Tensor, got {type(data).__name__}")
    updates = _lift(updates, data, op)
    if updates.dtype != data.dtype:
        raise TypeError(f"{op}: updates {updates.name!r} have dtype {updates.dtype}, data {data.name!r} {data.dtype}")
    return updates


def _const_indices(op, indices):
    if isinstance(indices, Tensor):
        raise TypeError(f"{op}: indices must be constant (an int array); libml scatters with live indices only "
                        f"through gather's gradient")
    return _indices(op, indices)


@_public
def scatter_elements(data, indices, updates, axis=0, reduction="none", name=None):
    """ONNX ScatterElements: ``out = data`` with ``out[p with its axis coordinate replaced by indices[p]]``
    combined with ``updates[p]`` by ``reduction`` ("none": replaced, the last of duplicates wins; "add",
    "mul", "max", "min": folded in update order, as ``torch.scatter_reduce(include_self=True)``).
    ``indices``: a constant int array of updates' shape (negative from the end); gradients reach data and
    updates."""
    updates = _scatter_operands("scatter_elements", data, updates)
    (ax,) = _norm_axes("scatter_elements", axis, data.ndim)
    idx = _const_indices("scatter_elements", indices)
    if idx.shape != updates.shape or idx.ndim != data.ndim or \
            any(idx.shape[d] > data.shape[d] for d in range(data.ndim) if d != ax):
        raise ValueError(f"scatter_elements: indices of shape {idx.shape} and updates {updates.shape} do not fit "
                         f"data {data.name!r} of shape {data.shape} along axis {ax}")
    cs = dense_strides(data.shape)
    at = {"dims": (data.shape[ax],), "mult": (cs[ax],), "tuples": False,
          "pos_strides": tuple(0 if d == ax else cs[d] for d in range(data.ndim))}
    targets = flat_positions(at, idx, ValueError, f"scatter_elements into {data.name!r} {data.shape}").reshape(-1)
    return _scatter("scatter_elements", data, updates, targets, reduction, name)


@_public
def scatter_nd(data, indices, updates, reduction="none", name=None):
    """ONNX ScatterND: ``indices`` of shape ``M + (k,)`` addresses the slices ``data[i_0, ..., i_{k-1}]``,
    ``updates`` of shape ``M + data.shape[k:]`` combined into them by ``reduction`` (as
    ``scatter_elements``).  ``indices``: a constant int array (negative from the end)."""
    updates = _scatter_operands("scatter_nd", data, updates)
    idx = _const_indices("scatter_nd", indices)
    k = idx.shape[-1] if idx.ndim else 0
    if not 1 <= k <= data.ndim or updates.shape != idx.shape[:-1] + data.shape[k:]:
        raise ValueError(f"scatter_nd: indices of shape {idx.shape} and updates {updates.shape} do not fit data "
                         f"{data.name!r} of shape {data.shape}")
    dims = data.shape[:k]
    at = {"dims": tuple(dims), "mult": dense_strides(dims), "tuples": True, "pos_strides": (0,) * (idx.ndim - 1)}
    rows = flat_positions(at, idx, ValueError, f"scatter_nd into {data.name!r} {data.shape}").reshape(-1)
    rest = math.prod(data.shape[k:])
    targets = (rows[:, None] * rest + np.arange(rest, dtype=np.int64)).reshape(-1)
    return _scatter("scatter_nd", data, updates, targets, reduction, name)


# ---------------------------------------------------------------------------------------------------
# DepthToSpace / SpaceToDepth: reshape -> transpose -> reshape

def _blocks(op, x, blocksize, mode):
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{op}: needs a 4-D (N, C, H, W) tensor, got "
                         f"{x.name + ' of shape ' + str(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    b = int(blocksize)
    if b < 1:
        raise ValueError(f"{op}: blocksize must be positive, got {blocksize}")
    if mode not in ("DCR", "CRD"):
        raise ValueError(f"{op}: mode must be 'DCR' or 'CRD', got {mode!r}")
    return b


@_public
def depth_to_space(x, blocksize, mode="DCR", name=None):
    """ONNX DepthToSpace: (N, C, H, W) -> (N, C / b^2, H b, W b).  mode "DCR" (depth-column-row, ONNX's
    default) or "CRD" (column-row-depth: ``torch.nn.functional.pixel_shuffle``)."""
    b = _blocks("depth_to_space", x, blocksize, mode)
    N, C, H, W = x.shape
    if C % (b * b):
        raise ValueError(f"depth_to_space: channels {C} of {x.name!r} {x.shape} are not a multiple of "
                         f"blocksize^2 = {b * b}")
    c = C // (b * b)
    if mode == "DCR":
        y = transpose(reshape(x, (N, b, b, c, H, W)), (0, 3, 4, 1, 5, 2))
    else:
        y = transpose(reshape(x, (N, c, b, b, H, W)), (0, 1, 4, 2, 5, 3))
    return reshape(y, (N, c, H * b, W * b), name=name)


@_public
def space_to_depth(x, blocksize, mode="DCR", name=None):
    """ONNX SpaceToDepth (the inverse of DepthToSpace "DCR"): (N, C, H, W) -> (N, C b^2, H / b, W / b).
    mode "CRD": the inverse of DepthToSpace "CRD" (``torch.nn.functional.pixel_unshuffle``)."""
    b = _blocks("space_to_depth", x, blocksize, mode)
    N, C, H, W = x.shape
    if H % b or W % b:
        raise ValueError(f"space_to_depth: H and W of {x.name!r} {x.shape} are not multiples of blocksize {b}")
    y = reshape(x, (N, C, H // b, b, W // b, b))
    y = transpose(y, (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4))
    return reshape(y, (N, C * b * b, H // b, W // b), name=name)


EXPORTS = list(PUBLIC)
