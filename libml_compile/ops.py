"""The operator registry: one entry per operator, holding its shape rule, NumPy reference, runtime kernel
binding and gradient rule (written as graph ops, in the seed specification's terms).

Adding an operator means adding one ``OpDef`` here (and, for a new kind of kernel, an emitter, the
``OpDef.emit`` hook or a case of ``backend_cpu._emit_op``, and one runtime kernel).  Elementwise ops name
a register-VM opcode (``vm``) and are fused by ``passes.fuse``; their gradients are ordinary graph ops, so
the backward graph is fused too.

Gradient rules receive ``(node, g)`` — ``node`` is the forward tensor (its ``inputs`` are the operands and
the node itself is the op's own result, which sigmoid and softmax reuse) and ``g`` the upstream gradient of
``node``'s shape — and return one gradient per input (``None`` = not differentiable / zero).  Gradients of
broadcast operands are returned in the *output's* shape; ``autodiff`` reduces them to the operand's shape
once, centrally.

Nodes may have several outputs (saved residuals: a norm's mean and inverse std, a pool's argmax): the op's
shape rule returns a list of ``(shape, dtype)``, the node itself is output 0 and ``output(node, k)`` is the
projection node of output k (one per node and index).  The gradient rule of such an op receives a tuple
``g`` with one upstream gradient per output (``None`` where the loss does not depend on it) and may read
any output through ``output(node, k)``; its reference returns a tuple.
"""
from __future__ import annotations

import builtins  # ``sum`` below is the graph op
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .ir import FLOAT_DTYPES, INT_DTYPES, Graph, Tensor, as_int, broadcast_shapes, canonical_dtype


class DoubleSoftmaxWarning(UserWarning):
    """softmax_cross_entropy was given the output of a softmax: the loss applies a second softmax, so the
    model trains (silently) towards a flattened distribution.  Pass the pre-softmax logits instead."""


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str                      # lowering kind: ew, reduce, gemm, softmax, xent, xent_grad, cast, view, leaf, opt
    shape: Callable                # (inputs, attrs) -> (shape, dtype); raises ValueError/TypeError naming the op
    ref: Optional[Callable]        # NumPy reference (attrs, *arrays) -> array; constant folding and tests
    grad: Optional[Callable]       # (node, g) -> tuple of per-input gradients; None: no gradient rule
    vm: Optional[str] = None       # register-VM opcode name for elementwise ops
    int_ok: bool = False           # forward kernel exists for integer dtypes too
    doc: str = ""
    # (ONNX op type, {attribute: param name}[, {attribute: value}]) this op imports from; the optional
    # third dict selects this op among several of one ONNX type (Gelu's approximate: gelu / gelu_tanh)
    onnx: Optional[tuple] = None
    domain: tuple = (-3.0, 3.0)    # where generated tests sample inputs (the op is smooth there)
    params: tuple = ()             # ((name, default), ...): scalar parameters, const inputs after x
    # capability: the op may run as the epilogue of the GEMM producing its operand 0 (passes.fuse_epilogues):
    # an elementwise VM step whose other operands are a tensor of the GEMM result's shape or scalar consts
    epilogue: bool = False
    # the op's own instruction emitter, (emitter, node id, node, loc, output locations) -> profile summary
    # (ops_norm.py); ops without one are emitted by backend_cpu._emit_op by kernel kind.  The emitter's
    # ``kind`` is the entry ("run": inference) and ``state`` the StateLayout (persistent state: ops_dropout.py)
    emit: Optional[Callable] = None
    # fed indices checked at the feed boundary (the plan's index_inputs): (node) -> (input position, range),
    # range (lo, hi) for every element or ((lo, hi), ...) per position along the indices' last axis; the
    # compiler applies it when that input is a graph input (or a cast of one)
    fed_index_range: Optional[Callable] = None
    # working buffers the op's kernel needs while it runs, ``node -> [nbytes, ...]``: planned in the arena
    # (live during the instruction only) and handed to ``emit`` as ``em.scratch``, their byte offsets in
    # this order (ops_conv.py: im2col panels)
    scratch: Optional[Callable] = None


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef):
    """Add ``op`` to the registry; a name declared twice is an error (one operator, one place)."""
    if op.name in REGISTRY:
        raise ValueError(f"operator {op.name!r} is registered twice (by {REGISTRY[op.name].shape.__module__} "
                         f"and {op.shape.__module__})")
    REGISTRY[op.name] = op
    return op


# ---------------------------------------------------------------------------------------------------
# graph construction helpers


def _graph_of(*xs) -> Graph:
    for x in xs:
        if isinstance(x, Tensor):
            return x.graph
    raise TypeError("at least one operand must be a symbolic Tensor")


def _lift(x, like: Tensor, op: str) -> Tensor:
    """Turn a Python scalar / NumPy operand into a const of ``like``'s dtype, never changing its value.

    NumPy 2 (NEP 50) rules, except that libml never promotes implicitly (a static graph's dtypes are fixed
    at declaration):
    * Python bool/int/float are weak: they take the tensor's dtype when their value fits it.  An int that
      does not fit an integer dtype, or a finite number that overflows a float dtype, raises OverflowError
      (NumPy raises too); a Python float with an integer tensor raises TypeError (NumPy would promote the
      result to float64).
    * NumPy scalars and arrays (and lists, converted by np.asarray) are strong: one of another dtype is converted only when the conversion is
      exact for every element, else ValueError (a float array with an integer tensor: TypeError).
    """
    if isinstance(x, Tensor):
        if x.graph is not like.graph:
            raise ValueError(f"{op}: operands belong to different graphs ({x.graph.name!r}, {like.graph.name!r})")
        return x
    dt = np.dtype(like.dtype)
    if isinstance(x, (np.ndarray, np.generic, list, tuple)):  # lists become arrays first, as in NumPy
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise TypeError(f"{op}: cannot use {type(x).__name__} operand as an array ({e})"[:300]) from None
        return like.graph.const(_strong_operand(arr, dt, like, op))
    if isinstance(x, (bool, int, float)):
        return like.graph.const(np.asarray(_weak_scalar(x, dt, like, op), dtype=dt))
    raise TypeError(f"{op}: cannot use {type(x).__name__} {x!r} as an operand"[:300])


