"""Issue 10 item 12: whatever name the compiler accepts survives compile -> save -> load -> state_dict ->
save_checkpoint -> load_checkpoint; names that could never be loaded are refused at declaration."""
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import libml_compile as lc
import libml_runtime as lr
from libml_compile.ir import MAX_NAME, RESERVED_NAMES, RESERVED_SUFFIXES


def _reserved(name):
    return name in RESERVED_NAMES or name.endswith(RESERVED_SUFFIXES)


_names = st.one_of(
    st.text(min_size=1, max_size=24),                                      # any Unicode (no lone surrogates)
    st.text(alphabet=st.sampled_from("ab/ _.-é中"), min_size=1, max_size=12),  # '/', spaces, dots
    st.sampled_from(["add_1", "matmul_5", "param_0", "const_3", "sum_10", "mul_7", "w", "w/m", "adam",
                     "step", "momentum", "exp_avg"]),                      # auto-like and state-like names
    st.integers(MAX_NAME - 3, MAX_NAME).map(lambda n: "ñ" * n),            # the longest accepted names
).filter(lambda s: not _reserved(s))


def _roundtrip(names, opt):
    """Build a small trainable graph using ``names`` for its params, input, an internal tensor and the
    output, take one step, and push it through every file format; returns the reloaded state dicts."""
    pw, pb, xin, hid, out = names
    rng = np.random.default_rng(0)
    g = lc.Graph(pw)
    x = g.input(xin, (4, 3))
    w = g.param(pw, rng.standard_normal((3, 2)).astype(np.float32))
    b = g.param(pb, np.zeros(2, np.float32))
    h = lc.matmul(x, w, name=hid) + b
    loss = lc.mean(h * h)
    g.output(out, h)
    prog = lc.compile(g, loss=loss, optimizer=opt)
    feeds = {xin: rng.standard_normal((4, 3)).astype(np.float32)}
    prog.step(feeds)
    want = prog.state_dict()
    with tempfile.TemporaryDirectory() as d:
        plan_path, ckpt_path = os.path.join(d, "p.plan"), os.path.join(d, "c.ckpt")
        prog.save(plan_path)
        exe = lr.load(plan_path)
        assert list(exe.run(feeds)) == [out]
        prog.save_checkpoint(ckpt_path)
        exe.step(feeds)  # move away, then restore
        exe.load_checkpoint(ckpt_path)
        got = exe.state_dict()
    return want, got, prog


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(_names, min_size=5, max_size=5, unique=True),
       opt=st.sampled_from(["sgd", "momentum", "adam"]))
def test_every_accepted_name_survives_save_load_and_checkpoint(names, opt):
    optimizer = {"sgd": lc.SGD(0.1), "momentum": lc.SGD(0.1, momentum=0.9), "adam": lc.Adam(0.01)}[opt]
    want, got, prog = _roundtrip(names, optimizer)
    assert set(names[:2]) <= set(want)
    # params and optimizer state never share a name: every array of the program is in the state dict
    assert len(want) == len(prog.plan.params) + len(prog.plan.opt_state)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("name", ["w/momentum", "w/exp_avg", "w/exp_avg_sq", "adam/step"])
def test_param_names_of_optimizer_state_are_refused_at_declaration(name):
    g = lc.Graph("r")
    g.param("w", np.ones(2, np.float32))
    with pytest.raises(ValueError, match=f"param '{name}': names ending in .* reserved for optimizer state"):
        g.param(name, np.ones(2, np.float32))
    # other tensors may use these names: they are not stored next to the optimizer state
    x = g.input(name, (2,))
    assert x.name == name


def test_names_the_reader_could_not_load_are_refused_at_declaration():
    g = lc.Graph("long")
    with pytest.raises(ValueError, match=f"4097 characters long; at most {MAX_NAME}"):
        g.param("p" * (MAX_NAME + 1), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="lone surrogate"):
        g.input("x\ud800", (2,))
    x = g.input("x", (2,))
    with pytest.raises(ValueError, match="output name"):
        g.output("", x)
    with pytest.raises(ValueError, match="output name"):
        g.output(7, x)


def test_longest_param_name_with_adam_state_loads_back():
    # f"{name}/exp_avg_sq" is longer than any user name: the reader must accept it (it refused > 4096)
    names = ["w" * MAX_NAME, "b" * MAX_NAME, "x" * MAX_NAME, "h" * MAX_NAME, "o" * MAX_NAME]
    want, got, _ = _roundtrip(names, lc.Adam(0.01))
    assert "w" * MAX_NAME + "/exp_avg_sq" in got
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
