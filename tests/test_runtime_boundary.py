"""Where user arrays enter the runtime and where state leaves it (issue 10, items 2, 6, 7).

* Arrays in any byte order or layout (``>f4``, strided, read-only, subclasses) are converted where they
  enter: params, consts, feeds, ``set_params``, ``load_state_dict``; the kernels read raw bytes.
* Readers of the state (``params``, ``state_dict``) hold the lock a step holds: never half an update.
* ``set_params`` validates every value before it writes any.
"""
import threading

import numpy as np
import pytest

import libml_compile as lc


def _xw_program(w, c=None):
    g = lc.Graph("xw")
    x = g.input("x", (1, 2))
    y = x @ g.param("w", w)
    if c is not None:
        y = y + g.const(c)
    g.output("y", y)
    return lc.compile(g)


ONE_BY_TWO = np.ones((1, 2), np.float32)


@pytest.mark.parametrize("order", [">", "<"])
def test_params_and_consts_in_either_byte_order_compute_the_same(order):
    prog = _xw_program(np.array([[1.0], [2.0]], dtype=order + "f4"), np.array([0.5], dtype=order + "f4"))
    np.testing.assert_array_equal(prog.run({"x": ONE_BY_TWO})["y"], [[3.5]])
    assert prog.params["w"].dtype == np.float32


def test_integer_consts_in_big_endian_are_read_as_numbers():
    g = lc.Graph("ints")
    i = g.input("i", (3,), dtype="int64")
    g.output("y", i + g.const(np.array([1, 2, 3], dtype=">i8")))
    out = lc.compile(g).run({"i": np.zeros(3, np.int64)})["y"]
    np.testing.assert_array_equal(out, [1, 2, 3])


def test_feeds_set_params_and_state_dicts_in_big_endian_are_converted():
    prog = _xw_program(np.ones((2, 1), np.float32))
    np.testing.assert_array_equal(prog.run({"x": np.ones((1, 2), ">f4")})["y"], [[2.0]])
    prog.set_params({"w": np.array([[2.0], [3.0]], ">f4")})
    np.testing.assert_array_equal(prog.run({"x": ONE_BY_TWO})["y"], [[5.0]])
    prog.load_state_dict({"w": np.array([[4.0], [4.0]], ">f4")})
    np.testing.assert_array_equal(prog.run({"x": ONE_BY_TWO})["y"], [[8.0]])


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_strided_readonly_and_subclassed_arrays_enter_as_plain_copies():
    base = np.arange(8, dtype=np.float32).reshape(4, 2)
    w = base[::2, :1]                      # strided (2, 1) view: [[0], [4]]
    w.flags.writeable = False
    prog = _xw_program(w, np.asmatrix([[1.0]], dtype=np.float32))
    np.testing.assert_array_equal(prog.run({"x": ONE_BY_TWO})["y"], [[5.0]])
    x = np.ones((2, 4), np.float32)[:, ::2][:1]  # non-contiguous feed
    np.testing.assert_array_equal(prog.run({"x": x})["y"], [[5.0]])


# ---- item 7: set_params validates everything, then writes everything --------------------------------

def _two_param_program():
    g = lc.Graph("two")
    x = g.input("x", (1, 2))
    a = g.param("a", np.ones((2, 1), np.float32))
    b = g.param("b", np.ones(1, np.float32))
    g.output("y", x @ a + b)
    return lc.compile(g)


@pytest.mark.parametrize("bad, err, match", [
    ("abc", TypeError, "real numbers"),
    (np.array([1 + 2j]), TypeError, "real numbers"),
    (np.array([1e300]), ValueError, "overflows float32"),
    (np.ones(2, np.float32), ValueError, "expected shape"),
    ([[1], [2, 3]], TypeError, "cannot convert"),
])
def test_set_params_with_one_bad_value_writes_nothing(bad, err, match):
    prog = _two_param_program()
    before = prog.params
    with pytest.raises(err, match=match):
        prog.set_params({"a": np.full((2, 1), 7.0), "b": bad})  # the good value comes first
    for k, v in prog.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_set_params_accepts_integers_and_float64_that_fit():
    prog = _two_param_program()
    prog.set_params({"a": np.array([[2], [3]]), "b": np.array([0.25])})
    np.testing.assert_array_equal(prog.run({"x": ONE_BY_TWO})["y"], [[5.25]])


