"""The elementwise operator family (ONNX's unary activations and math, binary Pow/Max/Min, Clip), one
declaration per operator.

Each ``unary(...)``/``binary(...)`` call registers, in one place: the op (``ops.REGISTRY``), its shape rule
(NumPy broadcasting; float dtypes), its NumPy reference (constant folding and test oracle), its register-VM
opcode (``format.VM``: the C expression the runtime's fused kernels run), its gradient rule, its ONNX
mapping (``onnx``: op type and attribute defaults, read by ``onnx_import`` and listed by ``info``), the
input domain its generated tests sample, and the user function (``lc.tanh`` ...).

Gradients follow the rule kinds of JAX's ``defjvp``: ``grad_vm`` names a VM opcode that computes
``g * f'(.)`` in one step from the upstream gradient ``g``, the op's input (``grad_from="input"``) or
output (``"output"``), and the op's parameters -- registered as the op ``<name>_grad``, fused into the
backward VM chain like any elementwise op; ``grad`` is an explicit rule in graph ops; ``ZERO`` declares a
zero gradient (Floor, Sign...).

Scalar parameters (LeakyRelu's alpha, Clip's bounds) are const inputs after ``x``: the lowering turns a
scalar const operand into a VM immediate, and ONNX's input-form parameters (Clip's min/max, PRelu's
slope) are the same inputs.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from .ir import FLOAT_DTYPES, INT_DTYPES, Tensor, broadcast_shapes
from .ops import OpDef, REGISTRY, _lift, make, mul, register, step, sub

#: a gradient rule that is zero everywhere (piecewise-constant ops)
ZERO = "zero"

#: user functions declared here, by name (``libml_compile`` exports them)
PUBLIC: dict = {}


def _float_rule(op, nparams):
    def rule(inp, attrs):
        x = inp[0]
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: needs a floating tensor, got {x.name!r} of dtype {x.dtype}")
        shape = x.shape
        for p in inp[1:]:
            if p.dtype != x.dtype:
                raise TypeError(f"{op}: parameter {p.name!r} has dtype {p.dtype}, the input {x.dtype}")
            shape = broadcast_shapes(op, shape, p.shape)
        if len(inp) != 1 + nparams:
            raise ValueError(f"{op}: expected {1 + nparams} operands, got {len(inp)}")
        return shape, x.dtype
    return rule


def _grad_rule(name, grad, grad_vm, grad_from, nparams, param_grads=None):
    if grad == ZERO:
        return lambda n, g: (None,) * (1 + nparams)
    if grad is not None:
        return grad
    if nparams and param_grads is None:
        # a parameter fed as a trainable tensor would silently get a zero gradient
        raise ValueError(f"{name}: declare param_grads for its {nparams} parameter(s) (None entries where "
                         f"the derivative is zero almost everywhere)")
    gop = f"{name}_grad"
    nin = 2 + nparams
    register(OpDef(gop, "ew", lambda inp, at: (broadcast_shapes(gop, *(t.shape for t in inp)), inp[0].dtype),
                   None, None, vm=grad_vm, epilogue=True,
                   doc=f"upstream gradient times {name}'s derivative, from its {grad_from} ({nin} operands)"))

    def rule(n, g):
        y = n if grad_from == "output" else n.inputs[0]
        return (make(gop, (g, y) + tuple(n.inputs[1:])),) + (tuple(param_grads(n, g)) if nparams else ())
    return rule


def _user_function(name, params, doc):
    """``lc.<name>(x, <param>=<default>, ..., name=None)``."""
    def f(x, *args, name=None, **kw):
        if not isinstance(x, Tensor):
            raise TypeError(f"{f.__name__}: expected a symbolic Tensor, got {type(x).__name__}")
        if len(args) > len(params):
            raise TypeError(f"{f.__name__}: takes {len(params)} parameters ({', '.join(p for p, _ in params)}), "
                            f"got {len(args)}")
        vals = dict(params)
        for (p, _), v in zip(params, args):
            vals[p] = v
        for k, v in kw.items():
            if k not in vals:
                raise TypeError(f"{f.__name__}: unexpected parameter {k!r}")
            vals[k] = v
        for k, v in vals.items():
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"{f.__name__}: parameter {k} is NaN")
        return make(name_, (x,) + tuple(_lift(vals[p], x, f.__name__) for p, _ in params), name=name)
    name_ = name
    f.__name__ = f.__qualname__ = name
    f.__doc__ = doc
    f.__signature__ = inspect.Signature(
        [inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for p, d in params]
        + [inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=None)])
    return f


def unary(name, ref, vm, *, grad=None, grad_vm=None, grad_from="input", params=(), param_grads=None,
          onnx=None, domain=(-3.0, 3.0), public=True, doc=""):
    """Declare y = f(x, *params) elementwise on a float tensor.

    ref: NumPy reference ``(x, *params) -> y``.  vm: its VM opcode.  grad / grad_vm / grad_from: the
    gradient (see the module docstring).  params: ((name, default), ...) scalar parameters, which become
    const inputs (defaults equal ONNX's, tests/test_onnx_registry.py).  param_grads: with grad_vm and
    params, ``(node, g) -> (d/dparam, ...)`` in graph ops (None where the derivative is zero almost
    everywhere): a parameter may be a trainable tensor.  onnx: the ONNX op type, or (op type,
    {attribute: param}) when attributes carry the params, or (op type, {attribute: param},
    {attribute: value}) when an attribute's value selects this op (Gelu's approximate); ``onnx_import``
    maps node inputs after x onto the params, so an input-form parameter (Clip >= 11) needs no entry.
    domain: (lo, hi) the generated tests sample x from (where the op is smooth)."""
    params = tuple(params)
    op = register(OpDef(name, "ew", _float_rule(name, len(params)), lambda at, *xs: ref(*xs),
                        _grad_rule(name, grad, grad_vm, grad_from, len(params), param_grads), vm=vm,
                        doc=doc, onnx=_onnx_spec(onnx), domain=domain, params=params, epilogue=True))
    if public:
        PUBLIC[name] = _user_function(name, params, doc)
    return op


def binary(name, ref, vm, grad, *, onnx=None, domain=(-3.0, 3.0), public=True, int_ok=False, doc=""):
    """Declare z = f(a, b) elementwise with NumPy broadcasting, float dtypes (and integer dtypes with
    ``int_ok``: the integer kernel, backend_cpu._INT_OPS, implements the op); ``grad(n, g)`` -> (da, db)
    in the output's shape (autodiff reduces broadcast operands)."""
    def rule(inp, attrs):
        a, b = inp
        ok = FLOAT_DTYPES + (INT_DTYPES if int_ok else ())
        if a.dtype not in ok or b.dtype != a.dtype:
            raise TypeError(f"{name}: needs two {'numeric' if int_ok else 'floating'} tensors of one dtype, got "
                            f"{a.dtype} and {b.dtype}")
        return broadcast_shapes(name, a.shape, b.shape), a.dtype
    op = register(OpDef(name, "ew", rule, lambda at, a, b: ref(a, b), grad, vm=vm, doc=doc,
                        onnx=_onnx_spec(onnx), domain=domain, int_ok=int_ok))
    if public:
        def f(a, b, name=None):
            like = a if isinstance(a, Tensor) else b
            if not isinstance(like, Tensor):
                raise TypeError(f"{f.__name__}: at least one operand must be a symbolic Tensor")
            return make(op.name, (_lift(a, like, f.__name__), _lift(b, like, f.__name__)), name=name)
        f.__name__ = f.__qualname__ = name
        f.__doc__ = doc
        PUBLIC[name] = f
    return op


