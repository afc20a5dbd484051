"""GEMM operands as strided views: what a BLAS call can read and write in place.

Attention moves heads around with view-like ops: the in-projection's (B, S, 3E) output is reshaped to
(B, S, 3, H, D), q/k/v are selected from it, each is transposed to (B, H, S, D), K once more for K^T, and
the context (B, H, S, D) is permuted back to (B, S, H, D) before the out-projection.  Each of those is a
copy unless the GEMM that reads (or writes) it takes the view itself: BLAS reads any matrix whose rows
are contiguous (or whose columns are: the transposed flag) with a leading dimension, and the runtime's
batch loop takes any stride per batch dim.  So a matmul reads the dense tensor at the bottom of a view
chain directly, and a matmul read only by a permute that keeps its last dim writes the permuted layout.

A view is ``View(shape, offset, strides)`` in elements over the dense storage of ``base``.  The ops that
are views: transpose, reshape (where NumPy's no-copy reshape rule allows), a gather of one constant index
(a select), a step-1 slice and broadcast_to (stride 0).  ``absorb_views`` runs last among the graph
passes (after the epilogue and optimizer folds, which read matmul inputs as dense tensors); the plan gets
``gemm_strided`` only where a stride is not the dense one, so other plans are unchanged byte for byte.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .ir import dense_strides
from .passes import Rewrite, consumer_map

#: GEMM nodes whose instruction is the plain ``gemm`` opcode (act 0, 1 or 2): their A/B may be views
_PLAIN_GEMMS = ("matmul", "linear", "sgd_gemm", "momentum_gemm")


class View(NamedTuple):
    shape: tuple
    offset: int      # elements from the base's first element
    strides: tuple   # elements per step along each dim


class _Operand(NamedTuple):
    """What a shape rule reads of an input: a view's logical shape and its base's dtype."""
    shape: tuple
    dtype: str
    name: str

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)


def logical_specs(t, rule):
    """[(shape, dtype)] of GEMM node ``t``'s outputs from its shape rule over the operands it reads (its
    views' shapes, not its inputs' bases); output 0 in the layout it writes (``out_view``: t's own)."""
    vs = t.attrs.get("views") or {}
    ins = [_Operand(vs[k].shape, x.dtype, x.name) if k in vs else x for k, x in enumerate(t.inputs)]
    spec = rule(ins, t.attrs)
    spec = list(spec) if isinstance(spec, list) else [spec]
    spec[0] = (t.shape, t.dtype)
    return spec


def _merged(g):
    """Atoms of one dim with neighbours that are evenly spaced with each other merged into one."""
    g = list(g)
    k = len(g) - 1
    while k > 0:
        if g[k - 1][1] == g[k][0] * g[k][1]:
            g[k - 1:k + 1] = [(g[k - 1][0] * g[k][0], g[k][1])]
        k -= 1
    return g


class _Atoms:
    """A view being followed down a chain: each logical dim is a group of atoms (size > 1, stride) in
    row-major order, so a dim whose elements are not evenly spaced (B*H of a (S, B*H, D) reshape of
    (S, B, 3E) data) is still exact until a later op splits it again; size-1 dims have no atoms."""

    def __init__(self, shape):
        self.offset = 0
        self.groups = [[(n, s)] if n > 1 else [] for n, s in zip(shape, dense_strides(shape))]

    def reshape(self, new_shape):
        atoms = [a for g in self.groups for a in g]
        groups = []
        for m in new_shape:
            g = []
            while m > 1:
                if not atoms:
                    return False
                n, st = atoms[0]
                if n <= m:
                    if m % n:
                        return False
                    g.append(atoms.pop(0))
                    m //= n
                else:  # split the atom: its outer part is this dim's, the inner part stays
                    if n % m:
                        return False
                    g.append((m, st * (n // m)))
                    atoms[0] = (n // m, st)
                    m = 1
            groups.append(g)
        if atoms:
            return False
        self.groups = groups
        return True

    def index(self, ax, i):
        """offset of element i along dim ax (mixed radix over its atoms, innermost last)"""
        for n, st in reversed(self.groups[ax]):
            self.offset += (i % n) * st
            i //= n

    def final(self, shape):
        """The View, or None where a dim is not evenly spaced."""
        strides = []
        for g in self.groups:
            g = _merged(g)
            if len(g) > 1:
                return None
            strides.append(g[0][1] if g else 0)
        return View(tuple(shape), self.offset, tuple(strides))


def _step(t, v):
    """Apply view op ``t`` to the atoms ``v`` of its input; False where that needs a copy."""
    op, a = t.op, t.attrs
    if op == "transpose":
        v.groups = [v.groups[i] for i in a["perm"]]
        return True
    if op == "reshape":
        return v.reshape(t.shape)
    if op == "slice":
        ax = a["axis"]
        g = _merged(v.groups[ax])
        if len(g) > 1:
            return False
        st = g[0][1] if g else 0
        v.offset += a["start"] * st
        n = a["stop"] - a["start"]
        v.groups[ax] = [(n, st)] if n > 1 else []
        return True
    if op == "broadcast_to":
        lead = t.ndim - len(v.groups)
        v.groups = [[] for _ in range(lead)] + v.groups
        for k, m in enumerate(t.shape):
            if m > 1 and not v.groups[k]:
                v.groups[k] = [(m, 0)]
        return True
    if op == "gather":
        ax = a["axis"]
        v.index(ax, int(t.inputs[1].value.reshape(-1)[0]))
        if t.inputs[1].value.ndim == 0:   # a select: the axis goes
            del v.groups[ax]
        else:
            v.groups[ax] = []
        return True
    return False


def view_chain(t):
    """(base, View of ``t`` over base's dense storage) following view ops down from ``t``, or None when
    ``t`` is not a view op (or its chain needs a copy)."""
    chain = []
    x = t
    while _step_kind(x):
        chain.append(x)
        x = x.inputs[0]
    if not chain or x.size == 0:
        return None
    v = _Atoms(x.shape)
    for n in reversed(chain):
        if not _step(n, v):
            return None
    got = v.final(t.shape)
    return None if got is None else (x, got)


def _step_kind(t):
    return t.op in ("transpose", "reshape", "slice", "broadcast_to") or (
        t.op == "gather" and t.inputs[1].op == "const" and t.inputs[1].value.size == 1)


def matrix_layout(v):
    """How BLAS reads the last two dims of ``v``: (flip, ld) with rows contiguous (flip False) or columns
    contiguous (flip True: the stored matrix is the transpose), or None."""
    r, c = v.shape[-2:]
    sr, sc = v.strides[-2:]
    if (c == 1 or sc == 1) and (r == 1 or sr >= max(1, c)):
        return False, sr if r > 1 else max(1, c)
    if (r == 1 or sr == 1) and (c == 1 or sc >= max(1, r)):
        return True, sc if c > 1 else max(1, r)
    return None


def _out_chain(m, consumers, root_set):
    """(end, View): the last transpose of the chain of reshapes / transposes that alone read ``m``, one
    after the other, and where m's elements sit in end's dense output (end's dims taken back through the
    chain's inverse); None when there is no transpose or m's rows would not be contiguous."""
    chain, cur = [], m
    while cur is m or cur not in root_set:  # (a root is materialised: the chain ends there)
        cs = consumers.get(cur, ())
        if len(cs) != 1 or cs[0].op not in ("reshape", "transpose"):
            break
        cur = cs[0]
        chain.append(cur)
    while chain and chain[-1].op != "transpose":
        chain.pop()
    if not chain:
        return None
    end = chain[-1]
    a = _Atoms(end.shape)
    for n in reversed(chain):
        if n.op == "transpose":
            inv = [0] * n.ndim
            for j, i in enumerate(n.attrs["perm"]):
                inv[i] = j
            a.groups = [a.groups[j] for j in inv]
        elif not a.reshape(n.inputs[0].shape):
            return None
    v = a.final(m.shape)
    if v is None or (m.shape[-1] > 1 and v.strides[-1] != 1):
        return None
    return end, v


def _is_dense(v):
    return v.offset == 0 and all(n == 1 or s == d for n, s, d in zip(v.shape, v.strides, dense_strides(v.shape)))


def absorb_views(nodes, roots):
    """Matmul operands that are view chains of a dense tensor are read in place (attrs ``views``: {input
    index: View}, the input replaced by the chain's base), and a plain matmul read only by a transpose that
    keeps its last dim writes the transposed layout (attrs ``out_view``: t's own dims' strides in the
    transpose's dense output; the node takes the transpose's place).  Row vectors (M = 1) and empty
    operands are left alone (the runtime's GEMV paths read A contiguously).  Returns a Rewrite."""
    rw = Rewrite()
    consumers = consumer_map(nodes)
    root_set = set(roots)
    absorbed = {}
    for t in nodes:
        if t.op not in _PLAIN_GEMMS or t.ndim < 2 or t.size == 0 or t.attrs.get("views"):
            continue
        views, ins = {}, list(t.inputs)
        for k in (0, 1):
            got = view_chain(ins[k])
            if got is None:
                continue
            base, v = got
            if len(v.shape) < 2 or matrix_layout(v) is None or math.prod(v.shape) == 0 or _is_dense(v):
                continue  # (a dense view is the reshape it was: the plain gemm reads it)
            rows = v.shape[-1] if (k == 0 and t.attrs.get("ta")) else v.shape[-2]
            if k == 0 and rows == 1:
                continue
            if t.op in ("sgd_gemm", "momentum_gemm") and len(v.shape) != 2:
                continue  # (their C is the param's state buffer: no batch)
            views[k] = v
            ins[k] = base
        if views:
            attrs = dict(t.attrs, views=views)
            absorbed[t] = (tuple(ins), attrs)
            rw.replace(t, t.op, ins, attrs)
    for m in nodes:
        if m.op != "matmul" or m in root_set or m.size == 0 or m.ndim < 3 or m.shape[-2] == 1:
            continue
        got = _out_chain(m, consumers, root_set)
        if got is None:
            continue
        end, v = got
        ins, attrs = absorbed.get(m, (m.inputs, dict(m.attrs)))
        rw.replace(end, "matmul", ins, dict(attrs, out_view=v))
    return rw
