"""Dropout in training mode (issue 12): ``lc.dropout``, the ``dropout`` / ``counter_next`` instructions and the
Philox4x32-10 masks (libml_compile/ops_dropout.py, kernels_tmpl.h ``lm_dropout``).

The oracle is ``ops_dropout.dropout_mask``, a NumPy Philox4x32-10 checked here against Random123's published
known-answer vectors; the runtime's masks must equal it bit for bit, for every ISA copy and thread count.
The training forward and backward are observed through the gradients of ``loss = sum(dropout(x) * w)``:
d loss / d w is the forward's output ``x * mask / (1 - p)`` and d loss / d x is the backward's ``w * mask /
(1 - p)``, so both masks are read exactly.  ``run`` is eval mode (the identity); every ``grad`` / ``step``
call advances the ``dropout/step`` counter, which ``state_dict`` and checkpoints hold.
"""
import io
import math
import warnings

import numpy as np
import pytest

import libml_compile as lc
from libml_compile.ops_dropout import STEP_STATE, dropout_mask, dropout_words, philox4x32_10
from libml_runtime import _exec
from libml_runtime import format as F
from libml_runtime.executable import RuntimeFailure
from libml_runtime.isa import ISAS
from libml_runtime.plan import PlanError, validate


# ---------------------------------------------------------------------------------------------------
# the generator

# Random123 (Salmon, Moraes, Dror, Shaw, SC 2011), tests/kat_vectors: philox4x32 with 10 rounds,
# counter words then key words -> the 4 output words
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_numpy_philox_matches_random123_known_answers(ctr, key, want):
    assert tuple(int(v) for v in philox4x32_10(np.array(ctr), key)) == want


def test_word_layout():
    """Element i takes word (i // 8) % 4 of block (i // 32) * 8 + i % 8, counter (block, step), key seed."""
    seed, step = 0x0123456789ABCDEF, (7 << 32) | 5
    n = 100
    w = dropout_words(n, seed, step)
    for i in (0, 1, 7, 8, 9, 31, 32, 63, 64, 99):
        b = (i // 32) * 8 + i % 8
        ctr = np.array([b & 0xFFFFFFFF, b >> 32, step & 0xFFFFFFFF, step >> 32])
        assert w[i] == philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))[(i // 8) % 4]
    assert len(set(w.tolist())) == n  # (no word is reused)


# ---------------------------------------------------------------------------------------------------
# helpers

def _probe(shape, p, seed, dtype="float32", num_threads=1, check_finite=False, optimizer=None):
    """loss = sum(dropout(x) * w) with x, w params of ``shape`` (never 0): d loss / d w = the forward's y,
    d loss / d x = the backward's w * mask / (1 - p)."""
    rng = np.random.default_rng(0)
    g = lc.Graph("probe")
    x = g.param("x", (rng.standard_normal(shape) + 4).astype(dtype))
    w = g.param("w", rng.uniform(0.5, 1.5, shape).astype(dtype))
    y = lc.dropout(x, p, seed=seed)
    g.output("y", y)
    prog = lc.compile(g, loss=lc.sum(y * w), optimizer=optimizer or lc.SGD(1e-30), num_threads=num_threads,
                      check_finite=check_finite)
    return prog


def _expected(prog, p, seed, step):
    """(forward y, backward w * mask / (1 - p)) the reference predicts at training call ``step``."""
    x, w = prog.params["x"], prog.params["w"]
    m = dropout_mask(x.shape, p, seed, step)
    scale = x.dtype.type(1 / (1 - p)) if p < 1 else x.dtype.type(0)
    factor = np.where(m, scale, x.dtype.type(0))
    return x * factor, w * factor, m


def _step_of(prog):
    return int(prog.state_dict()[STEP_STATE])


def _isas():
    """The ISA copies this machine runs (None: a no-dispatch build with one copy)."""
    cur = _exec._isa_name()
    if cur == "native":
        return [None]
    ok = []
    try:
        for isa in ISAS:
            if _exec._isa_init(isa) == 0:
                ok.append(isa)
    finally:
        assert _exec._isa_init(cur) == 0
    return ok


# ---------------------------------------------------------------------------------------------------
# the masks

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (7, 100), (3, 16384 + 37)])
def test_masks_equal_the_numpy_reference_for_every_isa(dtype, shape):
    cases = [(0.5, 0), (0.1, 1 << 63 | 12345), (0.9, -1), (0.37, 2 ** 40 + 3)]
    progs = [(_probe(shape, p, seed, dtype), p, seed) for p, seed in cases]
    cur = _exec._isa_name()
    try:
        for isa in _isas():
            if isa is not None:
                assert _exec._isa_init(isa) == 0
            for prog, p, seed in progs:
                step = _step_of(prog)
                gr = prog.grad({})
                y, gx, m = _expected(prog, p, seed % 2 ** 64, step)
                np.testing.assert_array_equal(gr["w"], y, err_msg=f"forward, {isa}, p={p}")
                np.testing.assert_array_equal(gr["x"], gx, err_msg=f"backward, {isa}, p={p}")
                assert _step_of(prog) == step + 1
    finally:
        assert _exec._isa_init(cur) == 0


