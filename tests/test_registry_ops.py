"""Tests generated from the operator registry (``libml_compile.ops.REGISTRY``): every registered op is
either sampled here or listed in ``NOT_SAMPLED`` with the reason, so an op declared tomorrow gets its
tests without an edit to this file (``test_every_registered_op_is_sampled_or_listed`` fails otherwise).

Sampling is driven by registry data:

* elementwise ops with a NumPy reference (``kind == "ew"`` and ``ref``): the arity is the VM opcode's
  (``format.VM``), ``x`` is drawn from ``OpDef.domain``, each scalar parameter (``OpDef.params``) near
  its default (an infinite default, as Clip's bounds: from the lower / upper third of the domain);
* the internal elementwise ops without a reference (``*_grad``, masks) are reached through the gradients
  of the ops above (``test_every_internal_op_is_reached_by_a_gradient``);
* ops that need attributes the registry does not describe (sum's axes, softmax's axis, matmul's shapes,
  ...) have a builder in ``ATTR_OPS``, keyed by name.

Per op, the generated cases (``pytest -k <op>`` selects one op):

* ``test_forward``: ``lc.compile`` + ``run`` against ``OpDef.ref`` in float32 and float64, the
  parameters as VM immediates (consts) and as fed tensors broadcast against x;
* ``test_edge_values``: 0, -0, +-1e30, +-inf, NaN, tiny -- the runtime's NaN/Inf pattern equals the
  reference's exactly (binary ops: every pair; parameters too, as fed tensors);
* ``test_grad_fd``: every floating input, parameters included, against float64 central differences of
  the NumPy reference (points where differences at two step sizes disagree -- kinks -- are resampled);
* ``test_grad_torch``: against PyTorch autograd (``TORCH`` maps op -> torch function; an unlisted
  unary op is compared with ``torch.<name>`` when that exists), at random
  points and at kinks where PyTorch defines a subgradient (0, +-1, +-2.5, +-3, the parameters, ties);
* ``test_large_float32``: >= 1M float32 elements (many VM blocks, both threads) against the reference,
  and bit-identical results (forward and gradient) for num_threads=1 and 2;
* ``test_fused_chain``: ``op(x * w + b) * 2`` fused, trained one SGD step, against the step computed
  from central differences of the reference;
* ``test_onnx_mapping_names_a_real_operator``: ``OpDef.onnx`` against ONNX's operator schemas.

The ops of ``ATTR_OPS`` get ``test_forward_attr_op`` (f32, f64), ``test_grad_fd_attr_op`` and
``test_large_attr_op`` (>= 1M float32 elements, 1 vs 2 threads bit-identical).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import libml_compile as lc
from libml_compile import autodiff, ops
from libml_compile.ops import REGISTRY
from libml_runtime import format as FMT

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------
# what is sampled

#: ops no generated case covers, with the reason (every other registered op is sampled below)
NOT_SAMPLED = {
    "input": "graph leaf (fed tensor), not an operation",
    "param": "graph leaf (parameter), not an operation",
    "const": "graph leaf (constant), not an operation",
    "buffer": "graph leaf (non-trainable state: BatchNorm's running statistics), not an operation; covered by "
              "test_batchnorm (updates, checkpoints, plan files, export)",
    "batch_norm_grad": "batch_norm's gradient op (three outputs): reached through batch_norm's gradient below",
    "linear": "made only by passes.fuse_epilogues from matmul + add (+ relu); covered by test_mlp_reference "
              "and test_fusion_fuzz",
    "where_select": "made only by ops_logic.lower_logic (where on bytes: the select instruction); covered by "
                    "test_logic_ops",
    "linear_ex": "made only by passes.fuse_vm_epilogues (a GEMM with any VM step as epilogue); covered by "
                 "test_vm_epilogues against PyTorch",
    "output": "projection of output k of a node with several outputs; covered by test_layer_norm (IR, folding, scratch outputs, gradients of every output)",
    "xent_grad": "softmax_xent's gradient op: reached through softmax_xent's gradient below",
    "gather_grad": "gather's gradient op: reached through gather's gradient below",
    "layer_norm_grad": "layer_norm's gradient op (three outputs): reached through layer_norm's gradient below",
    "sgd_scatter": "plain SGD of an embedding table's rows (an optimizer update, made by fold_sgd_into_gemm): "
                   "covered by test_sparse_embedding_sgd against torch.optim.SGD",
    "assemble": "made by ops_attention.assemble_scatter_sums from sums of gather gradients after autodiff (no "
                "gradient of its own is ever needed); tests/test_attention_fusion.py pins its copies and its "
                "in-place form against PyTorch",
    "rms_norm_grad": "rms_norm's gradient op (two outputs): reached through rms_norm's gradient below (and test_rms_norm)",
    "broadcast_to": "needs its target shape; reached through every broadcast operand's gradient here, and "
                    "tested in test_grad_ops",
    "reshape": "a view (no kernel); tested in test_grad_ops and test_shapes",
    "dropout": "random in training (grad/step) and the identity in run, which the generated forward cases use; "
               "test_dropout checks the masks against a NumPy Philox reference, the gradient, finite differences "
               "and 1 vs 2 threads",
    "allreduce_start": "a collective (packs gradients, starts MPI_Iallreduce), made by distributed.reduce_gradients; "
                       "covered by test_distributed under mpiexec -n 2 against a single-process run",
    "allreduce_wait": "a collective (waits, writes the mean gradients), made by distributed.reduce_gradients; "
                      "covered by test_distributed under mpiexec -n 2",
    "dropout_step": "dropout's per-call step number (no inputs, an int64 scalar); covered by test_dropout",
    "index_flat": "integer positions of live GatherElements / GatherND indices (no float operand, no gradient); "
                  "covered by test_index_ops against PyTorch, ONNX Runtime and the official node cases",
    "conv_grad_input": "conv's input-gradient op: reached through conv's gradient below (and test_conv against "
                       "PyTorch autograd)",
    "max_pool_grad": "max_pool's gradient op: reached through max_pool's gradient below (and test_pool)",
    "avg_pool_grad": "avg_pool's gradient op: reached through avg_pool's gradient below (and test_pool)",
    "resize_grad": "resize's gradient op: reached through resize's gradient below (and test_resize against "
                   "PyTorch autograd)",
    "conv_grad_weight": "conv's weight-gradient op: reached through conv's gradient below (and test_conv against "
                        "PyTorch autograd)",
    "conv_sgd": "plain SGD folded into conv's weight-gradient kernel (an in-place update, no output), made by "
                "passes.fold_sgd_into_conv; test_conv_fusion checks 3 steps against torch.optim.SGD and the "
                "unfused step's bits",
}
_OPT = "optimizer update (optim.py), made by lc.SGD / lc.Adam; tested against NumPy SGD/AdamW in test_training"
NOT_SAMPLED.update({n: _OPT for n in ("sgd_update", "sgd_gemm", "momentum_gemm", "adam_update", "adam_count")})
#: the comparison / logic family: bool-valued or integer-capable ops the float sampler cannot drive yet;
#: tests/test_logic_ops.py checks them against NumPy (NaN/Inf, broadcasting, int dtypes) and where's
#: gradients against PyTorch and finite differences
_LOGIC = "bool-valued / integer logic family: covered by test_logic_ops (the float sampler cannot drive it yet)"
NOT_SAMPLED.update({n: _LOGIC for n in ("equal", "less", "less_equal", "greater", "greater_equal", "logical_and",
                                        "logical_or", "logical_xor", "logical_not", "isnan", "isinf", "isposinf",
                                        "isneginf", "where", "mod", "fmod")})
NOT_SAMPLED.update({n: "the logic family's float-mask form, made by ops_logic.lower_logic (not by a gradient); "
                       "test_logic_ops runs it fused and unfused"
                    for n in ("lt_mask", "le_mask", "gt_mask", "ge_mask", "and_mask", "or_mask", "xor_mask",
                              "not_mask", "isnan_mask", "isinf_mask", "isposinf_mask", "isneginf_mask",
                              "where_mask")})

#: registry domains that do not suit every operand of an older op (ops.py declares no domain for them):
#: log's input and div's divisor must stay away from 0 -- the lead may move these into ops.py
DOMAIN_OVERRIDE = {"log": (0.2, 3.0), "div": (0.5, 3.0)}


#: ops whose kernel has a multiply-add the AVX2/AVX-512 copies contract into one fused multiply-add
#: (GCC's default -ffp-contract=fast; the baseline copy, LIBML_ISA=baseline, does not): the product is
#: not rounded on its own, so at x = -3 hard_sigmoid(1/6, 0.5) is 2.8e-17 instead of 0 and a product
#: that overflows float32 does not make inf - inf = NaN.  Their edge values may match either the
#: reference or the reference evaluated in a wider dtype (the contracted product), element by element.
CONTRACTED = {"hard_sigmoid": "alpha * x + beta"}

#: ops the fused-chain test cannot find inside a kernel, with the reason (their values are still checked)
NOT_IN_KERNEL = {"identity": "a no-op: passes.simplify removes it before fusion",
                 "neg": "passes.simplify moves the sign into a constant of the training step's loss"}


def _vm_arity(op):
    return FMT.VM_ARITY[FMT.VM_OPS[op.vm]]


def _sampled_ew():
    """Elementwise ops with a reference: {name: arity}."""
    out = {}
    for name, op in REGISTRY.items():
        if op.kind != "ew" or op.ref is None or name in NOT_SAMPLED:
            continue
        arity = _vm_arity(op)
        if op.params:
            assert arity == 1 + len(op.params), f"{name}: VM {op.vm} has arity {arity}, the op 1 + {len(op.params)} params"
        out[name] = arity
    return out


def _internal_ew():
    return sorted(n for n, op in REGISTRY.items() if op.kind == "ew" and op.ref is None and n not in NOT_SAMPLED)


EW = _sampled_ew()
EW_NAMES = sorted(EW)


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _domain(name):
    return DOMAIN_OVERRIDE.get(name, REGISTRY[name].domain)


def _sample_x(name, shape, rng):
    lo, hi = _domain(name)
    return rng.uniform(lo, hi, shape)


def _sample_param(name, k, rng, shape=()):
    """Parameter ``k`` of ``name`` near its default (+-20%); an infinite default (an absent bound) from the
    outer third of the domain on its side, so the bound is active for part of x."""
    lo, hi = _domain(name)
    _, d = REGISTRY[name].params[k]
    if d == -math.inf:
        return rng.uniform(lo, lo + (hi - lo) / 3, shape)
    if d == math.inf:
        return rng.uniform(hi - (hi - lo) / 3, hi, shape)
    return d * rng.uniform(0.8, 1.2, shape) if d else rng.uniform(-0.2, 0.2, shape)


def _sample_operands(name, x_shape, p_shape, rng):
    """x (and for binary ops the second operand) from the domain; parameters near their defaults."""
    op = REGISTRY[name]
    if op.params:
        return [np.array(a, dtype=np.float64) for a in ([_sample_x(name, x_shape, rng)] + [_sample_param(name, k, rng, p_shape) for k in range(len(op.params))])]
    return [np.array(a, dtype=np.float64) for a in ([_sample_x(name, x_shape, rng)] + [_sample_x(name, p_shape, rng) for _ in range(EW[name] - 1)])]


def _ref(name, arrays, attrs=None, all_outputs=False):
    """The op's NumPy reference on ``arrays`` (floating, one dtype): output 0, or the list of every output
    with ``all_outputs`` (an op with several outputs returns a tuple)."""
    with np.errstate(all="ignore"):
        r = REGISTRY[name].ref(attrs or {}, *arrays)
    outs = [np.asarray(v) for v in r] if isinstance(r, tuple) else [np.asarray(r)]
    return outs if all_outputs else outs[0]


def _build(name, arrays, roles, dtype, attrs=None, loss=False):
    """Graph ``out = name(operands)``; roles[i] in input/param/const.  With ``loss``, also
    ``loss = sum(out * R)`` for a fixed random R.  Returns (graph, out, loss or None, feeds, R)."""
    g = lc.Graph(f"t_{name}")
    ts, feeds = [], {}
    for i, (a, role) in enumerate(zip(arrays, roles)):
        a = np.asarray(a, dtype=dtype)
        if role == "input":
            ts.append(g.input(f"in{i}", a.shape, dtype=np.dtype(dtype).name))
            feeds[f"in{i}"] = a
        elif role == "param":
            ts.append(g.param(f"p{i}", a))
        else:
            ts.append(g.const(a))
    out = ops.make(name, ts, attrs)
    g.output("out", out)
    lt = R = None
    if loss:
        R = np.random.default_rng(_seed(name, "R")).uniform(0.5, 1.5, out.shape).astype(dtype)
        lt = lc.sum(out * g.const(R))
        g.output("loss", lt)
    return g, out, lt, feeds, R


def _assert_same_values(got, want, rtol, atol, what):
    """Equal NaN/Inf pattern (signs of infinities included), finite values close."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, reference {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


