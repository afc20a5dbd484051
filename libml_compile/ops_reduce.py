"""The reduction family (ONNX Reduce*, ArgMax/ArgMin, LogSoftmax), one place per operator.

Two kinds of declaration:

* reductions that decompose well into existing fused ops are declared as such -- their forward and
  backward graphs are fused elementwise chains ending in ``sum`` (``passes.fuse``), with gradients from
  the parts: ``sum_square = sum(x*x)``, ``l1_norm = sum(|x|)``, ``l2_norm = sqrt(sum(x*x))``,
  ``log_sum = log(sum(x))`` (``mean`` and ``sum`` are ``ops.sum``);
* max, min, prod, logsumexp, argmax/argmin and log_softmax have runtime kernels (``format.py``: the
  ``reduce``, ``arg_reduce`` and ``log_softmax`` instructions).  Their graph ops reduce one contiguous
  run of axes; the user functions move any other set of axes there with a transpose first.

Gradients (graph ops, so the backward graph fuses):

* max/min: ``g / count * (x == y)`` with ``count`` the number of elements attaining the extremum --
  PyTorch's amax/amin backward (ties share the gradient evenly, in the same order of operations);
* prod: PyTorch's rule -- ``y / x`` without zeros; with one zero, the product of the others at the zero
  and 0 elsewhere; with two or more zeros, 0 (``PROD_GRAD`` from the product of the non-zeros and the
  count of zeros, no division by zero);
* logsumexp: ``g * exp(x - y)``; log_softmax: ``g - exp(y) * sum(g)`` along its axis.

Every result is bit-identical for any thread count: the kernels compute each output element in one
task in a fixed order, and the fused reductions use the runtime's fixed chunking.  NaN propagates as in
NumPy (max/min/argmax: a NaN wins; argmax returns the first NaN's index).
"""
from __future__ import annotations

import numpy as np

from .ir import FLOAT_DTYPES, Tensor, broadcast_shapes
from .ops import (OpDef, _norm_axes, div, exp, log, make, mul, register, reshape, sub,
                  transpose)
from .ops import _lift
from .ops import sum as _sum

#: user functions declared here, by name (``libml_compile`` exports them)
PUBLIC: dict = {}


def _public(f):
    PUBLIC[f.__name__] = f
    return f


# ---------------------------------------------------------------------------------------------------
# shape rules

def _check_run(op, axes, ndim):
    """The graph ops reduce one contiguous run of axes (the kernels see x as (outer, K, inner))."""
    if axes and list(axes) != list(range(axes[0], axes[0] + len(axes))):
        raise ValueError(f"{op}: internal node needs a contiguous run of axes, got {axes}")
    if any(not 0 <= a < ndim for a in axes):
        raise ValueError(f"{op}: axes {axes} out of range for a {ndim}-D tensor")


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _s_reduce_k(op):
    def rule(inp, attrs):
        (x,) = inp
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
        _check_run(op, attrs["axes"], x.ndim)
        return _reduced_shape(x.shape, attrs["axes"], attrs["keepdims"]), x.dtype
    return rule


def _s_arg(op):
    def rule(inp, attrs):
        (x,) = inp
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
        ax = attrs["axis"]
        if x.ndim == 0 or not 0 <= ax < x.ndim:
            raise ValueError(f"{op}: axis {ax} is out of range for shape {x.shape}")
        if x.shape[ax] == 0:
            raise ValueError(f"{op}: axis {ax} of {x.name!r} (shape {x.shape}) is empty: an arg-extremum "
                             f"over no elements has no answer")
        return _reduced_shape(x.shape, (ax,), attrs["keepdims"]), "int64"
    return rule


def _s_log_softmax(inp, attrs):
    (x,) = inp
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"log_softmax: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("log_softmax: needs at least a 1-D tensor, got shape ()")
    return x.shape, x.dtype


def _s_ew(name):
    return lambda inp, at: (broadcast_shapes(name, *(t.shape for t in inp)), inp[0].dtype)