def test_backward_uses_exactly_the_forward_mask():
    prog = _probe((40, 50), 0.3, 9)
    for _ in range(3):
        gr = prog.grad({})
        x, w = prog.params["x"], prog.params["w"]
        fwd = gr["w"] / x            # scale where kept, 0 where dropped
        bwd = gr["x"] / w
        np.testing.assert_array_equal(fwd != 0, bwd != 0)
        np.testing.assert_allclose(fwd[fwd != 0], 1 / 0.7, rtol=1e-6)
        np.testing.assert_allclose(bwd[bwd != 0], 1 / 0.7, rtol=1e-6)


def test_same_seed_and_step_reproduce_new_steps_differ():
    prog = _probe((64, 64), 0.5, 3)
    assert _step_of(prog) == 0
    sd0 = prog.state_dict()
    a = prog.grad({})["w"] != 0
    b = prog.grad({})["w"] != 0
    c = prog.grad({})["w"] != 0
    assert _step_of(prog) == 3
    assert (a != b).mean() > 0.4 and (b != c).mean() > 0.4 and (a != c).mean() > 0.4  # ~0.5 each
    prog.load_state_dict(sd0)  # the counter is state: back to step 0
    np.testing.assert_array_equal(prog.grad({})["w"] != 0, a)
    # another program of the same graph and seed draws the same masks
    other = _probe((64, 64), 0.5, 3)
    np.testing.assert_array_equal(other.grad({})["w"] != 0, a)
    # another seed does not
    assert ((_probe((64, 64), 0.5, 4).grad({})["w"] != 0) != a).mean() > 0.4


def test_run_is_the_identity_and_leaves_the_counter():
    prog = _probe((5, 70), 0.6, 1)
    x = prog.params["x"]
    for _ in range(2):
        np.testing.assert_array_equal(prog.run({})["y"], x)
    assert _step_of(prog) == 0
    assert [r["op"] for r in prog.instructions("run")] == ["counter_read", "dropout(eval)"]
    assert "dropout" not in {name for _, name, _, _ in F.instructions(prog.plan.entries["run"].code)}
    prog.grad({})
    np.testing.assert_array_equal(prog.run({})["y"], x)
    assert _step_of(prog) == 1


def test_grad_and_step_each_advance_the_counter_once_however_many_dropouts():
    rng = np.random.default_rng(1)
    g = lc.Graph("three")
    x = g.input("x", (8, 6))
    w = g.param("w", rng.standard_normal((6, 6)).astype(np.float32))
    h = lc.dropout(lc.relu(lc.dropout(x, 0.2) @ w), 0.5)
    loss = lc.mean(lc.square(lc.dropout(h, 0.1) @ w))
    g.output("h", h)
    seeds = [t.attrs["seed"] for t in g.nodes if t.op == "dropout"]
    assert len(set(seeds)) == 3  # default seeds: one of its own per dropout
    prog = lc.compile(g, loss=loss, optimizer=lc.Adam(1e-3))
    feeds = {"x": rng.standard_normal((8, 6)).astype(np.float32)}
    assert sum(r["op"] == "counter_next" for r in prog.instructions("step")) == 1
    prog.grad(feeds)
    prog.step(feeds)
    prog.run(feeds)
    prog.step(feeds)
    sd = prog.state_dict()
    assert sd[STEP_STATE] == 3 and sd["adam/step"] == 2 and sd[STEP_STATE].dtype == np.int64


