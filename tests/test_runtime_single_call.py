"""The runtime really runs the step: one `libml_runtime._exec.run_plan` call per prog.step / run / grad,
no Python executed per op, returned arrays never silently overwritten, thread counts agree."""
import sys
from collections import Counter

import numpy as np
import pytest

import libml_compile as lc
from conftest import assert_close, build_mlp, make_mlp_params, mlp_param_dict, np_mlp_ref

_exec = pytest.importorskip("libml_runtime._exec")


def _mlp_prog(sizes=(6, 16, 3), batch=8, dtype="float64", optimizer="sgd", seed=0, **kw):
    np_dtype = np.dtype(dtype).type
    weights = make_mlp_params(list(sizes), np_dtype, seed=seed)
    g, loss = build_mlp(weights, batch, dtype=dtype)
    if optimizer == "sgd":
        optimizer = lc.SGD(lr=0.05, momentum=0.9)
    elif optimizer == "adam":
        optimizer = lc.Adam(lr=0.01)
    prog = lc.compile(g, loss=loss, optimizer=optimizer, **kw)
    return prog, weights


def _feeds(sizes=(6, 16, 3), batch=8, dtype="float64", seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, sizes[0])).astype(dtype),
            "y": rng.integers(0, sizes[-1], size=batch).astype(np.int64)}


