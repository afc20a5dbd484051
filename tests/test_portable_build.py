"""The default build is portable: baseline x86-64 code outside the per-ISA kernel copies, and a dispatcher
that picks (or is forced by LIBML_ISA to) one copy at import (kernels_isa.h, setup.py)."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from libml_runtime import _exec
from libml_runtime.isa import ISAS, dispatched_isa

X86 = platform.machine().lower() in ("x86_64", "amd64")
NATIVE_BUILD = dispatched_isa() == "native"
needs_dispatch = pytest.mark.skipif(not X86 or NATIVE_BUILD, reason="a dispatching (default) x86-64 build")

# a function of a per-ISA copy: its name ends in the ISA suffix (see LM_SFX in kernels_isa.h)
CLONE = re.compile(r"_(avx2|avx512)$")
# beyond baseline x86-64: AVX registers and masks, or a VEX/EVEX mnemonic (every one starts with 'v';
# verr/verw are the only baseline 'v' instructions)
BEYOND_BASELINE = re.compile(r"%[yz]mm\d|%k[1-7]\b|^v(?!err|erw)[a-z0-9]+\b")


def _functions_beyond_baseline(so_path):
    """{function: first offending instruction} for functions outside the ISA copies (objdump -d)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so_path], capture_output=True, text=True,
                         check=True).stdout
    bad, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if fn is None or len(parts) < 2 or CLONE.search(fn.split("@")[0].split(".")[0]):
            continue
        insn = parts[-1].strip()
        if BEYOND_BASELINE.search(insn) and fn not in bad:
            bad[fn] = insn
    return bad


@needs_dispatch
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_default_build_has_no_avx_outside_the_dispatched_kernel_copies():
    bad = _functions_beyond_baseline(_exec.__file__)
    assert not bad, f"non-baseline instructions outside the ISA copies: {dict(list(bad.items())[:10])}"
    # and the copies exist: the dispatch is not empty
    syms = subprocess.run(["nm", _exec.__file__], capture_output=True, text=True).stdout
    for isa in ("avx2", "avx512"):
        assert f"lm_ew_span_f32_{isa}" in syms


def _run_child(code, isa):
    env = dict(os.environ)
    if isa is None:
        env.pop("LIBML_ISA", None)
    else:
        env["LIBML_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("flags"):
                    return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _supported_isas():
    flags = _cpu_flags()
    out = ["baseline"]
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"} <= flags:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
            out.append("avx512")
    return out


# three training steps of a small MLP: matmul + bias + relu + sigmoid + softmax cross-entropy (exp/log),
# relu masks, SGD with momentum -- the dispatched EW, xent, mask, epilogue and sgd kernels all run
TRAIN = """
import json, numpy as np, libml_compile as lc
from libml_runtime.isa import dispatched_isa
rng = np.random.default_rng(0)
g = lc.Graph("t")
x = g.input("x", (64, 40), dtype="float32"); y = g.input("y", (64,), dtype="int64")
w1 = g.param("w1", (rng.standard_normal((40, 300)) * 0.1).astype(np.float32))
b1 = g.param("b1", np.zeros(300, np.float32))
w2 = g.param("w2", (rng.standard_normal((300, 10)) * 0.1).astype(np.float32))
h = lc.relu(x @ w1 + b1)
loss = lc.softmax_cross_entropy(lc.sigmoid(h) * h @ w2, y)
g.output("loss", loss)
prog = lc.compile(g, loss=loss, optimizer=lc.SGD(lr=0.1, momentum=0.9))
feeds = dict(x=rng.standard_normal((64, 40)).astype(np.float32), y=rng.integers(0, 10, 64).astype(np.int64))
losses = []
for _ in range(3):
    out = prog.step(feeds)
    losses.append(float(np.asarray(out["loss"] if isinstance(out, dict) else out)))
print(json.dumps(dict(isa=dispatched_isa(), losses=losses, w1=prog.params["w1"].astype(float).ravel().tolist())))
"""


# the tiled convolution microkernels (kernels_conv.h) of every copy, float32 and float64: a stride-1 and
# a stride-2 3x3 conv (forward, both gradients; the stride-2 input gradient runs per output phase), then
# the same with the channel-vector forward (algo 2) forced: each copy has its own vector width and pixel
# group, and the 7 output channels leave half a vector of padded channels
CONV = """
import json, numpy as np, libml_compile as lc
from libml_compile import ops_conv
from libml_runtime.isa import dispatched_isa
rng = np.random.default_rng(0)
res = {"isa": dispatched_isa()}
for dt in ("float32", "float64", "float32_ocv", "float64_ocv"):
    ops_conv.OCV_FORCE = True if dt.endswith("_ocv") else None
    g = lc.Graph("c")
    x = g.param("x", rng.standard_normal((2, 5, 13, 11)).astype(dt[:7]))
    w1 = g.param("w1", rng.standard_normal((6, 5, 3, 3)).astype(dt[:7]))
    w2 = g.param("w2", rng.standard_normal((7, 6, 3, 3)).astype(dt[:7]))
    y = lc.conv(lc.relu(lc.conv(x, w1, pads=1)), w2, pads=1, strides=2)
    loss = lc.sum(y * y)
    g.output("y", y)
    prog = lc.compile(g, loss=loss)
    gr = prog.grad({})
    res[dt] = [prog.run({})["y"].ravel().tolist()] + [gr[k].ravel().tolist() for k in ("x", "w1", "w2")]
print(json.dumps(res))
"""


@needs_dispatch
def test_each_forced_isa_runs_the_tiled_convolutions_alike():
    res = {}
    for isa in _supported_isas():
        p = _run_child(CONV, isa)
        assert p.returncode == 0, p.stderr[-2000:]
        res[isa] = json.loads(p.stdout.strip().splitlines()[-1])
        assert res[isa]["isa"] == isa
    ref = res["baseline"]
    for isa, r in res.items():
        for dt, tol in (("float32", 1e-4), ("float64", 1e-12), ("float32_ocv", 1e-4), ("float64_ocv", 1e-12)):
            for a, b, what in zip(r[dt], ref[dt], ("y", "dx", "dw1", "dw2")):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10, err_msg=f"{isa} {dt} {what}")


