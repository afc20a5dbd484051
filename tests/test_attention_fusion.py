"""Attention fusions (libml_compile/ops_attention.py): the masked softmax as one kernel (format 2.3
opcode 44) and the packed q/k/v gradient written in place by the head-gradient GEMMs.

Oracles: PyTorch autograd (values and gradients of masked attention, all-masked rows included), ONNX
Runtime (an exported masked-attention module), the same graph with the fusion prevented (bit for bit),
1 vs 2 threads (bit for bit), the plan's own instruction list and memory report (what was fused, what
buffer no longer exists), and the reference losses of the benchmark workload W7 (W7_ref.npz)."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch

import libml_compile as lc
from libml_compile.ops_attention import softmax_masked

torch.set_num_threads(1)
B, S, E, H = 2, 6, 8, 2
D = E // H
FMIN = float(np.finfo(np.float32).min)


def _params(rng, dt):
    return {k: (rng.standard_normal((E, E)) * 0.4).astype(dt) for k in ("wq", "wk", "wv", "wo")}


def _feeds(rng, dt, mask):
    return {"x": rng.standard_normal((B, S, E)).astype(dt), "mask": mask.astype(dt)}


def _mask():
    m = np.ones((B, S))
    m[0, 4:] = 0        # a padded sequence
    m[1, ::2] = 0
    return m


def _lc_attention(kind, dt, vals, fill=None, keep_add=False):
    """BERT-style self-attention: q, k, v projections, heads (B, H, S, D), scores / sqrt(D), a mask from a
    (B, S) 0/1 input broadcast as (B, 1, 1, S): additive ``(1 - m) * FMIN`` (kind "add") or
    ``where(m > 0.5, scores, fill)`` (kind "where"), softmax, @ v, heads merged, out-projection; loss = sum
    of squares.  keep_add: the masked scores are a graph output too (prevents the fusion)."""
    g = lc.Graph("mattn")
    x = g.input("x", (B, S, E), dt)
    mask = g.input("mask", (B, S), dt)
    p = {k: g.param(k, v) for k, v in vals.items()}

    def heads(t):
        return lc.transpose(lc.reshape(t, (B, S, H, D)), (0, 2, 1, 3))
    q, k, v = heads(x @ p["wq"]), heads(x @ p["wk"]), heads(x @ p["wv"])
    s = (q @ lc.transpose(k, (0, 1, 3, 2))) / float(np.sqrt(D))
    m4 = lc.reshape(mask, (B, 1, 1, S))
    if kind == "add":
        masked = s + (1.0 - m4) * FMIN
    else:
        masked = lc.where(lc.greater(m4, 0.5), s, fill)
    prob = lc.softmax(masked, axis=-1)
    ctx = lc.reshape(lc.transpose(prob @ v, (0, 2, 1, 3)), (B, S, E))
    y = ctx @ p["wo"]
    g.output("y", y)
    g.output("prob", prob)
    if keep_add:
        g.output("masked", masked)
    return g, lc.sum(y * y)


def _torch_attention(kind, dt, vals, feeds, fill=None):
    P = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
    x, m = torch.tensor(feeds["x"]), torch.tensor(feeds["mask"])

    def heads(t):
        return t.reshape(B, S, H, D).transpose(1, 2)
    q, k, v = heads(x @ P["wq"]), heads(x @ P["wk"]), heads(x @ P["wv"])
    s = q @ k.transpose(-1, -2) / float(np.sqrt(D))
    m4 = m.reshape(B, 1, 1, S)
    masked = s + (1.0 - m4) * FMIN if kind == "add" else torch.where(m4 > 0.5, s, torch.tensor(fill, dtype=s.dtype))
    prob = torch.softmax(masked, -1)
    y = (prob @ v).transpose(1, 2).reshape(B, S, E) @ P["wo"]
    (y * y).sum().backward()
    return y.detach().numpy(), prob.detach().numpy(), {k: t.grad.numpy() for k, t in P.items()}


def _compile(kind, dt, vals, fill=None, keep_add=False, num_threads=None):
    g, loss = _lc_attention(kind, dt, vals, fill, keep_add)
    return lc.compile(g, loss=loss, optimizer=lc.SGD(0.01), num_threads=num_threads)


@pytest.mark.parametrize("dt,tol", [("float64", 1e-10), ("float32", 2e-4)])
@pytest.mark.parametrize("kind,fill", [("add", None), ("where", FMIN), ("where", -1e9)])
def test_masked_softmax_runs_as_one_kernel_and_matches_torch_values_and_gradients(kind, fill, dt, tol):
    rng = np.random.default_rng(0)
    vals, feeds = _params(rng, dt), _feeds(rng, dt, _mask())
    prog = _compile(kind, dt, vals, fill)
    ops = [r["op"] for r in prog.instructions("run")]
    assert ops.count("softmax+mask") == 1 and "softmax" not in ops, ops
    # the masked scores (B, H, S, S) are never a tensor of their own: no instruction writes that shape
    # besides the QK^T GEMM and the fused softmax
    full = [r for r in prog.instructions("run") if r.get("shape") == (B, H, S, S)]
    assert not full, full
    y, prob, grads = _torch_attention(kind, dt, vals, feeds, fill)
    out = prog.run(feeds)
    np.testing.assert_allclose(out["y"], y, rtol=tol, atol=tol)
    np.testing.assert_allclose(out["prob"], prob, rtol=tol, atol=tol)
    got = prog.grad(feeds)
    for k in vals:
        np.testing.assert_allclose(got[k], grads[k], rtol=tol * 10, atol=tol * 10, err_msg=k)


def test_the_scale_stays_folded_in_the_scores_gemm():
    rng = np.random.default_rng(0)
    prog = _compile("add", "float32", _params(rng, "float32"))
    ops = [r["op"] for r in prog.instructions("run")]
    # q, k, v projections, QK^T (alpha = 1/sqrt(D)), fused softmax, @ v, out-projection; the mask's
    # (1 - m) * FMIN is one small elementwise kernel over (B, S)
    assert ops.count("gemm") == 6 and ops.count("softmax+mask") == 1, ops
    assert not any(r.get("shape") == (B, H, S, S) for r in prog.instructions("run"))


@pytest.mark.parametrize("kind,fill", [("add", None), ("where", float("-inf")), ("where", FMIN)])
def test_fused_masked_softmax_equals_the_unfused_add_and_softmax_bit_for_bit(kind, fill):
    """With the masked scores also a graph output the add / where stays its own kernel (not fused): the
    fused kernel's probabilities are the same bits."""
    rng = np.random.default_rng(1)
    vals, feeds = _params(rng, "float32"), _feeds(rng, "float32", _mask())
    fused, unfused = _compile(kind, "float32", vals, fill), _compile(kind, "float32", vals, fill, keep_add=True)
    assert "softmax+mask" in [r["op"] for r in fused.instructions("run")]
    assert "softmax+mask" not in [r["op"] for r in unfused.instructions("run")]
    np.testing.assert_array_equal(fused.run(feeds)["prob"], unfused.run(feeds)["prob"])