# ---------------------------------------------------------------------------------------------------
# NumPy references (constant folding and test oracles), written from the ONNX definitions: a reduction
# over no elements is its identity (max -inf, min +inf, prod 1, logsumexp -inf)

def _np_lse(x, axes, keepdims):
    with np.errstate(all="ignore"):
        m = np.max(x, axis=axes, keepdims=True, initial=-np.inf)
        sh = np.where(np.isfinite(m), m, 0).astype(x.dtype)
        s = np.log(np.sum(np.exp(x - sh), axis=axes, keepdims=True)) + sh
    return s if keepdims else s.reshape(_reduced_shape(x.shape, axes, False))


def _r(fn):
    def ref(at, x):
        with np.errstate(all="ignore"):
            return np.asarray(fn(x, at["axes"], at["keepdims"]), dtype=x.dtype)
    return ref


_REFS = {
    "reduce_max": lambda x, ax, kd: np.max(x, axis=ax, keepdims=kd, initial=-np.inf),
    "reduce_min": lambda x, ax, kd: np.min(x, axis=ax, keepdims=kd, initial=np.inf),
    "reduce_prod": lambda x, ax, kd: np.prod(x, axis=ax, keepdims=kd),
    "logsumexp": _np_lse,
}


def _r_arg(fn):
    def ref(at, x):
        ax = at["axis"]
        if at["select_last"]:
            i = x.shape[ax] - 1 - fn(np.flip(x, ax), axis=ax)
        else:
            i = fn(x, axis=ax)
        i = np.asarray(i, np.int64)
        return np.expand_dims(i, ax) if at["keepdims"] else i
    return ref


def _r_log_softmax(at, x):
    # ONNX's reference: the shift is the max itself (a +inf or all -inf slice gives NaN, as in PyTorch)
    with np.errstate(all="ignore"):
        t = x - np.max(x, axis=at["axis"], keepdims=True)
        return np.asarray(t - np.log(np.sum(np.exp(t), axis=at["axis"], keepdims=True)), x.dtype)


# ---------------------------------------------------------------------------------------------------
# gradient rules

def _kept(n):
    """(x, y, g reshaped) with the reduced axes kept as size 1, so they broadcast against x."""
    (x,) = n.inputs
    kshape = _reduced_shape(x.shape, n.attrs["axes"], True)
    return x, kshape


def _g_extremum(n, g):
    # PyTorch's amax/amin backward: (g / count) * (x == y), count = #elements equal to the extremum
    x, kshape = _kept(n)
    y, gk = reshape(n, kshape), reshape(g, kshape)
    mask = make("eq_mask", (x, y))
    count = _sum(mask, axis=n.attrs["axes"], keepdims=True)
    return (mul(div(gk, count), mask),)


def _g_prod(n, g):
    x, kshape = _kept(n)
    axes = n.attrs["axes"]
    zero = x.graph.const(np.zeros((), x.dtype))
    nzeros = _sum(make("eq_mask", (x, zero)), axis=axes, keepdims=True)
    p_nonzero = make("reduce_prod", (make("nonzero_or_one", (x,)),), {"axes": axes, "keepdims": True})
    return (mul(reshape(g, kshape), make("prod_grad", (p_nonzero, x, nzeros))),)


def _g_lse(n, g):
    x, kshape = _kept(n)
    return (mul(reshape(g, kshape), exp(sub(x, reshape(n, kshape)))),)


def _g_log_softmax(n, g):
    return (sub(g, mul(exp(n), _sum(g, axis=n.attrs["axis"], keepdims=True))),)


# ---------------------------------------------------------------------------------------------------
# registry entries

