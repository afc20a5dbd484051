"""``libml-run PLAN --input DATA.npy|.npz [--batch-size N] [--output NAME] --out PRED.npy [--dask SCHEDULER]``

Batch inference over inputs larger than memory, with the runtime alone (no compiler, no ONNX).

* The plan's batch dimension is static: the batch size is the leading dim of the plan's input shape.
  ``--batch-size`` is optional and, when given, must equal it.
* Input: a ``.npy`` file (the plan's ``run`` entry must then read exactly one input) or a ``.npz`` file
  with one array per input name.  ``.npy`` files and uncompressed ``.npz`` members are memory-mapped and
  read one window at a time (pages already processed are released with ``madvise(MADV_DONTNEED)``), so
  peak memory does not depend on the input size.  Compressed ``.npz`` members are read into memory.
* Every input must have the plan's dtype (``--cast`` allows same-kind casts such as float64->float32)
  and the plan's per-row shape; the number of rows N is free.
* Output: the ``run`` output named by ``--output`` (default: the only output whose leading dim is the
  batch size), written incrementally (ordinary writes, no memory map) into a ``.npy`` of shape ``(N, ...)``
  with ``fileio.atomic_write``: a unique hidden temporary file whose ``.npy`` header is written last, renamed
  over ``--out`` when complete.  ``--out`` is checked before any work: it must not be a directory, device,
  FIFO or socket, nor the same file (inode) as the plan or the input; a symlink updates its target.
* A full disk (ENOSPC, or EFBIG under a file-size limit) is a one-line error with status 2; the previous
  output is untouched and no temporary file remains.  SIGTERM removes the temporary file and exits 143;
  temporary files of killed runs (SIGKILL) are removed by the next run writing the same output.
* The final partial batch is padded by repeating its last row; the padded rows' outputs are dropped.
* A progress bar (tqdm, on stderr) shows rows processed; ``--quiet`` hides it.
* ``--profile REPEAT``: after the run, time every instruction of the plan over REPEAT runs of the first
  batch and print the table (``Executable.profile``) on stderr.
* ``--dask SCHEDULER`` (a scheduler address, or ``local``: a LocalCluster of 2 worker processes with 1
  thread each) runs the batches on a Dask cluster with ``libml_runtime.dask`` (``pip install ".[dask]"``);
  each worker reads its own chunks of the input, the output is written here as above, in order,
  byte-identical to a run without ``--dask``.  ``--chunk-rows N`` sets the rows per chunk.
* Bad input (missing/unreadable file, wrong shape or dtype, missing array, bad plan) exits with status 2
  and a one-line ``libml-run: error: ...`` message; a runtime failure exits with status 1.
"""
from __future__ import annotations

import argparse
import errno
import mmap
import os
import signal
import sys
import threading
import zipfile

import numpy as np

from .fileio import FileSafetyError

WINDOW_BYTES = 16 << 20   # input bytes per window between page releases


class UsageError(Exception):
    pass


