"""libml_compile: declare a static graph, derive its backward graph, compile it for the libml runtime.

Data path: ``ir`` (Graph, Tensor) → ``ops`` (registry: shape rules, gradient rules, kernel bindings)
→ ``autodiff`` → ``optim`` → ``passes`` (simplify, fuse, schedule) → ``lower`` (per-entry planning:
scheduled instructions with their storage, via ``memory``: liveness, in-place reuse, arena placement)
→ ``backend_cpu`` (the runtime's plan entries: int64 code, constant pool) → ``libml_runtime`` (execution).
"""
from .ir import Graph, Tensor
from .ops import (add, sub, mul, div, matmul, relu, sigmoid, softmax, sum, mean, neg, exp, log, identity,
                  reshape, transpose, broadcast_to, cast, softmax_cross_entropy, mse, concat, gather,
                  DoubleSoftmaxWarning)
from .ops_ew import EXPORTS as _EW_EXPORTS, PUBLIC as _EW_PUBLIC
from .ops_reduce import EXPORTS as _RED_EXPORTS, PUBLIC as _RED_PUBLIC
from .ops_logic import EXPORTS as _LOGIC_EXPORTS, PUBLIC as _LOGIC_PUBLIC
from .ops_norm import EXPORTS as _NORM_EXPORTS, PUBLIC as _NORM_PUBLIC
from .ops_dropout import EXPORTS as _DROPOUT_EXPORTS, PUBLIC as _DROPOUT_PUBLIC
from .ops_batchnorm import EXPORTS as _BN_EXPORTS, PUBLIC as _BN_PUBLIC
from .ops_index import EXPORTS as _INDEX_EXPORTS, PUBLIC as _INDEX_PUBLIC
from .ops_conv import EXPORTS as _CONV_EXPORTS, PUBLIC as _CONV_PUBLIC
from .ops_pool import EXPORTS as _POOL_EXPORTS, PUBLIC as _POOL_PUBLIC
from .ops_conv_transpose import EXPORTS as _CONVT_EXPORTS, PUBLIC as _CONVT_PUBLIC
from .ops_resize import EXPORTS as _RESIZE_EXPORTS, PUBLIC as _RESIZE_PUBLIC
from .optim import SGD, Adam
from .program import Program, compile

__version__ = "0.1.0"

__all__ = ["Graph", "Tensor", "add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "softmax", "sum",
           "mean", "neg", "exp", "log", "identity", "reshape", "transpose", "broadcast_to", "cast",
           "softmax_cross_entropy", "mse", "concat", "gather", "DoubleSoftmaxWarning",
           "SGD", "Adam", "Program", "compile"] + _EW_EXPORTS + _RED_EXPORTS + _LOGIC_EXPORTS \
    + _NORM_EXPORTS + _DROPOUT_EXPORTS + _INDEX_EXPORTS + _CONV_EXPORTS + _POOL_EXPORTS + _BN_EXPORTS \
    + _CONVT_EXPORTS + _RESIZE_EXPORTS

# the elementwise family's user functions (lc.tanh, lc.gelu, lc.leaky_relu, ...): declared with their ops
globals().update({k: _EW_PUBLIC[k] for k in _EW_EXPORTS})
# the reduction family's (lc.max, lc.argmax, lc.log_softmax, lc.logsumexp, lc.l2_norm, ...): ops_reduce.py
globals().update({k: _RED_PUBLIC[k] for k in _RED_EXPORTS})
# the comparison / logic family (lc.equal, lc.less, ..., lc.logical_and, lc.where, lc.isnan, lc.mod)
globals().update({k: _LOGIC_PUBLIC[k] for k in _LOGIC_EXPORTS})
# normalisation layers (lc.layer_norm): ops_norm.py
globals().update({k: _NORM_PUBLIC[k] for k in _NORM_EXPORTS})
# dropout in training mode (lc.dropout; run is eval mode): ops_dropout.py
globals().update({k: _DROPOUT_PUBLIC[k] for k in _DROPOUT_EXPORTS})
# batch normalisation, training and eval mode, running statistics as buffers (lc.batch_norm): ops_batchnorm.py
globals().update({k: _BN_PUBLIC[k] for k in _BN_EXPORTS})
# indexing of real exports (lc.gather_elements, gather_nd, scatter_elements, scatter_nd, depth_to_space,
# space_to_depth): ops_index.py
globals().update({k: _INDEX_PUBLIC[k] for k in _INDEX_EXPORTS})
# convolution (lc.conv, 1-D and 2-D): ops_conv.py
globals().update({k: _CONV_PUBLIC[k] for k in _CONV_EXPORTS})
# pooling (lc.max_pool with its indices, lc.avg_pool): ops_pool.py
globals().update({k: _POOL_PUBLIC[k] for k in _POOL_EXPORTS})
# transposed convolution (lc.conv_transpose: conv's input-gradient kernel): ops_conv_transpose.py
globals().update({k: _CONVT_PUBLIC[k] for k in _CONVT_EXPORTS})
# resize (lc.resize: ONNX Resize / Upsample, F.interpolate's nearest, linear, bilinear, bicubic): ops_resize.py
globals().update({k: _RESIZE_PUBLIC[k] for k in _RESIZE_EXPORTS})


def __getattr__(name):
    # ONNX support is optional at import time (keeps `import libml_compile` light)
    if name in ("import_onnx", "UnsupportedOperatorError"):
        from . import onnx_import
        return getattr(onnx_import, name)
    if name == "export_onnx":
        from .onnx_export import export_onnx
        return export_onnx
    raise AttributeError(f"module 'libml_compile' has no attribute {name!r}")
