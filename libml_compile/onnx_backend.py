"""An ``onnx.backend.base.Backend`` running ONNX models with libml (import_onnx -> compile -> run).

    import libml_compile.onnx_backend as backend
    rep = backend.prepare(model)            # checks the model and every operator up front
    outputs = rep.run([x])                  # or run({"x": x}); outputs in graph-output order

libml programs are static: a program is compiled for concrete input shapes.  ``BackendRep`` compiles on the
first ``run`` and caches one program per input-shape signature.  Integer graph inputs that the model uses
as *static operands* (the target shape of ``Reshape``, the axes of ``Squeeze``/``Unsqueeze``, the indices
of ``Gather``) are specialised: their values are folded into the model as constants and a program is
compiled (and cached) per distinct value.

``onnx.backend.test.BackendTest(LibmlBackend, __name__)`` can drive it.

Conformance: ``python -m libml_compile.onnx_backend`` runs every official ONNX node test case (shipped with
the ``onnx`` package) whose operators libml supports and prints how many pass; see
:func:`discover_conformance_cases` for the (explicit, reasoned) exclusions.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Tuple

import numpy as np

import onnx
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict

__all__ = ["LibmlBackend", "LibmlBackendRep", "prepare", "run_model", "run_node", "supports_device",
           "discover_conformance_cases", "run_conformance_case", "EXCLUDED_CASES"]

# (op_type, input index) pairs whose value must be known at compile time
# (GatherND / GatherElements indices are live tensors: the cases feed them, range-checked on feed)
_STATIC_OPERANDS = {("Reshape", 1), ("Squeeze", 1), ("Unsqueeze", 1), ("Gather", 1), ("Split", 1), ("Expand", 1),
                    ("Tile", 1), ("Pad", 1), ("Pad", 2), ("Pad", 3),
                    ("ScatterND", 1), ("ScatterElements", 1)} | {("Slice", i) for i in range(1, 5)}
# ... and the axes input of the Reduce* ops (opset >= 18; ReduceSum >= 13)
_STATIC_OPERANDS |= {(op, 1) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                        "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
                                        "ReduceLogSumExp")}
# ... and Dropout's ratio and training_mode (opset >= 12)
_STATIC_OPERANDS |= {("Dropout", 1), ("Dropout", 2)}
# ... and Resize's roi, scales and sizes, Upsample's scales (opset 9)
_STATIC_OPERANDS |= {("Resize", 1), ("Resize", 2), ("Resize", 3), ("Upsample", 1)}


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
                if model.ir_version >= 4:  # before IR 4 every initializer must also be a graph input
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


# ----------------------------------------------------------------------------------------------------
# conformance with the official ONNX backend node test cases
# ----------------------------------------------------------------------------------------------------

#: Explicit per-case exclusions among the cases whose operators are all supported (keep minimal).
EXCLUDED_CASES = {
    "test_identity_sequence": "input is a sequence of tensors; libml graphs hold tensors only",
    "test_identity_opt": "input is an optional type; libml graphs hold tensors only",
}
UNSUPPORTED_ELEM_TYPE_REASON = (
    "uses an element type libml has no dtype for (libml: float32, float64, 8- to 64-bit ints, bool); "
    "float16/bfloat16/float8/float4/int4/int2/string tensors are not supported by the runtime")
DATA_DEPENDENT_REASON = (
    "an operand libml needs at compile time (a shape, slice bounds, Scatter indices) is computed "
    "from a graph input at run time; libml graphs are static")
RANDOM_OUTPUT_REASON = (
    "the expected output is a draw of the test generator's own random numbers (Dropout in training mode with a "
    "ratio > 0): libml's masks come from its Philox stream, and its run() is eval mode (tests/test_dropout.py "
    "checks the masks' statistics and the training semantics instead)")
INTEGER_OUTPUT_REASON = (
    "computes an integer tensor with an operator libml implements in floating point only (libml's integer "
    "kernels: Add/Sub/Mul/Div and data movement; onnx_import.integer_capable)")


@functools.lru_cache(maxsize=1)
def _load_node_cases_cached():
    return tuple(_load_node_cases())


def load_node_cases():
    """All official node test cases as ``(name, model, data_sets, rtol, atol)`` (cached)."""
    return list(_load_node_cases_cached())


def _load_node_cases():
    """All official node test cases as ``(name, model, data_sets, rtol, atol)``: from the generators in
    ``onnx.backend.test.case.node`` or, for older wheels, the files under onnx/backend/test/data/node."""
    import glob
    import os
    import warnings

    out = []
    try:
        from onnx.backend.test.case.node import collect_testcases
    except ImportError:  # pragma: no cover
        collect_testcases = None
    if collect_testcases is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = collect_testcases()
        out = [(c.name, c.model, c.data_sets, c.rtol, c.atol) for c in cases
               if c.model is not None and c.data_sets is not None]
        if out:
            return out
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")  # pragma: no cover
    for d in sorted(glob.glob(os.path.join(root, "test_*"))):  # pragma: no cover
        model = onnx.load(os.path.join(d, "model.onnx"))
        sets = []
        for ds in sorted(glob.glob(os.path.join(d, "test_data_set_*"))):
            def read(prefix):
                files = sorted(glob.glob(os.path.join(ds, f"{prefix}_*.pb")),
                               key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
                arrs = []
                for f in files:
                    t = onnx.TensorProto()
                    with open(f, "rb") as fh:
                        t.ParseFromString(fh.read())
                    arrs.append(t)
                return arrs
            sets.append((read("input"), read("output")))
        out.append((os.path.basename(d), model, sets, 1e-3, 1e-7))
    return out


def _elem_types(model):
    types = []
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types.append(vi.type.tensor_type.elem_type)
    types += [t.data_type for t in model.graph.initializer]
    for n in model.graph.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                types.append(a.i)
            if a.name == "value" and a.HasField("t"):
                types.append(a.t.data_type)
    return types


def _integer_output_ops(model) -> set:
    """The op types of the nodes computing an integer graph output from integer operands (ArgMax of floats
    gives int64 indices from floats: not an integer computation)."""
    def is_int(vi):
        return vi.type.HasField("tensor_type") and \
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).kind in "iub"
    ints = {vi.name for vi in model.graph.output if is_int(vi)}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {vi.name: is_int(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
                 + list(inferred.graph.output)}
    except Exception:  # noqa: BLE001 - without types, every integer output counts (the old rule)
        known = {}
    known.update({t.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).kind in "iub"
                  for t in model.graph.initializer})
    return {n.op_type for n in model.graph.node if ints.intersection(n.output)
            and (not n.input or known.get(n.input[0], True))}


def _computed_static_operand(model) -> bool:
    """Whether a compile-time operand (``_STATIC_OPERANDS``, bar Gather's indices, which may be live) is
    computed from graph inputs inside the model, so no feed can make it a constant."""
    from libml_compile.onnx_import import _constant_values
    const = _constant_values(model) | {vi.name for vi in model.graph.input}
    return any((n.op_type, i) in _STATIC_OPERANDS and n.op_type != "Gather" and name and name not in const
               and not (n.op_type == "Pad" and i == 2)  # (a constant_value may be a graph input: bound static)
               for n in model.graph.node for i, name in enumerate(n.input))


def _random_dropout(case) -> bool:
    """Whether a case runs a Dropout in training mode with a ratio > 0 (its expected output is random)."""
    model, sets = case[1], case[2]
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in init]
    for node in model.graph.node:
        if node.op_type != "Dropout" or len(node.input) < 3 or not node.input[2]:
            continue
        for inputs, _ in sets:
            vals = dict(init, **{n: _as_array(v) for n, v in zip(names, inputs)})
            mode = vals.get(node.input[2])
            ratio = vals.get(node.input[1]) if node.input[1] else np.asarray(0.5)
            if mode is not None and bool(np.asarray(mode)) and (ratio is None or float(np.asarray(ratio)) > 0):
                return True
    return False


#: attribute values of supported operators that libml does not implement, with the reason (none today: the
#: Scatter reductions mul, max and min run since ops_index.py)
UNSUPPORTED_VARIANTS: Dict[Tuple[str, str], Tuple[str, ...]] = {}
UNSUPPORTED_VARIANT_REASON = "uses an attribute value libml does not implement"


def _unsupported_variant(model) -> bool:
    for n in model.graph.node:
        for a in n.attribute:
            bad = UNSUPPORTED_VARIANTS.get((n.op_type, a.name))
            if bad and onnx.helper.get_attribute_value(a).decode() in bad:
                return True
    return False


#: operators libml implements for 1 and 2 spatial dims only (ops_conv.py, ops_pool.py)
SPATIAL_2D_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")
SPATIAL_3D_REASON = "uses a 3-D convolution or pooling (libml implements 1-D and 2-D; the importer refuses 3-D)"


def _spatial_3d(model) -> bool:
    """Whether a Conv / MaxPool / AveragePool node works on more than two spatial dims (its kernel_shape,
    or its data input's rank when that is a graph input)."""
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in model.graph.input}
    for n in model.graph.node:
        if n.op_type not in SPATIAL_2D_OPS:
            continue
        ks = [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "kernel_shape"]
        if (ks and len(ks[0]) > 2) or ranks.get(n.input[0], 0) > 4:
            return True
    return False


def discover_conformance_cases(cases=None):
    """Split the official node cases whose ops are all supported into ``(runnable, excluded)``;
    ``excluded`` maps case name -> reason."""
    from libml_compile.onnx_import import SUPPORTED_DTYPES, SUPPORTED_OPS, integer_capable

    def elem_ok(et):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)).name in SUPPORTED_DTYPES
        except Exception:
            return False

    runnable, excluded = [], {}
    for case in (load_node_cases() if cases is None else cases):
        name, model = case[0], case[1]
        if not {n.op_type for n in model.graph.node} <= set(SUPPORTED_OPS):
            continue
        if name in EXCLUDED_CASES:
            excluded[name] = EXCLUDED_CASES[name]
        elif not all(elem_ok(et) for et in _elem_types(model)):
            excluded[name] = UNSUPPORTED_ELEM_TYPE_REASON
        elif not all(integer_capable(op) for op in _integer_output_ops(model)):
            excluded[name] = INTEGER_OUTPUT_REASON
        elif _computed_static_operand(model):
            excluded[name] = DATA_DEPENDENT_REASON
        elif _unsupported_variant(model):
            excluded[name] = UNSUPPORTED_VARIANT_REASON
        elif _spatial_3d(model):
            excluded[name] = SPATIAL_3D_REASON
        elif _random_dropout(case):
            excluded[name] = RANDOM_OUTPUT_REASON
        else:
            runnable.append(case)
    return runnable, excluded


