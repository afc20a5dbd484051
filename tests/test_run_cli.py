"""Issue 5: ``libml-run PLAN --input DATA.npy|.npz [--batch-size N] --out PRED.npy``."""
import os
import subprocess
import sys

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime.cli import main

B, D, C = 64, 32, 5


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    g = lc.Graph("clf")
    x = g.input("x", (B, D))
    w = g.param("w", rng.standard_normal((D, C)).astype(np.float32))
    g.output("logits", lc.relu(x @ w) + 1.0)
    lc.compile(g).save(d / "clf.plan")
    # a two-input plan with a scalar output as well
    g2 = lc.Graph("two")
    a = g2.input("a", (B, D))
    b = g2.input("b", (B, D), dtype="float64")
    s = a * lc.cast(b, "float32")
    g2.output("s", s)
    g2.output("total", lc.sum(s))
    lc.compile(g2).save(d / "two.plan")
    return d


def reference(plan_path, x):
    exe = lr.load(plan_path)
    n = len(x)
    pad = np.concatenate([x, np.repeat(x[-1:], (-n) % B, axis=0)]) if n % B else x
    return np.concatenate([exe.run({"x": pad[i:i + B]})["logits"] for i in range(0, len(pad), B)])[:n]


@pytest.mark.parametrize("n", [B * 3, B * 3 + 17, 5, 1])
def test_npy_with_partial_batch(plan, tmp_path, n):
    x = np.random.default_rng(n).standard_normal((n, D)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main([str(plan / "clf.plan"), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o.npy"),
                 "--quiet"]) == 0
    out = np.load(tmp_path / "o.npy")
    assert out.shape == (n, C) and out.dtype == np.float32
    assert np.array_equal(out, reference(plan / "clf.plan", x))
    assert os.listdir(tmp_path) == ["x.npy", "o.npy"] or sorted(os.listdir(tmp_path)) == ["o.npy", "x.npy"]


def test_profile_flag_prints_the_instruction_table_after_the_run(plan, tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((B * 2 + 3, D)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main([str(plan / "clf.plan"), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o.npy"),
                 "--quiet", "--profile", "5"]) == 0
    err = capsys.readouterr().err
    assert "profile of entry 'run'" in err and "medians of 5 runs" in err and "gemm" in err, err
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), reference(plan / "clf.plan", x))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_multi_input(plan, tmp_path, compressed):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((150, D)).astype(np.float32)
    b = rng.standard_normal((150, D))
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", a=a, b=b)
    rc = main([str(plan / "two.plan"), "--input", str(tmp_path / "d.npz"), "--out", str(tmp_path / "s.npy"),
               "--batch-size", str(B), "--quiet"])
    assert rc == 0
    assert np.array_equal(np.load(tmp_path / "s.npy"), a * b.astype(np.float32))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "libml_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_bad_inputs(plan, tmp_path, capsys):
    np.save(tmp_path / "f64.npy", np.zeros((10, D)))
    np.save(tmp_path / "wide.npy", np.zeros((10, D + 1), np.float32))
    np.save(tmp_path / "ok.npy", np.zeros((10, D), np.float32))
    np.savez(tmp_path / "missing.npz", a=np.zeros((10, D), np.float32))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    (tmp_path / "junk.plan").write_bytes(b"LIBMLPLN garbage")
    np.save(tmp_path / "trunc.npy", np.zeros((100, D), np.float32))
    with open(tmp_path / "trunc.npy", "r+b") as f:
        f.truncate(2000)
    clf, out = plan / "clf.plan", tmp_path / "o.npy"
    cases = [
        ([clf, "--input", tmp_path / "f64.npy"], "dtype float64, the plan expects float32"),
        ([clf, "--input", tmp_path / "wide.npy"], "shape (10, 33)"),
        ([clf, "--input", tmp_path / "nope.npy"], "does not exist"),
        ([clf, "--input", tmp_path / "junk.npy"], "not a valid .npy"),
        ([clf, "--input", tmp_path / "trunc.npy"], "truncated"),
        ([clf, "--input", tmp_path / "ok.npy", "--batch-size", 7], "static batch size 64"),
        ([plan / "two.plan", "--input", tmp_path / "missing.npz"], "no array 'b'"),
        ([plan / "two.plan", "--input", tmp_path / "ok.npy"], "pass a .npz"),
        ([tmp_path / "junk.plan", "--input", tmp_path / "ok.npy"], "PlanError" if False else "invalid plan field"),
        ([tmp_path / "nope.plan", "--input", tmp_path / "ok.npy"], "does not exist"),
        ([clf, "--input", tmp_path / "ok.npy", "--output", "nope"], "no output 'nope'"),
    ]
    for args, msg in cases:
        rc = main([str(a) for a in args] + ["--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (args, err)
        assert len(err.splitlines()) == 1 and err.startswith("libml-run: error:"), err
        assert msg in err, (msg, err)
        assert not out.exists()
    # --cast allows the float64 file; the entry point exits non-zero in a real process too
    assert main([str(clf), "--input", str(tmp_path / "f64.npy"), "--out", str(out), "--cast", "--quiet"]) == 0
    p = run_cli(clf, "--input", tmp_path / "wide.npy", "--out", out)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "shape" in p.stderr


def test_512mb_memory_mapped_input_peak_rss(tmp_path):
    """A 512 MiB input streamed with peak RSS under 200 MB (the child's ru_maxrss, via wait4)."""
    rows, width, batch = 524288, 256, 1024
    g = lc.Graph("big")
    x = g.input("x", (batch, width))
    w = g.param("w", np.random.default_rng(0).standard_normal((width, 10)).astype(np.float32) * 0.1)
    g.output("logits", x @ w)
    lc.compile(g).save(tmp_path / "big.plan")
    # written with plain file writes (a memmap would leave 512 MB of dirty pages in this process)
    block = np.random.default_rng(1).standard_normal((8192, width)).astype(np.float32)
    with open(tmp_path / "big.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
        for i in range(0, rows, 8192):
            f.write((block + np.float32(i / rows)).tobytes())
    assert os.path.getsize(tmp_path / "big.npy") >= 512 * 2 ** 20
    # Linux carries the pre-exec memory high-water mark into ru_maxrss, and subprocess may vfork from this
    # (large) pytest process; a small launcher process spawns the CLI and reports its wait4 rusage
    launcher = ("import os, sys, subprocess; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); "
                "print(os.waitstatus_to_exitcode(st), ru.ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", launcher, sys.executable, "-m", "libml_runtime.cli",
                        str(tmp_path / "big.plan"), "--input", str(tmp_path / "big.npy"), "--out",
                        str(tmp_path / "pred.npy")], capture_output=True, text=True, timeout=300)
    err = p.stderr
    rc, maxrss_kb = map(int, p.stdout.split())
    p.returncode = rc
    usage = type("U", (), {"ru_maxrss": maxrss_kb})
    assert p.returncode == 0, err
    peak_mb = usage.ru_maxrss / 1024
    print(f"libml-run over 512 MiB: peak RSS {peak_mb:.1f} MB")
    assert peak_mb < 200, f"peak RSS {peak_mb:.1f} MB"
    assert "rows" in err  # the progress bar went to stderr
    pred = np.load(tmp_path / "pred.npy", mmap_mode="r")
    assert pred.shape == (rows, 10)
    src = np.load(tmp_path / "big.npy", mmap_mode="r")
    exe = lr.load(tmp_path / "big.plan")
    for i in (0, rows // 2, rows - batch):
        assert np.array_equal(pred[i:i + batch], exe.run({"x": np.ascontiguousarray(src[i:i + batch])})["logits"])
