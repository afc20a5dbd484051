"""The IR: a graph of statically shaped, typed tensors.

Every node is a tensor (``Tensor.op`` names its registry entry in ``ops.py``; leaves are ``input``,
``param`` and ``const``).  A node with several outputs is its output 0; each further output k is an
``output`` node reading it (attrs ``{"index": k}``), as XLA's get-tuple-element or FX's getitem: passes see
ordinary tensors, the node's instruction writes all of them.  Nodes are appended in construction order, so
``Graph.nodes`` is always a valid topological order.  Shapes and dtypes are inferred when a node is
declared, by the op's shape rule, so a mismatch raises there, naming the op and the shapes.
"""
from __future__ import annotations

import itertools
import math
import operator

import numpy as np

FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)

#: longest user-chosen name (plan and checkpoint files store names of up to planfile.MAX_NAME characters;
#: derived names such as ``f"{param}/exp_avg_sq"`` add a few characters to a user's name)
MAX_NAME = 4096
#: optimizer state is stored next to the params under ``f"{param}/{slot}"`` and ``"adam/step"``
#: (backend_cpu.py), and dropout's step counter under ``"dropout/step"`` (ops_dropout.py), so a param named
#: like one of these would collide with that state
RESERVED_SUFFIXES = ("/momentum", "/exp_avg", "/exp_avg_sq")
RESERVED_NAMES = ("adam/step", "dropout/step")
#: the plan validator's bound on a tensor's element count (plan.py: every size is < 2**40)
MAX_ELEMENTS = 2 ** 40