def _onnx_spec(onnx):
    if onnx is None:
        return None
    if isinstance(onnx, str):
        return (onnx, {})
    return onnx


# ---------------------------------------------------------------------------------------------------
# NumPy references: written from the ONNX operator definitions (and the NumPy/PyTorch formulas where
# ONNX is silent), independently of the C expressions they check.  Float dtype in, float dtype out.

def _t(f):
    """Evaluate in the input's dtype (NumPy would promote Python-float constants only to float64 arrays)."""
    def g(x, *ps):
        with np.errstate(all="ignore"):
            return np.asarray(f(x, *ps), dtype=x.dtype)
    return g


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def _softplus(x):
    return np.where(x > 0, x + np.log1p(np.exp(-np.abs(x))), np.log1p(np.exp(np.minimum(x, 0)))) \
        if x.size else x.copy()


def _hard_sigmoid(x, alpha, beta):
    return np.clip(alpha * x + beta, 0, 1)


SQRT1_2 = 0.7071067811865476

# ---------------------------------------------------------------------------------------------------
# the declarations

unary("tanh", _t(np.tanh), "TANH", grad_vm="TANH_GRAD", grad_from="output", onnx="Tanh",
      doc="hyperbolic tangent")
unary("sqrt", _t(np.sqrt), "SQRT", grad_vm="SQRT_GRAD", grad_from="output", onnx="Sqrt", domain=(0.1, 4.0),
      doc="square root (NaN below 0)")