@pytest.fixture
def run_plan_calls(monkeypatch):
    calls = []
    orig = _exec.run_plan

    def counting_run_plan(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    monkeypatch.setattr(_exec, "run_plan", counting_run_plan)
    return calls


def test_one_runtime_call_per_step_run_grad(run_plan_calls):
    prog, _ = _mlp_prog()
    feeds = _feeds()
    for method in ("step", "run", "grad", "step", "step", "run"):
        run_plan_calls.clear()
        getattr(prog, method)(feeds)
        assert len(run_plan_calls) == 1, f"prog.{method} made {len(run_plan_calls)} run_plan calls"


def test_one_runtime_call_forward_only_program(run_plan_calls):
    weights = make_mlp_params([6, 16, 3], np.float64)
    g, _ = build_mlp(weights, 8)
    prog = lc.compile(g)
    run_plan_calls.clear()
    out = prog.run(_feeds())
    assert len(run_plan_calls) == 1
    assert set(out) == {"logits", "loss"}


def test_counting_wrapper_sees_the_work(run_plan_calls):
    """The wrapped run_plan is what computes: a step through the wrapper still trains correctly."""
    prog, weights = _mlp_prog(optimizer=lc.SGD(lr=0.1))
    feeds = _feeds()
    run_plan_calls.clear()
    prog.step(feeds)
    assert len(run_plan_calls) == 1
    _, _, ref = np_mlp_ref(weights, feeds["x"], feeds["y"])
    for k, v in mlp_param_dict(weights).items():
        assert_close(prog.params[k], v - 0.1 * mlp_param_dict(ref)[k], 1e-10, 1e-13, k)


def test_no_work_outside_run_plan(monkeypatch):
    """With run_plan replaced by a no-op, a step cannot update anything: no Python fallback computes."""
    prog, _ = _mlp_prog()
    feeds = _feeds()
    before = {k: v.copy() for k, v in prog.params.items()}
    monkeypatch.setattr(_exec, "run_plan", lambda *a, **k: None)
    try:
        prog.step(feeds)
    except Exception:
        pass
    monkeypatch.undo()
    for k, v in prog.params.items():
        assert v.tobytes() == before[k].tobytes(), f"param {k} changed although run_plan did nothing"


def _profile_step(prog, feeds):
    events = []

    def prof(frame, event, arg):
        if event == "call":
            events.append(("call", frame.f_code.co_filename, frame.f_code.co_name))
        elif event == "c_call":
            events.append(("c_call", getattr(arg, "__qualname__", repr(arg)), ""))

    sys.setprofile(prof)
    try:
        prog.step(feeds)
    finally:
        sys.setprofile(None)
    return events


def _deep_progs():
    progs = {}
    for depth in (2, 8):
        sizes = [16] * depth + [4]
        prog, _ = _mlp_prog(sizes=sizes, batch=8, dtype="float32")
        feeds = _feeds(sizes=sizes, batch=8, dtype="float32")
        for _ in range(2):                      # warm-up: lazy initialisation is not per-step work
            prog.step(feeds)
        progs[depth] = (prog, feeds)
    return progs


def _diff(a, b):
    ca, cb = Counter(a), Counter(b)
    return {k: (ca[k], cb[k]) for k in set(ca) | set(cb) if ca[k] != cb[k]}


def test_python_calls_per_step_independent_of_depth():
    """sys.setprofile counts Python function calls in one step: a 2-layer and an 8-layer MLP (4 vs 16
    params, ~4x the ops) must execute the same number — no Python runs per op or per param."""
    progs = _deep_progs()
    ev = {d: [e for e in _profile_step(*progs[d]) if e[0] == "call"] for d in progs}
    assert len(ev[2]) == len(ev[8]), f"python calls 2-layer {len(ev[2])} vs 8-layer {len(ev[8])}: " \
                                     f"{_diff(ev[2], ev[8])}"


def test_c_calls_per_step_independent_of_depth():
    """Same for builtin / C-function calls made from Python (e.g. NumPy calls per op would show here)."""
    progs = _deep_progs()
    ev = {d: [e for e in _profile_step(*progs[d]) if e[0] == "c_call"] for d in progs}
    assert len(ev[2]) == len(ev[8]), f"C calls 2-layer {len(ev[2])} vs 8-layer {len(ev[8])}: " \
                                     f"{_diff(ev[2], ev[8])}"


# ----------------------------------------------------------------------------------------------------
# returned arrays are never silently overwritten
# ----------------------------------------------------------------------------------------------------
def test_run_results_not_overwritten_by_next_run():
    prog, _ = _mlp_prog()
    f1, f2 = _feeds(seed=1), _feeds(seed=2)
    r1 = prog.run(f1)
    snap = {k: np.array(v, copy=True) for k, v in r1.items()}
    r2 = prog.run(f2)
    assert not np.array_equal(r2["logits"], snap["logits"])
    for k in snap:
        np.testing.assert_array_equal(r1[k], snap[k], err_msg=f"output {k} overwritten by the next run")
        assert not np.shares_memory(r1[k], r2[k])


def test_grad_results_not_overwritten_by_next_call():
    prog, _ = _mlp_prog()
    f1, f2 = _feeds(seed=1), _feeds(seed=2)
    g1 = prog.grad(f1)
    snap = {k: v.copy() for k, v in g1.items()}
    g2 = prog.grad(f2)
    prog.step(f2)
    prog.run(f2)
    for k in snap:
        assert not np.array_equal(g2[k], snap[k])
        np.testing.assert_array_equal(g1[k], snap[k], err_msg=f"grad {k} overwritten by a later call")


def test_params_copy_unchanged_after_step():
    prog, _ = _mlp_prog()
    feeds = _feeds()
    p1 = prog.params
    snap = {k: v.copy() for k, v in p1.items()}
    prog.step(feeds)
    prog.step(feeds)
    for k in snap:
        np.testing.assert_array_equal(p1[k], snap[k], err_msg=f"params[{k!r}] copy changed by a step")
    assert any(not np.array_equal(prog.params[k], snap[k]) for k in snap)


def test_mutating_returned_params_does_not_touch_program():
    prog, _ = _mlp_prog()
    feeds = _feeds()
    loss0 = float(prog.run(feeds)["loss"])
    p = prog.params
    for v in p.values():
        v[...] = 0
    assert float(prog.run(feeds)["loss"]) == loss0
    assert all(np.any(v != 0) for k, v in prog.params.items() if k.startswith("w"))


def test_run_outputs_writable_without_affecting_program():
    prog, _ = _mlp_prog()
    feeds = _feeds()
    r1 = prog.run(feeds)
    ref = np.array(r1["logits"], copy=True)
    r1["logits"][...] = 123.0
    np.testing.assert_array_equal(prog.run(feeds)["logits"], ref)


def test_feeds_not_modified():
    prog, _ = _mlp_prog()
    feeds = _feeds()
    snap = {k: v.copy() for k, v in feeds.items()}
    prog.step(feeds)
    prog.grad(feeds)
    prog.run(feeds)
    for k in snap:
        np.testing.assert_array_equal(feeds[k], snap[k])


def test_non_contiguous_feeds_accepted():
    prog, weights = _mlp_prog(optimizer=None)
    feeds = _feeds()
    xt = np.asfortranarray(feeds["x"])
    big = np.zeros((8, 12))
    big[:, ::2] = feeds["x"]
    ref = prog.run(feeds)["logits"]
    np.testing.assert_array_equal(prog.run({"x": xt, "y": feeds["y"]})["logits"], ref)
    np.testing.assert_array_equal(prog.run({"x": big[:, ::2], "y": feeds["y"]})["logits"], ref)


# ----------------------------------------------------------------------------------------------------
# dtypes and thread counts
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_num_threads_1_and_2_agree(dtype):
    sizes, batch = (64, 128, 10), 256
    feeds = [_feeds(sizes, batch, dtype, seed=s) for s in range(4)]
    params = {}
    losses = {}
    for nt in (1, 2):
        prog, _ = _mlp_prog(sizes=sizes, batch=batch, dtype=dtype, optimizer="adam", num_threads=nt)
        losses[nt] = [prog.step(f) for f in feeds]
        params[nt] = prog.params
        params[nt]["logits"] = prog.run(feeds[0])["logits"]
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (1e-4, 1e-5)
    np.testing.assert_allclose(losses[1], losses[2], rtol=rtol, atol=atol)
    for k in params[1]:
        assert params[2][k].dtype == np.dtype(dtype)
        assert_close(params[2][k], params[1][k], rtol, atol, f"{k} with 2 threads vs 1")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_both_dtypes_step_against_reference(dtype):
    prog, weights = _mlp_prog(dtype=dtype, optimizer=lc.SGD(lr=0.1))
    feeds = _feeds(dtype=dtype)
    w64 = [(W.astype(np.float64), b.astype(np.float64)) for W, b in weights]
    ref_loss, _, ref = np_mlp_ref(w64, feeds["x"].astype(np.float64), feeds["y"])
    loss = prog.step(feeds)
    rtol, atol = (1e-12, 1e-13) if dtype == "float64" else (1e-5, 1e-6)
    assert loss == pytest.approx(ref_loss, rel=rtol)
    for k, v in mlp_param_dict(w64).items():
        assert prog.params[k].dtype == np.dtype(dtype)
        assert_close(prog.params[k], v - 0.1 * mlp_param_dict(ref)[k], rtol, atol, k)


def test_outputs_aliasing_params_and_inputs_are_fresh_copies():
    """Outputs that are a param or an input must not be views of runtime buffers the next call rewrites."""
    rng = np.random.default_rng(40)
    W = rng.standard_normal((3, 2))
    g = lc.Graph("alias")
    x = g.input("x", (4, 3), dtype="float64")
    w = g.param("w", W)
    loss = lc.mean((x @ w) * (x @ w))
    g.output("w_out", w)
    g.output("x_out", x)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1))
    x1 = rng.standard_normal((4, 3))
    r = prog.run({"x": x1})
    np.testing.assert_array_equal(r["w_out"], W)
    np.testing.assert_array_equal(r["x_out"], x1)
    snap_w, snap_x = r["w_out"].copy(), r["x_out"].copy()
    prog.step({"x": rng.standard_normal((4, 3))})
    prog.run({"x": rng.standard_normal((4, 3))})
    np.testing.assert_array_equal(r["w_out"], snap_w)
    np.testing.assert_array_equal(r["x_out"], snap_x)
    assert not np.array_equal(prog.params["w"], W)


