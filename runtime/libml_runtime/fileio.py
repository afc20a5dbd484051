"""The one place where libml writes and reads whole files: atomic writes and bounded, regular-file reads.

Every writer of the project (``Program.save`` / ``planfile.save``, ``save_checkpoint``, ``export_onnx``,
``libml-run --out``) goes through :func:`atomic_write`; every reader of a model, plan, checkpoint or data
file checks it with :func:`open_regular` / :func:`read_regular` first.

Writing (:func:`atomic_write`):

* The destination must be a regular file or not exist.  A device (``/dev/null``), FIFO, socket or
  directory is refused with :class:`FileSafetyError` before anything is written: replacing it by a
  rename would turn ``/dev/null`` into a regular file for the whole machine.
* A symlink is resolved deliberately: the bytes go to the symlink's *target* (temporary file in the
  target's folder, renamed over the target), so the link keeps pointing at the updated file.  A dangling
  link creates its target.
* The temporary file is ``.NAME.tmp-PID-TID-RANDOM`` in the destination's folder, created with
  ``O_EXCL`` (so two threads or processes never share one) and mode ``0o666 & ~umask`` (the mode any
  ordinary ``open(path, "w")`` would give).  It is flushed and fsync'ed, renamed over the destination with
  ``os.replace`` (atomic on POSIX) and the folder is fsync'ed.  Readers see the old file or the new one.
* On any exception (including ``KeyboardInterrupt`` and the ``SystemExit`` a SIGTERM handler raises) the
  temporary file is removed.  After SIGKILL it stays; the next write to the same destination removes
  temporary files whose process id no longer runs (:func:`remove_stale_temps`).

Reading: :func:`open_regular` opens with ``O_NONBLOCK`` and ``fstat``s the open descriptor, so a FIFO
never blocks and ``/dev/zero`` is never read; anything but a regular file raises :class:`FileSafetyError`.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import threading

__all__ = ["FileSafetyError", "atomic_write", "open_regular", "read_regular", "check_regular",
           "check_destination", "resolve_destination", "remove_stale_temps", "temp_prefix"]


class FileSafetyError(OSError):
    """A path is not a regular file where one is needed (device, FIFO, socket, directory), or a
    destination would destroy an input.  Subclass of OSError so I/O error handlers catch it."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _kind(mode) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


# ------------------------------------------------------------------------------------------------
# reading

def open_regular(path, what="file"):
    """Open ``path`` for reading as a binary file object, refusing anything but a regular file.

    The open uses ``O_NONBLOCK`` so that opening a FIFO returns at once; the type check is done on the
    open descriptor (``fstat``), so the file cannot be swapped between the check and the read.
    Raises FileNotFoundError / OSError, or FileSafetyError naming ``what`` and the path.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileSafetyError(f"{what} {path!r} is {_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, what="file") -> bytes:
    """The whole content of the regular file ``path`` (see :func:`open_regular`)."""
    with open_regular(path, what) as f:
        return f.read()


def check_regular(path, what="file"):
    """Raise unless ``path`` is an existing regular file (following symlinks); returns its ``os.stat``."""
    with open_regular(path, what) as f:
        return os.fstat(f.fileno())


# ------------------------------------------------------------------------------------------------
# writing

def resolve_destination(path) -> str:
    """The file a write to ``path`` replaces: ``path`` itself, or the final target of a symlink (an
    absolute path).  Raises FileSafetyError if that target exists and is not a regular file."""
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path) if os.path.islink(path) else path
    check_destination(real)
    return real


def check_destination(path, what="output"):
    """Raise FileSafetyError if ``path`` exists and is not a regular file (after following symlinks),
    or if its folder does not exist."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileSafetyError(errno.ENOENT, f"{what} folder {folder!r} does not exist") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise FileSafetyError(f"{what} {path!r} is {_kind(st.st_mode)}: libml writes only regular files "
                              f"(an atomic write would replace it)")


def temp_prefix(path) -> str:
    """Temporary files for ``path`` are named ``temp_prefix(path) + "PID-TID-RANDOM"``."""
    return f".{os.path.basename(os.fspath(path))}.tmp-"


_TEMP_TAIL = re.compile(r"^(\d+)-\d+-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> list:
    """Remove temporary files of ``path`` left by processes that no longer run (killed writers).

    Only names matching ``temp_prefix(path) + PID-TID-RANDOM`` whose PID is not alive are removed;
    temporary files of running writers (this process's other threads included) are kept.
    Returns the removed paths.
    """
    path = os.path.abspath(os.fspath(path))
    folder, prefix = os.path.dirname(path), temp_prefix(path)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        m = _TEMP_TAIL.match(name[len(prefix):])
        if m is None or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(folder, name)
        try:
            if stat.S_ISREG(os.lstat(full).st_mode):
                os.unlink(full)
                removed.append(full)
        except OSError:
            pass
    return removed


def _create_temp(target):
    """(fd, temp path) of a new, exclusive temporary file beside ``target``; mode 0o666 & ~umask."""
    folder = os.path.dirname(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{temp_prefix(target)}{os.getpid()}-{threading.get_ident()}-"
                                   f"{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a unique temporary file beside {target!r}")


def atomic_write(path, data, what="output"):
    """Write ``data`` to ``path`` atomically (see the module docstring for the guarantees).

    data: bytes-like, or a function ``write(f)`` given the open binary temporary file (it may seek, e.g.
    to write a header last).  Symlinks are followed: the link's target is replaced, the link is kept.
    Raises FileSafetyError for non-regular destinations; OSError (e.g. ENOSPC) leaves the previous file
    untouched and no temporary file behind.  Returns the path of the file written (the resolved target).
    """
    target = resolve_destination(path)
    remove_stale_temps(target)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # re-check right before the rename: the destination may have been swapped for a device
        check_destination(target, what)
        os.replace(tmp, target)
        tmp = None
    finally:
        if fd != -1:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(os.path.dirname(target))
    return target


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
