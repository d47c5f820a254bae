"""Path checks, manifest parsing from the network, and scanning a tree."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import stat
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mrsyncd.wire import manifest
from mrsyncd.wire.blockset import RangeSet
from mrsyncd.wire.manifest import (
    DIGEST_SIZE,
    DIR,
    FILE,
    HARDLINK,
    NAME_MAX,
    PATH_MAX,
    ROW,
    SYMLINK,
    Entry,
    Manifest,
    ManifestError,
    check_path,
    default_chunk_size,
    digest,
    file_digests,
    scan,
)

# check_path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/etc/passwd",
        "//x",
        "..",
        "../x",
        "a/..",
        "a/../b",
        ".",
        "./a",
        "a/.",
        "a/./b",
        "a//b",
        "a/",
        "a/b/",
        "a\0b",
        "\0",
        "x" * (NAME_MAX + 1),
        "a/" + "x" * (NAME_MAX + 1) + "/b",
        "é" * 128,  # 256 bytes in UTF-8
        "/".join(["x" * 200] * 21),  # > PATH_MAX
        "a/" * 2048 + "b",  # 4097 bytes
        "\ud800",  # a lone surrogate cannot name a file
    ],
)
def test_check_path_refuses(path):
    with pytest.raises(ManifestError):
        check_path(path)


def test_path_max_boundary():
    names = ["x" * 255] * 16  # 16 * 256 - 1 = 4095 bytes
    longest = "/".join(names)
    assert len(longest) == PATH_MAX - 1
    check_path(longest)
    with pytest.raises(ManifestError):
        check_path(longest + "y")
    with pytest.raises(ManifestError):
        check_path("é" * 2048)  # 2048 characters, 4096 bytes


@pytest.mark.parametrize(
    "path",
    [
        "a",
        "a/b/c",
        "...",
        "..a",
        "a..",
        ".hidden",
        "a/.b/..c",
        "with space/and\ttab",
        "back\\slash",
        "x" * NAME_MAX,
        "é" * 127,
        "ünïcødé/ファイル",
        "\udcff\udc80",  # a non-UTF-8 name as os.fsdecode gives it
        "-rf",
        "~",
    ],
)
def test_check_path_accepts(path):
    check_path(path)


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
            min_size=1,
            max_size=20,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_check_path_accepts_normal_names(parts):
    path = "/".join(parts)
    if any(p in (".", "..") for p in parts):
        with pytest.raises(ManifestError):
            check_path(path)
    else:
        check_path(path)


@given(st.text(max_size=60))
def test_check_path_is_total(path):
    """Any string is accepted or refused with ManifestError, nothing else."""
    try:
        check_path(path)
    except ManifestError:
        return
    assert path and not path.startswith("/") and "\0" not in path
    assert all(p not in ("", ".", "..") for p in path.split("/"))
    assert os.path.normpath(path) == path


# Manifest.from_bytes


def sample_manifest() -> Manifest:
    m = Manifest([], block_size=16, chunk_size=64)
    m.entries = [
        Entry("d", DIR, 0o755, 10),
        Entry("d/f", FILE, 0o644, 11, 1000, 1000, 100, digests=b"\1" * (2 * DIGEST_SIZE)),
        Entry("d/empty", FILE, 0o600, -5, size=0),
        Entry("d/l", SYMLINK, 0o777, 12, target="/etc/passwd"),
        Entry("h", HARDLINK, 0o644, 11, target="d/f"),
    ]
    return m


def doc_of(m: Manifest) -> dict:
    """
    A manifest's JSON document, with each entry's digests under
    ``"_digests"`` (they travel after the JSON, in order) to spoil one by one.
    """
    head, _, digests = m.to_bytes().partition(b"\n")
    doc = json.loads(head)
    doc["_digests"] = [e.digests for e in m.entries]
    assert b"".join(doc["_digests"]) == digests
    return doc


def parse(doc) -> Manifest:
    doc = dict(doc)
    digests = b"".join(doc.pop("_digests"))
    if doc.pop("_no_digests", False):
        return Manifest.from_bytes(json.dumps(doc).encode())
    return Manifest.from_bytes(json.dumps(doc).encode() + b"\n" + digests)


def test_round_trip():
    m = sample_manifest()
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m
    assert again.entries[1].digests == b"\1" * 64
    assert again.chunks(again.entries[1]) == 2
    assert again.blocks(again.entries[1]) == 7
    assert again.block_length(again.entries[1], 6) == 4
    assert again.chunk_span(again.entries[1], 1) == (64, 36)
    assert again.total_bytes() == 100
    assert [i for i, _ in again.files()] == [1, 2]


def test_every_field_of_an_entry_crosses_the_wire():
    """`Manifest.to_bytes` names the fields one by one: a new one must be named there too."""
    [record] = doc_of(Manifest([Entry("a", FILE, 0o644, 1, uid=2, gid=3, size=0)]))["entries"]
    assert len(record) == len(ROW)
    assert {*ROW, "digests"} == {f.name for f in dataclasses.fields(Entry)}


entry_text = st.text(alphabet="abc.é", min_size=1, max_size=6)


@given(
    st.lists(
        st.tuples(entry_text, st.integers(0, 0o7777), st.integers(-(2**63), 2**63 - 1), st.integers(0, 300)),
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_round_trip_property(records):
    m = Manifest([], block_size=8, chunk_size=32)
    for name, mode, mtime, size in records:
        if name in (".", ".."):
            continue
        e = Entry(name, FILE, mode, mtime, size=size)
        e.digests = b"\7" * (m.chunks(e) * DIGEST_SIZE)
        m.entries.append(e)
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_default_chunk_size():
    m = Manifest([])
    assert m.chunk_size == default_chunk_size(m.block_size)
    assert m.chunk_size % m.block_size == 0
    assert (1 << 20) - m.block_size < m.chunk_size <= 1 << 20


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"not json", b"\xff\xfe", b"[]", b"null", b"42", b'"x"', b'{"format": 2}', b"{}"],
)
def test_refuses_bad_json(data):
    with pytest.raises(ManifestError):
        Manifest.from_bytes(data)


def mutations():
    """(description, function that spoils a good manifest document)."""

    def top(key, value):
        def f(doc):
            doc[key] = value

        return f

    def field(index, key, value):
        def f(doc):
            doc["entries"][index][ROW.index(key)] = value

        return f

    def drop(index, key):
        def f(doc):
            del doc["entries"][index][ROW.index(key)]

        return f

    def digests(index, n):
        def f(doc):
            doc["_digests"][index] = b"\1" * (n * DIGEST_SIZE)

        return f

    def cut_digests(doc):
        doc["_digests"][1] = doc["_digests"][1][:-1]

    def no_digests(doc):
        doc["_no_digests"] = True

    def append(entry):
        def f(doc):
            doc["entries"].append(entry)

        return f

    def reorder(doc):
        # The hardlink before the file it links to.
        doc["entries"].insert(0, doc["entries"].pop())
        doc["_digests"].insert(0, doc["_digests"].pop())

    file_record = ["x", "file", 420, 0, 0, 0, 0, ""]
    return [
        ("format bool", top("format", True)),
        ("format missing", top("format", None)),
        ("block_size bool", top("block_size", True)),
        ("block_size zero", top("block_size", 0)),
        ("block_size float", top("block_size", 16.0)),
        ("block_size too big", top("block_size", 100000)),
        ("chunk_size not multiple", top("chunk_size", 65)),
        ("chunk_size below block", top("chunk_size", 8)),
        ("chunk_size string", top("chunk_size", "64")),
        ("entries not a list", top("entries", {})),
        ("entry not a row", append([1, 2])),
        ("entry an object", append(dict(zip(ROW, file_record, strict=True)))),
        ("entry a row too long", append([*file_record, ""])),
        ("too few digests", digests(1, 1)),
        ("too many digests", digests(1, 3)),
        ("digests on empty file", digests(2, 1)),
        ("digests cut short", cut_digests),
        ("no digests after the entries", no_digests),
        ("duplicate path", field(2, "path", "d/f")),
        ("duplicate dir", append(["d", "dir", 493, 0, 0, 0, 0, ""])),
        ("hardlink to later file", reorder),
        ("hardlink to missing", field(4, "target", "nope")),
        ("hardlink to dir", field(4, "target", "d")),
        ("hardlink to symlink", field(4, "target", "d/l")),
        ("hardlink to itself", field(4, "target", "h")),
        ("hardlink to bad path", field(4, "target", "../d/f")),
        ("hardlink with size", field(4, "size", 100)),
        ("symlink empty target", field(3, "target", "")),
        ("symlink NUL target", field(3, "target", "a\0b")),
        ("symlink target not a string", field(3, "target", ["x"])),
        ("dir with size", field(0, "size", 1)),
        ("dir with digests", digests(0, 1)),
        ("unknown kind", field(0, "kind", "fifo")),
        ("kind not a string", field(0, "kind", ["dir"])),
        ("path absolute", field(0, "path", "/d")),
        ("path dotdot", field(1, "path", "d/../f")),
        ("path of a part file", field(1, "path", "d/.mrsync-00112233aabbccdd-1.part")),
        ("path not a string", field(0, "path", 5)),
        ("path missing", drop(0, "path")),
        ("mode bool", field(0, "mode", True)),
        ("mode too big", field(0, "mode", 0o10000)),
        ("mode negative", field(0, "mode", -1)),
        ("mode float", field(0, "mode", 493.0)),
        ("mode string", field(0, "mode", "493")),
        ("mode missing", drop(0, "mode")),
        ("mtime bool", field(1, "mtime_ns", False)),
        ("mtime too big", field(1, "mtime_ns", 2**63)),
        ("mtime missing", drop(1, "mtime_ns")),
        ("uid bool", field(1, "uid", True)),
        ("uid negative", field(1, "uid", -1)),
        ("gid too big", field(1, "gid", 2**32)),
        ("size bool", field(1, "size", True)),
        ("size negative", field(1, "size", -1)),
        ("size float", field(1, "size", 100.0)),
        ("lone surrogate path", append(["\ud800", *file_record[1:]])),
    ]


@pytest.mark.parametrize("name, spoil", mutations(), ids=[n for n, _ in mutations()])
def test_refuses_bad_manifest(name, spoil):
    doc = doc_of(sample_manifest())
    parse(doc)  # the unspoilt document is fine
    spoil(doc)
    with pytest.raises(ManifestError):
        parse(doc)


@given(st.binary(max_size=200))
def test_from_bytes_garbage_raises_only_manifest_error(data):
    try:
        Manifest.from_bytes(data)
    except ManifestError:
        pass


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.data())
def test_from_bytes_random_fields_raise_only_manifest_error(data):
    """Any JSON in any field of a good manifest is parsed or refused cleanly."""
    doc = doc_of(sample_manifest())
    index = data.draw(st.integers(0, len(doc["entries"]) - 1))
    position = data.draw(st.integers(0, len(ROW) - 1))
    doc["entries"][index][position] = data.draw(json_values)
    try:
        parse(doc)
    except ManifestError:
        pass


# scan


def build_tree(root):
    os.makedirs(os.path.join(root, "top", "sub", "deep"))
    os.makedirs(os.path.join(root, "top", "emptydir"))
    with open(os.path.join(root, "top", "empty"), "wb"):
        pass
    with open(os.path.join(root, "top", "sub", "data"), "wb") as f:
        f.write(bytes(range(256)) * 1)  # 256 bytes: 4 chunks of 64
    with open(os.path.join(root, "top", "sub", "deep", "tail"), "wb") as f:
        f.write(b"z" * 70)  # 2 chunks, the last short
    os.chmod(os.path.join(root, "top", "sub", "data"), 0o640)
    os.symlink("../../elsewhere", os.path.join(root, "top", "sub", "link"))
    os.symlink("sub", os.path.join(root, "top", "dirlink"))  # a link to a dir is not followed
    os.link(os.path.join(root, "top", "sub", "data"), os.path.join(root, "top", "zhard"))
    os.utime(os.path.join(root, "top", "sub", "deep", "tail"), ns=(123456789012345678, 123456789012345678))


def test_scan_refuses_the_names_kept_for_part_files(tmp_path):
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / ".mrsync-notes").write_text("mine")
    with pytest.raises(ManifestError, match=r"'d/\.mrsync-notes': names beginning .mrsync- are kept"):
        scan([str(tmp_path / "src") + "/"])


def test_scan_kinds_and_contents(tmp_path):
    root = str(tmp_path)
    build_tree(root)
    m, local = scan([os.path.join(root, "top")], block_size=16, chunk_size=64)
    by_path = {e.path: e for e in m.entries}
    assert [e.path for e in m.entries] == [
        "top",
        "top/dirlink",
        "top/empty",
        "top/emptydir",
        "top/sub",
        "top/zhard",
        "top/sub/data",
        "top/sub/deep",
        "top/sub/link",
        "top/sub/deep/tail",
    ]
    kinds = {p: e.kind for p, e in by_path.items()}
    assert kinds == {
        "top": DIR,
        "top/dirlink": SYMLINK,
        "top/empty": FILE,
        "top/emptydir": DIR,
        "top/sub": DIR,
        "top/zhard": FILE,
        "top/sub/data": HARDLINK,
        "top/sub/deep": DIR,
        "top/sub/link": SYMLINK,
        "top/sub/deep/tail": FILE,
    }
    # The first name of a hardlinked inode is the file, later ones link to it.
    assert by_path["top/sub/data"].target == "top/zhard"
    assert by_path["top/sub/data"].size == 0 and by_path["top/sub/data"].digests == b""
    assert by_path["top/dirlink"].target == "sub"
    assert by_path["top/sub/link"].target == "../../elsewhere"
    assert by_path["top/empty"].size == 0 and by_path["top/empty"].digests == b""
    zhard = by_path["top/zhard"]
    assert zhard.size == 256 and zhard.mode == 0o640
    assert zhard.digests == b"".join(digest(bytes(range(256))[i : i + 64]) for i in range(0, 256, 64))
    tail = by_path["top/sub/deep/tail"]
    assert tail.digests == digest(b"z" * 64) + digest(b"z" * 6)
    assert tail.mtime_ns == 123456789012345678
    for e in m.entries:
        st_ = os.lstat(os.path.join(root, e.path))
        assert e.mode == stat.S_IMODE(st_.st_mode)
        assert e.mtime_ns == st_.st_mtime_ns
        assert (e.uid, e.gid) == (st_.st_uid, st_.st_gid)
    # local paths name the regular files by index, and only them
    assert local == {i: os.path.join(root, e.path) for i, e in enumerate(m.entries) if e.kind == FILE}
    # what scan makes, the network accepts unchanged
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_scan_rsync_naming(tmp_path):
    root = str(tmp_path)
    build_tree(root)
    top = os.path.join(root, "top")
    named, _ = scan([top])
    contents, _ = scan([top + "/"])
    assert named.entries[0].path == "top"
    assert {"top/" + e.path for e in contents.entries} == {e.path for e in named.entries} - {"top"}
    # hardlink targets are renamed along with everything else
    assert {e.path: e.target for e in contents.entries if e.kind == HARDLINK} == {"sub/data": "zhard"}
    # A single file is named by its base name, with or without ./ noise.
    single, local = scan([os.path.join(top, "sub", "deep", "tail")])
    assert [e.path for e in single.entries] == ["tail"]
    assert local == {0: os.path.join(top, "sub", "deep", "tail")}
    # A trailing slash on a symlink to a directory copies the link, not the directory.
    link, _ = scan([os.path.join(top, "dirlink") + "/"])
    assert [(e.path, e.kind) for e in link.entries] == [("dirlink", SYMLINK)]
    # Several sources merge; a name given twice is refused.
    both, _ = scan([os.path.join(top, "sub") + "/", os.path.join(top, "emptydir")])
    assert {e.path for e in both.entries} >= {"data", "deep/tail", "emptydir"}
    with pytest.raises(ManifestError):
        scan([os.path.join(top, "sub"), os.path.join(top, "sub") + "/../sub"])


def test_scan_refuses_special_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ManifestError):
        scan([str(tmp_path) + "/"])


def test_scan_empty_dir(tmp_path):
    m, local = scan([str(tmp_path) + "/"])
    assert m.entries == [] and local == {}


@pytest.mark.parametrize("threads", [1, 3])
def test_sparse_file_digests_match_reading_every_byte(tmp_path, monkeypatch, threads):
    """Chunks skipped as holes digest the same as chunks read in full, in order, on any number of threads."""
    monkeypatch.setattr(manifest, "DIGEST_THREADS", threads)
    path = str(tmp_path / "sparse")
    with open(path, "wb") as f:
        f.truncate(40 << 20)
        os.pwrite(f.fileno(), os.urandom(3000), 5 << 20)
        os.pwrite(f.fileno(), b"x", (20 << 20) - 1)
        os.pwrite(f.fileno(), b"y", (40 << 20) - 1)
    size = os.path.getsize(path)
    chunk = default_chunk_size(1408)
    with open(path, "rb") as f:
        read = [digest(f.read(chunk)) for _ in range(0, size, chunk)]
    assert list(file_digests(path, chunk, size)) == read


def test_digesting_queues_a_few_chunks_not_the_whole_file(tmp_path, monkeypatch):
    """A huge (sparse) file must not become one queued task per chunk."""
    monkeypatch.setattr(manifest, "DIGEST_THREADS", 2)
    digested = []
    monkeypatch.setattr(manifest, "digest", lambda data: digested.append(len(data)) or b"d" * 32)
    path = tmp_path / "forty-chunks"
    path.write_bytes(os.urandom(40 * 4096))
    chunks = file_digests(str(path), 4096, 40 * 4096)
    assert next(chunks) == b"d" * 32
    time.sleep(0.2)  # time enough for the pool to digest whatever was queued
    assert len(digested) <= 2 * 2 + 1
    assert len(list(chunks)) == 39


def test_a_digest_abandoned_halfway_stops_its_threads(tmp_path, monkeypatch):
    """A scan that fails on another file closes this generator: its pool must not linger."""
    monkeypatch.setattr(manifest, "DIGEST_THREADS", 3)
    path = tmp_path / "forty-chunks"
    path.write_bytes(os.urandom(40 * 4096))
    before = threading.active_count()
    chunks = file_digests(str(path), 4096, 40 * 4096)
    next(chunks)
    assert threading.active_count() > before
    chunks.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("threads", [1, 3])
def test_a_file_that_shrinks_while_it_is_digested_is_an_error(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(manifest, "DIGEST_THREADS", threads)
    chunk = default_chunk_size(1408)
    path = tmp_path / "shrinking"
    path.write_bytes(os.urandom(chunk * 5 // 2))
    with pytest.raises(ManifestError, match="shrank while it was scanned"):
        list(file_digests(str(path), chunk, chunk * 3))


def test_files_of_one_chunk_or_none_digest_as_any_file_does(tmp_path):
    """A scan reads a file of at most a chunk whole (`_small_file_digest`): its digests are the same."""
    chunk = default_chunk_size(1408)
    sizes = [0, 1, 3000, chunk - 1, chunk, chunk + 1]
    for size in sizes:
        (tmp_path / f"f{size}").write_bytes(os.urandom(size))
    m, _ = scan([str(tmp_path) + "/"], 1408)
    for entry in m.entries:
        size = int(entry.path[1:])
        assert entry.size == size
        assert entry.digests == b"".join(file_digests(str(tmp_path / entry.path), chunk, size))
        assert len(entry.digests) == m.chunks(entry) * 32


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_scan_digests_every_kind_of_file_as_reading_it_alone_does(tmp_path, monkeypatch, threads):
    """
    Files digested where the walk finds them (small, or of many chunks) and
    in batches on other threads (the rest) all get the digests of reading
    each alone, in the walk's order, and the cache learns each.
    """
    monkeypatch.setattr(manifest, "DIGEST_THREADS", threads)
    monkeypatch.setattr(manifest, "BATCH_FILES", 3)
    chunk = default_chunk_size(1408)
    sizes = [
        0,
        1,
        4000,
        manifest.INLINE_BYTES,
        chunk,
        chunk + 1,
        3 * chunk + 7,
        manifest.SPREAD_CHUNKS * chunk,
    ]
    for n, size in enumerate(sizes * 3):
        (tmp_path / f"{n:02d}-{size}").write_bytes(os.urandom(size))
    learned = {}

    class Cache:
        def get(self, key):
            return None

        def put(self, key, digests):
            learned[key] = digests

    m, local = scan([str(tmp_path) + "/"], 1408, cache=Cache())
    assert [e.path for e in m.entries] == sorted(os.listdir(tmp_path))
    for index, entry in m.files():
        size = int(entry.path.split("-")[1])
        assert entry.digests == b"".join(file_digests(local[index], chunk, size, threads=1)), entry.path
    assert sorted(learned.values()) == sorted(e.digests for _, e in m.files())


def test_a_scan_keeps_two_batches_a_thread_in_flight_not_the_tree(tmp_path, monkeypatch):
    """The walk waits for the batches it handed out: a tree of many files is not queued whole."""
    monkeypatch.setattr(manifest, "DIGEST_THREADS", 2)
    monkeypatch.setattr(manifest, "BATCH_FILES", 1)
    for n in range(40):
        (tmp_path / f"f{n:02d}").write_bytes(os.urandom(manifest.INLINE_BYTES))
    release = threading.Event()
    digest_batch = manifest._digest_batch
    monkeypatch.setattr(manifest, "_digest_batch", lambda *a: release.wait(10) and digest_batch(*a))
    looked_up = []

    class Cache:
        def get(self, key):
            looked_up.append(key)

        def put(self, key, digests):
            pass

    scanning = threading.Thread(target=scan, args=([str(tmp_path) + "/"], 1408), kwargs={"cache": Cache()})
    scanning.start()
    time.sleep(0.3)
    try:
        assert len(looked_up) == 2 * 2 + 1  # two batches a thread, and one more while it waits for the first
    finally:
        release.set()
        scanning.join()
    assert len(looked_up) == 40


def test_a_file_that_shrinks_in_a_batch_fails_the_scan_and_leaves_no_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "DIGEST_THREADS", 3)
    for n in range(10):
        (tmp_path / f"f{n}").write_bytes(os.urandom(manifest.INLINE_BYTES * 2))
    real = manifest._whole_digests

    def shrinking(path, st, chunk_size, threads):
        if path.endswith("f4"):
            os.truncate(path, 100)
        return real(path, st, chunk_size, threads)

    monkeypatch.setattr(manifest, "_whole_digests", shrinking)
    before = threading.active_count()
    with pytest.raises(ManifestError, match="shrank while it was scanned"):
        scan([str(tmp_path) + "/"], 1408)
    assert threading.active_count() == before


def test_a_small_file_that_shrinks_while_it_is_digested_is_an_error(tmp_path):
    path = tmp_path / "shrinking"
    path.write_bytes(os.urandom(3000))
    with pytest.raises(ManifestError, match="shrank while it was scanned"):
        manifest._small_file_digest(str(path), 4000)


@pytest.mark.parametrize("size", [3000, 3 << 20])
@pytest.mark.parametrize("swap", ["symlink", "another file"])
def test_a_file_replaced_after_the_scan_found_it_is_not_digested_as_it(tmp_path, size, swap):
    """
    Between the scan's lstat and its read, a file replaced by a symlink (to
    a secret: the scan refuses those by inode) or by another file is an
    error, not digested, and so sent, as what the manifest lists.
    """
    chunk = default_chunk_size(1408)
    path = tmp_path / "file"
    path.write_bytes(os.urandom(size))
    found = os.lstat(path)
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(size))
    if swap == "symlink":
        (tmp_path / "link").symlink_to(secret)
        os.replace(tmp_path / "link", path)
    else:
        os.replace(secret, path)
    with pytest.raises(ManifestError, match="replaced while it was scanned"):
        if size <= chunk:
            manifest._small_file_digest(str(path), size, (found.st_dev, found.st_ino))
        else:
            list(file_digests(str(path), chunk, size, (found.st_dev, found.st_ino)))


def test_a_file_of_more_blocks_than_the_wire_can_number_is_refused():
    """Block numbers are 32 bits: a manifest naming a file past that is refused."""
    size = (1 << 32) * 512
    m = Manifest([Entry("huge", FILE, 0o644, 0, size=size)], block_size=512, chunk_size=1 << 30)
    m.entries[0].digests = b"\0" * (m.chunks(m.entries[0]) * DIGEST_SIZE)
    with pytest.raises(ManifestError, match="more than 4294967295 blocks"):
        Manifest.from_bytes(m.to_bytes())


# The master's digest cache (real SQLite): what it saves, and what it must never return.


class CountingDigest:
    """Counts how many bytes `manifest.digest` is asked to digest."""

    def __init__(self, monkeypatch):
        from mrsyncd.wire import manifest as manifest_module

        self.bytes = 0
        real = manifest_module.digest

        def counting(data):
            self.bytes += len(data)
            return real(data)

        monkeypatch.setattr(manifest_module, "digest", counting)


@pytest.mark.parametrize("size", [3000, 3 << 20])
def test_digest_cache_skips_unchanged_files_and_notices_a_rewrite(tmp_path, monkeypatch, size):
    """A file of one chunk (read whole, `_small_file_digest`) is cached as a larger one is."""
    from mrsyncd.daemon.store import DigestCache

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(size))
    cache = DigestCache(str(tmp_path / "cache.db"))
    counter = CountingDigest(monkeypatch)
    first, _ = scan([str(src) + "/"], cache=cache)
    assert counter.bytes == size
    again, _ = scan([str(src) + "/"], cache=cache)
    assert counter.bytes == size, "an unchanged file is not read again"
    assert again.entries == first.entries
    data = bytearray((src / "a").read_bytes())
    data[5] ^= 1
    st = os.stat(src / "a")
    (src / "a").write_bytes(bytes(data))
    os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back: ctime still moves
    changed, _ = scan([str(src) + "/"], cache=cache)
    assert counter.bytes == 2 * size
    assert changed.entries[0].chunk_digest(0) != first.entries[0].chunk_digest(0)
    cache.close()


def test_digest_cache_of_an_older_version_is_dropped(tmp_path):
    """Its BLAKE2b digests would make every receiver reject every chunk."""
    import sqlite3

    from mrsyncd.daemon.store import DigestCache

    path = str(tmp_path / "cache.db")
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE digests (dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER,"
        " ctime_ns INTEGER, chunk_size INTEGER, digests BLOB, used REAL,"
        " PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns, chunk_size))"
    )
    old.execute("INSERT INTO digests VALUES (1, 2, 3, 4, 5, 6, x'00', 0)")
    old.commit()
    old.close()
    cache = DigestCache(path)
    assert cache.get((1, 2, 3, 4, 5, 6)) is None
    tables = {row[0] for row in cache.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "digests" not in tables
    cache.close()


def test_filter_rules_decide_by_the_first_that_matches(tmp_path) -> None:
    """As rsync's: ``+ *.conf`` then ``- *`` keeps the .conf files, and the directories kept for them."""
    for rel in ("a.conf", "a.log", "etc/b.conf", "etc/b.log", "cache/c.conf", "cache/sub/d.conf"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)

    def paths(rules: list[str]) -> list[str]:
        found, _ = manifest.scan([str(tmp_path) + "/"], excludes=rules)
        return sorted(e.path for e in found.entries)

    assert paths(["- *.log"]) == paths(["*.log"])  # a bare pattern excludes, as before rules
    assert paths(["- cache", "+ */", "+ *.conf", "- *"]) == ["a.conf", "etc", "etc/b.conf"]
    assert paths(["+ cache/sub", "- cache"]) == ["a.conf", "a.log", "etc", "etc/b.conf", "etc/b.log"]
    assert paths(["+ cache/sub", "- cache/*", "- *.log"]) == [
        "a.conf",
        "cache",
        "cache/sub",
        "cache/sub/d.conf",
        "etc",
        "etc/b.conf",
    ]
    assert manifest.excluded("x/a.log", ["+ a.log", "- *.log"]) is False
    assert manifest.excluded("x/b.log", ["+ a.log", "- *.log"]) is True
    assert manifest.excluded("x/b.txt", ["+ a.log", "- *.log"]) is False


