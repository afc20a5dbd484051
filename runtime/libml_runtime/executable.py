"""A plan bound to memory: the object users call (``run``/``grad``/``step``/``params``).

``Executable`` owns one arena (intermediates, sized by the planner) and one state buffer (params,
optimizer state, constant data).  Each call validates the feeds in Python (names, shapes, dtypes, label
ranges — cheap, O(#inputs)), then makes exactly one ``_exec.run_plan`` call with the GIL released.
Results are copied out, so arrays returned to the user are never overwritten by a later call.  A lock
serialises concurrent calls on one object (separate objects run in parallel).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from . import _exec
from . import format as F
from .format import DTYPE_CODE, ERR_INDEX, ERR_INT_DIV_ZERO, ERR_LABEL, ERR_NONFINITE, ERR_NOMEM, OP_NAMES, SLOT_INPUT0
from .plan import Plan
from .threads import pin_blas_single, resolve_threads


def _calls_blas(code):
    """Whether a plan's code reaches BLAS: any GEMM but a row vector times a non-transposed matrix
    (``_exec._blas`` runs those with its own kernel).  Only decides whether to pin BLAS's threads."""
    return any((op.startswith("gemm") and not (d["M"] == 1 and d["transB"] == 0)) or op in _CONV_OPS
               for _, op, _, d in F.instructions(code))


#: the convolution instructions (format 2.3) call BLAS on their im2col panels (their direct depthwise path
#: does not, but pinning costs nothing once done)
_CONV_OPS = ("conv", "conv_grad_input", "conv_grad_weight")