# ---- item 6: readers take the step's lock --------------------------------------------------------------

def test_params_and_state_dict_never_return_half_an_update():
    """Eight params that every SGD step moves by the same amount: any snapshot taken while the update
    instruction is half done has params that differ."""
    n = 1 << 17
    g = lc.Graph("lockstep")
    ws = [g.param(f"w{k}", np.zeros(n, np.float32)) for k in range(8)]
    loss = ws[0] * 1.0
    for w in ws[1:]:
        loss = loss + w
    loss = lc.sum(loss)
    g.output("loss", loss)
    prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=1.0, momentum=0.5), num_threads=1)
    stop = threading.Event()

    def train():
        while not stop.is_set():
            prog.step({})

    t = threading.Thread(target=train)
    t.start()
    torn = 0
    try:
        for k in range(60):
            snap = prog.params if k % 2 else prog.state_dict()
            firsts = {float(snap[f"w{j}"][0]) for j in range(8)} | {float(snap[f"w{j}"][-1]) for j in range(8)}
            torn += len(firsts) != 1
    finally:
        stop.set()
        t.join()
    assert torn == 0, f"{torn} of 60 snapshots mixed two steps"


def test_a_program_holds_its_executable_and_delegates_all_of_its_public_api():
    """``Program`` owns a ``libml_runtime.Executable`` (it is not one): every public name of the runtime
    object is on the Program too, and the calls reach that one executable (whose lock they all take)."""
    from libml_runtime import Executable
    prog = _xw_program(np.array([[1.0], [2.0]], np.float32))
    exe = prog.executable
    assert isinstance(exe, Executable) and not isinstance(prog, Executable)
    missing = sorted(n for n in dir(exe) if not n.startswith("_") and not hasattr(prog, n))
    assert missing == [], f"Program does not expose {missing}"
    assert prog.plan is exe.plan and prog.num_threads == exe.num_threads and prog.check_finite is False
    prog.set_params({"w": np.array([[3.0], [4.0]], np.float32)})
    np.testing.assert_array_equal(exe.params["w"], [[3.0], [4.0]])
    np.testing.assert_array_equal(exe.run({"x": ONE_BY_TWO})["y"], prog.run({"x": ONE_BY_TWO})["y"])
    assert prog.state_dict().keys() == exe.state_dict().keys() == {"w"}


# ---- item 15: integer MIN / -1 wraps as in NumPy, never a SIGFPE ----------------------------------------

INT_CHILD = r"""
import sys, numpy as np, libml_compile as lc
for dt in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
    info = np.iinfo(dt)
    a = np.array([info.min, info.max, info.min, 7, -7 if info.min < 0 else 7, info.max], dt)
    b = np.array([-1 if info.min < 0 else 1, -1 if info.min < 0 else 3, 1, -2 if info.min < 0 else 2, 2, info.max], dt)
    g = lc.Graph(dt)
    x, y = g.input("a", a.shape, dtype=dt), g.input("b", b.shape, dtype=dt)
    for op in ("add", "sub", "mul", "div"):
        g.output(op, getattr(lc, op)(x, y))
    got = lc.compile(g).run({"a": a, "b": b})
    with np.errstate(all="ignore"):
        want = {"add": a + b, "sub": a - b, "mul": a * b,
                "div": (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(dt) if info.min < 0 else a // b}
    for op in want:
        if not np.array_equal(got[op], want[op]):
            sys.exit(f"{dt} {op}: got {got[op]}, want {want[op]}")
print("ok")
"""


def test_integer_min_divided_by_minus_one_wraps_and_overflow_wraps_like_numpy():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", INT_CHILD], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stdout, p.stderr[-2000:])


def test_constant_folding_of_integer_min_divided_by_minus_one_agrees_with_the_kernel():
    g = lc.Graph("fold")
    q = g.const(np.array([np.iinfo(np.int32).min], np.int32)) / g.const(np.array([-1], np.int32))
    g.output("q", q + g.input("z", (1,), dtype="int32"))
    out = lc.compile(g).run({"z": np.zeros(1, np.int32)})["q"]
    np.testing.assert_array_equal(out, [np.iinfo(np.int32).min])


# ---- item 17: thread counts are bounded; item 18: labels are read once ---------------------------------

