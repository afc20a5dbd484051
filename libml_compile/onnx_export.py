"""Export a fine-tuned program back to ONNX.

Export is "swap the initializers": the original ``ModelProto`` that :func:`import_onnx` kept in
``graph.meta["onnx_model"]`` is copied, each initializer whose name is a param of the program gets the
program's current value (same name, dtype and shape; buffers, such as BatchNorm's running statistics, too), and everything else — opset, IR version, metadata,
input/output names, the forward graph itself — is kept as it was.  The result passes ``onnx.checker`` and
is written with ``libml_runtime.fileio.atomic_write`` (unique temporary file in the target directory,
mode ``0o666 & ~umask``, fsync, ``os.replace``; a symlink's target is replaced; devices, FIFOs and
directories are refused).  A model beyond protobuf's 2 GiB limit is written as ``PATH`` plus its
tensors in ``PATH.data`` (both atomically, the data file first).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

__all__ = ["export_onnx", "updated_model"]

_EXTERNAL_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB
_EXTERNAL_MIN_TENSOR = 1024          # smaller initializers stay inline in an external-data export


def _source_model(prog_or_graph):
    graph = getattr(prog_or_graph, "graph", prog_or_graph)
    meta = getattr(graph, "meta", None) or {}
    m = meta.get("onnx_model")
    if m is None:
        raise ValueError("export_onnx: the program was not compiled from an imported ONNX model "
                         "(graph.meta['onnx_model'] is missing); use lc.import_onnx to build the graph")
    return m


def updated_model(prog, params: Optional[Mapping[str, np.ndarray]] = None):
    """Return a copy of the original ModelProto with initializers replaced by ``prog.params``."""
    import onnx
    from onnx import numpy_helper

    src = _source_model(prog)
    if params is None:
        # the params and the buffers (BatchNorm's running statistics, updated by training)
        params = dict(prog.params)
        params.update(getattr(prog, "buffers", None) or {})
    m = onnx.ModelProto()
    m.CopyFrom(src)
    by_name = {t.name: i for i, t in enumerate(m.graph.initializer)}
    missing = sorted(n for n in params if n not in by_name)
    if missing:
        raise ValueError(f"export_onnx: params {missing} are not initializers of the original ONNX model; "
                         f"export only swaps initializer values and cannot add new tensors")
    for name, value in params.items():
        i = by_name[name]
        old = m.graph.initializer[i]
        old_dtype = numpy_helper.to_array(old).dtype if old.data_type else np.asarray(value).dtype
        old_shape = tuple(old.dims)
        arr = np.asarray(value)
        if arr.shape != old_shape:
            raise ValueError(f"export_onnx: param {name!r} has shape {arr.shape}, but the ONNX initializer "
                             f"has shape {old_shape}")
        new = numpy_helper.from_array(np.ascontiguousarray(arr.astype(old_dtype, copy=False)), name=name)
        if old.doc_string:
            new.doc_string = old.doc_string
        m.graph.initializer[i].CopyFrom(new)
    return m


def export_onnx(prog, path: "str | os.PathLike", check: bool = True) -> str:
    """Write the original forward ONNX graph of ``prog`` with its current params to ``path`` (atomically).

    Returns the path written.  Raises ``ValueError`` if ``prog`` was not built from an imported ONNX model
    or has params that are not initializers of that model.
    """
    import onnx

    m = updated_model(prog)
    if check:
        try:
            onnx.checker.check_model(m)
        except Exception as e:
            raise ValueError(f"export_onnx: the exported model fails onnx.checker: {e}") from e
    from libml_runtime.fileio import atomic_write

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if m.ByteSize() > _EXTERNAL_THRESHOLD:  # beyond protobuf's limit: tensors go to PATH.data
        chunks = _move_to_external(m, os.path.basename(path) + ".data")
        atomic_write(path + ".data", lambda f: [f.write(c) for c in chunks], what="ONNX external data")
    atomic_write(path, m.SerializeToString(), what="ONNX output")
    return path


def _move_to_external(m, location: str) -> list:
    """Move every initializer of ``m`` holding at least ``_EXTERNAL_MIN_TENSOR`` bytes of raw data to the external file
    ``location`` (relative to the model's folder).  Returns the file's chunks, in order; each tensor's
    offset is a multiple of 4096 (what onnx itself writes)."""
    from onnx import TensorProto, numpy_helper

    chunks, pos = [], 0
    for t in m.graph.initializer:
        if not t.HasField("raw_data"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
        if len(t.raw_data) < _EXTERNAL_MIN_TENSOR:
            continue
        pad = -pos % 4096
        if pad:
            chunks.append(b"\0" * pad)
            pos += pad
        data = t.raw_data
        chunks.append(data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for k, v in (("location", location), ("offset", str(pos)), ("length", str(len(data)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        pos += len(data)
    return chunks
