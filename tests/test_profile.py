"""`prog.profile(entry, feeds)`: per-instruction times from inside the runtime call, attributed to the
right instruction, joined with the compiler's FLOPs and bytes, and without side effects on the params."""
import numpy as np
import pytest

import libml_compile as lc
import libml_runtime
from conftest import build_mlp, make_mlp_params

_exec = pytest.importorskip("libml_runtime._exec")


def _mlp(optimizer=None):
    weights = make_mlp_params([6, 16, 3], np.float64)
    g, loss = build_mlp(weights, 8)
    prog = lc.compile(g, loss=loss, optimizer=optimizer or lc.SGD(lr=0.1, momentum=0.9))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((8, 6)), "y": rng.integers(0, 3, size=8).astype(np.int64)}
    return prog, feeds


def test_profile_rows_follow_the_plan_and_carry_the_compilers_figures():
    prog, feeds = _mlp()
    prof = prog.profile("step", feeds, repeat=5, warmup=1)
    ins = prog.instructions("step")
    assert [r["op"] for r in prof.rows] == [i["op"] for i in ins]
    assert [r["index"] for r in prof.rows] == list(range(len(ins)))
    for r, i in zip(prof.rows, ins):
        assert r["min_ms"] >= 0 and r["median_ms"] >= r["min_ms"]
        assert r["flops"] == i["flops"] and r["bytes"] == i["bytes"]
        if r["median_ms"] > 0:
            assert r["gflops"] == pytest.approx(i["flops"] / (r["median_ms"] / 1e3) / 1e9)
    assert sum(r["share"] for r in prof.rows) == pytest.approx(1.0, rel=0.2)  # medians do not add up exactly
    # each call's instructions are part of that call, so the medians keep that order
    assert prof.call_ms >= prof.total_ms > 0
    text = str(prof)
    assert "GFLOP/s" in text and all(r["op"] in text for r in prof.rows)


def test_profile_attributes_time_to_the_instruction_that_spends_it():
    # a 256^3 GEMM next to a 2-element add: the GEMM's row must carry the time (any misalignment of
    # rows and instructions, or a timer around the wrong thing, shows up here)
    g = lc.Graph("attr")
    x = g.input("x", (256, 256), dtype="float64")
    w = g.param("w", np.random.default_rng(0).standard_normal((256, 256)))
    s = g.input("s", (2,), dtype="float64")
    g.output("y", lc.matmul(x, w))
    g.output("t", s + 1.0)
    prog = lc.compile(g, num_threads=1)
    feeds = {"x": np.ones((256, 256)), "s": np.ones(2)}
    prof = prog.profile("run", feeds, repeat=5)
    by_op = {r["op"]: r for r in prof.rows}
    assert set(by_op) == {"gemm", "add"}
    assert by_op["gemm"]["median_ms"] > 20 * by_op["add"]["median_ms"]
    assert prof.top(1)[0]["op"] == "gemm"


@pytest.mark.parametrize("opt", [lc.SGD(lr=0.1, momentum=0.9), lc.Adam(lr=0.01)], ids=["momentum", "adam"])
def test_profiling_step_leaves_params_and_optimizer_state_untouched(opt):
    prog, feeds = _mlp(opt)
    prog.step(feeds)  # non-trivial optimizer state
    before = prog.state_dict()
    prog.profile("step", feeds, repeat=3, warmup=1)
    after = prog.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # and the next real step is the one an unprofiled twin takes
    twin, _ = _mlp(opt)
    twin.step(feeds)
    assert prog.step(feeds) == twin.step(feeds)


def test_profile_of_a_loaded_plan_needs_no_compiler(tmp_path):
    prog, feeds = _mlp()
    path = prog.save(tmp_path / "m.lmp")
    exe = libml_runtime.load(path)
    prof = exe.profile("grad", feeds, repeat=2)
    assert len(prof.rows) == prog.instruction_count("grad")
    assert all("flops" not in r for r in prof.rows)  # the runtime alone knows no FLOP counts
    assert "node" in str(prof)


def test_profile_rejects_bad_arguments_by_name():
    prog, feeds = _mlp()
    with pytest.raises(ValueError, match="repeat"):
        prog.profile("step", feeds, repeat=0)
    with pytest.raises(ValueError, match="missing feed 'y'"):
        prog.profile("step", {"x": feeds["x"]})
    e = prog.plan.entries["run"]
    with pytest.raises(ValueError, match="times has 0 entries"):
        _exec.run_plan(e.code, e.consts, [prog.executable._arena, prog.executable._state, feeds["x"]], 1, np.zeros(0))


def test_a_failing_profiled_step_restores_the_params():
    prog, feeds = _mlp()
    before = prog.params
    bad = dict(feeds, y=np.full(8, 7, np.int64))  # labels out of range: caught before the runtime runs
    with pytest.raises(ValueError, match="labels"):
        prog.profile("step", bad, repeat=2)
    for k, v in prog.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_profile_of_a_checked_program_times_the_checked_instructions():
    weights = make_mlp_params([6, 16, 3], np.float64)
    g, loss = build_mlp(weights, 8)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1), check_finite=True)
    _, feeds = _mlp()
    prof = prog.profile("step", feeds, repeat=2)
    # the checked entry is unfused and checks every result: more instructions than the summary lists
    assert len(prof.rows) == len(prog.plan.entries["step"].checked.instr_nodes) > prog.instruction_count("step")
    assert "check_finite" in [r["op"] for r in prof.rows] and all("flops" not in r for r in prof.rows)
