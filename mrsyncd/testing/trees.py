"""
Whether two trees hold the same thing: names, kinds, bytes (holes or not),
symlink targets, modes, mtimes and hard links.  Every tier of the tests, the
lab's clusters and the demo compare copies with it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat


def file_digest(path: str) -> tuple[int, str]:
    """Size and digest of a file, read a MiB at a time."""
    h = hashlib.blake2b()
    size = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(1 << 20)
            if not data:
                break
            size += len(data)
            h.update(data)
    return size, h.hexdigest()


GRID = 1 << 20


def sparse_digest(path: str) -> tuple[int, str]:
    """
    The digest of a file's contents that reads only its data extents: the
    file is cut into 1 MiB blocks on a fixed grid, and every block that is
    not all zeros is digested with its position.  Two files with the same
    size and contents give the same value however their holes are laid out,
    since a block never visited lies wholly in holes and reads as zeros.
    """
    h = hashlib.blake2b()
    zero = bytes(GRID)
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "big"))
        last = -1
        offset = 0
        while offset < size:
            try:
                data_start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            data_end = os.lseek(fd, data_start, os.SEEK_HOLE)
            block = max(data_start // GRID, last + 1)
            while block * GRID < data_end:
                data = os.pread(fd, GRID, block * GRID)
                if data != zero[: len(data)]:
                    h.update(block.to_bytes(8, "big"))
                    h.update(data)
                last = block
                block += 1
            offset = data_end
    return size, h.hexdigest()


def tree_entries(root: str) -> dict[str, os.stat_result]:
    """lstat of every entry beneath ``root`` by relative path (root itself excluded)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = os.lstat(path)
    return found


def part_files(root: str) -> list[str]:
    return sorted(rel for rel in tree_entries(root) if os.path.basename(rel).startswith(".mrsync-"))


def assert_same_tree(testcase, src: str, dst: str, sparse: bool = False) -> None:
    """
    ``dst`` holds exactly what ``src`` holds: the same names and kinds,
    byte-identical files, the same symlink targets, modes and mtimes (by
    lstat, so symlinks are compared themselves), and hardlinks that share an
    inode where the source's do.
    """
    want = tree_entries(src)
    got = tree_entries(dst)
    testcase.assertEqual(sorted(got), sorted(want))
    src_groups: dict[tuple[int, int], list[str]] = {}
    for rel, s in sorted(want.items()):
        d = got[rel]
        testcase.assertEqual(stat.S_IFMT(d.st_mode), stat.S_IFMT(s.st_mode), rel)
        testcase.assertEqual(d.st_mtime_ns, s.st_mtime_ns, f"mtime of {rel}")
        if stat.S_ISLNK(s.st_mode):
            testcase.assertEqual(
                os.readlink(os.path.join(dst, rel)), os.readlink(os.path.join(src, rel)), rel
            )
            continue
        testcase.assertEqual(oct(stat.S_IMODE(d.st_mode)), oct(stat.S_IMODE(s.st_mode)), f"mode of {rel}")
        if stat.S_ISREG(s.st_mode):
            testcase.assertEqual(d.st_size, s.st_size, rel)
            summary = sparse_digest if sparse else file_digest
            testcase.assertEqual(summary(os.path.join(dst, rel)), summary(os.path.join(src, rel)), rel)
            src_groups.setdefault((s.st_dev, s.st_ino), []).append(rel)
    for paths in src_groups.values():
        inodes = {(got[p].st_dev, got[p].st_ino) for p in paths}
        testcase.assertEqual(len(inodes), 1, f"{paths} should share an inode")
        testcase.assertEqual(got[paths[0]].st_nlink, len(paths), paths)
    # Files that are distinct in the source are distinct in the destination.
    dst_inodes = [(got[p[0]].st_dev, got[p[0]].st_ino) for p in src_groups.values()]
    testcase.assertEqual(len(set(dst_inodes)), len(dst_inodes))
