"""Issue 5: embedding.  Several loaded copies of one plan run correctly in parallel threads, the GIL is
released inside the runtime, one object used from two threads serialises, memory does not grow."""
import gc
import os
import threading
import tracemalloc

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import _exec
from conftest import build_mlp, make_mlp_params, teacher_task


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    g, loss = build_mlp(make_mlp_params([16, 32, 4], dtype=np.float32, seed=2), 32, dtype="float32")
    lc.compile(g, loss, lc.Adam(lr=1e-2)).save(d / "p.plan")
    return d / "p.plan"


def feeds(seed, n=32):
    x, y = teacher_task(n, 16, 4, dtype=np.float32, seed=seed)
    return {"x": x, "y": y}


def test_copies_in_parallel_threads(plan_path):
    data = [[feeds(100 * t + i) for i in range(30)] for t in range(4)]
    expected = []
    for t in range(4):                                   # sequential reference, one copy per stream
        e = lr.load(plan_path, num_threads=1)
        losses = [e.step(b) for b in data[t]]
        expected.append((losses, e.params, e.run(data[t][0])["logits"]))
    copies = [lr.load(plan_path, num_threads=1) for _ in range(4)]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def work(t):
        barrier.wait()
        losses = [copies[t].step(b) for b in data[t]]
        results[t] = (losses, copies[t].params, copies[t].run(data[t][0])["logits"])
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        assert results[t][0] == expected[t][0]
        assert all(np.array_equal(results[t][1][k], v) for k, v in expected[t][1].items())
        assert np.array_equal(results[t][2], expected[t][2])


def test_gil_released_during_run(tmp_path, monkeypatch):
    g = lc.Graph("heavy")
    x = g.input("x", (512, 512))
    w = g.param("w", np.full((512, 512), 1e-3, np.float32))
    h = x
    for _ in range(20):
        h = lc.sigmoid(h @ w)
    g.output("h", h)
    lc.compile(g).save(tmp_path / "h.plan")
    exe = lr.load(tmp_path / "h.plan", num_threads=1)
    xv = np.ones((512, 512), np.float32)
    inside, done = threading.Event(), threading.Event()
    real = _exec.run_plan

    def wrapped(*a, **k):
        inside.set()
        return real(*a, **k)
    monkeypatch.setattr(_exec, "run_plan", wrapped)

    def work():
        for _ in range(3):
            exe.run({"x": xv})
        done.set()
    th = threading.Thread(target=work)
    th.start()
    inside.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
    th.join()
    # with the GIL held for the whole call this loop could not run while the plan executes
    assert ticks > 10000, ticks


def test_one_object_two_threads_serialises(plan_path, monkeypatch):
    exe = lr.load(plan_path, num_threads=1)
    a, b = feeds(1), feeds(2)
    ra, rb = exe.run(a)["logits"], exe.run(b)["logits"]
    active, overlap = {}, []
    lock = threading.Lock()
    real = _exec.run_plan

    def wrapped(code, consts, buffers, nthreads=1, *rest):
        key = id(buffers[0])                           # the arena: one per object
        with lock:
            active[key] = active.get(key, 0) + 1
            if active[key] > 1:
                overlap.append(key)
        try:
            threading.Event().wait(0.0005)             # widen the window
            return real(code, consts, buffers, nthreads, *rest)
        finally:
            with lock:
                active[key] -= 1
    monkeypatch.setattr(_exec, "run_plan", wrapped)
    errors = []

    def work(f, ref):
        for _ in range(100):
            if not np.array_equal(exe.run(f)["logits"], ref):
                errors.append("corrupted result")
    ts = [threading.Thread(target=work, args=(a, ra)), threading.Thread(target=work, args=(b, rb))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not overlap, "two calls ran on one object's buffers at once"
    assert not errors
    # concurrent steps on one object == the same number of sequential steps (same batch: order-free)
    ref = lr.load(plan_path, num_threads=1)
    for _ in range(40):
        ref.step(a)
    exe.load_state_dict(lr.load(plan_path).state_dict())  # back to the initial params and moments
    ts = [threading.Thread(target=lambda: [exe.step(a) for _ in range(20)]) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(np.array_equal(exe.params[k], v) for k, v in ref.params.items())


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_does_not_grow_over_10000_steps(plan_path):
    exe = lr.load(plan_path, num_threads=1)
    f = feeds(3)
    for _ in range(200):                                   # warm-up: caches, BLAS buffers, allocator pools
        exe.step(f)
        exe.run(f)
    gc.collect()
    tracemalloc.start()
    rss0 = rss_bytes()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(10000):
        exe.step(f)
    for _ in range(500):
        exe.run(f)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    rss1 = rss_bytes()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    print(f"10,000 steps: traced Python memory {grown / 1024:+.1f} KiB, RSS {(rss1 - rss0) / 2 ** 20:+.2f} MiB")
    assert grown < 64 * 1024, grown
    assert rss1 - rss0 < 8 * 2 ** 20, rss1 - rss0
