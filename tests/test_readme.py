"""README.md's code blocks run as written, and ``libml-compile demo`` leaves no files behind.

Every ```python block and every cheap ```bash block (``libml-compile info/finetune``, ``libml-run``,
``python -c``) of README.md runs, in README order, in one temporary directory that holds a copy of
``models/classifier.onnx`` (the bash blocks are written for the repository root), each in its own
subprocess with a timeout.  Blocks may use files written by earlier blocks.  The expensive bash blocks
(``pip install``, ``pytest``, the benchmark runner) are listed in ``SKIPPED`` by their exact text, so a new
block that is neither runnable nor listed fails the test instead of being ignored.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK_TIMEOUT_S = 180

# bash blocks that are documented but not run here: exact text -> why
SKIPPED = {
    'pip install ".[test]" && libml-compile demo\npytest': "installs the package and runs the whole suite",
}
# a bash block runs when every command line starts with one of these
CHEAP_COMMANDS = ("libml-compile info ", "libml-compile finetune ", "libml-run ", "python -c ")

_FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def readme_blocks(text):
    """``[(language, code, line number of the opening fence)]`` of every fenced block, in order."""
    return [(m.group(1), m.group(2).rstrip("\n"), text.count("\n", 0, m.start()) + 1)
            for m in _FENCE.finditer(text)]


def _commands(code):
    return [ln.strip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _is_cheap_bash(code):
    cmds = _commands(code)
    return bool(cmds) and all(c.startswith(CHEAP_COMMANDS) for c in cmds)


def _env():
    """The test's interpreter first on PATH, so ``python``, ``libml-compile`` and ``libml-run`` are this
    environment's even when it is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    return env


@pytest.fixture(scope="module")
def blocks():
    with open(README, encoding="utf-8") as f:
        return readme_blocks(f.read())


def test_readme_has_python_and_bash_blocks(blocks):
    langs = [b[0] for b in blocks]
    assert langs.count("python") >= 3 and langs.count("bash") >= 3, langs


def test_every_readme_block_has_a_language_and_no_placeholder(blocks):
    for lang, code, line in blocks:
        assert lang, f"README.md:{line}: code block without a language (```python, ```bash or ```text)"
        if lang in ("python", "bash"):
            bad = [ln for ln in code.splitlines() if ln.strip() in ("...", "…")]
            assert not bad, f"README.md:{line}: placeholder line {bad[0]!r} in a {lang} block"
            assert "model.onnx\"" not in code and "MODEL.onnx" not in code, \
                f"README.md:{line}: placeholder model name in a {lang} block"


def test_every_bash_block_is_run_or_listed_as_skipped(blocks):
    bash = [(code, line) for lang, code, line in blocks if lang == "bash"]
    for code, line in bash:
        assert _is_cheap_bash(code) or code in SKIPPED, \
            f"README.md:{line}: bash block is neither cheap enough to run nor listed in SKIPPED:\n{code}"
    listed = {code for code, _ in bash}
    stale = [c for c in SKIPPED if c not in listed]
    assert not stale, f"SKIPPED lists blocks that are no longer in README.md: {stale}"


def test_readme_code_blocks_run(blocks, tmp_path):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "models", "classifier.onnx"), work / "models" / "classifier.onnx")
    env = _env()
    ran = 0
    for i, (lang, code, line) in enumerate(blocks):
        if lang == "python":
            script = tmp_path / f"block_{i}_line_{line}.py"
            script.write_text(code + "\n", encoding="utf-8")
            cmd = [sys.executable, str(script)]
        elif lang == "bash" and _is_cheap_bash(code):
            cmd = ["bash", "-e", "-c", code]
        else:
            continue
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        assert r.returncode == 0, (f"README.md:{line}: {lang} block failed (exit {r.returncode})\n{code}\n"
                                   f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
        ran += 1
    assert ran >= 6, f"only {ran} README blocks ran"
    # what the blocks promise to write
    for name in ("mlp.plan", "trained.onnx", "classifier_trained.onnx", "scorer.plan", "probs.npy"):
        assert (work / name).is_file(), f"a README block should have written {name}"


# --------------------------------------------------------------------------------------------------
# libml-compile demo: no files left behind
# --------------------------------------------------------------------------------------------------

def _demo_cmd(*args):
    return [sys.executable, "-m", "libml_compile.cli", "demo", "--no-progress", *args]


def _tmpdir_entries_of_onnxruntime_import(tmp_path):
    """Files that importing onnxruntime itself leaves in TMPDIR (ORT writes ``.ses`` there), which are not
    libml's; empty without onnxruntime."""
    base = tmp_path / "ort_baseline_tmp"
    base.mkdir()
    env = _env()
    env["TMPDIR"] = str(base)
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, cwd=base, capture_output=True,
                   timeout=BLOCK_TIMEOUT_S)
    return set(os.listdir(base))


