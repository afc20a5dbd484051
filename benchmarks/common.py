"""Workload definitions shared by the benchmark runner and workers (defined in benchmarks/README.md)."""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

LR = 0.01
DATA_SEED = 1234
PARAM_SEED = 0
GEMM_N = 4096

# id -> spec.  kind: "mlp" (training step), "w4" (elementwise training step), "fwd" (W2 forward), "gemm",
# "w6" (ResNet-8 training step from W6.onnx), "w8" (ResNet-8 inference from W6_eval.onnx), "w7" (transformer)
WORKLOADS = {
    "W1": dict(kind="mlp", layers=[64, 128, 128, 10], batch=32, loss="xent"),
    "W2": dict(kind="mlp", layers=[784, 512, 512, 10], batch=128, loss="xent"),
    "W3": dict(kind="mlp", layers=[1024, 4096, 4096, 1024], batch=256, loss="mse"),
    "W4": dict(kind="w4", shape=(4096, 1024)),
    "W5-b1": dict(kind="fwd", layers=[784, 512, 512, 10], batch=1),
    "W5-b1024": dict(kind="fwd", layers=[784, 512, 512, 10], batch=1024),
    "GEMM": dict(kind="gemm", n=GEMM_N),
    # the ResNet-8 of ../shared/bench/workloads.md: W6 trains W6.onnx (BatchNorm in training mode) with
    # SGD lr 0.01 momentum 0.9; W8 is the inference of W6_eval.onnx (BN folded, dynamic batch) at 1 and 256
    "W6": dict(kind="w6", batch=32),
    "W8-b1": dict(kind="w8", batch=1),
    "W8-b256": dict(kind="w8", batch=256),
    # the transformer text classifier of ../shared/bench/workloads.md, trained from its reference export
    # (W7.onnx, params intact) with AdamW lr 1e-3, weight decay 0.01
    "W7": dict(kind="w7", batch=16, seq=64),
}
ORDER = list(WORKLOADS)
ALIASES = {"W5": ["W5-b1", "W5-b1024"], "W8": ["W8-b1", "W8-b256"]}

# which systems run which workload kinds
SYSTEMS = ["libml", "torch", "numpy", "torch_compile", "jax", "ort", "ort_training", "c_fused"]
SUPPORTS = {
    "libml": {"mlp", "w4", "fwd", "gemm"},
    "torch": {"mlp", "w4", "fwd", "gemm"},
    "numpy": {"mlp", "w4", "fwd", "gemm"},
    "torch_compile": {"mlp", "w4", "fwd"},
    "jax": {"mlp", "w4", "fwd", "gemm"},
    "ort": {"fwd", "w8"},
    "ort_training": {"w7", "w6"},  # ONNX Runtime Training, in its own venv ($LIBML_BENCH_ORTT_PYTHON)
    "c_fused": {"w4"},  # a reference point, not a competitor: W4 hand-fused in C (w4_fused.c)
}
for _s in ("libml", "torch", "torch_compile", "jax"):
    SUPPORTS[_s] = SUPPORTS[_s] | {"w7"}
for _s in ("libml", "torch", "torch_compile"):
    SUPPORTS[_s] = SUPPORTS[_s] | {"w6", "w8"}