def test_all_masked_rows_give_what_torch_gives():
    """A sequence with every key masked: the additive finfo.min mask and a finfo.min fill give the uniform
    distribution, a -inf fill gives NaN -- each as PyTorch computes it."""
    rng = np.random.default_rng(2)
    mask = _mask()
    mask[1] = 0
    vals, feeds = _params(rng, "float32"), _feeds(rng, "float32", mask)
    for kind, fill in (("add", None), ("where", FMIN), ("where", float("-inf"))):
        prog = _compile(kind, "float32", vals, fill)
        got = prog.run(feeds)["prob"]
        _, want, _ = _torch_attention(kind, "float32", vals, feeds, fill)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
        if fill == float("-inf"):
            assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()
        else:
            np.testing.assert_allclose(got[1], 1.0 / S, rtol=1e-6)


def test_masked_attention_is_bit_identical_for_one_and_two_threads():
    rng = np.random.default_rng(3)
    vals, feeds = _params(rng, "float32"), _feeds(rng, "float32", _mask())
    res = []
    for nt in (1, 2):
        prog = _compile("add", "float32", vals, num_threads=nt)
        res.append((prog.run(feeds), prog.grad(feeds)))
    for k in res[0][0]:
        np.testing.assert_array_equal(res[0][0][k], res[1][0][k])
    for k in res[0][1]:
        np.testing.assert_array_equal(res[0][1][k], res[1][1][k])


