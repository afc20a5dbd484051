"""One benchmark measurement in its own process: ``python benchmarks/worker.py --system S --workload W``.

Prints one JSON object on the last stdout line: median ms per step, all step times, peak RSS, the
BLAS/OpenMP libraries loaded (threadpoolctl), the first-step loss (for cross-checking systems), setup
and compile times.  A system that is not installed prints ``{"skipped": reason}``; a failure prints
``{"error": ...}``.  Threads: 2 (set by the runner's environment and again here).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402

THREADS = 2


class Skip(Exception):
    pass


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------- systems
# Each setup_<system>(wid, spec, feeds) returns (fn, info): fn() runs one step / forward and returns
# something whose float() is the loss (training) or an array (forward), fully computed (synchronised).

def setup_numpy(wid, spec, feeds):
    import np_impl

    k = spec["kind"]
    if k == "mlp":
        step, _ = np_impl.make_mlp_step(common.mlp_params(spec["layers"]), feeds["x"], feeds["y"],
                                        loss=spec["loss"], lr=common.LR)
        return step, {}
    if k == "w4":
        a, b, c = common.w4_params()
        step, _ = np_impl.make_w4_step(a, b, c, feeds["x"], lr=common.LR)
        return step, {}
    if k == "fwd":
        return np_impl.make_forward(common.mlp_params(spec["layers"]), feeds["x"]), {}
    if k == "gemm":
        A, B = feeds["A"], feeds["B"]
        C = np.empty_like(A)
        return (lambda: np.matmul(A, B, out=C)), {}
    raise Skip(k)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise Skip(f"torch not installed ({e})")
    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def _torch_model(torch, layers):
    nn = torch.nn
    mods = []
    inits = common.mlp_params(layers)
    for i, (w, b) in enumerate(inits):
        lin = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if i < len(inits) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _w7_torch(torch, ref):
    """W7 as the eager PyTorch module it was exported from, with the reference initial weights."""
    nn = torch.nn

    class W7(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(1000, 128), nn.Embedding(64, 128)
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, dropout=0.0, activation="gelu",
                                           batch_first=True) for _ in range(2))
            self.fc = nn.Linear(128, 2)

        def forward(self, tokens):
            h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
            for layer in self.layers:
                h = layer(h)
            return self.fc(h.mean(dim=1))
    m = W7()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.from_numpy(np.ascontiguousarray(ref["init/" + n])))
    return m


def _w6_torch(torch, kind):
    """W6's ResNet-8 (w6_torch.py) with every parameter and buffer from W6_ref.npz (``kind`` "w6") or
    W6_eval_ref.npz ("w8") ``init/*``."""
    import w6_torch

    why = common.missing_files(kind)
    if why:
        raise Skip(why)
    return w6_torch.load_reference(torch, common.w6_files(kind)[1])


def setup_torch(wid, spec, feeds, compiled=False):
    torch = _torch()
    F = torch.nn.functional
    cfg = torch.__config__.show()
    blas = [ln.split("BLAS_INFO=")[1].split(",")[0] for ln in cfg.splitlines() if "BLAS_INFO=" in ln]
    info = {"version": torch.__version__,
            "kernels": f"BLAS_INFO={blas[0] if blas else '?'}, mkldnn={torch.backends.mkldnn.is_available()}"
                       " (statically linked, not visible to threadpoolctl)"}
    k = spec["kind"]
    t = {n: torch.from_numpy(v) for n, v in feeds.items()}
    make_opt = lambda ps: torch.optim.SGD(ps, lr=common.LR)  # noqa: E731  (W1-W4; W7 trains with AdamW)
    if k == "gemm":
        if compiled:
            raise Skip("not run")
        A, B = t["A"], t["B"]
        C = torch.empty_like(A)
        return (lambda: torch.matmul(A, B, out=C)), info
    if k in ("fwd", "w8"):
        if k == "fwd":
            model = _torch_model(torch, spec["layers"]).eval()
        else:  # W8: the ResNet-8 in eval mode (BatchNorm on the running statistics), W6_eval_ref.npz weights
            model = _w6_torch(torch, "w8").eval()
        if compiled:
            model = torch.compile(model)
        x = t["x"]

        def fwd():
            with torch.inference_mode():
                return model(x)
        return fwd, info
    if k == "mlp":
        model = _torch_model(torch, spec["layers"])
        params = list(model.parameters())
        x, y = t["x"], t["y"]
        lossf = F.cross_entropy if spec["loss"] == "xent" else F.mse_loss

        def loss_fn(x, y):
            return lossf(model(x), y)
    elif k == "w7":
        files = common.w7_files()
        if files is None:
            raise Skip(f"W7.onnx / W7_ref.npz not found in {common.BENCH_MODELS} (set LIBML_BENCH_MODELS)")
        model = _w7_torch(torch, files[1])
        params = list(model.parameters())
        x, y = t["tokens"], t["labels"]

        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)
        make_opt = lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01)  # noqa: E731
    elif k == "w6":
        model = _w6_torch(torch, "w6")  # train mode: batch statistics, running statistics updated
        params = list(model.parameters())
        x, y = t["x"], t["labels"]

        def loss_fn(x, y):
            return F.cross_entropy(model(x), y)
        make_opt = lambda ps: torch.optim.SGD(ps, lr=common.LR, momentum=0.9)  # noqa: E731
    elif k == "w4":
        a, b, c = (torch.nn.Parameter(torch.from_numpy(v.copy())) for v in common.w4_params())
        params = [a, b, c]
        x = t["x"]
        y = None

        def loss_fn(x, y):
            return (torch.sigmoid(x * a + b) / (1 + torch.relu(x - c))).mean()
    else:
        raise Skip(k)
    if compiled:
        loss_fn = torch.compile(loss_fn)
    opt = make_opt(params)

    def step():
        opt.zero_grad(set_to_none=True)
        L = loss_fn(x, y)
        L.backward()
        opt.step()
        return L.item()
    return step, info


def setup_torch_compile(wid, spec, feeds):
    return setup_torch(wid, spec, feeds, compiled=True)


def setup_jax(wid, spec, feeds):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        raise Skip(f"jax not installed ({e})")
    info = {"version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "kernels": "XLA:CPU own/Eigen kernels (not visible to threadpoolctl)"}
    k = spec["kind"]
    j = {n: jnp.asarray(v) for n, v in feeds.items()}
    lr = common.LR
    if k == "gemm":
        f = jax.jit(jnp.matmul)
        A, B = j["A"], j["B"]
        return (lambda: f(A, B).block_until_ready()), info
    if k in ("mlp", "fwd"):
        params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in common.mlp_params(spec["layers"])]

        def forward(params, x):
            h = x
            for i, (w, b) in enumerate(params):
                h = h @ w + b
                if i < len(params) - 1:
                    h = jax.nn.relu(h)
            return h

        if k == "fwd":
            f = jax.jit(forward)
            x = j["x"]
            return (lambda: f(params, x).block_until_ready()), info

        if spec["loss"] == "xent":
            def loss_fn(params, x, y):
                z = forward(params, x)
                lse = jax.nn.logsumexp(z, axis=1)
                return jnp.mean(lse - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])
        else:
            def loss_fn(params, x, y):
                return jnp.mean((forward(params, x) - y) ** 2)
        x, y = j["x"], j["y"]
    elif k == "w4":
        params = tuple(jnp.asarray(v) for v in common.w4_params())

        def loss_fn(params, x, y):
            a, b, c = params
            return jnp.mean(jax.nn.sigmoid(x * a + b) / (1 + jax.nn.relu(x - c)))
        x, y = j["x"], None
    elif k == "w7":
        return _w7_jax(jax, jnp, j), info
    else:
        raise Skip(k)

    def _step(params, x, y):
        L, g = jax.value_and_grad(loss_fn)(params, x, y)
        return jax.tree_util.tree_map(lambda p, d: p - lr * d, params, g), L
    step_j = jax.jit(_step, donate_argnums=(0,))
    state = {"p": params}

    def step():
        p, L = step_j(state["p"], x, y)
        state["p"] = p
        return float(L)  # synchronises
    return step, info


def _w7_jax(jax, jnp, j):
    """W7's hand-written JAX step (w7_jax.py) from the W7.onnx initializers, params and AdamW state
    donated to the jitted step."""
    import w7_jax

    files = common.w7_files()
    if files is None:
        raise Skip(f"W7.onnx / W7_ref.npz not found in {common.BENCH_MODELS} (set LIBML_BENCH_MODELS)")
    params = w7_jax.load_params(files[0], common.w7_param_names())
    step_j, carry = w7_jax.make_step(jax, jnp, params)
    state = {"carry": carry}
    tokens, labels = j["tokens"], j["labels"]

    def step():
        state["carry"], L = step_j(state["carry"], tokens, labels)
        return float(L)  # synchronises
    return step


def setup_ort_training(wid, spec, feeds):
    """W7 by ONNX Runtime Training from W7.onnx (w7_ort_training.py); runs in the venv named by
    $LIBML_BENCH_ORTT_PYTHON, since onnxruntime-training replaces onnxruntime's module."""
    import atexit
    import shutil
    import tempfile

    try:
        import onnx
        import onnxruntime as ort
        import onnxruntime.training  # noqa: F401
    except ImportError as e:
        raise Skip(f"onnxruntime-training not importable in {sys.executable} ({e}); "
                   "see LIBML_BENCH_ORTT_PYTHON in benchmarks/README.md")
    why = common.missing_files(spec["kind"])
    if why:
        raise Skip(why)
    art = tempfile.mkdtemp(prefix=f"libml_{spec['kind']}_ortt_")
    atexit.register(shutil.rmtree, art, True)
    info = {"version": f"onnxruntime-training {ort.__version__}, onnx {onnx.__version__}",
            "kernels": "ORT MLAS (not visible to threadpoolctl)"}
    t0 = time.perf_counter()
    if spec["kind"] == "w6":  # forward + backward in ORT, the SGD-momentum update in NumPy (w6_ort_training.py)
        import w6_ort_training

        w6_ort_training.generate(common.w6_files("w6")[0], common.w6_meta(), art)
        info["artifacts_s"] = time.perf_counter() - t0
        info["note"] = "SGD momentum in NumPy between ORT calls (ORT Training's SGD has no momentum)"
        return w6_ort_training.make_step(art, common.w6_meta(), feeds["x"], feeds["labels"], THREADS), info
    import w7_ort_training

    w7_ort_training.generate(common.w7_files()[0], common.w7_param_names(), art)
    info["artifacts_s"] = time.perf_counter() - t0
    return w7_ort_training.make_step(art, feeds["tokens"], feeds["labels"], THREADS), info


def _ort_session(ort, model):
    """An inference session on ``model`` (path or bytes): 2 intra-op threads, sequential, all graph
    optimisations, CPU."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def setup_ort(wid, spec, feeds):
    if spec["kind"] not in ("fwd", "w8"):
        raise Skip("ONNX Runtime runs W5 and W8 only")
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise Skip(f"onnxruntime/onnx not installed ({e})")
    info = {"version": ort.__version__, "kernels": "ORT MLAS (not visible to threadpoolctl)"}
    if spec["kind"] == "w8":  # W6_eval.onnx as it is (dynamic batch, BN folded into the convolutions)
        why = common.missing_files("w8")
        if why:
            raise Skip(why)
        sess = _ort_session(ort, common.w6_files("w8")[0])
        out = sess.get_outputs()[0].name
        x = feeds["x"]
        return (lambda: sess.run([out], {"x": x})[0]), info
    layers, B = spec["layers"], spec["batch"]
    inits = common.mlp_params(layers)
    nodes, initializers = [], []
    h = "x"
    for i, (w, b) in enumerate(inits):
        initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"]))
        out = "logits" if i == len(inits) - 1 else f"z{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out]))
        if i < len(inits) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            h = f"h{i}"
    graph = helper.make_graph(
        nodes, "w2_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, layers[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, layers[-1]])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    sess = _ort_session(ort, model.SerializeToString())
    x = feeds["x"]
    return (lambda: sess.run(["logits"], {"x": x})[0]), info


def libml_program(wid, spec):
    """(prog, entry, output name or None, info) of libml's program for workload ``wid``: the compiled
    plan whose ``entry`` the benchmark times (``step``, or ``run`` returning ``output``).  Also used by
    vm_aot_collect.py to read the fused programs the workloads compile to."""
    try:
        import libml_compile as lc
    except ImportError as e:
        raise Skip(f"libml not installed ({e})")
    b = common.builders()
    k = spec["kind"]
    info = {"kernels": "GEMM through scipy.linalg.cython_blas (the scipy.libs OpenBLAS above), "
                       "own C kernels with OpenMP"}
    t0 = time.perf_counter()
    if k == "mlp":
        g, L = b.mlp(spec["layers"], spec["batch"], loss=spec["loss"], seed=common.PARAM_SEED)
        t0 = time.perf_counter()
        prog = lc.compile(g, loss=L, optimizer=lc.SGD(lr=common.LR), num_threads=THREADS)
        entry, out = "step", None
    elif k == "w4":
        g, L = b.w4(seed=common.PARAM_SEED)
        t0 = time.perf_counter()
        prog = lc.compile(g, loss=L, optimizer=lc.SGD(lr=common.LR), num_threads=THREADS)
        entry, out = "step", None
    elif k == "fwd":
        g = b.mlp_forward(spec["layers"], spec["batch"], seed=common.PARAM_SEED)
        t0 = time.perf_counter()
        prog = lc.compile(g, num_threads=THREADS)
        entry, out = "run", "logits"
    elif k == "w7":
        files = common.w7_files()
        if files is None:
            raise Skip(f"W7.onnx / W7_ref.npz not found in {common.BENCH_MODELS} (set LIBML_BENCH_MODELS)")
        import onnx  # noqa: F401 - (as for W6: the package's first import is not compile time)
        t0 = time.perf_counter()
        g = lc.import_onnx(files[0])
        logits = g.outputs[next(iter(g.outputs))]
        labels = g.input("labels", (spec["batch"],), "int64")
        prog = lc.compile(g, loss=lc.softmax_cross_entropy(logits, labels),
                          optimizer=lc.Adam(1e-3, weight_decay=0.01), num_threads=THREADS)
        entry, out = "step", None  # compile time: import + compile
    elif k in ("w6", "w8"):
        why = common.missing_files(k)
        if why:
            raise Skip(why)
        path = common.w6_files(k)[0]
        import onnx  # noqa: F401 - the onnx package's own first import (~1 s cold here) is not compile time
        t0 = time.perf_counter()
        if k == "w6":
            # W6.onnx's Conv nodes carry all-zero biases val_N that the PyTorch module does not have
            # (bias=False): constants here, so exactly W6_meta.json's 29 parameters are trained
            g = lc.import_onnx(path, constants=["val_*"])
            want = set(common.w6_meta()["params"])
            if set(g.params) != want:
                raise RuntimeError(f"W6 (libml): imported params differ from W6_meta.json: extra "
                                   f"{sorted(set(g.params) - want)}, missing {sorted(want - set(g.params))}")
            labels = g.input("labels", (spec["batch"],), "int64")
            prog = lc.compile(g, loss=lc.softmax_cross_entropy(g.outputs["logits"], labels),
                              optimizer=lc.SGD(common.LR, momentum=0.9), num_threads=THREADS)
            entry, out = "step", None
        else:  # W6_eval.onnx's symbolic batch bound to this workload's
            g = lc.import_onnx(path, shapes={"batch": spec["batch"]})
            prog = lc.compile(g, num_threads=THREADS)
            entry, out = "run", next(iter(g.outputs))
    elif k == "gemm":
        n = spec["n"]
        g = lc.Graph("gemm")
        A = g.input("A", (n, n))
        B = g.input("B", (n, n))
        g.output("C", lc.matmul(A, B, name="C"))
        t0 = time.perf_counter()
        prog = lc.compile(g, num_threads=THREADS)
        entry, out = "run", "C"
    else:
        raise Skip(k)
    info["compile_s"] = time.perf_counter() - t0  # ONNX workloads: import + compile
    return prog, entry, out, info


def setup_libml(wid, spec, feeds):
    prog, entry, out, info = libml_program(wid, spec)
    if spec["kind"] in ("w6", "w8"):
        info["after_timing"] = lambda: {"conv_profile": conv_profile(prog, entry, feeds)}
    if entry == "step":
        return (lambda: prog.step(feeds)), info
    return (lambda: prog.run(feeds)[out]), info


def conv_profile(prog, entry, feeds, repeat=10):
    """One row per conv instruction of ``entry`` (forward conv, conv_grad_input, conv_grad_weight) from
    ``prog.profile``: its geometry as the plan holds it (x (N, C, H, W), w (M, C/G, kh, kw), stride, pad,
    y (N, M, OH, OW)), median ms inside the runtime call, FLOPs and GFLOP/s.  Params are left as they were."""
    from libml_runtime import format as F

    prof = prog.profile(entry, feeds, repeat=repeat, warmup=2)
    code = prog.plan.entries[entry].code
    geo = {i: d for i, (_, name, _, d) in enumerate(F.instructions(code)) if name.startswith("conv")}
    rows = []
    for r in prof.rows:
        d = geo.get(r["index"])
        if d is None:
            continue
        rows.append({"index": r["index"], "op": r.get("op", ""), "node": r["node"],
                     "x": [d["N"], d["C"], d["H"], d["W"]], "w": [d["M"], d["C"] // d["G"], d["kh"], d["kw"]],
                     "y": [d["N"], d["M"], d["OH"], d["OW"]], "stride": [d["sh"], d["sw"]],
                     "pad": [d["ph"], d["pw"]], "group": d["G"], "median_ms": r["median_ms"],
                     "min_ms": r["min_ms"], "flops": r.get("flops"), "gflops": r.get("gflops")})
    return rows


def setup_c_fused(wid, spec, feeds):
    """W4 as one hand-fused C loop (benchmarks/w4_fused.c), built here with the system's C compiler:
    how fast the step can run on this machine when every intermediate stays in registers."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    if spec["kind"] != "w4":
        raise Skip("the hand-fused C reference exists for W4 only")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise Skip("no C compiler")
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
    out = os.path.join(tempfile.mkdtemp(prefix="libml_w4c_"), "w4_fused.so")
    p = subprocess.run([cc, *flags, os.path.join(HERE, "w4_fused.c"), "-o", out, "-lmvec", "-lm"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise Skip(f"{cc} failed: {p.stderr[-500:]}")
    syms = subprocess.run(["nm", "-D", out], capture_output=True, text=True).stdout
    lib = ctypes.CDLL(out)
    f = lib.w4_step
    P = ctypes.c_void_p
    f.argtypes = [P, ctypes.c_int64, ctypes.c_int64, P, P, P, ctypes.c_float, ctypes.c_int, P]
    f.restype = ctypes.c_double
    x = np.ascontiguousarray(feeds["x"])
    R, C = x.shape
    a, b, c = (np.ascontiguousarray(v.copy()) for v in common.w4_params())
    scratch = np.zeros(THREADS * 4 * C, np.float32)
    args = [x.ctypes.data, R, C, a.ctypes.data, b.ctypes.data, c.ctypes.data, common.LR, THREADS,
            scratch.ctypes.data]
    info = {"kernels": f"{os.path.basename(cc)} {' '.join(flags[:5])}; vector expf "
                       f"{'called' if '_ZGV' in syms else 'NOT called (scalar expf)'}"}
    def step(_keep=(x, a, b, c, scratch)):  # args holds raw addresses: keep the arrays alive
        return f(*args)
    return step, info


SETUPS = {"numpy": setup_numpy, "torch": setup_torch, "torch_compile": setup_torch_compile,
          "jax": setup_jax, "ort": setup_ort, "ort_training": setup_ort_training, "libml": setup_libml,
          "c_fused": setup_c_fused}


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    out = []
    for d in threadpool_info():
        out.append({"user_api": d.get("user_api"), "internal_api": d.get("internal_api"),
                    "architecture": d.get("architecture"), "num_threads": d.get("num_threads"),
                    "version": d.get("version"),
                    # parent folder tells whose copy it is (numpy.libs, scipy.libs, torch/lib, ...)
                    "lib": "/".join(d.get("filepath", "").split("/")[-2:])})
    return out


def first_value(r):
    if isinstance(r, float):
        return r
    a = np.asarray(r)
    return float(a.ravel()[:16].astype(np.float64).sum()) if a.size else None


def measure(system, wid, min_time, warmup_time, min_steps):
    spec = common.WORKLOADS[wid]
    if spec["kind"] not in common.SUPPORTS[system]:
        raise Skip(f"{system} does not run {spec['kind']} workloads")
    feeds = common.data(wid)
    rss_data = rss_mb()
    t0 = time.perf_counter()
    fn, info = SETUPS[system](wid, spec, feeds)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    after_timing = info.pop("after_timing", None)
    r0 = fn()  # first call: includes jit / lazy compilation
    first = first_value(r0)
    first_s = time.perf_counter() - t0
    second = first_value(fn())  # the first warm-up step
    if spec["kind"] == "w7":
        common.check_w7_losses(system, first, second)
    if spec["kind"] == "w6":  # the third loss is the first to see the momentum
        common.check_w6_losses(system, [first, second, first_value(fn())])
    if spec["kind"] == "w8":
        info["max_abs_err_vs_ref"] = common.check_w8_logits(system, wid, r0)
    # warm-up
    t_end = time.perf_counter() + warmup_time
    nw = 1
    while nw < 2 or time.perf_counter() < t_end:
        fn()
        nw += 1
    times = []
    t_start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - t_start < min_time:
        t1 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t1)
    res = dict(system=system, workload=wid, median_ms=1e3 * statistics.median(times),
               min_ms=1e3 * min(times), steps=len(times), warmup_steps=nw + 1,
               times_ms=[round(1e3 * t, 4) for t in times[:2000]],
               setup_s=setup_s, first_call_s=first_s, first_value=first,
               rss_after_data_mb=rss_data, peak_rss_mb=rss_mb(), blas=blas_info())
    res.update(info)
    if after_timing is not None:  # e.g. libml's per-instruction profile, after (never inside) the timing
        res.update(after_timing())
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--system", required=True, choices=sorted(SETUPS))
    ap.add_argument("--workload", required=True, choices=common.ORDER)
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed steps (default 2)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up (default 0.5)")
    ap.add_argument("--min-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"threads per system (default {THREADS}, the workloads' setting; ab.py varies it)")
    a = ap.parse_args(argv)
    globals()["THREADS"] = a.threads
    try:
        res = measure(a.system, a.workload, a.min_time, a.warmup, a.min_steps)
    except Skip as e:
        res = {"system": a.system, "workload": a.workload, "skipped": str(e)}
    except Exception as e:  # report, never crash the runner
        res = {"system": a.system, "workload": a.workload, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-4000:]}
    sys.stdout.flush()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
