"""Writers and readers of plans, checkpoints, ONNX files and libml-run outputs (issue 10, items 9-11, 13,
16, 21, 26 and the --out DIR / deep-meta parts of 28): atomic, umask-respecting writes that never replace
devices or symlinks, never destroy an input, survive concurrency, kills and full disks; reads that never
block on a FIFO or read a device forever."""
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import planfile
from libml_runtime.cli import main as run_main
from libml_runtime.fileio import FileSafetyError, atomic_write

B, D, C = 64, 32, 5


def _program(seed=0):
    rng = np.random.default_rng(seed)
    g = lc.Graph("clf")
    x = g.input("x", (B, D))
    w = g.param("w", rng.standard_normal((D, C)).astype(np.float32))
    g.output("logits", lc.relu(x @ w) + 1.0)
    return lc.compile(g, loss=lc.sum(x @ w), optimizer=lc.SGD(0.1))


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("fs") / "clf.plan"
    _program().save(p)
    return p


def _onnx_program(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return lc.compile(lc.import_onnx(m))


def _writers(tmp_path):
    """name -> write(path) for every file writer of the project."""
    prog = _program()
    exe = lr.load(_save_tmp(prog, tmp_path))
    onnx_prog = _onnx_program(tmp_path)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((B, D), np.float32))
    plan = tmp_path / "w.plan"
    prog.save(plan)

    def run(p):
        if run_main([str(plan), "--input", str(x), "--out", str(p), "--quiet"]) != 0:
            raise FileSafetyError("libml-run failed")
    return {"save": prog.save, "save_checkpoint": exe.save_checkpoint,
            "export_onnx": lambda p: lc.export_onnx(onnx_prog, p), "libml-run": run}


def _save_tmp(prog, tmp_path):
    p = tmp_path / "src.plan"
    prog.save(p)
    return p


WRITERS = ["save", "save_checkpoint", "export_onnx", "libml-run"]


# ---- item 9: devices, FIFOs, directories and symlinks --------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_writers_refuse_device_fifo_and_directory_destinations(tmp_path, writer):
    write = _writers(tmp_path)[writer]
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))   # a private /dev/null
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for dest, test in ((dev, stat.S_ISCHR), (fifo, stat.S_ISFIFO), (folder, stat.S_ISDIR)):
        with pytest.raises((FileSafetyError, OSError)):
            write(dest)
        assert test(os.lstat(dest).st_mode), f"{writer} replaced {dest.name}"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_update_a_symlinks_target_and_keep_the_link(tmp_path, writer):
    write = _writers(tmp_path)[writer]
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    os.symlink(target, link)
    write(link)
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old" and len(target.read_bytes()) > 3


# ---- item 26: umask ------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", WRITERS)
def test_writers_respect_the_umask(tmp_path, writer):
    write = _writers(tmp_path)[writer]
    old = os.umask(0o027)
    try:
        write(tmp_path / "out.bin")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.bin").st_mode) == 0o640


# ---- item 10 and --out DIR: refused before any work ----------------------------------------------

def test_libml_run_refuses_out_that_is_the_input_or_the_plan(tmp_path, plan_path, capsys):
    plan = tmp_path / "p.plan"
    plan.write_bytes(plan_path.read_bytes())
    x = tmp_path / "x.npy"
    np.save(x, np.ones((B, D), np.float32))
    os.link(x, tmp_path / "hard.npy")
    os.symlink(plan, tmp_path / "sym.plan")
    before = {p: p.read_bytes() for p in (plan, x)}
    for out in (x, plan, tmp_path / "hard.npy", tmp_path / "sym.plan"):
        assert run_main([str(plan), "--input", str(x), "--out", str(out), "--quiet"]) == 2
        assert "same file" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (plan, x)} == before


def test_libml_run_out_directory_fails_before_the_run(tmp_path, plan_path, capsys, monkeypatch):
    x = tmp_path / "x.npy"
    np.save(x, np.ones((B, D), np.float32))
    ran = []
    monkeypatch.setattr(lr.Executable, "run", lambda self, feeds: ran.append(1))
    assert run_main([str(plan_path), "--input", str(x), "--out", str(tmp_path), "--quiet"]) == 2
    assert "directory" in capsys.readouterr().err and not ran


# ---- item 11: concurrent saves ---------------------------------------------------------------------