TOL = {np.float32: (2e-5, 2e-6), np.float64: (1e-11, 1e-13)}


# ---------------------------------------------------------------------------------------------------
# coverage of the registry

def test_every_registered_op_is_sampled_or_listed():
    covered = set(EW) | set(ATTR_OPS) | set(NOT_SAMPLED) | set(_internal_ew())
    missing = sorted(set(REGISTRY) - covered)
    assert not missing, (f"ops without generated tests: {missing}; give them a reference (elementwise), "
                         f"a builder in ATTR_OPS, or a reason in NOT_SAMPLED")
    stale = sorted((set(ATTR_OPS) | set(NOT_SAMPLED) | set(DOMAIN_OVERRIDE) | set(TORCH) | set(CONTRACTED)
                    | set(NOT_IN_KERNEL)) - set(REGISTRY))
    assert not stale, f"tables name ops that are not registered: {stale}"
    assert len(EW) >= 40


def test_every_internal_op_is_reached_by_a_gradient():
    """The ref-less elementwise ops (gradient steps, masks) are tested numerically through the gradient
    cases of the ops whose rules make them: each must occur in one of those backward graphs."""
    reached = set()
    for name in EW_NAMES:
        arrays = _sample_operands(name, (3, 4), (4,), np.random.default_rng(0))
        g, out, loss, _, _ = _build(name, arrays, ["param"] * len(arrays), np.float64, loss=True)
        autodiff.grad_graph(loss, [t for t in g.nodes if t.op == "param"])
        reached |= {t.op for t in g.nodes}
    for name in ATTR_OPS:  # (e.g. reduce_prod's gradient builds prod_grad)
        g, out, _, _, diff, _ = _attr_case(name, np.float64, "param")
        if any(diff):
            autodiff.grad_graph(lc.sum(out), [t for t in g.nodes if t.op == "param"])
            reached |= {t.op for t in g.nodes}
    missing = sorted(set(_internal_ew()) - reached)
    assert not missing, f"internal elementwise ops no gradient uses (untested): {missing}"


