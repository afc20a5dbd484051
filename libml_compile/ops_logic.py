"""The comparison / logic family (ONNX Equal, Less, LessOrEqual, Greater, GreaterOrEqual, And, Or, Xor, Not,
IsNaN, IsInf, Where, Mod) and the ``bool`` dtype they produce, one declaration per operator.

Storage: a ``bool`` tensor is one byte per element holding 0 or 1 (NumPy's layout), in the arena, fed
inputs, consts and outputs alike.

Kernels (``lower_logic`` below chooses, per node, after autodiff and simplification):

* a comparison / IsNaN / IsInf of float tensors, and And/Or/Xor/Not of such results, run in the fused
  float VM as 0/1 masks in the float type (VM ``LT``, ``EQ``, ``AND``, ...), so they fuse with the float
  ops that produce their operands; ``where(c, x, y)`` on floats is the VM's ternary ``WHERE`` (``c != 0 ?
  x : y``), fused with the ops that consume its result.  A mask becomes a one-byte bool only where a
  value leaves its group (a ``cast`` instruction), and a bool entering a group is cast to 0/1 floats;
  a mask read straight back as a mask (``where(a < b, x, y)``) never makes the round trip;
* comparisons of integer (and bool) tensors, And/Or/Xor/Not of bools that are not masks, and integer Mod
  use the integer kernel (``int_elementwise``, one byte out for comparisons);
* Where on integer or bool values is the ``select`` instruction (any item size), and so is a float Where
  whose condition is bytes already (an input, an integer comparison) when neither branch nor any reader
  is a fused float op: then there is nothing to fuse and select reads the bytes in one pass.

Invariants: a mask op's inputs are 0/1 where it reads masks (``AND`` is ``x * y``, see format.VM);
every node this module declares is in ``ops.REGISTRY``; a ``where``'s condition is a bool tensor.
``==`` on Tensor keeps identity semantics (tensors are dict keys everywhere in the compiler): use
``lc.equal``; ``<``, ``<=``, ``>``, ``>=`` are ``lc.less`` ...
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, INT_DTYPES, Tensor, broadcast_shapes
from .ops import OpDef, REGISTRY, _lift, make, register

#: user functions declared here, by name (``libml_compile`` exports them)
PUBLIC: dict = {}

#: integer-kernel ops: registry op -> VM code name (format.VM) the int_elementwise instruction runs
INT_KERNEL = {"equal": "EQ", "less": "LT", "less_equal": "LE", "greater": "GT", "greater_equal": "GE",
              "logical_and": "AND", "logical_or": "OR", "logical_xor": "XOR", "mod": "MOD", "fmod": "FMOD"}

#: the float VM's mask op of each bool-producing op (internal ops, float dtype, values 0/1)
MASK_OP = {"equal": "eq_mask", "less": "lt_mask", "less_equal": "le_mask", "greater": "gt_mask",
           "greater_equal": "ge_mask", "logical_and": "and_mask", "logical_or": "or_mask",
           "logical_xor": "xor_mask", "logical_not": "not_mask", "isnan": "isnan_mask", "isinf": "isinf_mask",
           "isposinf": "isposinf_mask", "isneginf": "isneginf_mask"}

_NUMERIC = FLOAT_DTYPES + INT_DTYPES


def _operands(name, a, b):
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError(f"{name}: at least one operand must be a symbolic Tensor")
    return _lift(a, like, name), _lift(b, like, name)


def _check_same(name, a, b, allowed, what):
    if a.dtype != b.dtype:
        raise TypeError(f"{name}: operand dtypes differ ({a.name!r} is {a.dtype}, {b.name!r} is {b.dtype}); "
                        f"cast one explicitly")
    if a.dtype not in allowed:
        raise TypeError(f"{name}: needs {what} operands, got {a.name!r} of dtype {a.dtype}")


def _compare(name, ref, vm, doc):
    """a <op> b elementwise, NumPy broadcasting, float / integer / bool operands of one dtype -> bool."""
    def rule(inp, attrs):
        a, b = inp
        _check_same(name, a, b, _NUMERIC + ("bool",), "numeric or bool")
        return broadcast_shapes(name, a.shape, b.shape), "bool"
    register(OpDef(name, "ew", rule, lambda at, a, b: ref(a, b), None, vm=vm, int_ok=True, doc=doc))

    def f(a, b, name=None):
        a, b = _operands(f.__name__, a, b)
        return make(f.__name__, (a, b), name=name)
    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"{doc} (NaN compares false, as in NumPy)."
    PUBLIC[name] = f


def _logical(name, ref, vm, doc):
    def rule(inp, attrs):
        for t in inp:
            if t.dtype != "bool":
                raise TypeError(f"{name}: needs bool operands, got {t.name!r} of dtype {t.dtype}")
        return broadcast_shapes(name, *(t.shape for t in inp)), "bool"
    register(OpDef(name, "ew", rule, lambda at, *xs: ref(*xs), None, vm=vm, int_ok=True, doc=doc))


def _mask(name, vm, arity, doc):
    """An internal float-VM op of ``arity`` float operands computing 0/1 (never user-declared)."""
    def rule(inp, attrs):
        return broadcast_shapes(name, *(t.shape for t in inp)), inp[0].dtype
    register(OpDef(name, "ew", rule, None, None, vm=vm, doc=doc))


for _n, _ref, _vm in (("equal", np.equal, "EQ"), ("less", np.less, "LT"), ("less_equal", np.less_equal, "LE"),
                      ("greater", np.greater, "GT"), ("greater_equal", np.greater_equal, "GE")):
    _compare(_n, _ref, _vm, f"elementwise {_n.replace('_', ' ')}: bool result")
    if MASK_OP[_n] not in REGISTRY:  # eq_mask is ops_reduce's (the extremum mask of max/min gradients)
        _mask(MASK_OP[_n], _vm, 2, f"{_n} as a 0/1 mask in the float VM")

for _n, _ref, _vm in (("logical_and", np.logical_and, "AND"), ("logical_or", np.logical_or, "OR"),
                      ("logical_xor", np.logical_xor, "XOR")):
    _logical(_n, _ref, _vm, f"elementwise {_n[8:]} of two bool tensors (broadcasting)")
    _mask(MASK_OP[_n], _vm, 2, f"{_n} of 0/1 masks in the float VM")
_logical("logical_not", np.logical_not, "NOT", "elementwise not of a bool tensor")
_mask("not_mask", "NOT", 1, "1 - x of a 0/1 mask")


def _float_test(name, ref, vm, doc):
    def rule(inp, attrs):
        (x,) = inp
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
        return x.shape, "bool"
    register(OpDef(name, "ew", rule, lambda at, x: ref(x), None, vm=vm, doc=doc))
    _mask(MASK_OP[name], vm, 1, f"{name} as a 0/1 mask")


_float_test("isnan", np.isnan, "ISNAN", "x is NaN")
_float_test("isinf", np.isinf, "ISINF", "x is +Inf or -Inf")
_float_test("isposinf", np.isposinf, "ISPOSINF", "x is +Inf")
_float_test("isneginf", np.isneginf, "ISNEGINF", "x is -Inf")


def logical_and(a, b, name=None):
    """Elementwise ``a and b`` of bool tensors (broadcasting)."""
    return make("logical_and", _operands("logical_and", a, b), name=name)


def logical_or(a, b, name=None):
    """Elementwise ``a or b`` of bool tensors (broadcasting)."""
    return make("logical_or", _operands("logical_or", a, b), name=name)


def logical_xor(a, b, name=None):
    """Elementwise ``a != b`` of bool tensors (broadcasting)."""
    return make("logical_xor", _operands("logical_xor", a, b), name=name)


def logical_not(x, name=None):
    """Elementwise ``not x`` of a bool tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"logical_not: expected a symbolic Tensor, got {type(x).__name__}")
    return make("logical_not", (x,), name=name)


