"""
The receiving side of one transfer: datagrams in, verified files out.

Datagrams come a batch at a time from the intake (`mrsyncd.engine.intake`), opened
and gathered into runs of consecutive blocks; the receiver keeps its books
(`mrsyncd.engine.ledger`) and its delay and loss meter (`mrsyncd.engine.meter`) a run and
a batch at a time.  A block is written with ``pwrite`` into a part file
beside its destination (``.mrsync-<transfer>-<index>.part``) only after its
datagram opens under the run's key.  When every block of a chunk has
arrived the chunk is read back and digested in a thread; a chunk that does
not match its manifest digest is forgotten and asked for again.  When every
chunk of a file is verified the part file is fsynced, given its owner, mode
and mtime, and renamed over the final path, so a reader sees either the old
file or the whole new one.  A pack of small files (`manifest.Pack`) is
one stream of blocks with books of its own, its blocks gathered in memory
(or written to one part file while they wait for repairs); each of its
files is verified by its own digest once the blocks that hold it are in,
and placed with other small files (`storage.place_batch`).

Memory is one bit per block and a few bytes per chunk of the files in
flight, whatever their size; file data only passes through.
"""

from __future__ import annotations

import os
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from mrsyncd import logs
from mrsyncd.control.contract import DEFAULT_OPTIONS, Feedback, MissingReport, TransferOptions
from mrsyncd.engine import fsutil, intake, storage
from mrsyncd.engine.ledger import DONE, NEEDED, VERIFYING, BlockLedger
from mrsyncd.engine.meter import FEEDBACK_INTERVAL, DelayLossMeter
from mrsyncd.engine.multicast import DEFAULT_RCVBUF, Channel, receive_queue, receiver_socket
from mrsyncd.engine.parities import KeptParities
from mrsyncd.engine.ratecontrol import Echo, node_id, report_due
from mrsyncd.engine.storage import OK, WOULD_DELETE, WOULD_RECEIVE
from mrsyncd.wire import datagram, erasure
from mrsyncd.wire.blockset import RangeSet, encode_map
from mrsyncd.wire.datagram import KIND_DATA, KIND_ECHO, KIND_PARITY
from mrsyncd.wire.manifest import DIR, FILE, HARDLINK, SYMLINK, Entry, Manifest, Pack, digest

#: What `storage.survey` found of each file: what it holds, or why it cannot be received.
_Survey = dict[int, storage.Held | str]

log = logs.logger(__name__)

#: Part files held open at once; more are reopened on demand.
OPEN_FILES = 32
#: Files whose blocks are gathered at once (up to a chunk each, `Receiver._accept`).
COALESCE_FILES = 16
#: Chunks digested at once (each holds one chunk in memory).
VERIFY_CONCURRENCY = 4
#: Bytes of small files held in memory while their part files are made in
#: threads (`Receiver._whole_in_memory`); past this, they are written from
#: the reactor, which then reads the socket late and so tells the sender.
UNWRITTEN_BYTES = 32 << 20
#: Small files are placed in batches (`storage.place_batch`) of up to this
#: many files or bytes, a batch going at most this many seconds after its
#: first file arrived.
PLACE_BATCH_FILES = 64
PLACE_BATCH_BYTES = 4 << 20
PLACE_BATCH_DELAY = 0.01
#: A missing report holds at most this many ranges, about 50 KB encoded.
REPORT_RANGES = 12000
# Every `FEEDBACK_INTERVAL` a receiver reads its meter and reports what it
# reads if there is anything to report: silence means all is well, and a
# queue that many receivers share is reported by a sample of them
# (`ECHO_STALE`), so feedback grows with trouble, not with the number of
# receivers.
#: Queueing delay below this is not worth a report.
FEEDBACK_DELAY = 0.002
#: Nor is loss below this: the sender's rate follows delay, and loss counts
#: only to tell a receiver far slower than the rest (which loses most of
#: what is sent), so the random loss of a flaky link costs no feedback.
FEEDBACK_LOSS = 0.1
#: Nor is a receive queue less than this full (a share of its buffer).
FEEDBACK_BACKLOG = 0.25
#: An echo from the sender (`ratecontrol.Echo`) older than this is not
#: trusted to keep a receiver quiet: three intervals, so one lost echo
#: changes nothing and a sender that stopped echoing hears from everyone.
ECHO_STALE = 3 * FEEDBACK_INTERVAL
#: Parities kept for groups that lack more blocks than parities arrived
#: (about 6 MB of them at most).
KEPT_PARITIES = 4096
#: The longest a missing report waits for the datagrams on their way
#: (`Receiver.settled`).  Only lost datagrams at a pass's end and the echo
#: after them make it wait this long: an echo goes out every
#: `meter.FEEDBACK_INTERVAL`, and once one is read all before it are in or
#: lost.  It was 0.05 s, the fixed pause a sender used to make after each
#: pass, and receivers short of CPU answered before reading what was in
#: their sockets, which cost a pass and a round of asking every receiver.
SETTLE_LIMIT = 0.25
#: How often a report waiting to settle looks again.
SETTLE_POLL = 0.002
#: The longest a missing report that would ask for nothing waits for the
#: chunks being verified and the files being committed, to say ``done``:
#: the sender asks again once it answers, and a report that came while the
#: last chunks were verified cost a round of asking every receiver (five
#: such rounds ended scenario H, 64 receivers short of CPU).
SETTLE_VERIFYING = 1.0


#: A packed file's states here (`_PackBooks`): its blocks are wanted; it is
#: whole and being verified and placed; it is settled (placed, failed, or
#: never needed here).
WANTED, PLACING, SETTLED = 0, 1, 2