@needs_dispatch
def test_each_forced_isa_runs_its_copy_and_trains_alike():
    """LIBML_ISA selects the copy; every copy gives the same losses and weights up to FMA contraction."""
    res = {}
    for isa in _supported_isas():
        p = _run_child(TRAIN, isa)
        assert p.returncode == 0, p.stderr[-2000:]
        res[isa] = json.loads(p.stdout.strip().splitlines()[-1])
        assert res[isa]["isa"] == isa
    ref = res["baseline"]
    assert ref["losses"][-1] < ref["losses"][0]
    for isa, r in res.items():
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, err_msg=isa)
        np.testing.assert_allclose(r["w1"], ref["w1"], rtol=1e-4, atol=1e-6, err_msg=isa)


@needs_dispatch
def test_auto_picks_the_best_isa_the_cpu_has():
    p = _run_child("from libml_runtime.isa import dispatched_isa; print(dispatched_isa())", None)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == _supported_isas()[-1]


@pytest.mark.parametrize("value", ["avx1024", "AVX2 ", "native-ish"])
def test_unknown_libml_isa_raises_naming_the_value(value):
    p = _run_child("import libml_runtime.isa, libml_runtime._exec", value)
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "LIBML_ISA" in p.stderr and repr(value) in p.stderr


@needs_dispatch
@pytest.mark.skipif("avx512" in _supported_isas(), reason="needs a CPU without AVX-512")
def test_forcing_an_isa_the_cpu_lacks_raises():
    p = _run_child("import libml_runtime._exec", "avx512")
    assert p.returncode != 0 and "does not support" in p.stderr


def test_profile_names_the_dispatched_isa():
    import libml_compile as lc
    g = lc.Graph("p")
    x = g.input("x", (4, 3), dtype="float32")
    g.output("y", lc.relu(x) * 2.0)
    prog = lc.compile(g)
    text = str(prog.profile("run", {"x": np.ones((4, 3), np.float32)}, repeat=2))
    assert f"kernel ISA: {dispatched_isa()}" in text.splitlines()[1]
    assert dispatched_isa() in ISAS + ("native",)


@needs_dispatch
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_each_isa_copy_calls_its_libmvec_vector_exp():
    """omp declare simd still vectorises exp inside the target regions: baseline calls the SSE variant
    (_ZGVb), the AVX2 copy the 256-bit one (_ZGVd; it prefers 256-bit vectors), the AVX-512 copy the
    512-bit one (_ZGVe: its libmvec-calling steps loop with simdlen 16 / 8, kernels_tmpl.h LM_UNARY_MV)."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _exec.__file__], capture_output=True,
                         text=True, check=True).stdout
    calls, fn = {}, None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            fn = m.group(1)
        elif fn and "call" in line and "_ZGV" in line:
            calls.setdefault(fn, set()).add(re.search(r"<(_ZGV\w+)", line).group(1))
    # the VM's step loops: whole blocks (with the fused column-sum copies) and a row's last partial block
    for kernel in ("lm_ew_exec_full", "lm_ew_exec_n"):
        assert "_ZGVbN4v_expf" in calls[f"{kernel}_f32"], kernel
        assert "_ZGVdN8v_expf" in calls[f"{kernel}_f32_avx2"], kernel
        assert "_ZGVdN4v_exp" in calls[f"{kernel}_f64_avx2"], kernel
        assert "_ZGVeN16v_expf" in calls[f"{kernel}_f32_avx512"], kernel
        assert "_ZGVeN8v_exp" in calls[f"{kernel}_f64_avx512"], kernel
