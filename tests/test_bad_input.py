"""Bad feeds are rejected before the runtime runs, with a message naming the input, the expected and the
given value; a rejected step changes nothing (params bit-identical, optimizer state untouched)."""

import numpy as np
import pytest

import libml_compile as lc
from conftest import mentions_shape as _mentions_shape

B, D, H, C = 8, 4, 6, 3
METHODS = ["step", "grad", "run"]


def _graph():
    rng = np.random.default_rng(0)
    g = lc.Graph("bad")
    x = g.input("features", (B, D))                       # float32 by default
    y = g.input("labels", (B,), dtype="int64")
    w1 = g.param("w1", (rng.standard_normal((D, H)) * 0.5).astype(np.float32))
    b1 = g.param("b1", np.zeros(H, np.float32))
    w2 = g.param("w2", (rng.standard_normal((H, C)) * 0.5).astype(np.float32))
    logits = lc.relu(x @ w1 + b1) @ w2
    loss = lc.softmax_cross_entropy(logits, y)
    g.output("logits", logits)
    g.output("loss", loss)
    return g, loss


def _prog():
    g, loss = _graph()
    return lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9))


def _good_feeds(seed=1):
    rng = np.random.default_rng(seed)
    return {"features": rng.standard_normal((B, D)).astype(np.float32),
            "labels": rng.integers(0, C, size=B).astype(np.int64)}




def _call_rejected(prog, method, feeds):
    with pytest.raises((ValueError, TypeError)) as ei:
        getattr(prog, method)(feeds)
    return str(ei.value)


def _snapshot(prog):
    return {k: v.tobytes() for k, v in prog.params.items()}


@pytest.fixture
def run_plan_calls(monkeypatch):
    _exec = pytest.importorskip("libml_runtime._exec")
    calls = []
    orig = _exec.run_plan

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(_exec, "run_plan", counting)
    return calls


def _bad_cases():
    """name -> (feeds transform, list of substrings/shapes the message must contain)."""
    good = _good_feeds()
    cases = {}
    f = dict(good)
    del f["labels"]
    cases["missing"] = (f, ["labels"], [])
    f = dict(good)
    f["bogus_feed"] = np.zeros((B, D), np.float32)
    cases["unknown"] = (f, ["bogus_feed"], [])
    f = dict(good)
    f["features"] = np.zeros((B, D + 1), np.float32)
    cases["wrong_shape"] = (f, ["features"], [(B, D), (B, D + 1)])
    f = dict(good)
    f["features"] = np.zeros((B + 1, D), np.float32)
    cases["wrong_batch"] = (f, ["features"], [(B, D), (B + 1, D)])
    f = dict(good)
    f["labels"] = np.zeros((B, 1), np.int64)
    cases["wrong_rank_labels"] = (f, ["labels"], [(B,), (B, 1)])
    f = dict(good)
    f["features"] = good["features"].astype(np.float64)
    cases["wrong_dtype"] = (f, ["features", "float32", "float64"], [])
    f = dict(good)
    f["labels"] = good["labels"].astype(np.float32)
    cases["float_labels"] = (f, ["labels", "int64", "float32"], [])
    f = dict(good)
    lab = good["labels"].copy()
    lab[3] = -1
    f["labels"] = lab
    cases["label_negative"] = (f, ["labels", "-1", str(C)], [])
    f = dict(good)
    lab = good["labels"].copy()
    lab[5] = C + 2
    f["labels"] = lab
    cases["label_too_large"] = (f, ["labels", str(C + 2), str(C)], [])
    f = dict(good)
    lab = good["labels"].copy()
    lab[0] = C                                             # the first value out of range: exactly C
    f["labels"] = lab
    cases["label_equal_C"] = (f, ["labels", str(C)], [])
    return cases


CASES = _bad_cases()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_feed_rejected_with_informative_message(case, method, run_plan_calls):
    feeds, words, shapes = CASES[case]
    prog = _prog()
    before = _snapshot(prog)
    run_plan_calls.clear()
    msg = _call_rejected(prog, method, feeds)
    for w in words:
        assert w in msg, f"{case}: message does not mention {w!r}: {msg!r}"
    for s in shapes:
        assert _mentions_shape(msg, s), f"{case}: message does not mention shape {s}: {msg!r}"
    assert len(run_plan_calls) == 0, f"{case}: the runtime ran on a rejected feed"
    assert _snapshot(prog) == before, f"{case}: params changed after a rejected {method}"


def test_unknown_feed_message_lists_expected_inputs():
    feeds, _, _ = CASES["unknown"]
    msg = _call_rejected(_prog(), "step", feeds)
    assert "features" in msg or "labels" in msg, f"message does not say which inputs exist: {msg!r}"


def test_missing_feed_message_names_expected_shape_or_dtype():
    feeds, _, _ = CASES["missing"]
    msg = _call_rejected(_prog(), "step", feeds)
    assert "labels" in msg
    assert _mentions_shape(msg, (B,)) or "int64" in msg, \
        f"missing-feed message gives neither the expected shape nor dtype: {msg!r}"


def test_rejected_steps_leave_optimizer_state_untouched():
    """After several rejected steps, valid steps give bit-identical params to a fresh program's."""
    a, b = _prog(), _prog()
    good = [_good_feeds(s) for s in (1, 2, 3)]
    for i, f in enumerate(good):
        for case in CASES:
            with pytest.raises((ValueError, TypeError)):
                a.step(CASES[case][0])
        la, lb = a.step(f), b.step(f)
        assert la == lb, f"step {i}: loss {la} != {lb}"
    pa, pb = a.params, b.params
    for k in pa:
        assert pa[k].tobytes() == pb[k].tobytes(), f"{k} differs after rejected steps"


def test_good_feeds_still_work_after_rejection():
    prog = _prog()
    with pytest.raises((ValueError, TypeError)):
        prog.step(CASES["label_negative"][0])
    loss = prog.step(_good_feeds())
    assert np.isfinite(loss)


def test_extreme_valid_labels_accepted():
    """Labels 0 and C-1 are in range (boundary of the check)."""
    prog = _prog()
    f = _good_feeds()
    f["labels"] = np.array([0, C - 1] * (B // 2), dtype=np.int64)
    assert np.isfinite(prog.step(f))
