"""Training checkpoints: params, optimizer state (momentum, Adam moments and step count) and the data
loader's position, in one checksummed file written atomically.

The container is the plan-file container (``planfile.pack``) with magic ``b"LIBMLCKP"``; the header holds
the plan's name and a fingerprint of its state layout (for reference: loading matches arrays by name,
dtype and shape), one record per array ``[name, dtype, shape,
section]`` (raw little-endian bytes in a uint8 section), the loader state and a free JSON ``extra``.

Atomicity: written with ``fileio.atomic_write`` (a unique temporary file in the checkpoint's folder,
flushed and fsync'ed, renamed over the old checkpoint with ``os.replace``, the folder fsync'ed).  A process
killed at any point leaves either the previous checkpoint or the new one, never a mixture.  A stray
``.<name>.tmp-PID-*`` file may remain after SIGKILL; the next save to the same path removes it once that
process is gone.  A symlinked checkpoint path updates the link's target; devices, FIFOs and directories
are refused.

Distributed programs (``distributed="mpi"``): every rank calls ``save_checkpoint`` / ``load_checkpoint``
(they are collective).  Only rank 0 writes the file (the ranks' states are identical); the others wait at a
barrier until the file is in place, so a checkpoint that one rank saw saved is there for all.  On load
every rank reads the file (a shared filesystem) and then rank 0's restored state is broadcast, so all ranks
resume bit-identically even if a rank read a stale copy.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from . import format as F
from .plan import PlanError
from .planfile import Sections, _int, _keys, _list, _need, _shape, _str, pack_to, unpack
from .fileio import atomic_write, read_regular

MAGIC = b"LIBMLCKP"
CHECKPOINT_VERSION = 1  # the checkpoint layout; independent of the plan format version


class CheckpointError(PlanError):
    """A checkpoint file is corrupt, or does not belong to this program."""


def layout_fingerprint(plan):
    """SHA-256 over the names, dtypes and shapes of the params and optimizer state."""
    rec = [[p[0], p[2], [int(d) for d in p[3]]] for p in plan.params] + \
          [[s[0], s[2], [int(d) for d in s[3]]] for s in plan.opt_state]
    return hashlib.sha256(json.dumps(rec, separators=(",", ":")).encode()).hexdigest()


def save_checkpoint(exe, path, loader=None, extra=None):
    """Write ``exe``'s params and optimizer state (and ``loader.state_dict()``) to ``path`` atomically.

    The arrays are copied under the program's lock, so a concurrent ``step`` from another thread is never
    half-saved.  extra: a JSON-serialisable dict stored alongside (e.g. the epoch or a metric).
    """
    plan = exe.plan
    mpi = getattr(exe, "_mpi", None)
    if mpi is not None and mpi.rank != 0:
        if loader is not None:
            loader.state_dict()  # (the same calls on every rank)
        mpi.barrier()  # rank 0 has written the file
        return path
    with exe._lock:
        arrays = [(name, dt, tuple(shape), exe._view(1, off, dt, shape).copy())
                  for name, off, dt, shape in [p[:4] for p in plan.params] + list(plan.opt_state)]
        loader_state = loader.state_dict() if loader is not None else None
    header = {
        "format": "libml-checkpoint",
        "version": CHECKPOINT_VERSION,
        "plan": plan.name,
        "layout": layout_fingerprint(plan),
        "arrays": [[name, dt, list(shape), i] for i, (name, dt, shape, _) in enumerate(arrays)],
        "loader": loader_state,
        "extra": extra,
    }
    sections = [("uint8", np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).reshape(-1).view(np.uint8))
                for _, _, _, a in arrays]
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint extra/loader state must be JSON-serialisable: {e}") from None
    atomic_write(path, lambda f: pack_to(f, MAGIC, header, sections, CHECKPOINT_VERSION), what="checkpoint")
    if mpi is not None:
        mpi.barrier()
    return path


def read_checkpoint(path):
    """Parse and verify a checkpoint file -> (header dict, {name: ndarray}).  Raises CheckpointError."""
    data = read_regular(path, "checkpoint")
    try:
        h, area = unpack(data, MAGIC, "libml checkpoint", CHECKPOINT_VERSION)
        _keys(h, "header", {"format", "version", "plan", "layout", "arrays", "loader", "extra", "sections"})
        _need(h["format"] == "libml-checkpoint" and h["version"] == CHECKPOINT_VERSION, "format",
              f"is not libml-checkpoint {CHECKPOINT_VERSION}")
        _str(h["plan"], "plan", allow_empty=True)
        _str(h["layout"], "layout")
        secs = Sections(h["sections"], area)
        arrays = {}
        for i, rec in enumerate(_list(h["arrays"], "arrays")):
            w = f"arrays[{i}]"
            _need(isinstance(rec, list) and len(rec) == 4, w, "must be [name, dtype, shape, section]")
            name, dt, shape = _str(rec[0], f"{w}.name"), rec[1], _shape(rec[2], f"{w}.shape")
            _need(isinstance(dt, str) and dt in F.DTYPES, f"{w}.dtype", f"unknown dtype {dt!r}"[:200])
            raw = secs.take(_int(rec[3], f"{w}.section"), f"{w}.section", "uint8")
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            _need(raw.size == want, f"{w}.section", f"holds {raw.size} bytes, {dt}{list(shape)} needs {want}")
            _need(name not in arrays, f"{w}.name", f"duplicate array {name!r}")
            arrays[name] = raw.view(np.dtype(dt).newbyteorder("<")).astype(dt).reshape(shape)
        secs.check_all_used()
        _need(h["loader"] is None or isinstance(h["loader"], dict), "loader", "must be an object or null")
    except CheckpointError:
        raise
    except PlanError as e:
        raise CheckpointError(str(e).replace("invalid plan field", "invalid checkpoint field")) from None
    return h, arrays


def load_checkpoint(exe, path, loader=None):
    """Restore params and optimizer state into ``exe`` (and the position into ``loader``).

    Raises CheckpointError if the file is corrupt or was written by a program with a different state
    layout; nothing is modified in that case.  Returns the checkpoint's ``extra``.
    """
    h, arrays = read_checkpoint(path)
    # arrays are matched by name, dtype and shape; the order in which a program laid out its state is
    # not compared (the fingerprint in the header is), so a checkpoint survives a compiler change that
    # allocates the same optimizer state in another order
    want = {r[0]: (r[2], tuple(int(d) for d in r[3])) for r in list(exe.plan.params) + list(exe.plan.opt_state)}
    have = {name: (a.dtype.name, tuple(a.shape)) for name, a in arrays.items()}
    if have != want:
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        differ = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} was written by program {h['plan']!r} with a different "
            f"params/optimizer-state layout than program {exe.plan.name!r}: "
            + "; ".join(f"{what} {names[:5]}" for what, names in
                        (("missing", missing), ("not in the program", unexpected),
                         ("other dtype or shape", differ)) if names))
    if loader is not None:
        if h["loader"] is None:
            raise CheckpointError(f"checkpoint {os.fspath(path)!r} has no data loader position")
        loader.check_state(h["loader"])
    exe.load_state_dict(arrays)
    mpi = getattr(exe, "_mpi", None)
    if mpi is not None:  # every rank resumes from rank 0's bytes
        with exe._lock:
            mpi.broadcast(exe._state)
    if loader is not None:
        loader.load_state_dict(h["loader"])
    return h["extra"]