def _weak_scalar(x, dt, like, op):
    """The Python scalar ``x`` as a value of dtype ``dt`` (see _lift)."""
    if dt.kind == "b":
        if not isinstance(x, bool):
            raise TypeError(f"{op}: the Python {type(x).__name__} {x!r} with bool tensor {like.name!r}: only True "
                            f"and False are bool values")
        return x
    if dt.kind in "iu":
        if isinstance(x, float):
            raise TypeError(f"{op}: the Python float {x!r} with integer tensor {like.name!r} ({dt.name}): libml "
                            f"does not promote integers to floats implicitly; use lc.cast({like.name!r}-tensor, "
                            f"'float32') (or an integer scalar)")
        info = np.iinfo(dt)
        if not info.min <= int(x) <= info.max:
            raise OverflowError(f"{op}: the Python int {x!r} does not fit tensor {like.name!r}'s dtype {dt.name} "
                                f"(range [{info.min}, {info.max}])")
        return int(x)
    try:
        v = float(x)
    except OverflowError:
        raise OverflowError(f"{op}: the Python int {x!r} is too large for tensor {like.name!r}'s dtype "
                            f"{dt.name}") from None
    with np.errstate(over="ignore"):
        c = dt.type(v)
    if np.isfinite(v) and not np.isfinite(c):
        raise OverflowError(f"{op}: the scalar {x!r} overflows tensor {like.name!r}'s dtype {dt.name}")
    return c


def _strong_operand(arr, dt, like, op):
    """The NumPy operand ``arr`` converted to ``dt`` if that is exact for every element (see _lift)."""
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{op}: cannot use a NumPy operand of dtype {arr.dtype} (tensor {like.name!r} is {dt.name})")
    if arr.dtype == dt or arr.dtype.kind == "b":
        return arr.astype(dt)
    what = f"{op}: the NumPy {arr.dtype.name} operand " + (f"of shape {arr.shape}" if arr.ndim else repr(arr.item()))
    if arr.dtype.kind == "f" and dt.kind in "iu":
        raise TypeError(f"{what} with integer tensor {like.name!r} ({dt.name}): libml does not promote integers "
                        f"to floats implicitly; cast one side explicitly (lc.cast or .astype)")
    if arr.dtype.kind in "iu" and dt.kind in "iu":
        info = np.iinfo(dt)
        exact = arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max)
    else:
        with np.errstate(all="ignore"):
            conv = arr.astype(dt)
            exact = np.array_equal(conv.astype(arr.dtype), arr, equal_nan=True) and \
                bool(np.all(np.isfinite(conv) | ~np.isfinite(arr)))
    if not exact:
        raise ValueError(f"{what} cannot be converted to tensor {like.name!r}'s dtype {dt.name} without "
                         f"changing its values; convert it explicitly (.astype) or cast the tensor")
    return arr.astype(dt)


#: the user-facing function of an op whose registry name differs (for error messages)
_PUBLIC_NAME = {"softmax_xent": "softmax_cross_entropy"}


