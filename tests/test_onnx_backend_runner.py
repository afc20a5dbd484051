"""``onnx.backend.test.BackendTest`` driving ``libml_compile.onnx_backend``.

Included: the official node cases libml runs (the same discovery as test_onnx_conformance) and the model
test data the onnx wheel ships (pytorch-converted, pytorch-operator, simple), for which the runner itself
skips models with unsupported operators through ``LibmlBackend.is_compatible``.  Every compatible model
must match its expected outputs.
"""
import os

import pytest

pytest.importorskip("onnx")
import onnx  # noqa: E402
import onnx.backend.test  # noqa: E402

from libml_compile import onnx_backend as backend  # noqa: E402

_data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
_models = sorted(n for sub in ("pytorch-converted", "pytorch-operator", "simple")
                 if os.path.isdir(os.path.join(_data, sub)) for n in os.listdir(os.path.join(_data, sub)))
_runnable, _ = backend.discover_conformance_cases()
_names = sorted({c[0] for c in _runnable} | set(_models))

backend_test = onnx.backend.test.BackendTest(backend.LibmlBackend, __name__)
backend_test.include(r"^(" + "|".join(_names) + r")_cpu$")
globals().update(backend_test.test_cases)
