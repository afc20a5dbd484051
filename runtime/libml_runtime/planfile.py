"""Plan files: one self-contained, versioned, checksummed binary file per compiled program.

Layout (all integers little-endian; see FORMAT.md for the full specification)::

    offset  size  field
    0       8     magic  b"LIBMLPLN"
    8       4     uint32 format version (FORMAT_VERSION)
    12      4     uint32 flags (must be 0)
    16      8     uint64 header length H (bytes of UTF-8 JSON)
    24      H     header: a JSON object (the plan's fields, a section table)
    ...           zero padding to a multiple of 64, then the data area: raw array sections, each at a
                  64-byte aligned offset (relative to the start of the data area) listed in the header
    end-32  32    SHA-256 of every preceding byte of the file

Nothing in a plan file is ever executed: the header is parsed with ``json`` (never pickle), arrays are
copied out of the data area with ``np.frombuffer``, and every field is type-checked here and then proved
consistent and in bounds by ``plan.validate`` before the program can run.  Every violation raises
``PlanError`` naming the field.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import struct

import numpy as np

from . import format as F
from .fileio import atomic_write, read_regular  # noqa: F401  (atomic_write: re-exported)
from .plan import Entry, Plan, PlanError, validate

MAGIC = b"LIBMLPLN"
FORMAT_VERSION = 2  # 2: fused-kernel program steps have three operands (op dst a b c)
PREFIX = struct.Struct("<8sIIQ")          # magic, version, flags, header length
DIGEST_BYTES = 32                         # SHA-256
SECTION_ALIGN = 64
MAX_HEADER_BYTES = 1 << 28                # 256 MiB of JSON is far beyond any real plan
# longest tensor / node / param / op name accepted.  The compiler limits user-chosen names to 4,096
# characters (ir.MAX_NAME); names it derives from them (optimizer state f"{param}/exp_avg_sq", fused kernel
# ops "fused(add+mul+...)" of up to n_prog members) are longer, and must load too: what the writer
# accepts, the reader accepts
MAX_NAME = 1 << 16
MAX_META_DEPTH = 64                       # deepest nesting of lists/objects in ``meta`` (save and load)
MAX_ITEMS = 1 << 22                       # longest list accepted in the header (params, nodes, ...)
DEFAULT_MAX_ARENA_BYTES = 1 << 36         # load() refuses plans asking for a larger arena (64 GiB)
SECTION_DTYPES = {"uint8": np.dtype("<u1"), "int64": np.dtype("<i8"), "float64": np.dtype("<f8")}
ENTRY_KINDS = ("run", "grad", "step")


# ------------------------------------------------------------------------------------------------
# writing


def _index_range(r):
    """A Plan.index_inputs value as JSON: [lo, hi], or [[lo, hi], ...] per position of the last axis."""
    if isinstance(r[0], (int, np.integer)):
        return [int(r[0]), int(r[1])]
    return [[int(lo), int(hi)] for lo, hi in r]


def save(plan: Plan, path, state=None):
    """Write ``plan`` to ``path`` with ``fileio.atomic_write`` (unique temporary file in the same folder,
    fsync, rename; a symlink's target is replaced; devices, FIFOs and directories are refused).

    state: the state bytes to store instead of ``plan.state`` (an Executable passes its current params and
    optimizer state).  Returns the path.
    """
    data = dumps(plan, state=state)
    atomic_write(path, data)
    return path


def dumps(plan: Plan, state=None) -> bytes:
    """The plan file's bytes."""
    state = plan.state if state is None else state
    state = np.ascontiguousarray(state, dtype=np.uint8).reshape(-1)
    sections = []           # (dtype name, ndarray)

    def section(arr, dt):
        sections.append((dt, np.ascontiguousarray(arr, dtype=SECTION_DTYPES[dt])))
        return len(sections) - 1

    def entry(e: Entry):
        return {
            "code": section(e.code, "int64"),
            "consts": section(e.consts, "float64"),
            "arena_bytes": int(e.arena_bytes),
            "inputs": [[n, dt, _ints(s)] for n, dt, s in e.inputs],
            "outputs": [[n, int(sl), int(off), dt, _ints(s)] for n, sl, off, dt, s in e.outputs],
            "nodes": [[op, nm] for op, nm in e.nodes],
            "instr_nodes": section(np.asarray(e.instr_nodes, np.int64), "int64"),
            "checked": entry(e.checked) if e.checked is not None else None,
        }

    header = {
        "format": "libml-plan",
        "version": FORMAT_VERSION,
        "minor": F.MINOR,
        "name": plan.name,
        "meta": _jsonable(plan.meta, "meta"),
        "state": section(state, "uint8"),
        "params": [[n, int(off), dt, _ints(s), bool(tr)] for n, off, dt, s, tr in plan.params],
        "opt_state": [[n, int(off), dt, _ints(s)] for n, off, dt, s in plan.opt_state],
        "graph_inputs": [[n, dt, _ints(s)] for n, dt, s in plan.graph_inputs],
        "label_inputs": {n: int(c) for n, c in plan.label_inputs.items()},
        "index_inputs": {n: _index_range(r) for n, r in plan.index_inputs.items()},
        "entries": {k: entry(e) for k, e in plan.entries.items()},
    }
    if plan.buffers:  # (2.3; absent when there are none, so other plans' bytes are as before)
        header["buffers"] = list(plan.buffers)
    return pack(MAGIC, header, sections)


def pack(magic, header: dict, sections, version=FORMAT_VERSION) -> bytes:
    """The container shared by plan and checkpoint files: prefix, JSON header (plus a section table),
    64-byte aligned raw sections, SHA-256.  sections: [(dtype name, ndarray)]."""
    buf = io.BytesIO()
    pack_to(buf, magic, header, sections, version)
    return buf.getvalue()


def pack_to(f, magic, header: dict, sections, version=FORMAT_VERSION):
    """Stream the container into the binary file ``f`` (hashing as it goes; no copy of the whole file)."""
    table, pos = [], 0
    for dt, arr in sections:
        table.append({"dtype": dt, "offset": pos, "count": int(arr.size)})
        pos = _align(pos + arr.size * SECTION_DTYPES[dt].itemsize)
    header = dict(header, sections=table)
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    sha = hashlib.sha256()
    n = 0

    def put(b):
        nonlocal n
        sha.update(b)
        f.write(b)
        n += len(b)
    put(PREFIX.pack(magic, version, 0, len(hbytes)))
    put(hbytes)
    put(b"\0" * (_align(n) - n))
    data_start = n
    for (dt, arr), rec in zip(sections, table):
        put(b"\0" * (data_start + rec["offset"] - n))
        put(memoryview(np.ascontiguousarray(arr, dtype=SECTION_DTYPES[dt])).cast("B"))
    put(b"\0" * (_align(n) - n))
    f.write(sha.digest())


def _align(n):
    return (n + SECTION_ALIGN - 1) // SECTION_ALIGN * SECTION_ALIGN


def _ints(shape):
    return [int(d) for d in shape]


def _jsonable(x, where, depth=0):
    """``x`` as JSON values (non-finite floats and other objects become their repr).  Raises ValueError
    for nesting deeper than MAX_META_DEPTH, which the reader would refuse."""
    if isinstance(x, (dict, list, tuple)) and depth >= MAX_META_DEPTH:
        raise ValueError(f"plan {where} is nested more than {MAX_META_DEPTH} levels deep; "
                         f"plan files hold at most {MAX_META_DEPTH} levels")
    if isinstance(x, dict):
        return {str(k): _jsonable(v, where, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, where, depth + 1) for v in x]
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)) and np.isfinite(x):
        return float(x)
    return repr(x)