def make(op: str, inputs, attrs=None, name=None) -> Tensor:
    """Declare a node of registered ``op``; runs its shape rule now (declaration-time errors)."""
    d = REGISTRY[op]
    attrs = attrs or {}
    inputs = tuple(inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: operand {i} is {type(t).__name__}, expected a symbolic Tensor")
        if t.graph is not inputs[0].graph:
            raise ValueError(f"{_PUBLIC_NAME.get(op, op)}: operands belong to different graphs ({inputs[0].name!r} of graph "
                             f"{inputs[0].graph.name!r}, {t.name!r} of graph {t.graph.name!r})")
    spec = d.shape(inputs, attrs)
    g = inputs[0].graph
    if not isinstance(spec, list):
        if name is not None:
            g._check_new_name(name)
        return g._add(Tensor(g, op, inputs, attrs, spec[0], spec[1], name))
    # a node with several outputs: the node is output 0; outputs 1.. are ``output`` projections of it
    names = list(name) if isinstance(name, (list, tuple)) else [name]
    names += [None] * (len(spec) - len(names))
    if len(names) != len(spec):
        raise ValueError(f"{op}: {len(names)} names given for a node with {len(spec)} outputs")
    if names[0] is not None:
        g._check_new_name(names[0])
    t = g._add(Tensor(g, op, inputs, attrs, spec[0][0], spec[0][1], names[0]))
    return (t,) + tuple(output(t, k, names[k]) for k in range(1, len(spec)))


def out_specs(t: Tensor) -> list:
    """[(shape, dtype)] of every output of node ``t``, output 0 (``t`` itself) first.

    An op has several outputs when its shape rule returns a list (the count may depend on attrs: a GEMM
    computing its column sums too has two)."""
    d = REGISTRY[t.op]
    if d.shape is None:
        return [(t.shape, t.dtype)]
    if "views" in t.attrs or "out_view" in t.attrs:  # a GEMM reading / writing views (views.py)
        from .views import logical_specs
        return logical_specs(t, d.shape)
    spec = d.shape(t.inputs, t.attrs)
    return spec if isinstance(spec, list) else [spec]


def output(t: Tensor, k: int, name=None) -> Tensor:
    """Output ``k`` of node ``t`` (output 0 is ``t`` itself; outputs 1.. are ``output`` projection nodes,
    one per (node, index) in a graph: gradient rules reading a saved residual share the forward's)."""
    if k == 0:
        return t
    p = t.graph._outputs.get((t, k))
    if p is None:
        p = make("output", (t,), {"index": k}, name)
    elif name is not None and p.name != name:
        raise ValueError(f"output {k} of node {t.name!r} is already named {p.name!r}")
    return p


def ref_outputs(t: Tensor, arrays) -> list:
    """The NumPy reference's value of every output of node ``t`` for input ``arrays`` (output 0 first),
    each as an array of the output's shape and dtype (constant folding, importers, tests)."""
    d = REGISTRY[t.op]
    if d.ref is None:
        raise NotImplementedError(f"op {t.op!r} (node {t.name!r}) has no NumPy reference")
    specs = out_specs(t)
    r = d.ref(t.attrs, *arrays)
    vals = list(r) if len(specs) > 1 else [r]
    return [np.asarray(v, dtype=dt).reshape(s) for v, (s, dt) in zip(vals, specs)]


def _s_output(inp, attrs):
    (t,) = inp
    specs = out_specs(t)
    k = attrs["index"]
    if not 0 < k < len(specs):
        raise ValueError(f"output: node {t.name!r} ({t.op}) has {len(specs)} output(s); index {k} is not one of "
                         f"its outputs 1..{len(specs) - 1}")
    return specs[k]


def _same_dtype(op, a, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: operand dtypes differ ({a.dtype} and {b.dtype}); cast one explicitly")
    return a.dtype


def _float_only(op, x):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    return x.dtype


# ---------------------------------------------------------------------------------------------------
# shape rules

def _s_binary(op):
    def rule(inp, attrs):
        a, b = inp
        dt = _same_dtype(op, a, b)
        return broadcast_shapes(op, a.shape, b.shape), dt
    return rule


def _s_unary_float(op):
    def rule(inp, attrs):
        return inp[0].shape, _float_only(op, inp[0])
    return rule


def _mm_shapes(a, b, attrs):
    """(M, K) and (K, N) views of the operands, honouring the transA/transB flags set by the
    transpose-absorbing pass (the frontend never sets them)."""
    sa = a.shape[:-2] + a.shape[-2:][::-1] if attrs.get("ta") else a.shape
    sb = b.shape[:-2] + b.shape[-2:][::-1] if attrs.get("tb") else b.shape
    return sa, sb


def _s_matmul(inp, attrs):
    a, b = inp
    dt = _same_dtype("matmul", a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: internal node needs >= 2-D operands, got {a.shape} and {b.shape}")
    sa, sb = _mm_shapes(a, b, attrs)
    if sa[-1] != sb[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are incompatible "
                         f"(inner dimensions {sa[-1]} != {sb[-2]})")
    try:
        batch = broadcast_shapes("matmul", sa[:-2], sb[:-2])
    except ValueError:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are incompatible (batch dimensions "
                         f"{sa[:-2]} and {sb[:-2]} do not broadcast)") from None
    return batch + (sa[-2], sb[-1]), dt


def _r_matmul(attrs, a, b):
    if attrs.get("ta"):
        a = np.swapaxes(a, -1, -2)
    if attrs.get("tb"):
        b = np.swapaxes(b, -1, -2)
    return a @ b


def gemm_outputs(attrs) -> list:
    """Names of a GEMM node's outputs, in order: "y"; "colsum" if its epilogue also sums the result's
    columns (the bias gradient); "pre" if the epilogue writes its result elsewhere and keeps the
    GEMM + bias value (linear_ex with keep: the epilogue op's input, which that op's gradient reads)."""
    return ["y"] + (["colsum"] if attrs.get("colsum") else []) + (["pre"] if attrs.get("keep") else [])


def _with_colsum(spec, attrs):
    names = gemm_outputs(attrs)
    if len(names) == 1:
        return spec
    # column sums over every leading dim, kept as 1s: the keepdims sum they replace (a bias gradient)
    return [spec if k != "colsum" else ((1,) * (len(spec[0]) - 1) + (spec[0][-1],), spec[1]) for k in names]


def _s_linear(inp, attrs):
    return _with_colsum(_s_matmul(inp[:2], attrs), attrs)


def _colsum_too(attrs, y, pre=None):
    vals = {"y": y, "colsum": y.sum(axis=tuple(range(y.ndim - 1)), keepdims=True), "pre": pre}
    names = gemm_outputs(attrs)
    return tuple(vals[k] for k in names) if len(names) > 1 else y


def _r_linear(attrs, a, b, third):
    y = _r_matmul(attrs, a, b)
    if attrs.get("act") == "relu_grad":  # third is the relu output: y * step(relu_out)
        return _colsum_too(attrs, y * (third > 0).astype(y.dtype))
    y = y + third
    return _colsum_too(attrs, np.where(y > 0, y, np.zeros_like(y)) if attrs.get("act") == "relu" else y)


def _s_linear_ex(inp, attrs):
    return _with_colsum(_s_matmul(inp[:2], attrs), attrs)


def _r_linear_ex(attrs, a, b, *rest):
    """matmul, + bias (if has_bias), then the epilogue op's reference with its operands: "aux" (the next
    input) or an immediate value."""
    y = _r_matmul(attrs, a, b)
    rest = list(rest)
    if attrs["has_bias"]:
        y = y + rest.pop(0)
    args = [rest.pop(0) if o == "aux" else np.asarray(o, y.dtype) for o in attrs["operands"]]
    ref = REGISTRY[attrs["epi"]].ref
    if ref is None:
        raise NotImplementedError(f"linear_ex: epilogue {attrs['epi']!r} has no NumPy reference")
    return _colsum_too(attrs, np.asarray(ref({}, y, *args)), y)


#: what a user may pass for a list of ints (shapes, perms, axes)
_SEQUENCES = (list, tuple, range, np.ndarray)


def _seq(v):
    """A sequence of ints as a tuple of Python scalars (a 1-D ndarray via tolist, so a float array's
    elements reach as_int as floats and are refused)."""
    return tuple(v.tolist()) if isinstance(v, np.ndarray) else tuple(v)


def _norm_axes(op, axes, ndim):
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, _SEQUENCES):
        axes = tuple(as_int(a, f"{op}: axis") for a in _seq(axes))
    else:
        axes = (as_int(axes, f"{op}: axis"),)
    out = []
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"{op}: axis {ax} is out of range for a {ndim}-D tensor")
        out.append(int(ax) % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axes}")
    return tuple(sorted(out))


def _s_reduce(inp, attrs):
    (x,) = inp
    _float_only("sum", x)
    axes = attrs["axes"]
    if attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return shape, x.dtype


def _s_reshape(inp, attrs):
    (x,) = inp
    shape = attrs["shape"]
    if int(np.prod(shape, dtype=np.int64)) != x.size:
        raise ValueError(f"reshape: cannot reshape {x.shape} ({x.size} elements) to {shape}")
    return shape, x.dtype


def _s_transpose(inp, attrs):
    (x,) = inp
    perm = attrs["perm"]
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"transpose: perm {perm} is not a permutation of the axes of shape {x.shape}")
    return tuple(x.shape[p] for p in perm), x.dtype


