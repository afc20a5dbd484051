"""``libml-compile demo``: fine-tune the bundled ONNX digits classifier and ship it back as ONNX.

1. import ``libml_models/classifier.onnx`` (a randomly initialised 64-64-10 Gemm/Relu MLP built by
   ``models/make_onnx_classifier.py``) with ``lc.import_onnx``;
2. attach softmax cross-entropy to its ``logits`` output, ``lc.compile`` it and train with ``prog.step`` on
   the bundled 8x8 digits (``libml_models.load_digits``), with a progress bar;
3. print train/test accuracy, export with ``lc.export_onnx`` and, when ONNX Runtime is installed, check
   that it computes the same logits as libml on the test set.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["run_demo", "classifier_path", "load_digits"]

DEMO_EPOCHS = 12
DEMO_LR = 0.005
DEMO_BATCH = 32


def classifier_path() -> str:
    """Path of the bundled ``classifier.onnx`` (installed package data, or the source tree)."""
    try:
        from importlib import resources
        p = resources.files("libml_models").joinpath("classifier.onnx")
        if p.is_file():
            return str(p)
    except Exception:
        pass
    here = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "models", "classifier.onnx")
    if os.path.exists(here):
        return os.path.normpath(here)
    raise FileNotFoundError("classifier.onnx not found: install libml (package libml_models) or run "
                            "models/make_onnx_classifier.py")


def load_digits():
    """``(Xtr, ytr, Xte, yte)`` from ``libml_models.load_digits`` (float32 pixels / 16, int64 labels)."""
    try:
        import libml_models
    except ImportError:  # running from the source tree without installing
        import importlib.util
        import sys
        root = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "models")
        spec = importlib.util.spec_from_file_location("libml_models", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        libml_models = importlib.util.module_from_spec(spec)
        sys.modules["libml_models"] = libml_models
        spec.loader.exec_module(libml_models)
    return libml_models.load_digits()


def run_demo(out: Optional[str] = None, epochs: Optional[int] = None, progress: bool = True,
             num_threads: Optional[int] = None, check_ort: bool = True, log=print) -> Dict[str, Any]:
    """Run the demo; returns a dict with accuracies, timings, the export path and the ORT check result."""
    from .cli import finetune_arrays
    from .onnx_export import export_onnx

    t_start = time.perf_counter()
    model = classifier_path()
    Xtr, ytr, Xte, yte = load_digits()
    epochs = DEMO_EPOCHS if epochs is None else int(epochs)
    log(f"libml demo: fine-tuning {os.path.basename(model)} (64-64-10 MLP, Gemm+Relu) on the 8x8 digits: "
        f"{len(Xtr)} train / {len(Xte)} test samples, {epochs} epochs, Adam lr {DEMO_LR}, batch {DEMO_BATCH}")
    t0 = time.perf_counter()
    prog, hist = finetune_arrays(model, Xtr, ytr, Xte, yte, epochs=epochs, lr=DEMO_LR, optimizer="adam",
                                 batch_size=DEMO_BATCH, progress=progress, num_threads=num_threads,
                                 log=log)
    train_time = time.perf_counter() - t0
    predict = prog._libml_predict
    logits_te = predict(Xte)
    train_acc = hist[-1]["train_acc"]
    test_acc = float(np.mean(np.argmax(logits_te, axis=1) == yte))
    log(f"train accuracy {train_acc:.2%}, test accuracy {test_acc:.2%} ({train_time:.2f} s of training)")

    if out is None:
        out = os.path.join(tempfile.mkdtemp(prefix="libml-demo-"), "classifier_finetuned.onnx")
    export_onnx(prog, out)
    log(f"exported the fine-tuned model to {out}")

    ort_check: Any = None
    if check_ort:
        try:
            import onnxruntime as ort
        except ImportError:
            log("onnxruntime is not installed: skipping the ONNX Runtime check")
        else:
            sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
            ref = sess.run(None, {sess.get_inputs()[0].name: Xte.astype(np.float32)})[0]
            diff = float(np.max(np.abs(ref - logits_te)))
            same = bool(np.allclose(ref, logits_te, rtol=1e-5, atol=1e-5))
            ort_acc = float(np.mean(np.argmax(ref, axis=1) == yte))
            ort_check = {"max_abs_diff": diff, "match": same, "test_acc": ort_acc}
            log(f"ONNX Runtime {ort.__version__} on the exported model: test accuracy {ort_acc:.2%}, "
                f"max |logits difference| vs libml {diff:.2e} -> {'OK' if same else 'MISMATCH'}")
    total = time.perf_counter() - t_start
    ok = test_acc >= 0.95 and (ort_check is None or ort_check["match"])
    log(f"demo {'passed' if ok else 'FAILED'} in {total:.2f} s")
    return {"ok": ok, "train_acc": train_acc, "test_acc": test_acc, "train_seconds": train_time,
            "total_seconds": total, "out": out, "onnxruntime": ort_check, "history": hist}