def test_threads_saving_one_plan_path_while_others_load_it_never_see_a_partial_file(tmp_path):
    prog = _program()
    path = tmp_path / "shared.plan"
    prog.save(path)
    want = len(path.read_bytes())
    errors, loads = [], [0]
    stop = time.monotonic() + 1.5

    def saver():
        while time.monotonic() < stop:
            try:
                prog.save(path)
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(f"save: {type(e).__name__}: {e}")

    def loader():
        while time.monotonic() < stop:
            try:
                planfile.load_plan(path)
                assert os.path.getsize(path) == want
                loads[0] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(f"load: {type(e).__name__}: {e}")
    ts = [threading.Thread(target=f) for f in (saver, saver, saver, loader, loader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[:3]
    assert loads[0] > 20
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


# ---- item 13: killed libml-run ---------------------------------------------------------------------

def _start_long_run(tmp_path, plan_path, rows=400_000):
    x = tmp_path / "big.npy"
    np.save(x, np.ones((rows, D), np.float32))
    out = tmp_path / "o.npy"
    proc = subprocess.Popen([sys.executable, "-m", "libml_runtime.cli", str(plan_path), "--input", str(x),
                             "--out", str(out), "--quiet"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [n for n in os.listdir(tmp_path) if n.startswith(".o.npy.tmp-")]
        if temps and os.path.getsize(tmp_path / temps[0]) > 1 << 20:
            return proc, out, tmp_path / temps[0]
        if proc.poll() is not None:
            pytest.fail(f"libml-run ended before it could be killed: {proc.stderr.read()!r}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no temporary output appeared")


def test_sigterm_removes_the_temporary_output_and_exits_nonzero(tmp_path, plan_path):
    proc, out, tmp = _start_long_run(tmp_path, plan_path)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc != 0
    assert not tmp.exists() and not out.exists()
    assert b"SIGTERM" in proc.stderr.read()


def test_sigkill_leaves_a_temp_that_is_no_npy_and_the_next_run_removes_it(tmp_path, plan_path):
    proc, out, tmp = _start_long_run(tmp_path, plan_path)
    proc.kill()
    proc.wait(timeout=60)
    assert tmp.exists()
    with pytest.raises(ValueError):
        np.load(tmp)                                  # never looks like a finished result
    small = tmp_path / "small.npy"
    np.save(small, np.ones((B, D), np.float32))
    assert run_main([str(plan_path), "--input", str(small), "--out", str(out), "--quiet"]) == 0
    assert not tmp.exists() and np.load(out).shape == (B, C)


# ---- item 16: full disk ---------------------------------------------------------------------------

RUN_CHILD = ("import sys, resource; from libml_runtime.cli import main; "
             "lim = int(sys.argv[1]); lim and resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)); "
             "sys.exit(main(sys.argv[2:]))")


def _check_full_disk(tmp_dir, plan_path, limit):
    x = tmp_dir / "x.npy"
    np.save(x, np.ones((20 * B, D), np.float32))       # output: 20*64*5*4 = 25 kB
    out = tmp_dir / "o.npy"
    np.save(out, np.arange(3.0))
    prev = out.read_bytes()
    r = subprocess.run([sys.executable, "-c", RUN_CHILD, str(limit), str(plan_path), "--input", str(x),
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0], r.stderr
    assert out.read_bytes() == prev
    assert not [n for n in os.listdir(tmp_dir) if ".tmp-" in n]


def test_full_tmpfs_is_a_one_line_error_exit_2_previous_output_intact(tmp_path, plan_path):
    """A 64 kB tmpfs with 8 kB free: the old memory-mapped output died with SIGBUS here."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.decode().strip()}")
    try:
        x = tmp_path / "x.npy"
        np.save(x, np.ones((20 * B, D), np.float32))    # output: 20*64*5*4 = 25 kB
        out = mnt / "o.npy"
        np.save(out, np.arange(3.0))                    # one 4 kB page
        prev = out.read_bytes()
        (mnt / "fill").write_bytes(b"\1" * (52 << 10))  # 8 kB stay free
        r = subprocess.run([sys.executable, "-c", RUN_CHILD, "0", str(plan_path), "--input", str(x),
                            "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "No space left" in r.stderr, r.stderr
        assert out.read_bytes() == prev
        assert not [n for n in os.listdir(mnt) if ".tmp-" in n]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_file_size_limit_is_a_one_line_error_exit_2_previous_output_intact(tmp_path, plan_path):
    _check_full_disk(tmp_path, plan_path, 8192)


def test_atomic_write_error_midway_keeps_the_previous_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"previous")

    def write(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, write)
    assert p.read_bytes() == b"previous" and os.listdir(tmp_path) == ["f"]


# ---- item 21: FIFOs and devices as inputs ----------------------------------------------------------

READ_CHILD = r"""
import os, sys, stat, resource
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # an unbounded read fails fast, not OOM
d = sys.argv[1]
fifo, zero = os.path.join(d, "fifo"), os.path.join(d, "zero")
os.mkfifo(fifo)
os.mknod(zero, stat.S_IFCHR | 0o666, os.makedev(1, 5))
import libml_runtime as lr
from libml_runtime.checkpoint import read_checkpoint
from libml_compile.onnx_import import import_onnx
from libml_compile.cli import load_npz_data
from libml_runtime.cli import main
for path in (fifo, zero):
    for name, f in (("plan", lambda: lr.load(path)), ("checkpoint", lambda: read_checkpoint(path)),
                    ("onnx", lambda: import_onnx(path)), ("data", lambda: load_npz_data(path))):
        try:
            f()
            print(name, "accepted")
        except Exception as e:
            print(name, type(e).__name__, str(e).replace("\n", " ")[:400])
    print("run", main([sys.argv[2], "--input", path, "--out", os.path.join(d, "o.npy"), "--quiet"]))
"""


def test_fifos_and_devices_are_refused_as_plans_checkpoints_models_and_data(tmp_path, plan_path):
    try:
        r = subprocess.run([sys.executable, "-c", READ_CHILD, str(tmp_path), str(plan_path)],
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a reader blocked on a FIFO")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 10, (r.stdout, r.stderr)
    for line in lines:
        if line.startswith("run"):
            assert line == "run 2"
        else:
            assert ("FIFO" in line or "character device" in line) and "not a regular file" in line, line
    assert "not a regular file" in r.stderr


# ---- item 28: a deeply nested plan meta --------------------------------------------------------------

def _with_meta(data: bytes, meta) -> bytes:
    """Plan-file bytes with the header's meta replaced (and the checksum recomputed)."""
    header, area = planfile.unpack(data, planfile.MAGIC, "plan")
    header["meta"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    body = planfile.PREFIX.pack(planfile.MAGIC, planfile.FORMAT_VERSION, 0, len(h)) + h
    body += b"\0" * (planfile._align(len(body)) - len(body)) + bytes(area)
    return body + hashlib.sha256(body).digest()


def test_a_plan_that_loads_can_be_saved_again_deep_meta_is_refused_on_load_and_save(tmp_path, plan_path):
    deep = x = {}
    for _ in range(500):
        x["a"] = {}
        x = x["a"]
    p = tmp_path / "deep.plan"
    p.write_bytes(_with_meta(plan_path.read_bytes(), deep))
    with pytest.raises(lr.PlanError, match="meta: is nested more than 64"):
        lr.load(p)
    plan = planfile.load_plan(plan_path)
    plan.meta = deep
    with pytest.raises(ValueError, match="nested more than 64"):
        planfile.save(plan, tmp_path / "again.plan")
    ok = x = {}
    for _ in range(planfile.MAX_META_DEPTH - 1):
        x["a"] = {}
        x = x["a"]
    p.write_bytes(_with_meta(plan_path.read_bytes(), ok))
    exe = lr.load(p)
    exe.save(tmp_path / "again.plan")
    assert planfile.load_plan(tmp_path / "again.plan").meta == ok


def test_export_onnx_beyond_the_protobuf_limit_writes_external_data_atomically(tmp_path, monkeypatch):
    """The >2 GiB path (threshold lowered here) goes through the same atomic writer and ONNX Runtime
    reads the result."""
    import libml_compile.onnx_export as ox
    ort = pytest.importorskip("onnxruntime")
    prog = _onnx_program(tmp_path)
    prog.set_params({"w": np.full((4, 3), 0.5, np.float32)})
    monkeypatch.setattr(ox, "_EXTERNAL_THRESHOLD", 10)
    monkeypatch.setattr(ox, "_EXTERNAL_MIN_TENSOR", 1)
    out = tmp_path / "big.onnx"
    old = os.umask(0o027)
    try:
        lc.export_onnx(prog, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(str(out) + ".data").st_mode) == 0o640
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": np.ones((2, 4), np.float32)})[0], np.full((2, 3), 2.0))