@pytest.mark.parametrize(
    ("rel", "pattern", "is_dir", "matched"),
    [
        ("a/b/c.log", "*.log", False, True),  # a name, at any depth
        ("a/b/c.log", "b/*.log", False, True),  # a path: the end of it
        ("a/b/c.log", "/b/*.log", False, False),  # ... or, anchored, from the top
        ("b/c.log", "/b/*.log", False, True),
        ("b/c.log", "/c.log", False, False),
        ("c.log", "/c.log", False, True),
        ("x/a/b/c", "a/**", False, True),
        ("x/a/b/c", "/a/**", False, False),
        ("a/b/c.log", "a/*", False, False),  # * stops at a /
        ("a/b/c.log", "a/**", False, True),  # ** does not
        ("a/b", "a/?", True, True),
        ("a/cache", "cache/", True, True),  # a trailing / : directories only
        ("a/cache", "cache/", False, False),
    ],
)
def test_a_pattern_matches_as_rsync_s_do(rel: str, pattern: str, is_dir: bool, matched: bool) -> None:
    assert manifest.excluded(rel, [f"- {pattern}"], is_dir) is matched


def test_a_scan_stops_past_its_bound_on_entries(tmp_path) -> None:
    for i in range(10):
        (tmp_path / f"f{i}").write_text("x")
    found, _ = manifest.scan([str(tmp_path) + "/"], max_entries=10)
    assert len(found.entries) == 10
    with pytest.raises(manifest.ManifestError, match="more than 9 entries \\(max_manifest_entries\\)"):
        manifest.scan([str(tmp_path) + "/"], max_entries=9)