def test_step_trains_with_the_mask():
    """The loss step() returns is the training-mode loss at this call's mask (float64)."""
    prog = _probe((30, 20), 0.4, 21, dtype="float64", optimizer=lc.SGD(1e-3))
    for _ in range(3):
        step = _step_of(prog)
        y, _, _ = _expected(prog, 0.4, 21, step)
        want = float((y * prog.params["w"]).sum())
        assert math.isclose(prog.step({}), want, rel_tol=1e-12)


def test_one_and_two_threads_give_identical_bits():
    shape = (600, 700)  # 420k elements: 26 chunks of 16384, run in parallel
    a, b = _probe(shape, 0.25, 77, num_threads=1), _probe(shape, 0.25, 77, num_threads=2)
    assert b.num_threads == 2
    for _ in range(2):
        ga, gb = a.grad({}), b.grad({})
        for k in ("x", "w"):
            np.testing.assert_array_equal(ga[k], gb[k])
    y, gx, _ = _expected(a, 0.25, 77, 1)
    np.testing.assert_array_equal(ga["w"], y)
    np.testing.assert_array_equal(ga["x"], gx)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction_and_independence(p):
    """The kept fraction is 1 - p within 5 standard deviations, overall and at each of the 32 positions of a
    group of Philox blocks; masks of consecutive steps, of neighbouring elements and of two seeds are
    independent (both kept with probability (1 - p)^2)."""
    n = 1 << 20
    prog = _probe((n,), p, 5)
    m0 = prog.grad({})["w"] != 0
    m1 = prog.grad({})["w"] != 0
    q = 1 - p

    def close(frac, prob, count):
        return abs(frac - prob) < 5 * math.sqrt(prob * (1 - prob) / count)
    assert close(m0.mean(), q, n) and close(m1.mean(), q, n)
    for pos in range(32):
        assert close(m0[pos::32].mean(), q, n // 32), pos
    assert close((m0 & m1).mean(), q * q, n)                      # step 0 and step 1
    assert close((m0[:-1] & m0[1:]).mean(), q * q, n - 1)         # neighbours (one Philox word apart)
    assert close((m0[:-8] & m0[8:]).mean(), q * q, n - 8)         # another word of the same block
    other = dropout_mask(n, p, 6, 0)
    assert close((m0 & other).mean(), q * q, n)                   # seeds 5 and 6


def test_p0_is_the_identity_p1_gives_zeros_as_pytorch():
    g = lc.Graph("edge")
    x = g.input("x", (4, 5))
    assert lc.dropout(x, 0.0) is x
    assert lc.dropout(x, 0, name="named").name == "named"
    gr = _probe((4, 5), 1.0, 0).grad({})
    assert not gr["w"].any() and not gr["x"].any()
    # p = 1 is x * 0 (PyTorch: input * zeros): NaN where x is not finite, -0 where x < 0
    torch = pytest.importorskip("torch")
    xv = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    xv[0, :3] = [np.inf, np.nan, -np.inf]
    want = torch.nn.functional.dropout(torch.tensor(xv), 1.0, training=True).numpy()
    w = g.param("w", np.ones((4, 5), np.float32))
    prog = lc.compile(g, loss=lc.sum(lc.dropout(x, 1.0) * w))
    got = prog.grad({"x": xv})["w"]  # = the training forward's output
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert np.isnan(got[0, :3]).all()


def test_bad_arguments_raise_naming_the_op():
    g = lc.Graph("bad")
    x = g.input("x", (3,))
    for p in (1.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"dropout: p = .* is (outside|not a finite)"):
            lc.dropout(x, p)
    for p in ("0.5", True, None, 1j):
        with pytest.raises(TypeError, match="dropout: p must be a real number"):
            lc.dropout(x, p)
    with pytest.raises(TypeError, match="dropout: seed"):
        lc.dropout(x, 0.5, seed=2.5)
    with pytest.raises(ValueError, match=r"dropout: seed .* outside"):
        lc.dropout(x, 0.5, seed=2 ** 64)
    with pytest.raises(TypeError, match="dropout: needs a floating tensor"):
        lc.dropout(g.input("i", (3,), dtype="int64"), 0.5)
    with pytest.raises(TypeError, match="dropout: x must be a symbolic Tensor"):
        lc.dropout(np.ones(3), 0.5)
    with pytest.raises(ValueError, match="dropout/step"):
        g.param("dropout/step", np.zeros(1, np.float32))


# ---------------------------------------------------------------------------------------------------
# gradients: central differences with the mask fixed (float64)

def test_central_differences_with_the_mask_fixed():
    """d loss / d param against float64 central differences of the training loss at one step: the state
    (params and the step counter) is restored before every evaluation, so every loss sees the same masks."""
    rng = np.random.default_rng(4)
    g = lc.Graph("fd")
    x = g.input("x", (5, 4), dtype="float64")
    W = g.param("W", rng.standard_normal((4, 3)))
    b = g.param("b", rng.standard_normal(3))
    V = g.param("V", rng.standard_normal((3, 2)))
    c = rng.standard_normal((5, 3))
    h = lc.dropout(lc.tanh(x @ W + b), 0.4, seed=11)
    loss = lc.sum(lc.square(lc.dropout(h, 0.25, seed=3) @ V)) + lc.sum(h * c)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(1e-3))
    feeds = {"x": rng.standard_normal((5, 4))}
    for _ in range(2):
        prog.step(feeds)  # step 2 below
    m1, m2 = dropout_mask((5, 3), 0.4, 11, 2), dropout_mask((5, 3), 0.25, 3, 2)
    assert 0 < m1.sum() < m1.size and 0 < m2.sum() < m2.size  # both masks drop some and keep some
    sd0 = prog.state_dict()
    analytic = prog.grad(feeds)
    eps = 1e-6
    for name in ("W", "b", "V"):
        fd = np.zeros_like(sd0[name])
        for i in np.ndindex(fd.shape):
            losses = []
            for sign in (1, -1):
                sd = dict(sd0)
                sd[name] = sd0[name].copy()
                sd[name][i] += sign * eps
                prog.load_state_dict(sd)
                losses.append(prog.step(feeds))
            fd[i] = (losses[0] - losses[1]) / (2 * eps)
        np.testing.assert_allclose(analytic[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)


# ---------------------------------------------------------------------------------------------------
# state: checkpoints and plan files

def _train_graph():
    rng = np.random.default_rng(8)
    g = lc.Graph("ckpt")
    x = g.input("x", (16, 10))
    y = g.input("y", (16,), dtype="int64")
    w1 = g.param("w1", (rng.standard_normal((10, 12)) * 0.3).astype(np.float32))
    w2 = g.param("w2", (rng.standard_normal((12, 4)) * 0.3).astype(np.float32))
    h = lc.dropout(lc.relu(lc.dropout(x, 0.1) @ w1), 0.5)
    return g, lc.softmax_cross_entropy(h @ w2, y)


def test_checkpoint_resume_reproduces_the_masks(tmp_path):
    rng = np.random.default_rng(9)
    batches = [{"x": rng.standard_normal((16, 10)).astype(np.float32), "y": rng.integers(0, 4, 16)}
               for _ in range(6)]
    a = lc.compile(*_train_graph(), optimizer=lc.Adam(0.05))
    losses = []
    for k, f in enumerate(batches):
        if k == 3:
            a.save_checkpoint(tmp_path / "c.ckpt")
            a.save(tmp_path / "p.plan")
        losses.append(a.step(f))
    assert _step_of(a) == 6
    b = lc.compile(*_train_graph(), optimizer=lc.Adam(0.05))
    b.load_checkpoint(tmp_path / "c.ckpt")
    assert _step_of(b) == 3
    assert [b.step(f) for f in batches[3:]] == losses[3:]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    # a plan file holds the counter too
    import libml_runtime
    c = libml_runtime.load(str(tmp_path / "p.plan"))
    assert int(c.state_dict()[STEP_STATE]) == 3
    assert [c.step(f) for f in batches[3:]] == losses[3:]
    # without the counter the masks would repeat: a program restarted at step 0 trains differently
    fresh = lc.compile(*_train_graph(), optimizer=lc.Adam(0.05))
    sd = b.state_dict()
    sd[STEP_STATE] = np.zeros((), np.int64)
    fresh.load_state_dict(sd)
    assert fresh.step(batches[0]) != b.step(batches[0])


def test_checked_entries_draw_the_same_masks():
    a = _probe((9, 40), 0.5, 13)
    b = _probe((9, 40), 0.5, 13, check_finite=True)
    for _ in range(2):
        ga, gb = a.grad({}), b.grad({})
        np.testing.assert_array_equal(ga["w"], gb["w"])
        np.testing.assert_array_equal(ga["x"], gb["x"])
    assert _step_of(b) == 2


def test_the_plan_validator_and_the_kernel_refuse_bad_fields():
    prog = _probe((4, 8), 0.5, 1)
    plan = prog.plan
    e = plan.entries["grad"]
    ins = F.instructions(e.code)
    names = [op for _, op, _, _ in ins]
    assert names.index("counter_next") < names.index("dropout")
    pc = next(pc for pc, op, _, _ in ins if op == "dropout")
    _, where = F.locate(e.code, pc)
    for field, value, msg in (("y.offset", 1 << 45, "y spans"), ("step.slot", 7, "step.slot"),
                              ("n", -1, "n = -1")):
        saved = int(e.code[where[field]])
        e.code[where[field]] = value
        try:
            with pytest.raises(PlanError, match=msg):
                validate(plan)
        finally:
            e.code[where[field]] = saved
    validate(plan)
    # p is a constant the validator does not read: the kernel refuses one outside [0, 1]
    d = ins[[op for _, op, _, _ in ins].index("dropout")][3]
    saved = e.consts[d["p"]]
    e.consts[d["p"]] = np.nan
    try:
        with pytest.raises(RuntimeFailure, match="dropout"):
            prog.grad({})
    finally:
        e.consts[d["p"]] = saved
    prog.grad({})


# ---------------------------------------------------------------------------------------------------
# ONNX

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _onnx_model(opset, training=None, ratio=None, ratio_attr=None, seed=None, mask=False):
    """out = Dropout(x) @ W (+ the Dropout's mask as a second output)."""
    rng = np.random.default_rng(5)
    nodes, ins = [], ["x"]
    if ratio is not None or training is not None:
        nodes.append(helper.make_node("Constant", [], ["r"], value=numpy_helper.from_array(
            np.asarray(0.5 if ratio is None else ratio, np.float32), "r")))
        ins.append("r")
    if training is not None:
        nodes.append(helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.asarray(training), "t")))
        ins.append("t")
    attrs = {}
    if ratio_attr is not None:
        attrs["ratio"] = ratio_attr
    if seed is not None:
        attrs["seed"] = seed
    nodes.append(helper.make_node("Dropout", ins, ["d", "m"] if mask else ["d"], **attrs))
    nodes.append(helper.make_node("MatMul", ["d", "W"], ["out"]))
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 2])]
    if mask:
        outs.append(helper.make_tensor_value_info("m", TensorProto.BOOL if opset >= 10 else TensorProto.FLOAT, [3, 4]))
    graph = helper.make_graph(nodes, "drop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])], outs,
                              [numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset,training", [(13, False), (13, None), (22, False), (12, None)])
def test_onnx_inference_mode_dropout_is_the_identity(opset, training):
    ort = pytest.importorskip("onnxruntime")
    m = _onnx_model(opset, training=training, ratio=0.3 if training is not None else None, mask=True)
    g = lc.import_onnx(m)
    assert "dropout" not in {t.op for t in g.nodes}
    xv = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got = lc.compile(g).run({"x": xv})
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xv})
    np.testing.assert_allclose(got["out"], want[0], rtol=1e-6)
    assert got["m"].dtype == np.bool_ and got["m"].all() and want[1].all()