@pytest.mark.parametrize("n, match", [(0, r"\[1, 256\], got 0"), (10_000, r"\[1, 256\], got 10000"),
                                      (100_000, "got 100000"), (2.5, "must be an integer"),
                                      ("4", "must be an integer"), (True, "must be an integer")])
def test_num_threads_outside_the_documented_range_is_a_value_error(n, match):
    from libml_runtime.threads import MAX_THREADS
    assert MAX_THREADS == 256
    with pytest.raises(ValueError, match=match):
        _xw_program_threads(n)


def _xw_program_threads(n):
    g = lc.Graph("t")
    g.output("y", g.input("x", (1, 2)) @ g.param("w", np.ones((2, 1), np.float32)))
    return lc.compile(g, num_threads=n)


@pytest.mark.parametrize("env, ok", [("100000", False), ("abc", False), ("0", False), ("3,2", True), ("2", True)])
def test_omp_num_threads_is_validated(monkeypatch, env, ok):
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    if ok:
        assert _xw_program_threads(None).num_threads == int(env.split(",")[0])
    else:
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            _xw_program_threads(None)


LABEL_RACE_CHILD = r"""
import threading, numpy as np, libml_compile as lc
B, C = 256, 4
g = lc.Graph("race")
x = g.input("x", (B, 8)); y = g.input("y", (B,), dtype="int64")
w = g.param("w", np.zeros((8, C), np.float32))
loss = lc.softmax_cross_entropy(x @ w, y)
g.output("loss", loss)
prog = lc.compile(g, loss=loss, optimizer=lc.SGD(0.1), num_threads=2)
feeds = {"x": np.ones((B, 8), np.float32), "y": np.zeros(B, np.int64)}
stop = threading.Event()
def scribble():
    lab = feeds["y"]
    while not stop.is_set():
        lab[:] = 1 << 40      # far out of range: an unchecked read indexes 4 TB away
        lab[:] = 0
t = threading.Thread(target=scribble); t.start()
clean = refused = 0
try:
    for _ in range(1500):
        try:
            prog.step(feeds); prog.run(feeds); clean += 1
        except ValueError as e:
            assert "'y'" in str(e), e
            refused += 1
finally:
    stop.set(); t.join()
assert np.all(np.isfinite(prog.params["w"]))
print("ok", clean, refused)
"""


def test_labels_rewritten_by_another_thread_during_steps_never_crash():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", LABEL_RACE_CHILD], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and p.stdout.startswith("ok"), (p.returncode, p.stdout, p.stderr[-2000:])


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint64"])
def test_constant_folded_integer_division_truncates_exactly_like_the_kernel(dtype):
    """The NumPy reference folded MIN / 2 to a positive number (it divided abs(MIN), which is MIN)."""
    from libml_compile.ops import REGISTRY
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    a = np.concatenate([np.array([info.min, info.min, info.min, info.max, 7], dtype),
                        rng.integers(info.min, info.max, 300, dtype=dtype, endpoint=True)])
    b = np.concatenate([np.array([2, 3, -1 if info.min < 0 else 1, -3 if info.min < 0 else 3, 2], dtype),
                        rng.integers(info.min, info.max, 300, dtype=dtype, endpoint=True)])
    b[b == 0] = 1
    folded = REGISTRY["div"].ref({}, a, b)
    def trunc(x, y):  # exact truncating division in Python ints, then wrapped to the dtype's width
        q = abs(x) // abs(y)
        return (q if (x < 0) == (y < 0) else -q) % 2 ** 64
    exact = np.array([trunc(int(x), int(y)) for x, y in zip(a, b)], dtype=np.uint64).astype(dtype)
    np.testing.assert_array_equal(folded, exact)
    g = lc.Graph("kernel")
    x, y = g.input("a", a.shape, dtype=dtype), g.input("b", b.shape, dtype=dtype)
    g.output("q", x / y)
    np.testing.assert_array_equal(lc.compile(g).run({"a": a, "b": b})["q"], folded)


def test_constant_integer_division_by_zero_is_refused_at_compile_time():
    g = lc.Graph("zero")
    q = g.const(np.array([4], np.int32)) / g.const(np.array([0], np.int32))
    g.output("q", q + g.input("z", (1,), dtype="int32"))
    with pytest.raises(ZeroDivisionError, match="constant"):
        lc.compile(g)