_DOCS = {
    "reduce_max": "max over a contiguous run of axes (NaN wins; -inf over nothing); ties share the gradient",
    "reduce_min": "min over a contiguous run of axes (NaN wins; +inf over nothing); ties share the gradient",
    "reduce_prod": "product over a contiguous run of axes (1 over nothing); PyTorch's gradient with zeros",
    "logsumexp": "log(sum(exp(x))) over a contiguous run of axes, shifted by the max (0 if it is infinite)",
}
_GRADS = {"reduce_max": _g_extremum, "reduce_min": _g_extremum, "reduce_prod": _g_prod, "logsumexp": _g_lse}
for _name in ("reduce_max", "reduce_min", "reduce_prod", "logsumexp"):
    register(OpDef(_name, "reduce_k", _s_reduce_k(_name), _r(_REFS[_name]), _GRADS[_name], doc=_DOCS[_name]))
for _name, _fn in (("argmax", np.argmax), ("argmin", np.argmin)):
    register(OpDef(_name, "arg_reduce", _s_arg(_name), _r_arg(_fn), lambda n, g: (None,),
                   doc=f"int64 index of the {_name[3:]} along attrs['axis'] (NumPy: the first NaN wins; "
                       f"select_last: the last occurrence); piecewise constant, no gradient"))
register(OpDef("log_softmax", "log_softmax", _s_log_softmax, _r_log_softmax, _g_log_softmax,
               doc="x - max - log(sum(exp(x - max))) along attrs['axis'], one kernel; gradient g - exp(y) sum(g)"))
register(OpDef("eq_mask", "ew", _s_ew("eq_mask"), lambda at, a, b: (a == b).astype(a.dtype),
               lambda n, g: (None, None),  # piecewise constant
               vm="EQ_MASK", doc="1 where x == y else 0 (where x attains a reduced extremum)"))
register(OpDef("nonzero_or_one", "ew", _s_ew("nonzero_or_one"),
               lambda at, x: np.where(x == 0, np.ones_like(x), x),
               # derivative 1 where x != 0, 0 where x == 0 (where it is the constant 1)
               lambda n, g: (mul(g, sub(1.0, make("eq_mask", (n.inputs[0], _lift(0.0, n.inputs[0], "nonzero_or_one"))))),),
               vm="NONZERO_OR_ONE",
               doc="x with zeros replaced by 1 (the factors of the product of the non-zeros)"))
register(OpDef("prod_grad", "ew", _s_ew("prod_grad"), None, None, vm="PROD_GRAD",
               doc="d prod / dx from (product of the non-zeros, x, count of zeros), as PyTorch"))


# ---------------------------------------------------------------------------------------------------
# user functions

def _tensor(op, x):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a symbolic Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
    return x


def _reduce_k(op, public, x, axis, keepdims, name):
    """A kernel reduction over ``axis`` (None: all; () : none, the identity as in NumPy).  Axes that are
    not one contiguous run are moved to the end first (a transpose node, differentiable)."""
    x = _tensor(public, x)
    axes = _norm_axes(public, axis, x.ndim)
    if x.ndim == 0:
        axes = ()
    if not axes:
        return make("identity", (x,), name=name)
    final = _reduced_shape(x.shape, axes, keepdims)
    if list(axes) != list(range(axes[0], axes[0] + len(axes))):
        kept = [i for i in range(x.ndim) if i not in axes]
        x = transpose(x, kept + list(axes))
        axes = tuple(range(len(kept), x.ndim))
        y = make(op, (x,), {"axes": axes, "keepdims": False})
        return reshape(y, final, name=name) if (y.shape != final or name is not None) else y
    return make(op, (x,), {"axes": axes, "keepdims": bool(keepdims)}, name)


@_public
def max(x, axis=None, keepdims=False, name=None):  # noqa: A001 - NumPy's name
    """Maximum over ``axis`` (None: all axes).  NaN propagates (np.max); over no elements -inf (ONNX).
    Gradient: shared evenly among the elements attaining the max (PyTorch's amax)."""
    return _reduce_k("reduce_max", "max", x, axis, keepdims, name)


@_public
def min(x, axis=None, keepdims=False, name=None):  # noqa: A001 - NumPy's name
    """Minimum over ``axis`` (None: all axes); see :func:`max`."""
    return _reduce_k("reduce_min", "min", x, axis, keepdims, name)