def test_a_symlink_to_a_directory_is_no_directory_to_the_rules(tmp_path) -> None:
    """The nodes judge it by lstat under --delete: the master must too, or it is deleted and not sent."""
    (tmp_path / "real").mkdir()
    (tmp_path / "cache").symlink_to("real")
    found, _ = manifest.scan([str(tmp_path) + "/"], excludes=["- cache/"])
    assert sorted(e.path for e in found.entries) == ["cache", "real"]
    found, _ = manifest.scan([str(tmp_path) + "/"], excludes=["- real/"])
    assert sorted(e.path for e in found.entries) == ["cache"]


def _file(n: int, mtime: int) -> Entry:
    return Entry(
        f"d{n % 3}/f{n}", FILE, 0o644, mtime, size=n, digests=bytes([n % 251]) * DIGEST_SIZE * (n > 0)
    )


@given(
    st.lists(st.integers(min_value=0, max_value=40), unique=True, max_size=30),
    st.lists(st.tuples(st.integers(min_value=0, max_value=40), st.booleans()), max_size=30),
)
def test_a_manifest_is_made_again_from_its_change_from_any_base(base_files, new_files) -> None:
    """Files kept, changed, added, dropped and moved: the change rebuilds the manifest, byte for byte."""
    base = Manifest([_file(n, 1) for n in base_files])
    picked: dict[int, bool] = {}
    for n, touched in new_files:
        picked.setdefault(n, touched)
    new = Manifest([_file(n, 2 if touched else 1) for n, touched in picked.items()])
    rebuilt = base.changed(new.change_from(base))
    assert rebuilt.entries == new.entries
    assert rebuilt.to_bytes() == new.to_bytes()