@dataclass(slots=True)
class _PackBooks:
    """The members of a pack (`manifest.Pack`) and how far each is."""

    pack: Pack
    #: A state (`WANTED`, `PLACING`, `SETTLED`) by member position.
    state: bytearray
    #: Members not `SETTLED`: the pack is done with when none is.
    unsettled: int
    #: Members whose bytes once failed their digest: a source changed at
    #: the sender sends zeros once, and its next question names the file
    #: abandoned; a second failure is forged or corrupted data.
    mismatched: set[int]


@dataclass(slots=True)
class _IncomingFile:
    """A file's books, or a pack's (``pack``), whose blocks are one stream."""

    index: int
    entry: Entry
    part: str
    ledger: BlockLedger
    result: str | None = None
    unchanged: bool = False
    has_part: bool = False
    pack: _PackBooks | None = None


class Receiver:
    """One transfer into one destination directory on this host."""

    def __init__(
        self,
        reactor: Any,
        destination: str,
        channel: Channel,
        *,
        options: TransferOptions = DEFAULT_OPTIONS,
        rcvbuf: int = DEFAULT_RCVBUF,
        on_done: Callable[[Receiver], None] | None = None,
        name: str | None = None,
        allow_setid: bool = False,
    ) -> None:
        """
        ``name`` is this host's name at the sender, by which the sender's
        echo tells it that it is the monitor (see `ratecontrol.report_due`).
        ``allow_setid`` (the node's ``allow_setid``): files keep their
        set-id bits when the transfer also sets owners; else they lose them.
        """
        self.reactor = reactor
        self.destination = destination
        self.channel = channel
        self.options = options
        #: Paths this transfer changed (written, linked or deleted), for hooks.
        self.changed: list[str] = []
        #: Bytes of file data this host needs, known once it is prepared.
        self.needed_bytes = 0
        self.rcvbuf = rcvbuf
        self.allow_setid = allow_setid
        self.on_done = on_done
        self.stats: Counter[str] = Counter()
        self.results: dict[str, str] = {}
        self.done = False
        self._files: dict[int, _IncomingFile] = {}
        #: The files with no result yet, in manifest order: asked about at
        #: every commit and every few milliseconds while a report settles,
        #: which over all files cost a tree of 10,000 a third of its CPU.
        self._awaiting: dict[int, _IncomingFile] = {}
        #: Their `NEEDED` chunks, all told: whether anything is still wanted.
        self._needed_chunks = 0
        self._open: OrderedDict[int, int] = OrderedDict()
        self._port: intake.IntakePort | None = None
        self._root_fd = -1
        self._verify = defer.DeferredSemaphore(VERIFY_CONCURRENCY)
        self._manifest = Manifest([])
        self._transfer_id = b""
        self._cipher: datagram.DatagramCipher | None = None
        self._pending_commits = 0
        self._pending: dict[int, tuple[int, bytearray]] = {}
        #: Bytes taken by `_whole_in_memory` and not yet written.
        self._unwritten = 0
        #: Small files waiting to be placed together (`_place_whole`), each a
        #: file's own or a pack's member (by position; -1 for a file's own).
        self._batch: list[tuple[_IncomingFile, int, bytearray]] = []
        #: Packed files whole but not yet taken into a batch, while
        #: `UNWRITTEN_BYTES` are: their bytes stay where they are.
        self._held_back: deque[tuple[_IncomingFile, int]] = deque()
        self._batch_bytes = 0
        self._batch_timer: IDelayedCall | None = None
        #: Set by the agent: where loss and delay reports go.
        self.on_feedback: Callable[[Feedback], None] | None = None
        self._feedback = task.LoopingCall(self._measured)
        self._feedback.clock = reactor
        self._node_id = node_id(name) if name is not None else None
        #: The sender's last echo, and when it came.
        self._echo: tuple[float, Echo] | None = None
        #: Draws whether a report that is no news goes out (`Echo.share`).
        self.random = random.Random()
        self.meter = DelayLossMeter()
        self._kept = KeptParities(KEPT_PARITIES)
        self._threads = 0
        self._closing = False
        self._drained: list[defer.Deferred] = []
        #: Missing reports waiting to settle, and their next look.
        self._settling: dict[defer.Deferred, IDelayedCall] = {}

    def _in_thread(self, f: Callable[..., Any], *args: object) -> defer.Deferred:
        """
        Blocking filesystem work goes to the reactor's thread pool.  The
        calls use the destination's descriptor, so `close` waits for the
        last of them before it closes it.
        """
        self._threads += 1
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

        def finished(result: object) -> object:
            self._threads -= 1
            self._close_root()
            return result

        return d.addBoth(finished)

    def _close_root(self) -> None:
        if self._closing and not self._threads:
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    # Setting up.

    def prepare(
        self,
        transfer_id: bytes,
        key: bytes,
        manifest: Manifest,
        cipher: str = datagram.AES_256_GCM,
        in_flight: frozenset[bytes] = frozenset(),
    ) -> defer.Deferred:
        """
        Join the group, survey the destination and answer with what this
        host needs: ``{file index: RangeSet of chunk numbers}``.  ``key``
        is the datagram key of the sender's run; the part files of the
        transfers ``in_flight`` here are kept, and stale ones of others
        removed (`storage.Sweep`).
        """
        if not (self.allow_setid and self._owner()):
            manifest = storage.without_setid(manifest)
        self._transfer_id, self._manifest = transfer_id, manifest
        self._cipher = datagram.DatagramCipher(transfer_id, key, cipher)
        if self.options.dry_run:
            self._root_fd = (
                os.open(self.destination, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                if os.path.isdir(self.destination)
                else -1
            )
            d = self._in_thread(storage.survey, self._root_fd, manifest, transfer_id, True)
            d.addCallback(self._surveyed_dry)
            if self.options.delete:
                d.addCallback(self._would_delete)
            return d
        self._root_fd = fsutil.open_destination(self.destination)
        sock = receiver_socket(self.channel, self.rcvbuf)
        self._port = intake.IntakePort(self.reactor, sock, self._cipher, manifest.block_size, self.received)
        self._port.startReading()
        self._feedback.start(FEEDBACK_INTERVAL, now=False)
        sweep = storage.Sweep(in_flight | {transfer_id})
        d = self._in_thread(storage.survey, self._root_fd, manifest, transfer_id, False, self._owner(), sweep)
        d.addCallback(self._swept, sweep)
        d.addCallback(self._surveyed)
        return d

    def _swept(self, survey: _Survey, sweep: storage.Sweep) -> _Survey:
        if sweep.removed:
            log.info(
                "removed {n} stale part files under {destination} (of transfers not in flight, untouched"
                " for {hours:.0f} h): {first}",
                n=len(sweep.removed),
                destination=self.destination,
                hours=storage.STALE_PART_SECONDS / 3600,
                first=", ".join(sweep.removed[:3]) + (", ..." if len(sweep.removed) > 3 else ""),
            )
        return survey

    def _surveyed_dry(self, survey: _Survey) -> dict[int, RangeSet]:
        """A dry run ends once it knows what it needs."""
        needs = {}
        for index, entry in self._manifest.files():
            held = survey[index]
            if isinstance(held, str):
                self.results[entry.path] = held
                continue
            need = RangeSet.where(held.status, NEEDED)  # the survey leaves chunks NEEDED or DONE
            if need:
                needs[index] = need
            self.results[entry.path] = "unchanged" if held.unchanged else WOULD_RECEIVE
        needs = self._manifest.wire_needs(needs)
        self.needed_bytes = self._manifest.bytes_in(needs, chunks=True)
        self.done = True
        return needs

    def _would_delete(self, needs: dict[int, RangeSet]) -> defer.Deferred:
        """A dry run with ``delete`` lists what it would delete too (results: ``would delete``)."""

        def listed(paths: list[str]) -> dict[int, RangeSet]:
            self.results.update(dict.fromkeys(paths, WOULD_DELETE))
            return needs

        d = self._in_thread(
            storage.would_delete,
            self._root_fd,
            self._manifest,
            self.options.backup_suffix,
            self.options.protect,
        )
        return d.addCallback(listed)

    def _surveyed(self, survey: _Survey) -> dict[int, RangeSet]:
        needs: dict[int, RangeSet] = {}
        packed_in = self._manifest.packed_in
        members: dict[int, list[int]] = {}
        for index, entry in self._manifest.files():
            held = survey[index]
            if isinstance(held, str):
                self.results[entry.path] = held
                continue
            if held.in_place:
                # Most of an unchanged tree: its result is all it needs (an
                # object, a ledger and a part name for each cost a node 20 µs
                # a file, 2 s of an unchanged push of 100,000).
                self.results[entry.path] = OK
                continue
            place = packed_in.get(index)
            if place is not None and NEEDED in held.status:
                members.setdefault(place[0], []).append(place[1])
                continue
            f = _IncomingFile(
                index=index,
                entry=entry,
                part=storage.part_name(self._transfer_id, index),
                ledger=BlockLedger(self._manifest.blocks(entry), self._manifest.chunk_blocks, held.status),
                unchanged=held.unchanged,
                has_part=held.has_part,
            )
            if place is not None:
                # Its bytes are here already (its mode changed, or an old copy
                # matches): committed, and no book at its index, which is its
                # pack's on the wire.
                self._commit(f)
                continue
            self._files[index] = self._awaiting[index] = f
            self._needed_chunks += held.status.count(NEEDED)
            if NEEDED in held.status:  # the survey leaves chunks NEEDED or DONE
                needs[index] = RangeSet.where(held.status, NEEDED)
            else:
                self._commit(f)
        for head, positions in members.items():
            needs[head] = self._expect_pack(self._manifest.packs[head], positions)
        self.needed_bytes = self._manifest.bytes_in(needs, chunks=True)
        self._maybe_finish()
        return needs

    def _expect_pack(self, pack: Pack, positions: list[int]) -> RangeSet:
        """Books for the members of ``pack`` at ``positions``, which this host lacks; the need for them."""
        state = bytearray([SETTLED]) * len(pack.members)
        for position in positions:
            state[position] = WANTED
        need = RangeSet((position, position + 1) for position in positions)
        status = bytearray([DONE]) * self._manifest.unit_blocks(pack.head)
        for first, end in self._manifest.pack_blocks(pack.head, need).ranges:
            status[first:end] = bytes(end - first)  # NEEDED
        part = storage.pack_name(self._transfer_id, pack.head)
        f = _IncomingFile(
            index=pack.head,
            entry=Entry(part, FILE, 0o600, 0, size=pack.size),
            part=part,
            ledger=BlockLedger(len(status), 1, bytes(status)),
            pack=_PackBooks(pack, state, len(positions), set()),
        )
        self._files[pack.head] = self._awaiting[pack.head] = f
        self._needed_chunks += status.count(NEEDED)
        return need

    # Data.

    def received(self, batch: intake.Batch, payloads: memoryview) -> None:
        """
        A batch from the intake: up to 85,000 datagrams a second arrive at
        1 Gbit/s, mostly as runs of a file's consecutive blocks, so the
        books are kept once per run.  ``payloads`` is read over by the
        next batch: what must stay is copied.
        """
        stats = self.stats
        for reason, count in zip(intake.REJECTIONS, batch.rejected, strict=True):
            if count:
                stats[reason.value] += count
        newest = self.meter.seq_max
        if batch.got:
            now = self.reactor.seconds()
            port = self._port
            socket_view = receive_queue(port.socket) if port is not None else None
            if socket_view is not None:
                self.meter.overflowed(socket_view[1])
            self.meter.count(batch.got, batch.seq_max, batch.owd_sum, batch.owd_min, batch.owd_count, now)
        size = self._manifest.block_size
        meter = self.meter
        for kind, file_index, first, count, offset, length, sequence in batch.runs:
            meter.arrived(sequence - count + 1, sequence)
            f = self._files.get(file_index)
            if f is None or first + count > f.ledger.nblocks:
                if kind == KIND_ECHO:
                    # Only an echo newer than every earlier datagram is the
                    # sender's current view: an older one is late, or
                    # replayed by someone on the LAN.
                    if sequence > newest:
                        newest = sequence
                        self._heard_echo(bytes(payloads[offset : offset + length]))
                elif f is None and self._in_place(file_index, first + count):
                    stats["duplicate" if kind == KIND_DATA else "parity_unused"] += count
                else:
                    stats[datagram.Reason.RANGE.value] += count
                continue
            if kind != KIND_DATA:
                if kind == KIND_PARITY:
                    self._rebuild(f, first, bytes(payloads[offset : offset + length]))
                else:
                    stats[datagram.Reason.RANGE.value] += 1  # an ECHO names no file
                continue
            # Every block of a run but the last is whole (`intake.Run`): the
            # last must be as long as the manifest says that block is.
            last = first + count - 1
            if length - (count - 1) * size != self._manifest.block_length(f.entry, last):
                stats[datagram.Reason.RANGE.value] += 1
                count -= 1
                length = count * size
                if not count:
                    continue
            self._take_run(f, first, count, payloads[offset : offset + length])

    def _in_place(self, index: int, end: int) -> bool:
        """Whether ``index`` is a file this host held already, and ``end`` within its blocks."""
        entries = self._manifest.entries
        if not 0 <= index < len(entries):
            return False
        if index in self._manifest.packs:  # one that holds nothing this host lacks
            return end <= self._manifest.unit_blocks(index)
        if index in self._manifest.packed_in:  # no datagram carries a packed file's own index
            return False
        entry = entries[index]
        return (
            entry.kind == FILE and end <= self._manifest.blocks(entry) and self.results.get(entry.path) == OK
        )

    def _take_run(self, f: _IncomingFile, first: int, count: int, data: memoryview) -> None:
        """Take a run of blocks, or those of it not held yet (the rest are duplicates)."""
        if f.result is None and f.ledger.fresh(first, count):
            self._accept(f, first, count, data)
            return
        size = self._manifest.block_size
        for i in range(count):
            if f.result is not None or f.ledger.held(first + i):
                self.stats["duplicate"] += 1
            else:
                self._accept(f, first + i, 1, data[i * size : (i + 1) * size])

    def _rebuild(self, f: _IncomingFile, number: int, parity: bytes) -> None:
        """
        Parities of a group rebuild as many blocks of it as there are
        parities (see `erasure`): a parity is kept until the group has as
        many as it lacks blocks (`_solve`).  Kept parities are bounded
        (`KEPT_PARITIES`), oldest group first.
        """
        size = self._manifest.block_size
        group, index = divmod(number, self._manifest.parity_group)
        if index >= erasure.MAX_PARITIES or len(parity) != size:
            self.stats[datagram.Reason.RANGE.value] += 1
            return
        key = (f.index, group)
        # A failed file's bitmap is gone, and a committed one lacks nothing.
        missing = self._group_missing(f, group) if f.result is None else []
        if not missing:
            self.stats["parity_unused"] += 1
            self._kept.take(key)
            return
        kept = self._kept.keep(key, index, parity)
        if kept is None:
            self.stats["parity_unused"] += 1
            return
        if len(kept) < len(missing):
            self.stats["parity_kept"] += 1
            self._kept.trim()
            return
        self._solve(f, group, missing)

    def _solve(self, f: _IncomingFile, group: int, missing: list[int]) -> None:
        """
        The group has as many kept parities as it lacks blocks: read back
        the blocks held from the part file, solve for the missing ones and
        accept them as if received.
        """
        size, count = self._manifest.block_size, self._manifest.parity_group
        kept = self._kept.take((f.index, group))
        first = group * count
        last = min(first + count, f.ledger.nblocks)
        if not self._flush(f.index):
            return
        try:
            data = os.pread(self._fd(f), (last - first) * size, first * size)
        except OSError as e:
            self._fail(f, f"cannot read back: {e.strerror}")
            return
        held = {b - first: data[(b - first) * size : (b - first + 1) * size] for b in range(first, last)}
        for b in missing:
            del held[b - first]
        rebuilt = erasure.decode(size, held, kept, [b - first for b in missing])
        for b in missing:
            if f.pack is not None and f.ledger.status[b] != NEEDED:
                continue  # a pack's block that holds no member this host takes
            self.stats["rebuilt"] += 1
            self._accept(f, b, 1, rebuilt[b - first][: self._manifest.block_length(f.entry, b)])
            if f.result is not None:
                return

    def _accept(self, f: _IncomingFile, first: int, count: int, data: bytes | memoryview) -> None:
        """
        Take a run of blocks that are not held yet.  Runs that follow one
        another within a chunk are gathered and written together, so a
        chunk that arrives in order is one pwrite, and is digested from
        memory instead of read back from its part file (`_check_chunk`).
        Whatever is read back (a chunk gathered in pieces, a group to
        rebuild) is written out first.
        """
        size, cb = self._manifest.block_size, self._manifest.chunk_blocks
        split = (first // cb + 1) * cb
        if first + count > split:  # gathered bytes never span two chunks
            head = split - first
            self._accept(f, first, head, data[: head * size])
            if f.result is None:
                self._accept(f, split, count - head, data[head * size :])
            return
        offset = first * size
        pending = self._pending.get(f.index)
        if pending is not None and pending[0] + len(pending[1]) == offset and first % cb:
            pending[1].extend(data)
        else:
            if not self._flush(f.index):
                return
            if len(self._pending) >= COALESCE_FILES:
                self._flush(next(iter(self._pending)))
            self._pending[f.index] = (offset, bytearray(data))
        self.stats["blocks"] += count
        self.stats["bytes"] += len(data)
        taken = f.ledger.take(first, count)
        self._needed_chunks -= len(taken)
        if f.pack is not None:
            self._members_whole(f, f.pack, first, first + count)
            taken = []
        for chunk in taken:
            whole = self._whole_in_memory(f)
            if whole is not None:
                self._place_whole(f, whole)
                continue
            held = self._chunk_in_memory(f, chunk)
            if not self._flush(f.index):
                return
            self._verify.run(self._check_chunk, f, chunk, held)
        if self._kept:
            # After the chunks' own bookkeeping: solving accepts other blocks.
            group = self._manifest.parity_group
            for number in range(first // group, (first + count - 1) // group + 1):
                if f.result is not None:
                    return
                self._solve_if_ready(f, number)

    def _members_whole(self, f: _IncomingFile, books: _PackBooks, first: int, last: int) -> None:
        """Blocks ``[first, last)`` of a pack arrived: the members they made whole are verified and placed."""
        size, status = self._manifest.block_size, f.ledger.status
        pack = books.pack
        for position in pack.within(first * size, last * size):
            if books.state[position] != WANTED:
                continue
            start, end = pack.blocks_of(position, size)
            if status.find(NEEDED, start, end) >= 0:
                continue
            books.state[position] = PLACING
            if self._held_back or self._unwritten > UNWRITTEN_BYTES:
                self._held_back.append((f, position))
            elif not self._take_member(f, books, position):
                return

    def _take_member(self, f: _IncomingFile, books: _PackBooks, position: int) -> bool:
        """
        A whole member's bytes join the next batch (`_place_whole`): from
        what is gathered of the pack, or else read back from its part file.
        False if that failed the pack.
        """
        start, end = books.pack.span(position)
        pending = self._pending.get(f.index)
        if pending is not None and pending[0] <= start and end <= pending[0] + len(pending[1]):
            data = pending[1][start - pending[0] : end - pending[0]]
        else:
            read = None
            if self._flush(f.index):
                try:
                    read = os.pread(self._fd(f), end - start, start)
                except OSError as e:
                    self._fail(f, f"cannot read back: {e.strerror}")
            if read is None:
                # It is whole, so the pack's failure passed it over.
                self._member_failed(f, books, position, f.result or "cannot read back")
                return False
            data = bytearray(read)
        self._unwritten += len(data)
        self._place_whole(f, data, position)
        return True

    def _take_held_back(self) -> None:
        """Batches were written: members held back (`_members_whole`) may now join one."""
        while self._held_back and self._unwritten <= UNWRITTEN_BYTES:
            f, position = self._held_back.popleft()
            books = f.pack
            if books is None or books.state[position] != PLACING:
                continue
            if f.result is not None:  # the pack failed meanwhile
                self._member_failed(f, books, position, f.result)
            else:
                self._take_member(f, books, position)

    def _placed_member(self, got: bytes, f: _IncomingFile, position: int) -> None:
        books = f.pack
        assert books is not None
        entry = self._manifest.entries[books.pack.members[position]]
        if got == entry.chunk_digest(0):
            # In place, whole and verified, whatever happened meanwhile.
            self.results[entry.path] = OK
            self.changed.append(entry.path)
            self._settle_member(f, books, position)
            return
        if f.result is not None:  # the pack failed meanwhile
            self._member_failed(f, books, position, f.result)
            return
        if position in books.mismatched:
            self.stats["corrupt_chunks"] += 1
        books.mismatched.add(position)
        log.warn("{path} failed verification, asking again", path=entry.path)
        books.state[position] = WANTED
        first, end = books.pack.blocks_of(position, self._manifest.block_size)
        for block in range(first, end):
            if f.ledger.status[block] != NEEDED:
                f.ledger.forget(block)
                self._needed_chunks += 1

    def _member_failed(self, f: _IncomingFile, books: _PackBooks, position: int, reason: str) -> None:
        """A member will not arrive: its blocks that hold no other member still wanted are not asked for."""
        pack = books.pack
        entry = self._manifest.entries[pack.members[position]]
        log.error("{path}: {reason}", path=entry.path, reason=reason)
        self.results[entry.path] = reason
        books.state[position] = SETTLED
        size = self._manifest.block_size
        first, end = pack.blocks_of(position, size)
        for block in range(first, end):
            if all(
                books.state[other] != WANTED for other in pack.within(block * size, (block + 1) * size)
            ) and f.ledger.unwant(block):
                self._needed_chunks -= 1
        self._settle_member(f, books, position)

    def _settle_member(self, f: _IncomingFile, books: _PackBooks, position: int) -> None:
        books.state[position] = SETTLED
        books.unsettled -= 1
        if books.unsettled:
            return
        # The pack is done with: what is gathered of it and its part file go.
        if f.result is None:
            f.result = OK
        f.ledger.close()
        self._pending.pop(f.index, None)
        fd = self._release(f)
        if fd is not None:
            os.close(fd)
        if f.has_part and self._root_fd >= 0 and not self._closing:
            storage.discard_part(self._root_fd, f.entry.path, f.part)
        self._no_longer_awaited(f)
        self._maybe_finish()

    def _chunk_in_memory(self, f: _IncomingFile, chunk: int) -> bytearray | None:
        """
        The gathered bytes if they are the whole chunk and a digest can
        start at once; a chunk that would wait for one is read back later
        instead, so that at most `VERIFY_CONCURRENCY` chunks are held.
        """
        pending = self._pending.get(f.index)
        if pending is None or not self._verify.tokens:
            return None
        if (pending[0], len(pending[1])) != self._manifest.chunk_span(f.entry, chunk):
            return None
        return pending[1]

    def _solve_if_ready(self, f: _IncomingFile, group: int) -> None:
        """A block arrived for a group with kept parities: they may now be enough."""
        kept = self._kept.get((f.index, group))
        if kept is None:
            return
        missing = self._group_missing(f, group)
        if not missing:
            self._kept.take((f.index, group))
        elif len(kept) >= len(missing):
            self._solve(f, group, missing)

    def _group_missing(self, f: _IncomingFile, group: int) -> list[int]:
        """
        The blocks of a parity group that are not held yet.  A pack's are
        those not received, if any is wanted: this host holds no data where
        members it does not take lie, which a parity must solve for too.
        """
        first = group * self._manifest.parity_group
        last = min(first + self._manifest.parity_group, f.ledger.nblocks)
        if f.pack is None:
            return f.ledger.missing(first, last)
        status = f.ledger.status
        if status.find(NEEDED, first, last) < 0:
            return []
        return [b for b in range(first, last) if status[b] != VERIFYING]

    def _flush(self, index: int) -> bool:
        """Write out what is gathered for a file; False if that failed it."""
        pending = self._pending.pop(index, None)
        if pending is None:
            return True
        f = self._files[index]
        offset, data = pending
        try:
            storage.pwrite_all(self._fd(f), data, offset)
        except OSError as e:
            self._fail(f, f"cannot write: {e.strerror}")
            return False
        return True

    def _flush_all(self) -> None:
        for index in list(self._pending):
            self._flush(index)

    def _measured(self) -> None:
        port = self._port
        report = self.meter.reading(
            receive_queue(port.socket) if port is not None else None, self.reactor.seconds()
        )
        if report is None or self.on_feedback is None:
            return
        if report.loss >= FEEDBACK_LOSS or (
            (report.delay > FEEDBACK_DELAY or report.backlog >= FEEDBACK_BACKLOG) and self._report_due(report)
        ):
            self.on_feedback(report)

    def _heard_echo(self, payload: bytes) -> None:
        echo = Echo.unpack(payload)
        if echo is None:
            self.stats[datagram.Reason.RANGE.value] += 1
            return
        self._echo = (self.reactor.seconds(), echo)

    def _report_due(self, report: Feedback) -> bool:
        """A queue is reported unless a recent echo says it is no news (`ratecontrol.report_due`)."""
        if self._echo is None or self.reactor.seconds() - self._echo[0] > ECHO_STALE:
            return True
        return report_due(report, self._echo[1], self._node_id, self.random.random())

    def _fd(self, f: _IncomingFile) -> int:
        fd = self._open.get(f.index)
        if fd is not None:
            self._open.move_to_end(f.index)
            return fd
        fd = storage.open_part(self._root_fd, f.entry, f.part, create=not f.has_part)
        f.has_part = True
        self._open[f.index] = fd
        if len(self._open) > OPEN_FILES:
            os.close(self._open.popitem(last=False)[1])
        return fd

    def _release(self, f: _IncomingFile) -> int | None:
        return self._open.pop(f.index, None)

    def _check_chunk(self, f: _IncomingFile, chunk: int, held: bytearray | None) -> defer.Deferred:
        """Digest a chunk in a thread: the bytes ``held`` (already written), or else read back."""
        if held is not None:
            d = self._in_thread(digest, held)
        else:
            offset, length = self._manifest.chunk_span(f.entry, chunk)
            d = self._in_thread(storage.digest_range, self._root_fd, f.entry.path, f.part, offset, length)
        d.addCallbacks(self._checked, self._unreadable, (f, chunk), errbackArgs=(f,))
        return d

    def _checked(self, got: bytes, f: _IncomingFile, chunk: int) -> None:
        if f.result is not None or self._closing:
            return
        if got == f.entry.chunk_digest(chunk):
            if f.ledger.verified(chunk):
                self._commit(f)
            return
        # Only a corrupted disk or a changed source gets here: datagrams are
        # authenticated.  Forget the chunk so that it is asked for again.
        self.stats["corrupt_chunks"] += 1
        log.warn("{path}: chunk {chunk} failed verification, asking again", path=f.entry.path, chunk=chunk)
        f.ledger.forget(chunk)
        self._needed_chunks += 1

    def _whole_in_memory(self, f: _IncomingFile) -> bytearray | None:
        """
        A small file's bytes (one chunk), all gathered and not yet written,
        with no part file of its own yet: taken out of the gathering.  Such a
        file is verified, written and put in place in a thread (`_place_whole`):
        a file's creation costs 10 µs to 1 ms by filesystem, a tree of small
        files pays it for every one, and in the reactor it stalls the
        reading of the socket, whose buffer then overflows.
        """
        pending = self._pending.get(f.index)
        if f.has_part or pending is None or pending[0] != 0 or len(pending[1]) != f.entry.size:
            return None
        if len(f.ledger.status) > 1:  # its one digest is the file's
            return None
        if self._unwritten + f.entry.size > UNWRITTEN_BYTES:
            return None
        del self._pending[f.index]
        self._unwritten += f.entry.size
        return pending[1]

    def _place_whole(self, f: _IncomingFile, data: bytearray, position: int = -1) -> None:
        """
        What `_whole_in_memory` took, or a pack's member (its ``position``),
        joins the next batch of small files to verify and place together
        (`storage.place_batch`): a batch goes when it is big enough, or
        `PLACE_BATCH_DELAY` after its first file.
        """
        if position < 0:
            f.has_part = True  # from now on: a failure or a discard removes it
        self._batch.append((f, position, data))
        self._batch_bytes += len(data)
        if len(self._batch) >= PLACE_BATCH_FILES or self._batch_bytes >= PLACE_BATCH_BYTES:
            self._send_batch()
        elif self._batch_timer is None:
            self._batch_timer = self.reactor.callLater(PLACE_BATCH_DELAY, self._send_batch)

    def _send_batch(self) -> None:
        if self._batch_timer is not None and self._batch_timer.active():
            self._batch_timer.cancel()
        self._batch_timer = None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if batch:
            self._verify.run(self._place_batch, batch)

    def _place_batch(self, batch: list[tuple[_IncomingFile, int, bytearray]]) -> defer.Deferred:
        entries = self._manifest.entries
        files = []
        for f, position, data in batch:
            if f.pack is None:
                files.append((f.entry, f.part, data))
            else:
                member = f.pack.pack.members[position]
                files.append((entries[member], storage.part_name(self._transfer_id, member), data))
        d = self._in_thread(
            storage.place_batch, self._root_fd, files, self._owner(), self.options.backup_suffix
        )

        def placed(results: list[bytes | OSError]) -> None:
            for (f, position, _), result in zip(batch, results, strict=True):
                if isinstance(result, OSError):
                    self._unwritable(Failure(result), f, position)
                elif f.pack is not None:
                    self._placed_member(result, f, position)
                else:
                    self._placed_whole(result, f)

        def failed(failure: Failure) -> None:
            for f, position, _ in batch:
                self._unwritable(failure, f, position)

        def written(result: object) -> object:
            self._unwritten -= sum(len(data) for _, _, data in batch)
            self._take_held_back()
            return result

        d.addBoth(written)
        d.addCallbacks(placed, failed)
        return d

    def _placed_whole(self, got: bytes, f: _IncomingFile) -> None:
        if got != f.entry.chunk_digest(0):
            f.has_part = False  # nothing was written
            self._checked(got, f, 0)
            return
        # In place, whole and verified, whatever happened meanwhile.
        f.ledger.verified(0)
        f.ledger.close()
        if f.result is None:
            self._conclude(f, OK)
            self.changed.append(f.entry.path)
        self._maybe_finish()

    def _conclude(self, f: _IncomingFile, result: str) -> None:
        f.result = self.results[f.entry.path] = result
        self._no_longer_awaited(f)

    def _no_longer_awaited(self, f: _IncomingFile) -> None:
        """``f`` has its result: it is not asked about again, nor are its chunks wanted."""
        if self._awaiting.get(f.index) is f:  # not a packed file committed alone (`_surveyed`)
            del self._awaiting[f.index]
            self._needed_chunks -= f.ledger.status.count(NEEDED)

    def _unwritable(self, failure: Failure, f: _IncomingFile, position: int = -1) -> None:
        why = failure.value.strerror if isinstance(failure.value, OSError) else failure.getErrorMessage()
        if f.pack is not None:
            if f.pack.state[position] == PLACING:
                self._member_failed(f, f.pack, position, f"cannot write: {why}")
                member = f.pack.pack.members[position]
                if self._root_fd >= 0 and not self._closing:  # `place_batch` may have left it
                    path = self._manifest.entries[member].path
                    storage.discard_part(self._root_fd, path, storage.part_name(self._transfer_id, member))
            return
        self._fail(f, f"cannot write: {why}")

    def _unreadable(self, failure: object, f: _IncomingFile) -> None:
        self._fail(f, f"cannot read back: {getattr(failure, 'value', failure)}")

    def _fail(self, f: _IncomingFile, reason: str) -> None:
        if f.result is not None:
            return
        if f.pack is not None:
            # Its members that are not whole fail; those being placed finish, and then the pack.
            books = f.pack
            f.result = reason
            for position in range(len(books.state)):
                if books.state[position] == WANTED:
                    self._member_failed(f, books, position, reason)
            return
        log.error("{path}: {reason}", path=f.entry.path, reason=reason)
        self._conclude(f, reason)
        f.ledger.close()
        if self._files.get(f.index) is f:  # else a packed file committed alone: the index is its pack's
            self._pending.pop(f.index, None)
            fd = self._release(f)
            if fd is not None:
                os.close(fd)
        if self._root_fd >= 0 and not self._closing:
            storage.discard_part(self._root_fd, f.entry.path, f.part)
        self._maybe_finish()

    # Committing.

    def _commit(self, f: _IncomingFile) -> None:
        f.ledger.close()
        self._pending_commits += 1
        d = self._in_thread(
            storage.place_file,
            self._root_fd,
            f.entry,
            f.part,
            self._release(f),
            self._owner(),
            f.unchanged,
            self.options.backup_suffix,
            f.has_part,
        )

        def placed(_: object) -> None:
            self._conclude(f, OK)
            if not f.unchanged:
                self.changed.append(f.entry.path)

        def failed(failure: object) -> None:
            self._fail(f, f"cannot commit: {getattr(failure, 'value', failure)}")

        d.addCallbacks(placed, failed)
        d.addBoth(self._committed)

    def _committed(self, _: object) -> None:
        self._pending_commits -= 1
        self._maybe_finish()

    def _owner(self) -> bool:
        return self.options.preserve_owner and fsutil.may_set_owners()

    def _maybe_finish(self) -> None:
        if self.done or self._pending_commits or not self._port:
            return
        if self._awaiting:
            return
        self._pending_commits += 1  # hold off re-entry while links are made
        d = self._in_thread(
            storage.finish_tree,
            self._root_fd,
            self._manifest,
            dict(self.results),
            self._owner(),
            self.options.delete,
            self.options.backup_suffix,
            self.options.protect,
        )
        d.addErrback(self._unfinished)
        d.addCallback(self._finished)

    def _unfinished(self, failure: Failure) -> tuple[dict[str, str], list[str]]:
        """Links and directories could not be finished: say so, rather than never end."""
        log.failure("finishing the tree under {destination}", failure, destination=self.destination)
        reason = f"cannot finish the tree: {failure.getErrorMessage()}"
        return {e.path: reason for e in self._manifest.entries if e.kind in (DIR, SYMLINK, HARDLINK)}, []

    def _finished(self, finished: tuple[dict[str, str], list[str]]) -> None:
        results, changed = finished
        self._pending_commits -= 1
        self.results.update(results)
        self.changed.extend(changed)
        self.done = True
        if self._feedback.running:
            self._feedback.stop()
        if self._port is not None:
            self._port.stopListening()
        if self.on_done is not None:
            self.on_done(self)

    # Feedback.

    def settled(
        self, through: int | None, limit: float = SETTLE_LIMIT, verifying: float = SETTLE_VERIFYING
    ) -> defer.Deferred:
        """
        Fires once a missing report would say what was lost, not what is
        on its way: once every datagram sent before sequence number
        ``through`` has been read (or is gone: the last one read is at
        least the one before ``through``), and no chunk is being verified
        nor any file committed, which would make the report end with
        ``done``.  A sender asks this right after a pass instead of pausing
        for the datagrams still queued on the way and in our socket, so a
        repair round costs a round trip, not a guess.  After ``limit``
        seconds it fires anyway (the pass's last datagrams may all be
        lost), and so it does once all is read and something is wanted
        (a repair round need not wait for verifying); with all read and
        nothing wanted, after ``verifying``.  Without ``through`` (a probe
        during a pass, which counts only what was sent well before) it fires
        at once, as it does once the receiver is done or closing.
        """
        if through is None or self._settled(through, False):
            return defer.succeed(None)
        now = self.reactor.seconds()
        deadline, verified_by = now + limit, now + verifying
        settled: defer.Deferred = defer.Deferred()

        def look() -> None:
            del self._settling[settled]
            now = self.reactor.seconds()
            if self._settled(through, now >= deadline) or now >= verified_by:
                settled.callback(None)
            else:
                self._settling[settled] = self.reactor.callLater(SETTLE_POLL, look)

        self._settling[settled] = self.reactor.callLater(SETTLE_POLL, look)
        return settled

    def _settled(self, through: int, late: bool) -> bool:
        """Whether to answer now; ``late``: past the wait for datagrams on the way."""
        if self.done or self._closing:
            return True
        if not self.meter.heard_through(through):
            return late
        if not self._threads and self._verify.tokens == self._verify.limit and not self._batch:
            return True
        return late and self._wants_something()

    def _wants_something(self) -> bool:
        """Some chunk's blocks are still wanted (what `missing` would ask for), asked every `SETTLE_POLL`."""
        return self._needed_chunks > 0

    def missing(
        self, abandoned: Mapping[int, str] = {}, before: tuple[int, int] | None = None
    ) -> MissingReport:
        """
        What this host still needs, bounded in size (see `REPORT_RANGES`);
        with ``before`` (a file and block), only what lies before it.
        Files the sender ``abandoned`` are failed with its reason first.
        """
        packed_in = self._manifest.packed_in
        for index, reason in abandoned.items():
            place = packed_in.get(index)
            if place is not None:
                pack = self._files.get(place[0])
                # One whole is being placed, as a file whose chunks are all verified is committed.
                if pack is not None and pack.pack is not None and pack.pack.state[place[1]] == WANTED:
                    self._member_failed(pack, pack.pack, place[1], f"sender gave up: {reason}")
                continue
            f = self._files.get(index)
            # A file whose every chunk is verified matches the manifest
            # whatever became of the source since: let its commit finish.
            if f is not None and f.ledger.remaining:
                self._fail(f, f"sender gave up: {reason}")
        found: dict[int, RangeSet] = {}
        budget = REPORT_RANGES
        for f in self._files.values():
            if f.result is not None or not f.ledger.remaining:
                continue
            if before is not None and f.index > before[0]:
                continue
            ranges = f.ledger.wanted(budget)
            if before is not None and f.index == before[0]:
                ranges = [(a, min(b, before[1])) for a, b in ranges if a < before[1]]
            if ranges:
                found[f.index] = RangeSet(ranges)
                budget -= len(ranges)
            if budget <= 0:
                break
        data, complete = encode_map(found)
        return MissingReport(data, complete and budget > 0, self.done, dict(self.stats))

    def close(self, discard: bool = False) -> defer.Deferred:
        """
        Stop listening and let go of every descriptor; part files stay for
        a resume unless ``discard``.  Fires once the last blocking call in a
        thread (a commit, say) has returned: until then the same transfer
        must not be taken up again, or two receivers would work on the same
        part files.
        """
        drained: defer.Deferred = defer.Deferred()
        self._drained.append(drained)
        if self._root_fd >= 0:
            for f in list(self._awaiting.values()):
                if not discard and f.pack is None:
                    continue  # kept to resume from; a pack never is (`storage.pack_name`)
                f.result = "cancelled"
                self._no_longer_awaited(f)
                self._pending.pop(f.index, None)
                fd = self._release(f)
                if fd is not None:
                    os.close(fd)
                storage.discard_part(self._root_fd, f.entry.path, f.part)
        if self._port is not None and not self.done:
            self._port.stopListening()
        if self._feedback.running:
            self._feedback.stop()
        self._port = None
        self._flush_all()  # what arrived is kept for a resume
        if self._batch_timer is not None and self._batch_timer.active():
            self._batch_timer.cancel()
        self._batch_timer = None
        self._unwritten -= self._batch_bytes  # small files not placed yet are sent again on a resume
        self._batch, self._batch_bytes = [], 0
        self._held_back.clear()
        while self._open:
            os.close(self._open.popitem()[1])
        self._closing = True
        for settled, look in list(self._settling.items()):
            look.cancel()
            settled.callback(None)
        self._settling.clear()
        self._close_root()
        return drained