def isnan(x, name=None):
    """Where ``x`` (float) is NaN: bool tensor of x's shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"isnan: expected a symbolic Tensor, got {type(x).__name__}")
    return make("isnan", (x,), name=name)


def isinf(x, detect_positive=True, detect_negative=True, name=None):
    """Where ``x`` (float) is infinite (ONNX IsInf: ``detect_positive`` / ``detect_negative`` select the
    signs; both off gives all False)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"isinf: expected a symbolic Tensor, got {type(x).__name__}")
    op = {(True, True): "isinf", (True, False): "isposinf", (False, True): "isneginf"}.get(
        (bool(detect_positive), bool(detect_negative)))
    if op is None:  # detects nothing: all False (after the dtype check, which names x)
        REGISTRY["isinf"].shape((x,), {})
        return x.graph.const(np.zeros(x.shape, bool), name=name)
    return make(op, (x,), name=name)


for _k in ("logical_and", "logical_or", "logical_xor", "logical_not", "isnan", "isinf"):
    PUBLIC[_k] = globals()[_k]


# ---- Where -----------------------------------------------------------------------------------------

def _s_where(inp, attrs):
    c, x, y = inp
    if c.dtype != "bool":
        raise TypeError(f"where: the condition {c.name!r} must be bool, got {c.dtype}")
    if x.dtype != y.dtype:
        raise TypeError(f"where: the branches differ in dtype ({x.name!r} is {x.dtype}, {y.name!r} is {y.dtype})")
    return broadcast_shapes("where", c.shape, x.shape, y.shape), x.dtype