def test_softmax_masked_refuses_a_mask_that_does_not_broadcast_naming_both_shapes():
    g = lc.Graph("bad")
    x = g.input("scores", (2, 3, 4))
    with pytest.raises(ValueError, match=r"softmax_masked: mask 'm' \(2, 4\) does not broadcast to the scores "
                                         r"'scores' \(2, 3, 4\)"):
        softmax_masked(x, g.input("m", (2, 4)))
    with pytest.raises(TypeError, match="softmax_masked: mask 'm64'"):
        softmax_masked(x, g.input("m64", (1, 4), "float64"))


class _MaskedAttention(torch.nn.Module):
    """What the Hugging Face BERT attention computes with an attention_mask (B, S): the extended additive
    mask (1 - m)[:, None, None, :] * finfo.min."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(E, E) for _ in range(3))
        self.out = torch.nn.Linear(E, 4)

    def forward(self, x, attention_mask):
        q, k, v = (lin(x).reshape(B, S, H, D).transpose(1, 2) for lin in self.qkv)
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        p = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5 + ext, dim=-1)
        return self.out((p @ v).transpose(1, 2).reshape(B, S, E).mean(dim=1))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_exported_masked_attention_fuses_and_matches_onnxruntime_and_torch(dynamo):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    mod = _MaskedAttention().eval()
    x = np.random.default_rng(4).standard_normal((B, S, E)).astype(np.float32)
    mask = _mask().astype(np.int64)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
        torch.onnx.export(mod, (torch.tensor(x), torch.tensor(mask)), f, input_names=["x", "attention_mask"],
                          output_names=["y"], opset_version=18, **kw)
    model = f.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (TorchScript folds the transposed weights: FoldedWeightsWarning)
        g = lc.import_onnx(model)
    labels = np.array([1, 3])
    loss = lc.softmax_cross_entropy(g.outputs["y"], g.input("labels", (B,), "int64"))
    prog = lc.compile(g, loss=loss)
    feeds = {"x": x, "attention_mask": mask}
    assert "softmax+mask" in [r["op"] for r in prog.instructions("grad")]
    want = ort.InferenceSession(model).run(None, feeds)[0]
    np.testing.assert_allclose(prog.run(feeds)["y"], want, rtol=1e-4, atol=1e-5)
    out = mod(torch.tensor(x), torch.tensor(mask))
    torch.nn.functional.cross_entropy(out, torch.tensor(labels)).backward()
    grads = prog.grad({**feeds, "labels": labels})
    # params matched to the module's by value (the TorchScript exporter may store a Linear weight transposed)
    tp = [(p.detach().numpy(), p.grad.numpy()) for p in mod.parameters()]
    assert len(grads) == len(tp)
    for name, gv in grads.items():
        v = np.asarray(g.params[name].value)
        (want,) = [gr for w, gr in tp if w.shape == v.shape and np.array_equal(w, v)] + \
            [gr.T for w, gr in tp if w.ndim == 2 and w.T.shape == v.shape and np.array_equal(w.T, v)]
        np.testing.assert_allclose(gv, want, rtol=1e-3, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# the packed q/k/v gradient

def _packed_attention(dt, seed=0):
    """Self-attention with one packed in-projection, as nn.MultiheadAttention exports it: x @ Wqkv
    (B, S, 3E), q/k/v selected along the packed axis, heads, softmax, out-projection."""
    rng = np.random.default_rng(seed)
    vals = {"Wqkv": (rng.standard_normal((E, 3 * E)) * 0.4).astype(dt),
            "Wo": (rng.standard_normal((E, E)) * 0.4).astype(dt)}
    g = lc.Graph("packed")
    x = g.input("x", (B, S, E), dt)
    p = {k: g.param(k, v) for k, v in vals.items()}
    qkv = lc.reshape(x @ p["Wqkv"], (B, S, 3, H, D))
    q, k, v = (lc.transpose(lc.gather(qkv, np.int64(i), axis=2), (0, 2, 1, 3)) for i in range(3))
    s = (q @ lc.transpose(k, (0, 1, 3, 2))) / float(np.sqrt(D))
    y = lc.reshape(lc.transpose(lc.softmax(s, axis=-1) @ v, (0, 2, 1, 3)), (B, S, E)) @ p["Wo"]
    g.output("y", y)
    return g, lc.sum(y * y), vals, rng.standard_normal((B, S, E)).astype(dt)


@pytest.mark.parametrize("dt,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_packed_qkv_gradient_is_written_in_place_by_the_head_gemms_and_matches_torch(dt, tol):
    g, loss, vals, x = _packed_attention(dt)
    prog = lc.compile(g, loss=loss)
    ops = [r["op"] for r in prog.instructions("grad")]
    # no zero-filled scatter per head, no adds of them, no copy into the packed layout
    assert "gather_grad" not in ops and "assemble" not in ops and "transpose" not in ops, ops
    assert not any(r.get("shape") == (B, S, 3, H, D) or r.get("shape") == (3, B, S, H, D)
                   for r in prog.instructions("grad"))
    P = {k: torch.tensor(v, requires_grad=True) for k, v in vals.items()}
    qkv = (torch.tensor(x) @ P["Wqkv"]).reshape(B, S, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    y = (torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v).transpose(1, 2).reshape(B, S, E) @ P["Wo"]
    (y * y).sum().backward()
    grads = prog.grad({"x": x})
    for name in vals:
        np.testing.assert_allclose(grads[name], P[name].grad.numpy(), rtol=tol * 10, atol=tol * 10, err_msg=name)


def test_a_packed_gradient_of_elementwise_parts_is_one_copy_per_part():
    """Parts that are not GEMM results are copied into their places (one copy each), never scattered
    into zeros and added."""
    rng = np.random.default_rng(5)
    t0, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    g = lc.Graph("parts")
    t = g.param("t", t0)
    parts = [lc.gather(t, np.int64(i), axis=0) * float(i + 1) for i in range(3)]
    loss = lc.sum(parts[0] * parts[1] + lc.tanh(parts[2]) * g.const(w[2]))
    prog = lc.compile(g, loss=loss)
    ops = [r["op"] for r in prog.instructions("grad")]
    assert ops.count("assemble") == 3 and "gather_grad" not in ops, ops
    T = torch.tensor(t0, requires_grad=True)
    P = [T[i] * (i + 1) for i in range(3)]
    (P[0] * P[1] + torch.tanh(P[2]) * torch.tensor(w[2])).sum().backward()
    np.testing.assert_allclose(prog.grad({})["t"], T.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_packed_attention_gradients_are_bit_identical_for_one_and_two_threads():
    res = []
    for nt in (1, 2):
        g, loss, vals, x = _packed_attention("float32", seed=6)
        res.append(lc.compile(g, loss=loss, num_threads=nt).grad({"x": x}))
    for k in res[0]:
        np.testing.assert_array_equal(res[0][k], res[1][k])


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(d_model=E, nhead=H, dim_feedforward=16, dropout=0.0,
                                                      batch_first=True)
        self.fc = torch.nn.Linear(E, 3)

    def forward(self, x):
        return self.fc(self.layer(x).mean(dim=1))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_seq_first_encoder_layer_has_no_transpose_and_matches_torch(dynamo):
    """PyTorch's batch_first layer runs attention seq-first: (B, S, E) -> (S, B, E) before the packed
    in-projection and back after the out-projection.  Those row permutations are moved off the
    projections before autodiff: no transpose instruction forward or backward, gradients as PyTorch's."""
    torch.manual_seed(1)
    mod = _Encoder().eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.uniform_(-0.3, 0.3)
    x = np.random.default_rng(7).standard_normal((B, S, E)).astype(np.float32)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False}
        torch.onnx.export(mod, (torch.tensor(x),), f, input_names=["x"], output_names=["y"], opset_version=18, **kw)
        g = lc.import_onnx(f.getvalue())
    labels = np.array([0, 2])
    loss = lc.softmax_cross_entropy(g.outputs["y"], g.input("labels", (B,), "int64"))
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1))
    for entry in ("run", "grad", "step"):
        ops = [r["op"] for r in prog.instructions(entry)]
        assert "transpose" not in ops and "gather_grad" not in ops, (entry, ops)
    torch.nn.functional.cross_entropy(mod(torch.tensor(x)), torch.tensor(labels)).backward()
    grads = prog.grad({"x": x, "labels": labels})
    tp = [(p.detach().numpy(), p.grad.numpy()) for p in mod.parameters()]
    assert len(grads) == len(tp)
    for name, gv in grads.items():
        v = np.asarray(g.params[name].value)
        (want,) = [gr for w, gr in tp if w.shape == v.shape and np.array_equal(w, v)] + \
            [gr.T for w, gr in tp if w.ndim == 2 and w.T.shape == v.shape and np.array_equal(w.T, v)]
        np.testing.assert_allclose(gv, want, rtol=1e-3, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# W7 (the benchmark workload, ../shared/bench/models)

def _bench_models():
    """$LIBML_BENCH_MODELS, else the workplace's shared/bench/models beside the repository (or beside a
    folder holding it, as for a git worktree)."""
    if os.environ.get("LIBML_BENCH_MODELS"):
        return os.environ["LIBML_BENCH_MODELS"]
    here = os.path.dirname(os.path.abspath(__file__))
    for up in (2, 3):
        cand = os.path.join(here, *([".."] * up), "shared", "bench", "models")
        if os.path.isdir(cand):
            return cand
    return os.path.join(here, "..", "..", "shared", "bench", "models")


_MODELS = _bench_models()
_W7 = os.path.join(_MODELS, "W7.onnx")


@pytest.fixture(scope="module")
def w7():
    if not (os.path.exists(_W7) and os.path.exists(os.path.join(_MODELS, "W7_ref.npz"))):
        pytest.skip(f"W7.onnx / W7_ref.npz not in {_MODELS}")
    ref = np.load(os.path.join(_MODELS, "W7_ref.npz"))

    def build(num_threads=2):
        g = lc.import_onnx(_W7)
        logits = g.outputs[next(iter(g.outputs))]
        labels = g.input("labels", (ref["labels"].shape[0],), "int64")
        return lc.compile(g, loss=lc.softmax_cross_entropy(logits, labels),
                          optimizer=lc.Adam(1e-3, weight_decay=0.01), num_threads=num_threads)
    return build, ref


def test_w7_step_has_no_scatter_or_add_for_the_packed_qkv_gradient(w7):
    build, _ = w7
    ins = build().instructions("step")
    ops = [r["op"] for r in ins]
    # the embedding table's scatter-add is the only gather gradient left (the two layers' three head
    # gradients each were a zero-filled scatter, then two adds and a transpose into (S, B, 3E))
    assert ops.count("gather_grad") == 1, ops
    assert not any(r.get("shape") == (3, 64, 16, 128) for r in ins)
    # the seq-first (S, B, E) layout of nn.MultiheadAttention costs no copy: the row permutations moved off
    # the projections (ops_attention.recognize_row_order), the rest are views of GEMM operands
    assert ops.count("transpose") == 0, ops
    assert len(ops) <= 84, len(ops)


def test_w7_first_two_losses_match_the_reference(w7):
    build, ref = w7
    prog = build()
    feeds = {"tokens": ref["tokens"], "labels": ref["labels"]}
    l0, l1 = prog.step(feeds), prog.step(feeds)
    assert abs(l0 - float(ref["loss0"])) <= 1e-5 and abs(l1 - float(ref["loss1"])) <= 1e-5, (l0, l1)