def run_conformance_case(case) -> None:
    """Run one case through prepare/run; AssertionError on mismatch (dtype, shape, values)."""
    name, model, sets, rtol, atol = case
    rep = LibmlBackend.prepare(model)
    for inputs, expected in sets:
        got = rep.run([_as_array(i) for i in inputs])
        assert len(got) == len(expected), f"{name}: {len(got)} outputs, expected {len(expected)}"
        for i, (r, e) in enumerate(zip(got, expected)):
            e = _as_array(e)
            r = np.asarray(r)
            assert r.dtype == e.dtype, f"{name} output {i}: dtype {r.dtype}, expected {e.dtype}"
            assert r.shape == e.shape, f"{name} output {i}: shape {r.shape}, expected {e.shape}"
            np.testing.assert_allclose(r, e, rtol=rtol, atol=atol, err_msg=f"{name} output {i}")


def main(argv=None) -> int:
    """``python -m libml_compile.onnx_backend [-v]``: run the conformance cases, print the counts."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    runnable, excluded = discover_conformance_cases()
    failed = {}
    for case in runnable:
        try:
            run_conformance_case(case)
        except Exception as e:  # noqa: BLE001
            failed[case[0]] = f"{type(e).__name__}: {e}"
        else:
            if "-v" in argv:
                print(f"PASS {case[0]}")
    passed = len(runnable) - len(failed)
    print(f"ONNX conformance (onnx {onnx.__version__}): {passed}/{len(runnable)} node test cases with "
          f"supported operators pass; {len(excluded)} excluded")
    reasons: Dict[str, list] = {}
    for k, r in excluded.items():
        reasons.setdefault(r, []).append(k)
    for r, names in reasons.items():
        print(f"  {len(names):4d} excluded: {r}" + (f" ({', '.join(names)})" if len(names) <= 4 else ""))
    for k, v in failed.items():
        print(f"FAIL {k}: {v}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
