"""Issue 14 (Dask part): ``libml_runtime.dask.map_plan`` and ``libml-run --dask`` on a 2-worker LocalCluster,
against ``libml-run`` itself (a subprocess, the runtime alone) as the oracle."""
import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="the dask extra is not installed (pip install '.[dask]')")
distributed = pytest.importorskip("distributed", reason="the dask extra is not installed (pip install '.[dask]')")

import libml_compile as lc  # noqa: E402
from libml_runtime.dask import from_npy, load_count, map_plan  # noqa: E402

B, D, C = 16, 12, 5


def _save_plan(path, seed, ):
    rng = np.random.default_rng(seed)
    g = lc.Graph("clf")
    x = g.input("x", (B, D))
    w = g.param("w", rng.standard_normal((D, C)).astype(np.float32))
    g.output("logits", lc.tanh(x @ w) + 1.0)
    g.output("total", lc.sum(x))
    lc.compile(g).save(path)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask")
    _save_plan(d / "clf.plan", 0)
    g = lc.Graph("two")  # two inputs of different rank and dtype
    a = g.input("a", (B, 2, 3))
    b = g.input("b", (B,), dtype="float64")
    g.output("y", lc.sum(a, axis=2) * lc.reshape(lc.cast(b, "float32"), (B, 1)))
    lc.compile(g).save(d / "two.plan")
    return d


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def libml_run(*args):
    r = subprocess.run([sys.executable, "-m", "libml_runtime.cli", *map(str, args), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def data(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


@pytest.mark.parametrize("n, chunk", [(160, 32), (101, 23), (40, 7)])
def test_map_plan_equals_libml_run_for_chunks_not_multiples_of_the_batch(client, plans, tmp_path, n, chunk):
    x = data(n)
    np.save(tmp_path / "x.npy", x)
    libml_run(plans / "clf.plan", "--input", tmp_path / "x.npy", "--out", tmp_path / "o.npy")
    y = map_plan(plans / "clf.plan", da.from_array(x, chunks=(chunk, -1)))
    assert y.shape == (n, C) and y.dtype == np.float32 and y.chunks[0] == da.from_array(x, chunks=(chunk, -1)).chunks[0]
    got = y.compute()
    assert got.dtype == np.float32 and np.array_equal(got, np.load(tmp_path / "o.npy"))


def test_last_chunk_shorter_than_a_batch_keeps_every_row_in_order(client, plans):
    x = data(B * 2 + 3, seed=2)  # chunks (16, 16, 3): the last is padded to a batch and cut back
    got = map_plan(plans / "clf.plan", da.from_array(x, chunks=(B, -1))).compute()
    rows = map_plan(plans / "clf.plan", da.from_array(x[-3:], chunks=(3, -1))).compute()
    assert got.shape == (B * 2 + 3, C) and np.array_equal(got[-3:], rows)
    assert not np.array_equal(got[-1], got[-2])


def test_multi_input_dict_with_different_ranks_and_dtypes(client, plans):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((37, 2, 3)).astype(np.float32)
    b = rng.standard_normal(37)
    y = map_plan(plans / "two.plan", {"a": da.from_array(a, chunks=(10, -1, -1)), "b": da.from_array(b, chunks=10)},
                 output="y").compute()
    np.testing.assert_allclose(y, a.sum(2) * b.astype(np.float32)[:, None], rtol=1e-6)
    with pytest.raises(ValueError, match=r"input 'b' has row chunks \(37,\).*same row chunks"):
        map_plan(plans / "two.plan", {"a": da.from_array(a, chunks=(10, -1, -1)), "b": da.from_array(b, chunks=37)},
                 output="y")


def test_each_worker_loads_the_plan_once(client, plans, tmp_path):
    import shutil
    p = tmp_path / "once.plan"
    shutil.copy(plans / "clf.plan", p)
    map_plan(p, da.from_array(data(200), chunks=(20, -1))).compute()  # 10 chunks over 2 workers
    counts = [c.get(str(p), 0) for c in client.run(load_count).values()]
    assert len(counts) == 2 and all(k <= 1 for k in counts) and sum(counts) >= 1, counts


def test_a_changed_plan_file_is_reloaded(client, plans, tmp_path):
    p = tmp_path / "changing.plan"
    _save_plan(p, 0)
    x = data(64)
    first = map_plan(p, da.from_array(x, chunks=(16, -1))).compute()
    _save_plan(p, 5)  # other weights, same path
    second = map_plan(p, da.from_array(x, chunks=(16, -1))).compute()
    np.save(tmp_path / "x.npy", x)
    libml_run(p, "--input", tmp_path / "x.npy", "--out", tmp_path / "o.npy")
    assert not np.array_equal(first, second) and np.array_equal(second, np.load(tmp_path / "o.npy"))
    assert sum(c.get(str(p), 0) for c in client.run(load_count).values()) >= 2


def test_bad_output_shape_dtype_and_chunks_are_refused_before_compute(plans, tmp_path):
    # no client needed: these raise while building the graph, before anything is scheduled
    x = da.from_array(data(40), chunks=(16, -1))
    with pytest.raises(ValueError, match=r"clf\.plan.*no output 'probs'.*\['logits', 'total'\]"):
        map_plan(plans / "clf.plan", x, output="probs")
    with pytest.raises(ValueError, match=r"clf\.plan.*input 'x' has shape \(40, 7\), the plan expects \(N,\) \+ \(12,\)"):
        map_plan(plans / "clf.plan", da.from_array(np.zeros((40, 7), np.float32), chunks=(16, -1)))
    with pytest.raises(ValueError, match=r"input 'x' has dtype float64, the plan expects float32"):
        map_plan(plans / "clf.plan", x.astype(np.float64))
    with pytest.raises(ValueError, match=r"input 'x' has chunks \(\(16, 16, 8\), \(6, 6\)\): only the row axis"):
        map_plan(plans / "clf.plan", da.from_array(data(40), chunks=(16, 6)))
    with pytest.raises(ValueError, match=r"plan file .*missing\.plan' does not exist"):
        map_plan(tmp_path / "missing.plan", x)
    with pytest.raises(ValueError, match=r"output 'total' has shape \(\), not one row per input row"):
        map_plan(plans / "clf.plan", x, output="total")


def test_cli_dask_local_writes_the_same_bytes_as_libml_run(plans, tmp_path):
    x = data(75, seed=4)
    np.save(tmp_path / "x.npy", x)
    libml_run(plans / "clf.plan", "--input", tmp_path / "x.npy", "--out", tmp_path / "o.npy", "--output", "logits")
    libml_run(plans / "clf.plan", "--input", tmp_path / "x.npy", "--out", tmp_path / "d.npy", "--output", "logits",
              "--dask", "local", "--chunk-rows", "20")
    assert (tmp_path / "d.npy").read_bytes() == (tmp_path / "o.npy").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["d.npy", "o.npy", "x.npy"]


def test_cli_dask_scheduler_address_with_npz_inputs(client, plans, tmp_path):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((33, 2, 3)).astype(np.float32)
    b = rng.standard_normal(33)
    np.savez(tmp_path / "d.npz", a=a, b=b)
    libml_run(plans / "two.plan", "--input", tmp_path / "d.npz", "--out", tmp_path / "o.npy")
    libml_run(plans / "two.plan", "--input", tmp_path / "d.npz", "--out", tmp_path / "k.npy",
              "--dask", client.scheduler.address, "--chunk-rows", "10")
    assert (tmp_path / "k.npy").read_bytes() == (tmp_path / "o.npy").read_bytes()


def test_from_npy_graph_carries_the_path_not_the_data(tmp_path):
    import pickle
    x = data(5000)
    np.save(tmp_path / "big.npy", x)
    a = from_npy(tmp_path / "big.npy", 1000)
    assert len(pickle.dumps(dict(a.__dask_graph__()))) < 20_000 < x.nbytes
    assert np.array_equal(a.compute(scheduler="sync"), x)