# ------------------------------------------------------------------------------------------------
# reading

def load_plan(path) -> Plan:
    """Read, verify and validate a plan file; returns a ``Plan`` (raises PlanError, or OSError on I/O)."""
    return loads(read_regular(path, "plan file"))


def loads(data: bytes) -> Plan:
    """Parse plan-file bytes into a validated ``Plan``."""
    header, area = unpack(data, MAGIC, "libml plan")
    return _from_header(header, area)


def unpack(data, magic, what, version=FORMAT_VERSION):
    """Verify a container (magic, version, flags, checksum, header length) -> (header object, data area).
    ``version`` is the one version of this kind of file the runtime reads."""
    data = memoryview(bytes(data))
    n = len(data)
    _need(n >= PREFIX.size + DIGEST_BYTES, "file", f"is {n} bytes, too short for a {what} file")
    got, got_version, flags, hlen = PREFIX.unpack_from(data, 0)
    _need(got == magic, "magic", f"expected {magic!r}, got {bytes(got)!r} (not a {what} file)")
    _need(got_version == version, "version",
          f"format version {got_version} is not supported (this runtime reads version {version})"
          + ("; the file was written by an older libml: compile and save the program again"
             if got_version < version else ""))
    _need(flags == 0, "flags", f"unknown flags {flags:#x}")
    digest = hashlib.sha256(data[:n - DIGEST_BYTES]).digest()
    _need(digest == bytes(data[n - DIGEST_BYTES:]), "checksum",
          "SHA-256 mismatch: the file is corrupt or truncated")
    body_end = n - DIGEST_BYTES
    _need(hlen <= MAX_HEADER_BYTES and PREFIX.size + hlen <= body_end, "header_length",
          f"{hlen} bytes does not fit in the file")
    try:
        header = json.loads(bytes(data[PREFIX.size:PREFIX.size + hlen]).decode("utf-8"),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PlanError(f"invalid plan field header: not valid UTF-8 JSON ({type(e).__name__}: {e})"[:300]) from None
    data_start = _align(PREFIX.size + hlen)
    _need(data_start <= body_end, "header_length", "leaves no room for the data area")
    _need(isinstance(header, dict), "header", "must be a JSON object")
    return header, data[data_start:body_end]


class Sections:
    """The section table of a container: each section may be taken once, as the dtype expected."""

    def __init__(self, table, area):
        self.area = area
        self.arrays = []
        self.used = set()
        end = 0
        for i, s in enumerate(_list(table, "sections")):
            where = f"sections[{i}]"
            _need(isinstance(s, dict), where, "must be an object")
            _keys(s, where, {"dtype", "offset", "count"})
            _need(isinstance(s["dtype"], str) and s["dtype"] in SECTION_DTYPES, f"{where}.dtype", f"unknown section dtype {s['dtype']!r}"[:200])
            dt = SECTION_DTYPES[s["dtype"]]
            off = _int(s["offset"], f"{where}.offset", 0, len(area))
            cnt = _int(s["count"], f"{where}.count", 0, len(area))
            _need(off % SECTION_ALIGN == 0, f"{where}.offset", f"{off} is not a multiple of {SECTION_ALIGN}")
            _need(off >= end, f"{where}.offset", "overlaps the previous section")
            _need(off + cnt * dt.itemsize <= len(area), f"{where}.count",
                  f"{cnt} x {dt.itemsize} bytes at offset {off} runs past the data area ({len(area)} bytes)")
            end = off + cnt * dt.itemsize
            self.arrays.append((s["dtype"], off, cnt))

    def take(self, idx, where, dtype):
        _need(type(idx) is int and 0 <= idx < len(self.arrays), where,
              f"section index {idx!r} is not a section"[:200])
        _need(idx not in self.used, where, f"section {idx} is used twice")
        self.used.add(idx)
        dname, off, cnt = self.arrays[idx]
        _need(dname == dtype, where, f"section {idx} holds {dname}, expected {dtype}")
        a = np.frombuffer(self.area, dtype=SECTION_DTYPES[dtype], count=cnt, offset=off)
        return a.astype(np.dtype(dtype), copy=True)   # native byte order, owned, aligned, writable

    def check_all_used(self):
        _need(len(self.used) == len(self.arrays), "sections",
              f"{len(self.arrays) - len(self.used)} section(s) are not referenced")


def _depth(x) -> int:
    """Nesting depth of a JSON value (iterative: a deep value cannot exhaust the Python stack)."""
    best, todo = 0, [(x, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            best = max(best, d + 1)
            todo.extend((c, d + 1) for c in v)
    return best


def _reject_constant(c):
    raise ValueError(f"non-finite number {c} in the header")


def _from_header(h, area):
    # "minor" is absent in files written before minor versions were counted (format 2.0)
    _keys(h, "header", {"format", "version", "name", "meta", "state", "params", "opt_state", "graph_inputs",
                        "label_inputs", "entries", "sections"} | ({"minor"} if "minor" in h else set())
          | ({"index_inputs"} if "index_inputs" in h else set()) | ({"buffers"} if "buffers" in h else set()))
    _need(h["format"] == "libml-plan", "format", f"expected 'libml-plan', got {h['format']!r}"[:200])
    _need(h["version"] == FORMAT_VERSION and type(h["version"]) is int, "version", "does not match the prefix")
    minor = h.get("minor", 0)
    _need(type(minor) is int and minor >= 0, "minor", f"must be a non-negative integer, got {minor!r}"[:200])
    _need(minor <= F.MINOR, "minor",
          f"the plan needs plan format {FORMAT_VERSION}.{minor}; this libml_runtime reads up to "
          f"{FORMAT_VERSION}.{F.MINOR}: upgrade libml_runtime to load it")
    name = _str(h["name"], "name", allow_empty=True)
    meta = h["meta"]
    _need(isinstance(meta, dict), "meta", "must be an object")
    _need(_depth(meta) <= MAX_META_DEPTH, "meta", f"is nested more than {MAX_META_DEPTH} levels deep")

    secs = Sections(h["sections"], area)
    sec = secs.take
    state = sec(h["state"], "state", "uint8")
    params = []
    for i, rec in enumerate(_list(h["params"], "params")):
        w = f"params[{i}]"
        _need(isinstance(rec, list) and len(rec) == 5, w, "must be [name, offset, dtype, shape, trainable]")
        _need(type(rec[4]) is bool, f"{w}.trainable", "must be true or false")
        params.append((_str(rec[0], f"{w}.name"), _int(rec[1], f"{w}.offset"), _dtype(rec[2], f"{w}.dtype"),
                       _shape(rec[3], f"{w}.shape"), rec[4]))
    opt_state = []
    for i, rec in enumerate(_list(h["opt_state"], "opt_state")):
        w = f"opt_state[{i}]"
        _need(isinstance(rec, list) and len(rec) == 4, w, "must be [name, offset, dtype, shape]")
        opt_state.append((_str(rec[0], f"{w}.name"), _int(rec[1], f"{w}.offset"), _dtype(rec[2], f"{w}.dtype"),
                          _shape(rec[3], f"{w}.shape")))
    _unique([p[0] for p in params] + [s[0] for s in opt_state], "params/opt_state", "name")
    # 2.3: the opt_state arrays that are buffers (BatchNorm's running statistics); plan.validate checks them
    buffers = [_str(b, f"buffers[{i}]") for i, b in enumerate(_list(h.get("buffers", []), "buffers"))]
    graph_inputs = [_signature(rec, f"graph_inputs[{i}]") for i, rec in enumerate(_list(h["graph_inputs"], "graph_inputs"))]
    _unique([g[0] for g in graph_inputs], "graph_inputs", "name")
    labels = h["label_inputs"]
    _need(isinstance(labels, dict) and len(labels) <= MAX_ITEMS, "label_inputs", "must be an object")
    label_inputs = {k: _int(v, f"label_inputs[{k!r}]", 1) for k, v in labels.items()}
    # 2.2: ranges of fed indices (absent from older files)
    idx = h.get("index_inputs", {})
    _need(isinstance(idx, dict) and len(idx) <= MAX_ITEMS, "index_inputs", "must be an object")
    index_inputs = {}
    for k, v in idx.items():
        # [lo, hi], or (2.3) [[lo, hi], ...]: one range per position along the input's last axis
        per = isinstance(v, list) and 0 < len(v) <= MAX_ITEMS and all(isinstance(r, list) for r in v)
        parts = []
        for j, r in enumerate(v if per else [v]):
            w = f"index_inputs[{k!r}]"[:200] + (f"[{j}]" if per else "")
            _need(isinstance(r, list) and len(r) == 2, w, "must be [lo, hi]")
            parts.append((_int(r[0], f"{w}[0]", -2 ** 62, 2 ** 62), _int(r[1], f"{w}[1]", -2 ** 62, 2 ** 62)))
        index_inputs[k] = tuple(parts) if per else parts[0]

    def entry(e, where, depth=0):
        _need(isinstance(e, dict), where, "must be an object")
        _keys(e, where, {"code", "consts", "arena_bytes", "inputs", "outputs", "nodes", "instr_nodes", "checked"})
        ins = [_signature(r, f"{where}.inputs[{i}]") for i, r in enumerate(_list(e["inputs"], f"{where}.inputs"))]
        outs = []
        for i, r in enumerate(_list(e["outputs"], f"{where}.outputs")):
            w = f"{where}.outputs[{i}]"
            _need(isinstance(r, list) and len(r) == 5, w, "must be [name, slot, offset, dtype, shape]")
            outs.append((_str(r[0], f"{w}.name"), _int(r[1], f"{w}.slot"), _int(r[2], f"{w}.offset"),
                         _dtype(r[3], f"{w}.dtype"), _shape(r[4], f"{w}.shape")))
        _unique([o[0] for o in outs], f"{where}.outputs", "name")
        nodes = []
        for i, r in enumerate(_list(e["nodes"], f"{where}.nodes")):
            w = f"{where}.nodes[{i}]"
            _need(isinstance(r, list) and len(r) == 2, w, "must be [op, name]")
            nodes.append((_str(r[0], f"{w}.op"), _str(r[1], f"{w}.name", allow_empty=True)))
        checked = None
        if e["checked"] is not None:
            _need(depth == 0, f"{where}.checked", "a checked entry cannot have its own checked entry")
            checked = entry(e["checked"], f"{where}.checked", depth + 1)
        return Entry(code=sec(e["code"], f"{where}.code", "int64"),
                     consts=sec(e["consts"], f"{where}.consts", "float64"),
                     arena_bytes=_int(e["arena_bytes"], f"{where}.arena_bytes", 0, 2 ** 40),
                     inputs=ins, outputs=outs, nodes=nodes,
                     instr_nodes=[int(x) for x in sec(e["instr_nodes"], f"{where}.instr_nodes", "int64")],
                     checked=checked)

    ent = h["entries"]
    _need(isinstance(ent, dict), "entries", "must be an object")
    entries = {}
    for kind, e in ent.items():
        _need(kind in ENTRY_KINDS, "entries", f"unknown entry {kind!r}"[:200])
        entries[kind] = entry(e, f"entries[{kind!r}]")
    secs.check_all_used()
    plan = Plan(name=name, state=state, params=params, opt_state=opt_state, graph_inputs=graph_inputs,
                label_inputs=label_inputs, entries=entries, meta=meta, index_inputs=index_inputs, buffers=buffers)
    validate(plan)
    return plan


# ---- field checks --------------------------------------------------------------------------------

def _need(cond, fld, msg):
    if not cond:
        raise PlanError(f"invalid plan field {fld}: {msg}")


def _keys(d, where, keys):
    missing = keys - set(d)
    extra = set(d) - keys
    _need(not missing, where, f"missing keys {sorted(missing)}")
    _need(not extra, where, f"unknown keys {sorted(extra)[:5]}"[:200])


def _list(x, where):
    _need(isinstance(x, list) and len(x) <= MAX_ITEMS, where, "must be a list")
    return x


def _int(x, where, lo=0, hi=2 ** 50):
    _need(type(x) is int and lo <= x <= hi, where, f"{x!r} is not an integer in [{lo}, {hi}]"[:200])
    return x


def _str(x, where, allow_empty=False):
    _need(isinstance(x, str) and (allow_empty or x) and len(x) <= MAX_NAME, where,
          f"must be a {'' if allow_empty else 'non-empty '}string of at most {MAX_NAME} characters")
    return x


def _dtype(x, where):
    _need(isinstance(x, str) and x in F.DTYPES, where, f"unknown dtype {x!r}"[:200])
    return x


def _shape(x, where):
    _need(isinstance(x, list) and len(x) <= 32, where, "must be a list of at most 32 dims")
    shape = tuple(_int(d, f"{where}[{i}]", 0, 2 ** 40) for i, d in enumerate(x))
    # the product in Python ints: NumPy's int64 product of 32 dims up to 2**40 wraps (to 0, say)
    _need(math.prod(shape) <= 2 ** 40, where, f"{list(shape)} has more than 2**40 elements")
    return shape


def _signature(rec, where):
    _need(isinstance(rec, list) and len(rec) == 3, where, "must be [name, dtype, shape]")
    return (_str(rec[0], f"{where}.name"), _dtype(rec[1], f"{where}.dtype"), _shape(rec[2], f"{where}.shape"))


def _unique(names, where, what):
    seen = set()
    for nm in names:
        _need(nm not in seen, where, f"duplicate {what} {nm!r}"[:200])
        seen.add(nm)


def load(path, num_threads=None, check_finite=False, max_arena_bytes=DEFAULT_MAX_ARENA_BYTES):
    """Load a plan file into a runnable ``Executable`` (same ``run``/``grad``/``step``/``params`` as the
    compiled program).  Imports nothing but the runtime.

    num_threads: OpenMP and BLAS threads (default: OMP_NUM_THREADS or the machine's cores).
    check_finite: run the checked entries (the plan must have been compiled with ``check_finite=True``).
    max_arena_bytes: refuse plans whose scratch arena is larger than this (PlanError).
    """
    from .executable import Executable

    plan = load_plan(path)
    for kind, e in plan.entries.items():
        for where, x in ((f"entries[{kind!r}]", e), (f"entries[{kind!r}].checked", e.checked)):
            if x is not None:
                _need(x.arena_bytes <= max_arena_bytes, f"{where}.arena_bytes",
                      f"{x.arena_bytes} bytes exceeds max_arena_bytes={max_arena_bytes}")
    if check_finite and any(e.checked is None for e in plan.entries.values()):
        raise ValueError(f"plan {plan.name!r} has no checked entries: compile it with check_finite=True "
                         f"to load it with check_finite=True")
    try:
        return Executable(plan, num_threads=num_threads, check_finite=check_finite)
    except MemoryError:
        raise PlanError(f"invalid plan field entries.arena_bytes: cannot allocate the arena "
                        f"({max(e.arena_bytes for e in plan.entries.values())} bytes)") from None
