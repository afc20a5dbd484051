"""Fuzz worker for tests/test_plan_fuzz.py (runs in a subprocess so that a crash is reported, not fatal).

usage: python plan_fuzz_worker.py OUT_DIR MAX_EXAMPLES SEED BASE.plan [BASE.plan ...]

Every case mutates one valid plan file and feeds it to the runtime: it must either raise ``PlanError``
while loading, or load and then run each entry, returning results or raising one of the runtime's clean
errors (bad feed, label range, integer division by zero, non-finite).  Anything else — another exception,
a crash, a hang — fails.  Before each case the mutated bytes are written to OUT_DIR/last_case.plan, so
a segfault leaves its reproducer behind (faulthandler prints the stack).

Mutations (hypothesis picks one per case):
  raw      flip / overwrite bytes, truncate, extend — the checksum must reject these;
  resign   the same, then recompute the SHA-256 so the corruption reaches the parser and validator;
  header   change one JSON value (type, boundary integer, string, delete/duplicate), re-signed;
  section  change int64 code / float64 const / state values, or resize a section, re-signed.
"""
import faulthandler
import hashlib
import json
import os
import struct
import sys

import numpy as np

faulthandler.enable()

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import libml_runtime as lr  # noqa: E402
from libml_runtime import planfile as PF  # noqa: E402
from libml_runtime.executable import Executable, NonFiniteError, RuntimeFailure  # noqa: E402

OK_RUN_ERRORS = (ValueError, TypeError, RuntimeFailure, ZeroDivisionError, NonFiniteError,
                 IndexError)  # IndexError: a corrupted index constant, caught by the gather kernel
INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 63, 64, 65, 511, 512, 513, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 40,
               2 ** 40 - 1, 2 ** 50, 2 ** 62, 2 ** 63 - 1, -2 ** 63, -2, -(2 ** 31)]


def split(data):
    """(header dict, data area bytes) of a valid plan file."""
    _, _, _, hlen = PF.PREFIX.unpack_from(data, 0)
    header = json.loads(data[PF.PREFIX.size:PF.PREFIX.size + hlen])
    start = PF._align(PF.PREFIX.size + hlen)
    return header, bytearray(data[start:len(data) - PF.DIGEST_BYTES])


def join(header, area, raw_header=None):
    hb = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    out = bytearray(PF.PREFIX.pack(PF.MAGIC, PF.FORMAT_VERSION, 0, len(hb))) + hb
    out += b"\0" * (PF._align(len(out)) - len(out))
    out += area
    return resign(out + b"\0" * 32)


def resign(buf):
    buf = bytearray(buf)
    if len(buf) >= 32:
        buf[-32:] = hashlib.sha256(bytes(buf[:-32])).digest()
    return bytes(buf)


def leaves(x, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, path + (i,))


def set_path(root, path, value, delete=False):
    if not path:
        return value
    obj = root
    for p in path[:-1]:
        obj = obj[p]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return root


def int_value(draw, old):
    choices = INTERESTING + ([old + 1, old - 1, old * 2, old + 8, old - 8, old + 64, old * 1000, -old]
                             if isinstance(old, int) and not isinstance(old, bool) else [])
    return draw(st.one_of(st.sampled_from(choices), st.integers(-2 ** 63, 2 ** 63 - 1)))


