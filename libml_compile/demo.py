"""``libml-compile demo``: train the bundled ONNX digits classifier from its random initial weights and
ship it back as ONNX.

1. import ``libml_models/classifier.onnx`` with ``lc.import_onnx``: a 64-64-10 Gemm/Relu MLP whose weights
   are *random* (He-uniform, seed 0, built by ``models/make_onnx_classifier.py``), so the demo trains a
   model from scratch; it is not fine-tuning pretrained weights;
2. split the bundled 8x8 digits (``libml_models.load_digits``) into train / validation / test (1,294 /
   144 / 359 images, fixed seeds); attach softmax cross-entropy to the ``logits`` output, ``lc.compile`` it
   and train with ``prog.step`` on the train part, printing validation accuracy after each epoch;
3. print train, validation and test accuracy (the test part is used once, at the end), export with
   ``lc.export_onnx`` and, when ONNX Runtime is installed, check that it computes the same logits as libml
   on the test part.

Files: only ``out`` when given.  Without ``out`` the model is exported into a temporary directory that is
removed before ``run_demo`` returns (``result["out"]`` is then None).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["run_demo", "classifier_path", "load_digits", "split_validation"]

DEMO_EPOCHS = 12
DEMO_LR = 0.005
DEMO_BATCH = 32
VAL_FRACTION = 0.1   # of the training part of load_digits(); the validation part picks nothing (fixed epochs)
VAL_SEED = 1


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


def split_validation(X, y, fraction: float = VAL_FRACTION, seed: int = VAL_SEED):
    """Split ``(X, y)`` into ``(X_train, y_train, X_val, y_val)`` by a fixed-seed permutation;
    the validation part has ``round(fraction * len(X))`` rows."""
    perm = np.random.default_rng(seed).permutation(len(X))
    nv = int(round(fraction * len(X)))
    va, tr = perm[:nv], perm[nv:]
    return X[tr], y[tr], X[va], y[va]


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
    """Run the demo; returns a dict with accuracies, timings, the export path (None when no ``out`` was
    given: the temporary export is removed) and the ONNX Runtime check result."""
    if out is not None:
        return _run_demo(out, epochs, progress, num_threads, check_ort, log)
    with tempfile.TemporaryDirectory(prefix="libml-demo-") as tmp:
        res = _run_demo(os.path.join(tmp, "classifier_trained.onnx"), epochs, progress, num_threads,
                        check_ort, log, keep=False)
    res["out"] = None
    return res


def _run_demo(out: str, epochs, progress, num_threads, check_ort, log, keep: bool = True) -> Dict[str, Any]:
    from .cli import finetune_arrays
    from .onnx_export import export_onnx

    t_start = time.perf_counter()
    model = classifier_path()
    Xtrain, ytrain, Xte, yte = load_digits()
    Xtr, ytr, Xva, yva = split_validation(Xtrain, ytrain)
    epochs = DEMO_EPOCHS if epochs is None else int(epochs)
    log(f"libml demo: training {os.path.basename(model)} (64-64-10 MLP, Gemm+Relu, randomly initialised "
        f"weights) on the 8x8 digits: {len(Xtr)} train / {len(Xva)} validation / {len(Xte)} test images, "
        f"{epochs} epochs, Adam lr {DEMO_LR}, batch {DEMO_BATCH}")
    t0 = time.perf_counter()
    prog, hist = finetune_arrays(model, Xtr, ytr, Xva, yva, epochs=epochs, lr=DEMO_LR, optimizer="adam",
                                 batch_size=DEMO_BATCH, progress=progress, num_threads=num_threads,
                                 log=log)
    train_time = time.perf_counter() - t0
    predict = prog._libml_predict
    logits_te = predict(Xte)
    train_acc = hist[-1]["train_acc"]
    val_acc = hist[-1]["val_acc"]
    test_acc = float(np.mean(np.argmax(logits_te, axis=1) == yte))
    log(f"train accuracy {train_acc:.2%}, validation accuracy {val_acc:.2%}, test accuracy {test_acc:.2%} "
        f"({train_time:.2f} s of training)")

    export_onnx(prog, out)
    log(f"exported the trained model to {out}" if keep else
        "exported the trained model to a temporary file for the check below (deleted at the end; "
        "--out PATH keeps it)")

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
    return {"ok": ok, "train_acc": train_acc, "val_acc": val_acc, "test_acc": test_acc,
            "train_seconds": train_time, "total_seconds": total, "out": out, "onnxruntime": ort_check,
            "history": hist}