@pytest.mark.parametrize("opset,kw", [(13, dict(training=True, ratio=0.4, seed=7)),
                                      (22, dict(training=True, ratio=0.4)),
                                      (10, dict(ratio_attr=0.4)), (7, dict(ratio_attr=0.4, seed=None))])
def test_onnx_training_mode_dropout_imports_as_lc_dropout(opset, kw):
    """Training mode: opset >= 12 with training_mode True; opsets < 12 leave the mode to the runtime."""
    m = _onnx_model(opset, mask=True, **kw)
    g = lc.import_onnx(m)
    drops = [t for t in g.nodes if t.op == "dropout"]
    y = g.tensor("d")
    assert y.op == "dropout" and y.attrs["p"] == pytest.approx(0.4)
    if kw.get("seed") is not None:
        assert y.attrs["seed"] == 7
    # the mask: dropout(ones) > 0 with the dropout's seed (Dropout-7: as X's float type)
    assert len(drops) == 2 and drops[1].attrs == y.attrs and g.tensor("m").op == ("greater" if opset >= 10 else "cast")
    target = g.input("target", (3, 2))
    prog = lc.compile(g, loss=lc.sum(g.outputs["out"] * target))
    xv = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    tv = np.random.default_rng(4).standard_normal((3, 2)).astype(np.float32)
    W = prog.params["W"]
    run = prog.run({"x": xv, "target": tv})
    np.testing.assert_allclose(run["out"], xv @ W, rtol=1e-6)  # run: eval mode
    assert run["m"].all() and run["m"].dtype == (np.bool_ if opset >= 10 else np.float32)
    mask = dropout_mask((3, 4), 0.4, y.attrs["seed"], 0)
    want = (xv * np.where(mask, np.float32(1 / 0.6), 0)).T @ tv   # d/dW of sum((x m / (1-p)) W * t)
    np.testing.assert_allclose(prog.grad({"x": xv, "target": tv})["W"], want, rtol=1e-5, atol=1e-6)