def test_a_change_that_keeps_what_the_base_lacks_or_is_not_a_change_is_refused() -> None:
    base = Manifest([_file(n, 1) for n in range(4)])
    head, _, digests = Manifest([_file(1, 1), _file(2, 1)]).change_from(base).partition(b"\n")
    assert digests == b""
    change = json.loads(head)
    assert change["kept"] == [[1, 2]]
    for kept, why in [
        ([[3, 2]], "count must be an integer from 1 to 1"),
        ([[4, 1]], "first must be an integer from 0 to 3"),
        ([[0, 0]], "count must be an integer from 1 to 4"),
        ([[0, 1, 2]], "a run of kept entries is not [first, count]"),
        ([[0, 1], [0, 1]], "duplicate path 'd0/f0'"),
        ([7], "kept holds a int, not a run [first, count] or a row"),
        ([{"x": "y" * 10**6}], "kept holds a dict, not a run [first, count] or a row"),
        ([["d0/f9", "file", 420, 1, 0, 0, 9, ""]], "'d0/f9': wrong number of digests"),
    ]:
        with pytest.raises(ManifestError, match=re.escape(why)):
            base.changed(json.dumps({**change, "kept": kept}).encode() + b"\n")
    with pytest.raises(ManifestError, match="kept is not a list"):
        base.changed(json.dumps({**change, "kept": None}).encode() + b"\n")