# ---------------------------------------------------------------------------------------------------
# forward against the reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", EW_NAMES)
def test_forward(name, dtype):
    rng = np.random.default_rng(_seed(name, "fwd"))
    rtol, atol = TOL[dtype]
    n_extra = EW[name] - 1
    # (x shape, operand shape, roles of the extra operands): immediates, then broadcast fed tensors
    cases = [((2, 3, 5), (), "const"), ((2, 3, 5), (5,), "input"), ((3, 1), (1, 4), "input")]
    if not n_extra:
        cases = [((2, 3, 5), (), None), ((0, 3), (), None), ((), (), None)]
    for xs, ps, role in cases:
        arrays = [a.astype(dtype) for a in _sample_operands(name, xs, ps, rng)]
        g, out, _, feeds, _ = _build(name, arrays, ["input"] + [role] * n_extra, dtype)
        got = lc.compile(g).run(feeds)["out"]
        _assert_same_values(got, _ref(name, arrays), rtol, atol, f"{name} {xs} with {ps} {role}")


# ---------------------------------------------------------------------------------------------------
# edge values

def _edges(dtype):
    tiny = np.finfo(dtype).tiny  # smallest normal; and a subnormal
    return np.array([0.0, -0.0, 1.0, -1.0, 1e30, -1e30, np.inf, -np.inf, np.nan, tiny, -tiny, tiny / 8,
                     0.5, 3.0], dtype=dtype)


