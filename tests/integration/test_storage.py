"""
Small files placed together (`storage.place_batch`), on a real filesystem:
what matches goes in place whole, what does not is never written, a file
that fails fails alone, and every part file is synced before any rename.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from pathlib import Path

import pytest

from mrsyncd.engine import fsutil, storage
from mrsyncd.engine.storage import part_name
from mrsyncd.wire.manifest import DIR, FILE, Entry, Manifest
from mrsyncd.wire.manifest import digest as chunk_digest
from tests.support import part_files, write_file

TID = b"\x07" * 8
INDEXES = itertools.count()


def small(path: str, data: bytes) -> tuple[Entry, str, bytearray]:
    """A file of one chunk as a batch holds it: its entry, its part file's name, its bytes."""
    entry = Entry(path, FILE, 0o640, 10**18, size=len(data), digests=chunk_digest(data))
    return entry, part_name(TID, next(INDEXES)), bytearray(data)


@pytest.fixture
def root(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def test_a_batch_places_what_matches_and_only_that(root) -> None:
    top, fd = root
    write_file(str(top / "a" / "old"), b"the old file")
    good_a, good_b, replacing = small("a/x", b"x" * 3000), small("b/y", b"y" * 10), small("a/old", b"new")
    forged = small("b/forged", b"what the manifest says")
    forged[2][:] = b"what arrived instead!!"
    results = storage.place_batch(fd, [good_a, forged, good_b, replacing], owner=False, backup_suffix="~")
    assert results[0] == chunk_digest(b"x" * 3000) and results[2] == chunk_digest(b"y" * 10)
    assert results[1] == chunk_digest(b"what arrived instead!!")
    assert (top / "a" / "x").read_bytes() == b"x" * 3000
    assert (top / "b" / "y").read_bytes() == b"y" * 10
    assert (top / "a" / "old").read_bytes() == b"new" and (top / "a" / "old~").read_bytes() == b"the old file"
    assert not (top / "b" / "forged").exists()
    st = os.stat(top / "a" / "x")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 10**18)
    assert part_files(str(top)) == []


def test_a_file_that_cannot_be_placed_fails_alone(root) -> None:
    top, fd = root
    doomed = small("c/z", b"z" * 100)
    (top / "c").write_bytes(b"a file where its directory should be")
    good = small("a/x", b"x" * 100)
    results = storage.place_batch(fd, [doomed, good], owner=False)
    assert isinstance(results[0], OSError) and results[1] == chunk_digest(b"x" * 100)
    assert (top / "a" / "x").read_bytes() == b"x" * 100
    assert (top / "c").read_bytes() == b"a file where its directory should be"


def test_every_part_file_is_synced_before_any_is_renamed(root, monkeypatch) -> None:
    """
    One syncfs for the whole batch's files, then the renames, then one for
    the renames: a rename between two syncs would make the second commit
    the journal again.
    """
    top, fd = root
    calls: list[str] = []
    real_syncfs, real_rename = fsutil.syncfs, os.rename

    def syncfs(descriptor: int) -> None:
        calls.append("syncfs")
        real_syncfs(descriptor)

    def rename(*args, **kwargs) -> None:
        calls.append("rename")
        real_rename(*args, **kwargs)

    monkeypatch.setattr(fsutil, "syncfs", syncfs)
    monkeypatch.setattr(storage.os, "rename", rename)
    batch = [small(f"{d}/f{n}", bytes([n]) * 50) for d in ("a", "b") for n in range(3)]
    results = storage.place_batch(fd, batch, owner=False)
    assert all(isinstance(r, bytes) for r in results)
    # Both directories are on one filesystem: synced once before the six renames, once after.
    assert calls == ["syncfs"] + ["rename"] * 6 + ["syncfs"]
    assert sorted(p.name for p in (top / "a").iterdir()) == ["f0", "f1", "f2"]


def test_a_batch_whose_sync_fails_renames_nothing(root, monkeypatch) -> None:
    """An error of syncfs cannot be pinned on one file, so every file of that filesystem fails."""
    top, fd = root
    write_file(str(top / "a" / "kept"), b"the old file")

    def syncfs(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fsutil, "syncfs", syncfs)
    results = storage.place_batch(fd, [small("a/kept", b"new"), small("b/y", b"y" * 10)], owner=False)
    assert [r.errno for r in results if isinstance(r, OSError)] == [5, 5]
    assert (top / "a" / "kept").read_bytes() == b"the old file" and not (top / "b" / "y").exists()


def test_syncfs_reports_its_error() -> None:
    with pytest.raises(OSError) as raised:
        fsutil.syncfs(-1)
    assert raised.value.errno == errno.EBADF


