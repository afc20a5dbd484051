"""Optimizers as graph ops.

``SGD``/``Adam`` add one update node to the training graph that reads every trainable param and its
gradient; the runtime applies it as a single fused pass over all parameters (one instruction).  The update
node has a dummy scalar result: it exists for its side effect on the params and the optimizer state
(momentum / Adam moments / step count), which the lowering places in the persistent state buffer.
Formulas follow PyTorch's ``torch.optim.SGD`` (dampening 0, no Nesterov) and ``torch.optim.AdamW``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ops import OpDef, make, register


def _s_update(inp, attrs):
    return (), inp[0].dtype


register(OpDef("sgd_update", "opt", _s_update, None, None,
               doc="v = momentum*v + (g + wd*p); p -= lr*v  (for every param)"))
register(OpDef("sgd_gemm", "opt", _s_update, None, None,
               doc="p = (1 - lr*wd) p - lr * op(a) @ op(b): plain SGD folded into the weight-gradient GEMM "
                   "(BLAS alpha = -lr, beta = 1 - lr*wd), so no gradient buffer exists; made by "
                   "passes.fold_sgd_into_gemm; passes.order_inplace_writers schedules every other reader of p before it"))
register(OpDef("momentum_gemm", "opt", _s_update, None, None,
               doc="v = momentum * v + op(a) @ op(b): the momentum buffer accumulates the weight-gradient GEMM "
                   "(BLAS alpha = 1, beta = momentum), so no gradient buffer exists; made by "
                   "passes.fold_sgd_into_gemm; the sgd_update then reads v for that param (its g is this node)"))
register(OpDef("sgd_scatter", "opt", _s_update, None, None,
               doc="p[.., idx[j], ..] -= lr * g[.., j, ..]: plain SGD (no momentum, no weight decay) of a table "
                   "read by a gather (an embedding), applied to the rows it read only, in index order: no dense "
                   "gradient of the table exists; made by passes.fold_sgd_into_gemm when the indices are few"))
register(OpDef("adam_update", "opt", _s_update, None, None,
               doc="AdamW: p *= 1 - lr*wd; m,v moments; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). "
                   "attrs['counted']: the step counter was already advanced by this step's adam_count "
                   "(passes.split_adam), so this update only reads it"))
register(OpDef("adam_count", "opt", lambda inp, attrs: ((), attrs["dtype"]), None, None,
               doc="advances Adam's step counter once per step, before any counted adam_update runs; "
                   "made by passes.split_adam (no inputs: it is scheduled before its readers only)"))


def _real(owner, field, v, lo, hi, lo_open=False, hi_open=False):
    """``v`` as a finite float in the interval [lo, hi] (open ends as flagged); TypeError for str, complex,
    bool and other non-real values, ValueError (naming the optimizer and field) for NaN, Inf or out of range."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: {field} must be a real number, got {type(v).__name__} {v!r}"[:300])
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{owner}: {field} = {v!r} is not a finite number") from None
    if not math.isfinite(f):
        raise ValueError(f"{owner}: {field} = {v!r} is not a finite number")
    if f < lo or f > hi or (lo_open and f == lo) or (hi_open and f == hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{owner}: {field} = {v!r} is outside {rng}")
    return f


class _Validated:
    """Hyper-parameters are checked on every assignment (construction and later ``opt.lr = x``), so a
    NaN/Inf or out-of-range value never reaches a plan.  Subclasses list ``_checks``: field -> validator."""

    _checks: dict = {}

    def __setattr__(self, k, v):
        check = type(self)._checks.get(k)
        super().__setattr__(k, check(self, v) if check else v)


def _betas(self, v):
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise TypeError(f"Adam: betas must be a pair (beta1, beta2), got {v!r}"[:300])
    return tuple(_real("Adam", f"betas[{i}]", b, 0.0, 1.0, hi_open=True) for i, b in enumerate(v))


@dataclass
class SGD(_Validated):
    """SGD with optional momentum and (coupled) weight decay; lr > 0, momentum >= 0, weight_decay >= 0 (finite)."""
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0

    _checks = {
        "lr": lambda self, v: _real("SGD", "lr", v, 0.0, math.inf, lo_open=True, hi_open=True),
        # PyTorch's ranges: momentum >= 0 (values >= 1 diverge but are not refused there either)
        "momentum": lambda self, v: _real("SGD", "momentum", v, 0.0, math.inf, hi_open=True),
        "weight_decay": lambda self, v: _real("SGD", "weight_decay", v, 0.0, math.inf, hi_open=True),
    }

    def update_node(self, params, grads):
        attrs = {"lr": float(self.lr), "momentum": float(self.momentum), "weight_decay": float(self.weight_decay)}
        return make("sgd_update", tuple(params) + tuple(grads), attrs)

    def state_slots(self):
        """Per-param state buffers, in order (each the param's shape)."""
        return ("momentum",) if self.momentum else ()


@dataclass
class Adam(_Validated):
    """AdamW; lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0."""
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    _checks = {
        "lr": lambda self, v: _real("Adam", "lr", v, 0.0, math.inf, lo_open=True, hi_open=True),
        "betas": _betas,
        "eps": lambda self, v: _real("Adam", "eps", v, 0.0, math.inf, lo_open=True, hi_open=True),
        "weight_decay": lambda self, v: _real("Adam", "weight_decay", v, 0.0, math.inf, hi_open=True),
    }

    def update_node(self, params, grads):
        attrs = {"lr": float(self.lr), "beta1": float(self.betas[0]), "beta2": float(self.betas[1]),
                 "eps": float(self.eps), "weight_decay": float(self.weight_decay)}
        return make("adam_update", tuple(params) + tuple(grads), attrs)

    def state_slots(self):
        return ("exp_avg", "exp_avg_sq")
