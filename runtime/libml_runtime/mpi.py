"""Binding a distributed plan to MPI: what ``Executable`` does once for a plan with collectives.

A plan compiled with ``distributed="mpi"`` (libml_compile/distributed.py) carries ``allreduce_start`` /
``allreduce_wait`` instructions (format.py 66-67) and ``meta["distributed"] = {"backend": "mpi",
"world_size": K}``.  The runtime is not linked against MPI: ``MPIBinding`` imports mpi4py (the ``dist``
extra), finds the libmpi mpi4py loaded, takes the addresses of ``MPI_Iallreduce``, ``MPI_Wait`` and
``MPI_Test`` and the handles (a private duplicate of ``MPI_COMM_WORLD``, ``MPI_FLOAT``/``MPI_DOUBLE``,
``MPI_SUM``, ``MPI_IN_PLACE``, ``MPI_REQUEST_NULL``) and hands them to ``_exec.MPIContext``; the plan itself
never holds an address.  Then, collectively:

* every rank's plan is compared with every other's (a digest of the code, constants, inputs and params):
  a different batch shape, model or optimizer on some rank is refused on every rank, naming the ranks and
  their input shapes, before any collective with mismatched sizes could run;
* rank 0's state buffer (params, optimizer state, buffers) is broadcast, so all ranks start identical.

Faults: the duplicated communicator's error handler is ``MPI_ERRORS_ARE_FATAL`` (an MPI failure, a peer that
died, aborts the job with MPI's message instead of hanging), and ``sys.excepthook`` is wrapped so that an
uncaught Python exception on any rank prints its traceback and calls ``MPI_Abort``: mpiexec then ends every
rank, in bounded time.  A rank that catches its exception (or simply stops stepping) would leave its peers
inside an allreduce: every wait has a deadline, ``$LIBML_MPI_TIMEOUT`` seconds (default 300; 0 = none),
after which the call raises ``RuntimeFailure`` naming the step's collective on the ranks still in it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import sys

import numpy as np

from . import format as F


def wait_timeout():
    """Seconds an allreduce waits for the other ranks: ``$LIBML_MPI_TIMEOUT`` (default 300; 0 = no limit)."""
    text = os.environ.get("LIBML_MPI_TIMEOUT", "300").strip()
    try:
        v = float(text)
    except ValueError:
        raise DistributedError(f"LIBML_MPI_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not v >= 0:
        raise DistributedError(f"LIBML_MPI_TIMEOUT must be >= 0 seconds, got {text!r}")
    return v


class DistributedError(RuntimeError):
    """A distributed plan cannot run here: no MPI, another world size, or ranks with different plans."""


def plan_world_size(plan):
    """The world size a distributed plan was compiled for, or None for a single-process plan."""
    d = plan.meta.get("distributed") if isinstance(plan.meta, dict) else None
    if d is None:
        return None
    if not isinstance(d, dict) or d.get("backend") != "mpi" or not isinstance(d.get("world_size"), int) \
            or d["world_size"] < 1:
        raise DistributedError(f"plan {plan.name!r}: meta['distributed'] must be {{'backend': 'mpi', "
                               f"'world_size': int >= 1}}, got {d!r}"[:400])
    return d["world_size"]


_COLLECTIVES = (F.OP_CODE["allreduce_start"], F.OP_CODE["allreduce_wait"])


def _collective_reqs(plan):
    """Request slots named by the plan's collectives (every entry, checked ones too)."""
    reqs = set()
    for e in plan.entries.values():
        for x in (e, e.checked):
            if x is None:
                continue
            code, pc = x.code.tolist(), 0
            while pc < len(code):  # (validated: lengths tile the code) only the collectives are decoded
                if code[pc] in _COLLECTIVES:
                    reqs.add(F.decode(code, pc)[2]["req"])
                pc += code[pc + 1]
    return reqs