def test_a_survey_removes_only_stale_part_files_of_transfers_not_in_flight(root) -> None:
    """Leftovers of failed jobs go with the next transfer to their directory; nothing else does."""
    top, fd = root
    entry, _, data = small("a/new", b"n" * 100)
    manifest = Manifest([Entry("a", DIR, 0o755, 10**18), entry], chunk_size=1 << 20)
    old = storage.STALE_PART_SECONDS + 60
    in_flight, ours = b"\x01" * 8, TID
    parts = {
        "stale": part_name(b"\x02" * 8, 3),
        "fresh": part_name(b"\x03" * 8, 3),
        "in flight": part_name(in_flight, 3),
        "ours": part_name(ours, 9),
        "linked": part_name(b"\x04" * 8, 3),
    }
    for label, name in parts.items():
        write_file(str(top / "a" / name), label.encode())
        if label != "fresh":
            os.utime(top / "a" / name, (0, os.stat(top / "a" / name).st_mtime - old))
    os.link(top / "a" / parts["linked"], top / "b" / "another-name")
    os.symlink("/etc/passwd", top / "a" / part_name(b"\x05" * 8, 1))
    os.utime(top / "a" / part_name(b"\x05" * 8, 1), (1, 1), follow_symlinks=False)

    # A dry run removes nothing.
    dry = storage.Sweep(frozenset({in_flight, ours}))
    storage.survey(fd, manifest, ours, dry_run=True, sweep=dry)
    assert dry.removed == [] and (top / "a" / parts["stale"]).exists()

    sweep = storage.Sweep(frozenset({in_flight, ours}))
    found = storage.survey(fd, manifest, ours, sweep=sweep)
    assert sweep.removed == [f"a/{parts['stale']}"]
    left = sorted(os.listdir(top / "a"))
    assert left == sorted([*(n for label, n in parts.items() if label != "stale"), part_name(b"\x05" * 8, 1)])
    assert isinstance(found[1], storage.Held)


@pytest.mark.parametrize(
    ("caps", "may"),
    [
        ("000001fffeffffff", True),
        ("0000000000000009", True),
        ("0000000000000001", False),
        ("8", False),
        ("0", False),
    ],
)
def test_owners_are_set_by_whoever_holds_cap_chown_and_cap_fowner_root_or_not(
    tmp_path, caps: str, may: bool
) -> None:
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython3\nUid:\t65534\t65534\t65534\t65534\nCapEff:\t{caps}\n")
    assert fsutil.may_set_owners.__wrapped__(str(status)) is may


def test_delete_keeps_inside_an_unwanted_directory_what_the_rules_protect(root) -> None:
    """As rsync: ``+ */ + *.conf - *`` with --delete removes the stray .conf files, never db.bin."""
    top, fd = root
    for rel in ("app/data/db.bin", "app/data/x.conf", "app/old.conf", "app/gone/y.conf"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(str(top / rel), rel.encode())
    entry, _, _ = small("app/a.conf", b"conf")
    manifest = Manifest([Entry("app", DIR, 0o755, 10**18), entry], chunk_size=1 << 20)
    rules = ("+ */", "+ *.conf", "- *")
    assert storage.would_delete(fd, manifest, "", rules) == [
        "app/data/x.conf",
        "app/gone/y.conf",
        "app/gone",
        "app/old.conf",
    ]
    assert (top / "app" / "old.conf").exists(), "a dry run deleted something"
    _, changed = storage.finish_tree(
        fd, manifest, {"app/a.conf": storage.OK}, False, delete=True, protect=rules
    )
    assert sorted(changed) == ["app/data/x.conf", "app/gone", "app/gone/y.conf", "app/old.conf"]
    assert sorted(str(p.relative_to(top)) for p in (top / "app").rglob("*")) == [
        "app/data",
        "app/data/db.bin",
    ]
    # Without rules a stray directory goes whole, as before.
    write_file(str(top / "app" / "data" / "x.conf"), b"x")
    storage.finish_tree(fd, manifest, {"app/a.conf": storage.OK}, False, delete=True)
    assert not (top / "app" / "data").exists()


def test_the_end_of_a_tree_sets_only_directories_that_differ(root) -> None:
    """
    A directory that already has its mode and mtime is left alone (setting
    them again changes its ctime, and its fsync must then commit the
    journal), one that differs gets them.
    """
    top, fd = root
    (top / "a" / "deep").mkdir()
    os.chmod(top / "a", 0o750)
    os.utime(top / "a", ns=(10**18, 10**18))
    entries = [
        Entry("a", DIR, 0o750, 10**18),
        Entry("a/deep", DIR, 0o700, 2 * 10**18),
        Entry("b", DIR, 0o711, 10**18),
    ]
    untouched = os.stat(top / "a").st_ctime_ns
    done, _ = storage.finish_tree(fd, Manifest(entries), {}, owner=False)
    assert done == {"a": storage.OK, "a/deep": storage.OK, "b": storage.OK}
    assert os.stat(top / "a").st_ctime_ns == untouched
    for path, mode, mtime in (("a/deep", 0o700, 2 * 10**18), ("b", 0o711, 10**18)):
        st = os.stat(top / path)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (mode, mtime)
