"""Import an ONNX model into a libml :class:`Graph` for fine-tuning.

``import_onnx(model, shapes=None)`` loads a path or an ``onnx.ModelProto``, checks every operator against
:data:`SUPPORTED_OPS` *before doing any other work*, runs ``onnx.checker`` and shape inference, binds
symbolic dimensions from ``shapes`` and rebuilds the model with the libml frontend API:

* float initializers become trainable params under their ONNX names (also when they are listed as graph
  inputs, the pre-IR-4 convention); integer initializers become constants;
* operators come from the operator registry (``OpDef.onnx``: op type, attribute -> param map; one
  generic translation, :meth:`_Importer.registry_op`) or from the few hand-written :data:`HANDLERS`
  (MatMul, Gemm, Softmax, Reshape, ...); :data:`SUPPORTED_OPS` is their union;
* ``Constant`` nodes, ``Shape`` (shapes are static), and every node whose inputs are all constants are
  folded at import through the registry's NumPy references ``OpDef.ref`` (so ``Shape -> Gather ->
  Concat -> Reshape`` chains vanish);
* ``Gemm`` becomes transposes + matmul + scaling + add, ``Flatten``/``Squeeze``/``Unsqueeze``/``Reshape``
  become ``lc.reshape``, ``Softmax`` follows the semantics of the model's opset;
* every node output keeps its ONNX name, so ``g.tensor(onnx_name)`` finds it, and graph outputs keep their
  ONNX names in ``g.outputs``.

The original ``ModelProto`` is kept in ``g.meta["onnx_model"]`` so that :func:`export_onnx` can write the
same model back with updated initializers.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["import_onnx", "load_model", "UnsupportedOperatorError", "ONNXImportError",
           "SUPPORTED_OPS", "FOLD_ONLY_OPS", "HANDLERS", "registry_onnx_ops", "onnx_to_libml",
           "integer_capable", "SUPPORTED_DTYPES", "MIN_OPSET"]

#: Hand-written translations: ONNX op type -> (``_Importer`` method returning the output's value or the
#: list of the outputs' values, libml ops it emits, integer tensors allowed).  Every other supported operator comes from an ``OpDef.onnx`` declaration in the operator
#: registry and is translated by the one generic path ``_Importer.registry_op`` (see registry_onnx_ops).
HANDLERS: Dict[str, Tuple[str, Tuple[str, ...], bool]] = {
    "MatMul": ("op_matmul", ("matmul", "reshape"), False),
    "Gemm": ("gemm", ("transpose", "matmul", "mul", "add"), False),
    "Softmax": ("softmax", ("softmax", "reshape"), False),
    "Constant": ("constant", (), True),
    "Shape": ("op_shape", (), True),
    "Cast": ("op_cast", ("cast",), True),
    "Transpose": ("op_transpose", ("transpose",), True),
    "Reshape": ("op_reshape", ("reshape",), True),
    "Flatten": ("op_reshape", ("reshape",), True),
    "Squeeze": ("op_reshape", ("reshape",), True),
    "Unsqueeze": ("op_reshape", ("reshape",), True),
    "Gather": ("gather", ("gather",), True),
    "Concat": ("concat", ("concat",), True),
    "Sum": ("op_sum", ("add",), True),
    "Mean": ("op_mean", ("add", "div"), False),
    "LayerNormalization": ("layer_norm", ("layer_norm", "broadcast_to"), False),
    "RMSNormalization": ("rms_norm", ("rms_norm", "broadcast_to"), False),
    "Conv": ("op_conv", ("conv",), False),
    "ConvTranspose": ("op_conv_transpose", ("conv_transpose", "add", "reshape"), False),
    "GlobalAveragePool": ("op_global_pool", ("sum",), False),
    "MaxPool": ("op_pool", ("max_pool",), False),
    "AveragePool": ("op_pool", ("avg_pool",), False),
    "GlobalMaxPool": ("op_global_pool", ("reduce_max",), False),
    "Resize": ("op_resize", ("resize",), False),
    "Upsample": ("op_resize", ("resize",), False),
    "Dropout": ("dropout", ("dropout",), True),  # (True: its Mask output is bool)
    "BatchNormalization": ("batch_norm", ("batch_norm", "add", "mul", "sub", "sqrt", "reciprocal", "reshape",
                                          "identity"),
                           False),
    "Slice": ("op_slice", ("slice", "gather"), True),
    "Split": ("op_split", ("slice",), True),
    "Expand": ("op_expand", ("broadcast_to",), True),
    "GatherND": ("op_gather_nd", ("index_flat", "reshape", "gather"), True),
    "GatherElements": ("op_gather_elements", ("index_flat", "reshape", "gather"), True),
    "DepthToSpace": ("op_depth_to_space", ("reshape", "transpose"), True),
    "SpaceToDepth": ("op_depth_to_space", ("reshape", "transpose"), True),
    "CastLike": ("op_cast_like", ("cast",), True),
    "Tile": ("op_tile", ("gather",), True),
    "Pad": ("op_pad", ("concat", "gather", "slice"), True),
    "ScatterND": ("op_scatter", ("reshape", "concat", "gather", "gather_grad", "add", "reduce_prod",
                                 "reduce_max", "reduce_min"), True),
    "ScatterElements": ("op_scatter", ("reshape", "concat", "gather", "gather_grad", "add", "reduce_prod",
                                       "reduce_max", "reduce_min"), True),
}


def registry_onnx_ops() -> Dict[str, Tuple[Any, ...]]:
    """ONNX op type -> the registry ``OpDef``s declaring it (``OpDef.onnx``), in registration order.

    Several ops may share one ONNX type when a selecting attribute value tells them apart (the optional
    third element of ``OpDef.onnx``: Gelu's ``approximate`` picks ``gelu`` or ``gelu_tanh``)."""
    from .ops import REGISTRY
    out: Dict[str, list] = {}
    for d in REGISTRY.values():
        if d.onnx is not None:
            if d.onnx[0] in HANDLERS:
                raise RuntimeError(f"ONNX operator {d.onnx[0]!r} is declared by registry op {d.name!r} and "
                                   f"has a hand-written handler: one operator, one place")
            out.setdefault(d.onnx[0], []).append(d)
    return {k: tuple(v) for k, v in out.items()}


def onnx_to_libml() -> Dict[str, Optional[Tuple[str, ...]]]:
    """ONNX op type -> the libml ops its translation emits (None: folded at import, emits nothing)."""
    out: Dict[str, Optional[Tuple[str, ...]]] = {k: tuple(d.name for d in v)
                                                 for k, v in registry_onnx_ops().items()}
    for k, (_, emits, _) in HANDLERS.items():
        out[k] = emits or None
    return out


def integer_capable(op_type: str) -> bool:
    """Whether libml translates ``op_type`` on integer tensors (registry ops: ``OpDef.int_ok``; libml's
    integer kernels are Add/Sub/Mul/Div and data movement)."""
    if op_type in _INTEGER_BY_IMPORTER:
        return True
    if op_type in HANDLERS:
        return HANDLERS[op_type][2]
    return all(d.int_ok for d in registry_onnx_ops().get(op_type, ()))


#: operators whose integer / bool form the importer builds from integer kernels: Clip as max then min,
#: ReduceMax / ReduceMin of bools as any / all (``_Importer.integer_clip``, ``_reduce_family``)
_INTEGER_BY_IMPORTER = ("Clip", "ReduceMax", "ReduceMin")


#: the reduction family (``_Importer.reduce_family``, below; ops_reduce.py): hand-written handlers, as their
#: axes come as an attribute or an input by opset
REDUCE_IMPORT_OPS: Dict[str, Tuple[str, ...]] = {
    "ReduceSum": ("sum",), "ReduceMean": ("sum",), "ReduceMax": ("reduce_max", "transpose", "reshape"),
    "ReduceMin": ("reduce_min", "transpose", "reshape"), "ReduceProd": ("reduce_prod", "transpose", "reshape"),
    "ReduceSumSquare": ("square", "sum"), "ReduceL1": ("abs", "sum"), "ReduceL2": ("square", "sum", "sqrt"),
    "ReduceLogSum": ("sum", "log"), "ReduceLogSumExp": ("logsumexp", "transpose", "reshape"),
    "ArgMax": ("argmax",), "ArgMin": ("argmin",), "LogSoftmax": ("log_softmax", "reshape"),
}
HANDLERS.update({k: ("reduce_family", v, False) for k, v in REDUCE_IMPORT_OPS.items()})

#: ONNX operators (default domain) the importer translates: the registry's plus the hand-written ones.
SUPPORTED_OPS: Tuple[str, ...] = tuple(sorted(set(registry_onnx_ops()) | set(HANDLERS)))
#: the comparison / logic family (``_Importer.logic``, ops_logic.py): hand-written handlers
LOGIC_OPS: Tuple[str, ...] = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor",
                              "Not", "IsNaN", "IsInf", "Where", "Mod")
HANDLERS.update({k: ("logic", (), True) for k in LOGIC_OPS})
SUPPORTED_OPS = tuple(sorted(set(SUPPORTED_OPS) | set(LOGIC_OPS)))
#: Operators that are evaluated at import time.  ``Shape`` always folds (libml shapes are static);
#: ``Gather`` needs constant indices; ``Concat`` and ``Gather`` of live tensors are native copies
#: (``lc.concat`` / ``lc.gather``), so an Inf stays in its own element and memory is linear in the size.
FOLD_ONLY_OPS: Tuple[str, ...] = ("Constant", "Shape")

#: numpy dtype names libml tensors can have.
SUPPORTED_DTYPES: Tuple[str, ...] = (
    "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool",
)
MIN_OPSET = 7  # the README's promise; opset 6's legacy broadcast is refused, not half-supported

_DEFAULT_DOMAINS = ("", "ai.onnx")


class ONNXImportError(ValueError):
    """The ONNX model cannot be read or translated (the message names the file, node or input)."""


class TiedParamsWarning(UserWarning):
    """One initializer of an imported model feeds several weight slots: training updates them together."""


class FoldedWeightsWarning(UserWarning):
    """Params of an imported model look like exporter-computed copies of weights (folded constants)."""


class UnsupportedOperatorError(ONNXImportError):
    """An ONNX operator libml cannot import.

    Attributes: ``op_type``, ``node_name``, ``domain``, ``opset``, ``supported`` (tuple of op types).
    """

    def __init__(self, op_type: str, node_name: str, opset: int, domain: str = "",
                 supported: Sequence[str] = SUPPORTED_OPS, source: Optional[str] = None, others=()):
        self.op_type = op_type
        self.node_name = node_name
        self.domain = domain
        self.opset = opset
        self.supported = tuple(supported)
        #: every unsupported (domain, op type) of the model with one example node each, the first included
        self.missing = [((domain, op_type), node_name)] + list(others)

        def qual(d, o):
            return f"{d}::{o}" if d not in _DEFAULT_DOMAINS else o
        where = f" in {source}" if source else ""
        if not others:
            head = f"unsupported ONNX operator {qual(domain, op_type)!r} (node {node_name!r}, opset {opset}){where}"
        else:
            listed = ", ".join(f"{qual(d, o)!r} (node {n!r})" for (d, o), n in self.missing)
            head = f"{len(self.missing)} unsupported ONNX operators (opset {opset}){where}: {listed}"
        super().__init__(f"{head}; libml supports: {', '.join(self.supported)}")


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------

def _onnx():
    try:
        import onnx  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnx is a hard dependency
        raise ImportError("libml's ONNX support needs the 'onnx' package: pip install onnx") from e
    return onnx


