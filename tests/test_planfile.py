"""Issue 5: self-contained plan files.  save -> libml_runtime.load (runtime only) -> run and 10 more steps
bit-identical to the original program; the container's magic, version, checksum; no pickle."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import planfile as PF
from conftest import build_mlp, make_mlp_params, teacher_task


def mlp_program(opt, dtype="float32", check_finite=False, batch=16, hidden=16):
    w = make_mlp_params([8, hidden, 3], dtype=np.dtype(dtype), seed=3)
    g, loss = build_mlp(w, batch, dtype=dtype)
    return lc.compile(g, loss, opt, check_finite=check_finite, num_threads=2)


def batches(n, batch=16, dtype=np.float32):
    x, y = teacher_task(n * batch, 8, 3, dtype=dtype, seed=1)
    return [{"x": x[i * batch:(i + 1) * batch], "y": y[i * batch:(i + 1) * batch]} for i in range(n)]


RUNTIME_ONLY = textwrap.dedent("""
    import sys, json, numpy as np
    import libml_runtime
    exe = libml_runtime.load(sys.argv[1], num_threads=2)
    bad = [m for m in ("onnx", "libml_compile") if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)]
    d = dict(np.load(sys.argv[2]))
    out = {}
    feeds = {"x": d["x0"], "y": d["y0"]}
    for k, v in exe.run(feeds).items():
        out["run_" + k] = v
    losses = []
    for i in range(10):
        losses.append(exe.step({"x": d[f"x{i}"], "y": d[f"y{i}"]}))
    out["losses"] = np.array(losses)
    for k, v in exe.params.items():
        out["param_" + k] = v
    for k, v in exe.state_dict().items():
        out["state_" + k.replace("/", "__")] = v
    np.savez(sys.argv[3], **out)
    print(json.dumps(bad))
