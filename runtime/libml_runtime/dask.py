"""Batch inference over a Dask cluster: ``map_plan(plan_path, x) -> dask.array.Array`` (``pip install ".[dask]"``).

```python
import dask.array as da
from dask.distributed import Client, LocalCluster
from libml_runtime.dask import map_plan

client = Client(LocalCluster(n_workers=2, threads_per_worker=1))    # or Client("tcp://scheduler:8786")
x = da.from_array(features, chunks=(10_000, -1))                     # rows chunked, features in one chunk
logits = map_plan("mlp.plan", x, output="logits")                    # lazy: one row per input row, in order
pred = logits.compute()                                              # or .to_zarr(...), da.store(...)
```

* ``x`` is a dask array chunked along axis 0 only (every other axis one chunk; anything else is refused
  naming the chunks), or for a plan with several inputs a dict ``{input name: dask array}`` with the same
  row chunks.  Its per-row shape and dtype must be the plan's (``cast=True`` allows same-kind casts).
* Everything is checked before anything is scheduled: the plan file exists and is a valid plan, the output
  exists, the inputs match; errors are ``ValueError``s naming the plan file, the input and the shapes.
* Each worker process loads the plan **once** and keeps it (keyed by the absolute path and the file's
  SHA-256, re-checked against the file's mtime/size on every chunk: a changed plan file is reloaded; a
  file whose contents differ from the one ``map_plan`` validated is an error, not a silent mix).  The
  path must be readable by the workers (a shared file system for a remote cluster).
* Every chunk runs in the plan's static batch (``libml_runtime.cli.run_batches``, shared with
  ``libml-run``): the last partial batch is padded by repeating its last row and the padded outputs are
  dropped, so the result is byte-identical to ``libml-run`` on the same data.
* Threads: on a ``distributed`` worker the runtime runs with as many OpenMP threads as the worker has
  task threads (``nthreads``, 1 by default on ``--dask local``); tasks on one worker share one loaded plan
  and take turns on it, so a worker never runs more than ``nthreads`` runtime threads and workers ×
  threads never oversubscribes the cores.  ``num_threads=`` overrides; outside a distributed worker
  (dask's threaded scheduler) the default is the runtime's (``OMP_NUM_THREADS`` or the cores).
* ``from_npy(path, chunks)`` opens a ``.npy`` (or a stored ``.npz`` member) as a dask array read by the
  workers straight from the file (one positioned read a chunk): only the path travels in the graph, so inputs larger than any
  worker's memory stream.  (``da.from_array(np.load(path, mmap_mode="r"))`` pickles the whole array into
  the graph when sent to a distributed scheduler.)
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter

import numpy as np

try:
    import dask.array as da
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"libml_runtime.dask needs dask: pip install 'libml[dask]' ({e})") from None

from .cli import UsageError, check_inputs, plan_io, run_batches

__all__ = ["map_plan", "from_npy", "load_count"]

_LOCK = threading.Lock()
_CACHE = {}          # abspath -> (sha256, (mtime_ns, size, ino), num_threads, Executable); per worker process
_LOADS = Counter()   # abspath -> plan loads in this process (tests read it with client.run(load_count))


def load_count():
    """{absolute plan path: times this process loaded it}; ``client.run(load_count)`` asks every worker."""
    return dict(_LOADS)


def _fingerprint(path):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _worker_threads(num_threads):
    if num_threads is not None:
        return num_threads
    try:
        from distributed import get_worker
        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return None  # not on a distributed worker: the runtime's default


def _cached_plan(path, sha, num_threads):
    """The worker's Executable for plan ``path`` with contents ``sha`` (loaded at most once per version)."""
    from . import planfile
    n = _worker_threads(num_threads)
    with _LOCK:
        hit = _CACHE.get(path)
        if hit is not None and hit[0] == sha and hit[2] == n and hit[1] == _fingerprint(path):
            return hit[3]
        before = _fingerprint(path)
        got = _sha256(path)
        if got != sha:
            raise ValueError(f"plan file {path!r} on this worker has SHA-256 {got[:16]}..., not the "
                             f"{sha[:16]}... that map_plan validated: it changed since (call map_plan again) "
                             f"or this worker sees another file at that path")
        exe = planfile.load(path, num_threads=n)
        if _fingerprint(path) != before:
            raise ValueError(f"plan file {path!r} changed while this worker loaded it")
        _CACHE[path] = (sha, before, n, exe)
        _LOADS[path] += 1
        return exe