def as_int(v, what):
    """``v`` as a Python int if it is an integer (int or NumPy integer, not bool); TypeError naming
    ``what`` and the value otherwise (never truncates 2.5 or parses "4")."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{what}: expected an integer, got the bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what}: expected an integer, got {type(v).__name__} {v!r}") from None


def native_array(value, dtype=None):
    """A C-contiguous copy of ``value`` in the machine's byte order (``>f4`` becomes ``float32``).

    Every user array enters libml through this (params, consts), so the runtime, which reads raw bytes,
    never sees a big-endian, strided or subclassed array."""
    arr = np.array(value, dtype=dtype, copy=True)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.array(arr, order="C", copy=None, subok=False)  # (ascontiguousarray would make 0-d 1-d)


def canonical_dtype(dtype) -> str:
    """Normalise a dtype spec (str, numpy dtype, type) to its numpy name; TypeError if unsupported."""
    try:
        name = np.dtype(dtype).name
    except TypeError as e:
        raise TypeError(f"unsupported dtype {dtype!r}") from e
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return name


class Tensor:
    """A symbolic tensor: the output of one node.

    Invariants: ``shape`` is a tuple of non-negative ints, ``dtype`` a name in ``DTYPES``; ``inputs`` are
    tensors of the same graph declared earlier; ``attrs`` is a dict of hashable values.
    """

    __slots__ = ("graph", "op", "inputs", "attrs", "shape", "dtype", "name", "id", "value", "auto_name",
                 "__weakref__")

    def __init__(self, graph, op, inputs, attrs, shape, dtype, name=None, value=None):
        self.graph = graph
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        # numbered per graph, not per process: auto names (and so plan files) must not depend on what
        # else the process built before (the same graph compiled twice gives identical plan bytes)
        self.id = next(graph._ids)
        # auto names yield to user names: Graph._add / _check_new_name rename an auto-named tensor
        # rather than reject a user's name, so no name is ever refused because of one
        self.auto_name = not name
        self.name = name or f"{op}_{self.id}"
        self.value = value  # ndarray for param (initial value) and const nodes

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)  # (np.prod was a fifth of lc.compile on 20k-op graphs)

    def __repr__(self):
        return f"Tensor({self.name!r}, op={self.op}, shape={self.shape}, dtype={self.dtype})"

    # Arithmetic sugar: the functions live in ops.py (imported lazily to keep the module graph acyclic).
    def __add__(self, o): return _ops().add(self, o)
    def __radd__(self, o): return _ops().add(o, self)
    def __sub__(self, o): return _ops().sub(self, o)
    def __rsub__(self, o): return _ops().sub(o, self)
    def __mul__(self, o): return _ops().mul(self, o)
    def __rmul__(self, o): return _ops().mul(o, self)
    def __truediv__(self, o): return _ops().div(self, o)
    def __rtruediv__(self, o): return _ops().div(o, self)
    def __matmul__(self, o): return _ops().matmul(self, o)
    def __rmatmul__(self, o): return _ops().matmul(o, self)
    def __neg__(self): return _ops().neg(self)
    # comparisons build graph nodes (bool tensors).  ``==`` / ``!=`` are NOT overloaded: tensors are dict
    # keys and set members throughout the compiler, so equality stays identity; use lc.equal.
    def __lt__(self, o): return _logic().PUBLIC["less"](self, o)
    def __le__(self, o): return _logic().PUBLIC["less_equal"](self, o)
    def __gt__(self, o): return _logic().PUBLIC["greater"](self, o)
    def __ge__(self, o): return _logic().PUBLIC["greater_equal"](self, o)

    def __getitem__(self, key): return _ops().getitem(self, key)

    @property
    def T(self):
        return _ops().transpose(self)

    __hash__ = object.__hash__


def _ops():
    from . import ops
    return ops


def _logic():
    from . import ops_logic
    return ops_logic


class Graph:
    """A static dataflow graph.

    ``nodes`` is in topological order; ``inputs``/``params``/``outputs`` map user-facing names to tensors.
    ``meta`` is free for frontends (the ONNX importer keeps its ModelProto there).
    """

    def __init__(self, name="graph"):
        _check_name(name, "graph name", allow_empty=True)
        self.name = name
        self.nodes: list[Tensor] = []
        self.inputs: dict[str, Tensor] = {}
        self.params: dict[str, Tensor] = {}
        # non-trainable persistent state (BatchNorm's running statistics: ops_batchnorm.py), PyTorch's buffers
        self.buffers: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.meta: dict = {}
        self._by_name: dict[str, Tensor] = {}
        self._ids = itertools.count()
        self._outputs: dict[tuple, Tensor] = {}  # (node, k) -> its ``output`` projection (ops.output)

    # -- leaves ------------------------------------------------------------------------------------
    def input(self, name, shape, dtype="float32"):
        """Declare a fed input of static ``shape``; fed arrays must match shape and dtype exactly."""
        self._check_new_name(name)
        shape = _check_shape(shape, f"input {name!r}")
        dt = canonical_dtype(dtype)
        _check_leaf_size(shape, dt, f"input {name!r}")
        t = Tensor(self, "input", (), {}, shape, dt, name)
        self.inputs[name] = t
        return self._add(t)

    def param(self, name, value, dtype=None):
        """Declare a parameter with initial ``value`` (copied); floating dtypes only.

        Names ending in /momentum, /exp_avg, /exp_avg_sq and the names adam/step and dropout/step are
        reserved for the optimizer state (and dropout's step counter) stored next to the params."""
        self._check_new_name(name)
        if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
            raise ValueError(f"param {name!r}: names ending in {', '.join(RESERVED_SUFFIXES)} and the names "
                             f"{', '.join(map(repr, RESERVED_NAMES))} are reserved for optimizer state (and "
                             f"dropout's step counter); rename the param")
        arr = native_array(value, dtype)
        dt = canonical_dtype(arr.dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"param {name!r}: dtype {dt} is not trainable; use float32 or float64 "
                            f"(or g.const for integer data)")
        _check_leaf_size(arr.shape, dt, f"param {name!r}")
        t = Tensor(self, "param", (), {}, arr.shape, dt, name, value=arr)
        self.params[name] = t
        return self._add(t)

    def buffer(self, name, value, dtype=None):
        """Declare a buffer: persistent, non-trainable state with initial ``value`` (copied; floating dtypes),
        PyTorch's ``register_buffer``.  A buffer is never a param: no gradient, never touched by the optimizer
        or ``set_params``; it lives next to the optimizer state (``state_dict``, plan files and checkpoints
        carry it; ``prog.buffers`` reads it).  The ops that own it update it (a training-mode batch_norm its
        running statistics, ops_batchnorm.py); everywhere else it reads as a constant of its current value.
        Names follow the params' rules (the optimizer-state names are reserved)."""
        self._check_new_name(name)
        if name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES):
            raise ValueError(f"buffer {name!r}: names ending in {', '.join(RESERVED_SUFFIXES)} and the names "
                             f"{', '.join(map(repr, RESERVED_NAMES))} are reserved for optimizer state; rename it")
        arr = native_array(value, dtype)
        dt = canonical_dtype(arr.dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"buffer {name!r}: dtype {dt} is not supported; use float32 or float64")
        _check_leaf_size(arr.shape, dt, f"buffer {name!r}")
        t = Tensor(self, "buffer", (), {}, arr.shape, dt, name, value=arr)
        self.buffers[name] = t
        return self._add(t)

    def const(self, value, name=None, dtype=None):
        """A constant tensor (not trainable). Python scalars default to float32."""
        arr = native_array(value, dtype)
        if arr.dtype == np.float64 and dtype is None and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)
        if name is not None:
            self._check_new_name(name)
        arr.flags.writeable = False
        dt = canonical_dtype(arr.dtype)
        _check_leaf_size(arr.shape, dt, f"const {name!r}" if name else "const")
        t = Tensor(self, "const", (), {}, arr.shape, dt, name, value=arr)
        return self._add(t)

    def output(self, name, tensor):
        """Mark ``tensor`` as a graph output under ``name``."""
        _check_name(name, "output name")
        if not isinstance(tensor, Tensor) or tensor.graph is not self:
            raise ValueError(f"output {name!r}: expected a tensor of graph {self.name!r}, got {tensor!r}")
        if name in self.outputs:
            raise ValueError(f"output {name!r} is already declared")
        self.outputs[name] = tensor
        return tensor

    def tensor(self, name):
        """Look a tensor up by name (ONNX names after import); KeyError-free: ValueError naming it."""
        t = self._by_name.get(name)
        if t is None:
            raise ValueError(f"graph {self.name!r} has no tensor named {name!r}")
        return t

    # -- internals ---------------------------------------------------------------------------------
    def _check_new_name(self, name):
        """A user-chosen name must be a non-empty UTF-8-encodable string of at most MAX_NAME characters
        (what plan and checkpoint files can store) not used by another user-named tensor.  An auto-named
        tensor holding it is renamed (auto names only label nodes in plans and profiles)."""
        _check_name(name, "names")
        old = self._by_name.get(name)
        if old is not None:
            if not old.auto_name:
                raise ValueError(f"graph {self.name!r} already has a tensor named {name!r}")
            old.name = self._fresh_name(old.op, old.id)  # (name itself is still taken: never returned)
            del self._by_name[name]
            self._by_name[old.name] = old

    def _fresh_name(self, op, ident):
        """An auto name not used in the graph: f"{op}_{ident}", with a counter appended if needed."""
        name, k = f"{op}_{ident}", 0
        while name in self._by_name:
            k += 1
            name = f"{op}_{ident}_{k}"
        return name

    def _add(self, t):
        if t.name in self._by_name and self._by_name[t.name] is not t:
            if not t.auto_name:
                raise ValueError(f"graph {self.name!r} already has a tensor named {t.name!r}")
            t.name = self._fresh_name(t.op, t.id)
        _check_size(t.shape, t.dtype, f"{t.op} {t.name!r}")
        if t.op == "output":
            self._outputs.setdefault((t.inputs[0], t.attrs["index"]), t)
        self.nodes.append(t)
        self._by_name[t.name] = t
        return t

    def __repr__(self):
        return (f"Graph({self.name!r}, {len(self.nodes)} nodes, inputs={list(self.inputs)}, "
                f"params={list(self.params)}, outputs={list(self.outputs)})")