unary("reciprocal", _t(lambda x: 1 / x), "RECIP", grad_vm="RECIP_GRAD", grad_from="output", onnx="Reciprocal",
      domain=(0.5, 3.0), doc="1 / x")
unary("abs", _t(np.abs), "ABS", grad_vm="ABS_GRAD", onnx="Abs", doc="absolute value (gradient 0 at 0)")
unary("erf", _t(_erf), "ERF", grad_vm="ERF_GRAD", onnx="Erf", doc="error function")
unary("sin", _t(np.sin), "SIN", grad_vm="SIN_GRAD", onnx="Sin", doc="sine")
unary("cos", _t(np.cos), "COS", grad_vm="COS_GRAD", onnx="Cos", doc="cosine")
unary("softplus", _t(_softplus), "SOFTPLUS", grad_vm="SOFTPLUS_GRAD", onnx="Softplus", doc="log(1 + exp(x))")
unary("softsign", _t(lambda x: x / (1 + np.abs(x))), "SOFTSIGN", grad_vm="SOFTSIGN_GRAD", onnx="Softsign",
      doc="x / (1 + |x|)")
def _neg_part(x):
    """min(x, 0) as a graph op."""
    return make("minimum", (x, _lift(0.0, x, "minimum")))


def _g_elu_alpha(n, g):
    # d/dalpha alpha (e^x - 1) = e^min(x, 0) - 1 (0 for x > 0)
    return (mul(g, make("expm1", (_neg_part(n.inputs[0]),))),)


def _g_celu_alpha(n, g):
    # d/dalpha alpha (e^(x/alpha) - 1) = expm1(u) - u e^u with u = min(x, 0) / alpha
    x, a = n.inputs
    u = make("div", (_neg_part(x), a))
    e = make("expm1", (u,))
    return (mul(g, sub(e, mul(u, e + 1.0))),)


unary("elu", _t(lambda x, a: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))), "ELU", grad_vm="ELU_GRAD",
      params=(("alpha", 1.0),), param_grads=_g_elu_alpha, onnx=("Elu", {"alpha": "alpha"}), doc="x if x > 0 else alpha (e^x - 1)")
unary("celu", _t(lambda x, a: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0) / a))), "CELU",
      grad_vm="CELU_GRAD", params=(("alpha", 1.0),), param_grads=_g_celu_alpha, onnx=("Celu", {"alpha": "alpha"}),
      doc="x if x > 0 else alpha (e^(x/alpha) - 1)")
unary("leaky_relu", _t(lambda x, a: np.where(x < 0, a * x, x)), "LEAKYRELU", grad_vm="LEAKYRELU_GRAD",
      params=(("alpha", 0.01),), param_grads=lambda n, g: (make("prelu_slope_grad", (g, n.inputs[0])),),
      onnx=("LeakyRelu", {"alpha": "alpha"}), doc="x if x >= 0 else alpha x")
unary("thresholded_relu", _t(lambda x, a: np.where(x > a, x, 0)), "THRELU", grad_vm="THRELU_GRAD",
      params=(("alpha", 1.0),), param_grads=lambda n, g: (None,),  # a jump: zero almost everywhere
      onnx=("ThresholdedRelu", {"alpha": "alpha"}), domain=(-3.0, 3.0),
      doc="x if x > alpha else 0")
def _g_hard_sigmoid(n, g):
    x, alpha, beta = n.inputs
    inside = make("hard_sigmoid_grad", (g, n, _lift(1.0, x, "hard_sigmoid")))  # g where 0 < y < 1
    return make("hard_sigmoid_grad", (g, n, alpha)), mul(inside, x), inside