@_public
def prod(x, axis=None, keepdims=False, name=None):
    """Product over ``axis`` (None: all axes); 1 over no elements.  The gradient handles zeros exactly
    (PyTorch's rule)."""
    return _reduce_k("reduce_prod", "prod", x, axis, keepdims, name)


@_public
def logsumexp(x, axis=None, keepdims=False, name=None):
    """``log(sum(exp(x)))`` over ``axis``, computed as ``m + log(sum(exp(x - m)))`` with m the max (0 where
    it is infinite): no overflow; -inf over no elements."""
    return _reduce_k("logsumexp", "logsumexp", x, axis, keepdims, name)


def _arg(op, x, axis, keepdims, select_last, name):
    x = _tensor(op, x)
    if axis is None:  # NumPy: the index into the flattened array
        x, axis = reshape(x, (x.size,)), 0
        if keepdims:
            raise ValueError(f"{op}: keepdims needs an axis (axis=None indexes the flattened tensor)")
    (ax,) = _norm_axes(op, axis, x.ndim)
    return make(op, (x,), {"axis": ax, "keepdims": bool(keepdims), "select_last": bool(select_last)}, name)


@_public
def argmax(x, axis=None, keepdims=False, select_last=False, name=None):
    """int64 index of the maximum along ``axis`` (None: of the flattened tensor, as NumPy).  Ties: the
    first (``select_last``: the last) occurrence; a NaN counts as the maximum (NumPy).  No gradient."""
    return _arg("argmax", x, axis, keepdims, select_last, name)


@_public
def argmin(x, axis=None, keepdims=False, select_last=False, name=None):
    """int64 index of the minimum along ``axis``; see :func:`argmax`."""
    return _arg("argmin", x, axis, keepdims, select_last, name)


@_public
def log_softmax(x, axis=-1, name=None):
    """``x - m - log(sum(exp(x - m)))`` along ``axis`` with m the max, in one kernel (ONNX LogSoftmax, opset
    >= 13 semantics; a slice holding +inf, or only -inf, gives NaN as in ONNX's reference and PyTorch)."""
    x = _tensor("log_softmax", x)
    (ax,) = _norm_axes("log_softmax", axis, x.ndim)
    return make("log_softmax", (x,), {"axis": ax}, name)


def _square(x):
    from .ops_ew import PUBLIC as EW
    return EW["square"](x)


@_public
def sum_square(x, axis=None, keepdims=False, name=None):
    """``sum(x * x)`` over ``axis`` (ONNX ReduceSumSquare): one fused elementwise reduction."""
    return _sum(_square(_tensor("sum_square", x)), axis=axis, keepdims=keepdims, name=name)


@_public
def l1_norm(x, axis=None, keepdims=False, name=None):
    """``sum(|x|)`` over ``axis`` (ONNX ReduceL1): one fused elementwise reduction."""
    from .ops_ew import PUBLIC as EW
    return _sum(EW["abs"](_tensor("l1_norm", x)), axis=axis, keepdims=keepdims, name=name)


@_public
def l2_norm(x, axis=None, keepdims=False, name=None):
    """``sqrt(sum(x * x))`` over ``axis`` (ONNX ReduceL2).  Its gradient x / y is NaN where the norm is 0
    (as PyTorch's sqrt(sum(x**2)); torch.linalg.norm defines 0 there)."""
    from .ops_ew import PUBLIC as EW
    return EW["sqrt"](_sum(_square(_tensor("l2_norm", x)), axis=axis, keepdims=keepdims), name=name)


@_public
def log_sum(x, axis=None, keepdims=False, name=None):
    """``log(sum(x))`` over ``axis`` (ONNX ReduceLogSum)."""
    return log(_sum(_tensor("log_sum", x), axis=axis, keepdims=keepdims), name=name)


EXPORTS = sorted(PUBLIC)

#: the lowering's ``kind`` field (format.REDUCE_KINDS) of each kernel reduction
KINDS = {"reduce_max": "max", "reduce_min": "min", "reduce_prod": "prod", "logsumexp": "logsumexp"}
