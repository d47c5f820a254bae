"""
The manifest: what a transfer carries, and the digests that prove it arrived.

The sender scans its sources into a list of entries; an entry's position in
the list is the file index that datagrams carry.  Regular files are cut into
chunks of ``chunk_size`` bytes (a whole number of blocks), each with a
SHA-256 digest, so a receiver verifies and commits a file from the
manifest alone, without trusting any single datagram.

A manifest arrives from the network, so `Manifest.from_bytes` checks every
field, and above all every path: a path is relative, normalised, free of
``..``, NUL and empty components, so that it can only name something beneath
the destination.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import hashlib
import json
import os
import stat
import zlib
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from mrsyncd.wire import erasure
from mrsyncd.wire.blockset import RangeSet
from mrsyncd.wire.datagram import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE

DIGEST_SIZE = 32
FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
KINDS = (FILE, DIR, SYMLINK, HARDLINK)
#: Linux's NAME_MAX and PATH_MAX.
NAME_MAX = 255
PATH_MAX = 4096
#: 2: chunk digests are SHA-256 (1 had BLAKE2b): a node of the other kind refuses
#: the manifest rather than failing every chunk.  3: entries are rows, and
#: the digests follow the JSON as bytes (`Manifest.to_bytes`).
FORMAT = 3
MAX_BLOCKS = (1 << 32) - 1
#: Names a node keeps for its part files (`storage.part_name`): no manifest
#: may name one, so that no job can write, replace or link over another's.
RESERVED_PREFIX = ".mrsync-"
#: The group of a manifest that does not say (`erasure.preferred_group` is
#: what a new one asks for).
DEFAULT_PARITY_GROUP = 32
#: Threads that digest one large file's chunks at once, or a scan's other
#: files a batch each (`_Digester`).
DIGEST_THREADS = min(8, len(os.sched_getaffinity(0)))
#: A file of fewer chunks than this is digested whole in one thread, beside
#: others; one of more, on every core, a chunk a thread (`file_digests`).
SPREAD_CHUNKS = 8
#: A batch of such files for one thread holds at most this many of them
#: and, past its first, this many bytes (a hand-off to a thread and back
#: for each of 10,000 small files would cost more than their digests).
BATCH_FILES = 64
BATCH_BYTES = 4 << 20
#: A file smaller than this is digested where the walk finds it: its cost is
#: the Python around its read, which a thread beside the walk would only
#: take turns at (10,000 files of 1-20 kB took 0.32 s in batches, 0.19 s so).
INLINE_BYTES = 128 << 10
#: A file of at most this share of a chunk (128 KiB at the default chunk
#: size), and not empty, travels packed with its neighbours (`Manifest.packs`).
PACKED_SHARE = 8
#: A pack holds at most this many files: a sender reads and checks a pack's
#: files in one thread call, and the pass waits for the next pack's (a pack
#: of 20,000 files of 50 bytes took a master a second).
PACKED_FILES = 256


class DigestCacheLike(Protocol):
    def get(self, key: tuple[int, ...]) -> bytes | None: ...

    def put(self, key: tuple[int, ...], digests: bytes) -> None: ...


class ManifestError(ValueError):
    """A manifest or a path in it is not acceptable."""


def default_chunk_size(block_size: int) -> int:
    """About 1 MiB, a whole number of blocks."""
    return max(1, (1 << 20) // block_size) * block_size


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """
    A chunk's digest: SHA-256, which CPUs of the last years compute in
    hardware (SHA-NI, ARMv8 SHA2) at twice BLAKE2b's speed; every byte sent
    is digested at least three times (scan, the sender's check before
    sending, the receiver's verification), so this is most of the CPU a
    transfer spends beyond the network.
    """
    return hashlib.sha256(data).digest()


def deflated(data: bytes) -> bytes:
    """
    A manifest as it crosses a link, over the control channel or by
    multicast: zlib at level 1 takes 10,000 small files' 1.0 MB to 0.47 MB
    in 15 ms; what is left is mostly the digests.
    """
    return zlib.compress(data, 1)


def inflated(data: bytes, limit: int) -> bytes:
    """
    What `deflated` made, if it inflates to at most ``limit`` bytes; a
    ``ValueError`` says why not, as a predicate for the caller to name its subject.
    """
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(data, limit)
    except zlib.error as e:
        raise ValueError(f"is not zlib data: {e}") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError(f"inflates past {limit} bytes, or is cut short")
    return out


@dataclass(slots=True)
class Entry:
    path: str
    kind: str
    mode: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    #: A symlink's target, verbatim; for a hardlink, the path of the file
    #: entry it is a link to.
    target: str = ""
    #: Concatenated chunk digests of a regular file.
    digests: bytes = field(default=b"", repr=False)

    def chunk_digest(self, chunk: int) -> bytes:
        return self.digests[chunk * DIGEST_SIZE : (chunk + 1) * DIGEST_SIZE]


@dataclass(frozen=True, slots=True)
class Pack:
    """
    Small files that travel as one stream of blocks, their bytes end to end
    with no padding (`Manifest.packs`): a tree of 10,000 files of 1-20 kB
    costs the wire a header a block, not a short datagram a file, and the
    sender and each receiver a book a pack, not one a file; a lost block is
    repaired, by itself or by parities, as one inside a large file is.
    Each member is still verified by its own digest and placed at its own
    path, and a receiver asks only for the blocks that cover the members it
    lacks, so a changed file costs its own bytes and at most the two blocks
    it shares with its neighbours.
    """

    #: On the wire a pack is its first member's file index, which no datagram of the member's own carries.
    head: int
    #: Its members' file indexes, in manifest order.
    members: tuple[int, ...]
    #: Each member's first byte in the pack, then the pack's size.
    offsets: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def span(self, position: int) -> tuple[int, int]:
        """The pack's bytes ``[start, end)`` that member ``position`` fills."""
        return self.offsets[position], self.offsets[position + 1]

    def blocks_of(self, position: int, block_size: int) -> tuple[int, int]:
        """The pack's blocks ``[first, end)`` that hold member ``position``."""
        start, end = self.span(position)
        return start // block_size, -(-end // block_size)

    def within(self, start: int, end: int) -> range:
        """The positions of the members that overlap the pack's bytes ``[start, end)``."""
        last = min(bisect_left(self.offsets, end), len(self.members))
        return range(max(0, bisect_right(self.offsets, start) - 1), last)


@dataclass
class Manifest:
    entries: list[Entry]
    block_size: int = DEFAULT_BLOCK_SIZE
    chunk_size: int = 0
    #: A source was sent by its contents (``dir/``), so the destination
    #: itself is one of the directories the transfer sends (for --delete).
    contents: bool = False
    #: Blocks per parity group: a repair may send parities of such a group
    #: (`erasure`), any m of which rebuild any m of its blocks.
    parity_group: int = DEFAULT_PARITY_GROUP

    def __post_init__(self) -> None:
        if not self.chunk_size:
            self.chunk_size = default_chunk_size(self.block_size)

    @property
    def chunk_blocks(self) -> int:
        return self.chunk_size // self.block_size

    def chunks(self, entry: Entry) -> int:
        return -(-entry.size // self.chunk_size)

    def blocks(self, entry: Entry) -> int:
        return -(-entry.size // self.block_size)

    def block_length(self, entry: Entry, block: int) -> int:
        return min(self.block_size, entry.size - block * self.block_size)

    def chunk_span(self, entry: Entry, chunk: int) -> tuple[int, int]:
        """Offset and length of one chunk of a file."""
        offset = chunk * self.chunk_size
        return offset, min(self.chunk_size, entry.size - offset)

    @functools.cached_property
    def packs(self) -> dict[int, Pack]:
        """
        The packs, by head.  A pack is a run of regular files, each of 1 to
        ``chunk_size // PACKED_SHARE`` bytes, that are consecutive among
        such files in manifest order, up to a chunk in all and
        `PACKED_FILES` files; a run of one is no pack.  Both ends derive the
        packs from the manifest alone, so the manifest says where each file
        lies, and it must not change once a transfer uses it.
        """
        limit = self.chunk_size // PACKED_SHARE
        packs: dict[int, Pack] = {}
        members: list[int] = []
        offsets = [0]

        def close() -> None:
            if len(members) > 1:
                packs[members[0]] = Pack(members[0], tuple(members), tuple(offsets))
            members.clear()
            del offsets[1:]

        for index, entry in enumerate(self.entries):
            if entry.kind != FILE or not 0 < entry.size <= limit:
                continue
            if offsets[-1] + entry.size > self.chunk_size or len(members) == PACKED_FILES:
                close()
            members.append(index)
            offsets.append(offsets[-1] + entry.size)
        close()
        return packs

    @functools.cached_property
    def packed_in(self) -> dict[int, tuple[int, int]]:
        """Each packed file's pack (its head) and its position in it, by the file's index."""
        return {
            member: (head, position)
            for head, pack in self.packs.items()
            for position, member in enumerate(pack.members)
        }

    def unit_size(self, index: int) -> int:
        """The bytes that file index ``index`` carries on the wire: a file's, or a pack's if it is a head."""
        pack = self.packs.get(index)
        return self.entries[index].size if pack is None else pack.size

    def unit_blocks(self, index: int) -> int:
        return -(-self.unit_size(index) // self.block_size)

    def wire_needs(self, needs: Mapping[int, RangeSet]) -> dict[int, RangeSet]:
        """
        What a receiver asks for, from the chunks it needs of each file: a
        file's chunks, or for a pack, the positions of the members it needs
        (each is one chunk): a pack's chunks are its members.
        """
        packed_in = self.packed_in
        wire: dict[int, RangeSet] = {}
        positions: dict[int, list[tuple[int, int]]] = {}
        for index, chunks in needs.items():
            place = packed_in.get(index)
            if place is None:
                wire[index] = chunks
            elif chunks:
                head, position = place
                positions.setdefault(head, []).append((position, position + 1))
        for head, members in positions.items():
            wire[head] = RangeSet(members)
        return wire

    def pack_blocks(self, head: int, members: RangeSet) -> RangeSet:
        """The blocks of pack ``head`` that hold the ``members`` (positions) a receiver needs."""
        pack, size = self.packs[head], self.block_size
        return RangeSet(
            (pack.blocks_of(first, size)[0], pack.blocks_of(end - 1, size)[1])
            for first, end in members.ranges
        )

    def files(self) -> Iterator[tuple[int, Entry]]:
        for index, entry in enumerate(self.entries):
            if entry.kind == FILE:
                yield index, entry

    def total_bytes(self) -> int:
        return sum(e.size for _, e in self.files())

    def bytes_in(self, sets: Mapping[int, RangeSet], chunks: bool = False) -> int:
        """
        File bytes that sets of blocks (of chunks: ``chunks``) cover, by
        file index; a pack's chunks are its members (`wire_needs`).
        """
        unit = self.chunk_size if chunks else self.block_size
        packs = self.packs
        total = 0
        for index, ranges in sets.items():
            pack = packs.get(index)
            if pack is not None and chunks:
                offsets = pack.offsets
                total += sum(offsets[end] - offsets[start] for start, end in ranges.ranges)
                continue
            size = self.entries[index].size if pack is None else pack.size
            for start, end in ranges.ranges:
                total += min(end * unit, size) - start * unit
        return total

    def to_bytes(self) -> bytes:
        """
        The manifest as JSON, each entry a row of its fields (`ROW`), then a
        newline and the files' chunk digests, in order, as bytes.  With
        every field named and the digests in hex, the benchmark's 10,000
        small files made 1.96 MB, 617 kB compressed, and every node of a
        push is sent it; so, 0.90 MB and 487 kB.
        """
        return _encoded({**self._header(), "entries": [_row(e) for e in self.entries]}, self.entries)

    def change_from(self, base: Manifest) -> bytes:
        """
        This manifest as a change to ``base``, which a receiver holds
        (`changed`): runs of ``base``'s entries kept as they are, and the
        entries that are new or changed.  Pushing a tree of 10,000 files
        again after 1% of them changed sends each node 100 entries, not
        0.49 MB.
        """
        where = {entry.path: index for index, entry in enumerate(base.entries)}
        # A run of kept entries is [first, count]; a new one, its row.
        ops: list[Sequence[object]] = []
        new: list[Entry] = []
        run: list[int] | None = None
        for entry in self.entries:
            index = where.get(entry.path)
            if index is None or base.entries[index] != entry:
                ops.append(_row(entry))
                new.append(entry)
                run = None
            elif run is not None and run[0] + run[1] == index:
                run[1] += 1
            else:
                run = [index, 1]
                ops.append(run)
        return _encoded({**self._header(), "kept": ops}, new)

    def changed(self, data: bytes) -> Manifest:
        """
        The manifest that a `change_from` this one describes, checked as
        `from_bytes` checks one; the caller compares its digest with the
        sender's, since a change from another base rebuilds another manifest.
        """
        doc, digests = _document(data)
        ops = doc.get("kept")
        if not isinstance(ops, list):
            raise ManifestError("kept is not a list")
        manifest = self._with_header(doc)
        section = _DigestSection(digests, manifest.chunk_size)
        for op in ops:
            if not isinstance(op, list):
                raise ManifestError(f"kept holds a {type(op).__name__}, not a run [first, count] or a row")
            if len(op) == len(ROW):
                manifest.entries.append(_entry(op, section))
                continue
            if len(op) != 2:
                raise ManifestError("a run of kept entries is not [first, count]")
            first = _integer(op[0], "first", 0, len(self.entries) - 1)
            count = _integer(op[1], "count", 1, len(self.entries) - first)
            manifest.entries.extend(self.entries[first : first + count])
        section.finish()
        _check_entries(manifest)
        return manifest

    def _header(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "block_size": self.block_size,
            "chunk_size": self.chunk_size,
            "contents": self.contents,
            "parity_group": self.parity_group,
        }

    @classmethod
    def _with_header(cls, doc: dict[str, object]) -> Manifest:
        """An empty manifest of the block size, chunk size and the rest that ``doc`` gives, checked."""
        block_size = _integer(doc.get("block_size"), "block_size", 1, MAX_BLOCK_SIZE)
        chunk_size = _integer(doc.get("chunk_size"), "chunk_size", block_size, 1 << 30)
        if chunk_size % block_size:
            raise ManifestError("chunk_size is not a multiple of block_size")
        contents = doc.get("contents", False)
        if not isinstance(contents, bool):
            raise ManifestError("contents must be true or false")
        parity_group = _integer(
            doc.get("parity_group", DEFAULT_PARITY_GROUP), "parity_group", 2, erasure.MAX_GROUP
        )
        return cls([], block_size, chunk_size, contents, parity_group)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check a manifest from the network."""
        doc, digests = _document(data)
        raw_entries = doc.get("entries")
        if not isinstance(raw_entries, list):
            raise ManifestError("entries is not a list")
        manifest = cls._with_header(doc)
        section = _DigestSection(digests, manifest.chunk_size)
        manifest.entries = [_entry(raw, section) for raw in raw_entries]
        section.finish()
        _check_entries(manifest)
        return manifest


#: An entry's fields in its row (`Manifest.to_bytes`): all but its digests.
ROW = ("path", "kind", "mode", "mtime_ns", "uid", "gid", "size", "target")


def _row(e: Entry) -> list[object]:
    return [e.path, e.kind, e.mode, e.mtime_ns, e.uid, e.gid, e.size, e.target]


def _encoded(doc: dict[str, object], entries: Sequence[Entry]) -> bytes:
    """``doc`` as JSON (which escapes every newline in it), a newline, and the digests of ``entries``."""
    head = json.dumps(doc, separators=(",", ":")).encode()
    return b"\n".join((head, b"".join(entry.digests for entry in entries)))


def _document(data: bytes) -> tuple[dict[str, object], bytes]:
    """A manifest's JSON document, checked to be this format's, and the digests after it."""
    head, newline, digests = data.partition(b"\n")
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or type(doc.get("format")) is not int or doc["format"] != FORMAT:
        raise ManifestError(
            f"manifest format {doc.get('format') if isinstance(doc, dict) else None!r}, this node reads "
            f"{FORMAT}: the master and this node run different versions of mrsyncd"
        )
    if not newline:
        raise ManifestError("manifest has no digests after its entries")
    return doc, digests


class _DigestSection:
    """The digests after a manifest's JSON, handed to its files in order, a chunk's each."""

    def __init__(self, data: bytes, chunk_size: int) -> None:
        self._data = data
        self._at = 0
        self._chunk_size = chunk_size

    def take(self, path: str, size: int) -> bytes:
        end = self._at + -(-size // self._chunk_size) * DIGEST_SIZE
        if end > len(self._data):
            raise ManifestError(f"{path!r}: wrong number of digests")
        digests, self._at = self._data[self._at : end], end
        return digests

    def finish(self) -> None:
        if self._at != len(self._data):
            raise ManifestError(
                f"{len(self._data) - self._at} bytes of digests more than the manifest's files have chunks"
            )


def _check_entries(manifest: Manifest) -> None:
    seen: dict[str, str] = {}
    for entry in manifest.entries:
        if entry.path in seen:
            raise ManifestError(f"duplicate path {entry.path!r}")
        if entry.kind == FILE:
            _check_size(manifest, entry)
            expected = manifest.chunks(entry) * DIGEST_SIZE
            if len(entry.digests) != expected:
                raise ManifestError(f"{entry.path!r}: wrong number of digests")
        elif entry.digests or entry.size:
            raise ManifestError(f"{entry.path!r}: only files have a size")
        if entry.kind == HARDLINK:
            check_path(entry.target)
            if seen.get(entry.target) != FILE:
                raise ManifestError(
                    f"{entry.path!r}: hardlink target {entry.target!r} is not an earlier file"
                )
        if entry.kind == SYMLINK and (not entry.target or "\0" in entry.target):
            raise ManifestError(f"{entry.path!r}: bad symlink target")
        seen[entry.path] = entry.kind


def _check_size(manifest: Manifest, entry: Entry) -> None:
    """Block numbers are 32 bits on the wire (5.5 TiB at the default block size)."""
    if manifest.blocks(entry) > MAX_BLOCKS:
        raise ManifestError(
            f"{entry.path!r}: {entry.size} bytes is more than {MAX_BLOCKS} blocks of {manifest.block_size}"
        )


def _integer(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"{name} must be an integer from {low} to {high}")
    return value


#: The bounds of an entry's integers, checked by `_entry`.
_MTIME_NS = (-(1 << 63), (1 << 63) - 1)
_ID = (1 << 32) - 1
_SIZE = (1 << 63) - 1


def _entry(raw: object, digests: _DigestSection) -> Entry:
    """
    One entry from the network, checked, with a file's digests taken from
    the section after the JSON.  A node decodes a manifest for every push,
    100,000 entries for a tree of 100,000 files: the checks of a
    well-formed entry run inline, and `_integer` runs only to name what is
    wrong.
    """
    if type(raw) is not list or len(raw) != len(ROW):
        raise ManifestError(f"entry is not a row of {len(ROW)} fields")
    path, kind, mode, mtime_ns, uid, gid, size, target = raw
    if type(path) is not str:
        raise ManifestError("entry path is not a string")
    check_path(path)
    if kind not in KINDS:
        raise ManifestError(f"{path!r}: unknown kind {kind!r}")
    if type(target) is not str:
        raise ManifestError(f"{path!r}: bad target")
    # type() is int: JSON's true and false are bools, which are not.
    if not (
        type(mode) is int
        and 0 <= mode <= 0o7777
        and type(mtime_ns) is int
        and _MTIME_NS[0] <= mtime_ns <= _MTIME_NS[1]
        and type(uid) is int
        and 0 <= uid <= _ID
        and type(gid) is int
        and 0 <= gid <= _ID
        and type(size) is int
        and 0 <= size <= _SIZE
    ):
        _integer(mode, "mode", 0, 0o7777)
        _integer(mtime_ns, "mtime_ns", *_MTIME_NS)
        _integer(uid, "uid", 0, _ID)
        _integer(gid, "gid", 0, _ID)
        _integer(size, "size", 0, _SIZE)
    return Entry(
        path, kind, mode, mtime_ns, uid, gid, size, target, digests.take(path, size) if kind == FILE else b""
    )


def check_path(path: str) -> None:
    """
    Refuse any path that could name something outside the destination or
    that the filesystem cannot hold.  The accepted form is the normal one:
    relative, ``/``-separated, no empty, ``.`` or ``..`` components.
    """
    if not path:
        raise ManifestError("empty path")
    if "\0" in path:
        raise ManifestError(f"path {path!r} contains NUL")
    if path.startswith("/"):
        raise ManifestError(f"path {path!r} is absolute")
    try:
        # surrogateescape: names that are not UTF-8 arrive as os.fsdecode
        # makes them; any other lone surrogate cannot name a file.
        encoded = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ManifestError(f"path {path!r} is not a file name") from None
    if len(encoded) >= PATH_MAX:
        raise ManifestError(f"path {path[:40]!r}... is longer than PATH_MAX")
    parts = path.split("/")
    if (
        len(encoded) <= NAME_MAX
        and RESERVED_PREFIX not in path
        and "" not in parts
        and "." not in parts
        and ".." not in parts
    ):
        return  # the common case, each name checked at once
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(f"path {path!r} is not normalised or leaves the destination")
        if part.startswith(RESERVED_PREFIX):
            raise ManifestError(f"path {path!r}: names beginning {RESERVED_PREFIX} are kept for part files")
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise ManifestError(f"path {path!r} has a name longer than {NAME_MAX} bytes")


# Scanning (blocking: call it in a thread).


def scan(
    sources: Sequence[str],
    block_size: int = DEFAULT_BLOCK_SIZE,
    chunk_size: int = 0,
    excludes: Sequence[str] = (),
    cache: DigestCacheLike | None = None,
    max_entries: int | None = None,
    refused: Mapping[tuple[int, int], str] = {},
) -> tuple[Manifest, dict[int, str]]:
    """
    Scan sources as rsync names them: ``dir`` arrives as ``DEST/dir``, and
    ``dir/`` (trailing slash) puts the contents of ``dir`` in ``DEST``.
    ``excludes`` are filter rules (`excluded`); an excluded directory is
    not descended into.

    More than ``max_entries`` entries is an error, raised as the walk
    passes them: every node would hold the manifest whole; so is any entry
    whose device and inode ``refused`` names (the master's secrets).

    Returns the manifest and the local path of each regular file by index.
    Blocking: it reads and digests every file, so callers on the reactor run
    it with ``deferToThread``.
    """
    manifest = Manifest([], block_size, chunk_size, parity_group=erasure.preferred_group())
    with _Digester(manifest, cache) as digester:
        local_paths = _walk_sources(manifest, sources, excludes, max_entries, refused, digester)
    return manifest, local_paths


def _walk_sources(
    manifest: Manifest,
    sources: Sequence[str],
    excludes: Sequence[str],
    max_entries: int | None,
    refused: Mapping[tuple[int, int], str],
    digester: _Digester,
) -> dict[int, str]:
    local_paths: dict[int, str] = {}
    first_path_of_inode: dict[tuple[int, int], str] = {}
    seen: set[str] = set()
    for source in sources:
        contents_only = source.endswith("/") or source == "." or source.endswith("/.")
        base = os.path.abspath(source)
        st = os.lstat(base)
        prefix = "" if contents_only and stat.S_ISDIR(st.st_mode) else os.path.basename(base)
        manifest.contents |= not prefix
        for path, rel in _walk(base, prefix, excludes):
            if rel in seen:
                raise ManifestError(f"two sources both give {rel!r}")
            if max_entries is not None and len(manifest.entries) >= max_entries:
                raise ManifestError(
                    f"the sources hold more than {max_entries} entries (max_manifest_entries):"
                    " push the tree in parts, or raise the bound"
                )
            seen.add(rel)
            entry = _scan_one(manifest, path, rel, first_path_of_inode, digester, refused)
            if entry.kind == FILE:
                local_paths[len(manifest.entries)] = path
            manifest.entries.append(entry)
    return local_paths


def _raise(error: OSError) -> None:
    raise error


@functools.lru_cache(maxsize=256)
def _parsed(rule: str) -> tuple[bool, str, bool, bool]:
    """
    A filter rule taken apart once, not at each of the paths it is asked
    about: whether it keeps, its pattern without the slashes that mark it,
    whether it is for directories only, whether it is anchored.
    """
    keep = rule.startswith("+ ")
    pattern = rule[2:] if keep or rule.startswith("- ") else rule
    return keep, pattern.strip("/"), pattern.endswith("/"), pattern.startswith("/")


def excluded(rel: str, rules: Sequence[str], is_dir: bool = False) -> bool:
    """
    Whether ``rel`` is left out, by the first of ``rules`` that matches it,
    as rsync's filter rules decide: ``- PATTERN`` leaves it out, ``+
    PATTERN`` keeps it (so ``+ */``, ``+ *.conf``, ``- *`` keeps the .conf
    files and the directories they are in), and a bare pattern leaves it
    out.  A pattern ending in ``/`` matches directories only.  One without
    any other ``/`` matches a name at any depth; one with a ``/`` matches
    the end of the path beneath the destination, or, if it starts with
    ``/``, the whole of it.  ``*`` and ``?`` stop at a ``/``, ``**`` does
    not (and in a pattern that holds it, neither does ``*``).
    """
    name = rel.rsplit("/", 1)[-1]
    for rule in rules:
        keep, pattern, dirs_only, anchored = _parsed(rule)
        if dirs_only and not is_dir:
            continue
        if "/" not in pattern and not anchored:
            matched = fnmatch.fnmatchcase(name, pattern)
        elif "**" in pattern:
            matched = (
                fnmatch.fnmatchcase(rel, pattern) or not anchored and fnmatch.fnmatchcase(rel, "*/" + pattern)
            )
        else:
            want, parts = pattern.split("/"), rel.split("/")
            tails = [parts] if anchored else [parts[i:] for i in range(len(parts) - len(want) + 1)]
            matched = any(
                len(tail) == len(want) and all(map(fnmatch.fnmatchcase, tail, want)) for tail in tails
            )
        if matched:
            return not keep
    return False


def _relative(prefix: str, rel_dir: str, name: str) -> str:
    rel = name if rel_dir == "." else f"{rel_dir}/{name}"
    return f"{prefix}/{rel}" if prefix else rel


def _walk(base: str, prefix: str, excludes: Sequence[str]) -> Iterator[tuple[str, str]]:
    is_dir = os.path.isdir(base) and not os.path.islink(base)
    if prefix:
        if excluded(prefix, excludes, is_dir):
            return
        yield base, prefix
    if is_dir:
        for dirpath, dirnames, filenames in os.walk(base, onerror=_raise):
            rel_dir = os.path.relpath(dirpath, base)
            full = functools.partial(_relative, prefix, rel_dir)

            # A symlink to a directory is listed with the directories, but it
            # is sent, and judged by the nodes' --delete, as a symlink.
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not excluded(full(d), excludes, not os.path.islink(os.path.join(dirpath, d)))
            )
            for name in sorted(dirnames + [f for f in filenames if not excluded(full(f), excludes)]):
                yield os.path.join(dirpath, name), full(name)


def _scan_one(
    manifest: Manifest,
    path: str,
    rel: str,
    first_path_of_inode: dict[tuple[int, int], str],
    digester: _Digester,
    refused: Mapping[tuple[int, int], str] = {},
) -> Entry:
    check_path(rel)
    st = os.lstat(path)
    if (st.st_dev, st.st_ino) in refused:
        raise ManifestError(f"{path} is {refused[st.st_dev, st.st_ino]}, which is never sent")
    entry = Entry(rel, FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_uid, st.st_gid)
    if stat.S_ISDIR(st.st_mode):
        entry.kind = DIR
    elif stat.S_ISLNK(st.st_mode):
        entry.kind, entry.target = SYMLINK, os.readlink(path)
    elif not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{path}: not a regular file, directory or symlink")
    elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_path_of_inode:
        entry.kind, entry.target = HARDLINK, first_path_of_inode[st.st_dev, st.st_ino]
    else:
        if st.st_nlink > 1:
            first_path_of_inode[st.st_dev, st.st_ino] = rel
        entry.size = st.st_size
        _check_size(manifest, entry)
        digester.digest(entry, path, st)
    return entry


class _Digester:
    """
    Gives a scan's files their digests, from the cache or read, on every
    core: a file of `SPREAD_CHUNKS` or more a chunk a thread as the walk
    reaches it, the others whole, in batches that threads digest while the
    walk goes on (2,000 files of 500 kB took a master of two cores 0.84-0.97 s
    one at a time, 0.45 s so).  At most two batches a thread are in flight, and
    a batch's files are open only while it is digested.  Every entry has
    its digests when the scan ends; an error of any file's is the scan's.
    """

    def __init__(self, manifest: Manifest, cache: DigestCacheLike | None) -> None:
        self._manifest = manifest
        self._chunk_size = manifest.chunk_size
        self._cache = cache
        self._pool = ThreadPoolExecutor(DIGEST_THREADS) if DIGEST_THREADS > 1 else None
        self._batch: list[_Wanted] = []
        self._batch_bytes = 0
        self._flying: deque[tuple[list[_Wanted], Future[list[bytes]]]] = deque()

    def __enter__(self) -> _Digester:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        try:
            if error is None:
                self._send()
                while self._flying:
                    self._land()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def digest(self, entry: Entry, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, self._chunk_size)
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None and len(cached) == self._manifest.chunks(entry) * DIGEST_SIZE:
            entry.digests = cached
            return
        if self._pool is None or not INLINE_BYTES <= st.st_size < SPREAD_CHUNKS * self._chunk_size:
            entry.digests = _whole_digests(path, st, self._chunk_size, DIGEST_THREADS)
            if self._cache is not None:
                self._cache.put(key, entry.digests)
            return
        wanted = _Wanted(entry, path, st, key)
        self._batch.append(wanted)
        self._batch_bytes += st.st_size
        if len(self._batch) >= BATCH_FILES or self._batch_bytes >= BATCH_BYTES:
            self._send()

    def _send(self) -> None:
        if not self._batch:
            return
        assert self._pool is not None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._flying.append((batch, self._pool.submit(_digest_batch, batch, self._chunk_size)))
        while len(self._flying) > 2 * DIGEST_THREADS:
            self._land()

    def _land(self) -> None:
        batch, future = self._flying.popleft()
        for wanted, digests in zip(batch, future.result(), strict=True):
            wanted.entry.digests = digests
            if self._cache is not None:
                self._cache.put(wanted.key, digests)


@dataclass(frozen=True, slots=True)
class _Wanted:
    """A file whose digests a thread reads: its entry and path, what the scan found there, its cache key."""

    entry: Entry
    path: str
    st: os.stat_result
    key: tuple[int, ...]


def _whole_digests(path: str, st: os.stat_result, chunk_size: int, threads: int) -> bytes:
    """The digests of the file the scan found at ``path`` (``st``), on up to ``threads`` threads."""
    identity = (st.st_dev, st.st_ino)
    if st.st_size <= chunk_size:
        return _small_file_digest(path, st.st_size, identity)
    return b"".join(file_digests(path, chunk_size, st.st_size, identity, threads))


def _digest_batch(batch: list[_Wanted], chunk_size: int) -> list[bytes]:
    """In a thread: a batch's files' digests, each file's on this thread alone."""
    return [_whole_digests(wanted.path, wanted.st, chunk_size, 1) for wanted in batch]


def _open_scanned(path: str, identity: tuple[int, int] | None) -> int:
    """
    Open a file the scan found regular, as the very file it found (device
    and inode): one replaced since by a symlink or another file (the
    master's secrets, which the scan refuses by inode) is not digested as
    what the manifest lists, and so is never sent as it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ManifestError(f"{path}: replaced while it was scanned") from None
    if identity is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != identity:
            os.close(fd)
            raise ManifestError(f"{path}: replaced while it was scanned")
    return fd


def _small_file_digest(path: str, size: int, identity: tuple[int, int] | None = None) -> bytes:
    """
    The digest of a file of one chunk (none if it is empty), read whole:
    `file_digests`' generator, hole check and buffered file cost the scan
    of a tree of 10,000 small files 13% (0.222 s against 0.192, best of 12).
    """
    if not size:
        return b""
    fd = _open_scanned(path, identity)
    try:
        return _digest_read(fd, path, 0, size)
    finally:
        os.close(fd)


def _digest_read(fd: int, path: str, offset: int, length: int) -> bytes:
    """The digest of ``length`` bytes of a source at ``offset``, all of which must still be there."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ManifestError(f"{path}: file shrank while it was scanned")
    return digest(data)


def file_digests(
    path: str, chunk_size: int, size: int, identity: tuple[int, int] | None = None, threads: int | None = None
) -> Iterator[bytes]:
    """
    Digest a file chunk by chunk, on every core: ``pread`` and SHA-256
    release the GIL, and a job cannot start before its sources are digested.
    Memory stays at one chunk per thread, with at most two per thread
    queued.  A chunk that lies wholly in a hole of a sparse file is zeros:
    ``SEEK_DATA`` says so without reading it, so a sparse disk image costs
    its data, not its size.  ``identity``: the device and inode the scan
    found at ``path`` (`_open_scanned`).  ``threads``: `DIGEST_THREADS`
    unless given.
    """
    threads = DIGEST_THREADS if threads is None else threads
    zero: dict[int, bytes] = {}

    def chunk_digest(fd: int, offset: int) -> bytes:
        length = min(chunk_size, size - offset)
        try:
            next_data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after offset
                raise
            next_data = size
        if next_data >= offset + length:
            if length not in zero:
                zero[length] = digest(bytes(length))
            return zero[length]
        return _digest_read(fd, path, offset, length)

    offsets = range(0, size, chunk_size)
    with open(_open_scanned(path, identity), "rb", buffering=0) as f:
        fd = f.fileno()
        if len(offsets) < 2 or threads < 2:
            yield from (chunk_digest(fd, offset) for offset in offsets)
            return
        with ThreadPoolExecutor(threads) as pool:
            # A bounded window, not Executor.map: map queues every chunk at
            # once, a future each, and a sparse image may have millions.
            window: deque[Future[bytes]] = deque()
            for offset in offsets:
                window.append(pool.submit(chunk_digest, fd, offset))
                if len(window) > 2 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