def load_model(model: Any, base_dir: Optional[Union[str, os.PathLike]] = None):
    """Return ``(ModelProto, source_description)`` for a path, bytes or ModelProto.

    External data (tensors stored in files beside the model) is read into the returned model by
    :func:`load_external_data`, only from inside one folder: the model file's folder for a path, or
    ``base_dir`` for bytes and ModelProtos (without ``base_dir`` an in-memory model with external data is
    refused).  A ModelProto argument with external data is copied, never modified.

    Raises :class:`ONNXImportError` naming the file when it is missing, unreadable, not a regular file,
    truncated or not ONNX, or when a tensor's external data or ``raw_data`` is bad.
    """
    onnx = _onnx()
    if isinstance(model, onnx.ModelProto):
        m, source = model, None
    elif isinstance(model, (bytes, bytearray)):
        try:
            m = onnx.load_model_from_string(bytes(model))
        except Exception as e:
            raise ONNXImportError(f"cannot parse ONNX model from bytes: {e}") from e
        _check_looks_like_onnx(m, "<bytes>")
        source = None
    else:
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"import_onnx: model must be a path or an onnx.ModelProto, got {type(model).__name__}")
        path = os.fspath(model)
        if not os.path.exists(path):
            raise ONNXImportError(f"ONNX file {path!r} does not exist")
        if os.path.isdir(path):
            raise ONNXImportError(f"ONNX file {path!r} is a directory")
        from libml_runtime.fileio import FileSafetyError, read_regular
        try:
            data = read_regular(path, "ONNX file")
        except FileSafetyError as e:
            raise ONNXImportError(str(e)) from None
        except OSError as e:
            raise ONNXImportError(f"cannot read ONNX file {path!r}: {e}") from e
        if not data:
            raise ONNXImportError(f"ONNX file {path!r} is empty")
        try:
            m = onnx.load_model_from_string(data)
        except Exception as e:
            raise ONNXImportError(
                f"ONNX file {path!r} is not a valid ONNX model (truncated or not ONNX): {e}") from e
        _check_looks_like_onnx(m, path)
        source = path
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(path))
    if any(_is_external(t) for t, _ in _all_tensors(m.graph)):
        if source is None and m is model:
            m = onnx.ModelProto()
            m.CopyFrom(model)
        load_external_data(m, base_dir, source)
    check_raw_data(m, source)
    return m, source


# -- external data and raw_data -----------------------------------------------------------------------

def _all_tensors(graph):
    """Every TensorProto of ``graph`` with a description: initializers, sparse initializers (values and
    indices) and tensors in attributes of every node, subgraphs included.  Yields (tensor, description)."""
    for t in graph.initializer:
        yield t, f"initializer {t.name!r}"
    for sp in graph.sparse_initializer:
        yield sp.values, f"sparse initializer {sp.values.name!r} (values)"
        yield sp.indices, f"sparse initializer {sp.values.name!r} (indices)"
    for node in graph.node:
        for a in node.attribute:
            at = f"attribute {a.name!r} of node {node.name or node.op_type!r}"
            if a.HasField("t"):
                yield a.t, f"tensor {a.t.name!r} in {at}"
            for t in a.tensors:
                yield t, f"tensor {t.name!r} in {at}"
            sps = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            for sp in sps:
                yield sp.values, f"sparse tensor {sp.values.name!r} (values) in {at}"
                yield sp.indices, f"sparse tensor {sp.values.name!r} (indices) in {at}"
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                for t, d in _all_tensors(sub):
                    yield t, f"{d} of subgraph {sub.name!r} in {at}"


def _is_external(t) -> bool:
    from onnx import TensorProto
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def load_external_data(m, base_dir, source=None) -> None:
    """Read every external tensor of ``m`` into ``raw_data``, only from regular files inside ``base_dir``.

    A location must be relative, must not contain ``..`` and must not resolve (symlinks followed, by
    ``realpath``) outside ``realpath(base_dir)``; offset and length must lie inside the file.  Each
    violation raises ONNXImportError naming the tensor and the location.
    """
    from onnx import TensorProto

    from libml_runtime.fileio import open_regular

    src = f" of ONNX model {source!r}" if source else ""
    for t, desc in _all_tensors(m.graph):
        if not _is_external(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        what = f"external data of {desc}{src}"
        loc = info.get("location", "")
        if base_dir is None:
            raise ONNXImportError(f"{what} is stored in {loc!r}, but the model was given in memory without "
                                  f"base_dir=: pass import_onnx(..., base_dir=FOLDER) (external data is "
                                  f"read only from inside that folder)")
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", loc):
            raise ONNXImportError(f"{what}: location {loc!r} must be a relative path inside the model's "
                                  f"folder, without '..'")
        root = os.path.realpath(os.fspath(base_dir))
        full = os.path.realpath(os.path.join(root, loc))
        if os.path.commonpath([root, full]) != root:
            raise ONNXImportError(f"{what}: location {loc!r} resolves to {full!r}, outside the model's folder "
                                  f"{root!r} (symlinks may not leave it)")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ONNXImportError(f"{what}: offset {info.get('offset')!r} / length {info.get('length')!r} "
                                  f"are not integers") from None
        try:
            with open_regular(full, f"external data file of {desc}") as f:
                size = os.fstat(f.fileno()).st_size
                if length is None:
                    length = size - offset
                if offset < 0 or length < 0 or offset + length > size:
                    raise ONNXImportError(f"{what}: offset {offset} + length {length} lies outside "
                                          f"{loc!r} ({size} bytes)")
                f.seek(offset)
                data = f.read(length)
        except OSError as e:
            raise ONNXImportError(f"cannot read {what} from {loc!r}: {e}") from e
        t.raw_data = data
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def check_raw_data(m, source=None) -> None:
    """Raise ONNXImportError naming the tensor when a fixed-size tensor's ``raw_data`` does not hold
    exactly prod(dims) * itemsize bytes."""
    from onnx import helper

    src = f" of ONNX model {source!r}" if source else ""
    for t, desc in _all_tensors(m.graph):
        if not t.HasField("raw_data") or _is_external(t):
            continue
        try:
            np_dt = helper.tensor_dtype_to_np_dtype(t.data_type)
        except Exception:
            continue
        if np_dt.kind in "OSUV":  # strings: raw_data is not used
            continue
        n = int(np.prod([int(d) for d in t.dims], dtype=object)) if len(t.dims) else 1
        bits = t.data_type in (21, 22, 23)  # UINT4, INT4, FLOAT4E2M1  # 4-bit types pack two values per byte
        want = (n + 1) // 2 if bits else n * np_dt.itemsize
        if len(t.raw_data) != want:
            raise ONNXImportError(f"{desc}{src} (dims {list(t.dims)}, {np_dt}) has {len(t.raw_data)} bytes of "
                                  f"raw_data, expected {want}")


def _check_looks_like_onnx(m, source: str) -> None:
    # Protobuf happily parses many byte strings into a (mostly empty) message; a real model has an IR
    # version, an opset and a graph with at least one output.
    if m.ir_version <= 0 or not m.HasField("graph") or len(m.graph.output) == 0:
        raise ONNXImportError(
            f"ONNX file {source!r} is not a valid ONNX model (truncated or not ONNX): "
            f"missing {'ir_version' if m.ir_version <= 0 else 'graph outputs'}")


def _default_opset(m) -> int:
    versions = [op.version for op in m.opset_import if op.domain in _DEFAULT_DOMAINS]
    if not versions:
        return 1 if m.ir_version < 3 else 0
    return max(versions)


def _dtype_of_elem(elem_type: int) -> Optional[str]:
    onnx = _onnx()
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return None


def _elem_name(elem_type: int) -> str:
    onnx = _onnx()
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except Exception:
        return str(elem_type)


def _unchanged_since(m, opset: int) -> bool:
    """Every default-domain operator of ``m`` has, at ``opset``, the definition it still has in the newest
    opset (e.g. Not-1): such an old model means what it says today, legacy broadcasting cannot occur."""
    defs = _onnx().defs
    try:
        return all(defs.get_schema(n.op_type, opset).since_version == defs.get_schema(n.op_type).since_version
                   for n in m.graph.node)
    except Exception:  # an operator unknown at that opset
        return False


def _constant_values(m) -> set:
    """Names of the values of ``m`` that are constant whatever is fed: Constant outputs, integer / bool
    initializers, Shape / Size outputs (libml shapes are static), and outputs of nodes whose inputs are all
    constant.  Float initializers are params (trainable), so not constant here."""
    from onnx import TensorProto
    const = {t.name for t in m.graph.initializer if t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE)}
    for node in m.graph.node:
        if node.op_type in ("Constant", "Shape", "Size") or all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    return const


#: (op type, input index) slots whose operand is a shape, bounds, axes or indices: a float initializer that
#: reaches a live node only through these is configuration, never a weight
_CONFIG_SLOTS = {("Reshape", 1), ("Expand", 1), ("Split", 1), ("Squeeze", 1), ("Unsqueeze", 1), ("Tile", 1),
                 ("Pad", 1), ("Pad", 2), ("Pad", 3), ("ConstantOfShape", 0), ("Gather", 1), ("GatherND", 1),
                 ("GatherElements", 1), ("TopK", 1), ("OneHot", 1), ("Resize", 1), ("Resize", 2), ("Resize", 3),
                 ("Clip", 1), ("Clip", 2)} | {("Slice", i) for i in range(1, 5)} | {("Range", i) for i in range(3)}
_CONFIG_SLOTS |= {("Upsample", 1)}  # (its scales, opset 9)
_CONFIG_SLOTS |= {(op, 1) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                     "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")}


def classify_initializers(m) -> Dict[str, Tuple[str, str]]:
    """Float initializers of ``m`` -> ``("param" | "constant" | "state", why)``: what an exporter's initializer is.

    BatchNormalization's running mean and variance (inputs 3 and 4) are ``"state"``: buffers
    (``Graph.buffer``), never trained, updated by training-mode batch normalisation.

    Exporters store weights and also constants as initializers (attention scales, GELU's 0.5 and 1/sqrt(2),
    mask fill values, Clip bounds: the dynamo exporter does).  Training a constant silently changes the
    model (an attention temperature drifts), so an initializer is a *param* only when it is a tensor
    (more than one element) that reaches a live node in a data slot, directly or through
    constant-only nodes (a pre-transposed weight copy is still a weight); scalars, and tensors that only
    reach shape / bounds / axes / index / clip-bound slots, are *constants*.  ``import_onnx``'s ``params``
    and ``constants`` override the decision by name or glob pattern."""
    from onnx import TensorProto
    floats = {t.name: t for t in m.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE)}
    const = _constant_values(m) | set(floats)  # values computed from constants and float initializers only
    for node in m.graph.node:
        if all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    readers: Dict[str, list] = {}
    for node in m.graph.node:
        for k, i in enumerate(node.input):
            if i:
                readers.setdefault(i, []).append((node, k))
    # BatchNormalization's running statistics (inputs 3 and 4): non-trainable state (Graph.buffer)
    running = {node.input[k]: f"BatchNormalization input {k} (node {node.name or node.output[0]!r})"
               for node in m.graph.node if node.op_type == "BatchNormalization"
               for k in (3, 4) if len(node.input) > k and node.input[k]}
    out = {}
    for name, t in floats.items():
        if name in running:
            out[name] = ("state", f"a running statistic, {running[name]}: non-trainable state (a buffer), "
                                  f"updated by training-mode batch normalisation")
            continue
        if math.prod(t.dims) <= 1:
            out[name] = ("constant", "a scalar (scale, epsilon, fill value or bound)")
            continue
        seen, stack, data_slot, config_slot = {name}, [name], None, None
        while stack and data_slot is None:
            for node, k in readers.get(stack.pop(), ()):
                if all(i in const for i in node.input if i):  # constant-only: follow its outputs
                    for o in node.output:
                        if o and o not in seen:
                            seen.add(o)
                            stack.append(o)
                elif (node.op_type, k) in _CONFIG_SLOTS:
                    config_slot = config_slot or f"{node.op_type} input {k}"
                else:
                    data_slot = f"{node.op_type} input {k} (node {node.name or node.output[0]!r})"
                    break
        if data_slot is not None:
            out[name] = ("param", f"a weight: {data_slot}")
        elif any(vi.name in seen for vi in m.graph.output):
            out[name] = ("constant", "reaches a graph output only through constant computation")
        else:
            out[name] = ("constant", f"only configures {config_slot}" if config_slot else "reaches no live node")
    # PyTorch's exporters give a bias-free Conv / Linear (bias=False, as before every BatchNorm in a ResNet)
    # an all-zero bias initializer with a generated name: not a parameter of the module, so not trained
    # (training it would add parameters PyTorch does not have)
    named = any("." in k for k, (r, _) in out.items() if r == "param")
    if named and (m.producer_name or "").startswith("pytorch"):
        for name, (role, _) in list(out.items()):
            uses = readers.get(name, ())
            if (role == "param" and "." not in name and uses and
                    all((node.op_type, k) in _BIAS_SLOTS for node, k in uses) and
                    not np.any(_onnx().numpy_helper.to_array(floats[name]))):
                out[name] = ("constant", f"an all-zero bias the exporter added to bias-free "
                                         f"{uses[0][0].op_type} node {uses[0][0].name or uses[0][0].output[0]!r} "
                                         f"(bias=False in the module): not a parameter")
    return out


#: (op type, input index) of optional bias inputs
_BIAS_SLOTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2)}