#: where the reference exports of W6-W8 live (W7.onnx, W7_ref.npz): $LIBML_BENCH_MODELS, else the
#: workplace's shared folder next to the repository
BENCH_MODELS = os.environ.get("LIBML_BENCH_MODELS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "bench", "models")


def w7_files():
    """(W7.onnx path, the reference npz) or None when the files are not on this machine."""
    onnx_path, ref = os.path.join(BENCH_MODELS, "W7.onnx"), os.path.join(BENCH_MODELS, "W7_ref.npz")
    if not (os.path.exists(onnx_path) and os.path.exists(ref)):
        return None
    return onnx_path, np.load(ref)


def w6_files(kind="w6"):
    """(W6.onnx path, W6_ref.npz) for ``kind`` "w6", (W6_eval.onnx path, W6_eval_ref.npz) for "w8", or None
    when the files are not on this machine."""
    stem = "W6" if kind == "w6" else "W6_eval"
    onnx_path, ref = os.path.join(BENCH_MODELS, stem + ".onnx"), os.path.join(BENCH_MODELS, stem + "_ref.npz")
    if not (os.path.exists(onnx_path) and os.path.exists(ref)):
        return None
    return onnx_path, np.load(ref)


def w6_meta():
    """W6_meta.json: ``params`` (29 state_dict names = W6.onnx initializers), ``buffers`` (the BatchNorm
    running statistics and counters) and ``extra_outputs`` (W6.onnx outputs[1:], ``<buffer>.updated``)."""
    import json
    with open(os.path.join(BENCH_MODELS, "W6_meta.json")) as f:
        return json.load(f)


def missing_files(kind):
    """The Skip reason of a workload whose reference files are absent, else None."""
    if kind == "w7" and w7_files() is None:
        return f"W7.onnx / W7_ref.npz not found in {BENCH_MODELS} (set LIBML_BENCH_MODELS)"
    if kind in ("w6", "w8") and w6_files(kind) is None:
        stem = "W6" if kind == "w6" else "W6_eval"
        return f"{stem}.onnx / {stem}_ref.npz not found in {BENCH_MODELS} (set LIBML_BENCH_MODELS)"
    return None


#: W6: how far the first three losses may be from eager PyTorch's: W6_ref.npz loss0 and loss1 (after one
#: SGD step) and W6_LOSS2 (after two).  SGD-momentum's first step is plain SGD (PyTorch starts the buffer
#: at the gradient), so only loss2 sees the momentum: without it loss2 is 2.22857 (1e-2 away); lr 0.011
#: moves loss1 by 1.2e-3.  The same float32 math in another order stays near 1e-6 (float64: 2e-7).
W6_LOSS_TOL = 1e-4
#: the loss of the third W6 step (two SGD-momentum steps done) by eager PyTorch in float32 from the
#: W6_ref.npz weights and batch (float64: 2.218453063); ``run.py --selfcheck`` recomputes it
W6_LOSS2 = 2.2184529304504395


def check_w6_losses(system, losses):
    """Raise unless ``system``'s first three W6 losses match W6_ref.npz loss0 / loss1 and W6_LOSS2 to
    W6_LOSS_TOL: a system that trains another model (eval-mode BN, other weights) or applies another
    optimizer (no momentum, another lr) is not measured."""
    ref = w6_files("w6")[1]
    for step, (name, want) in enumerate((("loss0", float(ref["loss0"])), ("loss1", float(ref["loss1"])),
                                         ("loss2", W6_LOSS2))):
        got = losses[step] if step < len(losses) else None
        if got is None or not abs(got - want) <= W6_LOSS_TOL:
            src = "W6_ref.npz" if name != "loss2" else "common.W6_LOSS2 (eager PyTorch)"
            raise RuntimeError(f"W6 ({system}): {name} {got!r} differs from {src} {name} {want!r} "
                               f"by more than {W6_LOSS_TOL} (step {step + 1})")


#: W8: max |logits - W6_eval_ref.npz logits_b<batch>| (logits of size ~1; BN folded or not: ~1e-6)
W8_LOGIT_TOL = 1e-4


def check_w8_logits(system, wid, logits):
    """Raise unless ``system``'s W8 logits match W6_eval_ref.npz logits_b<batch> to W8_LOGIT_TOL."""
    batch = WORKLOADS[wid]["batch"]
    want = w6_files("w8")[1][f"logits_b{batch}"]
    got = np.asarray(logits)
    err = float(np.max(np.abs(got - want))) if got.shape == want.shape else None
    if err is None or not err <= W8_LOGIT_TOL:
        raise RuntimeError(f"{wid} ({system}): logits {got.shape} differ from W6_eval_ref.npz logits_b{batch} "
                           f"{want.shape}: max abs diff {err} > {W8_LOGIT_TOL}")
    return err


def w7_param_names():
    """The 28 parameter names of W7 (PyTorch state_dict names = W7.onnx initializer names), from
    W7_meta.json beside the reference files."""
    import json
    with open(os.path.join(BENCH_MODELS, "W7_meta.json")) as f:
        return json.load(f)["params"]


#: how far a system's W7 losses may be from eager PyTorch's (W7_ref.npz): the first step's (same
#: initial weights, same batch) and the second's (after one AdamW step).  float32 reorderings of the same
#: math stay below 1e-6 (JAX: 6e-8, 8e-7); Hugging Face-mode AdamW (decay after the update) moves loss1
#: by 6e-5; eps 1e-6 instead of 1e-8 moves the first 3 losses by up to 3e-4.
W7_LOSS_TOL = 1e-5


def check_w7_losses(system, loss0, loss1):
    """Raise unless ``system``'s first two W7 losses match the reference's loss0 / loss1 to W7_LOSS_TOL:
    a system that trains a different model or applies a different AdamW is not measured."""
    ref = w7_files()[1]
    for name, got in (("loss0", loss0), ("loss1", loss1)):
        want = float(ref[name])
        if got is None or not abs(got - want) <= W7_LOSS_TOL:
            raise RuntimeError(f"W7 ({system}): {name} {got!r} differs from W7_ref.npz {name} {want!r} "
                               f"by more than {W7_LOSS_TOL} (step {1 if name == 'loss0' else 2})")


def expand_workloads(text):
    out = []
    for w in text.split(","):
        w = w.strip()
        if not w:
            continue
        key = w.upper()
        if key in ALIASES:
            out.extend(ALIASES[key])
        else:
            match = [k for k in WORKLOADS if k.upper() == key]
            if not match:
                raise SystemExit(f"unknown workload {w!r}; known: {', '.join(ORDER)}, W5, W8")
            out.append(match[0])
    return [w for w in ORDER if w in out]


def weight_elements(layers):
    return sum(a * b for a, b in zip(layers[:-1], layers[1:]))


def flops(wid):
    s = WORKLOADS[wid]
    if s["kind"] == "mlp":
        return 6.0 * weight_elements(s["layers"]) * s["batch"]
    if s["kind"] == "fwd":
        return 2.0 * weight_elements(s["layers"]) * s["batch"]
    if s["kind"] == "gemm":
        return 2.0 * s["n"] ** 3
    if s["kind"] == "w7":
        return 2617270272.0  # ../shared/bench/models/README.md: 3 x the forward's 872,423,424
    if s["kind"] == "w6":
        return 2400313344.0  # the models README: 3 x the forward's 800,104,448 (batch 32)
    if s["kind"] == "w8":
        return 25003264.0 * s["batch"]  # the models README: W8b1 25,003,264; W8b256 6,400,835,584
    return None  # W4 is memory-bound; no FLOP figure


def builders():
    """The models/builders.py module, importable from the installed libml_models or the source tree."""
    try:
        from libml_models import builders as b  # installed package
        return b
    except ImportError:
        pass
    # not installed: load models/builders.py by path (never put the repo root on sys.path, which would
    # make the unbuilt source tree's libml_compile importable)
    import importlib.util
    name = "_libml_bench_builders"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "models", "builders.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def mlp_params(layers):
    return builders().mlp_init(layers, seed=PARAM_SEED)


def w4_params():
    return builders().w4_init(seed=PARAM_SEED)


def data(wid):
    """Fixed-seed random feeds for a workload, as NumPy arrays: dict name -> array."""
    s = WORKLOADS[wid]
    rng = np.random.default_rng(DATA_SEED)
    if s["kind"] in ("mlp", "fwd"):
        B, L = s["batch"], s["layers"]
        feeds = {"x": rng.standard_normal((B, L[0]), dtype=np.float32)}
        if s["kind"] == "mlp":
            if s["loss"] == "xent":
                feeds["y"] = rng.integers(0, L[-1], size=(B,)).astype(np.int64)
            else:
                feeds["y"] = rng.standard_normal((B, L[-1]), dtype=np.float32)
        return feeds
    if s["kind"] == "w4":
        return {"x": rng.standard_normal(s["shape"], dtype=np.float32)}
    if s["kind"] == "gemm":
        n = s["n"]
        return {"A": rng.standard_normal((n, n), dtype=np.float32),
                "B": rng.standard_normal((n, n), dtype=np.float32)}
    if s["kind"] == "w7":
        files = w7_files()
        if files is None:
            return {}
        ref = files[1]
        return {"tokens": np.ascontiguousarray(ref["tokens"]), "labels": np.ascontiguousarray(ref["labels"])}
    if s["kind"] in ("w6", "w8"):  # the reference batch of W6_ref.npz / W6_eval_ref.npz
        files = w6_files(s["kind"])
        if files is None:
            return {}
        ref = files[1]
        if s["kind"] == "w6":
            return {"x": np.ascontiguousarray(ref["x"]), "labels": np.ascontiguousarray(ref["labels"])}
        return {"x": np.ascontiguousarray(ref[f"x_b{s['batch']}"])}
    raise KeyError(wid)