def _g_where(n, g):
    # d/dx = g where c else 0; d/dy = g where not c else 0 (in the output's shape: autodiff reduces
    # broadcast branches).  Written with `where` itself, so the backward runs in the same fused VM step.
    c, x, _ = n.inputs
    zero = n.graph.const(np.zeros((), x.dtype))
    return None, make("where", (c, g, zero)), make("where", (c, zero, g))


register(OpDef("where", "ew", _s_where, lambda at, c, x, y: np.where(c, x, y), _g_where, vm="WHERE", int_ok=True,
               doc="c ? x : y elementwise (NumPy broadcasting of all three); gradient to both branches"))
register(OpDef("where_mask", "ew", lambda inp, at: (broadcast_shapes("where", *(t.shape for t in inp)),
                                                    inp[1].dtype),
               None, None, vm="WHERE", doc="where in the float VM: the condition is a 0/1 mask of the branches' type"))
register(OpDef("where_select", "select", _s_where, lambda at, c, x, y: np.where(c, x, y), None,
               doc="a float where run by the select instruction (bool condition bytes; not fused)"))


def where(cond, x, y, name=None):
    """``x`` where ``cond`` (bool) else ``y``, elementwise with NumPy broadcasting of all three (ONNX
    Where).  Scalars take the tensor branch's dtype.  Differentiable in ``x`` and ``y``."""
    if not isinstance(cond, Tensor):
        raise TypeError(f"where: the condition must be a symbolic bool Tensor, got {type(cond).__name__}")
    like = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else None
    if like is None:
        dt = np.result_type(np.asarray(x), np.asarray(y))
        dt = np.float32 if dt == np.float64 and not isinstance(x, np.ndarray) else dt
        x, y = cond.graph.const(np.asarray(x, dt)), cond.graph.const(np.asarray(y, dt))
    else:
        x, y = _lift(x, like, "where"), _lift(y, like, "where")
    return make("where", (cond, x, y), name=name)


PUBLIC["where"] = where


# ---- Mod -------------------------------------------------------------------------------------------

def _mod_ref(fmod):
    def ref(at, a, b):
        if a.dtype.kind in "iu":
            if np.any(b == 0):
                raise ZeroDivisionError("mod: integer division by zero in a constant expression")
            with np.errstate(all="ignore"):
                return (np.fmod(a, b) if fmod else np.mod(a, b)).astype(a.dtype)
        with np.errstate(all="ignore"):
            return (np.fmod(a, b) if fmod else np.mod(a, b)).astype(a.dtype)
    return ref


def _s_mod(name):
    def rule(inp, attrs):
        a, b = inp
        _check_same(name, a, b, _NUMERIC, "numeric")
        return broadcast_shapes(name, a.shape, b.shape), a.dtype
    return rule


register(OpDef("mod", "ew", _s_mod("mod"), _mod_ref(False), None, vm="MOD", int_ok=True,
               doc="a mod b with the sign of b (Python %, np.mod; ONNX Mod fmod=0); forward only"))
register(OpDef("fmod", "ew", _s_mod("mod"), _mod_ref(True), None, vm="FMOD", int_ok=True,
               doc="C fmod: the sign of a (np.fmod; ONNX Mod fmod=1); forward only"))


def mod(a, b, fmod=0, name=None):
    """Elementwise remainder with NumPy broadcasting (ONNX Mod).  ``fmod=0``: the sign of the divisor
    (Python's ``%``, ``np.mod``); ``fmod=1``: the sign of the dividend (C's ``fmod``, ``np.fmod``).  Integer
    division by zero stops the call with ZeroDivisionError naming the node; floats give NaN.  No gradient."""
    if fmod not in (0, 1, False, True):
        raise ValueError(f"mod: fmod must be 0 or 1, got {fmod!r}")
    a, b = _operands("mod", a, b)
    return make("fmod" if fmod else "mod", (a, b), name=name)


