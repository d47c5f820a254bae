"""
A receiver's disk work, done in threads: surveying what a destination
already holds, part files, reading a chunk back to verify it, and placing
a verified file at its final path so that a reader sees either the old
file or the whole new one.

The functions take plain values (a directory descriptor, a manifest entry)
and touch no receiver state, so that `mrsyncd.engine.receiver` can run them in the
reactor's thread pool.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field, replace

from mrsyncd.engine import fsutil
from mrsyncd.engine.ledger import DONE, NEEDED
from mrsyncd.wire.manifest import (
    DIR,
    FILE,
    HARDLINK,
    RESERVED_PREFIX,
    SYMLINK,
    Entry,
    Manifest,
    digest,
    excluded,
)

#: A path's result when it was received (or found unchanged) and placed.
OK = "ok"
#: A dry run's results: what a transfer would change.
WOULD_RECEIVE, WOULD_DELETE = "would receive", "would delete"


#: A part file of a transfer not in flight here, untouched this long, is
#: what a job that failed or was given up left: the next transfer that
#: surveys its directory removes it.  (Younger ones may yet be resumed: a
#: master restarted within it resumes its jobs under the same transfer.)
STALE_PART_SECONDS = 24 * 3600
_PART_NAME = re.compile(rf"{re.escape(RESERVED_PREFIX)}([0-9a-f]+)-[0-9]+\.pa(?:rt|ck)")


def part_name(transfer_id: bytes, index: int) -> str:
    """Short, so that it fits whatever the final name's length is."""
    return f"{RESERVED_PREFIX}{transfer_id.hex()}-{index}.part"


def pack_name(transfer_id: bytes, head: int) -> str:
    """
    Where a pack's blocks wait for repairs (`manifest.Pack`): at the top of
    the destination, which exists whichever of its members' directories
    cannot be made.  Never resumed from: a member verified is in place.
    """
    return f"{RESERVED_PREFIX}{transfer_id.hex()}-{head}.pack"


