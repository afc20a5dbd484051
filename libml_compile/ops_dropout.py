"""Dropout in training mode, with masks from a counter-based random generator (Philox4x32-10).

``lc.dropout(x, p, seed=None)`` zeroes each element of ``x`` with probability ``p`` and scales the others by
``1 / (1 - p)`` (PyTorch's ``F.dropout``: ``x * mask / (1 - p)``, so a NaN or Inf stays NaN where it is
dropped; ``p = 1`` gives ``x * 0``).  PyTorch's train / eval semantics follow the entries of a program:

* ``run`` (inference) is eval mode: dropout is the identity (one copy);
* ``grad`` and ``step`` are training calls: each draws a new mask.

**The mask.**  Element ``i`` (of the tensor in row-major order) is kept when ``r / 2^32 >= p``, ``r`` a
32-bit word of Philox4x32-10 (Salmon et al., SC 2011) with key ``seed`` and counter
``(b, step)`` (two 64-bit halves), ``b = (i // 32) * 8 + i % 8``, word ``(i // 8) % 4`` (``dropout_mask``
below is the NumPy reference; the runtime's kernel is ``lm_dropout`` in kernels_tmpl.h).  The mask is a
function of ``(seed, step, i)`` only: the same for any thread count and ISA, and reproducible.

**The step.**  A program has one step counter, the int64 ``"dropout/step"`` of its persistent state (next to
the optimizer state: ``state_dict``, ``save`` and checkpoints hold it, so a resumed run draws the same
masks).  Every ``grad`` or ``step`` call advances it by one: the graph's one ``dropout_step`` node is a
``counter_next`` instruction (out = counter, counter += 1) whose output every dropout of the graph, forward and
backward, reads, so it runs before them all and they all see this call's value (the first training call is
step 0).  ``run`` does not advance it.

**The backward** regenerates the forward's mask instead of storing it: d x = dropout(g) with the same seed
and step, i.e. ``g * mask / (1 - p)``, no memory kept between the passes.  The price is the generator run
twice: about 0.8 ns per element per pass on one core with the AVX2 / AVX-512 kernel copies (2.7 ns with the
baseline SSE2 copy), some three times a memory-bound elementwise pass; a stored bit mask would instead keep
n / 8 bytes alive from the forward to the backward.

``seed``: an int (any in [-2^63, 2^64), taken modulo 2^64).  ``None`` gives each dropout of a graph a seed
of its own, a fixed function of its position among the graph's dropouts, so a graph built the same way
draws the same masks; two dropouts with the same seed (and the same step) draw the same mask over their
common element indices.
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from .ir import FLOAT_DTYPES, Graph, Tensor, as_int
from .ops import OpDef, identity, make, register

#: the name of the step counter in the program's persistent state (ir.RESERVED_NAMES)
STEP_STATE = "dropout/step"

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_U32 = np.uint64(0xFFFFFFFF)
_U64 = (1 << 64) - 1


def philox4x32_10(counter, key):
    """Philox4x32-10 of ``counter`` (an integer array of shape (..., 4), 32-bit words c0..c3) under ``key``
    (k0, k1): the (..., 4) uint32 words (Random123's philox4x32 with 10 rounds).  A NumPy reference."""
    c = np.asarray(counter, dtype=np.uint64)
    c0, c1, c2, c3 = (c[..., j] & _U32 for j in range(4))
    k0, k1 = np.uint64(int(key[0]) & 0xFFFFFFFF), np.uint64(int(key[1]) & 0xFFFFFFFF)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(_W0)) & _U32, (k1 + np.uint64(_W1)) & _U32
        p0, p1 = c0 * np.uint64(_M0), c2 * np.uint64(_M1)  # 32 x 32 -> 64 bits: never wraps
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _threshold(p):
    """(thresh, scale) as the runtime computes them: keep = word >= thresh, thresh = ceil(p * 2^32); when
    no 32-bit word reaches it (p = 1, or p within 2^-32 of 1) nothing is kept: (None, 0.0)."""
    t = math.ceil(p * 4294967296.0)
    if t >= 1 << 32:
        return None, 0.0
    return t, 1.0 / (1.0 - p)