def _run_block(*blocks, path, sha, sig, oname, B, odt, fo, num_threads):
    """One chunk: 2-D blocks (rows, features) of every input -> (rows, output features)."""
    exe = _cached_plan(path, sha, num_threads)
    n = blocks[0].shape[0]
    arrays = [b.reshape((n,) + shape[1:]) for b, (_, _, shape) in zip(blocks, sig)]
    out = None
    for b0, b1, _, rows in run_batches(exe, sig, arrays, oname, 0, n, B):
        if out is None:
            out = np.empty((n, rows[0].size), odt)
        out[b0:b1] = rows.reshape(b1 - b0, -1)
    return out if out is not None else np.empty((0, fo), odt)


def map_plan(plan_path, x, output="logits", batch_size=None, cast=False, num_threads=None):
    """Run plan ``plan_path``'s ``run`` entry over every row of ``x``; returns a lazy ``dask.array.Array``
    of output ``output`` (``None``: the only per-row output), shape ``(N,) + row shape``, the plan's dtype,
    chunked like ``x``'s rows.  ``x``: a dask array (single-input plans) or ``{input name: dask array}``.
    ``batch_size``, when given, must equal the plan's static batch.  See the module docstring."""
    from . import planfile
    from .fileio import FileSafetyError
    from .plan import PlanError

    path = os.path.abspath(os.fspath(plan_path))
    if not os.path.exists(path):
        raise ValueError(f"plan file {path!r} does not exist")
    try:
        plan = planfile.load_plan(path)
        sha = _sha256(path)
    except (PlanError, FileSafetyError, OSError) as e:
        raise ValueError(f"plan file {path!r}: {e}") from None
    try:
        sig, B, (oname, odt, oshape) = plan_io(plan, path, batch_size, output, flag="output=")
    except UsageError as e:
        raise ValueError(f"{path}: {e}") from None
    names = [s[0] for s in sig]
    if isinstance(x, dict):
        if set(x) != set(names):
            raise ValueError(f"{path}: the plan reads inputs {names}, got arrays for {sorted(x)}")
        arrays = [x[n] for n in names]
    elif len(sig) == 1:
        arrays = [x]
    else:
        raise ValueError(f"{path}: the plan reads {len(sig)} inputs {names}: pass a dict {{name: dask array}}")
    for (name, _, _), a in zip(sig, arrays):
        if not isinstance(a, da.Array):
            raise TypeError(f"{path}: input {name!r} must be a dask.array.Array, got {type(a).__name__} "
                            f"(wrap it with dask.array.from_array(a, chunks=(rows, -1)))")
        if a.ndim == 0 or any(np.isnan(c) for c in a.chunks[0]):
            raise ValueError(f"{path}: input {name!r} has shape {a.shape}: it needs rows of known chunk sizes "
                             f"(call compute_chunk_sizes())")
        if any(len(c) != 1 for c in a.chunks[1:]):
            raise ValueError(f"{path}: input {name!r} has chunks {a.chunks}: only the row axis may be split "
                             f"(rechunk with x.rechunk({{{', '.join(f'{i}: -1' for i in range(1, a.ndim))}}}))")
    try:
        check_inputs(sig, arrays, cast)
    except UsageError as e:
        raise ValueError(f"{path}: {e}") from None
    rows = arrays[0].chunks[0]
    for (name, _, _), a in zip(sig, arrays):
        if a.chunks[0] != rows:
            raise ValueError(f"{path}: input {name!r} has row chunks {a.chunks[0]}, input {sig[0][0]!r} has "
                             f"{rows}: every input needs the same row chunks")
    flat = []
    for (name, dt, shape), a in zip(sig, arrays):
        a = a.astype(dt) if a.dtype != np.dtype(dt) else a
        f = int(np.prod(shape[1:], dtype=np.int64))
        flat.append(a.reshape(a.shape[0], f) if a.ndim != 2 else a)  # single-chunked trailing axes: no rechunk
    fo = int(np.prod(oshape[1:], dtype=np.int64))
    out = da.map_blocks(_run_block, *flat, path=path, sha=sha, sig=sig, oname=oname, B=B, odt=np.dtype(odt), fo=fo,
                        num_threads=num_threads, chunks=(rows, (fo,)), dtype=np.dtype(odt),
                        meta=np.empty((0, 0), np.dtype(odt)), token=f"libml-{oname}")
    return out.reshape((out.shape[0],) + tuple(oshape[1:])) if len(oshape) != 2 else out