def _same(got, want, rtol, atol):
    """Elementwise: both NaN, equal (infinities of one sign), or finite and close."""
    with np.errstate(invalid="ignore"):
        return (np.isnan(got) & np.isnan(want)) | (got == want) | \
            (np.isfinite(got) & np.isfinite(want) & np.isclose(got, want, rtol=rtol, atol=atol))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", EW_NAMES)
def test_edge_values(name, dtype):
    rtol, atol = TOL[dtype]
    e = _edges(dtype)
    arity = EW[name]
    op = REGISTRY[name]
    if arity == 1:
        grids = [[e]]
    elif not op.params:  # binary: every pair
        grids = [np.meshgrid(e, e, indexing="ij")]
    else:
        # x at every edge with the parameters at their defaults (immediates), and every parameter at
        # every edge value (plus its default) as a fed tensor
        grids = [[e] + [np.array(d, dtype) for _, d in op.params]]
        pvals = [np.concatenate([e, np.array([d], dtype)]) for _, d in op.params]
        grids.append(np.meshgrid(e, *pvals, indexing="ij"))
    for k, arrays in enumerate(grids):
        arrays = [np.ascontiguousarray(a, dtype=dtype) for a in arrays]
        roles = ["input"] + ["const" if k == 0 else "input"] * (arity - 1)
        g, out, _, feeds, _ = _build(name, arrays, roles, dtype)
        got = lc.compile(g).run(feeds)["out"]
        want = _ref(name, arrays)
        bad = ~_same(got, want, rtol, atol)
        if name in CONTRACTED:
            wide = np.longdouble if dtype == np.float64 else np.float64
            bad &= ~_same(got, _ref(name, [a.astype(wide) for a in arrays]).astype(dtype), rtol, atol)
        if bad.any():
            idx = np.argwhere(bad)[:8]
            rows = [f"{tuple(a[tuple(i)] for a in np.broadcast_arrays(*arrays))} -> {got[tuple(i)]!r}, "
                    f"reference {want[tuple(i)]!r}" for i in idx]
            pytest.fail(f"{name} ({np.dtype(dtype).name}): {int(bad.sum())} edge values differ:\n  "
                        + "\n  ".join(rows))


# ---------------------------------------------------------------------------------------------------
# gradients: central differences of the reference, float64

def _fd(name, arrays, R, k, h):
    """d sum(ref(arrays) * R) / d arrays[k] by central differences with step h (per element)."""
    a = arrays[k]
    grad = np.zeros(a.shape)
    for i in np.ndindex(a.shape):
        vals = []
        for s in (h, -h):
            b = [x.copy() for x in arrays]
            b[k][i] += s
            vals.append(float(np.sum(_ref(name, b) * R)))
        grad[i] = (vals[0] - vals[1]) / (2 * h)
    return grad


def _smooth_sample(name, make_arrays, R_shape, rng, tries=20):
    """Operands where the reference is smooth for every element of every operand: central differences
    with steps 1e-5 and 1e-6 agree (a kink within 1e-5 of a sample makes them differ at O(1))."""
    R = np.random.default_rng(_seed(name, "R")).uniform(0.5, 1.5, R_shape)
    for _ in range(tries):
        arrays = make_arrays(rng)
        fds = [_fd(name, arrays, R, k, 1e-5) for k in range(len(arrays))]
        fine = [_fd(name, arrays, R, k, 1e-6) for k in range(len(arrays))]
        if all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fds, fine)):
            return arrays, fds, R
    pytest.fail(f"{name}: no smooth sample in {tries} tries (domain {_domain(name)})")


@pytest.mark.parametrize("name", EW_NAMES)
def test_grad_fd(name):
    """Every operand is a param (parameters included: prelu's slope, clip's bounds, pow's exponent,
    elu's alpha ...); prog.grad against central differences of the reference."""
    rng = np.random.default_rng(_seed(name, "fd"))
    arrays, fds, R = _smooth_sample(name, lambda r: _sample_operands(name, (3, 4), (4,) if EW[name] == 2 and
                                                                   not REGISTRY[name].params else (), r),
                                    (3, 4), rng)
    g, out, loss, feeds, _ = _build(name, arrays, ["param"] * len(arrays), np.float64, loss=True)
    prog = lc.compile(g, loss=loss)
    grads = prog.grad(feeds)
    for k, fd in enumerate(fds):
        np.testing.assert_allclose(grads[f"p{k}"], fd, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name}: d loss / d operand {k} against central differences")


# ---------------------------------------------------------------------------------------------------
# gradients against PyTorch autograd

def _hard_sigmoid(x, a, b):
    return torch.clamp(a * x + b, 0, 1)