def dropout_words(n, seed, step):
    """The Philox word ``r`` (uint32) of each of the first ``n`` elements for ``seed`` and ``step``."""
    seed, step = int(seed) & _U64, int(step) & _U64
    nb = -(-n // 32) * 8
    blk = np.arange(nb, dtype=np.uint64)
    ctr = np.stack([blk & _U32, blk >> np.uint64(32), np.full(nb, step & 0xFFFFFFFF, np.uint64),
                    np.full(nb, step >> 32, np.uint64)], axis=-1)
    words = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    i = np.arange(n, dtype=np.int64)
    return words[(i // 32) * 8 + i % 8, (i // 8) % 4]


def dropout_mask(shape, p, seed, step):
    """The keep mask (bool, ``shape``) the runtime draws for a dropout of ``p`` and ``seed`` at training call
    ``step`` (the value of ``"dropout/step"`` before the call): the NumPy reference of the kernel."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n = math.prod(shape)
    t, _ = _threshold(_check_p(p))
    if t is None:
        return np.zeros(shape, bool)
    return (dropout_words(n, seed, step) >= t).reshape(shape)


def _check_p(p):
    from .optim import _real
    return _real("dropout", "p", p, 0.0, 1.0)


def _check_seed(seed):
    s = as_int(seed, "dropout: seed")
    if not -(1 << 63) <= s < 1 << 64:
        raise ValueError(f"dropout: seed {s} is outside [-2**63, 2**64)")
    return s & _U64


def _splitmix64(k):
    z = (k + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------------------------------
# the ops

def _s_dropout(inp, at):
    x, step = inp
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dropout: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    if step.op != "dropout_step" or step.shape != () or step.dtype != "int64":
        raise ValueError(f"dropout: operand 1 must be the graph's dropout_step node, got {step!r}")
    return x.shape, x.dtype


def _r_dropout(at, x, step):
    """The training-mode value at step ``step`` (the NumPy reference; nothing folds it: the step is a value
    of the running program, never a constant)."""
    t, scale = _threshold(at["p"])
    if t is None:
        return (x * x.dtype.type(0)).astype(x.dtype)
    keep = dropout_words(x.size, at["seed"], int(np.asarray(step))).reshape(x.shape) >= t
    return (x * np.where(keep, x.dtype.type(scale), x.dtype.type(0))).astype(x.dtype)


def _g_dropout(n, g):
    """d x = g * mask / (1 - p): the same op on g, same seed, same step: the same mask, regenerated."""
    x, step = n.inputs
    return make("dropout", (g, step), dict(n.attrs)), None


def _s_step(inp, at):
    return (), "int64"


def _signed64(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def _emit_dropout(em, nid, t, loc, outs):
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    x, step = t.inputs
    nbytes = x.size * np.dtype(t.dtype).itemsize
    if em.kind == "run":  # inference (eval mode): the identity
        em.emit("copy", nid, {"nbytes": nbytes, **_opnd("src", loc(x)), **_opnd("dst", outs[0])})
        return {"op": "dropout(eval)", "node": t.name, "flops": 0, "bytes": 2 * nbytes}
    p = t.attrs["p"]
    em.emit("dropout", nid, {"dtype": F.DTYPE_CODE[t.dtype], "n": x.size, "p": em.const(p),
                             "scale": em.const(1.0 / (1.0 - p) if p < 1 else 0.0),
                             "seed": _signed64(t.attrs["seed"]), **_opnd("step", loc(step)), **_opnd("x", loc(x)),
                             **_opnd("y", outs[0])})
    return {"op": "dropout", "node": t.name, "flops": 2 * x.size, "bytes": 2 * nbytes}


def _emit_step(em, nid, t, loc, outs):
    """The training calls advance the program's step counter once, here.  ``run`` only reads it (an 8-byte
    copy nothing reads: eval mode draws no mask, but every node is one instruction at least)."""
    from libml_runtime import format as F
    from .backend_cpu import operand_fields as _opnd
    counter = (F.SLOT_STATE, em.state.opt_state_offset(STEP_STATE, "int64", ()))
    if em.kind == "run":
        em.emit("copy", nid, {"nbytes": 8, **_opnd("src", counter), **_opnd("dst", outs[0])})
        return {"op": "counter_read", "node": t.name, "flops": 0, "bytes": 16}
    em.emit("counter_next", nid, {**_opnd("counter", counter), **_opnd("out", outs[0])})
    return {"op": "counter_next", "node": t.name, "flops": 0, "bytes": 16}


register(OpDef("dropout", "dropout", _s_dropout, _r_dropout, _g_dropout, emit=_emit_dropout,
               doc="x * mask / (1 - p), mask ~ Bernoulli(1 - p) from Philox4x32-10 keyed by (seed, step); "
                   "the identity in run (eval mode), a new mask per grad/step call"))
register(OpDef("dropout_step", "dropout", _s_step, None, None, emit=_emit_step,
               doc="this training call's step number (int64): the value of the program's dropout/step "
                   "counter, which the call advances by one; one node per graph, read by every dropout"))


# ---------------------------------------------------------------------------------------------------
# the user function

#: per graph: [its dropout_step node (or None), number of dropouts lc.dropout declared in it]
_GRAPH_STATE: "weakref.WeakKeyDictionary[Graph, list]" = weakref.WeakKeyDictionary()


def _step_node(g):
    st = _GRAPH_STATE.setdefault(g, [None, 0])
    if st[0] is None:
        st[0] = g._add(Tensor(g, "dropout_step", (), {}, (), "int64"))
    return st


def dropout(x, p=0.5, seed=None, name=None):
    """Dropout of ``x`` in training mode (PyTorch's ``F.dropout(x, p, training=True)``): each element is
    zeroed with probability ``p`` and the others are scaled by ``1 / (1 - p)``.  The program's ``run`` is
    eval mode (the identity); every ``grad`` / ``step`` call draws a new mask, and the backward regenerates
    the forward's.  ``p`` in [0, 1]: 0 is the identity, 1 gives ``x * 0``.  ``seed``: an int, or None for a
    seed of this dropout's own (see the module doc: the masks are reproducible, and the step counter is
    saved with the program's state and checkpoints)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"dropout: x must be a symbolic Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dropout: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    p = _check_p(p)
    seed = None if seed is None else _check_seed(seed)
    if p == 0.0:
        return x if name is None else identity(x, name=name)
    st = _step_node(x.graph)
    if seed is None:
        seed = _splitmix64(st[1])
    st[1] += 1
    return make("dropout", (x, st[0]), {"p": p, "seed": seed}, name)


PUBLIC = {"dropout": dropout}
EXPORTS = list(PUBLIC)