#: Part files are made anew only with O_EXCL, never through a name someone
#: else made first: the transfer id is on the wire, so a local user who can
#: write the destination directory could otherwise plant a hard link to
#: another file at a part file's name and have the node write into it.
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REOPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_part(dir_fd: int, part: str, size: int) -> int:
    """
    A new part file of ``size`` bytes, all holes (0: empty, for a file
    written whole at once, which a truncation would cost a journal entry
    more).  A name already taken (it appeared after the survey looked) is
    removed once and made again; if it is taken again, the file fails with
    EEXIST.
    """
    try:
        part_fd = os.open(part, _CREATE, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(part, dir_fd=dir_fd)
        part_fd = os.open(part, _CREATE, 0o600, dir_fd=dir_fd)
    if size:
        os.ftruncate(part_fd, size)
    return part_fd


def _reopen_part(dir_fd: int, part: str) -> int:
    """
    A part file this node made before (a resume, or a later write of this
    transfer), refused unless it still is what the node made: a regular
    file of its own with no other link.
    """
    part_fd = os.open(part, _REOPEN, dir_fd=dir_fd)
    st = os.fstat(part_fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
        return part_fd
    os.close(part_fd)
    raise OSError(
        errno.EPERM, f"part file {part} is not this node's (owner {st.st_uid}, {st.st_nlink} links)"
    )


def survey(
    root_fd: int,
    manifest: Manifest,
    transfer_id: bytes,
    dry_run: bool = False,
    owner: bool = False,
    sweep: Sweep | None = None,
) -> dict[int, Held | str]:
    """
    Make the directories, and for each file find what it already has (see
    `chunks_held`; ``owner``: owners are set), or the reason it cannot be
    received at all.  A dry run writes nothing, and its destination may not
    exist yet (``root_fd`` -1).  With ``sweep``, the stale part files of
    other transfers in the directories surveyed are removed, and named in it.
    """
    found: dict[int, Held | str] = {}
    parent = _Parent(root_fd, create=not dry_run, sweep=None if dry_run else sweep)
    try:
        for index, entry in enumerate(manifest.entries):
            try:
                if entry.kind == DIR and not dry_run:
                    fsutil.make_directory(root_fd, entry.path)
                elif entry.kind == FILE:
                    fd, names, name = parent.of(entry.path)
                    found[index] = chunks_held(
                        fd, names, name, manifest, entry, transfer_id, index, dry_run, owner
                    )
            except FileNotFoundError:
                if entry.kind == FILE and dry_run:
                    found[index] = Held(zero_chunks(manifest, entry))
            except OSError as e:
                if entry.kind == FILE:
                    found[index] = f"cannot prepare: {e.strerror or e}"
    finally:
        parent.close()
    return found


@dataclass
class Sweep:
    """
    Which part files a survey may remove: those of a transfer other than
    ``keep`` (the transfers in flight on this host) untouched for
    `STALE_PART_SECONDS`, regular, ours and of one link; and what it removed.
    """

    keep: frozenset[bytes]
    now: float = field(default_factory=time.time)
    removed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        #: ``keep`` as part files name them, once, not for each directory.
        self._kept_names = {transfer_id.hex() for transfer_id in self.keep}

    def sweep(self, fd: int, names: frozenset[str]) -> list[str]:
        gone = []
        for name in names:
            match = _PART_NAME.fullmatch(name)
            if match is None or match.group(1) in self._kept_names:
                continue
            st = fsutil.lstat_at(fd, name)
            if (
                st is None
                or not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_nlink != 1
                or self.now - st.st_mtime < STALE_PART_SECONDS
            ):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
                gone.append(name)
        return gone


class _Parent:
    """
    The directory of the files being surveyed, open, with the names in it.
    A manifest lists a directory's files together (`manifest.scan` walks
    the tree), so each directory is opened and listed once, not opened
    component by component and asked for a part file once for every file
    in it: 20 us a file, most of what comparing an unchanged tree costs.
    """

    def __init__(self, root_fd: int, create: bool, sweep: Sweep | None = None) -> None:
        self.root_fd = root_fd
        self.create = create
        self.sweep = sweep
        self.path: str | None = None
        self.fd = -1
        self.names: frozenset[str] = frozenset()

    def of(self, path: str) -> tuple[int, frozenset[str], str]:
        """The open directory of ``path``, the names in it, and the last component of ``path``."""
        directory, _, name = path.rpartition("/")
        if directory != self.path or self.fd < 0:
            self.close()
            if self.root_fd < 0:
                raise FileNotFoundError(path)
            self.fd, name = fsutil.open_parent(self.root_fd, path, create=self.create)
            self.path, self.names = directory, frozenset(os.listdir(self.fd))
            if self.sweep is not None:
                gone = self.sweep.sweep(self.fd, self.names)
                self.sweep.removed.extend(f"{directory}/{n}" if directory else n for n in gone)
                self.names = self.names.difference(gone)
        return self.fd, self.names, name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.path = -1, None


@dataclass(slots=True)
class Held:
    """What a host already has of one file, found before any data is sent."""

    #: A status byte (`NEEDED` or `DONE`) per chunk.
    status: bytes
    #: The final path already holds this file (same size and mtime).
    unchanged: bool = False
    #: A part file exists (left by an earlier run, or seeded just now).
    has_part: bool = False
    #: Unchanged, and its mode (and owner, where owners are set) too:
    #: nothing to do, not even a commit.  An unchanged tree of 10,000 small
    #: files cost each node 10,000 commits through the thread pool that
    #: only set what was already set.
    in_place: bool = False


def zero_chunks(manifest: Manifest, entry: Entry) -> bytes:
    """
    The whole chunks of zeros are `DONE` in a fresh part file, which is all
    holes.  A file's last chunk, if shorter, is sent whatever it holds:
    digesting zeros as long as each small file cost a tree of 10,000 of
    them more than sending the few that are zeros would.
    """
    zero = _zeros_digest(manifest.chunk_size)
    status = bytearray(manifest.chunks(entry))
    for chunk in range(entry.size // manifest.chunk_size):
        if entry.chunk_digest(chunk) == zero:
            status[chunk] = DONE
    return bytes(status)


@functools.lru_cache(maxsize=4)
def _zeros_digest(length: int) -> bytes:
    return digest(bytes(length))


def chunks_held(
    fd: int,
    names: frozenset[str],
    name: str,
    manifest: Manifest,
    entry: Entry,
    transfer_id: bytes,
    index: int,
    dry_run: bool = False,
    owner: bool = False,
) -> Held:
    """
    The chunks of ``entry`` (``name`` in the directory open as ``fd``, which
    held ``names`` when it was opened) that need not cross the network: all of them if
    the final path holds the same size and mtime (rsync's quick check);
    otherwise those a part file of this transfer (its ``index``) already holds (a resume),
    the all-zero chunks of a fresh part file, and the chunks the old copy at
    the final path holds at the same offsets, which are copied into the part
    file (an appended log, a disk image with a few changed blocks).
    """
    nchunks = manifest.chunks(entry)
    part_fd = -1
    try:
        final = fsutil.lstat_at(fd, name) if name in names else None
        if final is not None and not stat.S_ISREG(final.st_mode):
            final = None
        if final is not None and (final.st_size, final.st_mtime_ns) == (entry.size, entry.mtime_ns):
            in_place = _metadata_in_place(final, entry, owner)
            return Held(bytes([DONE]) * nchunks, unchanged=True, in_place=in_place)
        part = part_name(transfer_id, index)
        if part in names:
            try:
                part_fd = _reopen_part(fd, part)
            except OSError:
                pass  # not one to resume from (a symlink, a link, not ours): removed
            if part_fd >= 0 and os.fstat(part_fd).st_size != entry.size:
                os.close(part_fd)
                part_fd = -1
            if part_fd < 0 and not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part, dir_fd=fd)
        if part_fd < 0:
            status = bytearray(zero_chunks(manifest, entry))
        else:
            status = bytearray(nchunks)
            for chunk in range(nchunks):
                offset, length = manifest.chunk_span(entry, chunk)
                if digest(os.pread(part_fd, length, offset)) == entry.chunk_digest(chunk):
                    status[chunk] = DONE
        if final is not None and NEEDED in status:
            old_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                for chunk in range(nchunks):
                    offset, length = manifest.chunk_span(entry, chunk)
                    if status[chunk] == DONE or offset + length > final.st_size:
                        continue
                    data = os.pread(old_fd, length, offset)
                    if digest(data) != entry.chunk_digest(chunk):
                        continue
                    if dry_run:
                        status[chunk] = DONE
                        continue
                    if part_fd < 0:
                        part_fd = _create_part(fd, part, entry.size)
                    os.pwrite(part_fd, data, offset)
                    status[chunk] = DONE
            finally:
                os.close(old_fd)
    finally:
        has_part = part_fd >= 0
        if has_part:
            os.close(part_fd)
    return Held(bytes(status), has_part=has_part)


def open_part(root_fd: int, entry: Entry, part: str, create: bool) -> int:
    """
    Make a part file (``create``: all holes, with O_EXCL) or open the one
    this transfer made.  One that should exist is never made afresh: its
    data would be lost zeros behind verified chunks.
    """
    fd, _ = fsutil.open_parent(root_fd, entry.path)
    try:
        return _create_part(fd, part, entry.size) if create else _reopen_part(fd, part)
    finally:
        os.close(fd)


def place_batch(
    root_fd: int, batch: list[tuple[Entry, str, bytearray]], owner: bool, backup_suffix: str = ""
) -> list[bytes | OSError]:
    """
    In a thread: small files, each received whole, made durable together.
    Each whose bytes match the manifest is written to a new part file and
    given its metadata; then the filesystems they are on are synced; then
    each is renamed over its final path, and the filesystems synced again.
    So a crash at any moment leaves each final path with the old file or
    the new one, and a tree of small files pays for two syncs a batch, not
    for one a file: on ext4 fsync(2) of each file in turn waits for that
    file's write alone, and 10,000 files of 1-20 kB took 8-11 s to place
    through it against 2.5 s through syncfs(2), the same as with no sync at
    all (`fsutil.syncfs`).

    Returns, for each file, its bytes' digest (if it is not the manifest's,
    nothing was written for it) or the error that failed it (its part file
    may be left for the caller to discard).
    """
    results: list[bytes | OSError] = []
    directories: dict[str, int] = {}
    # (index in the batch, part file's descriptor, directory, final name, part file's name)
    written: list[tuple[int, int, str, str, str]] = []
    try:
        for entry, part, data in batch:
            got = digest(data)
            results.append(got)
            if got != entry.chunk_digest(0):
                continue
            try:
                directory, _, name = entry.path.rpartition("/")
                if directory not in directories:
                    directories[directory] = fsutil.open_parent(root_fd, entry.path)[0]
                part_fd = _create_part(directories[directory], part, 0)
                written.append((len(results) - 1, part_fd, directory, name, part))
                pwrite_all(part_fd, data, 0)
                set_metadata(part_fd, entry, owner)
            except OSError as e:
                results[-1] = e
        device_of = {directory: os.fstat(fd).st_dev for directory, fd in directories.items()}
        # Every file's bytes durable before any name points at them: a
        # crash after a rename must find the whole file there.
        _sync_filesystems(directories, device_of, written, results)
        for index, _, directory, name, part in written:
            if not isinstance(results[index], OSError):
                try:
                    _rename_over(directories[directory], name, part, backup_suffix)
                except OSError as e:
                    results[index] = e
        _sync_filesystems(directories, device_of, written, results)
    finally:
        for _, part_fd, _, _, _ in written:
            os.close(part_fd)
        for fd in directories.values():
            os.close(fd)
    return results


def _sync_filesystems(
    directories: dict[str, int],
    device_of: dict[str, int],
    written: list[tuple[int, int, str, str, str]],
    results: list[bytes | OSError],
) -> None:
    """
    syncfs(2) once each filesystem that holds one of the ``directories`` (a
    tree may span mounts); a failure fails every file of ``written`` on that
    filesystem that had not failed yet, as no one file can be told from the
    others.
    """
    errors: dict[int, OSError] = {}
    for device, fd in {device_of[d]: fd for d, fd in directories.items()}.items():
        try:
            fsutil.syncfs(fd)
        except OSError as e:
            errors[device] = e
    for index, _, directory, _, _ in written:
        if device_of[directory] in errors and not isinstance(results[index], OSError):
            results[index] = errors[device_of[directory]]


def pwrite_all(fd: int, data: bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        # A short write (the disk just filled) is followed by one that says why.
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.EIO, "no progress writing")
        view, offset = view[written:], offset + written


def digest_range(root_fd: int, path: str, part: str, offset: int, length: int) -> bytes:
    fd, _ = fsutil.open_parent(root_fd, path, create=False)
    try:
        part_fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        return digest(os.pread(part_fd, length, offset))
    finally:
        os.close(part_fd)


def discard_part(root_fd: int, path: str, part: str) -> None:
    try:
        fd, _ = fsutil.open_parent(root_fd, path, create=False)
    except OSError:
        return
    try:
        os.unlink(part, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def place_file(
    root_fd: int,
    entry: Entry,
    part: str,
    part_fd: int | None,
    owner: bool,
    unchanged: bool = False,
    backup_suffix: str = "",
    has_part: bool = False,
) -> None:
    """
    fsync, set metadata and rename a verified part file over its final path;
    for a file that is already there, only set its metadata.  A backup is a
    second link to the old file, made before the rename, so the final path
    is never empty.
    """
    if unchanged:
        fd, name = fsutil.open_parent(root_fd, entry.path)
        try:
            final_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            set_metadata(final_fd, entry, owner)
        finally:
            os.close(final_fd)
        return
    if part_fd is None:
        part_fd = open_part(root_fd, entry, part, create=not has_part)
    try:
        os.fsync(part_fd)
        set_metadata(part_fd, entry, owner)
    finally:
        os.close(part_fd)
    fd, name = fsutil.open_parent(root_fd, entry.path)
    try:
        _rename_over(fd, name, part, backup_suffix)
    finally:
        os.close(fd)


def _rename_over(fd: int, name: str, part: str, backup_suffix: str) -> None:
    """The part file takes the final name, the old file first linked to its backup name if asked."""
    if backup_suffix and (old := fsutil.lstat_at(fd, name)) is not None and stat.S_ISREG(old.st_mode):
        backup = name + backup_suffix
        if (held := fsutil.lstat_at(fd, backup)) is not None and not stat.S_ISDIR(held.st_mode):
            os.unlink(backup, dir_fd=fd)
        os.link(name, backup, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
    os.rename(part, name, src_dir_fd=fd, dst_dir_fd=fd)


def would_delete(
    root_fd: int, manifest: Manifest, backup_suffix: str, protect: tuple[str, ...] = ()
) -> list[str]:
    """What a transfer with ``delete`` would remove (or rename aside); ``root_fd`` -1: nothing is there."""
    if root_fd < 0:
        return []
    return _delete_extraneous(root_fd, manifest, backup_suffix, protect, dry_run=True)[0]


def _delete_extraneous(
    root_fd: int,
    manifest: Manifest,
    backup_suffix: str,
    protect: tuple[str, ...] = (),
    dry_run: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """
    Remove (or, with backups, rename aside) what the directories a transfer
    sends hold but the source does not.  Part files of transfers in flight,
    earlier backups and what the job's excludes match are left alone.  A
    dry run only lists them, and a directory it would make holds nothing.
    """
    children: dict[str, set[str]] = {}
    for entry in manifest.entries:
        parent, _, name = entry.path.rpartition("/")
        children.setdefault(parent, set()).add(name)
    synced = [e.path for e in manifest.entries if e.kind == DIR] + ([""] if manifest.contents else [])
    deleted: list[str] = []
    errors: dict[str, str] = {}
    for directory in synced:
        try:
            if directory:
                parent_fd, name = fsutil.open_parent(root_fd, directory, create=False)
                try:
                    fd = os.open(name, fsutil.DIR_FLAGS, dir_fd=parent_fd)
                finally:
                    os.close(parent_fd)
            else:
                fd = os.dup(root_fd)
        except OSError as e:
            if not (dry_run and isinstance(e, FileNotFoundError)):  # a dry run's new directory
                errors[directory or "."] = f"cannot list for deletion: {e.strerror or e}"
            continue
        try:
            for name in sorted(os.listdir(fd)):
                if name in children.get(directory, ()) or name.startswith(RESERVED_PREFIX):
                    continue
                if backup_suffix and name.endswith(backup_suffix):
                    continue
                path = f"{directory}/{name}" if directory else name
                _delete(fd, name, path, protect, backup_suffix, dry_run, deleted, errors)
        finally:
            os.close(fd)
    return deleted, errors


def _delete(
    fd: int,
    name: str,
    path: str,
    protect: tuple[str, ...],
    backup_suffix: str,
    dry_run: bool,
    deleted: list[str],
    errors: dict[str, str],
) -> bool:
    """
    Remove ``name`` (``path`` beneath the destination) unless the rules
    protect it; whether it is gone.  Under rules, a directory goes only
    once what they protect inside it, or a part file, is not in it: rsync
    keeps ``app/data/db.bin`` under ``- *`` though ``data/`` itself is not
    protected, and so does this.
    """
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if excluded(path, protect, stat.S_ISDIR(st.st_mode)):
            return False
        if stat.S_ISDIR(st.st_mode) and protect and not backup_suffix:
            inner = os.open(name, fsutil.DIR_FLAGS, dir_fd=fd)
            try:
                gone = [
                    not child.startswith(RESERVED_PREFIX)
                    and _delete(inner, child, f"{path}/{child}", protect, "", dry_run, deleted, errors)
                    for child in sorted(os.listdir(inner))
                ]
            finally:
                os.close(inner)
            if not all(gone):
                return False
            if not dry_run:
                os.rmdir(name, dir_fd=fd)
        elif dry_run:
            pass
        elif backup_suffix:
            os.rename(name, name + backup_suffix, src_dir_fd=fd, dst_dir_fd=fd)
        elif stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)
        deleted.append(path)
        return True
    except OSError as e:
        errors[path] = f"cannot delete: {e.strerror or e}"
        return False


def without_setid(manifest: Manifest) -> Manifest:
    """
    The manifest with no set-user-ID or set-group-ID bit on a file: what a
    node writes unless it sets owners and its config allows them.  (A
    directory's set-group-ID bit only passes its group on to new entries,
    and grants nothing; it stays.)
    """
    setid = stat.S_ISUID | stat.S_ISGID
    if not any(e.kind == FILE and e.mode & setid for e in manifest.entries):
        return manifest
    entries = [replace(e, mode=e.mode & ~setid) if e.kind == FILE else e for e in manifest.entries]
    return replace(manifest, entries=entries)


def set_metadata(fd: int, entry: Entry, owner: bool) -> None:
    """Owner first: changing it clears set-id bits that chmod then restores."""
    if owner:
        os.fchown(fd, entry.uid, entry.gid)
    os.fchmod(fd, entry.mode)
    os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def finish_tree(
    root_fd: int,
    manifest: Manifest,
    results: dict[str, str],
    owner: bool,
    delete: bool = False,
    backup_suffix: str = "",
    protect: tuple[str, ...] = (),
) -> tuple[dict[str, str], list[str]]:
    """
    Delete what the source does not have (if asked), make symlinks and
    hardlinks (once their files are in place), then give directories their
    modes and mtimes, deepest first, since making entries inside a directory
    changes its mtime.  Returns the results and the paths changed.
    """
    changed: list[str] = []
    done: dict[str, str] = {}
    if delete:
        changed, done = _delete_extraneous(root_fd, manifest, backup_suffix, protect)
    for entry in manifest.entries:
        if entry.kind not in (SYMLINK, HARDLINK):
            continue
        if entry.kind == HARDLINK and results.get(entry.target) != OK:
            done[entry.path] = f"link target {entry.target!r} was not received"
            continue
        try:
            if _place_link(root_fd, entry, owner):
                changed.append(entry.path)
            done[entry.path] = OK
        except OSError as e:
            done[entry.path] = f"cannot link: {e.strerror or e}"
    for entry in sorted(
        (e for e in manifest.entries if e.kind == DIR), key=lambda e: e.path.count("/"), reverse=True
    ):
        try:
            fd, name = fsutil.open_parent(root_fd, entry.path)
            try:
                # Swapped for a symlink while the transfer ran: say so (chmod
                # of a symlink raises ValueError, not OSError).
                st = fsutil.lstat_at(fd, name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise fsutil.UnsafePath(errno.ENOTDIR, f"{entry.path!r} is no longer a directory")
                # Set again, they would dirty the directory, and its fsync
                # would commit the journal: 100 directories cost a node
                # 0.16 s of every unchanged push of T's tree on ext4.
                if not _metadata_in_place(st, entry, owner):
                    if owner:
                        os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
                    os.chmod(name, entry.mode, dir_fd=fd, follow_symlinks=False)
                    os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
                own = os.open(name, fsutil.DIR_FLAGS, dir_fd=fd)
                try:
                    os.fsync(own)
                finally:
                    os.close(own)
            finally:
                os.close(fd)
            done[entry.path] = OK
        except (OSError, NotImplementedError, ValueError) as e:
            done[entry.path] = f"cannot set metadata: {getattr(e, 'strerror', None) or e}"
    os.fsync(root_fd)
    return done, changed


def _metadata_in_place(st: os.stat_result, entry: Entry, owner: bool) -> bool:
    """
    Mode, mtime and (where owners are set) owner already as the manifest
    has them: setting them again would still change the inode's ctime,
    which a sync must then write.
    """
    return (
        stat.S_IMODE(st.st_mode) == stat.S_IMODE(entry.mode)
        and st.st_mtime_ns == entry.mtime_ns
        and (not owner or (st.st_uid, st.st_gid) == (entry.uid, entry.gid))
    )


def _link_in_place(fd: int, name: str, root_fd: int, entry: Entry, owner: bool) -> bool:
    """Is the link already there as the manifest has it?  (Its metadata is then set.)"""
    st = fsutil.lstat_at(fd, name)
    if st is None:
        return False
    if entry.kind == SYMLINK:
        if not stat.S_ISLNK(st.st_mode) or os.readlink(name, dir_fd=fd) != entry.target:
            return False
        if owner:
            os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
        return True
    target_fd, target_name = fsutil.open_parent(root_fd, entry.target, create=False)
    try:
        target = fsutil.lstat_at(target_fd, target_name)
    finally:
        os.close(target_fd)
    return target is not None and (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


def _place_link(root_fd: int, entry: Entry, owner: bool) -> bool:
    """Make a symlink or hardlink; False if it was already in place."""
    fd, name = fsutil.open_parent(root_fd, entry.path)
    temporary = (
        f"{RESERVED_PREFIX}link-{os.getpid()}-{digest(name.encode('utf-8', 'surrogateescape'))[:8].hex()}"
    )
    try:
        if _link_in_place(fd, name, root_fd, entry, owner):
            return False
        if entry.kind == SYMLINK:
            os.symlink(entry.target, temporary, dir_fd=fd)
            if owner:
                os.chown(temporary, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
            os.utime(temporary, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
        else:
            target_fd, target_name = fsutil.open_parent(root_fd, entry.target, create=False)
            try:
                os.link(target_name, temporary, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(target_fd)
        os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        if entry.kind == HARDLINK:
            # rename() does nothing when both names already link to one
            # inode (the link is in place from an earlier run): the
            # temporary name would be left behind.
            try:
                os.unlink(temporary, dir_fd=fd)
            except FileNotFoundError:
                pass
        return True
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=fd)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
