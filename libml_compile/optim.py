"""Optimizers as graph ops.

``SGD``/``Adam`` add one update node to the training graph that reads every trainable param and its
gradient; the runtime applies it as a single fused pass over all parameters (one instruction).  The update
node has a dummy scalar result: it exists for its side effect on the params and the optimizer state
(momentum / Adam moments / step count), which the lowering places in the persistent state buffer.
Formulas follow PyTorch's ``torch.optim.SGD`` (dampening 0, no Nesterov) and ``torch.optim.AdamW``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ops import OpDef, make, register


def _s_update(inp, attrs):
    return (), inp[0].dtype


register(OpDef("sgd_update", "opt", _s_update, None, None,
               doc="v = momentum*v + (g + wd*p); p -= lr*v  (for every param)"))
register(OpDef("sgd_gemm", "opt", _s_update, None, None,
               doc="p = (1 - lr*wd) p - lr * op(a) @ op(b): plain SGD folded into the weight-gradient GEMM "
                   "(BLAS alpha = -lr, beta = 1 - lr*wd), so no gradient buffer exists; made by "
                   "passes.fold_sgd_into_gemm. attrs['after']: the other readers of p, scheduled first"))
register(OpDef("momentum_gemm", "opt", _s_update, None, None,
               doc="v = momentum * v + op(a) @ op(b): the momentum buffer accumulates the weight-gradient GEMM "
                   "(BLAS alpha = 1, beta = momentum), so no gradient buffer exists; made by "
                   "passes.fold_sgd_into_gemm; the sgd_update then reads v for that param (its g is this node)"))
register(OpDef("adam_update", "opt", _s_update, None, None,
               doc="AdamW: p *= 1 - lr*wd; m,v moments; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). "
                   "attrs['counted']: the step counter was already advanced by this step's adam_count "
                   "(passes.split_adam), so this update only reads it"))
register(OpDef("adam_count", "opt", lambda inp, attrs: ((), attrs["dtype"]), None, None,
               doc="advances Adam's step counter once per step, before any counted adam_update runs; "
                   "made by passes.split_adam (no inputs: it is scheduled before its readers only)"))


@dataclass
class SGD:
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"SGD: need lr > 0, momentum >= 0, weight_decay >= 0 (got {self})")

    def update_node(self, params, grads):
        attrs = {"lr": float(self.lr), "momentum": float(self.momentum), "weight_decay": float(self.weight_decay)}
        return make("sgd_update", tuple(params) + tuple(grads), attrs)

    def state_slots(self):
        """Per-param state buffers, in order (each the param's shape)."""
        return ("momentum",) if self.momentum else ()


@dataclass
class Adam:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        b1, b2 = self.betas
        if not self.lr > 0 or not (0 <= b1 < 1 and 0 <= b2 < 1) or not self.eps > 0 or self.weight_decay < 0:
            raise ValueError(f"Adam: invalid hyper-parameters {self}")

    def update_node(self, params, grads):
        attrs = {"lr": float(self.lr), "beta1": float(self.betas[0]), "beta2": float(self.betas[1]),
                 "eps": float(self.eps), "weight_decay": float(self.weight_decay)}
        return make("adam_update", tuple(params) + tuple(grads), attrs)

    def state_slots(self):
        return ("exp_avg", "exp_avg_sq")