def _s_broadcast_to(inp, attrs):
    (x,) = inp
    shape = attrs["shape"]
    if broadcast_shapes("broadcast_to", x.shape, shape) != shape:
        raise ValueError(f"broadcast_to: shape {x.shape} does not broadcast to {shape}")
    return shape, x.dtype


def _s_softmax(inp, attrs):
    (x,) = inp
    _float_only("softmax", x)
    if x.ndim == 0:
        raise ValueError("softmax: needs at least a 1-D tensor, got shape ()")
    return x.shape, x.dtype


def _s_xent(inp, attrs):
    logits, labels = inp
    _float_only("softmax_cross_entropy", logits)
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: logits must be (batch, classes), got shape {logits.shape}")
    if 0 in logits.shape:
        # the runtime's cross-entropy kernels need B >= 1 and C >= 1: say so here, naming the tensor
        raise ValueError(f"softmax_cross_entropy: logits {logits.name!r} have shape {logits.shape}; the batch "
                         f"and the number of classes must be at least 1 (a zero-size batch has no mean loss)")
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"softmax_cross_entropy: labels must be integers, got {labels.name!r} of dtype {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} does not match logits "
                         f"shape {logits.shape} (expected ({logits.shape[0]},))")
    return (), logits.dtype


def _s_xent_grad(inp, attrs):
    logits, labels, g = inp
    spec = (logits.shape, logits.dtype)
    return [spec, ((), logits.dtype)] if attrs.get("with_loss") else spec


def _s_cast(inp, attrs):
    return inp[0].shape, attrs["dtype"]


# ---------------------------------------------------------------------------------------------------
# NumPy references (compile-time constant folding and test oracles; never a runtime path)

def _r_softmax(attrs, x):
    ax = attrs["axis"]
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    return e / e.sum(axis=ax, keepdims=True)


def _r_xent(attrs, z, y):
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return np.asarray((lse - z[np.arange(len(y)), y]).mean(), dtype=z.dtype)


def _r_xent_grad(attrs, z, y, g):
    p = _r_softmax({"axis": 1}, z)
    p[np.arange(len(y)), y] -= 1
    grad = (p * (g / len(y))).astype(z.dtype)
    return (grad, _r_xent({}, z, y)) if attrs.get("with_loss") else grad


def _r_div(attrs, a, b):
    if a.dtype.kind in "iu":
        # truncation toward zero, as the runtime kernel (C) and ONNX; wrapping like NumPy (MIN / -1 = MIN).
        # From floor division: one up where the remainder is non-zero and the signs differ.  (Not via
        # abs(): abs(MIN) is MIN, which made MIN / 2 positive.)
        if np.any(b == 0):
            raise ZeroDivisionError("div: integer division by zero in a constant expression")
        with np.errstate(over="ignore"):
            q = np.floor_divide(a, b)
            r = a - q * b
        return (q + ((r != 0) & ((a < 0) != (b < 0)))).astype(a.dtype)
    return a / b


def _r_sigmoid(attrs, x):
    return (1 / (1 + np.exp(-x))).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# gradient rules (the seed's formulas)

def _g_matmul(n, g):
    """dA = G B^T, dB = A^T G (batch broadcasting reduced centrally by autodiff).  A 2-D operand shared by
    every batch element (a Linear weight applied to (batch, seq, K)) gets its gradient from one GEMM over
    the flattened rows, A^T G with (batch * seq) as the inner dimension, instead of one GEMM per batch
    element and a sum over them (the same sum, in a different order: W7's weight gradients)."""
    a, b = n.inputs
    if b.ndim == 2 and a.ndim > 2 and a.shape[:-2] == g.shape[:-2]:
        rows = math.prod(a.shape[:-1])
        db = matmul(_swap_last2(reshape(a, (rows, a.shape[-1]))), reshape(g, (rows, g.shape[-1])))
    else:
        db = matmul(_swap_last2(a), g)
    return matmul(g, _swap_last2(b)), db


def _swap_last2(t):
    perm = list(range(t.ndim))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return transpose(t, perm)


def _g_softmax(n, g):
    # dL/dz = s * (g - sum(g * s, axis, keepdims))  with s the forward output
    s = n
    return (mul(s, sub(g, sum(mul(g, s), axis=n.attrs["axis"], keepdims=True))),)


def _g_reduce(n, g):
    (x,) = n.inputs
    kshape = tuple(1 if i in n.attrs["axes"] else d for i, d in enumerate(x.shape))
    gk = reshape(g, kshape)
    if n.attrs["scale"] != 1.0:
        gk = mul(gk, n.attrs["scale"])
    return (broadcast_to(gk, x.shape),)


def _g_transpose(n, g):
    inv = tuple(int(i) for i in np.argsort(n.attrs["perm"]))
    return (transpose(g, inv),)