class _NpyReader:
    """Array-like over a C-order ``.npy`` stored at byte ``offset`` of ``path``: pickles as the path; the
    process that slices it (the dask worker) reads just those rows from the file."""

    def __init__(self, path, offset, start, shape, dtype):
        self.path, self.offset, self.start = path, offset, start
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        rows = idx[0] if idx else slice(None)
        full = all(isinstance(i, slice) and i.indices(n) == (0, n, 1) for i, n in zip(idx[1:], self.shape[1:]))
        if isinstance(rows, slice) and rows.indices(self.shape[0])[2] == 1 and full and self.ndim:
            # a row range (what dask asks for): one pread, so no mapped pages linger in the worker's RSS
            r0, r1, _ = rows.indices(self.shape[0])
            r1 = max(r0, r1)
            row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
            out = np.empty((r1 - r0,) + self.shape[1:], self.dtype)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view, done = memoryview(out).cast("B"), 0
                while done < len(view):
                    k = os.preadv(fd, [view[done:]], self.start + r0 * row + done)
                    if k == 0:
                        raise EOFError(f"{self.path!r} is shorter than its .npy header says")
                    done += k
            finally:
                os.close(fd)
            return out
        a = np.memmap(self.path, self.dtype, "r", offset=self.start, shape=self.shape)
        return np.array(a[idx])


def from_npy(path, chunks, member=None):
    """A dask array over ``path`` (a ``.npy``, or ``member`` of an uncompressed ``.npz``), read by the
    workers from the file (each chunk one positioned read); ``chunks`` is the row chunk size (other axes one chunk)."""
    from .cli import npy_layout, npz_member_offset
    path = os.path.abspath(os.fspath(path))
    offset = 0
    if member is not None:
        import zipfile
        with zipfile.ZipFile(path) as zf:
            offset = npz_member_offset(path, zf, member)
        if offset is None:
            raise ValueError(f"{path}:{member} is compressed: it cannot be memory-mapped")
    with open(path, "rb") as f:
        start, shape, dtype, _ = npy_layout(f, offset, f"{path}:{member}" if member else path)
    r = _NpyReader(path, offset, start, shape, dtype)
    return da.from_array(r, chunks=(chunks,) + tuple(-1 for _ in shape[1:]), asarray=False,
                         meta=np.empty((0,) * len(shape), dtype), name=f"npy-{path}-{offset}-{chunks}-{os.stat(path).st_mtime_ns}-{os.stat(path).st_size}")


def _default_chunk_rows(sig, B, target=32 << 20):
    row = max(sum(int(np.prod(s[1:], dtype=np.int64)) * np.dtype(dt).itemsize for _, dt, s in sig), 1)
    return max(1, target // (row * B)) * B


def run_cli(args, sig, arrays, N, B, oname, odt, oshape, window=None):
    """``libml-run --dask``: the checked inputs (``cli.open_inputs``) as worker-read dask arrays, the output
    written by this process in order with ``cli.write_rows`` (atomic, no memory map), at most ``window``
    chunks (default 2 per worker) in flight so the client holds only a few chunks of the result."""
    import collections
    import sys

    from tqdm import tqdm

    from .cli import npz_member_offset, write_rows

    chunk = args.chunk_rows or _default_chunk_rows(sig, B)
    xs = {}
    for (name, _, _), (a, _) in zip(sig, arrays):
        member = None
        if args.input.endswith(".npz"):
            import zipfile
            with zipfile.ZipFile(args.input) as zf:
                member = name + ".npy" if name + ".npy" in zf.namelist() else name
                stored = npz_member_offset(args.input, zf, member) is not None
            if not stored:  # a compressed member: already read into memory by open_inputs
                xs[name] = da.from_array(np.asarray(a), chunks=(chunk,) + tuple(-1 for _ in a.shape[1:]))
                continue
        xs[name] = from_npy(args.input, chunk, member)
    client, cluster = _client(args.dask)
    try:
        res = map_plan(args.plan, xs if len(sig) > 1 else xs[sig[0][0]], output=oname, cast=args.cast,
                       num_threads=args.num_threads)
        blocks = [res.blocks[i] for i in range(res.numblocks[0])]
        depth = window or max(2, 2 * len(client.scheduler_info().get("workers", {})))

        def gen():
            bar = tqdm(total=N, unit="rows", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
            q = collections.deque()
            it = iter(blocks)
            for b in it:
                q.append(client.compute(b))
                if len(q) >= depth:
                    break
            while q:
                part = q.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    q.append(client.compute(nxt))
                bar.update(len(part))
                yield part
            bar.close()

        write_rows(args.out, odt, (N,) + tuple(oshape[1:]), gen())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return N


def _client(address):
    """(Client, the LocalCluster it owns or None) for ``--dask ADDRESS|local``."""
    from distributed import Client, LocalCluster
    if address == "local":
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="10s"), None
    except (OSError, TimeoutError, ValueError) as e:
        raise UsageError(f"cannot connect to the Dask scheduler {address!r}: {e}") from None