#: op -> (torch function of the operands, parameter values to use or None for sampled, differentiable
#: operands in torch).  Scalar parameters are Python floats for torch (its functionals take no tensor
#: alpha), so only x is compared for them; tensor operands (clip's bounds, pow, prelu, max/min) all are.
TORCH = {
    "add": (torch.add, None, "all"), "sub": (torch.sub, None, "all"), "mul": (torch.mul, None, "all"),
    "div": (torch.div, None, "all"), "neg": (torch.neg, None, "all"), "relu": (torch.relu, None, "all"),
    "sigmoid": (torch.sigmoid, None, "all"), "exp": (torch.exp, None, "all"), "log": (torch.log, None, "all"),
    "identity": (lambda x: x * 1, None, "all"),
    "tanh": (torch.tanh, None, "all"), "sqrt": (torch.sqrt, None, "all"),
    "reciprocal": (torch.reciprocal, None, "all"), "abs": (torch.abs, None, "all"),
    "erf": (torch.erf, None, "all"), "sin": (torch.sin, None, "all"), "cos": (torch.cos, None, "all"),
    "softplus": (F.softplus, None, "all"), "softsign": (F.softsign, None, "all"),
    "elu": (lambda x, a: F.elu(x, a), None, "x"), "celu": (lambda x, a: F.celu(x, a), None, "x"),
    "leaky_relu": (lambda x, a: F.leaky_relu(x, a), None, "x"),
    "thresholded_relu": (lambda x, a: F.threshold(x, a, 0.0), None, "x"),
    # F.hardsigmoid is alpha = 1/6; at alpha = 1/4 (exact: no rounding of alpha x at the kinks +-2)
    "hard_sigmoid": (lambda x, a, b: F.hardsigmoid(x * 1.5), (0.25, 0.5), "x"),
    "hard_swish": (F.hardswish, None, "all"), "mish": (F.mish, None, "all"),
    "gelu": (lambda x: F.gelu(x), None, "all"), "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), None, "all"),
    "sign": (torch.sign, None, "all"), "floor": (torch.floor, None, "all"), "ceil": (torch.ceil, None, "all"),
    "round": (torch.round, None, "all"), "square": (torch.square, None, "all"),
    "log1p": (torch.log1p, None, "all"), "expm1": (torch.expm1, None, "all"),
    "clip": (lambda x, lo, hi: torch.clamp(x, lo, hi), None, "all"),
    "maximum": (torch.maximum, None, "all"), "minimum": (torch.minimum, None, "all"),
    "pow": (torch.pow, None, "all"), "prelu": (lambda x, s: torch.where(x > 0, x, s * x), None, "all"),  # F.prelu wants channels
}


def _torch_entry(name):
    """TORCH[name], else torch.<name> for a unary op without parameters (a new op such as ``atan`` is
    compared with PyTorch without an edit here), else None."""
    if name in TORCH:
        return TORCH[name]
    fn = getattr(torch, name, None)
    if callable(fn) and EW[name] == 1:
        return fn, None, "all"
    return None


TORCH_NAMES = sorted(n for n in EW if _torch_entry(n) is not None)


def _kinks(name, pvals):
    """Points where an op of the family may have a kink: 0, +-1, +-2, +-2.5, +-3 and the parameters'
    values, inside the (closed) domain."""
    lo, hi = _domain(name)
    pts = {0.0, 1.0, -1.0, 2.0, -2.0, 2.5, -2.5, 3.0, -3.0} | {float(v) for v in pvals if np.isfinite(v)}
    return np.array(sorted(p for p in pts if lo <= p <= hi))


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_grad_torch(name):
    fn, fixed, which = _torch_entry(name)
    op = REGISTRY[name]
    rng = np.random.default_rng(_seed(name, "torch"))
    if op.params:
        pvals = list(fixed) if fixed else [float(_sample_param(name, k, rng)) for k in range(len(op.params))]
        kinks = _kinks(name, pvals)
        x = np.concatenate([kinks, _sample_x(name, (16,), rng)])
        arrays = [x] + [np.array(v) for v in pvals]
    elif EW[name] == 2:
        kinks = _kinks(name, [])
        a = np.concatenate([kinks, _sample_x(name, (12,), rng), kinks])
        b = np.concatenate([kinks, _sample_x(name, (12,), rng), kinks[::-1]])  # ties first, then mixed
        arrays = [a, b]
    else:
        arrays = [np.concatenate([_kinks(name, []), _sample_x(name, (16,), rng)])]
    roles = ["param"] + (["const"] * len(op.params) if which == "x" else ["param"] * (len(arrays) - 1))
    g, out, loss, feeds, R = _build(name, arrays, roles, np.float64, loss=True)
    prog = lc.compile(g, loss=loss)
    res = prog.run(feeds)
    grads = prog.grad(feeds)
    tin = [torch.tensor(a, dtype=torch.float64, requires_grad=(r == "param")) for a, r in zip(arrays, roles)]
    targs = tin if which == "all" else [tin[0]] + [float(a) for a in arrays[1:]]
    ty = fn(*targs)
    (ty * torch.tensor(R)).sum().backward()
    # PyTorch computes some constants in float32 (hardsigmoid's 1/6, celu's 1/alpha): rtol 2e-7
    np.testing.assert_allclose(res["out"], ty.detach().numpy(), rtol=2e-7, atol=1e-12,
                               err_msg=f"{name}: forward against PyTorch")
    for k, (t, r) in enumerate(zip(tin, roles)):
        if r == "param":
            np.testing.assert_allclose(grads[f"p{k}"], t.grad.numpy(), rtol=2e-7, atol=1e-12,
                                       err_msg=f"{name}: d loss / d operand {k} against PyTorch (inputs "
                                               f"{arrays})")


# ---------------------------------------------------------------------------------------------------
# float32 at a large size, and thread bit-identity

N_LARGE = (1 << 20) + 77  # many VM blocks, both threads, a ragged tail