PUBLIC["mod"] = mod
EXPORTS = sorted(PUBLIC)


# ---------------------------------------------------------------------------------------------------
# lowering: bool values into the float VM's masks where they meet floats (see the module docstring)

def _is_mask_cast(t):
    """``t`` is cast(mask, bool) for a float-VM mask op (its value is a 0/1 float the VM already has)."""
    return t.op == "cast" and t.dtype == "bool" and t.inputs[0].op in _MASK_OPS


_MASK_OPS = set(MASK_OP.values())


def _fusible(t):
    """Whether ``t`` computes a float value in the fused VM (a fusion partner for a float where)."""
    d = REGISTRY.get(t.op)
    return (d is not None and d.kind in ("ew", "reduce") and t.op not in ("input", "param", "const", "buffer")
            and (t.dtype in FLOAT_DTYPES or t.op in MASK_OP or t.op == "where"))


def lower_logic(nodes):
    """In topological order, the bool-producing ops on floats become float-VM mask ops followed by a cast
    to bool, and float ``where`` becomes ``where_mask`` reading a 0/1 condition; a bool read as a mask by a
    mask op is taken from its mask directly (no cast round trip).  Integer and pure-bool ops stay (integer
    kernel / select).  Builds new nodes, never edits one (path copying): returns {node: its new version}
    for every node of ``nodes`` that was rewritten or reads one that was; the rest is shared.  Callers map
    their roots and outputs through it (``program.compile`` runs this once, on the joint graph)."""
    from .ops import cast
    from .passes import node_like
    new = {}  # node -> its new version
    cache = {}
    readers = {}
    for t in nodes:
        for i in t.inputs:
            readers.setdefault(i, []).append(t)

    def as_mask(t, ftype):
        """A float ``ftype`` 0/1 tensor equal to bool ``t`` (a node of the rewritten graph)."""
        if _is_mask_cast(t):
            m = t.inputs[0]
            if m.dtype == ftype:
                return m
        if t.op == "const":
            return t.graph.const(t.value.astype(ftype))
        key = (t, ftype)
        if key not in cache:
            cache[key] = cast(t, ftype)
        return cache[key]

    def to_mask_cast(t, op, inputs):
        """t (bool) becomes cast(<mask op>(inputs), bool)."""
        new[t] = node_like(t, "cast", (make(op, inputs),), {"dtype": "bool"})

    for t in list(nodes):
        op = t.op
        # (inputs: earlier in the order, already rewritten)
        ins = tuple([new.get(i, i) for i in t.inputs]) if new else t.inputs
        if op in ("equal", "less", "less_equal", "greater", "greater_equal") and ins[0].dtype in FLOAT_DTYPES:
            to_mask_cast(t, MASK_OP[op], ins)
        elif op in ("isnan", "isinf", "isposinf", "isneginf"):
            to_mask_cast(t, MASK_OP[op], ins)
        elif op in ("logical_and", "logical_or", "logical_xor", "logical_not") and any(map(_is_mask_cast, ins)):
            ft = next(i for i in ins if _is_mask_cast(i)).inputs[0].dtype
            to_mask_cast(t, MASK_OP[op], tuple(as_mask(i, ft) for i in ins))
        elif op == "logical_not":  # the integer kernel is binary: not x = x xor True
            new[t] = node_like(t, "logical_xor", (ins[0], t.graph.const(np.ones((), bool))), t.attrs)
        elif op == "where" and t.dtype in FLOAT_DTYPES:
            c, x, y = ins
            if not _is_mask_cast(c) and not any(_fusible(u) for u in (x, y) + tuple(readers.get(t, ()))):
                # nothing to fuse with and the condition is bytes already: the select instruction reads
                # them directly, one pass instead of a cast and a VM pass (4M float32: ~5 vs ~12 ms)
                new[t] = node_like(t, "where_select", ins, t.attrs)
            else:
                new[t] = node_like(t, "where_mask", (as_mask(c, t.dtype), x, y), t.attrs)
        elif op == "cast" and t.dtype in FLOAT_DTYPES and _is_mask_cast(ins[0]) \
                and ins[0].inputs[0].dtype == t.dtype:
            new[t] = node_like(t, "identity", (ins[0].inputs[0],), {})  # cast(cast(mask, bool), f)
        elif ins != t.inputs:
            new[t] = node_like(t, op, ins, t.attrs)
    return new
