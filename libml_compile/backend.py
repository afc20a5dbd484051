"""An ``onnx.backend.base.Backend`` running ONNX models with libml (import_onnx -> compile -> run).

    import libml_compile.backend as backend
    rep = backend.prepare(model)            # checks the model and every operator up front
    outputs = rep.run([x])                  # or run({"x": x}); outputs in graph-output order

libml programs are static: a program is compiled for concrete input shapes.  ``BackendRep`` compiles on the
first ``run`` and caches one program per input-shape signature.  Integer graph inputs that the model uses
as *static operands* (the target shape of ``Reshape``, the axes of ``Squeeze``/``Unsqueeze``, the indices
of ``Gather``) are specialised: their values are folded into the model as constants and a program is
compiled (and cached) per distinct value.

``onnx.backend.test.BackendTest(LibmlBackend, __name__)`` can drive it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict

__all__ = ["LibmlBackend", "LibmlBackendRep", "prepare", "run_model", "run_node", "supports_device"]

# (op_type, input index) pairs whose value must be known at compile time
_STATIC_OPERANDS = {("Reshape", 1), ("Squeeze", 1), ("Unsqueeze", 1), ("Gather", 1)}


def _static_inputs(model) -> List[str]:
    names = {vi.name for vi in model.graph.input} - {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if (node.op_type, i) in _STATIC_OPERANDS and name in names and name not in out:
                out.append(name)
    return out


def _as_array(v) -> np.ndarray:
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    return np.asarray(v)


class LibmlBackendRep(BackendRep):
    """A prepared model: compiles lazily per input-shape signature (and per static-operand value)."""

    def __init__(self, model, device: str = "CPU", num_threads=None):
        self.model = model
        self.device = device
        self.num_threads = num_threads
        init = {t.name for t in model.graph.initializer}
        self.input_names = [vi.name for vi in model.graph.input if vi.name not in init]
        self.output_names = [vi.name for vi in model.graph.output]
        self.static_inputs = _static_inputs(model)
        self._cache: Dict[Any, Any] = {}

    def _program(self, feeds: Dict[str, np.ndarray]):
        import libml_compile as lc
        from libml_compile.onnx_import import import_onnx

        static = {n: feeds[n] for n in self.static_inputs}
        key = tuple((n, a.shape, a.dtype.str) for n, a in feeds.items() if n not in static) + tuple(
            (n, a.shape, a.dtype.str, a.tobytes()) for n, a in static.items())
        prog = self._cache.get(key)
        if prog is None:
            model = self.model
            if static:
                model = onnx.ModelProto()
                model.CopyFrom(self.model)
                keep = [vi for vi in model.graph.input if vi.name not in static]
                del model.graph.input[:]
                model.graph.input.extend(keep)
                for n, a in static.items():
                    model.graph.initializer.append(numpy_helper.from_array(a, name=n))
            shapes = {n: tuple(a.shape) for n, a in feeds.items() if n not in static}
            g = import_onnx(model, shapes=shapes)
            prog = lc.compile(g, num_threads=self.num_threads)
            self._cache[key] = prog
        return prog

    def run(self, inputs: Any, **kwargs: Any) -> Tuple[Any, ...]:
        if isinstance(inputs, dict):
            feeds = {k: _as_array(v) for k, v in inputs.items()}
        else:
            if isinstance(inputs, (np.ndarray, onnx.TensorProto)):
                inputs = [inputs]
            inputs = list(inputs)
            if len(inputs) != len(self.input_names):
                raise ValueError(f"model takes {len(self.input_names)} inputs {self.input_names}, "
                                 f"got {len(inputs)}")
            feeds = {n: _as_array(v) for n, v in zip(self.input_names, inputs)}
        prog = self._program(feeds)
        run_feeds = {n: a for n, a in feeds.items() if n not in self.static_inputs}
        res = prog.run(run_feeds)
        return namedtupledict("Outputs", self.output_names)(*[res[n] for n in self.output_names])


class LibmlBackend(Backend):
    """ONNX backend API on top of libml (CPU only)."""

    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs: Any) -> bool:
        from libml_compile.onnx_import import check_supported
        try:
            check_supported(model)
        except Exception:
            return False
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs: Any) -> LibmlBackendRep:
        from libml_compile.onnx_import import check_supported, load_model
        if not cls.supports_device(device):
            raise RuntimeError(f"libml backend: unsupported device {device!r} (CPU only)")
        model, source = load_model(model)
        check_supported(model, source)        # unsupported operators fail here, before any work
        super().prepare(model, device, **kwargs)  # onnx.checker
        return LibmlBackendRep(model, device, num_threads=kwargs.get("num_threads"))

    @classmethod
    def run_model(cls, model, inputs: Any, device: str = "CPU", **kwargs: Any) -> Tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs: Any, device: str = "CPU", outputs_info=None, **kwargs: Any):
        super().run_node(node, inputs, device=device, outputs_info=outputs_info, **kwargs)
        if isinstance(inputs, dict):
            arrays = [np.asarray(inputs[n]) for n in node.input if n]
        else:
            arrays = [np.asarray(a) for a in inputs]
        names = [n for n in node.input if n]
        vis = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
               for n, a in zip(names, arrays)]
        outs = []
        for i, n in enumerate(o for o in node.output if o):
            if outputs_info is not None and i < len(outputs_info):
                dt, shp = outputs_info[i]
                outs.append(onnx.helper.make_tensor_value_info(
                    n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)), shp))
            else:
                outs.append(onnx.helper.make_empty_tensor_value_info(n))
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        model = onnx.helper.make_model(onnx.helper.make_graph([node], "run_node", vis, outs),
                                       opset_imports=[onnx.helper.make_opsetid("", opset)])
        model = onnx.shape_inference.infer_shapes(model)
        rep = cls.prepare(model, device)
        return rep.run(arrays)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            return Device(device).type == DeviceType.CPU
        except Exception:
            return False


prepare = LibmlBackend.prepare
run_model = LibmlBackend.run_model
run_node = LibmlBackend.run_node
supports_device = LibmlBackend.supports_device
is_compatible = LibmlBackend.is_compatible