for _d in [
    OpDef("input", "leaf", None, None, None, doc="fed tensor"),
    OpDef("param", "leaf", None, None, None, doc="trainable/frozen parameter"),
    OpDef("const", "leaf", None, None, None, doc="constant"),
    OpDef("buffer", "leaf", None, None, None, doc="persistent non-trainable state (Graph.buffer)"),
    OpDef("add", "ew", _s_binary("add"), lambda at, a, b: a + b,
          lambda n, g: (g, g), vm="ADD", int_ok=True, epilogue=True, onnx=("Add", {})),
    OpDef("sub", "ew", _s_binary("sub"), lambda at, a, b: a - b,
          lambda n, g: (g, neg(g)), vm="SUB", int_ok=True, onnx=("Sub", {})),
    OpDef("mul", "ew", _s_binary("mul"), lambda at, a, b: a * b,
          lambda n, g: (mul(g, n.inputs[1]), mul(g, n.inputs[0])), vm="MUL", int_ok=True, epilogue=True,
          onnx=("Mul", {})),
    OpDef("div", "ew", _s_binary("div"), _r_div,
          # d(u/v)/du = 1/v ; d(u/v)/dv = -u/v^2, computed as -(u/v)/v from the forward output (as
          # PyTorch does): no v*v, which can overflow where u/v does not, and one op less
          lambda n, g: (div(g, n.inputs[1]), neg(mul(g, div(n, n.inputs[1])))),
          vm="DIV", int_ok=True, onnx=("Div", {})),
    OpDef("neg", "ew", _s_unary_float("neg"), lambda at, x: -x, lambda n, g: (neg(g),), vm="NEG",
          onnx=("Neg", {})),
    OpDef("identity", "ew", lambda inp, at: (inp[0].shape, inp[0].dtype), lambda at, x: x.copy(),
          lambda n, g: (g,), vm="COPY", int_ok=True, onnx=("Identity", {})),
    # relu'(x) = 1 where x > 0, 0 otherwise (0 at x = 0).  Taken from the output: relu(x) > 0 iff x > 0
    # (NaN included), so the pre-activation need not stay alive and can be fused into a GEMM epilogue.
    # relu(NaN) = NaN, as the VM's RELU and PyTorch (the reference gave 0, so a folded NaN const became 0)
    OpDef("relu", "ew", _s_unary_float("relu"), lambda at, x: np.where(x < 0, np.zeros_like(x), x),
          lambda n, g: (mul(g, step(n)),), vm="RELU", onnx=("Relu", {})),
    # sigma'(x) = sigma(x) (1 - sigma(x)), computed from the forward output
    OpDef("sigmoid", "ew", _s_unary_float("sigmoid"), _r_sigmoid,
          # g * (s * (1 - s)) from the output s, as one VM step (the seed rule, same rounding), so a GEMM
          # producing g takes it as its epilogue
          lambda n, g: (make("sigmoid_grad", (g, n)),), vm="SIGMOID", epilogue=True, onnx=("Sigmoid", {})),
    OpDef("sigmoid_grad", "ew", _s_binary("sigmoid_grad"), None, None, vm="SIGMOID_GRAD", epilogue=True,
          doc="g * (s * (1 - s)) for s = sigmoid's output"),
    OpDef("exp", "ew", _s_unary_float("exp"), lambda at, x: np.exp(x), lambda n, g: (mul(g, n),), vm="EXP",
          epilogue=True, onnx=("Exp", {})),
    OpDef("log", "ew", _s_unary_float("log"), lambda at, x: np.log(x),
          lambda n, g: (div(g, n.inputs[0]),), vm="LOG", onnx=("Log", {})),
    OpDef("step", "ew", _s_unary_float("step"), lambda at, x: (x > 0).astype(x.dtype),
          lambda n, g: (None,), vm="STEP", doc="Heaviside step, 0 at 0: relu's derivative"),
    OpDef("broadcast_to", "ew", _s_broadcast_to, lambda at, x: np.broadcast_to(x, at["shape"]).copy(),
          lambda n, g: (g,), vm="COPY", int_ok=True,
          doc="np.broadcast_to: a VM copy for floats, a strided copy with zero strides for integers / bools"),
    OpDef("sum", "reduce", _s_reduce,
          lambda at, x: np.asarray(x.sum(axis=at["axes"], keepdims=at["keepdims"]) * at["scale"], x.dtype),
          _g_reduce, doc="sum over axes, times attrs['scale'] (mean is scale = 1/n)"),
    OpDef("matmul", "gemm", _s_matmul, _r_matmul,
          _g_matmul),
    OpDef("transpose", "transpose", _s_transpose, lambda at, x: x.transpose(at["perm"]).copy(order="C"),
          _g_transpose, int_ok=True),
    OpDef("reshape", "view", _s_reshape, lambda at, x: x.reshape(at["shape"]),
          lambda n, g: (reshape(g, n.inputs[0].shape),), int_ok=True),
    OpDef("cast", "cast", _s_cast, lambda at, x: x.astype(at["dtype"]),
          lambda n, g: (cast(g, n.inputs[0].dtype) if n.inputs[0].dtype in FLOAT_DTYPES else None,),
          int_ok=True),
    OpDef("linear", "gemm", _s_linear, _r_linear, None,
          doc="act(matmul(a, b) + bias), or with act='relu_grad' matmul(a, b) * step(relu_out): a GEMM "
              "with its epilogue, made by passes.fuse_epilogues / passes.fuse_relu_backward; with attr colsum a "
              "second output, the result's column sums (1, N)"),
    OpDef("linear_ex", "gemm", _s_linear_ex, _r_linear_ex, None,
          doc="epi(matmul(a, b) [+ bias], [aux], immediates): a GEMM whose epilogue is any op with the "
              "'epilogue' capability (attrs: epi, has_bias, operands), made by passes.fuse_epilogues; attr "
              "colsum as for linear"),
    OpDef("softmax", "softmax", _s_softmax, _r_softmax, _g_softmax),
    OpDef("softmax_xent", "xent", _s_xent, _r_xent,
          lambda n, g: (make("xent_grad", (n.inputs[0], n.inputs[1], g)), None),
          doc="mean over the batch of -log softmax(logits)[label] (log-sum-exp, stable)"),
    OpDef("xent_grad", "xent_grad", _s_xent_grad, _r_xent_grad, None,
          doc="g * (softmax(logits) - onehot(labels)) / batch; with attr with_loss a second output, the "
              "loss (passes.fuse_xent: forward and backward of softmax cross-entropy in one pass)"),
    OpDef("output", "proj", _s_output, None, None, int_ok=True,
          doc="output attrs['index'] (>= 1) of a node with several outputs; written by that node's "
              "instruction (its gradient reaches the node's rule through autodiff)"),
]:
    register(_d)


# ---------------------------------------------------------------------------------------------------
# the user-facing functions

def _binary(op, a, b, name):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise TypeError(f"{op}: at least one operand must be a symbolic Tensor")
    like = a if isinstance(a, Tensor) else b
    a, b = _lift(a, like, op), _lift(b, like, op)
    if a.dtype not in FLOAT_DTYPES and not REGISTRY[op].int_ok:
        raise TypeError(f"{op}: integer operands are not supported")
    if a.dtype == "bool" or b.dtype == "bool":
        raise TypeError(f"{op}: arithmetic on bool tensors is not defined ({a.name!r} is {a.dtype}, {b.name!r} is "
                        f"{b.dtype}); use lc.logical_and/or/xor, or lc.cast to a number type")
    return make(op, (a, b), name=name)