def main(argv=None):
    p = argparse.ArgumentParser(prog="libml-run", description="Run a libml plan file over a data file.")
    p.add_argument("plan", help="plan file written by Program.save")
    p.add_argument("--input", required=True, help="DATA.npy (single-input plans) or DATA.npz (one array per input)")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--batch-size", type=int, default=None, help="must equal the plan's static batch size")
    p.add_argument("--output", default=None, help="which run output to write (default: the per-row output)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--cast", action="store_true", help="allow same-kind dtype casts of the input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", type=int, default=0, metavar="REPEAT",
                   help="afterwards, time each instruction over REPEAT runs of the first batch (stderr)")
    p.add_argument("--dask", default=None, metavar="SCHEDULER",
                   help="run the batches on a Dask cluster: a scheduler address, or 'local' for a LocalCluster "
                        "of 2 worker processes with 1 thread each (libml_runtime.dask)")
    p.add_argument("--chunk-rows", type=int, default=None, metavar="N",
                   help="with --dask: input rows per Dask chunk (default: about 32 MB of input, a multiple of "
                        "the batch size)")
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error(f"--profile must be >= 0, got {args.profile}")
    if args.dask is not None and args.profile:
        p.error("--profile runs in this process: it cannot be combined with --dask")
    if args.chunk_rows is not None and (args.dask is None or args.chunk_rows < 1):
        p.error("--chunk-rows needs --dask and a positive count")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        n = run(args)
    except _Terminated:
        print("libml-run: terminated (SIGTERM); no output written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except UsageError as e:
        print(f"libml-run: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a runtime failure: one line, non-zero
        from .plan import PlanError
        code = 2 if isinstance(e, PlanError) else 1
        print(f"libml-run: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(f"libml-run: wrote {n} rows to {args.out}", file=sys.stderr)
    return 0


def run(args):
    from . import planfile
    from .plan import PlanError

    check_out_path(args.out, [("plan", args.plan), ("--input", args.input)])
    try:
        # --dask: this process only validates (the workers load the plan); no arena is allocated here
        exe = planfile.load_plan(args.plan) if args.dask else planfile.load(args.plan, num_threads=args.num_threads)
    except FileNotFoundError:
        raise UsageError(f"plan file {args.plan!r} does not exist") from None
    except FileSafetyError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot read plan file {args.plan!r}: {e.strerror or e}") from None
    except PlanError as e:
        raise UsageError(f"{args.plan}: {e}") from None
    plan = exe if args.dask else exe.plan
    sig, B, (oname, odt, oshape) = plan_io(plan, args.plan, args.batch_size, args.output)

    arrays, closers = open_inputs(args.input, sig)
    try:
        N = check_inputs(sig, [a for a, _ in arrays], args.cast)
        if args.dask:
            try:
                from .dask import run_cli
            except ImportError as e:
                raise UsageError(f"--dask: {e}") from None
            return run_cli(args, sig, arrays, N, B, oname, odt, oshape)
        return stream(exe, sig, arrays, N, B, oname, odt, oshape, args)
    finally:
        for c in closers:
            c()


def plan_io(plan, plan_path, batch_size=None, output=None, flag="--output "):
    """The run entry's input signature [(name, dtype, shape)], its static batch size B and the chosen output
    (name, dtype, shape): ``output`` by name, or when None the only output with one row per input row.
    Raises UsageError naming the plan file, the inputs and outputs."""
    entry = plan.entries.get("run")
    if entry is None:
        raise UsageError(f"plan {os.fspath(plan_path)!r} has no run entry")
    sig = [(name, dt, tuple(shape)) for name, dt, shape in entry.inputs]
    if not sig:
        raise UsageError("the plan's run entry reads no inputs: nothing to stream")
    B = sig[0][2][0] if sig[0][2] else None
    for name, dt, shape in sig:
        if not shape or shape[0] != B:
            raise UsageError(f"plan input {name!r} has shape {shape}: every input needs the same leading batch dim")
    if batch_size is not None and batch_size != B:
        raise UsageError(f"--batch-size {batch_size} does not match the plan's static batch size {B} "
                         f"(recompile the plan for another batch size)")
    outs = [(name, dt, tuple(shape)) for name, _, _, dt, shape in entry.outputs]
    if output is not None:
        chosen = [o for o in outs if o[0] == output]
        if not chosen:
            raise UsageError(f"plan {os.fspath(plan_path)!r} has no output {output!r}; outputs are "
                             f"{[o[0] for o in outs]}")
    else:
        chosen = [o for o in outs if o[2] and o[2][0] == B]
        if len(chosen) != 1:
            raise UsageError(f"pass {flag}NAME: per-row outputs are {[o[0] for o in chosen]} "
                             f"(all outputs: {[o[0] for o in outs]})")
    oname, odt, oshape = chosen[0]
    if not oshape or oshape[0] != B:
        raise UsageError(f"output {oname!r} has shape {oshape}, not one row per input row (batch {B})")
    return sig, B, chosen[0]


def check_inputs(sig, arrays, cast=False):
    """Check every array (anything with ``shape``/``dtype``/``ndim``) against the plan's per-row shape and
    dtype; returns the common row count N.  Raises UsageError naming the input and both shapes."""
    N = None
    for (name, dt, shape), a in zip(sig, arrays):
        if a.ndim != len(shape) or tuple(a.shape[1:]) != shape[1:]:
            raise UsageError(f"input {name!r} has shape {tuple(a.shape)}, the plan expects (N,) + {shape[1:]}")
        if a.dtype != np.dtype(dt) and not (cast and np.can_cast(a.dtype, dt, "same_kind")):
            raise UsageError(f"input {name!r} has dtype {a.dtype}, the plan expects {dt}"
                             + ("" if cast else " (--cast allows same-kind casts)"))
        if N is not None and a.shape[0] != N:
            raise UsageError(f"input {name!r} has {a.shape[0]} rows, the others have {N}")
        N = a.shape[0]
    return N


def run_batches(exe, sig, arrays, oname, r0, r1, B, pad=None):
    """Run rows [r0, r1) of ``arrays`` (one per ``sig`` input) through ``exe`` in plan-sized batches of B.

    Yields ``(b0, b1, feeds, rows)``: output ``oname`` for rows [b0, b1) in order.  A final partial batch
    is padded by repeating its last row (into the reusable buffers ``pad``, one per input, allocated when
    None) and the padded rows' outputs are dropped, so every input row gives exactly one output row."""
    if pad is None:
        pad = [np.empty(shape, dt) for _, dt, shape in sig]
    for b0 in range(r0, r1, B):
        b1 = min(b0 + B, r1)
        feeds = {}
        for k, ((name, dt, shape), a) in enumerate(zip(sig, arrays)):
            x = a[b0:b1]
            if b1 - b0 < B:  # final partial batch: pad by repeating the last row
                pad[k][: b1 - b0] = x
                pad[k][b1 - b0:] = x[-1]
                x = pad[k]
            elif x.dtype != np.dtype(dt) or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x, dtype=dt)
            feeds[name] = x
        yield b0, b1, feeds, exe.run(feeds)[oname][: b1 - b0]


def stream(exe, sig, arrays, N, B, oname, odt, oshape, args):
    """Run every batch (``run_batches``) and write the outputs to ``args.out`` (``write_rows``), releasing
    the input pages of each window once it is done."""
    from tqdm import tqdm

    row_in = max(sum(int(np.prod(s[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize for (_, _, s), (a, _) in zip(sig, arrays)), 1)
    window = max(1, WINDOW_BYTES // (row_in * B)) * B
    first = {}  # the first batch's feeds, kept for --profile

    def blocks():
        bar = tqdm(total=N, unit="rows", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
        pad = [np.empty(shape, dt) for _, dt, shape in sig]
        for w0 in range(0, N, window):
            w1 = min(w0 + window, N)
            for _, _, feeds, res in run_batches(exe, sig, [a for a, _ in arrays], oname, w0, w1, B, pad):
                yield res
                if args.profile and not first:
                    first.update({k: np.array(v) for k, v in feeds.items()})
            bar.update(w1 - w0)
            for _, release in arrays:  # release the read pages of the inputs
                release(w0, w1)
        bar.close()

    write_rows(args.out, odt, (N,) + tuple(oshape[1:]), blocks())
    if first:
        print(exe.profile("run", first, repeat=args.profile), file=sys.stderr)
    return N


def write_rows(out, dtype, shape, blocks):
    """Write the row blocks (arrays, in order, ``shape[0]`` rows in all) as one ``.npy`` at ``out`` with
    ``fileio.atomic_write``.  The rows are written with ordinary ``write`` calls (never through a memory
    map: a full disk is an ENOSPC error, not SIGBUS), after a placeholder header of zeros; the real
    ``.npy`` header is written last, so a temporary file left by SIGKILL never parses as an array."""
    from .fileio import atomic_write

    out_dtype = np.dtype(dtype)
    header = _npy_header(out_dtype, shape)

    def write(f):
        f.write(b"\0" * len(header))   # not a valid .npy until the end
        n = 0
        for res in blocks:
            f.write(memoryview(np.ascontiguousarray(res, dtype=out_dtype)).cast("B"))
            n += len(res)
        if n != shape[0]:
            raise RuntimeError(f"produced {n} rows, expected {shape[0]}")
        f.flush()
        f.seek(0)
        f.write(header)

    try:
        atomic_write(out, write, what="--out")
    except OSError as e:
        if isinstance(e, FileSafetyError) or e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES,
                                                            errno.EROFS, errno.ENOENT, errno.EISDIR):
            raise UsageError(f"cannot write {os.fspath(out)!r}: {e.strerror or e} "
                             f"(the previous file, if any, is unchanged)") from None
        raise


def _npy_header(dtype, shape) -> bytes:
    """The complete ``.npy`` header (magic, version, padded dict) for a C-order array."""
    import io
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(x) for x in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # the header does not fit version 1.0's 16-bit length
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def check_out_path(out, inputs):
    """Refuse ``--out`` before any work: a directory, device, FIFO or socket, a missing folder, or the
    same file (same device and inode, so hard links and symlinks count) as one of ``inputs``
    ([(label, path)]).  Raises UsageError."""
    from .fileio import check_destination

    out = os.fspath(out)
    try:
        check_destination(out, "--out")
    except FileSafetyError as e:
        raise UsageError(str(e.strerror if e.errno else e)) from None
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return
    for label, path in inputs:
        try:
            si = os.stat(path)
        except OSError:
            continue
        if (si.st_dev, si.st_ino) == (st.st_dev, st.st_ino):
            raise UsageError(f"--out {out!r} is the same file as {label} {os.fspath(path)!r}: "
                             f"writing it would destroy the {label}")


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that ``finally`` blocks (temporary-file cleanup) run."""


def _on_sigterm(signum, frame):
    raise _Terminated(signum)


def _release(mm, start, length, flush=False):
    """Drop [start, start+length) of a mapping from this process's resident set."""
    pg = mmap.PAGESIZE
    lo = start // pg * pg
    hi = min(-(-(start + length) // pg) * pg, len(mm))
    if hi <= lo:
        return
    if flush:
        mm.flush(lo, hi - lo)
    if hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def open_inputs(path, sig):
    """[(array, release(row0, row1))] in ``sig`` order, and close callbacks."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"input file {path!r} does not exist")
    from .fileio import check_regular
    try:
        check_regular(path, "input file")
    except OSError as e:
        raise UsageError(str(e) if isinstance(e, FileSafetyError) else f"cannot read {path!r}: {e.strerror or e}") from None
    closers = []
    try:
        if path.endswith(".npz"):
            try:
                zf = zipfile.ZipFile(path)
            except (OSError, zipfile.BadZipFile) as e:
                raise UsageError(f"cannot read {path!r} as .npz: {e}") from None
            closers.append(zf.close)
            names = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
            out = []
            for name, _, _ in sig:
                if name not in names:
                    raise UsageError(f"{path!r} has no array {name!r} (it has {sorted(names)}); the plan reads "
                                     f"{[s[0] for s in sig]}")
                out.append(_npz_member(path, zf, names[name], closers))
            return out, closers
        if len(sig) != 1:
            raise UsageError(f"the plan reads {len(sig)} inputs {[s[0] for s in sig]}: pass a .npz with one "
                             f"array per input")
        return [_map_npy(path, 0, closers, what=path)], closers
    except BaseException:
        for c in closers:
            c()
        raise


def _map_npy(path, offset, closers, what):
    """Memory-map the .npy stored at byte ``offset`` of ``path``."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {what!r}: {e.strerror or e}") from None
    closers.append(f.close)
    start, shape, dtype, nbytes = npy_layout(f, offset, what)
    if nbytes == 0:
        return np.zeros(shape, dtype), lambda a, b: None
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    closers.append(mm.close)
    a = np.ndarray(shape, dtype=dtype, buffer=mm, offset=start)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if len(shape) else nbytes

    def release(r0, r1):
        _release(mm, start + r0 * row, (r1 - r0) * row)
    return a, release


def npy_layout(f, offset, what):
    """(data start, shape, dtype, data bytes) of the C-order numeric .npy stored at byte ``offset`` of the
    open file ``f``; UsageError if it is not one or is truncated."""
    try:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what!r} is not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise UsageError(f"{what!r} holds Python objects; only numeric arrays are accepted")
    if fortran and len(shape) > 1:
        raise UsageError(f"{what!r} is stored in Fortran order; save it C-contiguous")
    start = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.fstat(f.fileno()).st_size
    if start + nbytes > size:
        raise UsageError(f"{what!r} is truncated: {shape} {dtype} needs {nbytes} bytes, the file has {size - start}")
    return start, shape, dtype, nbytes


def npz_member_offset(path, zf, member):
    """Byte offset in ``path`` of the .npy of an uncompressed (stored) ``.npz`` member; None if compressed."""
    info = zf.getinfo(member)
    if info.compress_type == zipfile.ZIP_STORED:
        # locate the member's data: local file header (30 bytes + name + extra) at header_offset
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            h = f.read(30)
        if len(h) == 30 and h[:4] == b"PK\x03\x04":
            n, m = int.from_bytes(h[26:28], "little"), int.from_bytes(h[28:30], "little")
            return info.header_offset + 30 + n + m
    return None


def read_npz_member(path, zf, member):
    """A (compressed) ``.npz`` member read into memory."""
    try:
        with zf.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"cannot read {path}:{member}: {e}") from None


def _npz_member(path, zf, member, closers):
    offset = npz_member_offset(path, zf, member)
    if offset is not None:
        return _map_npy(path, offset, closers, what=f"{path}:{member}")
    return read_npz_member(path, zf, member), lambda r0, r1: None


if __name__ == "__main__":
    sys.exit(main())