def _checked_value(what, v, dt, shape):
    """``v`` as a native array of dtype ``dt`` and ``shape``, or a ValueError/TypeError naming ``what``:
    strings, objects and complex numbers are refused, and so are finite values that overflow ``dt``."""
    try:
        a = np.asarray(v)
    except Exception as e:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"{what}: cannot convert {type(v).__name__} to an array ({e})") from None
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{what}: expected real numbers, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {a.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        c = a.astype(np.dtype(dt))
    if a.dtype.kind == "f" and np.dtype(dt).kind == "f":
        overflow = np.isfinite(a) & ~np.isfinite(c)
        if overflow.any():
            i = np.unravel_index(int(np.argmax(overflow.reshape(-1))), a.shape) if a.ndim else ()
            raise ValueError(f"{what}: value {a[i]!r} at index {tuple(int(k) for k in i)} overflows {dt}")
    return c


class RuntimeFailure(RuntimeError):
    """The runtime stopped a plan (e.g. integer division by zero)."""


class NonFiniteError(FloatingPointError):
    """Raised under ``check_finite=True``: names the first op that produced a NaN or Inf."""



def index_out_of_range(a, rng):
    """The first element of fed integers ``a`` outside its plan range (``Plan.index_inputs``), as
    ``(flat position, lo, hi, component)``, or None.  ``rng`` is one ``(lo, hi)`` for every element, or
    (format 2.3, GatherND's index tuples) one ``(lo, hi)`` per position along ``a``'s last axis; component
    is that position, None for the single range."""
    if isinstance(rng[0], (int, np.integer)):
        if a.min() >= rng[0] and a.max() < rng[1]:
            return None
        flat = a.reshape(-1)
        pos = int(np.flatnonzero((flat < rng[0]) | (flat >= rng[1]))[0])
        return pos, rng[0], rng[1], None
    lo = np.array([r[0] for r in rng], np.int64)
    hi = np.array([r[1] for r in rng], np.int64)
    rows = a.reshape(-1, len(rng))
    bad = np.flatnonzero(((rows < lo) | (rows >= hi)).reshape(-1))
    if not bad.size:
        return None
    pos = int(bad[0])
    comp = pos % len(rng)
    return pos, int(lo[comp]), int(hi[comp]), comp

#: the byte alignment of the arena and state buffers: the plan's offsets are multiples of format.ALIGN
#: (64), so a base aligned the same way puts every operand on a cache-line boundary.  NumPy's allocations
#: are only 16-aligned (seen: base = 32 mod 64), which split every 64-byte AVX-512 load over two cache lines
#: (W5 at batch 1 on a Xeon with AVX-512, the whole run_plan call: 21.6 us misaligned, 14.4 us aligned).
BUFFER_ALIGN = F.ALIGN


def aligned_zeros(nbytes):
    """A zeroed uint8 array of ``nbytes`` whose data starts on a BUFFER_ALIGN-byte boundary (calloc'ed
    pages: untouched bytes cost nothing)."""
    raw = np.zeros(int(nbytes) + BUFFER_ALIGN, np.uint8)
    start = (-raw.ctypes.data) % BUFFER_ALIGN
    return raw[start:start + int(nbytes)]


def aligned_copy(buf, adopt=False):
    """A BUFFER_ALIGN-aligned copy of ``buf`` (a uint8 array); with ``adopt``, ``buf`` itself where it is
    already aligned and C-contiguous."""
    if adopt and buf.flags.c_contiguous and buf.ctypes.data % BUFFER_ALIGN == 0:
        return buf
    out = aligned_zeros(buf.nbytes)
    out[...] = buf.reshape(-1)
    return out


class Executable:
    def __init__(self, plan: Plan, num_threads=None, check_finite=False, _adopt_state=False):
        self.plan = plan
        self.num_threads = resolve_threads(num_threads)
        self.check_finite = bool(check_finite)
        # the compiler hands over a freshly built state buffer (_adopt_state): copying 100 MB of W3
        # params twice was most of its compile time.  plan.state then tracks the live state (the compiler
        # allocates it aligned, so it is adopted as it is; a misaligned buffer is copied).
        self._state = aligned_copy(plan.state, adopt=_adopt_state)
        # the checked entries (unfused, check_finite=True) usually need a larger arena than the fused ones
        arena = max((x.arena_bytes for e in plan.entries.values() for x in (e, e.checked) if x is not None),
                    default=0)
        self._arena = aligned_zeros(max(arena, 8))
        self._lock = threading.RLock()  # re-entrant: profile() holds it across the calls it makes
        self._inputs = {name: (dt, tuple(shape)) for name, dt, shape in plan.graph_inputs}
        self._param_index = {p[0]: p for p in plan.params}
        self._bound = {}
        # per graph input: (dtype, shape, class count if it holds labels, dtype code) for _bind's fast path
        self._fast = {name: (np.dtype(dt), shape, plan.label_inputs.get(name), DTYPE_CODE[np.dtype(dt).name],
                             plan.index_inputs.get(name)) for name, (dt, shape) in self._inputs.items()}
        # a distributed plan (meta["distributed"], collectives in its code): bound to MPI once, checked to be
        # the same plan on every rank, and started from rank 0's state (mpi.py); None for other plans
        self._mpi = None
        from .mpi import _collective_reqs, plan_world_size
        if plan_world_size(plan) is not None:
            from .mpi import MPIBinding
            self._mpi = MPIBinding(plan)
            self._mpi.broadcast(self._state)
        elif _collective_reqs(plan):
            raise ValueError(f"plan {plan.name!r} has collective instructions but no meta['distributed'] world size")

    @property
    def world(self):
        """(rank, size) of a distributed plan's MPI job; (0, 1) for a single-process plan."""
        return (self._mpi.rank, self._mpi.size) if self._mpi is not None else (0, 1)

    # ---- public API ------------------------------------------------------------------------------
    @property
    def params(self):
        """name -> copy of the current value (taken under the lock: never half an update)."""
        with self._lock:
            return {name: self._view(1, off, dt, shape).copy() for name, off, dt, shape, _ in self.plan.params}

    @property
    def buffers(self):
        """name -> copy of the current value of every buffer (non-trainable model state: BatchNorm's running
        statistics), taken under the lock.  ``state_dict`` holds them too."""
        with self._lock:
            rec = {s[0]: s for s in self.plan.opt_state}
            return {n: self._view(1, rec[n][1], rec[n][2], rec[n][3]).copy() for n in self.plan.buffers}

    def set_params(self, values):
        """Overwrite params by name.  Every value is checked first (known name, the param's shape, a real
        number dtype, no overflow when cast to the param's dtype); on any error nothing is written."""
        if not isinstance(values, dict):
            raise TypeError(f"set_params: expected a dict name -> array, got {type(values).__name__}")
        staged = []
        for name, v in values.items():
            if name not in self._param_index:
                raise ValueError(f"unknown param {name!r}; params are {sorted(self._param_index)}")
            _, off, dt, shape, _ = self._param_index[name]
            staged.append((off, dt, shape, _checked_value(f"param {name!r}", v, dt, shape)))
        with self._lock:
            for off, dt, shape, v in staged:
                self._view(1, off, dt, shape)[...] = v

    def run(self, feeds):
        """Forward only: {output name: array} for every graph output."""
        return self._call("run", feeds)

    def grad(self, feeds):
        """{param name: d loss / d param} for the trainable params; no update."""
        return self._call("grad", feeds)

    def step(self, feeds):
        """Forward + backward + optimizer update in one runtime call; returns the loss as a float."""
        out = self._call("step", feeds)
        return float(out["loss"])

    def profile(self, kind, feeds, repeat=20, warmup=3):
        """Time every instruction of entry ``kind`` (``run``/``grad``/``step``) over ``repeat`` runs after
        ``warmup`` runs, on ``feeds``; returns a :class:`~libml_runtime.profile.Profile` (``print`` it).

        Params and optimizer state are restored afterwards, so profiling ``step`` trains nothing.
        """
        from .profile import Profile
        if int(repeat) < 1 or int(warmup) < 0:
            raise ValueError(f"profile: repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}")
        entry = self._entry(kind)
        n = len(entry.instr_nodes)
        times = np.zeros((int(warmup) + int(repeat), max(n, 1)))
        calls = np.zeros(int(warmup) + int(repeat))
        with self._lock:  # no other thread's call lands between the snapshot and its restore
            snapshot = self._state.copy()
            try:
                for r in range(times.shape[0]):
                    t0 = time.perf_counter()
                    self._call(kind, feeds, times[r])
                    calls[r] = time.perf_counter() - t0
            finally:
                self._state[...] = snapshot
        code = np.ascontiguousarray(entry.code, dtype=np.int64)
        ins = F.instructions(code)
        ops = [op for _, op, _, _ in ins]
        # which fused instructions run an ahead-of-time kernel (vm_aot.txt) instead of the VM
        kernels = [_exec.ew_aot(code, pc) if op == "fused_elementwise" else None for pc, op, _, _ in ins]
        nodes = [entry.nodes[i][1] if entry.nodes else "" for i in entry.instr_nodes]
        return Profile.from_times(kind, times[int(warmup):, :n], calls[int(warmup):], ops, nodes,
                                  self.num_threads, kernels)

    def state_dict(self):
        """Copies of every persistent array: params and optimizer state (checkpoint content), all taken
        under one hold of the lock, so they belong to the same step."""
        with self._lock:
            d = self.params
            for name, off, dt, shape in self.plan.opt_state:
                d[name] = self._view(1, off, dt, shape).copy()
        return d

    def load_state_dict(self, d):
        entries = {p[0]: p[1:4] for p in self.plan.params}
        entries.update({s[0]: s[1:4] for s in self.plan.opt_state})
        missing = set(entries) - set(d)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        staged = []
        for name, (off, dt, shape) in entries.items():
            v = np.asarray(d[name])
            # the exact dtype (any byte order) and shape: a state dict is not converted, only restored
            if v.shape != tuple(shape) or v.dtype.newbyteorder("=") != np.dtype(dt):
                raise ValueError(f"state {name!r}: expected {dt}{tuple(shape)}, got {v.dtype}{v.shape}")
            staged.append((off, dt, shape, v))
        with self._lock:
            for off, dt, shape, v in staged:
                self._view(1, off, dt, shape)[...] = v

    def save(self, path):
        """Write this program (plan, current params and optimizer state) to one self-contained plan file
        that ``libml_runtime.load`` reads back (see FORMAT.md).  The write is atomic."""
        from . import planfile
        with self._lock:
            state = self._state.copy()
        return planfile.save(self.plan, path, state=state)

    def save_checkpoint(self, path, loader=None, extra=None):
        """Atomically write params, optimizer state and (optionally) a data loader's position."""
        from . import checkpoint
        return checkpoint.save_checkpoint(self, path, loader=loader, extra=extra)

    def load_checkpoint(self, path, loader=None):
        """Restore a checkpoint written by ``save_checkpoint``; returns its ``extra`` dict."""
        from . import checkpoint
        return checkpoint.load_checkpoint(self, path, loader=loader)

    # ---- internals -------------------------------------------------------------------------------
    def _view(self, slot, off, dt, shape):
        buf = self._arena if slot == 0 else self._state
        n = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(buf, dtype=dt, count=n, offset=off).reshape(shape)

    def _entry(self, kind):
        e = self.plan.entries.get(kind)
        if e is None:
            raise RuntimeError(f"this program has no {kind!r} entry "
                               f"({'compile with a loss' if kind != 'step' else 'compile with a loss and an optimizer'})")
        if self.check_finite and e.checked is not None:
            return e.checked
        return e

    def _bind(self, entry, feeds):
        if type(feeds) is dict and feeds.keys() == self._inputs.keys():
            # fast path (every call of a training loop): exactly the graph's inputs, as C-contiguous
            # ndarrays of the right dtype and shape; anything else takes the checking path below
            for name, (dt, shape, ncls, code, rng) in self._fast.items():
                a = feeds[name]
                if type(a) is not np.ndarray or a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
                    break
                # class labels: the range check is one C loop; a bad label takes the path that names it
                if ncls is not None and _exec.first_bad_label(a, code, ncls) >= 0:
                    break
                if rng is not None and a.size and index_out_of_range(a, rng) is not None:
                    break
            else:
                return [feeds[name] for name, _, _ in entry.inputs]
        if not isinstance(feeds, dict):
            raise TypeError(f"feeds must be a dict name -> array, got {type(feeds).__name__}")
        for name in feeds:
            if name not in self._inputs:
                raise ValueError(f"unknown feed {name!r}; the inputs are {sorted(self._inputs)}")
        arrays = []
        for name, dt, shape in entry.inputs:
            if name not in feeds:
                raise ValueError(f"missing feed {name!r}: expected an array of shape {tuple(shape)} "
                                 f"and dtype {dt}")
            arrays.append(self._check_feed(name, dt, tuple(shape), feeds[name]))
        for name, arr in feeds.items():  # inputs this entry does not read are still checked
            if all(name != n for n, _, _ in entry.inputs):
                self._check_feed(name, *self._inputs[name], arr)
        return arrays

    def _check_feed(self, name, dt, shape, v):
        a = v if isinstance(v, np.ndarray) else np.asarray(v)
        if not a.dtype.isnative and a.dtype.newbyteorder("=") == np.dtype(dt):
            a = a.astype(np.dtype(dt))  # a big-endian float32 is a float32: convert, the kernels read raw bytes
        if a.dtype != np.dtype(dt):
            raise TypeError(f"feed {name!r}: expected dtype {dt}, got {a.dtype}")
        if a.shape != shape:
            acc = self.plan.meta.get("accumulate") if isinstance(self.plan.meta, dict) else None
            how = (f" (accumulate={acc.get('micro_batches')}: {acc.get('micro_batches')} micro-batches of "
                   f"{acc.get('micro_batch_rows')} rows along axis 0)" if isinstance(acc, dict) else "")
            raise ValueError(f"feed {name!r}: expected shape {shape}, got {a.shape}{how}")
        a = a if a.flags.c_contiguous else np.array(a, order="C")
        ncls = self.plan.label_inputs.get(name)
        if ncls is not None:
            bad = _exec.first_bad_label(a, DTYPE_CODE[a.dtype.name], ncls)
            if bad >= 0:
                raise ValueError(f"feed {name!r}: labels must be in [0, {ncls}), got {a.reshape(-1)[bad]} "
                                 f"at index {bad}")
        rng = self.plan.index_inputs.get(name)
        bad = index_out_of_range(a, rng) if rng is not None and a.size else None
        if bad is not None:
            pos, lo, hi, comp = bad
            at = tuple(int(i) for i in np.unravel_index(pos, a.shape))
            what = "indices" if comp is None else f"indices[..., {comp}] (component {comp} of each index tuple)"
            raise ValueError(f"feed {name!r}: {what} must be in [{lo}, {hi}) (negative ones count from the end of "
                             f"a {'table of' if comp is None else 'dim of'} {hi} rows), got {a.reshape(-1)[pos]} "
                             f"at {at}")
        return a

    def _call(self, kind, feeds, times=None):
        entry = self._entry(kind)
        arrays = self._bind(entry, feeds)
        bound = self._bound.get(id(entry))
        if bound is None:
            bound = self._bound[id(entry)] = self._bind_outputs(entry)
        views, fed_outputs, uses_blas = bound
        with self._lock:
            if self.check_finite:
                snapshot = self._state.copy()
            if uses_blas:
                pin_blas_single()  # the runtime splits GEMMs over its own OpenMP threads
            buffers = [self._arena, self._state] + arrays
            ctx = self._mpi.ctx if self._mpi is not None else None
            if ctx is not None and ctx.npending:
                raise RuntimeFailure("an earlier call of this distributed program stopped with allreduce requests "
                                     "in flight: the ranks are out of step and the job cannot continue")
            kw = {} if ctx is None else {"mpi": ctx}  # (the collectives' context, for distributed plans only)
            if times is None:
                rc, bad, detail = _exec.run_plan(entry.code, entry.consts, buffers, self.num_threads, **kw)
            else:  # profiling: per-instruction seconds are added into `times`
                rc, bad, detail = _exec.run_plan(entry.code, entry.consts, buffers, self.num_threads, times, **kw)
            if rc != 0:
                if self.check_finite:
                    self._state[...] = snapshot
                if ctx is not None and ctx.last_error == -1 and ctx.npending:
                    raise RuntimeFailure(
                        f"allreduce did not complete within {ctx.timeout:g} s (LIBML_MPI_TIMEOUT) on rank "
                        f"{self._mpi.rank} of {self._mpi.size}: another rank is not taking part in this step (it "
                        f"raised an exception it caught, or stopped stepping); the ranks are out of step and the "
                        f"job cannot continue")
                raise self._error(entry, rc, bad, detail, feeds)
            out = {name: v.copy() for name, v in views}
            for name, slot, off, dt, shape in fed_outputs:  # an output that is a fed input: copy the feed
                n = int(np.prod(shape, dtype=np.int64))
                out[name] = np.frombuffer(arrays[slot - SLOT_INPUT0], dt, count=n, offset=off).reshape(shape).copy()
            return out

    def _bind_outputs(self, entry):
        """(views of the arena/state outputs, outputs that are fed inputs, whether BLAS is called)."""
        views = [(name, self._view(slot, off, dt, shape))
                 for name, slot, off, dt, shape in entry.outputs if slot < SLOT_INPUT0]
        fed = [o for o in entry.outputs if o[1] >= SLOT_INPUT0]
        return views, fed, _calls_blas(entry.code)

    def _index_flat_error(self, entry, bad, detail, feeds, node):
        """The IndexError of a live GatherElements / GatherND index out of range (format 2.3 index_flat: the
        kernel stopped at element ``detail`` of its indices, which it does not modify): value and range."""
        _, _, _, d = F.instructions(entry.code)[bad]
        k, slot, off = d["k"], d["idx.slot"], d["idx.offset"] + 8 * detail
        if slot >= SLOT_INPUT0:
            buf = np.ascontiguousarray(feeds[entry.inputs[slot - SLOT_INPUT0][0]]).view(np.uint8).reshape(-1)
        else:
            buf = self._arena if slot == 0 else self._state
        value = int(np.frombuffer(buf, dtype=np.int64, count=1, offset=off)[0])
        n = d["dims"][detail % k]
        comp = f", component {detail % k} of index tuple {detail // k}" if k > 1 else ""
        return IndexError(f"index {value} at position {detail} of the indices{comp} of node {node!r} (op "
                          f"'index_flat') is out of range [{-n}, {n}); nothing was updated")

    def _error(self, entry, rc, bad, detail, feeds):
        op, node = entry.nodes[entry.instr_nodes[bad]] if 0 <= bad < len(entry.instr_nodes) else ("?", "?")
        if rc == ERR_LABEL:
            # the labels operand of the failing cross-entropy instruction names the feed
            _, _, _, d = F.instructions(entry.code)[bad]
            slot = d["labels.slot"]
            if slot >= SLOT_INPUT0:
                name = entry.inputs[slot - SLOT_INPUT0][0]
                C = d["C"]
                value = np.asarray(feeds[name]).reshape(-1)[detail]
                return ValueError(f"feed {name!r}: labels must be in [0, {C}), got {value} at row {detail}")
            return ValueError(f"label at row {detail} is out of range (op {op}, node {node!r})")
        if rc == ERR_NONFINITE:
            op, node = entry.nodes[detail] if 0 <= detail < len(entry.nodes) else (op, node)
            # only op results are checked, so a NaN fed in surfaces at its first reader: name the feed
            for name, dt, _ in entry.inputs:
                a = np.asarray(feeds[name]) if isinstance(feeds, dict) and name in feeds else None
                if a is not None and a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                    idx = np.unravel_index(int(np.argmin(np.isfinite(a).reshape(-1))), a.shape)
                    return NonFiniteError(f"non-finite value (NaN or Inf) in feed {name!r} at index "
                                          f"{tuple(int(i) for i in idx)} (value {a[idx]}), first read by op "
                                          f"{op!r} (node {node!r}); params were left as they were before the step")
            return NonFiniteError(f"non-finite value (NaN or Inf) first produced by op {op!r} (node {node!r}); "
                                  f"params were left as they were before the step")
        if rc == ERR_INDEX and op == "index_flat":
            return self._index_flat_error(entry, bad, detail, feeds, node)
        if rc == ERR_INDEX:
            return IndexError(f"index {detail} of op {op!r} (node {node!r}) is out of range for the axis it "
                              f"indexes; nothing was updated")
        if rc == ERR_INT_DIV_ZERO:
            return ZeroDivisionError(f"integer division by zero in op {op!r} (node {node!r})")
        if rc == ERR_NOMEM:
            return MemoryError(f"out of memory in op {op!r} (node {node!r})")
        return RuntimeFailure(f"runtime error {rc} in instruction {bad} (op {op!r}, node {node!r})")