@pytest.mark.parametrize("name", EW_NAMES)
def test_large_float32(name):
    rng = np.random.default_rng(_seed(name, "large"))
    arrays = [a.astype(np.float32) for a in _sample_operands(name, (N_LARGE,), (N_LARGE,), rng)]
    roles = ["param"] * len(arrays)
    outs = {}
    for nt in (1, 2):
        g, out, loss, feeds, _ = _build(name, arrays, roles, np.float32, loss=True)
        prog = lc.compile(g, loss=loss, num_threads=nt)
        outs[nt] = (prog.run(feeds)["out"], prog.grad(feeds))
    y1, g1 = outs[1]
    y2, g2 = outs[2]
    want = _ref(name, arrays)
    _assert_same_values(y1, want, 2e-5, 2e-6, f"{name}: float32, {N_LARGE} elements")
    assert y1.tobytes() == y2.tobytes(), f"{name}: forward differs between 1 and 2 threads"
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes(), f"{name}: gradient {k} differs between 1 and 2 threads"


# ---------------------------------------------------------------------------------------------------
# inside a fused chain, trained one SGD step

@pytest.mark.parametrize("name", EW_NAMES)
def test_fused_chain(name):
    """loss = sum(op(x * w + b, *params) * 2 * R): the forward chain is one fused kernel, its gradient
    steps are fused into the backward kernels; one SGD step updates w and b as central differences of
    the reference chain say."""
    rng = np.random.default_rng(_seed(name, "chain"))
    op = REGISTRY[name]
    lo, hi = _domain(name)
    extra = _sample_operands(name, (2, 4), (4,), rng)[1:]
    x = rng.uniform(0.5, 1.5, (2, 4))  # x * w + b spans about the domain: w, b below
    w = rng.uniform(0.4, 0.6, (4,)) * (hi - lo) / 2
    b = np.full((4,), (lo + hi) / 2) - 0.5 * w

    def chain(ws, bs):
        return _ref(name, [x * ws + bs] + list(extra)) * 2

    R = np.random.default_rng(_seed(name, "R")).uniform(0.5, 1.5, (2, 4))

    def fd(which):
        base = [w.copy(), b.copy()]
        out = np.zeros(4)
        for i in range(4):
            vals = []
            for s in (1e-6, -1e-6):
                p = [v.copy() for v in base]
                p[which][i] += s
                vals.append(float(np.sum(chain(*p) * R)))
            out[i] = (vals[0] - vals[1]) / 2e-6
        return out

    g = lc.Graph(f"chain_{name}")
    xt = g.input("x", (2, 4), dtype="float64")
    wt, bt = g.param("w", w), g.param("b", b)
    ext = [g.const(np.asarray(e)) if op.params else g.input("e", np.shape(e), dtype="float64") for e in extra]
    y = ops.make(name, [xt * wt + bt] + ext) * 2.0
    loss = lc.sum(y * g.const(R))
    g.output("y", y)
    g.output("loss", loss)
    lr = 0.1
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=lr))
    feeds = {"x": x} | ({"e": np.asarray(extra[0])} if ext and not op.params else {})
    if name not in NOT_IN_KERNEL:
        for entry in ("run", "step"):
            kernels = [i for i in prog.instructions(entry) if i["op"] == "fused_elementwise"]
            members = [m.split(":")[0] for i in kernels for m in i["members"]]
            assert name in members, f"{name}: not inside a fused kernel of {entry}: {kernels}"
        grad_ops = {m.split(":")[0] for i in prog.instructions("step") if i["op"] == "fused_elementwise"
                    for m in i["members"]} - {name}
        assert grad_ops, f"{name}: no fused backward kernel"
    np.testing.assert_allclose(prog.run(feeds)["y"], chain(w, b), rtol=1e-10, atol=1e-12)
    gw, gb = fd(0), fd(1)
    prog.step(feeds)
    p = prog.params
    np.testing.assert_allclose(p["w"], w - lr * gw, rtol=1e-7, atol=1e-8, err_msg=f"{name}: w after one step")
    np.testing.assert_allclose(p["b"], b - lr * gb, rtol=1e-7, atol=1e-8, err_msg=f"{name}: b after one step")


# ---------------------------------------------------------------------------------------------------
# ops with attributes: one builder each