def mutate(draw, base):
    kind = draw(st.sampled_from(["raw", "resign", "header", "header", "section", "section", "section"]))
    data = bytearray(base)
    if kind in ("raw", "resign"):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "extend", "prefix"]))
        if op == "flip":
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            i = draw(st.integers(0, len(data) - 1))
            data[i:i + 8] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=200))
        else:  # prefix: edit the fixed-size prefix fields
            fld = draw(st.sampled_from([(8, "<I"), (12, "<I"), (16, "<Q")]))
            struct.pack_into(fld[1], data, fld[0], draw(st.integers(0, 2 ** (8 * struct.calcsize(fld[1])) - 1)))
        return kind + "/" + op, resign(data) if kind == "resign" else bytes(data)
    header, area = split(bytes(base))
    if kind == "header":
        items = list(leaves(header))
        path, old = items[draw(st.integers(0, len(items) - 1))]
        op = draw(st.sampled_from(["int", "int", "int", "str", "type", "delete", "dup", "raw"]))
        if op == "raw":  # textual edit of the JSON itself
            hb = bytearray(json.dumps(header, separators=(",", ":")).encode())
            i = draw(st.integers(0, len(hb) - 1))
            hb[i:i + draw(st.integers(0, 4))] = draw(st.binary(min_size=0, max_size=4))
            return "header/raw", join(None, area, raw_header=bytes(hb))
        if op == "int":
            new = int_value(draw, old)
        elif op == "str":
            new = draw(st.sampled_from(["", "x", "loss", "float32", "int64", "float16", "run", "step", "y" * 5000,
                                        "w0", "b0", "\u00e9\u0000"]))
        elif op == "type":
            new = draw(st.sampled_from([None, True, False, 1.5, [], {}, [1], "1", [[]], -0.0]))
        elif op == "dup" and isinstance(old, list) and old:
            new = old + [old[draw(st.integers(0, len(old) - 1))]]
        elif op == "delete" and path:
            return f"header/delete {path}", join(set_path(header, path, None, delete=True), area)
        else:
            new = None
        return f"header/{op} {path}", join(set_path(header, path, new), area)
    # section mutations
    secs = header["sections"]
    i = draw(st.integers(0, len(secs) - 1))
    s = secs[i]
    dt = PF.SECTION_DTYPES[s["dtype"]]
    arr = np.frombuffer(bytes(area), dtype=dt, count=s["count"], offset=s["offset"]).copy()
    op = draw(st.sampled_from(["value", "value", "value", "value", "resize"]))
    if op == "resize" or arr.size == 0:
        new_count = draw(st.sampled_from([0, max(arr.size - 1, 0), arr.size + 1, arr.size // 2, arr.size + 64]))
        arr = np.resize(arr, new_count) if new_count else arr[:0]
    else:
        for _ in range(draw(st.integers(1, 3))):
            j = draw(st.integers(0, arr.size - 1))
            if s["dtype"] == "int64":
                arr[j] = (int_value(draw, int(arr[j])) + 2 ** 63) % 2 ** 64 - 2 ** 63  # wrap to int64
            elif s["dtype"] == "float64":
                arr[j] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e300, -1.0, 1e-300, 2.0 ** 63]))
            else:
                arr[j] = draw(st.integers(0, 255))
    # re-lay the data area with section i replaced
    parts = []
    for k, sk in enumerate(secs):
        a = arr if k == i else np.frombuffer(bytes(area), PF.SECTION_DTYPES[sk["dtype"]], sk["count"], sk["offset"])
        parts.append((sk["dtype"], a))
    del header["sections"]
    return f"section/{op} {i} ({s['dtype']})", PF.pack(PF.MAGIC, header, parts)


def feeds_for(plan, rng):
    feeds = {}
    for name, dt, shape in plan.graph_inputs:
        if name in plan.label_inputs:
            feeds[name] = rng.integers(0, plan.label_inputs[name], size=shape).astype(dt)
        elif np.dtype(dt).kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[name] = rng.integers(1, 5, size=shape).astype(dt)
    return feeds


def run_all(plan, check_finite=False):
    exe = Executable(plan, num_threads=2, check_finite=check_finite)
    out = {}
    feeds = feeds_for(plan, np.random.default_rng(0))
    for kind in ("run", "grad", "step"):
        if kind in plan.entries:
            try:
                r = getattr(exe, kind)(feeds)
            except OK_RUN_ERRORS as e:
                r = f"{type(e).__name__}"
            out[kind] = r
    return out


def same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and \
            np.array_equal(a, b, equal_nan=True)
    return a == b or (a != a and b != b)


def main():
    out_dir, n, sd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bases = [open(p, "rb").read() for p in sys.argv[4:]]
    expected = [run_all(PF.loads(b)) for b in bases]
    last = os.path.join(out_dir, "last_case.plan")
    stats = {"cases": 0, "plan_error": 0, "loaded": 0}

    @seed(sd)
    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.data())
    def case(data):
        k = data.draw(st.integers(0, len(bases) - 1))
        what, blob = mutate(data.draw, bases[k])
        with open(last, "wb") as f:
            f.write(blob)
        with open(last + ".txt", "w") as f:
            f.write(what)
        stats["cases"] += 1
        try:
            plan = PF.loads(blob)
        except lr.PlanError:
            stats["plan_error"] += 1
            assert blob != bases[k], "the unmodified plan was rejected"
            return
        stats["loaded"] += 1
        got = run_all(plan)
        if blob == bases[k]:
            assert same(got, expected[k]), f"{what}: unchanged plan gave different results"
        if any(e.checked is not None for e in plan.entries.values()) and \
                all(e.checked is not None for e in plan.entries.values()):
            run_all(plan, check_finite=True)

    case()
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