@pytest.mark.parametrize("training", [False, True])
def test_intermediate_outputs_survive_buffer_reuse(training):
    """Every intermediate of an elementwise chain is also an output: in-place / shared buffers in the
    memory plan must not clobber a tensor that is still to be returned."""
    rng = np.random.default_rng(41)
    X, W = rng.standard_normal((5, 4)), rng.standard_normal((4, 4)) * 0.5
    g = lc.Graph("chain")
    x = g.input("x", (5, 4), dtype="float64")
    w = g.param("w", W)
    h1 = x @ w
    h2 = lc.relu(h1)
    h3 = lc.sigmoid(h2) * h2
    h4 = h3 + h1
    h5 = lc.softmax(h4 - h3, axis=0) / (h2 + 1.0)
    loss = lc.sum(h5 * h5)
    for i, t in enumerate([h1, h2, h3, h4, h5], 1):
        g.output(f"h{i}", t)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1)) if training else lc.compile(g)
    r = prog.run({"x": X})
    n1 = X @ W
    n2 = np.maximum(n1, 0)
    n3 = 1 / (1 + np.exp(-n2)) * n2
    n4 = n3 + n1
    e = np.exp(n4 - n3 - (n4 - n3).max(axis=0))
    n5 = e / e.sum(axis=0) / (n2 + 1.0)
    for i, ref in enumerate([n1, n2, n3, n4, n5], 1):
        assert_close(r[f"h{i}"], ref, 1e-12, 1e-14, f"h{i}")
    assert_close(r["loss"], np.sum(n5 * n5), 1e-12, 1e-14, "loss")