# A builder ``(rng, n)`` returns ([(array, differentiable)], attrs); ``n`` scales one dimension (n = 1:
# the small case; test_large_attr_op picks n for >= 1M elements).  Integer arrays (labels, indices) are
# consts.
ATTR_OPS = {
    "sum": lambda r, n=1: ([(r.standard_normal((3, 4 * n, 5)), True)], {"axes": (0, 2), "keepdims": False,
                                                                         "scale": 0.5}),
    "softmax": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 3, True)], {"axis": 1}),
    "matmul": lambda r, n=1: ([(r.standard_normal((2, 3 * n, 4)), True), (r.standard_normal((4, 5)), True)], {}),
    "transpose": lambda r, n=1: ([(r.standard_normal((2 * n, 3, 4)), True)], {"perm": (2, 0, 1)}),
    "cast": lambda r, n=1: ([(r.standard_normal((3 * n, 4)) * 100, False)], {"dtype": "int32"}),
    "concat": lambda r, n=1: ([(r.standard_normal((2 * n, 3)), True), (r.standard_normal((2 * n, 1)), True)],
                              {"axis": 1}),
    "slice": lambda r, n=1: ([(r.standard_normal((3 * n, 5)), True)], {"axis": 1, "start": 1, "stop": 4}),
    "gather": lambda r, n=1: ([(r.standard_normal((4, 3 * n)), True), (np.array([3, 0, 0, 2, 1]), False)],
                              {"axis": 0}),
    "softmax_xent": lambda r, n=1: ([(r.standard_normal((4 * n, 3)) * 2, True), (np.arange(4 * n) % 3, False)],
                                    {}),
    # the reduction kernels (ops_reduce.py): distinct values keep max/min/finite differences off ties
    "reduce_max": lambda r, n=1: ([(r.permutation(60 * n).reshape(3, 4 * n, 5) * 0.1, True)],
                                  {"axes": (1, 2), "keepdims": False}),
    "reduce_min": lambda r, n=1: ([(r.permutation(60 * n).reshape(3 * n, 4, 5) * 0.1, True)],
                                  {"axes": (0,), "keepdims": True}),
    "reduce_prod": lambda r, n=1: ([(r.uniform(0.5, 1.5, (3, 4, 5 * n)), True)], {"axes": (1,), "keepdims": False}),
    "logsumexp": lambda r, n=1: ([(r.standard_normal((3, 4 * n, 5)) * 3, True)], {"axes": (1, 2), "keepdims": True}),
    "argmax": lambda r, n=1: ([(r.standard_normal((3, 4 * n, 5)), False)], {"axis": 1, "keepdims": False,
                                                                           "select_last": False}),
    "argmin": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)), False)], {"axis": 2, "keepdims": True,
                                                                           "select_last": True}),
    "log_softmax": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 3, True)], {"axis": 1}),
    # normalisation (ops_norm.py): three outputs (y, mean, rstd), all compared by test_forward_attr_op
    "layer_norm": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 2 + 1, True), (r.standard_normal((4, 5)), True),
                                   (r.standard_normal((4, 5)), True)], {"axis": 1, "eps": 1e-5}),
    "rms_norm": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 2 + 1, True), (r.standard_normal((4, 5)), True)],
                                {"axis": 1, "eps": 1e-5}),
    # convolution (ops_conv.py): grouped, strided, dilated, asymmetric pads, with bias; n widens the image
    "conv": lambda r, n=1: ([(r.standard_normal((2, 4, 7, 6 * n)), True), (r.standard_normal((6, 2, 3, 2)), True),
                             (r.standard_normal(6), True)],
                            {"strides": (2, 1), "pads": (1, 0, 1, 1), "dilations": (1, 2), "group": 2, "act": None}),
    # transposed convolution (ops_conv_transpose.py): grouped, strided, dilated, a begin pad and an output
    # padding (the conv view's end pad -1) along W; n widens the image
    "conv_transpose": lambda r, n=1: ([(r.standard_normal((2, 4, 5, 3 * n)), True),
                                       (r.standard_normal((4, 3, 3, 2)), True)],
                                      {"strides": (2, 1), "pads": (1, 0, 0, -1), "dilations": (1, 2), "group": 2}),
    # pooling (ops_pool.py): max_pool's two outputs (y, indices) are both compared; distinct values (no ties)
    "max_pool": lambda r, n=1: ([(r.permutation(2 * 3 * 7 * 6 * n).reshape(2, 3, 7, 6 * n) * 0.01, True)],
                                {"kernel": (3, 2), "strides": (2, 1), "pads": (1, 0, 1, 1), "dilations": (1, 2),
                                 "ceil_mode": True, "storage_order": 0}),
    "avg_pool": lambda r, n=1: ([(r.standard_normal((2, 3, 7, 6 * n)), True)],
                                {"kernel": (3, 2), "strides": (2, 1), "pads": (1, 0, 1, 1), "dilations": (1, 1),
                                 "ceil_mode": True, "count_include_pad": True}),
    # resize (ops_resize.py): bicubic (4 x 4 taps, edge taps clamped) up one axis, down the other, by
    # non-integer scales; n widens the image
    "resize": lambda r, n=1: ([(r.standard_normal((2, 3, 7, 6 * n)), True)],
                              {"sizes": (2, 3, 4, 9 * n), "scales": (1.0, 1.0, 4 / 7, 1.5), "roi": ((0.0, 1.0),) * 4,
                               "extrapolation": 0.0, "mode": "cubic", "coord": "half_pixel",
                               "nearest_mode": "round_prefer_floor", "cubic_a": -0.75, "exclude_outside": False,
                               "antialias": False}),
    # masked softmax (ops_attention.py): an additive mask broadcast over the middle axis, as BERT's (B, 1, 1, S)
    "softmax_masked": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 3, True),
                                       (r.standard_normal((3 * n, 1, 5)) * 2, True)], {"mode": "add", "fill": 0.0}),
    # batch normalisation in training mode (ops_batchnorm.py): five outputs (y, mean, rstd, new running stats)
    "batch_norm": lambda r, n=1: ([(r.standard_normal((3 * n, 4, 5)) * 2 + 1, True), (r.standard_normal(4), True),
                                   (r.standard_normal(4), True), (r.standard_normal(4), False),
                                   (r.uniform(0.5, 2.0, 4), False)],
                                  {"eps": 1e-5, "momentum": 0.1, "unbiased": True, "relu": False}),
}