def add(a, b, name=None): return _binary("add", a, b, name)
def sub(a, b, name=None): return _binary("sub", a, b, name)
def mul(a, b, name=None): return _binary("mul", a, b, name)
def div(a, b, name=None): return _binary("div", a, b, name)


def _unary(op, x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a symbolic Tensor, got {type(x).__name__}")
    return make(op, (x,), name=name)


def neg(x, name=None): return _unary("neg", x, name)
def relu(x, name=None): return _unary("relu", x, name)
def sigmoid(x, name=None): return _unary("sigmoid", x, name)
def exp(x, name=None): return _unary("exp", x, name)
def log(x, name=None): return _unary("log", x, name)
def step(x, name=None): return _unary("step", x, name)
def identity(x, name=None): return _unary("identity", x, name)


def softmax(x, axis=-1, name=None):
    """Softmax along one ``axis`` (ONNX opset >= 13 semantics)."""
    (ax,) = _norm_axes("softmax", axis, x.ndim)
    return make("softmax", (x,), {"axis": ax}, name)


def sum(x, axis=None, keepdims=False, name=None):  # noqa: A001 - mirrors numpy's name, as the API asks
    """Sum over ``axis`` (None: all axes, giving a scalar)."""
    axes = _norm_axes("sum", axis, x.ndim)
    return make("sum", (x,), {"axes": axes, "keepdims": bool(keepdims), "scale": 1.0}, name)


def mean(x, axis=None, keepdims=False, name=None):
    axes = _norm_axes("mean", axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64)) if axes else 1
    # the mean over no elements is NaN, as in NumPy (the sum is 0, the scale 1/0 is taken as NaN)
    return make("sum", (x,), {"axes": axes, "keepdims": bool(keepdims), "scale": 1.0 / n if n else float("nan")},
                name)


def reshape(x, shape, name=None):
    """Reshape to ``shape`` (same element count); one dimension may be -1 (inferred, as in NumPy)."""
    shape = _user_shape("reshape", shape, allow_infer=True)
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        if known == 0 or x.size % known:
            raise ValueError(f"reshape: cannot reshape {x.shape} ({x.size} elements) to {shape}")
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    if shape == x.shape and name is None:
        return x
    return make("reshape", (x,), {"shape": shape}, name)


def transpose(x, perm=None, name=None):
    """Permute the axes (``perm`` None: reverse them); negative axes count from the end, as in NumPy."""
    if perm is None:
        perm = tuple(reversed(range(x.ndim)))
    else:
        if not isinstance(perm, _SEQUENCES):
            raise TypeError(f"transpose: perm must be a tuple of ints, got {perm!r}")
        perm = tuple(as_int(p, "transpose: perm entry") for p in _seq(perm))
        bad = [p for p in perm if not -x.ndim <= p < x.ndim]
        if bad:
            raise ValueError(f"transpose: axis {bad[0]} in perm {perm} is out of range for a {x.ndim}-D tensor")
        perm = tuple(p % x.ndim for p in perm)
    return make("transpose", (x,), {"perm": perm}, name)


def broadcast_to(x, shape, name=None):
    shape = _user_shape("broadcast_to", shape)
    if x.shape == shape and name is None:
        return x
    return make("broadcast_to", (x,), {"shape": shape}, name)


