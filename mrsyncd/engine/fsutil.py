"""
Filesystem access beneath a destination that cannot be led astray by links.

Every path of a manifest is resolved component by component from an open
descriptor of the destination with ``O_NOFOLLOW``, so neither a symlink in the
tree nor a directory swapped for a symlink while a job runs can make the
receiver write outside its destination.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path component beneath the destination is a symlink or not a directory."""


#: The capabilities (capabilities(7)) that let a process give a file away,
#: then set the mode and times of a file it no longer owns.
CAP_CHOWN, CAP_FOWNER = 0, 3


@functools.cache
def may_set_owners(status: str = "/proc/self/status") -> bool:
    """
    Whether this process may set files' owners (``--preserve-owner``): it
    holds CAP_CHOWN and CAP_FOWNER (without the second, the mode and times
    of a file given away could not be set), as root does, and as the node
    unit's user ``mrsyncd`` does with the drop-in that grants them
    (OPERATIONS.md §5).  Root with them dropped may not.
    """
    wanted = 1 << CAP_CHOWN | 1 << CAP_FOWNER
    try:
        with open(status, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16) & wanted == wanted
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def open_parent(root_fd: int, path: str, create: bool = True) -> tuple[int, str]:
    """
    Open the directory holding ``path`` (relative to ``root_fd``) and return
    its descriptor, which the caller closes, and the last component.  Missing
    directories are made (mode 0755) when ``create`` is true.
    """
    *parents, name = path.split("/")
    fd = os.dup(root_fd)
    try:
        for part in parents:
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(e.errno, f"{part!r} in {path!r} is not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def make_directory(root_fd: int, path: str) -> None:
    """Make ``path`` a directory, replacing a file or symlink standing there."""
    fd, name = open_parent(root_fd, path)
    try:
        st = lstat_at(fd, name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=fd)
            st = None
        if st is None:
            os.mkdir(name, 0o700, dir_fd=fd)
    finally:
        os.close(fd)


def open_destination(path: str) -> int:
    """Open (making it if need be) the destination directory of a transfer."""
    os.makedirs(path, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@functools.cache
def _libc_syncfs() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    function = ctypes.CDLL(None, use_errno=True).syncfs
    function.argtypes = [ctypes.c_int]
    return function


def syncfs(fd: int) -> None:
    """
    Make everything written to ``fd``'s filesystem durable (syncfs(2),
    which Python's os module lacks): the data and metadata of many files
    in one round of writes and one journal commit, where fsync(2) of each
    in turn waits for each file's write by itself.  Since Linux 5.8 it
    reports a write that failed since the descriptor was opened.
    """
    if _libc_syncfs()(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
