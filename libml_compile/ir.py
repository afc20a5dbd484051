"""The IR: a graph of statically shaped, typed tensors.

Every tensor is the single output of one node (``Tensor.op`` names its registry entry in ``ops.py``;
leaves are ``input``, ``param`` and ``const``).  Nodes are appended in construction order, so
``Graph.nodes`` is always a valid topological order.  Shapes and dtypes are inferred when a node is
declared, by the op's shape rule, so a mismatch raises there, naming the op and the shapes.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)

_ids = itertools.count()


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

    __slots__ = ("graph", "op", "inputs", "attrs", "shape", "dtype", "name", "id", "value", "__weakref__")

    def __init__(self, graph, op, inputs, attrs, shape, dtype, name=None, value=None):
        self.graph = graph
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.id = next(_ids)
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

    @property
    def T(self):
        return _ops().transpose(self)

    __hash__ = object.__hash__


def _ops():
    from . import ops
    return ops


class Graph:
    """A static dataflow graph.

    ``nodes`` is in topological order; ``inputs``/``params``/``outputs`` map user-facing names to tensors.
    ``meta`` is free for frontends (the ONNX importer keeps its ModelProto there).
    """

    def __init__(self, name="graph"):
        self.name = name
        self.nodes: list[Tensor] = []
        self.inputs: dict[str, Tensor] = {}
        self.params: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.meta: dict = {}
        self._by_name: dict[str, Tensor] = {}

    # -- leaves ------------------------------------------------------------------------------------
    def input(self, name, shape, dtype="float32"):
        """Declare a fed input of static ``shape``; fed arrays must match shape and dtype exactly."""
        self._check_new_name(name)
        shape = _check_shape(shape, f"input {name!r}")
        t = Tensor(self, "input", (), {}, shape, canonical_dtype(dtype), name)
        self.inputs[name] = t
        return self._add(t)

    def param(self, name, value, dtype=None):
        """Declare a parameter with initial ``value`` (copied); floating dtypes only."""
        self._check_new_name(name)
        arr = native_array(value, dtype)
        dt = canonical_dtype(arr.dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"param {name!r}: dtype {dt} is not trainable; use float32 or float64 "
                            f"(or g.const for integer data)")
        t = Tensor(self, "param", (), {}, arr.shape, dt, name, value=arr)
        self.params[name] = t
        return self._add(t)

    def const(self, value, name=None, dtype=None):
        """A constant tensor (not trainable). Python scalars default to float32."""
        arr = native_array(value, dtype)
        if arr.dtype == np.float64 and dtype is None and not isinstance(value, np.ndarray):
            arr = arr.astype(np.float32)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        if name is not None:
            self._check_new_name(name)
        arr.flags.writeable = False
        t = Tensor(self, "const", (), {}, arr.shape, canonical_dtype(arr.dtype), name, value=arr)
        return self._add(t)

    def output(self, name, tensor):
        """Mark ``tensor`` as a graph output under ``name``."""
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
        if not isinstance(name, str) or not name:
            raise ValueError(f"names must be non-empty strings, got {name!r}")
        if name in self._by_name:
            raise ValueError(f"graph {self.name!r} already has a tensor named {name!r}")

    def _add(self, t):
        self.nodes.append(t)
        if t.name in self._by_name and self._by_name[t.name] is not t:
            raise ValueError(f"graph {self.name!r} already has a tensor named {t.name!r}")
        self._by_name[t.name] = t
        return t

    def __repr__(self):
        return (f"Graph({self.name!r}, {len(self.nodes)} nodes, inputs={list(self.inputs)}, "
                f"params={list(self.params)}, outputs={list(self.outputs)})")


def _check_shape(shape, what):
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"{what}: shape must be a tuple of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{what}: negative dimension in shape {shape}")
    return shape


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


def clone_graph(g: Graph, name=None):
    """Copy ``g`` node by node (same names, shared leaf values). Returns (copy, {old: new})."""
    out = Graph(name or g.name)
    out.meta = g.meta
    m: dict[Tensor, Tensor] = {}
    for t in g.nodes:
        n = Tensor(out, t.op, tuple(m[i] for i in t.inputs), t.attrs, t.shape, t.dtype, t.name, t.value)
        out._add(n)
        m[t] = n
    out.inputs = {k: m[v] for k, v in g.inputs.items()}
    out.params = {k: m[v] for k, v in g.params.items()}
    out.outputs = {k: m[v] for k, v in g.outputs.items()}
    return out, m