def _user_shape(op, shape, allow_infer=False):
    """A shape argument as a tuple of Python ints: TypeError for non-integers, ValueError for negative
    dims (reshape: a single -1 is allowed)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    if not isinstance(shape, _SEQUENCES):
        raise TypeError(f"{op}: shape must be a tuple of ints, got {shape!r}")
    shape = _seq(shape)
    shape = tuple(as_int(d, f"{op}: dimension of shape {tuple(shape)!r}") for d in shape)
    neg = [d for d in shape if d < 0]
    if allow_infer and neg == [-1]:
        return shape
    if neg:
        raise ValueError(f"{op}: shape {shape} has a negative dimension"
                         + (" (only one -1, to be inferred, is allowed)" if allow_infer else ""))
    return shape


def cast(x, dtype, name=None):
    """``x`` converted to ``dtype`` (NumPy's astype: float -> int truncates, any -> bool is x != 0, so NaN
    is True; bool -> number is 0/1)."""
    dtype = canonical_dtype(dtype)
    if dtype == x.dtype and name is None:
        return x
    return make("cast", (x,), {"dtype": dtype}, name)


def matmul(a, b, name=None):
    """Matrix product with NumPy/ONNX semantics: 1-D operands are promoted (and the added axis
    removed from the result), N-D operands are stacks of matrices with broadcast batch dims."""
    like = a if isinstance(a, Tensor) else b
    a, b = _lift(a, like, "matmul"), _lift(b, like, "matmul")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalar operands are not allowed (shapes {a.shape} and {b.shape})")
    a2 = reshape(a, (1,) + a.shape) if a.ndim == 1 else a
    b2 = reshape(b, b.shape + (1,)) if b.ndim == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are incompatible "
                         f"(inner dimensions {a.shape[-1]} != {b2.shape[-2]})")
    if a.dtype in INT_DTYPES or a.dtype == "bool":
        raise TypeError(f"matmul: integer operands are not supported ({a.dtype})")
    if a.ndim >= 2 and b.ndim >= 2:
        return make("matmul", (a2, b2), name=name)
    out = make("matmul", (a2, b2))
    shape = list(out.shape)
    if b.ndim == 1:
        shape.pop(-1)
    if a.ndim == 1:
        shape.pop(-2 if b.ndim != 1 else -1)
    return make("reshape", (out,), {"shape": tuple(shape)}, name)


def softmax_cross_entropy(logits, labels, name=None):
    """Mean over the batch of ``-log softmax(logits)[i, labels[i]]``; logits (B, C), labels int (B,).

    Warns (DoubleSoftmaxWarning) when ``logits`` is the output of a softmax over the classes."""
    out = make("softmax_xent", (logits, labels), name=name)
    s = softmax_source(logits)
    if s is not None:
        pre = s.inputs[0]
        warnings.warn(DoubleSoftmaxWarning(
            f"softmax_cross_entropy: the logits {logits.name!r} are the output of softmax {s.name!r}; the loss "
            f"applies softmax again (a double softmax trains silently towards flat predictions). Pass the "
            f"pre-softmax tensor {pre.name!r} instead"), stacklevel=2)
    return out


#: ops that pass values through unchanged (a softmax seen through them is still a softmax)
_PASS_THROUGH = ("identity", "reshape")


def softmax_source(t: Tensor) -> Optional[Tensor]:
    """The softmax node whose output ``t`` is, seen through identity/reshape nodes, when that softmax
    normalises ``t``'s last axis (its own last axis, of the same length); else None.  Used to detect a
    loss applied to probabilities instead of logits (softmax_cross_entropy, ``libml-compile finetune``)."""
    last = t.shape[-1] if t.ndim else None
    while t.op in _PASS_THROUGH:
        t = t.inputs[0]
    if t.op == "softmax" and t.attrs["axis"] == t.ndim - 1 and t.shape[-1] == last:
        return t
    return None


def mse(pred, target, name=None):
    """Mean squared error ``mean((pred - target)**2)`` over all elements (scalar)."""
    if pred.shape != getattr(target, "shape", pred.shape):
        raise ValueError(f"mse: pred shape {pred.shape} and target shape {target.shape} differ")
    d = sub(pred, target)
    return mean(mul(d, d), name=name)


# ---------------------------------------------------------------------------------------------------
# data movement: concat, slice, gather (copies, never arithmetic: an Inf moves where it is, nowhere else)

def _s_concat(inp, attrs):
    ax = attrs["axis"]
    first = inp[0]
    for x in inp[1:]:
        if x.dtype != first.dtype:
            raise TypeError(f"concat: operand dtypes differ ({first.dtype} and {x.dtype})")
        if x.ndim != first.ndim or any(a != b for k, (a, b) in enumerate(zip(x.shape, first.shape)) if k != ax):
            raise ValueError(f"concat: shapes {' and '.join(str(t.shape) for t in inp)} differ outside axis {ax}")
    shape = list(first.shape)
    shape[ax] = builtins.sum(x.shape[ax] for x in inp)
    return tuple(shape), first.dtype


def _s_slice(inp, attrs):
    (x,) = inp
    ax, lo, hi = attrs["axis"], attrs["start"], attrs["stop"]
    if not 0 <= lo <= hi <= x.shape[ax]:
        raise ValueError(f"slice: [{lo}, {hi}) is not inside axis {ax} of shape {x.shape}")
    shape = list(x.shape)
    shape[ax] = hi - lo
    return tuple(shape), x.dtype


def _s_gather(inp, attrs):
    x, idx = inp
    if idx.dtype != "int64":
        raise TypeError(f"gather: indices must be int64, got {idx.name!r} of dtype {idx.dtype}")
    ax = attrs["axis"]
    return x.shape[:ax] + idx.shape + x.shape[ax + 1:], x.dtype


def _s_gather_grad(inp, attrs):
    g, idx = inp
    return attrs["shape"], g.dtype


def _r_gather_grad(attrs, g, idx):
    ax, shape = attrs["axis"], attrs["shape"]
    outer = int(np.prod(shape[:ax], dtype=np.int64))
    n, inner = shape[ax], int(np.prod(shape[ax + 1:], dtype=np.int64))
    out = np.zeros((outer, n, inner), g.dtype)
    np.add.at(out, (slice(None), np.where(idx < 0, idx + n, idx).reshape(-1)), g.reshape(outer, idx.size, inner))
    return out.reshape(shape)


def _g_concat(n, g):
    ax, start, out = n.attrs["axis"], 0, []
    for x in n.inputs:
        out.append(make("slice", (g,), {"axis": ax, "start": start, "stop": start + x.shape[ax]}))
        start += x.shape[ax]
    return tuple(out)


def _g_slice(n, g):
    # the gradient of a part is the part placed among zeros: concat(0, g, 0) along the axis
    (x,) = n.inputs
    ax, lo, hi = n.attrs["axis"], n.attrs["start"], n.attrs["stop"]
    parts = []
    for size in (lo, None, x.shape[ax] - hi):
        if size is None:
            parts.append(g)
        elif size:
            shape = list(x.shape)
            shape[ax] = size
            parts.append(g.graph.const(np.zeros(shape, g.dtype)))
    return (parts[0] if len(parts) == 1 else make("concat", tuple(parts), {"axis": ax}),)


for _d in [
    OpDef("concat", "concat", _s_concat, lambda at, *xs: np.concatenate(xs, axis=at["axis"]), _g_concat,
          int_ok=True, doc="concatenation along attrs['axis']: one copy per operand into its part"),
    OpDef("slice", "slice", _s_slice,
          lambda at, x: np.take(x, np.arange(at["start"], at["stop"]), axis=at["axis"]), _g_slice,
          int_ok=True, doc="x[..., start:stop, ...] along attrs['axis'] (a strided copy)"),
    OpDef("gather", "gather", _s_gather, lambda at, x, i: np.take(x, i, axis=at["axis"]),
          lambda n, g: (make("gather_grad", (g, n.inputs[1]), {"axis": n.attrs["axis"], "shape": n.inputs[0].shape}),
                        None),
          int_ok=True, doc="np.take(x, indices, axis): rows picked by int64 indices (negative from the end)",
          fed_index_range=lambda n: (1, (-n.inputs[0].shape[n.attrs["axis"]], n.inputs[0].shape[n.attrs["axis"]]))),
    OpDef("gather_grad", "scatter_add", _s_gather_grad, _r_gather_grad,
          lambda n, g: (make("gather", (g, n.inputs[1]), {"axis": n.attrs["axis"]}), None),
          doc="zeros(shape) with g's rows added at the gathered indices, in index order (deterministic)"),
]:
    register(_d)


def concat(xs, axis=0, name=None):
    """Concatenate tensors of one dtype along ``axis`` (NumPy/ONNX Concat); copies, no arithmetic."""
    xs = list(xs)
    if not xs or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError("concat: expected a non-empty list of symbolic Tensors")
    (ax,) = _norm_axes("concat", axis, xs[0].ndim)
    if len(xs) == 1:
        return identity(xs[0], name=name)
    return make("concat", tuple(xs), {"axis": ax}, name)


def slice_axis(x, axis, start=None, stop=None, step=None, name=None):
    """``x[..., start:stop:step, ...]`` along ``axis`` with Python/NumPy (and ONNX Slice) semantics: negative
    bounds count from the end and are clamped to the axis.  Step 1 is a strided copy (``slice``), any other
    step a gather of the picked indices; both have gradients."""
    if not isinstance(x, Tensor):
        raise TypeError(f"slice: expected a symbolic Tensor, got {type(x).__name__}")
    (ax,) = _norm_axes("slice", axis, x.ndim)
    if step == 0:
        raise ValueError(f"slice: step 0 along axis {ax} of {x.name!r}")
    r = range(x.shape[ax])[builtins.slice(start, stop, step)]
    if r.step == 1 or len(r) == 0:
        lo = r.start if len(r) else 0
        if lo == 0 and len(r) == x.shape[ax]:
            return identity(x, name=name) if name else x
        return make("slice", (x,), {"axis": ax, "start": lo, "stop": lo + len(r)}, name)
    return gather(x, np.asarray(r, dtype=np.int64), axis=ax, name=name)


def getitem(x, key):
    """``x[key]`` for basic indexing: ints, slices (any step), ``...`` and ``None``, as NumPy."""
    key = key if isinstance(key, tuple) else (key,)
    if builtins.sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    n_real = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > x.ndim:
        raise IndexError(f"too many indices for tensor {x.name!r} of shape {x.shape}: {n_real}")
    i = key.index(Ellipsis) if Ellipsis in key else len(key)
    key = key[:i] + (builtins.slice(None),) * (x.ndim - n_real) + key[i + 1:]  # ... (or the end): whole axes
    y, ax, out_shape = x, 0, []
    for k in key:
        if k is None:
            out_shape.append(1)
            continue
        if isinstance(k, builtins.slice):
            y = slice_axis(y, ax, k.start, k.stop, k.step)
            out_shape.append(y.shape[ax])
        elif isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
            n = y.shape[ax]
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {ax} of {x.name!r} with size {n}")
            y = slice_axis(y, ax, int(k) % n, int(k) % n + 1)
        else:
            raise TypeError(f"tensor indices must be ints, slices, ... or None, got {type(k).__name__}")
        ax += 1
    shape = tuple(out_shape)
    return y if y.shape == shape else reshape(y, shape)


def tile(x, reps, name=None):
    """``np.tile(x, reps)`` with ``len(reps) == x.ndim`` (ONNX Tile): a gather of repeated indices per
    axis (its gradient, the scatter-add, sums the copies)."""
    reps = _seq(reps)
    if len(reps) != x.ndim or any(as_int(r, "tile: reps") < 0 for r in reps):
        raise ValueError(f"tile: reps {reps} must give one non-negative count per axis of {x.name!r} {x.shape}")
    y = x
    for ax, r in enumerate(reps):
        if r != 1:
            y = gather(y, np.tile(np.arange(x.shape[ax], dtype=np.int64), r), axis=ax)
    return identity(y, name=name) if name or y is x else y


def pad(x, pads, mode="constant", value=0.0, name=None):
    """``np.pad`` (ONNX Pad): ``pads`` = [(before, after)] per axis, non-negative; mode "constant" (with
    ``value``), "reflect", "edge" or "wrap".  Constant padding concatenates constant blocks, the others gather
    reflected / repeated indices; gradients flow through both."""
    pads = [tuple(as_int(v, "pad: pads") for v in p) for p in pads]
    if len(pads) != x.ndim or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(f"pad: pads {pads} must be one non-negative (before, after) per axis of {x.name!r} {x.shape}")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ValueError(f"pad: mode must be 'constant', 'reflect', 'edge' or 'wrap', got {mode!r}")
    y = x
    for ax, (lo, hi) in enumerate(pads):
        if not lo and not hi:
            continue
        n = y.shape[ax]
        if mode == "constant":
            parts = []
            for k in (lo, None, hi):
                if k is None:
                    parts.append(y)
                elif k:
                    shape = list(y.shape)
                    shape[ax] = k
                    parts.append(y.graph.const(np.full(shape, value, dtype=y.dtype)))
            y = concat(parts, axis=ax)
            continue
        if n == 0 or (mode == "reflect" and n < 2 and (lo or hi)):
            raise ValueError(f"pad: {mode} padding of axis {ax} of size {n} in {x.name!r} {x.shape}")
        idx = np.arange(-lo, n + hi)
        if mode == "edge":
            idx = np.clip(idx, 0, n - 1)
        elif mode == "wrap":
            idx = idx % n
        else:  # reflect without repeating the edge, as NumPy (period 2n - 2)
            period = 2 * n - 2
            idx = np.abs((idx + period * (abs(lo) // period + 1)) % period)
            idx = np.where(idx >= n, period - idx, idx)
        y = gather(y, idx.astype(np.int64), axis=ax)
    return identity(y, name=name) if name or y is x else y


def gather(x, indices, axis=0, name=None):
    """``np.take(x, indices, axis)`` with ONNX Gather semantics: negative indices count from the end.

    ``indices``: an int array (checked against ``x.shape[axis]`` now) or an integer Tensor (checked by the
    runtime as it reads them: an index out of range stops the call with an IndexError naming the node)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"gather: expected a symbolic Tensor, got {type(x).__name__}")
    (ax,) = _norm_axes("gather", axis, x.ndim)
    n = x.shape[ax]
    if isinstance(indices, Tensor):
        if indices.dtype not in INT_DTYPES:
            raise TypeError(f"gather: indices must be integers, got {indices.name!r} of dtype {indices.dtype}")
        idx = cast(indices, "int64")
    else:
        arr = np.asarray(indices)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"gather: indices must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise ValueError(f"gather: indices {arr.reshape(-1)[:8].tolist()} out of range for axis {ax} "
                             f"of size {n} (shape {x.shape})")
        idx = x.graph.const(np.where(arr < 0, arr + n, arr))
    return make("gather", (x, idx), {"axis": ax}, name)


# the elementwise family declares itself into REGISTRY (one declaration per op, see ops_ew.py)
from . import ops_ew  # noqa: E402,F401
# ... and so does the reduction family (ops_reduce.py)
from . import ops_reduce  # noqa: E402,F401
from . import ops_logic  # noqa: E402,F401  (comparisons, logic, where, mod: ops_logic.py)