def _demo_in_fresh_dirs(tmp_path, *args):
    """Run the demo with an empty TMPDIR and working directory; returns (result, files left in cwd,
    entries left in TMPDIR beyond what importing onnxruntime leaves there by itself)."""
    allowed = _tmpdir_entries_of_onnxruntime_import(tmp_path)
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    env = _env()
    env["TMPDIR"] = str(tmp)
    r = subprocess.run(_demo_cmd(*args), cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=BLOCK_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, os.listdir(cwd), set(os.listdir(tmp)) - allowed


def test_demo_leaves_no_temp_folder_and_no_file_in_cwd(tmp_path):
    r, in_cwd, left = _demo_in_fresh_dirs(tmp_path)
    assert "demo passed" in r.stdout
    assert in_cwd == [], f"the demo wrote {in_cwd} into the working directory"
    assert not left, f"the demo left {sorted(left)} in TMPDIR"


def test_demo_out_writes_only_the_given_file(tmp_path):
    _, in_cwd, left = _demo_in_fresh_dirs(tmp_path, "--out", "trained.onnx")
    assert in_cwd == ["trained.onnx"]
    assert not left


def test_demo_says_it_trains_random_weights_and_reports_train_validation_test(tmp_path):
    from libml_compile.demo import run_demo
    lines = []
    res = run_demo(progress=False, log=lines.append)
    text = "\n".join(lines)
    assert res["ok"], text
    assert res["out"] is None                      # the temporary export is gone
    assert "randomly initialised" in text and "fine-tun" not in text
    assert "validation accuracy" in text and "test accuracy" in text
    assert all("val_acc" in h for h in res["history"])
    # validation rows come out of the training part of load_digits(); the test part is untouched
    from libml_compile.demo import load_digits, split_validation
    Xtrain, ytrain, Xte, _ = load_digits()
    Xtr, _, Xva, _ = split_validation(Xtrain, ytrain)
    assert len(Xtr) + len(Xva) == len(Xtrain) and len(Xva) == round(0.1 * len(Xtrain))
    assert f"{len(Xtr)} train / {len(Xva)} validation / {len(Xte)} test" in text


def test_load_check_finite_on_a_plan_compiled_without_it_raises_naming_the_plan(tmp_path):
    """README: ``libml_runtime.load(path, check_finite=True)`` refuses a plan without checked entries
    (it never runs the fused entries unchecked) and runs the checked ones of a plan compiled with them."""
    import numpy as np
    import libml_compile as lc
    import libml_runtime

    g = lc.Graph("unchecked_plan")
    x = g.input("x", (4, 3))
    w = g.param("w", np.ones((3, 2), np.float32))
    g.output("y", x @ w)
    lc.compile(g).save(str(tmp_path / "plain.plan"))
    with pytest.raises(ValueError, match="unchecked_plan.*no checked entries.*check_finite=True"):
        libml_runtime.load(str(tmp_path / "plain.plan"), check_finite=True)
    lc.compile(g, check_finite=True).save(str(tmp_path / "checked.plan"))
    exe = libml_runtime.load(str(tmp_path / "checked.plan"), check_finite=True)
    assert exe.check_finite
    bad = np.ones((4, 3), np.float32)
    bad[0, 0] = np.inf
    with pytest.raises(libml_runtime.NonFiniteError):
        exe.run({"x": bad})
    assert not libml_runtime.load(str(tmp_path / "checked.plan")).check_finite