unary("hard_sigmoid", _t(_hard_sigmoid), "HARDSIGMOID", grad=_g_hard_sigmoid,
      params=(("alpha", 0.2), ("beta", 0.5)), onnx=("HardSigmoid", {"alpha": "alpha", "beta": "beta"}),
      doc="max(0, min(1, alpha x + beta)); gradient alpha inside (0, 1)")
register(OpDef("hard_sigmoid_grad", "ew",
               lambda inp, at: (broadcast_shapes("hard_sigmoid_grad", *(t.shape for t in inp)), inp[0].dtype),
               None, None, vm="HARDSIGMOID_GRAD", doc="g * alpha where 0 < hard_sigmoid output < 1"))
unary("hard_swish", _t(lambda x: x * _hard_sigmoid(x, 1 / 6, 0.5)), "HARDSWISH", grad_vm="HARDSWISH_GRAD",
      onnx="HardSwish", doc="x * max(0, min(1, x/6 + 1/2))")
unary("mish", _t(lambda x: x * np.tanh(_softplus(x))), "MISH", grad_vm="MISH_GRAD", onnx="Mish",
      doc="x tanh(softplus(x))")
unary("gelu", _t(lambda x: 0.5 * x * (1 + _erf(x * SQRT1_2))), "GELU", grad_vm="GELU_GRAD", public=False,
      onnx=("Gelu", {}, {"approximate": "none"}), doc="x Phi(x), exact (erf) form")
unary("gelu_tanh",
      _t(lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))), "GELU_TANH",
      grad_vm="GELU_TANH_GRAD", public=False, onnx=("Gelu", {}, {"approximate": "tanh"}),
      doc="GELU, tanh approximation")
# SELU's constants are ONNX's defaults (float32 values of the self-normalising alpha and gamma)
unary("selu", _t(lambda x, a, s: s * np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))), "SELU",
      # d/dalpha = g gamma expm1(min(x, 0)); d/dgamma = g elu(x, alpha) (parameters may be trainable)
      grad=lambda n, g: (make("elu_grad", (mul(g, n.inputs[2]), n.inputs[0], n.inputs[1])),
                         mul(mul(g, n.inputs[2]), PUBLIC["expm1"](PUBLIC["minimum"](n.inputs[0], 0.0))),
                         mul(g, make("elu", (n.inputs[0], n.inputs[1])))),
      params=(("alpha", 1.67326319217681884765625), ("gamma", 1.05070102214813232421875)),
      onnx=("Selu", {"alpha": "alpha", "gamma": "gamma"}),
      doc="gamma * (x if x > 0 else alpha (e^x - 1)); gradient gamma * elu'(x, alpha)")
unary("sign", _t(np.sign), "SIGN", grad=ZERO, onnx="Sign", doc="-1, 0 or 1 (NaN stays NaN); zero gradient")
unary("floor", _t(np.floor), "FLOOR", grad=ZERO, onnx="Floor", doc="zero gradient")
unary("ceil", _t(np.ceil), "CEIL", grad=ZERO, onnx="Ceil", doc="zero gradient")
unary("round", _t(np.round), "ROUND", grad=ZERO, onnx="Round", doc="half to even, as ONNX; zero gradient")
unary("square", _t(lambda x: x * x), "SQUARE", grad=lambda n, g: (mul(g, mul(n.inputs[0], 2.0)),),
      doc="x * x")
unary("log1p", _t(np.log1p), "LOG1P", grad=lambda n, g: (PUBLIC["reciprocal"](n.inputs[0] + 1.0) * g,),
      domain=(-0.5, 3.0), doc="log(1 + x), exact near 0")
unary("atan", _t(np.arctan), "ATAN", grad_vm="ATAN_GRAD", onnx="Atan", doc="arc tangent")
unary("expm1", _t(np.expm1), "EXPM1", grad=lambda n, g: (mul(g, n + 1.0),), doc="e^x - 1, exact near 0")