def test_onnx_dropout_needs_a_constant_ratio():
    nodes = [helper.make_node("Constant", [], ["r0"], value=numpy_helper.from_array(np.asarray(0.5, np.float32), "r0")),
             helper.make_node("Mul", ["r0", "s"], ["r"]),
             helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.asarray(True), "t")),
             helper.make_node("Dropout", ["x", "r", "t"], ["y"])]
    graph = helper.make_graph(nodes, "fed_ratio", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                                                   helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(lc.onnx_import.ONNXImportError, match="Dropout.*ratio is computed at run time"):
        lc.import_onnx(m)


def test_torchscript_export_in_training_mode_trains_like_pytorch_with_the_same_mask():
    """torch.onnx.export(training=TRAINING) keeps nn.Dropout as Dropout(training_mode=True): libml's run()
    is the module in eval mode, and grad() at step 0 equals torch autograd with libml's step-0 mask."""
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.drop, self.l2 = torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.l2(self.drop(torch.relu(self.l1(x))))

    torch.manual_seed(0)
    mod = M().double()
    xv = np.random.default_rng(6).standard_normal((5, 6))
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, (torch.tensor(xv),), f, input_names=["x"], output_names=["y"], opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, dynamo=False, do_constant_folding=False)
    m = onnx.load_model_from_string(f.getvalue())
    (node,) = [n for n in m.graph.node if n.op_type == "Dropout"]
    assert len(node.input) == 3
    g = lc.import_onnx(m, shapes={"x": (5, 6)})
    (drop,) = [t for t in g.nodes if t.op == "dropout" and t.inputs[0].op != "const"]
    target = g.input("target", (5, 3), dtype="float64")
    prog = lc.compile(g, loss=lc.mse(g.outputs["y"], target))
    tv = np.random.default_rng(7).standard_normal((5, 3))
    with torch.no_grad():
        np.testing.assert_allclose(prog.run({"x": xv, "target": tv})["y"], mod.eval()(torch.tensor(xv)).numpy(),
                                   rtol=1e-12)
    ratio = drop.attrs["p"]  # the exported ratio: 0.3 as a float32 constant
    assert ratio == float(np.float32(0.3))
    mask = torch.tensor(dropout_mask((5, 8), ratio, drop.attrs["seed"], 0))
    xt = torch.tensor(xv)
    out = mod.l2(torch.relu(mod.l1(xt)) * mask / (1 - ratio))
    torch.nn.functional.mse_loss(out, torch.tensor(tv)).backward()
    got = prog.grad({"x": xv, "target": tv})
    for name, prm in mod.named_parameters():
        np.testing.assert_allclose(got[name], prm.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
