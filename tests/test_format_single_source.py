"""The plan format is defined once (format.py); the C side is generated from it and checked against it.

Pinned here: the compiled module carries the very table format.py defines; a table that differs in any
entry (a moved VM opcode, a changed field layout, a limit) is refused at import with a message naming the
entry; the generated header's offsets agree with the Python decoder; instructions round-trip through
encode/decode by field name; a plan of a newer minor version is refused naming the versions it needs."""
import importlib.util
import re

import numpy as np
import pytest

import libml_compile as lc
import libml_runtime as lr
from libml_runtime import _exec, planfile
from libml_runtime import format as F
from libml_runtime import format_codegen


def test_the_compiled_module_was_built_from_this_format_table():
    assert _exec.format_table().split("\n") == F.table_lines()
    F.check_build(_exec.format_table())  # what the module ran at import


@pytest.mark.parametrize("edit,entry", [
    # the defect this design removes: two VM opcodes swapped in one copy still built and computed tanh
    # where a*b+c was asked; now any difference in a copy names the entry
    (lambda ls: [re.sub(r"^vm FMA 13", "vm FMA 14", x) for x in ls], "vm FMA"),
    (lambda ls: [x.replace("limit LM_MAXIO 32", "limit LM_MAXIO 16") for x in ls], "limit LM_MAXIO"),
    (lambda ls: [x.replace("M N K transA", "M K N transA") if x.startswith("opcode gemm") else x for x in ls],
     "opcode gemm"),
    (lambda ls: [x for x in ls if not x.startswith("vm DIVMASK")], "vm DIVMASK"),
    (lambda ls: ls + ["vm TANH 99 1 - tanh(x)"], "vm TANH"),
])
def test_a_build_from_a_different_table_is_refused_naming_the_entry(edit, entry):
    built = "\n".join(edit(F.table_lines()))
    with pytest.raises(F.FormatMismatch, match=re.escape(repr(entry))):
        F.check_build(built)


def test_generated_header_offsets_match_the_python_decoder():
    """Every constant field offset LM_F_<OP>_<field> in format_gen.h is the field's position in a decoded
    instruction (so C and Python read the same slot of every instruction)."""
    header, pxi = format_codegen.generate(F)
    consts = dict(re.findall(r"^#define (LM_F_\w+) (\d+)$", header, re.M))
    assert consts, "no constant offsets generated"
    checked = 0
    for name, L in F.LAYOUTS.items():
        # a synthetic instruction with distinct values in every field and every count = 1
        values, counts = {}, {}
        for f, count, sub in L.fields:
            if count is None:
                values[f] = 1 if any(c == f for _, c, _ in L.fields) or any(
                    c == f for _, _, s in L.fields for _, c, _ in (s or ())) else 7
        for f, count, sub in L.fields:
            if count is not None:
                n = count if isinstance(count, int) else values[count]
                values[f] = ([{g: ([5] * (c if isinstance(c, int) else values[c]) if c else 5) for g, c, _ in sub}] * n
                             if sub else [5] * n)
        code = F.encode(name, 0, values)
        _, pos = F.locate(code, 0)
        for f, count, sub in L.fields:
            key = f"LM_F_{name.upper()}_{f.replace('.', '_')}"
            if key in consts:
                assert int(consts[key]) == _first(pos[f]) - F.HEADER, (name, f)
                checked += 1
        assert f"enum: LM_OP_{name.upper()}" in pxi
    assert checked > 60


def _first(p):
    """The smallest code index in a ``locate`` result (an index, a list of them, or records)."""
    if isinstance(p, int):
        return p
    if isinstance(p, dict):
        return min(_first(v) for v in p.values())
    return _first(p[0])


def test_instructions_round_trip_by_field_name():
    g = lc.Graph("rt")
    x = g.input("x", (4, 8))
    w = g.param("w", np.ones((8, 3), np.float32))
    y = g.input("y", (4,), "int64")
    loss = lc.softmax_cross_entropy(lc.relu(x @ w) * 2.0, y)
    prog = lc.compile(g, loss, lc.Adam(1e-3))
    for e in prog.plan.entries.values():
        code = e.code.tolist()
        for pc, name, node, d in F.instructions(e.code):
            again = F.encode(name, node, d)
            assert again == code[pc:pc + code[pc + 1]]


def test_layout_errors_name_the_opcode_and_field():
    with pytest.raises(KeyError, match="gemm needs field 'K'"):
        F.encode("gemm", 0, {"dtype": 0, "M": 1, "N": 1})
    with pytest.raises(ValueError, match=r"copy_nd.dims has 1 entries, its count 'ndim' is 2"):
        F.encode("copy_nd", 0, {"itemsize": 4, "ndim": 2, "dims": [3], "src.slot": 0, "src.offset": 0,
                                "src.stride": [1, 1], "dst.slot": 0, "dst.offset": 0, "dst.stride": [1, 1]})


def test_a_plan_of_a_newer_minor_version_is_refused_naming_the_versions(tmp_path):
    g = lc.Graph("m")
    x = g.input("x", (3,))
    g.output("y", x * 2.0)
    prog = lc.compile(g)
    data = planfile.dumps(prog.plan)
    header, _ = planfile.unpack(data, planfile.MAGIC, "libml plan")
    assert header["minor"] == F.MINOR
    newer = dict(header, minor=F.MINOR + 1)
    path = tmp_path / "newer.plan"
    body = planfile.pack(planfile.MAGIC, {k: v for k, v in newer.items() if k != "sections"},
                         _sections(data, header))
    path.write_bytes(body)
    with pytest.raises(lr.PlanError, match=rf"needs plan format 2\.{F.MINOR + 1}.*reads up to 2\.{F.MINOR}"):
        lr.load(path)
    older = dict(header)
    del older["minor"]  # a file from before minor versions were counted: still loads (2.0)
    path.write_bytes(planfile.pack(planfile.MAGIC, {k: v for k, v in older.items() if k != "sections"},
                                   _sections(data, header)))
    assert lr.load(path).run({"x": np.ones(3, np.float32)})["y"].tolist() == [2.0, 2.0, 2.0]


def _sections(data, header):
    """The data sections of a packed plan, in header order, as pack() takes them."""
    _, area = planfile.unpack(data, planfile.MAGIC, "libml plan")
    return [(s["dtype"], np.frombuffer(area, dtype=s["dtype"], count=s["count"], offset=s["offset"]).copy())
            for s in header["sections"]]