def _check_name(name, what, allow_empty=False):
    """Names are stored in plan and checkpoint files: non-empty (graph names may be empty) strings of at
    most MAX_NAME characters that encode as UTF-8."""
    if not isinstance(name, str) or not (name or allow_empty):
        raise ValueError(f"{what} must be {'' if allow_empty else 'non-empty '}strings, got {name!r}"[:300])
    if len(name) > MAX_NAME:
        raise ValueError(f"{what}: {name[:40]!r}... is {len(name)} characters long; at most {MAX_NAME} "
                         f"are allowed")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what}: {name!r} is not valid Unicode text (lone surrogate)") from None


def _check_shape(shape, what):
    """A user-given shape as a tuple of non-negative Python ints (TypeError for non-integers)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{what}: shape must be a tuple of ints, got {shape!r}")
    shape = tuple(as_int(d, f"{what}: dimension {i} of shape {shape!r}") for i, d in enumerate(shape))
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {shape}")
    return shape


def _check_size(shape, dtype, what):
    """Refuse tensors the plan validator would refuse (>= 2**40 elements), naming the byte count."""
    n = 1
    for d in shape:
        n *= int(d)
    if n >= MAX_ELEMENTS:
        raise ValueError(f"{what}: shape {tuple(shape)} has {n} elements ({n * np.dtype(dtype).itemsize} "
                         f"bytes); libml tensors hold fewer than 2**40 elements")


def _check_leaf_size(shape, dtype, what):
    """Inputs, params and consts are refused at declaration when the plan validator would refuse them."""
    _check_size(shape, dtype, what)


def dense_strides(shape):
    """Row-major element strides of a dense array of ``shape`` (a tuple)."""
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return tuple(reversed(st))


def broadcast_shapes(op, *shapes):
    """NumPy broadcasting of ``shapes``; ValueError naming ``op`` and every shape on mismatch."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ValueError(f"{op}: shapes {' and '.join(str(tuple(s)) for s in shapes)} "
                             f"do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def clone_graph(g: Graph, name=None, rewrite=None):
    """Copy ``g`` node by node (same names, shared leaf values). Returns (copy, {old: new}).

    ``rewrite(t, m)``: called for each computing node before it is copied, with the map of the nodes
    copied so far; a tensor it returns (built in the copy from ``m``'s values, same shape and dtype)
    stands for ``t`` in the copy, under ``t``'s name (``patterns.recognize``: fused forms of op chains)."""
    out = Graph(name or g.name)
    out.meta = g.meta
    m: dict[Tensor, Tensor] = {}
    for t in g.nodes:
        r = rewrite(t, m) if rewrite is not None and t.inputs else None
        if r is not None:
            if r.shape != t.shape or r.dtype != t.dtype:
                raise AssertionError(f"clone_graph: rewrite of {t!r} gave {r!r} (compiler bug)")
            del out._by_name[r.name]
            r.name, r.auto_name = out._fresh_name(t.op, t.id) if t.name in out._by_name else t.name, t.auto_name
            out._by_name[r.name] = r
            m[t] = r
            continue
        n = Tensor(out, t.op, tuple(m[i] for i in t.inputs), t.attrs, t.shape, t.dtype, t.name, t.value)
        n.auto_name = t.auto_name
        out._add(n)
        m[t] = n
    out.inputs = {k: m[v] for k, v in g.inputs.items()}
    out.params = {k: m[v] for k, v in g.params.items()}
    out.buffers = {k: m[v] for k, v in g.buffers.items()}
    out.outputs = {k: m[v] for k, v in g.outputs.items()}
    return out, m