def _attr_case(name, dtype, roles_float, n=1):
    rng = np.random.default_rng(_seed(name, "attr"))
    spec, attrs = ATTR_OPS[name](rng, n)
    g = lc.Graph(f"a_{name}")
    ts, feeds, arrays = [], {}, []
    for k, (a, diff) in enumerate(spec):
        if a.dtype.kind == "f":
            a = a.astype(dtype)
            ts.append(g.param(f"p{k}", a) if roles_float == "param" else g.input(f"in{k}", a.shape,
                                                                                  dtype=np.dtype(dtype).name))
            if roles_float != "param":
                feeds[f"in{k}"] = a
        else:
            ts.append(g.const(a))
        arrays.append(a)
    outs = ops.make(name, ts, attrs)
    outs = outs if isinstance(outs, tuple) else (outs,)  # a node with several outputs: all are checked
    for k, o in enumerate(outs):
        g.output("out" if k == 0 else f"out{k}", o)
    return g, outs[0], feeds, arrays, [d for _, d in spec], attrs


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(ATTR_OPS))
def test_forward_attr_op(name, dtype):
    g, out, feeds, arrays, _, attrs = _attr_case(name, dtype, "input")
    res = lc.compile(g).run(feeds)
    rtol, atol = TOL[dtype]
    for k, want in enumerate(_ref(name, arrays, attrs, all_outputs=True)):
        got = res["out" if k == 0 else f"out{k}"]
        _assert_same_values(got, want.astype(got.dtype) if want.dtype != got.dtype and got.dtype.kind == "i"
                            else want, rtol * 10, atol * 10, f"{name} forward, output {k}")


@pytest.mark.parametrize("name", sorted(n for n in ATTR_OPS if any(d for _, d in ATTR_OPS[n](
    np.random.default_rng(0))[0])))
def test_grad_fd_attr_op(name):
    g, out, feeds, arrays, diff, attrs = _attr_case(name, np.float64, "param")
    R = np.random.default_rng(_seed(name, "R")).uniform(0.5, 1.5, out.shape)
    loss = lc.sum(out * g.const(R))
    g.output("loss", loss)
    grads = lc.compile(g, loss=loss).grad(feeds)
    for k, a in enumerate(arrays):
        if not diff[k]:
            continue
        fd = np.zeros(a.shape)
        for i in np.ndindex(a.shape):
            vals = []
            for s in (1e-6, -1e-6):
                b = [x.copy() for x in arrays]
                b[k][i] += s
                vals.append(float(np.sum(_ref(name, b, attrs) * R)))
            fd[i] = (vals[0] - vals[1]) / 2e-6
        np.testing.assert_allclose(grads[f"p{k}"], fd, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name}: d loss / d operand {k} against central differences")


# ---------------------------------------------------------------------------------------------------
# the ONNX mapping each op declares

@pytest.mark.parametrize("name", sorted(n for n in EW if REGISTRY[n].onnx))
def test_onnx_mapping_names_a_real_operator(name):
    """``OpDef.onnx`` = (op type, {attribute: param name or literal value}): the op type exists, its
    attributes are the schema's, and the operands that are not attributes fit the schema's inputs."""
    onnx_defs = pytest.importorskip("onnx.defs")
    op_type, attrs, *select = REGISTRY[name].onnx  # select: {attribute: value} picking this op (Gelu)
    assert onnx_defs.has(op_type), f"{name}: ONNX has no operator {op_type!r}"
    schema = onnx_defs.get_schema(op_type)
    # an attribute may exist in an older version only (Clip's min/max attributes before opset 11)
    known = set()
    for v in range(1, schema.since_version + 1):
        try:
            known |= set(onnx_defs.get_schema(op_type, v).attributes)
        except Exception:  # noqa: BLE001 - no version of the op at or below v
            pass
    unknown = sorted((set(attrs) | set(*select)) - known)
    assert not unknown, f"{name}: {op_type} has no attributes {unknown} in any version (it has {sorted(known)})"
    pnames = [p for p, _ in REGISTRY[name].params]
    as_attr = [v for v in attrs.values() if v in pnames]
    n_operands = EW[name] - len(as_attr)
    variadic = any(i.option == onnx_defs.OpSchema.FormalParameterOption.Variadic for i in schema.inputs)
    assert schema.min_input <= n_operands and (variadic or n_operands <= schema.max_input), \
        f"{name}: {n_operands} operands, {op_type} takes {schema.min_input}..{schema.max_input} inputs"


@pytest.mark.parametrize("name", sorted(ATTR_OPS))
def test_large_attr_op(name):
    """float32 with >= 1M elements in the largest operand against the reference; forward and gradient
    bit-identical for 1 and 2 threads (reductions use a fixed chunk count)."""
    small = max(a.size for a, _ in ATTR_OPS[name](np.random.default_rng(0))[0])
    n = -(-N_LARGE // small)
    res = {}
    for nt in (1, 2):
        g, out, feeds, arrays, diff, attrs = _attr_case(name, np.float32, "param", n)
        loss = None
        if any(diff):
            R = np.random.default_rng(_seed(name, "R")).uniform(0.5, 1.5, out.shape).astype(np.float32)
            loss = lc.sum(out * g.const(R))
            g.output("loss", loss)
        prog = lc.compile(g, loss=loss, num_threads=nt)
        res[nt] = (prog.run(feeds)["out"], prog.grad(feeds) if loss is not None else {})
    want = _ref(name, arrays, attrs)
    got = res[1][0]
    assert max(a.size for a in arrays) >= N_LARGE
    # sums of ~1M terms: a float32 pairwise/chunked sum differs from NumPy's by ~1e-6 relative
    _assert_same_values(got, want.astype(got.dtype), 1e-4, 1e-4, f"{name}: float32 at n={n}")
    assert res[1][0].tobytes() == res[2][0].tobytes(), f"{name}: forward differs between 1 and 2 threads"
    for k in res[1][1]:
        assert res[1][1][k].tobytes() == res[2][1][k].tobytes(), f"{name}: gradient {k} differs between threads"