def tied_initializers(m, roles=None) -> Dict[str, list]:
    """Param initializers feeding several weight slots of different nodes (the dynamo exporter's default
    optimisation merges equal-valued tensors: every all-ones LayerNorm scale becomes one tensor), as
    ``{name: [node names]}``: training them ties what were separate params."""
    roles = classify_initializers(m) if roles is None else roles  # (the caller's, when it has them)
    uses: Dict[str, list] = {}
    for node in m.graph.node:
        for k, i in enumerate(node.input):
            if (roles.get(i, ("",))[0] == "param" and (node.op_type, k) not in _CONFIG_SLOTS and
                    node.op_type not in ("Shape", "Size")):  # (reading a weight's shape is not a use)
                uses.setdefault(i, []).append(node.name or node.output[0])
    return {n: v for n, v in uses.items() if len(v) > 1}


def folded_initializers(m, roles=None) -> list:
    """Param initializers that look like copies the exporter computed from a weight (a pre-transposed Linear
    weight, an embedding table pre-gathered at constant positions): in a PyTorch export whose other params
    carry module paths (``encoder.layer.0.dense.weight``), the ones with generated names (``val_56``,
    ``embedding_2``).  A heuristic: training such a copy does not train the module's weight, and a folded
    slice has lost the rest of its table."""
    if not (m.producer_name or "").startswith("pytorch"):
        return []
    roles = classify_initializers(m) if roles is None else roles
    params = [k for k, (r, _) in roles.items() if r == "param"]
    if not any("." in k for k in params):
        return []
    return [k for k in params if "." not in k]


def check_supported(m, source: Optional[str] = None) -> int:
    """Check opset, operators and dtypes of a model before any other work. Returns the default opset."""
    onnx = _onnx()
    src = f" in {source}" if source else ""
    opset = _default_opset(m)
    newest = onnx.defs.onnx_opset_version()
    missing: Dict[Tuple[str, str], str] = {}  # (domain, op type) -> an example node, in graph order
    const = _constant_values(m)
    for node in m.graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in SUPPORTED_OPS:
            if node.domain in _DEFAULT_DOMAINS and all(i in const for i in node.input if i):
                continue  # computes on constants only: folded at import (onnx.reference), never a kernel
            missing.setdefault((node.domain, node.op_type), node.name or node.output[0])
    if missing:
        (dom, op), name = next(iter(missing.items()))
        dom_versions = [o.version for o in m.opset_import if o.domain == dom]
        raise UnsupportedOperatorError(op, name, dom_versions[0] if dom_versions else opset, domain=dom,
                                       source=source, others=list(missing.items())[1:])
    if opset < MIN_OPSET and not _unchanged_since(m, opset):
        raise ONNXImportError(f"ONNX opset {opset}{src} is too old: libml imports opsets {MIN_OPSET} to {newest}")
    if opset > newest:
        raise ONNXImportError(f"ONNX opset {opset}{src} is newer than the installed onnx package knows "
                              f"({newest}); upgrade onnx")
    # dtypes: graph inputs / outputs / initializers / Cast targets
    def chk(vi_name, elem, what):
        dt = _dtype_of_elem(elem)
        if dt not in SUPPORTED_DTYPES:
            raise ONNXImportError(f"{what} {vi_name!r}{src} has element type {_elem_name(elem)}, which libml "
                                  f"does not support (supported: {', '.join(SUPPORTED_DTYPES)})")
    for vi in list(m.graph.input) + list(m.graph.output):
        which = vi.type.WhichOneof("value")
        if which != "tensor_type":
            raise ONNXImportError(f"graph {'input' if vi in m.graph.input else 'output'} {vi.name!r}{src} has "
                                  f"type {which}; libml only supports tensors")
        chk(vi.name, vi.type.tensor_type.elem_type, "graph input/output")
    for t in m.graph.initializer:
        chk(t.name, t.data_type, "initializer")
    for node in m.graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    chk(node.name or node.output[0], a.i, "Cast node target type of")
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    chk(node.name or node.output[0], a.t.data_type, "Constant node")
                elif a.name in ("sparse_value", "value_string", "value_strings"):
                    raise ONNXImportError(f"Constant node {node.name or node.output[0]!r}{src} uses "
                                          f"attribute {a.name!r}, which libml does not support")
    return opset


# ----------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------

def _dims(vi) -> list:
    """ONNX value-info dims as ints (known) or str (symbolic) or None (unknown)."""
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _bind_shapes(m, data_inputs, shapes: Optional[Mapping[str, Any]], source: Optional[str]):
    """Return {input name: concrete shape tuple}. ``shapes`` maps input names to full shapes, or symbolic
    dimension names (dim_param) to ints."""
    shapes = dict(shapes or {})
    src = f" of {source}" if source else ""
    names = {vi.name for vi in data_inputs}
    dim_params: Dict[str, int] = {}
    for k, v in shapes.items():
        _check_shapes_value(k, v, src)
        if k not in names:
            if isinstance(v, (int, np.integer)):
                dim_params[k] = int(v)
                continue
            raise ONNXImportError(f"shapes= names {k!r}, which is not an input{src} "
                                  f"(inputs: {sorted(names)})")
    # symbolic dim values implied by the full shapes given for named inputs
    for vi in data_inputs:
        if vi.name in shapes and not isinstance(shapes[vi.name], (int, np.integer)):
            given = tuple(int(s) for s in shapes[vi.name])
            dims = _dims(vi)
            if vi.type.tensor_type.HasField("shape") and len(dims) != len(given):
                raise ONNXImportError(f"input {vi.name!r}{src} has rank {len(dims)} (shape {_fmt(dims)}), but "
                                      f"shapes= gives {given}")
            for d, s in zip(dims, given):
                if isinstance(d, str):
                    if d in dim_params and dim_params[d] != s:
                        raise ONNXImportError(
                            f"input {vi.name!r}{src}: symbolic dimension {d!r} is bound to {dim_params[d]} "
                            f"elsewhere but shapes= gives {s} (shape {given})")
                    dim_params.setdefault(d, s)
    result = {}
    for vi in data_inputs:
        dims = _dims(vi)
        if vi.name in shapes and not isinstance(shapes[vi.name], (int, np.integer)):
            given = tuple(int(s) for s in shapes[vi.name])
            if vi.type.tensor_type.HasField("shape"):
                for i, (d, s) in enumerate(zip(dims, given)):
                    if isinstance(d, int) and d != s:
                        raise ONNXImportError(
                            f"input {vi.name!r}{src} has shape {_fmt(dims)} in the model, which conflicts with "
                            f"shapes={{{vi.name!r}: {given}}} (dimension {i}: model {d}, given {s})")
            if any(s < 0 for s in given):
                raise ONNXImportError(f"shapes= gives a negative dimension for input {vi.name!r}: {given}")
            result[vi.name] = given
            continue
        if not vi.type.tensor_type.HasField("shape"):
            raise ONNXImportError(f"input {vi.name!r}{src} has no shape in the model; pass "
                                  f"shapes={{{vi.name!r}: (...)}}")
        conc = []
        for d in dims:
            if isinstance(d, int):
                conc.append(d)
            elif isinstance(d, str) and d in dim_params:
                conc.append(dim_params[d])
            else:
                raise ONNXImportError(
                    f"input {vi.name!r}{src} has symbolic shape {_fmt(dims)}; bind it with "
                    f"shapes={{{vi.name!r}: (...)}}" + (f" or shapes={{{d!r}: N}}" if isinstance(d, str) else ""))
        result[vi.name] = tuple(conc)
    return result