""")


@pytest.mark.parametrize("opt,hidden", [(lc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3), 16),
                                        (lc.Adam(lr=1e-2, weight_decay=1e-2), 16),
                                        (lc.Adam(lr=1e-2, weight_decay=1e-2), 2048)],
                         ids=["sgd", "adam", "adam_split"])  # 2048: w0 is 64 KiB, its update is split off
def test_save_load_runtime_only_bit_identical(tmp_path, opt, hidden):
    prog = mlp_program(opt, hidden=hidden)
    assert (hidden == 2048) == ("adam_count" in [r["op"] for r in prog.instructions("step")])
    data = batches(13)
    for b in data[:3]:           # saved mid-training: params and optimizer state must travel
        prog.step(b)
    prog.save(tmp_path / "p.plan")
    np.savez(tmp_path / "feeds.npz", **{f"x{i}": b["x"] for i, b in enumerate(data[3:])},
             **{f"y{i}": b["y"] for i, b in enumerate(data[3:])})
    p = subprocess.run([sys.executable, "-c", RUNTIME_ONLY, str(tmp_path / "p.plan"), str(tmp_path / "feeds.npz"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [], "runtime-only load imported the compiler/onnx"
    got = dict(np.load(tmp_path / "out.npz"))
    ref = prog.run(data[3])
    for k, v in ref.items():
        assert np.array_equal(got["run_" + k], v), k
    losses = [prog.step(b) for b in data[3:]]
    assert np.array_equal(got["losses"], np.array(losses))
    for k, v in prog.params.items():
        assert np.array_equal(got["param_" + k], v), k
    for k, v in prog.state_dict().items():
        assert np.array_equal(got["state_" + k.replace("/", "__")], v), k


def test_loaded_program_matches_in_process(tmp_path):
    prog = mlp_program(lc.Adam(lr=1e-2), dtype="float64")
    b = batches(1, dtype=np.float64)[0]
    prog.save(tmp_path / "p.plan")
    exe = lr.load(tmp_path / "p.plan", num_threads=1)
    assert isinstance(exe, lr.Executable) and exe.num_threads == 1
    assert exe.plan.name == prog.plan.name
    g1, g2 = prog.grad(b), exe.grad(b)
    assert g1.keys() == g2.keys() and all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert [p[:4] for p in exe.plan.params] == [p[:4] for p in prog.plan.params]
    assert exe.plan.graph_inputs == [(n, d, tuple(s)) for n, d, s in prog.plan.graph_inputs]


def test_forward_only_and_reload_twice(tmp_path):
    g = lc.Graph("fwd")
    x = g.input("x", (4, 3))
    w = g.param("w", np.arange(6, dtype=np.float32).reshape(3, 2))
    g.output("y", lc.sigmoid(x @ w))
    prog = lc.compile(g)
    prog.save(tmp_path / "a.plan")
    lr.load(tmp_path / "a.plan").save(tmp_path / "b.plan")
    assert open(tmp_path / "a.plan", "rb").read() == open(tmp_path / "b.plan", "rb").read()
    xv = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    assert np.array_equal(lr.load(tmp_path / "b.plan").run({"x": xv})["y"], prog.run({"x": xv})["y"])
    with pytest.raises(RuntimeError, match="step"):
        lr.load(tmp_path / "b.plan").step({"x": xv})


def test_container_fields(tmp_path):
    prog = mlp_program(lc.SGD(lr=0.1))
    path = tmp_path / "p.plan"
    prog.save(path)
    data = open(path, "rb").read()
    magic, version, flags, hlen = PF.PREFIX.unpack_from(data, 0)
    assert magic == b"LIBMLPLN" and version == lr.FORMAT_VERSION == 2 and flags == 0
    header = json.loads(data[PF.PREFIX.size:PF.PREFIX.size + hlen])
    assert header["format"] == "libml-plan" and set(header["entries"]) == {"run", "grad", "step"}
    assert not [f for f in os.listdir(tmp_path) if f != "p.plan"], "temporary file left behind"
    assert b"pickle" not in open(PF.__file__, "rb").read().replace(b"never pickle", b"").replace(b"NO pickle", b"")

    def expect(blob, field):
        (tmp_path / "bad.plan").write_bytes(blob)
        with pytest.raises(lr.PlanError, match=field):
            lr.load(tmp_path / "bad.plan")
    expect(b"NOTAPLAN" + data[8:], "magic")
    expect(data[:8] + (3).to_bytes(4, "little") + data[12:], "version")
    # a plan written by an older libml (2-operand fused-kernel steps) is refused with a way out, never
    # decoded under the new layout
    with pytest.raises(lr.PlanError, match="older libml: compile and save the program again"):
        PF.loads(data[:8] + (1).to_bytes(4, "little") + data[12:])
    expect(data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum")
    expect(data[:-1], "checksum")
    expect(data + b"\0", "checksum")
    expect(data[:10], "file")
    expect(b"", "file")


def test_check_finite_round_trip(tmp_path):
    prog = mlp_program(lc.SGD(lr=0.1), check_finite=True)
    prog.save(tmp_path / "p.plan")
    exe = lr.load(tmp_path / "p.plan", check_finite=True)
    b = batches(1)[0]
    b["x"] = b["x"].copy()
    b["x"][0, 0] = np.inf
    before = exe.params
    with pytest.raises(lr.NonFiniteError):
        exe.step(b)
    assert all(np.array_equal(before[k], v) for k, v in exe.params.items())
    mlp_program(lc.SGD(lr=0.1)).save(tmp_path / "q.plan")
    with pytest.raises(ValueError, match="check_finite"):
        lr.load(tmp_path / "q.plan", check_finite=True)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        lr.load(tmp_path / "nope.plan")


def test_a_step_entry_without_its_loss_output_is_refused_at_load(tmp_path):
    """The plan fuzzer found it: deleting the step entry's 'loss' output loaded, then step() raised a
    bare KeyError('loss')."""
    from libml_runtime.plan import PlanError
    g = lc.Graph("noloss")
    x = g.input("x", (2, 3))
    w = g.param("w", np.ones((3, 1), np.float32))
    loss = lc.mean(x @ w)
    g.output("loss", loss)
    plan = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1)).plan
    plan.entries["step"].outputs = [o for o in plan.entries["step"].outputs if o[0] != "loss"]
    path = tmp_path / "p.plan"
    path.write_bytes(PF.dumps(plan))
    with pytest.raises(PlanError, match="no floating scalar output named 'loss'"):
        lr.load(path)