def _g_clip(n, g):
    x, lo, hi = n.inputs
    inside = make("clip_mask", (x, lo, hi))
    # the bounds get the gradient where they clip, as PyTorch's clamp with tensor bounds: y = min(max(x,
    # lo), hi), so lo where x < lo < hi, hi where max(x, lo) > hi (lo > hi included)
    return (mul(g, inside), mul(g, mul(step(sub(lo, x)), step(sub(hi, lo)))),
            mul(g, step(sub(make("maximum", (x, lo)), hi))))


unary("clip", _t(lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi)), "CLIP", grad=_g_clip,
      params=(("min", -math.inf), ("max", math.inf)), onnx=("Clip", {"min": "min", "max": "max"}),
      doc="min(max(x, min), max): NaN stays NaN; the gradient flows where min <= x <= max")
register(OpDef("clip_mask", "ew", lambda inp, at: (broadcast_shapes("clip_mask", *(t.shape for t in inp)),
                                                   inp[0].dtype),
               None, None, vm="CLIP_MASK", doc="1 where min <= x <= max else 0"))


def _mask_op(name, vm):
    register(OpDef(name, "ew", lambda inp, at: (broadcast_shapes(name, inp[0].shape, inp[1].shape), inp[0].dtype),
                   None, None, vm=vm, doc="d max/min(x, y) / dx: 1, 1/2 at ties, 0"))


_mask_op("max_mask", "MAX_MASK")
_mask_op("min_mask", "MIN_MASK")
binary("maximum", _t(np.maximum), "MAX",
       lambda n, g: (mul(g, make("max_mask", n.inputs)), mul(g, make("max_mask", n.inputs[::-1]))),
       onnx="Max", int_ok=True, doc="elementwise max (NaN if either is NaN); ties split the gradient")
binary("minimum", _t(np.minimum), "MIN",
       lambda n, g: (mul(g, make("min_mask", n.inputs)), mul(g, make("min_mask", n.inputs[::-1]))),
       onnx="Min", int_ok=True, doc="elementwise min (NaN if either is NaN); ties split the gradient")


def _g_pow(n, g):
    a, b = n.inputs
    return (make("pow_grad_base", (g, a, b)), make("pow_grad_exp", (g, n, a)))


for _name, _vm in (("pow_grad_base", "POW_GRAD_BASE"), ("pow_grad_exp", "POW_GRAD_EXP")):
    register(OpDef(_name, "ew", lambda inp, at, _n=_name: (broadcast_shapes(_n, *(t.shape for t in inp)),
                                                             inp[0].dtype), None, None, vm=_vm,
                   doc="the gradients of pow: g b a^(b-1) (0 where b = 0), g a^b log a (0 where a = 0 and b >= 0)"))
binary("pow", _t(np.power), "POW", _g_pow, onnx="Pow", domain=(0.5, 2.0), int_ok=True,
       doc="a ** b (both operands differentiable); integers: exact, wrapping as NumPy; a negative integer "
           "exponent is refused when folded (as NumPy) and truncates toward zero at run time (1 / x^k)")
# PRelu: LeakyRelu whose slope is a tensor (broadcast to x); autodiff reduces the slope's gradient
binary("prelu", _t(lambda x, s: np.where(x < 0, s * x, x)), "LEAKYRELU",
       lambda n, g: (make("leaky_relu_grad", (g,) + n.inputs), make("prelu_slope_grad", (g, n.inputs[0]))),
       onnx="PRelu", doc="x if x >= 0 else slope * x (slope broadcast to x, trainable)")
register(OpDef("prelu_slope_grad", "ew", lambda inp, at: (inp[0].shape, inp[0].dtype), None, None,
               vm="PRELU_SLOPE_GRAD", doc="g * x where x <= 0 (PRelu's slope gradient)"))


def gelu(x, approximate="none", name=None):
    """GELU, x Phi(x): ``approximate="none"`` (erf form) or ``"tanh"`` (as ONNX Gelu, opset 20)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return PUBLIC["_gelu_" + approximate](x, name=name)


PUBLIC["_gelu_none"] = _user_function("gelu", (), REGISTRY["gelu"].doc)
PUBLIC["_gelu_tanh"] = _user_function("gelu_tanh", (), REGISTRY["gelu_tanh"].doc)
PUBLIC["gelu"] = gelu
EXPORTS = sorted(k for k in PUBLIC if not k.startswith("_"))