def _libmpi():
    """The libmpi shared object this process has loaded (through mpi4py), as a ctypes library."""
    paths = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                p = line.split()[-1] if line.strip() else ""
                if "/libmpi.so" in p and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    for p in paths:
        try:
            return ctypes.CDLL(p, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError:
            continue
    name = ctypes.util.find_library("mpi")
    if name:
        return ctypes.CDLL(name, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    raise DistributedError("cannot find the libmpi shared library that mpi4py loaded")


def _addr(lib, fn):
    return ctypes.cast(getattr(lib, fn), ctypes.c_void_p).value


_HOOKED = False


def install_abort_hook():
    """Wrap ``sys.excepthook``: an uncaught exception prints its traceback, then ``MPI_Abort``s the job (the
    other ranks would otherwise wait in a collective forever).  Installed once per process."""
    global _HOOKED
    if _HOOKED:
        return
    from mpi4py import MPI
    prev = sys.excepthook

    def hook(kind, value, tb):
        try:
            prev(kind, value, tb)
            sys.stderr.write(f"libml: rank {MPI.COMM_WORLD.Get_rank()} raised {kind.__name__}: aborting the MPI "
                             f"job\n")
            sys.stderr.flush()
        finally:
            MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook
    _HOOKED = True


def _digest(plan):
    h = hashlib.sha256()
    for kind in sorted(plan.entries):
        e = plan.entries[kind]
        h.update(kind.encode())
        h.update(np.ascontiguousarray(e.code).tobytes())
        h.update(np.ascontiguousarray(e.consts).tobytes())
        h.update(str(int(e.arena_bytes)).encode())
    h.update(repr([(n, o, str(dt), tuple(s)) for n, o, dt, s, *_ in plan.params]).encode())
    h.update(repr([(n, str(dt), tuple(s)) for n, dt, s in plan.graph_inputs]).encode())
    return h.hexdigest()


class MPIBinding:
    """The MPI side of one Executable of a distributed plan: ``ctx`` (an ``_exec.MPIContext``), ``comm``
    (a private duplicate of COMM_WORLD), ``rank`` and ``size``."""

    def __init__(self, plan):
        from . import _exec
        want = plan_world_size(plan)
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(
                f"plan {plan.name!r} is a distributed plan (compiled with distributed='mpi' for {want} ranks): it "
                f"needs mpi4py and an MPI launcher (pip install 'libml[dist]'; then mpiexec -n {want} python ...); "
                f"mpi4py cannot be imported ({e})") from None
        world = MPI.COMM_WORLD
        if world.Get_size() != want:
            how = ("this process was not started by mpiexec (a world of 1 rank)" if world.Get_size() == 1
                   else f"this job has {world.Get_size()} ranks")
            raise DistributedError(f"plan {plan.name!r} was compiled for {want} MPI ranks (distributed='mpi'), but "
                                   f"{how}: start it with mpiexec -n {want}, or compile it again for this world size")
        install_abort_hook()
        self.comm = world.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_ARE_FATAL)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._check_same_plan(plan)
        lib = _libmpi()
        reqs = _collective_reqs(plan)
        self.ctx = _exec.MPIContext(
            _addr(lib, "MPI_Iallreduce"), _addr(lib, "MPI_Wait"), _addr(lib, "MPI_Test"), self.comm.handle,
            MPI.SUM.handle, MPI.FLOAT.handle, MPI.DOUBLE.handle, MPI.buffer(MPI.IN_PLACE).address,
            MPI.REQUEST_NULL.handle, max(reqs) + 1 if reqs else 0, MPI._sizeof(MPI.Status))
        self.ctx.timeout = wait_timeout()
        if MPI._sizeof(MPI.Request) > 16:
            raise DistributedError(f"MPI_Request is {MPI._sizeof(MPI.Request)} bytes: the runtime's request slots "
                                   f"hold 16")

    def _check_same_plan(self, plan):
        """Every rank runs the same plan (same batch shape, model and optimizer), or every rank raises a
        DistributedError naming the ranks that differ from rank 0 and their input shapes."""
        mine = (_digest(plan), [(n, tuple(int(d) for d in s)) for n, _, s in plan.graph_inputs])
        everyone = self.comm.allgather(mine)
        bad = [r for r, (dg, _) in enumerate(everyone) if dg != everyone[0][0]]
        if bad:
            def shapes(r):
                return ", ".join(f"{n} {s}" for n, s in everyone[r][1])
            detail = "; ".join(f"rank {r}: {shapes(r)}" for r in [0] + bad)
            raise DistributedError(f"plan {plan.name!r}: ranks {bad} run a different plan than rank 0 (another batch "
                                   f"shape, model or optimizer); every rank must feed the same static shapes: "
                                   f"{detail}")

    def broadcast(self, state):
        """Rank 0's bytes of ``state`` (a uint8 array) on every rank."""
        self.comm.Bcast(state, root=0)

    def barrier(self):
        self.comm.Barrier()