def _check_shapes_value(k, v, src):
    """shapes= values are an int (a symbolic dimension) or a sequence of ints (a full shape): anything else
    (2.5, True, "4", a float in a shape) is refused naming the key, never truncated."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, list, tuple)):
        raise ONNXImportError(f"shapes={{{k!r}: {v!r}}}{src}: the value must be an int (a symbolic dimension) "
                              f"or a tuple of ints (an input's shape)"[:300])
    dims = v if isinstance(v, (list, tuple)) else (v,)
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ONNXImportError(f"shapes={{{k!r}: {v!r}}}{src}: {d!r} is not a non-negative integer "
                                  f"dimension"[:300])


def _fmt(dims) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _attrs(node) -> Dict[str, Any]:
    onnx = _onnx()
    out = {}
    for a in node.attribute:
        out[a.name] = onnx.helper.get_attribute_value(a)
    return out


# ----------------------------------------------------------------------------------------------------
# the importer
# ----------------------------------------------------------------------------------------------------

class _Computed:
    """What a ``prepare_<OpType>`` returns when it computes the node itself (``fn()`` gives the value)."""

    def __init__(self, fn):
        self.fn = fn


class _Importer:
    def __init__(self, lc, m, opset: int, source: Optional[str], graph_name: str):
        self.lc = lc
        self.m = m
        self.opset = opset
        self.source = source
        self.g = lc.Graph(graph_name)
        self.env: Dict[str, Any] = {}        # ONNX name -> lc Tensor or np.ndarray (constant)
        self.const_tensors: Dict[str, Any] = {}
        self._uid = 0
        self.registry = registry_onnx_ops()
        self._schemas: Dict[str, Any] = {}

    # -- helpers -------------------------------------------------------------------------------------
    def where(self, node) -> str:
        return f"node {node.name!r} ({node.op_type})" if node.name else f"{node.op_type} node producing {node.output[0]!r}"

    def err(self, node, msg) -> ONNXImportError:
        src = f" in {self.source}" if self.source else ""
        return ONNXImportError(f"{self.where(node)}{src}: {msg}")

    def fresh(self, base: str) -> str:
        self._uid += 1
        return f"{base}/_{self._uid}"

    def is_const(self, v) -> bool:
        return isinstance(v, np.ndarray)

    def T(self, v, name_hint: Optional[str] = None):
        """Materialize a numpy constant as a graph const (cached per ONNX name)."""
        if not self.is_const(v):
            return v
        if name_hint is not None and name_hint in self.const_tensors:
            return self.const_tensors[name_hint]
        name = name_hint if (name_hint is not None and name_hint not in self.used_names) else None
        t = self.g.const(np.ascontiguousarray(v), name=name)
        if name_hint is not None:
            self.const_tensors[name_hint] = t
        return t

    def shape(self, v) -> Tuple[int, ...]:
        return tuple(v.shape)

    def dtype(self, v) -> str:
        return np.dtype(v.dtype).name if self.is_const(v) else v.dtype

    def static_ints(self, node, v, what: str) -> np.ndarray:
        if not self.is_const(v):
            raise self.err(node, f"{what} is data-dependent (computed from a graph input at run time); "
                                 f"libml graphs are static — make it a constant/initializer")
        return np.asarray(v).astype(np.int64).reshape(-1)

    def get(self, node, i: int):
        if i >= len(node.input) or node.input[i] == "":
            return None
        name = node.input[i]
        if name not in self.env:
            raise self.err(node, f"input {name!r} is not defined")
        return self.env[name]

    # -- build ---------------------------------------------------------------------------------------
    def build(self, input_shapes: Dict[str, Tuple[int, ...]], data_inputs, used: set):
        _onnx()  # a clear error if onnx is not installed
        from onnx import numpy_helper
        g = self.g
        self.used_names = {vi.name for vi in self.m.graph.input} | {t.name for t in self.m.graph.initializer}
        for vi in data_inputs:
            dt = _dtype_of_elem(vi.type.tensor_type.elem_type)
            self.env[vi.name] = g.input(vi.name, input_shapes[vi.name], dtype=dt)
        self.param_names, self.constant_names, self.buffer_names = [], [], []
        for init in self.m.graph.initializer:
            if init.name in self.env:
                continue  # a data input shadowing nothing; impossible after filtering
            arr = numpy_helper.to_array(init)
            if np.issubdtype(arr.dtype, np.floating) and init.name in used and self.roles[init.name] == "param":
                self.env[init.name] = g.param(init.name, np.array(arr, copy=True))
                self.param_names.append(init.name)
            elif np.issubdtype(arr.dtype, np.floating) and init.name in used and self.roles[init.name] == "state":
                self.env[init.name] = g.buffer(init.name, np.array(arr, copy=True))
                self.buffer_names.append(init.name)
            else:
                if np.issubdtype(arr.dtype, np.floating) and init.name in used:
                    self.constant_names.append(init.name)
                self.env[init.name] = np.array(arr, copy=True)
        for node in self.m.graph.node:
            outs = self.convert(node)
            if len(outs) < len([o for o in node.output if o]):
                raise self.err(node, "internal error: missing outputs")
            for name, v in zip(node.output, outs):
                if isinstance(v, (np.generic, float, int)):
                    v = np.asarray(v)
                if name:
                    self.env[name] = v
        for vi in self.m.graph.output:
            if vi.name not in self.env:
                raise ONNXImportError(f"graph output {vi.name!r} is not produced by any node")
            v = self.env[vi.name]
            if self.is_const(v):
                v = self.T(v, vi.name)
            g.output(vi.name, v)
        return g

    def convert(self, node):
        """The values of ``node``'s outputs: lc Tensors, or ndarrays where every input is constant."""
        op = node.op_type
        if op in HANDLERS:
            # a handler returns the value of the node's one output, or the list of all of them
            r = getattr(self, HANDLERS[op][0])(node, _attrs(node))
            return r if isinstance(r, list) else [r]
        candidates = self.registry.get(op)
        if candidates is not None:
            return [self.registry_op(node, candidates)]
        ins = [self.get(node, i) for i in range(len(node.input))]
        if all(v is None or self.is_const(v) for v in ins):
            return self.fold_with_reference(node, ins)
        raise UnsupportedOperatorError(op, node.name, self.opset, domain=node.domain, source=self.source)

    def fold_with_reference(self, node, ins):
        """An operator libml has no kernel for, on constant inputs only (ConstantOfShape, Range, Expand of
        a shape, ...): evaluated once, here, by ONNX's own reference implementation (onnx.reference)."""
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator
        names = [f"in{i}" if v is not None else "" for i, v in enumerate(ins)]
        n = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))])
        n.attribute.extend(node.attribute)
        consts = [helper.make_node("Constant", [], [nm], value=numpy_helper.from_array(np.asarray(v), nm))
                  for nm, v in zip(names, ins) if v is not None]
        outs = [helper.make_tensor_value_info(o, 0, None) for o in n.output]
        gr = helper.make_graph(consts + [n], "fold", [], outs)
        model = helper.make_model(gr, opset_imports=[helper.make_opsetid("", self.opset)])
        try:
            vals = ReferenceEvaluator(model).run(None, {})
        except Exception as e:  # noqa: BLE001 - any failure of the reference is this node's error
            raise self.err(node, f"folding it on constant inputs with onnx.reference failed: {e}"[:400]) from None
        return [np.asarray(v) for v in vals]

    # -- the generic registry path -------------------------------------------------------------------
    def schema(self, node):
        """The ONNX schema of ``node``'s op at the model's opset (None if onnx does not know it)."""
        key = node.op_type
        if key not in self._schemas:
            import onnx.defs
            try:
                self._schemas[key] = onnx.defs.get_schema(node.op_type, self.opset, "")
            except Exception:  # noqa: BLE001 - onnx raises SchemaError; the checker has already run
                self._schemas[key] = None
        return self._schemas[key]

    def attr_default(self, node, attr):
        """The default ONNX declares for ``attr`` of ``node``'s op at the model's opset, or None."""
        sch = self.schema(node)
        if sch is None or attr not in sch.attributes:
            return None
        dv = sch.attributes[attr].default_value
        if not dv.type:
            return None
        from onnx import helper
        return helper.get_attribute_value(dv)

    def select(self, node, candidates, at):
        """The registry op for ``node`` among those declaring its ONNX type: the one whose selecting
        attribute values (the third element of ``OpDef.onnx``) the node has (absent: ONNX's default)."""
        if len(candidates) == 1 and len(candidates[0].onnx) < 3:
            return candidates[0]
        seen = {}
        for d in candidates:
            sel = d.onnx[2] if len(d.onnx) > 2 else {}
            ok = True
            for a, want in sel.items():
                v = at.get(a, self.attr_default(node, a))
                v = v.decode() if isinstance(v, bytes) else v
                seen[a] = v
                ok = ok and v == want
            if ok:
                return d
        choices = "; ".join(f"{d.name}: {d.onnx[2]}" for d in candidates if len(d.onnx) > 2)
        raise self.err(node, f"attribute values {seen} are not supported (libml has {choices})")

    def registry_op(self, node, candidates):
        """Translate ``node`` with the registry op declaring its ONNX type (``OpDef.onnx``).

        Operands: the node's inputs in order.  For an op with scalar ``params`` (const inputs after x),
        param j is the node's input 1 + j when present (Clip's min/max from opset 11), else the ONNX
        attribute mapped to it, else the default ONNX declares for that attribute at the model's opset
        (equal to the param's default at the current opset: tests/test_onnx_registry.py), else
        ``absent_<OpType>`` if defined, else the param's default.  An ONNX operator whose first input
        is variadic (Max, Min) folds its 1..n inputs into a chain of the binary op.  ``prepare_<OpType>``
        methods adapt ONNX-specific operand rules (Pow's mixed dtypes, PRelu's unidirectional slope);
        ``absent_<OpType>`` gives an absent input-form parameter a dtype-dependent value (Clip's limits).
        Constants fold through the op's NumPy reference ``OpDef.ref``."""
        at = _attrs(node)
        d = self.select(node, candidates, at)
        ins = [self.get(node, i) for i in range(len(node.input))]
        sch = self.schema(node)
        if sch is not None and sch.inputs and sch.inputs[0].option == sch.inputs[0].option.Variadic:
            vals = [v for v in ins if v is not None]
            if not vals:
                raise self.err(node, "needs at least one input")
            return self.chain(node, d, vals, [n for n in node.input if n])
        if d.params:
            if len(ins) > 1 + len(d.params):
                raise self.err(node, f"has {len(ins)} inputs; {d.name} takes x and the parameters "
                                     f"{[p for p, _ in d.params]}")
            if not ins or ins[0] is None:
                raise self.err(node, "input 0 is missing")
            x = ins[0]
            if np.dtype(self.dtype(x)).kind != "f" and not d.int_ok and d.name != "clip":
                raise self.err(node, f"input {node.input[0]!r} has dtype {self.dtype(x)}; libml's {d.name} is "
                                     f"floating-point only")
            attr_of = {p: a for a, p in d.onnx[1].items()}
            operands, hints = [x], [node.input[0]]
            for j, (p, default) in enumerate(d.params):
                v = ins[1 + j] if 1 + j < len(ins) else None
                if v is not None:
                    operands.append(v)
                    hints.append(node.input[1 + j])
                    continue
                a = attr_of.get(p)
                absent = getattr(self, "absent_" + node.op_type, None)
                if a is not None and a in at:
                    v = at[a]
                elif a is not None and self.attr_default(node, a) is not None:
                    v = self.attr_default(node, a)
                elif absent is not None:
                    v = absent(node, p, self.dtype(x))
                else:
                    v = default
                operands.append(np.asarray(v, dtype=self.dtype(x)))
                hints.append(None)
        else:
            for i, v in enumerate(ins):
                if v is None:
                    raise self.err(node, f"input {i} is missing")
            operands, hints = ins, list(node.input)
        prep = getattr(self, "prepare_" + node.op_type, None)
        if prep is not None:
            operands = prep(node, operands)
            if isinstance(operands, _Computed):  # the preparation computed the node itself
                return operands.fn()
        if d.name == "clip" and np.dtype(self.dtype(operands[0])).kind in "iu":
            return self.integer_clip(node, operands)
        return self.apply(node, d, operands, hints, node.output[0])

    def integer_clip(self, node, operands):
        """Clip on integers: min(max(x, lo), hi) with the integer kernel's max and min (NumPy's rule, also
        for lo > hi); the bounds are constants or tensors of x's dtype."""
        from .ops import REGISTRY
        x, lo, hi = operands
        lo = np.asarray(lo).astype(self.dtype(x)) if self.is_const(lo) else lo
        hi = np.asarray(hi).astype(self.dtype(x)) if self.is_const(hi) else hi
        m = self.apply(node, REGISTRY["maximum"], [x, lo], [node.input[0], None], self.fresh(node.output[0]))
        return self.apply(node, REGISTRY["minimum"], [m, hi], [None, None], node.output[0])

    def apply(self, node, d, operands, hints, name):
        """``d`` on ``operands`` (lc Tensors or ndarrays): folded through ``d.ref`` when all are constant,
        else a graph node named ``name``; shape/dtype errors name the ONNX node."""
        from .ops import make
        try:
            if all(self.is_const(v) for v in operands):
                return np.asarray(d.ref({}, *operands))
            return make(d.name, tuple(self.T(v, h) for v, h in zip(operands, hints)), name=name)
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise self.err(node, str(e)) from None

    def chain(self, node, d, vals, hints, name=None):
        """Fold 1..n operands with the binary registry op ``d``: ((v0 d v1) d v2) ...; the last step is
        named ``name`` (default: the node's output; one operand: an identity)."""
        out = node.output[0] if name is None else name
        if len(vals) == 1:
            v = vals[0]
            return v.copy() if self.is_const(v) else self.lc.identity(self.T(v, hints[0]), name=out)
        acc, acc_hint = vals[0], hints[0]
        for k in range(1, len(vals)):
            acc = self.apply(node, d, [acc, vals[k]], [acc_hint, hints[k]],
                             out if k == len(vals) - 1 else self.fresh(out))
            acc_hint = None
        return acc

    def absent_Clip(self, node, param, dtype):
        # Clip >= 11: an absent min/max is numeric_limits<T>::lowest() / max() (the operator's definition;
        # onnxruntime agrees), so +inf clips to the largest finite value as with Clip-6's attribute defaults
        # (lc.clip's own defaults are -inf/+inf: no clipping at all)
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
        return info.min if param == "min" else info.max

    def prepare_Pow(self, node, operands):
        # ONNX Pow allows an exponent of another type than the base; the result has the base's type
        a, b = operands
        da, db = self.dtype(a), self.dtype(b)
        if da == db:
            return operands
        if np.dtype(da).kind != "f" and np.dtype(db).kind == "f":
            # an integer base with a float exponent: computed in float64 and cast back to the base's type
            # (ONNX's reference: np.power(a, b).astype(a.dtype))
            lc = self.lc
            a64 = np.asarray(a, np.float64) if self.is_const(a) else lc.cast(a, "float64", name=self.fresh(node.input[0]))
            b64 = np.asarray(b, np.float64) if self.is_const(b) else lc.cast(b, "float64", name=self.fresh(node.input[1]))
            return _Computed(lambda: self._pow_cast(node, a64, b64, da))
        if self.is_const(b):
            return [a, np.asarray(b).astype(da)]
        return [a, self.lc.cast(b, da, name=self.fresh(node.input[1]))]

    def _pow_cast(self, node, a64, b64, dt):
        from .ops import REGISTRY
        if self.is_const(a64) and self.is_const(b64):
            with np.errstate(all="ignore"):
                return np.power(a64, b64).astype(dt)
        y = self.apply(node, REGISTRY["pow"], [a64, b64], [None, None], self.fresh(node.output[0]))
        return self.lc.cast(y, dt, name=node.output[0])

    def prepare_PRelu(self, node, operands):
        # the slope broadcasts to X (unidirectionally): the result has X's shape
        from .ir import broadcast_shapes
        x, s = operands
        try:
            ok = broadcast_shapes("PRelu", self.shape(x), self.shape(s)) == self.shape(x)
        except ValueError:
            ok = False
        if not ok:
            raise self.err(node, f"slope {node.input[1]!r} of shape {self.shape(s)} does not broadcast to X's "
                                 f"shape {self.shape(x)}")
        return operands

    # -- hand-written handlers (HANDLERS) ------------------------------------------------------------
    def op_sum(self, node, at):
        from .ops import REGISTRY
        vals = [self.get(node, i) for i in range(len(node.input)) if node.input[i]]
        if not vals:
            raise self.err(node, "needs at least one input")
        return [self.chain(node, REGISTRY["add"], vals, [n for n in node.input if n])]

    def op_mean(self, node, at):
        # (v0 + v1 + ... + vn-1) / n, as ONNX's reference computes it
        from .ops import REGISTRY
        vals = [self.get(node, i) for i in range(len(node.input)) if node.input[i]]
        hints = [n for n in node.input if n]
        if not vals:
            raise self.err(node, "needs at least one input")
        if len(vals) == 1:
            return [self.chain(node, REGISTRY["add"], vals, hints)]
        out = node.output[0]
        total = self.chain(node, REGISTRY["add"], vals, hints, name=self.fresh(out))
        n = np.asarray(len(vals), dtype=self.dtype(vals[0]))
        return [self.apply(node, REGISTRY["div"], [total, n], [None, None], out)]

    def op_matmul(self, node, at):
        from .ops import REGISTRY
        a, b = self.get(node, 0), self.get(node, 1)
        if self.is_const(a) and self.is_const(b):
            return [np.asarray(REGISTRY["matmul"].ref({}, a, b))]
        try:
            return [self.lc.matmul(self.T(a, node.input[0]), self.T(b, node.input[1]), name=node.output[0])]
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_cast(self, node, at):
        from .ops import REGISTRY
        x = self.get(node, 0)
        to = _dtype_of_elem(at["to"])
        if self.is_const(x):
            return [np.asarray(REGISTRY["cast"].ref({"dtype": to}, np.asarray(x)))]
        if x.dtype == to:
            return [self.lc.identity(x, name=node.output[0])]
        return [self.lc.cast(x, to, name=node.output[0])]

    def op_shape(self, node, at):
        x = self.get(node, 0)
        shp = np.array(self.shape(x), dtype=np.int64)
        r = len(shp)
        start = at.get("start", 0)
        end = at.get("end", r)
        start = max(0, min(r, start + r if start < 0 else start))
        end = max(0, min(r, end + r if end < 0 else end))
        return [shp[start:end]]

    def op_transpose(self, node, at):
        from .ops import REGISTRY
        x = self.get(node, 0)
        r = len(self.shape(x))
        perm = tuple(int(p) for p in at.get("perm", list(range(r))[::-1]))
        if sorted(perm) != list(range(r)):
            raise self.err(node, f"perm {perm} is not a permutation of the {r} axes of shape {self.shape(x)}")
        if self.is_const(x):
            return [REGISTRY["transpose"].ref({"perm": perm}, x)]
        return [self.lc.transpose(x, perm, name=node.output[0])]

    def op_reshape(self, node, at):
        from .ops import REGISTRY
        x = self.get(node, 0)
        new = self.reshape_target(node, at, self.shape(x))
        if self.is_const(x):
            return [REGISTRY["reshape"].ref({"shape": tuple(new)}, x)]
        return [self.lc.reshape(x, tuple(new), name=node.output[0])]

    # -- op translations -----------------------------------------------------------------------------
    def logic(self, node, at):
        """Comparisons, And/Or/Xor/Not, IsNaN/IsInf, Where and Mod (ops_logic.py; bool results).  With every
        input constant the value folds through the registry's references (``_eval_const``)."""
        lc, op, out = self.lc, node.op_type, node.output[0]
        binary = {"Equal": lc.equal, "Less": lc.less, "LessOrEqual": lc.less_equal, "Greater": lc.greater,
                  "GreaterOrEqual": lc.greater_equal, "And": lc.logical_and, "Or": lc.logical_or,
                  "Xor": lc.logical_xor}
        if op in binary:
            def build(a, b, name=None):
                return binary[op](a, b, name=name)
        elif op == "Mod":
            fm = int(at.get("fmod", 0))

            def build(a, b, name=None):
                return lc.mod(a, b, fmod=fm, name=name)
        elif op == "Where":
            def build(c, x, y, name=None):
                return lc.where(c, x, y, name=name)
        elif op == "Not":
            def build(x, name=None):
                return lc.logical_not(x, name=name)
        elif op == "IsNaN":
            def build(x, name=None):
                return lc.isnan(x, name=name)
        else:  # IsInf
            pos, neg = bool(at.get("detect_positive", 1)), bool(at.get("detect_negative", 1))

            def build(x, name=None):
                return lc.isinf(x, detect_positive=pos, detect_negative=neg, name=name)
        ins = [self.get(node, i) for i in range(len(node.input))]
        if all(self.is_const(v) for v in ins):
            try:
                return _eval_const(build, *ins)
            except ZeroDivisionError as e:
                raise self.err(node, f"{e} (a constant {op})") from None
        return build(*[self.T(v, node.input[i]) for i, v in enumerate(ins)], name=out)

    def constant(self, node, at):
        from onnx import numpy_helper
        if "value" in at:
            return numpy_helper.to_array(at["value"]).copy()
        if "value_float" in at:
            return np.array(at["value_float"], dtype=np.float32)
        if "value_floats" in at:
            return np.array(at["value_floats"], dtype=np.float32)
        if "value_int" in at:
            return np.array(at["value_int"], dtype=np.int64)
        if "value_ints" in at:
            return np.array(at["value_ints"], dtype=np.int64)
        raise self.err(node, f"unsupported Constant attributes {sorted(at)}")

    def softmax(self, node, at):
        """Softmax and LogSoftmax: before opset 13 over the axes from ``axis`` on, flattened to 2-D (the
        old semantics); from 13 along one axis.  Constant inputs fold through the registry's references."""
        lc = self.lc
        fn = lc.softmax if node.op_type == "Softmax" else lc.log_softmax
        x = self.get(node, 0)
        shp = self.shape(x)
        r = len(shp)
        out = node.output[0]
        if self.opset < 13:
            axis = int(at.get("axis", 1))
            axis = axis + r if axis < 0 else axis
            if not 0 <= axis <= r:
                raise self.err(node, f"axis {at.get('axis', 1)} out of range for shape {shp}")
            n = int(np.prod(shp[:axis], dtype=np.int64))
            d = int(np.prod(shp[axis:], dtype=np.int64))
            if self.is_const(x):
                return _eval_const(lambda c: lc.reshape(fn(lc.reshape(c, (n, d)), axis=-1), shp), x)
            if r == 2 and axis == 1:
                return fn(x, axis=-1, name=out)
            x2 = lc.reshape(x, (n, d), name=self.fresh(out))
            y = fn(x2, axis=-1, name=self.fresh(out))
            return lc.reshape(y, shp, name=out)
        axis = int(at.get("axis", -1))
        if not -r <= axis < r:
            raise self.err(node, f"axis {axis} out of range for shape {shp}")
        if self.is_const(x):
            return _eval_const(lambda c: fn(c, axis=axis), x)
        return fn(x, axis=axis, name=out)

    def op_slice(self, node, at):
        """Slice: starts/ends/axes/steps as attributes (opset < 10) or constant inputs; negative and
        out-of-range bounds as Python slicing (which ONNX's clamping rules match).  Step 1 is a strided copy,
        other steps a gather of the picked indices."""
        data = self.get(node, 0)
        shp = self.shape(data)
        if self.opset < 10:
            starts, ends = list(at["starts"]), list(at["ends"])
            axes = list(at.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts = self.static_ints(node, self.get(node, 1), "starts").tolist()
            ends = self.static_ints(node, self.get(node, 2), "ends").tolist()
            a, st = self.get(node, 3), self.get(node, 4)
            axes = self.static_ints(node, a, "axes").tolist() if a is not None else list(range(len(starts)))
            steps = self.static_ints(node, st, "steps").tolist() if st is not None else [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise self.err(node, f"starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
        key = [slice(None)] * len(shp)
        for ax, b, e, sp in zip(axes, starts, ends, steps):
            if not -len(shp) <= ax < len(shp):
                raise self.err(node, f"axis {ax} out of range for shape {shp}")
            if sp == 0:
                raise self.err(node, "steps must not be 0")
            key[ax % len(shp)] = slice(b, e, sp)
        def build(x, name=None):
            y = x
            for ax, k in enumerate(key):
                if k != slice(None):
                    y = self.lc.ops.slice_axis(y, ax, k.start, k.stop, k.step)
            return y if y is not x else self.lc.identity(x, name=name)
        if self.is_const(data):
            return _eval_const(build, data)
        return build(data, node.output[0])

    def op_expand(self, node, at):
        """Expand: bidirectional broadcasting of the input with the constant ``shape``."""
        data = self.get(node, 0)
        shape = tuple(self.static_ints(node, self.get(node, 1), "shape").tolist())
        try:
            out = tuple(np.broadcast_shapes(self.shape(data), shape))
        except ValueError:
            raise self.err(node, f"input shape {self.shape(data)} and shape {shape} do not broadcast") from None
        if self.is_const(data):
            return _eval_const(lambda x: self.lc.broadcast_to(x, out), data)
        return self.lc.broadcast_to(data, out, name=node.output[0]) if out != self.shape(data) else data

    def op_gather_nd(self, node, at):
        """GatherND (ops_index.gather_nd): constant indices fold into a constant gather; live (fed or computed)
        ones are mapped to flat rows by the runtime, range-checked."""
        return self._index_op(node, lambda x, i, name=None: self.lc.gather_nd(
            x, i, batch_dims=int(at.get("batch_dims", 0)), name=name))

    def op_tile(self, node, at):
        data = self.get(node, 0)
        reps = self.static_ints(node, self.get(node, 1), "repeats").tolist()
        if len(reps) != len(self.shape(data)) or min(reps, default=0) < 0:
            raise self.err(node, f"repeats {reps} must give one non-negative count per axis of shape "
                                 f"{self.shape(data)}")
        if self.is_const(data):
            return _eval_const(lambda x: self.lc.ops.tile(x, reps), data)
        return self.lc.ops.tile(data, reps, name=node.output[0])

    def op_pad(self, node, at):
        """Pad: pads as attribute (opset < 11) or input, ``constant_value`` input, ``axes`` (opset 18);
        modes constant, reflect, edge; negative pads crop."""
        data = self.get(node, 0)
        shp = self.shape(data)
        r = len(shp)
        mode = at.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise self.err(node, f"mode {mode!r} is not supported (libml pads constant, reflect, edge, wrap)")
        if self.opset < 11:
            pads, value = list(at.get("pads", [])), float(at.get("value", 0.0))
            axes = list(range(r))
        else:
            pads = self.static_ints(node, self.get(node, 1), "pads").tolist()
            v = self.get(node, 2)
            value = 0.0 if v is None else np.asarray(self.static_value(node, v, "constant_value")).reshape(-1)
            value = value if isinstance(value, float) else (value[0].item() if value.size else 0.0)
            a = self.get(node, 3)
            axes = self.static_ints(node, a, "axes").tolist() if a is not None else list(range(r))
        if len(pads) != 2 * len(axes) or any(not -r <= ax < r for ax in axes):
            raise self.err(node, f"pads {pads} do not fit axes {axes} of shape {shp}")
        per = [(0, 0)] * r
        for k, ax in enumerate(axes):
            per[ax % r] = (pads[k], pads[k + len(axes)])
        def build(x, name=None):
            y = x
            for i, (lo, hi) in enumerate(per):  # negative pads crop first
                if lo < 0 or hi < 0:
                    y = self.lc.ops.slice_axis(y, i, max(-lo, 0), shp[i] - max(-hi, 0))
            return self.lc.ops.pad(y, [(max(lo, 0), max(hi, 0)) for lo, hi in per], mode, value, name=name)
        try:
            return _eval_const(build, data) if self.is_const(data) else build(data, node.output[0])
        except ValueError as e:
            raise self.err(node, str(e)) from None

    def static_value(self, node, v, what):
        if not self.is_const(v):
            raise self.err(node, f"{what} is data-dependent; libml needs it at compile time")
        return np.asarray(v)

    def op_scatter(self, node, at):
        """ScatterND / ScatterElements with constant indices and any reduction (none, add, mul, max, min):
        ops_index.scatter_nd / scatter_elements; data and updates get gradients."""
        data, idx, upd = self.get(node, 0), self.get(node, 1), self.get(node, 2)
        red = at.get("reduction", b"none")
        red = red.decode() if isinstance(red, bytes) else red
        if not self.is_const(idx):
            raise self.err(node, "indices (input 1) are data-dependent; libml's scatter needs constant indices")
        idx = np.asarray(idx)
        lc = self.lc

        def build(dv, uv, name=None):
            if node.op_type == "ScatterND":
                return lc.scatter_nd(dv, idx, uv, reduction=red, name=name)
            return lc.scatter_elements(dv, idx, uv, axis=int(at.get("axis", 0)), reduction=red, name=name)
        try:
            if self.is_const(data) and self.is_const(upd):
                return _eval_const(build, data, upd)
            return build(self.T(data, node.input[0]), self.T(upd, node.input[2]), node.output[0])
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_cast_like(self, node, at):
        """CastLike (opset 15): Cast to the dtype of input 1 (the dynamo exporter's unoptimised output)."""
        x, like = self.get(node, 0), self.get(node, 1)
        dt = self.dtype(like)
        if self.dtype(x) == dt:
            return x
        if self.is_const(x):
            return np.asarray(x).astype(dt)
        return self.lc.cast(x, dt, name=node.output[0])

    def op_gather_elements(self, node, at):
        """GatherElements (ops_index.gather_elements; np.take_along_axis, negative indices from the end):
        constant or live indices, as GatherND."""
        return self._index_op(node, lambda x, i, name=None: self.lc.gather_elements(
            x, i, axis=int(at.get("axis", 0)), name=name))

    def _index_op(self, node, build):
        data, idx = self.get(node, 0), self.get(node, 1)
        try:
            if self.is_const(data) and self.is_const(idx):
                return _eval_const(lambda x: build(x, np.asarray(idx)), data)
            return build(self.T(data, node.input[0]), idx if self.is_const(idx) else self.T(idx), node.output[0])
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_depth_to_space(self, node, at):
        """DepthToSpace (DCR / CRD) and SpaceToDepth: reshape -> transpose -> reshape (ops_index)."""
        mode = at.get("mode", b"DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        fn = self.lc.depth_to_space if node.op_type == "DepthToSpace" else self.lc.space_to_depth
        data = self.get(node, 0)
        try:
            if self.is_const(data):
                return _eval_const(lambda x: fn(x, int(at["blocksize"]), mode), data)
            return fn(data, int(at["blocksize"]), mode, name=node.output[0])
        except (KeyError, TypeError, ValueError) as e:
            raise self.err(node, f"{type(e).__name__}: {e}") from None

    def op_split(self, node, at):
        """Split into parts along ``axis``: sizes from the ``split`` input (opset >= 13) or attribute, or
        equal parts (``num_outputs`` from opset 18, else one per output; the last part may be smaller)."""
        data = self.get(node, 0)
        shp = self.shape(data)
        axis = int(at.get("axis", 0))
        if not -len(shp) <= axis < len(shp):
            raise self.err(node, f"axis {axis} out of range for shape {shp}")
        axis %= len(shp)
        n = shp[axis]
        sp = self.get(node, 1) if self.opset >= 13 else None
        if sp is not None:
            sizes = self.static_ints(node, sp, "split").tolist()
        elif "split" in at:
            sizes = list(at["split"])
        else:
            k = int(at.get("num_outputs", len(node.output)))
            part = -(-n // k)
            sizes = [min(part, n - i * part) for i in range(k)]
        if sum(sizes) != n or len(sizes) != len(node.output) or min(sizes, default=0) < 0:
            raise self.err(node, f"split sizes {sizes} do not cut axis {axis} of size {n} into "
                                 f"{len(node.output)} parts")
        outs, lo = [], 0
        for size, name in zip(sizes, node.output):
            key = [slice(None)] * len(shp)
            key[axis] = slice(lo, lo + size)
            if self.is_const(data):
                outs.append(_eval_const(lambda x, a=lo, b=lo + size: self.lc.ops.slice_axis(x, axis, a, b), data))
            else:
                outs.append(self.lc.ops.slice_axis(data, axis, lo, lo + size, name=name or None))
            lo += size
        return outs

    def layer_norm(self, node, at):
        """LayerNormalization (opset 17): outputs Y, Mean, InvStdDev over the dims ``axis..``; Scale and B
        broadcast to the normalised shape.  ``stash_type`` 1 asks for float32 statistics at least: libml
        computes them in double for every dtype."""
        lc = self.lc
        x, scale, bias = self.get(node, 0), self.get(node, 1), self.get(node, 2)
        if x is None or scale is None:
            raise self.err(node, "needs the inputs X and Scale")
        axis, eps = int(at.get("axis", -1)), float(at.get("epsilon", 1e-5))
        n_out = len(node.output)

        def fn(*v):
            return lc.layer_norm(v[0], v[1], v[2] if len(v) > 2 else None, axis=axis, eps=eps, return_stats=True)
        vals = [v for v in (x, scale, bias) if v is not None]
        try:
            if all(self.is_const(v) for v in vals):
                return list(_eval_const(fn, *vals))[:n_out]
            names = [o or None for o in node.output][:3]
            operands = [self.T(v, h) for v, h in zip(vals, [i for i in node.input if i])]
            return list(lc.layer_norm(operands[0], operands[1], operands[2] if len(operands) > 2 else None,
                                      axis=axis, eps=eps, return_stats=True, name=names))[:n_out]
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def rms_norm(self, node, at):
        """RMSNormalization (opset 23): Y = X / sqrt(mean(X^2) + epsilon) * Scale over the dims ``axis..``;
        statistics in double for every dtype (``stash_type`` asks for float32 at least)."""
        lc = self.lc
        x, scale = self.get(node, 0), self.get(node, 1)
        if x is None or scale is None:
            raise self.err(node, "needs the inputs X and Scale")
        axis, eps = int(at.get("axis", -1)), float(at.get("epsilon", 1e-5))
        try:
            if self.is_const(x) and self.is_const(scale):
                return _eval_const(lambda v, s: lc.rms_norm(v, s, axis=axis, eps=eps), x, scale)
            return lc.rms_norm(self.T(x, node.input[0]), self.T(scale, node.input[1]), axis=axis, eps=eps,
                               name=node.output[0])
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_conv(self, node, at):
        """Conv (opsets 1-22): X (N, C, L) or (N, C, H, W), W (M, C/group, *kernel), optional B (M,);
        strides, pads, dilations, group, auto_pad (NOTSET, SAME_UPPER, SAME_LOWER, VALID) and kernel_shape
        (checked against W).  3-D convolutions are refused, naming the node."""
        lc = self.lc
        x, w, b = self.get(node, 0), self.get(node, 1), self.get(node, 2)
        if x is None or w is None:
            raise self.err(node, "needs the inputs X and W")
        xs, ws = self.shape(x), self.shape(w)
        if len(xs) not in (3, 4):
            raise self.err(node, f"Conv input X has shape {tuple(xs)}; libml implements 1-D and 2-D convolutions "
                                 f"((N, C, L) or (N, C, H, W))")
        nd = len(xs) - 2
        kernel = at.get("kernel_shape")
        if kernel is not None and tuple(kernel) != tuple(ws[2:]):
            raise self.err(node, f"kernel_shape {tuple(kernel)} does not match W's shape {tuple(ws)}")
        auto_pad = at.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        kw = {"strides": tuple(at.get("strides", (1,) * nd)), "dilations": tuple(at.get("dilations", (1,) * nd)),
              "pads": tuple(at.get("pads", (0,) * (2 * nd))), "group": int(at.get("group", 1)), "auto_pad": auto_pad}

        def fn(*v):
            return lc.conv(v[0], v[1], v[2] if len(v) > 2 else None, **kw)
        vals = [v for v in (x, w, b) if v is not None]
        try:
            if all(self.is_const(v) for v in vals):
                return _eval_const(fn, *vals)
            operands = [self.T(v, h) for v, h in zip(vals, [i for i in node.input if i])]
            return lc.conv(operands[0], operands[1], operands[2] if len(operands) > 2 else None,
                           name=node.output[0] or None, **kw)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_conv_transpose(self, node, at):
        """ConvTranspose (opsets 1-22): X (N, C_in, L) or (N, C_in, H, W), W (C_in, C_out/group, *kernel),
        optional B (C_out,); strides, pads, dilations, group, output_padding, output_shape (which replaces
        pads), auto_pad and kernel_shape (checked against W), as ops_conv_transpose.resolve reads them.
        3-D transposed convolutions are refused, naming the node."""
        lc = self.lc
        x, w, b = self.get(node, 0), self.get(node, 1), self.get(node, 2)
        if x is None or w is None:
            raise self.err(node, "needs the inputs X and W")
        xs, ws = self.shape(x), self.shape(w)
        if len(xs) not in (3, 4):
            raise self.err(node, f"ConvTranspose input X has shape {tuple(xs)}; libml implements 1-D and 2-D "
                                 f"transposed convolutions ((N, C, L) or (N, C, H, W))")
        nd = len(xs) - 2
        kernel = at.get("kernel_shape")
        if kernel is not None and tuple(kernel) != tuple(ws[2:]):
            raise self.err(node, f"kernel_shape {tuple(kernel)} does not match W's shape {tuple(ws)}")
        auto_pad = at.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        oshape = at.get("output_shape")
        kw = {"strides": tuple(at.get("strides", (1,) * nd)), "dilations": tuple(at.get("dilations", (1,) * nd)),
              "pads": tuple(at.get("pads", (0,) * (2 * nd))), "group": int(at.get("group", 1)), "auto_pad": auto_pad,
              "output_padding": tuple(at.get("output_padding", (0,) * nd)),
              "output_shape": tuple(oshape) if oshape is not None else None}

        def fn(*v):
            return lc.conv_transpose(v[0], v[1], v[2] if len(v) > 2 else None, **kw)
        vals = [v for v in (x, w, b) if v is not None]
        try:
            if all(self.is_const(v) for v in vals):
                return _eval_const(fn, *vals)
            operands = [self.T(v, h) for v, h in zip(vals, [i for i in node.input if i])]
            return lc.conv_transpose(operands[0], operands[1], operands[2] if len(operands) > 2 else None,
                                     name=node.output[0] or None, **kw)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_pool(self, node, at):
        """MaxPool (outputs Y and the optional Indices) and AveragePool, 1-D and 2-D: kernel_shape, strides
        (default 1), pads, auto_pad, dilations, ceil_mode; MaxPool's storage_order, AveragePool's
        count_include_pad."""
        lc = self.lc
        x = self.get(node, 0)
        if x is None:
            raise self.err(node, "needs the input X")
        if len(self.shape(x)) not in (3, 4):
            raise self.err(node, f"{node.op_type} input X has shape {tuple(self.shape(x))}; libml implements 1-D and "
                                 f"2-D pooling ((N, C, L) or (N, C, H, W))")
        if "kernel_shape" not in at:
            raise self.err(node, "needs the attribute kernel_shape")
        nd = len(self.shape(x)) - 2
        auto_pad = at.get("auto_pad", b"NOTSET")
        kw = {"strides": tuple(at.get("strides", (1,) * nd)), "pads": tuple(at.get("pads", (0,) * (2 * nd))),
              "dilations": tuple(at.get("dilations", (1,) * nd)), "ceil_mode": int(at.get("ceil_mode", 0)),
              "auto_pad": auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)}
        k = tuple(at["kernel_shape"])
        if node.op_type == "MaxPool":
            def fn(v):
                return lc.max_pool(v, k, storage_order=int(at.get("storage_order", 0)), return_indices=True, **kw)
            n_out = max(1, len(node.output))
            names = [o or None for o in node.output][:2]
        else:
            def fn(v):
                return lc.avg_pool(v, k, count_include_pad=bool(at.get("count_include_pad", 0)), **kw)
            n_out, names = None, node.output[0] or None
        try:
            if self.is_const(x):
                out = _eval_const(fn, x)
            else:
                xt = self.T(x, node.input[0])
                if node.op_type == "MaxPool":
                    out = lc.max_pool(xt, k, storage_order=int(at.get("storage_order", 0)), return_indices=True,
                                      name=names, **kw)
                else:
                    out = lc.avg_pool(xt, k, count_include_pad=bool(at.get("count_include_pad", 0)), name=names,
                                      **kw)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None
        return list(out)[:n_out] if n_out is not None else out

    def op_resize(self, node, at):
        """Resize (opsets 10-19) and Upsample (7, 9): the roi, scales and sizes must be constants (folded
        here).  Resize-10 and Upsample map coordinates asymmetrically and round nearest as ONNX Runtime
        does ("simple": floor when growing, ceil when shrinking); from opset 11 every attribute is read
        (axes, keep_aspect_ratio_policy, antialias: opset 18)."""
        lc = self.lc
        x = self.get(node, 0)
        if x is None:
            raise self.err(node, "needs the input X")

        def const(i, what):
            v = self.get(node, i)
            if v is None:
                return None
            v = np.asarray(self.static_value(node, v, f"{node.op_type}'s {what} (input {i})")).reshape(-1)
            return v if v.size else None  # an empty tensor stands for an absent input
        def text(k, default):
            v = at.get(k, default)
            return v.decode() if isinstance(v, bytes) else str(v)
        mode = text("mode", "nearest")
        kw = {}
        if node.op_type == "Upsample" or self.opset < 11:
            scales = np.asarray(at["scales"], np.float32) if node.op_type == "Upsample" and self.opset < 9 and \
                "scales" in at else const(1, "scales")
            if scales is None:
                raise self.err(node, "needs the scales")
            mode = {"bilinear": "linear"}.get(mode, mode)
            kw.update(scales=scales.astype(np.float64), coordinate_transformation_mode="asymmetric",
                      nearest_mode="simple")
        else:
            roi, scales, sizes = const(1, "roi"), const(2, "scales"), const(3, "sizes")
            coord = text("coordinate_transformation_mode", "half_pixel")
            kw.update(scales=None if scales is None else scales.astype(np.float64), sizes=sizes,
                      coordinate_transformation_mode=coord, nearest_mode=text("nearest_mode", "round_prefer_floor"),
                      cubic_coeff_a=float(at.get("cubic_coeff_a", -0.75)),
                      exclude_outside=bool(at.get("exclude_outside", 0)), antialias=bool(at.get("antialias", 0)),
                      axes=at.get("axes"), keep_aspect_ratio_policy=text("keep_aspect_ratio_policy", "stretch"),
                      extrapolation_value=float(at.get("extrapolation_value", 0.0)), roi=roi)
            if coord == "tf_crop_and_resize" and roi is None:
                raise self.err(node, "coordinate_transformation_mode tf_crop_and_resize needs the roi input")
        if mode not in ("nearest", "linear", "cubic"):
            raise self.err(node, f"mode {mode!r} is not supported (libml resizes nearest, linear, cubic)")
        try:
            if self.is_const(x):
                return _eval_const(lambda v: lc.resize(v, mode=mode, **kw), x)
            return lc.resize(self.T(x, node.input[0]), mode=mode, name=node.output[0] or None, **kw)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def op_global_pool(self, node, at):
        """GlobalAveragePool / GlobalMaxPool: the mean / max over every spatial dim (2..), kept as 1s --
        the reduction family's kernels and gradients (a max's ties share the gradient, as PyTorch's amax)."""
        lc = self.lc
        x = self.get(node, 0)
        if x is None:
            raise self.err(node, "needs the input X")
        if len(self.shape(x)) < 3:
            raise self.err(node, f"{node.op_type} input X has shape {tuple(self.shape(x))}; expected (N, C, *spatial)")
        axes = tuple(range(2, len(self.shape(x))))
        fn = lc.mean if node.op_type == "GlobalAveragePool" else lc.max
        try:
            if self.is_const(x):
                return _eval_const(lambda v: fn(v, axis=axes, keepdims=True), x)
            return fn(self.T(x, node.input[0]), axis=axes, keepdims=True, name=node.output[0] or None)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None

    def dropout(self, node, at):
        """Dropout (opsets 7-22): outputs Y and the optional Mask (bool; X's type before opset 10).

        Opset >= 12: ratio (input 1, constant, default 0.5) and training_mode (input 2, constant, default
        False); a node not in training mode is the identity (Mask all True) -- what an eval-mode export holds.
        Opsets < 12 (ratio an attribute) leave the mode to the runtime, as do opset >= 12 nodes with
        training_mode True: both become ``lc.dropout``, the identity in ``run`` (eval mode) and a new mask per
        ``grad`` / ``step`` call; the ``seed`` attribute, if any, is its seed.  The training-mode Mask is
        ``dropout(ones) > 0`` with the same seed: the same mask."""
        lc = self.lc
        x = self.get(node, 0)
        if x is None:
            raise self.err(node, "needs the input data")

        def static(i, what, default):
            v = self.get(node, i) if self.opset >= 12 else None
            if v is None:
                return default
            if not self.is_const(v) and getattr(v, "op", None) == "param":
                v = v.value  # a float initializer (libml makes those params): its value
            if not self.is_const(v):
                raise self.err(node, f"{what} is computed at run time; libml needs it constant")
            if np.size(v) != 1:
                raise self.err(node, f"{what} must be a scalar, got shape {np.shape(v)}")
            return np.asarray(v).reshape(()).item()
        ratio = static(1, "ratio", float(at.get("ratio", 0.5)))
        training = bool(static(2, "training_mode", False)) if self.opset >= 12 else True
        shape = self.shape(x)
        mask_dtype = "bool" if self.opset >= 10 else self.dtype(x)  # (Dropout-7's Mask is of X's type)
        if not training or ratio == 0:
            return [x, np.ones(shape, mask_dtype)][:max(len(node.output), 1)]
        try:
            y = lc.dropout(self.T(x, node.input[0]), ratio, seed=at.get("seed"), name=node.output[0] or None)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None
        outs = [y]
        if len(node.output) > 1 and node.output[1]:
            ones = self.g.const(np.ones(shape, self.dtype(x)))
            d = lc.dropout(ones, ratio, seed=y.attrs["seed"])
            if mask_dtype == "bool":
                outs.append(lc.greater(d, 0.0, name=node.output[1]))
            else:
                outs.append(lc.cast(lc.greater(d, 0.0), mask_dtype, name=node.output[1]))
        return outs

    def batch_norm(self, node, at):
        """BatchNormalization (opsets 7-15+): ``lc.batch_norm`` over the channel axis 1.

        Training mode: ``training_mode=1`` (opset >= 14), or before opset 14 a node with the optional outputs
        (mean, var, saved_mean[, saved_var]).  Its outputs running_mean / running_var are the updated
        statistics; its input running statistics are buffers when they are initializers (state that every
        ``grad`` / ``step`` call updates), else only feed those outputs.  ONNX's momentum weighs the old
        statistic: libml's (PyTorch's) momentum is ``1 - momentum``.  The ONNX specification (and ONNX
        Runtime) update the running variance with the biased batch variance, PyTorch with the unbiased one;
        a model whose producer is PyTorch (``producer_name == "pytorch"``: its exporter writes training-mode
        BatchNorm for ``module.train()``) is imported with PyTorch's update, every other model with
        ONNX's.  Eval mode: normalised with the running statistics (graph ops, no update)."""
        lc = self.lc
        if self.opset < 7 or (self.opset < 9 and int(at.get("spatial", 1)) != 1):
            raise self.err(node, f"BatchNormalization of opset {self.opset} with spatial="
                                 f"{at.get('spatial', 1)} is not supported (libml normalises per channel: "
                                 f"opset >= 9, or opset 7/8 with spatial=1)")
        vals = [self.get(node, i) for i in range(5)]
        if any(v is None for v in vals):
            raise self.err(node, "needs the five inputs X, scale, B, input_mean, input_var")
        outs = [o for o in node.output]
        if self.opset >= 14:
            training = bool(int(at.get("training_mode", 0)))
        else:
            training = any(outs[1:])
        if not training and any(outs[1:]):
            raise self.err(node, "outputs beyond Y need training mode (training_mode=1)")
        if self.opset < 14 and len(outs) > 4 and outs[4]:
            raise self.err(node, "the saved_var output of opset < 14 BatchNormalization is not supported")
        x = vals[0]
        if self.is_const(x):
            raise self.err(node, "X is a constant; libml normalises computed tensors only")
        operands = [self.T(v, node.input[i]) for i, v in enumerate(vals)]
        mom = 1.0 - float(at.get("momentum", 0.9))
        eps = float(at.get("epsilon", 1e-5))
        unbiased = self.m.producer_name == "pytorch"
        try:
            if not training:
                return [lc.batch_norm(*operands, training=False, eps=eps, name=outs[0] or None)]
            names = [outs[0] or None, None, None] + [o or None for o in outs[1:3]]
            y, mean, rstd, nm, nv = lc.batch_norm(*operands, training=True, momentum=mom, eps=eps,
                                                  unbiased=unbiased, return_stats=True, name=names)
        except (TypeError, ValueError) as e:
            raise self.err(node, str(e)) from None
        # opset 14+: Y, running_mean, running_var; before: Y, mean, var, saved_mean (the batch mean)
        return [y, nm, nv, mean][:max(len(outs), 1)]

    def gemm(self, node, at):
        from .ops import REGISTRY
        lc = self.lc
        a, b, c = self.get(node, 0), self.get(node, 1), self.get(node, 2)
        alpha = float(at.get("alpha", 1.0))
        beta = float(at.get("beta", 1.0))
        ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
        out = node.output[0]
        if all(v is None or self.is_const(v) for v in (a, b, c)):
            # alpha (A' B') + beta C through the registry's matmul reference (ta/tb transpose the operands)
            y = alpha * REGISTRY["matmul"].ref({"ta": ta, "tb": tb}, a, b)
            if c is not None:
                y = y + beta * c
            return y.astype(a.dtype)
        dt = self.dtype(a)
        for v, nm in ((a, "A"), (b, "B")):
            if len(self.shape(v)) != 2:
                raise self.err(node, f"Gemm input {nm} must be 2-D, got shape {self.shape(v)}")
        A = self.T(a, node.input[0])
        B = self.T(b, node.input[1])
        if ta:
            A = self.transpose_const_or(A, a, node.input[0])
        if tb:
            B = self.transpose_const_or(B, b, node.input[1])
        last_is_mm = c is None or beta == 0.0
        y = lc.matmul(A, B, name=out if (last_is_mm and alpha == 1.0) else self.fresh(out))
        if alpha != 1.0:
            y = lc.mul(y, self.g.const(np.array(alpha, dtype=dt)),
                       name=out if last_is_mm else self.fresh(out))
        if c is not None and beta != 0.0:
            if self.is_const(c):
                cc = self.T((beta * c).astype(c.dtype) if beta != 1.0 else c,
                            node.input[2] if beta == 1.0 else None)
            else:
                cc = c if beta == 1.0 else lc.mul(c, self.g.const(np.array(beta, dtype=dt)), name=self.fresh(out))
            y = lc.add(y, cc, name=out)
        return y


    def transpose_const_or(self, t, orig, onnx_name):
        if self.is_const(orig):
            return self.g.const(np.ascontiguousarray(orig.T))
        return self.lc.transpose(t, (1, 0), name=self.fresh(onnx_name + "^T"))

    def reshape_target(self, node, at, shp) -> Tuple[int, ...]:
        op = node.op_type
        r = len(shp)
        size = int(np.prod(shp, dtype=np.int64))
        if op == "Reshape":
            tgt = self.static_ints(node, self.get(node, 1), "the target shape (input 1)")
            allowzero = int(at.get("allowzero", 0))
            new = []
            for i, s in enumerate(tgt):
                s = int(s)
                if s == 0 and not allowzero:
                    if i >= r:
                        raise self.err(node, f"shape {list(tgt)} copies dimension {i} of input shape {shp}, "
                                             f"which has only {r} dimensions")
                    s = shp[i]
                new.append(s)
            if new.count(-1) > 1:
                raise self.err(node, f"shape {list(tgt)} has more than one -1")
            if -1 in new:
                known = int(np.prod([s for s in new if s != -1], dtype=np.int64))
                if known == 0 or size % known:
                    raise self.err(node, f"cannot reshape {shp} to {list(tgt)}")
                new[new.index(-1)] = size // known
            if int(np.prod(new, dtype=np.int64)) != size or any(s < 0 for s in new):
                raise self.err(node, f"cannot reshape {shp} (size {size}) to {list(tgt)}")
            return tuple(new)
        if op == "Flatten":
            axis = int(at.get("axis", 1))
            if axis < 0:
                axis += r
            if not 0 <= axis <= r:
                raise self.err(node, f"axis {at.get('axis')} out of range for shape {shp}")
            return (int(np.prod(shp[:axis], dtype=np.int64)), int(np.prod(shp[axis:], dtype=np.int64)))
        # Squeeze / Unsqueeze: axes is an attribute before opset 13, an input from 13 on
        if self.opset >= 13:
            ax_in = self.get(node, 1)
            axes = None if ax_in is None else [int(a) for a in self.static_ints(node, ax_in, "axes (input 1)")]
        else:
            axes = at.get("axes")
            axes = None if axes is None else [int(a) for a in axes]
        if op == "Squeeze":
            if axes is None:
                return tuple(s for s in shp if s != 1)
            axes = sorted({a + r if a < 0 else a for a in axes})
            for a in axes:
                if not 0 <= a < r or shp[a] != 1:
                    raise self.err(node, f"cannot squeeze axis {a} of shape {shp}")
            return tuple(s for i, s in enumerate(shp) if i not in axes)
        if axes is None:
            raise self.err(node, "Unsqueeze needs axes")
        ro = r + len(axes)
        axes_n = sorted(a + ro if a < 0 else a for a in axes)
        if len(set(axes_n)) != len(axes_n) or any(not 0 <= a < ro for a in axes_n):
            raise self.err(node, f"invalid axes {axes} for input shape {shp}")
        it = iter(shp)
        return tuple(1 if i in axes_n else next(it) for i in range(ro))

    def gather(self, node, at):
        lc = self.lc
        data, idx = self.get(node, 0), self.get(node, 1)
        out = node.output[0]
        shp = self.shape(data)
        r = len(shp)
        axis = int(at.get("axis", 0))
        if axis < 0:
            axis += r
        if not 0 <= axis < r:
            raise self.err(node, f"axis {at.get('axis', 0)} out of range for shape {shp}")
        if not self.is_const(idx):
            # fed indices (token ids): range-checked at the feed boundary (plan index_inputs) when they come
            # straight from a graph input, else by the runtime as it reads them
            try:
                return lc.gather(self.T(data, node.input[0]), idx, axis=axis, name=out)
            except (TypeError, ValueError) as e:
                raise self.err(node, str(e)) from None
        idx = np.asarray(idx).astype(np.int64)
        n = shp[axis]
        if np.any(idx < -n) or np.any(idx >= n):
            raise self.err(node, f"indices {idx.tolist()} out of range for axis {axis} of size {n}")
        idx = np.where(idx < 0, idx + n, idx)
        if self.is_const(data):
            from .ops import REGISTRY
            return REGISTRY["gather"].ref({"axis": axis}, data, idx)
        return lc.gather(self.T(data), idx, axis=axis, name=out)

    def concat(self, node, at):
        lc = self.lc
        vals = [self.get(node, i) for i in range(len(node.input)) if node.input[i]]
        if "axis" not in at:
            raise self.err(node, "Concat needs an axis")
        shp0 = self.shape(vals[0])
        r = len(shp0)
        axis = int(at["axis"])
        if axis < 0:
            axis += r
        if not 0 <= axis < max(r, 1):
            raise self.err(node, f"axis {at['axis']} out of range for shape {shp0}")
        for v in vals:
            s = self.shape(v)
            if len(s) != r or any(a != b for i, (a, b) in enumerate(zip(s, shp0)) if i != axis):
                raise self.err(node, f"cannot concatenate shapes {[self.shape(v) for v in vals]} on axis {axis}")
        out = node.output[0]
        if all(self.is_const(v) for v in vals):
            from .ops import REGISTRY
            return REGISTRY["concat"].ref({"axis": axis}, *vals)
        return lc.concat([self.T(v) for v in vals], axis=axis, name=out)


# ----------------------------------------------------------------------------------------------------
# the reduction family: ONNX Reduce*, ArgMax/ArgMin, LogSoftmax
# ----------------------------------------------------------------------------------------------------

#: opset from which each Reduce* op takes ``axes`` as its second input (before: an attribute)
_AXES_INPUT_SINCE = {"ReduceSum": 13}


def _eval_const(build, *arrays):
    """The value of ``build(*consts)`` for constant ``arrays``: the lc expression is declared on a scratch
    graph and evaluated node by node with the registry's NumPy references -- constant folding through the
    same reference as the compiler's (no second NumPy copy of an op's semantics here)."""
    from .ir import Graph
    from .ops import ref_outputs
    g = Graph("onnx_fold")
    out = build(*[g.const(np.asarray(a)) for a in arrays])
    vals, outs = {}, {}
    for t in g.nodes:
        if t.op == "const":
            vals[t] = t.value
        elif t.op == "output":  # output k of a node with several: computed with the node
            vals[t] = outs[t.inputs[0]][t.attrs["index"]]
        else:
            with np.errstate(all="ignore"):
                outs[t] = ref_outputs(t, [vals[i] for i in t.inputs])
            vals[t] = outs[t][0]
    return tuple(vals[o] for o in out) if isinstance(out, tuple) else vals[out]


def _reduce_fn(lc, op):
    return {"ReduceSum": lc.sum, "ReduceMean": lc.mean, "ReduceMax": lc.max, "ReduceMin": lc.min,
            "ReduceProd": lc.prod, "ReduceSumSquare": lc.sum_square, "ReduceL1": lc.l1_norm,
            "ReduceL2": lc.l2_norm, "ReduceLogSum": lc.log_sum, "ReduceLogSumExp": lc.logsumexp}[op]


def _reduce_family(self, node, at):
    """Reduce* (axes as attribute before opset 18 -- 13 for ReduceSum -- and as optional input after;
    keepdims; noop_with_empty_axes), ArgMax/ArgMin (axis, keepdims, select_last_index), LogSoftmax
    (opset < 13: over the flattened axes from ``axis`` on, as Softmax)."""
    op = node.op_type
    if op == "LogSoftmax":
        return self.softmax(node, at)
    if op in ("ArgMax", "ArgMin"):
        return self._arg_node(node, at)
    x = self.get(node, 0)
    out = node.output[0]
    r = len(self.shape(x))
    if self.opset >= _AXES_INPUT_SINCE.get(op, 18):
        if "axes" in at:
            raise self.err(node, f"attribute 'axes' is not part of {op} in opset {self.opset} (an input since "
                                 f"opset {_AXES_INPUT_SINCE.get(op, 18)})")
        a = self.get(node, 1)
        axes = [] if a is None else [int(v) for v in self.static_ints(node, a, "axes")]
        noop = int(at.get("noop_with_empty_axes", 0))
    else:
        axes = [int(v) for v in at.get("axes", [])]
        noop = 0
    keepdims = bool(at.get("keepdims", 1))
    for v in axes:
        if not -r <= v < max(r, 1):
            raise self.err(node, f"axis {v} is out of range for shape {self.shape(x)}")
    axes = sorted({v % max(r, 1) for v in axes}) if r else []
    if not axes and noop:
        return x if self.is_const(x) else self.lc.identity(x, name=out)
    axes_t = tuple(axes) if axes else tuple(range(r))
    if self.dtype(x) == "bool" and op in ("ReduceMax", "ReduceMin"):
        # any / all: exact through 0/1 floats; over nothing, the identity (max: False, min: True)
        shp = self.shape(x)
        out_shape = tuple(1 if i in axes_t else d for i, d in enumerate(shp) if keepdims or i not in axes_t)
        if any(shp[i] == 0 for i in axes_t):
            return np.full(out_shape, op == "ReduceMin", dtype=bool)
        if self.is_const(x):
            f = np.max if op == "ReduceMax" else np.min
            return f(np.asarray(x), axis=axes_t, keepdims=keepdims)
        lc = self.lc
        xf = lc.cast(x, "float32", name=self.fresh(out))
        red = _reduce_fn(lc, op)(xf, axis=axes_t, keepdims=keepdims, name=self.fresh(out))
        return lc.cast(red, "bool", name=out)
    if x.dtype not in ("float32", "float64"):
        raise self.err(node, f"{op} of {x.dtype} data is not supported (libml reduces float32/float64 tensors)")
    if self.is_const(x):
        return _eval_const(lambda c: _reduce_fn(self.lc, op)(c, axis=axes_t, keepdims=keepdims), x)
    return _reduce_fn(self.lc, op)(x, axis=axes_t, keepdims=keepdims, name=out)


def _arg_node(self, node, at):
    x = self.get(node, 0)
    shp = self.shape(x)
    r = len(shp)
    axis = int(at.get("axis", 0))
    if not -r <= axis < r:
        raise self.err(node, f"axis {axis} is out of range for shape {shp}")
    axis %= r
    keepdims = bool(at.get("keepdims", 1))
    last = bool(at.get("select_last_index", 0))
    if x.dtype not in ("float32", "float64"):
        raise self.err(node, f"{node.op_type} of {x.dtype} data is not supported (float32/float64 only)")
    fn = self.lc.argmax if node.op_type == "ArgMax" else self.lc.argmin
    if self.is_const(x):
        return _eval_const(lambda c: fn(c, axis=axis, keepdims=keepdims, select_last=last), x)
    return fn(x, axis=axis, keepdims=keepdims, select_last=last, name=node.output[0])


_Importer.reduce_family = _reduce_family
_Importer._arg_node = _arg_node


def _matches(name: str, patterns) -> bool:
    import fnmatch
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(v, what: str) -> list:
    if v is None:
        return []
    v = [v] if isinstance(v, str) else list(v)
    if not all(isinstance(p, str) for p in v):
        raise TypeError(f"import_onnx: {what} must be names or glob patterns (strings), got {v!r}"[:300])
    return v


def import_onnx(model: Union[str, os.PathLike, Any], shapes: Optional[Mapping[str, Any]] = None,
                base_dir: Optional[Union[str, os.PathLike]] = None, params=None, constants=None):
    """Import an ONNX model (path, bytes or ``onnx.ModelProto``) into a new :class:`libml_compile.Graph`.

    ``shapes`` binds symbolic dimensions: ``{"input": (32, 64)}`` (full shape of an input) or
    ``{"batch": 32}`` (a ``dim_param`` name).  A conflict with a static dimension raises an error naming the
    input.  Raises :class:`UnsupportedOperatorError` for an operator libml does not support (before any
    other work) and :class:`ONNXImportError` for unreadable files, data-dependent shapes and bad shapes.
    ``base_dir``: the only folder external data is read from (default: the model file's folder; for bytes
    or a ModelProto with external data it is required).  See :func:`load_model`.

    Float initializers become trainable params or constants by how the model uses them
    (:func:`classify_initializers`: weights, biases, norm scales and embedding tables are params; scalars
    such as attention scales, GELU's constants and mask fill values are constants, never trained).
    ``params`` / ``constants``: names or glob patterns (``"encoder.layer.1.*"``) forcing initializers to
    be params / constants; a pattern that matches no float initializer is an error.
    """
    onnx = _onnx()
    import libml_compile as lc

    m, source = load_model(model, base_dir=base_dir)
    opset = check_supported(m, source)
    src = f" {source!r}" if source else ""
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise ONNXImportError(f"ONNX model{src} fails onnx.checker: {e}") from e
    init_names = {t.name for t in m.graph.initializer}
    data_inputs = [vi for vi in m.graph.input if vi.name not in init_names]
    input_shapes = _bind_shapes(m, data_inputs, shapes, source)

    # shape inference on a copy with the bound input shapes (validates the model; libml recomputes shapes)
    work = onnx.ModelProto()
    work.CopyFrom(m)
    for vi in work.graph.input:
        if vi.name in input_shapes:
            tt = vi.type.tensor_type
            tt.ClearField("shape")
            for s in input_shapes[vi.name]:
                tt.shape.dim.add().dim_value = int(s)
    try:
        work = onnx.shape_inference.infer_shapes(work, check_type=True, strict_mode=True)
    except Exception as e:
        raise ONNXImportError(f"ONNX shape inference failed for model{src} with input shapes "
                              f"{input_shapes}: {e}") from e

    used = set()
    for node in work.graph.node:
        used.update(i for i in node.input if i)
    used.update(vi.name for vi in work.graph.output)
    name = work.graph.name or (os.path.splitext(os.path.basename(source))[0] if source else "onnx_model")
    imp = _Importer(lc, work, opset, source, name)
    force_p, force_c = _patterns(params, "params"), _patterns(constants, "constants")
    classified = classify_initializers(work)
    roles = {k: r for k, (r, _) in classified.items()}
    for pats, what in ((force_p, "params"), (force_c, "constants")):
        for p in pats:
            if not any(_matches(k, [p]) for k in roles):
                raise ValueError(f"import_onnx: {what} pattern {p!r} matches no float initializer of the model "
                                 f"(they are {sorted(roles)[:20]}{' ...' if len(roles) > 20 else ''})")
    both = sorted(k for k in roles if _matches(k, force_p) and _matches(k, force_c))
    if both:
        raise ValueError(f"import_onnx: initializers {both[:10]} match both params and constants patterns")
    imp.roles = {k: "param" if _matches(k, force_p) else "constant" if _matches(k, force_c) else r
                 for k, r in roles.items()}
    try:
        g = imp.build(input_shapes, [vi for vi in work.graph.input if vi.name not in init_names], used)
    except ONNXImportError as e:
        if shapes and "shapes you bound" not in str(e):
            # a shape error deep in the graph (a sequence longer than a position table fails at the table's
            # Expand / Add) is caused by the sizes the caller chose: say which
            bound = ", ".join(f"{k} {tuple(v)}" for k, v in input_shapes.items())
            raise ONNXImportError(f"{e} (the shapes you bound: {bound}; a dimension larger than a table in the "
                                  f"model, e.g. a sequence longer than the position embedding, fails here)") from e
        raise
    g.meta["onnx_model"] = m
    g.meta["onnx_opset"] = opset
    g.meta["onnx_source"] = source
    g.meta["onnx_input_shapes"] = dict(input_shapes)
    g.meta["onnx_params"] = list(imp.param_names)
    g.meta["onnx_buffers"] = list(imp.buffer_names)  # running statistics: state, not params
    g.meta["onnx_constants"] = list(imp.constant_names)  # float initializers kept constant (not trained)
    tied = tied_initializers(work, classified)
    if tied:
        import warnings
        desc = "; ".join(f"{k!r} feeds {len(v)} nodes ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                         for k, v in list(tied.items())[:5])
        warnings.warn(f"import_onnx: {len(tied)} initializer(s) feed several weight slots, so training ties "
                      f"them: {desc}.  The dynamo exporter merges equal-valued initializers by default; export "
                      f"with optimize=False (or the TorchScript exporter, dynamo=False) to keep every parameter",
                      TiedParamsWarning, stacklevel=2)
    folded = folded_initializers(work, classified)
    if folded:
        import warnings
        warnings.warn(f"import_onnx: {len(folded)} param initializer(s) look like copies the exporter computed "
                      f"from weights (generated names: {', '.join(folded[:6])}{', ...' if len(folded) > 6 else ''}): "
                      f"a pre-transposed or pre-gathered copy trains, but it is not the module's weight and a "
                      f"pre-gathered embedding slice has lost the rest of its table.  Export with "
                      f"torch.onnx.export(..., dynamo=True, optimize=False) or dynamo=False to keep every "
                      f"parameter as it is in the module", FoldedWeightsWarning, stacklevel=2)
    return g