# Packs


def _sized(sizes: list[int], kinds: list[str] | None = None) -> Manifest:
    """Files of ``sizes`` (a directory where ``kinds`` says so), blocks of 100 bytes, chunks of 4,000."""
    kinds = kinds or [FILE] * len(sizes)
    entries = [
        Entry(
            f"e{i:03d}",
            kind,
            0o644,
            0,
            size=size if kind == FILE else 0,
            digests=b"d" * DIGEST_SIZE * -(-size // 4000) if kind == FILE else b"",
        )
        for i, (size, kind) in enumerate(zip(sizes, kinds, strict=True))
    ]
    return Manifest(entries, block_size=100, chunk_size=4000)


@given(st.lists(st.tuples(st.integers(0, 6000), st.sampled_from([FILE, FILE, FILE, DIR])), max_size=60))
def test_packs_hold_each_small_file_once_end_to_end_up_to_a_chunk(files) -> None:
    """
    Every file of 1 to chunk_size // PACKED_SHARE bytes is in exactly one
    pack, unless no neighbour of that size could share one with it; files
    in a pack keep manifest order, and the pack is their bytes end to end,
    at most a chunk.
    """
    m = _sized([size for size, _ in files], [kind for _, kind in files])
    limit = m.chunk_size // manifest.PACKED_SHARE
    small = [i for i, e in enumerate(m.entries) if e.kind == FILE and 0 < e.size <= limit]
    packed = [member for pack in m.packs.values() for member in pack.members]
    assert sorted(packed) == packed and set(packed) <= set(small)
    for head, pack in m.packs.items():
        assert head == pack.members[0] and len(pack.members) > 1
        assert list(pack.offsets) == [0, *itertools.accumulate(m.entries[i].size for i in pack.members)]
        assert pack.size <= m.chunk_size
        assert m.unit_size(head) == pack.size
        for position, member in enumerate(pack.members):
            assert m.packed_in[member] == (head, position)
            start, end = pack.span(position)
            assert list(pack.within(start, end)) == [position]
            first, last = pack.blocks_of(position, m.block_size)
            assert first * 100 <= start and end <= last * 100 and (last - 1) * 100 < end
    # A file left out is the last small one, after a pack too full to take it (or none).
    for i in (i for i in small if i not in m.packed_in):
        assert i == small[-1]
        before = [j for j in small if j < i]
        if before:
            head = m.packed_in.get(before[-1], (before[-1], 0))[0]
            full = head in m.packs and len(m.packs[head].members) == manifest.PACKED_FILES
            assert full or m.unit_size(head) + m.entries[i].size > m.chunk_size


def test_what_a_receiver_needs_of_packed_files_is_the_blocks_that_hold_them() -> None:
    m = _sized([150, 150, 150, 150, 5000, 40])
    (pack,) = m.packs.values()
    assert pack.members == (0, 1, 2, 3, 5)  # the large file travels alone, between them
    needs = {
        1: RangeSet.interval(0, 1),
        3: RangeSet.interval(0, 1),
        4: RangeSet.interval(1, 2),
        5: RangeSet.interval(0, 1),
    }
    wire = m.wire_needs(needs)
    # A pack's chunks are its members (positions 1, 3 and 4); the large file's second chunk.
    assert wire == {0: RangeSet([(1, 2), (3, 5)]), 4: RangeSet.interval(1, 2)}
    assert m.bytes_in(wire, chunks=True) == 150 + 190 + 1000
    # Bytes 150-300 and 450-640 of the pack.
    assert m.pack_blocks(0, wire[0]) == RangeSet([(1, 3), (4, 7)])
    assert m.bytes_in({0: m.pack_blocks(0, wire[0])}) == 200 + 240
    assert m.unit_blocks(0) == 7 and m.unit_size(4) == 5000
    assert _sized([40]).packs == {} and _sized([40, 0, 5000]).packs == {}


def test_a_pack_s_members_count_their_bytes_when_chunks_are_one_block() -> None:
    m = Manifest(
        [Entry(f"f{i}", FILE, 0o644, 0, size=10, digests=b"d" * DIGEST_SIZE) for i in range(8)], 100, 100
    )
    (head,) = m.packs
    assert m.bytes_in({head: RangeSet.interval(3, 4)}, chunks=True) == 10
    assert m.bytes_in({head: RangeSet.interval(0, 1)}) == 80


def test_a_pack_holds_at_most_packed_files_files() -> None:
    m = _sized([10] * (2 * manifest.PACKED_FILES + 88))
    assert [len(p.members) for p in m.packs.values()] == [manifest.PACKED_FILES, manifest.PACKED_FILES, 88]
