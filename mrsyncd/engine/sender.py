"""
The sending side of one transfer: blocks out onto the group, paced.

`Sender.send` takes a set of blocks per file (the union of what the live
receivers need) and multicasts each once, paced by a `Pacer` on reactor
timers.  It reads a chunk at a time and checks it against the manifest
before sending any of it, so a source file changed after the scan is noticed
and abandoned instead of poisoning every receiver with blocks that can never
verify.
"""

from __future__ import annotations

import errno
import heapq
import os
import socket
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol

from mrsyncd import logs
from mrsyncd.engine.multicast import Channel, adopt, sender_socket
from mrsyncd.engine.ratecontrol import Pacer
from mrsyncd.wire import datagram, erasure
from mrsyncd.wire.blockset import RangeSet
from mrsyncd.wire.manifest import Manifest, digest

log = logs.logger(__name__)

#: Longest sleep between pacing ticks; the reactor wakes often enough that
#: a tick's burst stays small.
TICK = 0.002
#: Linux's UDP_SEGMENT socket option (not in every Python's socket module),
#: and the most datagrams one call may carry: 64 KiB in all.
UDP_SEGMENT = 103
GSO_SEGMENTS = 44
#: A batch (one sendmsg) holds at most this much of the rate: its datagrams
#: leave back to back, so a bigger one is a queue of the sender's own.
BATCH_SECONDS = 0.001
#: Chunks held in memory, in chunks' worth of bytes: the one being sent, the
#: one read ahead, and a few for parities that straddle two.
CACHED_CHUNKS = 4
#: Small files are read ahead a run at a time, each run in one thread call
#: of at most a chunk's bytes and this many files (a pack's count, one
#: pack at least: `manifest.PACKED_FILES`): a call for each file cost
#: a master 10,000 hand-offs to a thread and back in a tree of 10,000 small
#: files, and the pass waited for each.
RUN_FILES = 256
#: A run of the plan: (file index, kind, first, end), the blocks or the
#: parities (numbered as on the wire) ``[first, end)`` of one file.
_Run = tuple[int, int, int, int]


#: What the kernel says to a batch it will not send as one: it has no UDP
#: segmentation offload, or the datagrams are larger than the link's MTU.
_NO_BATCH = (errno.EMSGSIZE, errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


class SourceChanged(Exception):
    """A source file no longer matches the manifest."""


class _Refused(Exception):
    """The kernel refused a datagram, and trying again will not change that."""


class Sender(DatagramProtocol):
    noisy = False

    def __init__(
        self,
        reactor: Any,
        manifest: Manifest,
        local_paths: Mapping[int, str],
        channel: Channel,
        transfer_id: bytes,
        key: bytes,
        rate_bps: float,
        cipher: str = datagram.AES_256_GCM,
    ) -> None:
        """``key`` is the run's (`datagram.run_key`): this sender numbers its datagrams from 0."""
        self.reactor = reactor
        self.manifest = manifest
        self.local_paths = local_paths
        self.channel = channel
        self._cipher = datagram.DatagramCipher(transfer_id, key, cipher)
        #: The pacer counts what each datagram takes of the link.
        self.pacer = Pacer(reactor, rate_bps)
        self._frame = channel.frame_overhead
        #: Called when the local send queue overflows (ENOBUFS, EAGAIN).
        self.on_blocked: Callable[[], None] | None = None
        self.sequence = 0
        #: Why sending stopped for good: the kernel refused a datagram for a
        #: reason no retry mends (a firewall, no route).  The pass in
        #: progress ended there; the transfer fails its nodes with this.
        self.error: str | None = None
        self._gso = True
        #: A batch the kernel had no room for: its datagrams, end to end in
        #: pieces (a run sealed in one call is one piece), and their size.
        self._unsent: list[bytes] = []
        self._unsent_size = 0
        self.stats: Counter[str] = Counter()
        #: Files abandoned because their source changed, by file index.
        self.abandoned: dict[int, str] = {}
        #: What is no longer sent, by the index on the wire: an abandoned
        #: file's blocks, but not a pack's, which carries other files too.
        self.dropped: set[int] = set()
        self._port: IListeningPort | None = None
        self._fds: dict[int, int] = {}
        self._chunks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached_bytes = 0
        #: The pass's files in order, each one's place in it, and the first
        #: chunk the pass needs of each: what is read ahead across files.
        self._order: list[int] = []
        self._rank: dict[int, int] = {}
        self._first_chunk: dict[int, int] = {}
        #: Files up to this place in the pass have been read ahead; the next
        #: run goes once the pass reaches ``_refill_at``.
        self._ahead = 0
        self._refill_at = 0
        self._loading: set[tuple[int, int]] = set()
        #: The blocks of each pack the pass sends (None: all of it), and
        #: those its cached bytes hold: a pack is read a member at a time,
        #: and one file changed in it costs reading that file, not 256.
        self._pack_wanted: dict[int, RangeSet | None] = {}
        self._pack_held: dict[int, RangeSet] = {}
        self._checked: dict[int, set[int]] = {}
        self._identity: dict[int, tuple[int, ...]] = {}
        self._fresh: dict[int, bool] = {}
        #: The pass's runs (`_Run`) in order, and the repairs queued to go
        #: between them, one datagram each.
        self._queue: Iterator[_Run] = iter(())
        self._repairs: deque[_Run] = deque()
        self._since_repair = 0
        self._repair_every = 1
        #: Datagrams of the pass in progress: all of them, and those taken to
        #: be sent so far; repairs not counted.
        self.planned = 0
        self.taken = 0
        self._queue_done = True
        self._position = (0, 0)
        self._positions: deque[tuple[float, tuple[int, int]]] = deque(maxlen=512)
        #: What goes next: a run of the pass or a repair (``_repairing``),
        #: and what is left of the pass's run while a repair goes.
        self._next: _Run | None = None
        self._repairing = False
        self._rest: _Run | None = None
        self._done: defer.Deferred | None = None
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._port = adopt(self.reactor, sender_socket(self.channel), self, 2048)  # type: ignore[arg-type]
        self._port.connect(*self.channel.address)  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._port is not None:
            self._port.stopListening()
            self._port = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        # Up to 4 MiB of a job's file data, kept for as long as anything
        # refers to the sender otherwise: the load test's master grew by
        # 80-130 MiB, its transfers' senders waiting on the cyclic collector.
        self._chunks.clear()
        self._cached_bytes = 0

    def abort(self) -> None:
        """End the pass in progress now; its Deferred fires as if it were done."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._next = self._rest = None
        self._unsent = []
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)

    def send(
        self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet] | None = None
    ) -> defer.Deferred:
        """
        Send each block once, and each parity in ``parities`` (numbered as
        on the wire: parity j of group g is ``g * parity_group + j``, see
        `blockset.repair_plan`), in file order; fires when the last
        datagram has been handed to the kernel.
        """
        assert self._done is None, "one pass at a time"
        self._queue = plan_runs(blocks, parities or {}, self.manifest.parity_group)
        self._queue_done = False
        chunk_blocks = self.manifest.chunk_blocks
        self._order = sorted(blocks)
        self._rank = {f: rank for rank, f in enumerate(self._order)}
        self._first_chunk = {f: ranges.ranges[0][0] // chunk_blocks for f, ranges in blocks.items() if ranges}
        self._want_packs(blocks, parities or {})
        self._ahead = self._refill_at = 0
        self.planned = sum(len(ranges) for ranges in blocks.values()) + sum(
            len(groups) for groups in (parities or {}).values()
        )
        self.taken = 0
        self._repairs.clear()
        self._rest = None
        # Positions are of this pass: a probe must not take the last pass's
        # for what this one has sent.
        self._position = (0, 0)
        self._positions.clear()
        self._advance()
        done = self._done = defer.Deferred()
        self._tick()
        return done

    def repair(
        self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet], *, within: int
    ) -> None:
        """
        Send these along with the rest of the pass in progress: repairs of
        what was lost earlier in it, so that the pass does not end with a
        tail of repair rounds.  What is queued is spread evenly over the next
        ``within`` datagrams sent, these repairs included, or over what is
        left of the pass if that is less (at most one repair after each of
        the pass's own datagrams; all that is left once the pass is sent).
        Spread thin, repairs cost every host little at a time: a receiver's
        work on a parity (reading back its group, solving for a block) is
        several times a block's, and the sender codes parities in its
        reactor thread (see PROTOCOL.md §5.3 for what a rush cost).  What is
        still queued from an earlier call is not queued twice.  Once the
        pass is sent there is nothing to send them with: the round after it
        asks again.
        """
        if self._done is None:
            return
        self._want_packs(blocks, parities)
        queued = set(self._repairs)
        self._repairs.extend(
            one
            for f, kind, first, end in plan_runs(blocks, parities, self.manifest.parity_group)
            for one in ((f, kind, index, index + 1) for index in range(first, end))
            if one not in queued
        )
        if not self._repairs:
            return
        within = min(within, self.planned - self.taken + len(self._repairs))
        self._repair_every = max(1, within // len(self._repairs) - 1)
        if self._next is None:
            self._advance()

    def _want_packs(self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet]) -> None:
        """What of each pack is to be sent: the blocks asked for, or all of one that parities cover."""
        for head in self.manifest.packs.keys() & (blocks.keys() | parities.keys()):
            wanted = self._pack_wanted.get(head, RangeSet())
            if head in parities or wanted is None:
                self._pack_wanted[head] = None
            else:
                self._pack_wanted[head] = wanted | blocks[head]

    @property
    def repairs_pending(self) -> int:
        return len(self._repairs)

    def position_at(self, when: float) -> tuple[int, int]:
        """The (file, block) the pass had reached at ``when``: what is sent by then."""
        reached = (0, 0)
        for moment, position in self._positions:
            if moment > when:
                break
            reached = position
        return reached

    def _advance(self) -> None:
        """
        Take what goes next.  Repairs go out between the pass's own
        datagrams, spread as `repair` says, not in a rush: a rush of them
        at once on a busy host stalls every receiver, and this sender too.
        """
        if self._repairs and (self._since_repair >= self._repair_every or self._queue_done):
            self._since_repair = 0
            self._next, self._repairing = self._repairs.popleft(), True
            return
        self._repairing = False
        if self._rest is not None:
            self._next, self._rest = self._rest, None
            return
        self._next = next(self._queue, None)
        if self._next is None:
            self._queue_done = True
            if self._repairs:
                self._next, self._repairing = self._repairs.popleft(), True

    def _took(self, count: int) -> None:
        """``count`` datagrams of the run in ``_next`` are sent (or skipped): go on."""
        assert self._next is not None
        if not self._repairing:
            f, kind, first, end = self._next
            self.taken += count
            self._since_repair += count
            if kind == datagram.KIND_DATA:
                self._position = (f, first + count - 1)
            if first + count < end:
                self._rest = (f, kind, first + count, end)
        self._advance()

    def _tick(self) -> None:
        try:
            self._send_due()
        except _Refused as e:
            self.error = str(e)
            log.error("{why}", why=self.error)
            self.abort()

    def _send_due(self) -> None:
        self._timer = None
        assert self._port is not None
        if self._unsent and not self._send(self._unsent, self._unsent_size):
            self._timer = self.reactor.callLater(TICK, self._tick)
            return
        allowance = self.pacer.allowance()
        # A batch leaves back to back at the link's speed: no more of it than
        # BATCH_SECONDS of the rate, so that it makes no queue of its own (44
        # datagrams are 5 ms at 100 Mbit/s, and the rate controller's target
        # is a queue of 7 ms).
        segments = max(4, min(GSO_SEGMENTS, int(self.pacer.rate_bps / 8 * BATCH_SECONDS / 1500)))
        now = self.reactor.seconds()
        sent_us = int(now * 1e6)
        self._positions.append((now, self._position))
        self._fresh.clear()
        # One sendmsg's datagrams, all of a size: pieces of one or more
        # datagrams each, end to end.
        batch: list[bytes] = []
        in_batch = batch_size = 0
        reading = False
        # This loop runs once a run of whole blocks of the chunk in hand (at
        # most a batch), or once a datagram for the rest (87,000 datagrams
        # a second at 1 Gbit/s): the run is sealed in one call of the C
        # module (`DatagramCipher.encode_blocks`), what the loop counts is
        # added up here and handed over once a batch (`tally`), and a
        # chunk's blocks are cut from it here (`_read` the first time).
        encode, encode_blocks = self._cipher.encode, self._cipher.encode_blocks
        frame, group = self._frame, self.manifest.parity_group
        chunk_blocks, block_size = self.manifest.chunk_blocks, self.manifest.block_size
        whole = block_size + datagram.OVERHEAD
        chunks, pack_held = self._chunks, self._pack_held
        held_key: tuple[int, int] | None = None
        held = b""
        spent = datagrams = sent_bytes = payload_bytes = parity_bytes = coded = 0

        def tally() -> None:
            nonlocal spent, datagrams, sent_bytes, payload_bytes, parity_bytes, coded
            if datagrams:
                self.pacer.spend(spent)
                stats = self.stats
                stats["datagrams"] += datagrams
                stats["bytes"] += sent_bytes
                counted = (("payload", payload_bytes), ("parity", parity_bytes), ("coded_parities", coded))
                for key, value in counted:
                    if value:
                        stats[key] += value
                spent = datagrams = sent_bytes = payload_bytes = parity_bytes = coded = 0

        while self._next is not None:
            file_index, kind, index, end = self._next
            if file_index in self.dropped:
                self._took(end - index)
                continue
            count = 1
            try:
                if kind == datagram.KIND_PARITY:
                    payload = self._parity(file_index, *divmod(index, group))
                else:
                    chunk, first = divmod(index, chunk_blocks)
                    if not first or held_key != (file_index, chunk):
                        payload = self._read(file_index, index)
                        held = b"" if file_index in pack_held else chunks.get((file_index, chunk), b"")
                        held_key = (file_index, chunk) if held else None
                    if held_key == (file_index, chunk):
                        # The run's whole blocks in the chunk in hand, as many
                        # as the batch, the allowance and the repairs let go.
                        count = min(end - index, chunk_blocks - first, len(held) // block_size - first)
                        if count > 1:
                            count = min(
                                count,
                                segments - in_batch if batch_size == whole else segments,
                                int(allowance // (whole + frame)),
                                self._repair_every - self._since_repair
                                if self._repairs and not self._repairing
                                else count,
                            )
                        if count <= 1:
                            count = 1
                            payload = held[first * block_size : (first + 1) * block_size]
            except (OSError, SourceChanged) as e:
                self._abandon(file_index, str(e))
                continue
            if count > 1:
                size = whole
            elif payload is None:
                reading = True  # a chunk is being read; _loaded() resumes the pass
                break
            else:
                one = payload
                size = len(one) + datagram.OVERHEAD
            if size + frame > allowance:
                break
            if in_batch and (size != batch_size or in_batch + count > segments):
                tally()
                sent = self._send(batch, batch_size)
                batch, in_batch = [], 0
                if not sent:
                    break
            # Sealed only once it is sure to be sent: its sequence numbers,
            # the nonces, then move on, and are never sealed again.
            if count > 1:
                batch.append(
                    encode_blocks(
                        file_index, index, held, first * block_size, block_size, count, self.sequence, sent_us
                    )
                )
                payload_bytes += count * block_size
            else:
                batch.append(encode(file_index, index, one, self.sequence, sent_us, kind))
                if kind == datagram.KIND_DATA:
                    payload_bytes += len(one)
                else:
                    parity_bytes += len(one)
                    if index % group:
                        coded += 1  # parity j >= 1: more than an XOR
            batch_size = size
            in_batch += count
            self.sequence += count
            allowance -= count * (size + frame)
            spent += count * (size + frame)
            datagrams += count
            sent_bytes += count * size
            self._took(count)
        tally()
        if batch:
            self._send(batch, batch_size)
        if reading and not self._unsent:
            return
        if self._next is None and not self._unsent:
            done, self._done = self._done, None
            assert done is not None
            done.callback(None)
            return
        self._timer = self.reactor.callLater(TICK, self._tick)

    def echo(self, payload: bytes) -> None:
        """
        Multicast an ECHO (the rate controller's view) now, between passes
        too.  It takes a sequence number like any datagram, so receivers
        count it for loss and delay, and take only the newest for the
        sender's view.  One that cannot leave at once is dropped, not kept
        (`_unsent` waits for the next tick, which between passes may be
        long, and a late echo would carry a stale send time): the next one
        is an interval away.
        """
        if self._port is None or self._unsent:
            self.stats["echoes_dropped"] += 1
            return
        packet = self._cipher.encode(
            datagram.ECHO_FILE,
            0,
            payload,
            self.sequence,
            int(self.reactor.seconds() * 1e6),
            datagram.KIND_ECHO,
        )
        # Its sequence number is spent even if the kernel refuses it: a
        # nonce is never sealed twice, and a receiver counts one loss.
        self.sequence += 1
        try:
            self._port.socket.send(packet)  # type: ignore[attr-defined]
        except OSError as e:
            self.stats["echoes_dropped"] += 1
            self.stats["echo_errors"] += 1
            if self.stats["echo_errors"] == 1:
                log.info("an echo was not sent ({why}); the next one may be", why=e.strerror)
            return
        self.pacer.spend(len(packet) + self._frame)
        self.stats["echoes"] += 1

    def _send(self, batch: list[bytes], size: int) -> bool:
        """
        Hand datagrams of ``size`` bytes, end to end in ``batch``'s pieces,
        to the kernel: with UDP segmentation offload (``UDP_SEGMENT``) as
        one call that leaves as many datagrams, else one call each.  A
        batch the kernel has no room for is kept and sent first on the next
        tick: it paces us, nothing is lost.
        """
        assert self._port is not None
        sock = self._port.socket  # type: ignore[attr-defined]
        done = 0
        try:
            if self._gso and (len(batch) > 1 or len(batch[0]) > size):
                sock.sendmsg(batch, [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("@H", size))])
                done = sum(len(piece) for piece in batch)
                self.stats["batches"] += 1
            else:
                for piece in batch:
                    view = memoryview(piece)
                    for at in range(0, len(piece), size):
                        sock.send(view[at : at + size])
                        done += size
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                self._unsent, self._unsent_size = _after(batch, done), size
                self.stats["send_blocked"] += 1
                if self.on_blocked is not None:
                    self.on_blocked()
                return False
            if self._gso and e.errno in _NO_BATCH:
                if e.errno == errno.EMSGSIZE:
                    # A batch's datagrams must each fit the link; one alone
                    # may be fragmented by IP.
                    log.warn(
                        "datagrams of {size} bytes do not fit this link's MTU: one datagram per call, "
                        "each in IP fragments, and a lost fragment loses its datagram; set block_size "
                        "to the MTU less {v4} (IPv4) or {v6} (IPv6)",
                        size=size,
                        v4=datagram.OVERHEAD + 28,
                        v6=datagram.OVERHEAD + 48,
                    )
                else:
                    log.info(
                        "no UDP segmentation offload here ({why}): one datagram per call", why=e.strerror
                    )
                self._gso = False
                return self._send(batch, size)
            group, port = self.channel.address
            raise _Refused(f"cannot send to {group} port {port}: {e.strerror}") from e
        self._unsent = []
        return True

    def _abandon(self, unit: int, why: str) -> None:
        """Send no more of a file, or of a pack and so of all its members."""
        self.dropped.add(unit)
        pack = self.manifest.packs.get(unit)
        for member in pack.members if pack is not None else (unit,):
            self._give_up(member, why)

    def _give_up(self, file_index: int, why: str) -> None:
        """Tell the receivers that a file will not arrive (`abandoned`)."""
        if file_index not in self.abandoned:
            self.abandoned[file_index] = why
            log.error("abandoning {path}: {why}", path=self.local_paths[file_index], why=why)

    def _parity(self, file_index: int, group: int, index: int) -> bytes | None:
        """Parity ``index`` of a group (`erasure.encode`); parity 0 is the XOR of its blocks."""
        size, count = self.manifest.block_size, self.manifest.parity_group
        first = group * count
        last = min(first + count, self.manifest.unit_blocks(file_index))
        data = self._read(file_index, first, last)
        if data is None:
            return None
        return erasure.encode([data[i : i + size] for i in range(0, len(data), size)], index, size)

    # Reading the sources.  A chunk is read whole and checked against its
    # digest once, in a thread, with the next one read ahead; later reads of
    # a checked chunk (repairs, parities) read just the block, after an
    # fstat shows that the file has not changed since (any write changes
    # its ctime).  So a source changed after the scan is caught, and the
    # reactor never digests a chunk nor waits for the disk for one.

    def _read(self, file_index: int, block: int, end: int | None = None) -> bytes | None:
        """
        The bytes of blocks ``[block, end)`` (one block if ``end`` is None),
        or None while a chunk they lie in is being read.
        """
        chunk_blocks, size = self.manifest.chunk_blocks, self.manifest.block_size
        end = block + 1 if end is None else end
        chunk, first = divmod(block, chunk_blocks)
        if (end - 1) // chunk_blocks != chunk:  # a span across two chunks (a parity group)
            head = self._read(file_index, block, (chunk + 1) * chunk_blocks)
            tail = self._read(file_index, (chunk + 1) * chunk_blocks, end)
            return None if head is None or tail is None else head + tail
        data = self._chunks.get((file_index, chunk))
        if data is not None and file_index in self._pack_held:
            held = self._pack_held[file_index]
            if RangeSet.interval(block, end) - held:  # read what it lacks, with what it holds
                wanted = self._pack_wanted.get(file_index, RangeSet())
                if wanted is not None:
                    self._pack_wanted[file_index] = wanted | held | RangeSet.interval(block, end)
                del self._chunks[(file_index, chunk)]
                self._cached_bytes -= len(data)
                data = None
        if data is not None:
            self._chunks.move_to_end((file_index, chunk))
            if first == 0:
                self._read_ahead(file_index, chunk)
            return data[first * size : (end - chunk * chunk_blocks) * size]
        if chunk in self._checked.get(file_index, ()):
            fd = self._fd(file_index)
            if not self._fresh.get(file_index):
                if _identity(os.fstat(fd)) != self._identity[file_index]:
                    raise SourceChanged("source changed while it was being sent")
                self._fresh[file_index] = True
            entry = self.manifest.entries[file_index]
            length = min(end * size, entry.size) - block * size
            return os.pread(fd, length, block * size)
        self._load((file_index, chunk))
        self._read_ahead(file_index, chunk)
        return None

    def _read_ahead(self, file_index: int, chunk: int) -> None:
        """
        Passes go in order: the next chunk is read and checked while this
        one is sent, so that the pass does not wait for it (a wait at every
        chunk cost 2-5% of the rate on a busy host).  After a file's last
        chunk, the next files' first chunks are, a run of them at a time
        (`RUN_FILES`), the next run once the pass is halfway through this one.
        """
        if (chunk + 1) * self.manifest.chunk_size < self.manifest.unit_size(file_index):
            self._load((file_index, chunk + 1))
            return
        rank = self._rank.get(file_index)
        if rank is None or rank < self._refill_at:
            return
        start = end = max(rank + 1, self._ahead)
        run: list[tuple[int, int]] = []
        size = files = 0
        packs = self.manifest.packs
        for f in self._order[start : start + RUN_FILES]:
            first = self._first_chunk.get(f)
            if first is not None and f not in self.dropped:  # else nothing of it to read: passed over
                length = self._span(f, first)[1]
                count = len(packs[f].members) if f in packs else 1
                if size and (size + length > self.manifest.chunk_size or files + count > RUN_FILES):
                    break
                run.append((f, first))
                size += length
                files += count
            end += 1
        self._ahead = end
        self._refill_at = (start + end) // 2
        self._load(*run)

    def _pack_skipped(self, head: int) -> set[int]:
        """The positions of the members of pack ``head`` that hold no block the pass sends."""
        wanted = self._pack_wanted.get(head)
        if wanted is None:
            return set()
        pack, size = self.manifest.packs[head], self.manifest.block_size
        needed = {p for first, end in wanted.ranges for p in pack.within(first * size, end * size)}
        return set(range(len(pack.members))) - needed

    def _span(self, file_index: int, chunk: int) -> tuple[int, int]:
        """Offset and length of a chunk of a file, or of a pack (one chunk at most)."""
        offset = chunk * self.manifest.chunk_size
        return offset, min(self.manifest.chunk_size, self.manifest.unit_size(file_index) - offset)

    def _fd(self, file_index: int) -> int:
        fd = self._fds.get(file_index)
        if fd is None:
            if len(self._fds) >= 16:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[file_index] = os.open(self.local_paths[file_index], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def _load(self, *keys: tuple[int, int]) -> None:
        """Read and check these (file, chunk)s in one thread call, those not read or being read yet."""
        keys = tuple(key for key in keys if key not in self._loading and key not in self._chunks)
        if not keys:
            return
        reads: list[_Read] = []
        entries, packs = self.manifest.entries, self.manifest.packs
        for file_index, chunk in keys:
            pack = packs.get(file_index)
            if pack is not None:
                paths, skipped = self.local_paths, self._pack_skipped(file_index)
                reads.append(
                    [
                        (paths[m], 0, entries[m].size, b"" if p in skipped else entries[m].chunk_digest(0))
                        for p, m in enumerate(pack.members)
                    ]
                )
                continue
            entry = entries[file_index]
            offset, length = self.manifest.chunk_span(entry, chunk)
            reads.append((self.local_paths[file_index], offset, length, entry.chunk_digest(chunk)))
        self._loading.update(keys)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _read_chunks, reads)
        d.addErrback(lambda failure: [failure.getErrorMessage()] * len(keys))  # none left loading
        d.addCallback(self._loaded, keys)

    def _loaded(self, results: list[_Loaded], keys: tuple[tuple[int, int], ...]) -> None:
        limit = CACHED_CHUNKS * self.manifest.chunk_size
        packs = self.manifest.packs
        for (file_index, chunk), result in zip(keys, results, strict=True):
            self._loading.discard((file_index, chunk))
            if isinstance(result, str):
                self._abandon(file_index, result)
                continue
            if isinstance(result, _PackRead):
                # Read again whenever it is needed again (`_read`): its
                # members are files of their own, with no one descriptor.
                data = result.data
                members = packs[file_index].members
                for position, why in result.failed.items():
                    self._give_up(members[position], why)
                if result.skipped:  # else it holds every block: nothing to look at for each one sent
                    skipped = RangeSet((p, p + 1) for p in result.skipped)
                    self._pack_held[file_index] = RangeSet.interval(
                        0, self.manifest.unit_blocks(file_index)
                    ) - self.manifest.pack_blocks(file_index, skipped)
                else:
                    self._pack_held.pop(file_index, None)
            else:
                data, identity = result
                known = self._identity.setdefault(file_index, identity)
                if identity != known:
                    self._abandon(file_index, "source changed while it was being sent")
                    continue
                self._checked.setdefault(file_index, set()).add(chunk)
            self._chunks[(file_index, chunk)] = data
            self._cached_bytes += len(data)
            while self._cached_bytes > limit:
                self._cached_bytes -= len(self._chunks.popitem(last=False)[1])
        if self._done is not None and self._timer is None and self._port is not None:
            self._tick()


def plan_runs(blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet], group: int) -> Iterator[_Run]:
    """
    The runs of blocks and the parities to send, file by file, each block
    and each parity once.  A group's parities go after its blocks: a
    receiver uses them once it misses no more blocks of the group than it
    has parities.  So where a file has parities its runs are cut at the
    groups' ends, each placed by its last block.
    """
    for f in sorted(set(blocks) | set(parities)):
        ranges = blocks[f].ranges if f in blocks else []
        if not parities.get(f):
            for first, end in ranges:
                yield f, datagram.KIND_DATA, first, end
            continue
        data = (
            (cut - 1, datagram.KIND_DATA, at, cut)
            for first, end in ranges
            for at, cut in _cut(first, end, group)
        )
        parity = (((p // group + 1) * group - 1, datagram.KIND_PARITY, p, p + 1) for p in parities[f])
        for _, kind, first, end in heapq.merge(parity, data):
            yield f, kind, first, end


def _cut(first: int, end: int, group: int) -> Iterator[tuple[int, int]]:
    """``[first, end)`` cut at the ends of groups of ``group``."""
    while first < end:
        cut = min(end, (first // group + 1) * group)
        yield first, cut
        first = cut


def _after(pieces: list[bytes], done: int) -> list[bytes]:
    """What of ``pieces``, end to end, lies past their first ``done`` bytes."""
    for at, piece in enumerate(pieces):
        if done < len(piece):
            return [piece[done:], *pieces[at + 1 :]]
        done -= len(piece)
    return []


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: A chunk to read: a file's (path, offset, length, digest), or a pack's members' whole.
_Read = tuple[str, int, int, bytes] | list[tuple[str, int, int, bytes]]


class _PackRead(NamedTuple):
    data: bytes
    #: Why each member that failed did, by its position in the pack.
    failed: dict[int, str]
    #: The members not read (zeros): they hold no block the pass sends.
    skipped: list[int]


#: What was read: a chunk and its file's identity, a pack, or why the read failed.
_Loaded = tuple[bytes, tuple[int, ...]] | _PackRead | str


def _read_chunks(reads: list[_Read]) -> list[_Loaded]:
    """
    In a thread: each `_read_chunk` or `_read_pack`, or why it failed.  The
    reason alone, not the exception: its traceback would hold the frame, and
    the chunk read in it, until the cyclic collector came.
    """
    results: list[_Loaded] = []
    for read in reads:
        try:
            results.append(_read_pack(read) if isinstance(read, list) else _read_chunk(*read))
        except Exception as e:
            results.append(str(e))
    return results


def _read_pack(members: list[tuple[str, int, int, bytes]]) -> _PackRead:
    """
    In a thread: a pack's bytes, each member read whole and checked; a
    member that no longer matches the manifest is zeros, and named with why,
    so that the sender abandons it alone and the rest of the pack still goes.
    """
    parts: list[bytes] = []
    failed: dict[int, str] = {}
    skipped: list[int] = []
    for position, (path, offset, length, expected) in enumerate(members):
        if not expected:  # `Sender._pack_skipped`
            skipped.append(position)
            parts.append(bytes(length))
            continue
        try:
            parts.append(_read_chunk(path, offset, length, expected)[0])
        except Exception as e:
            failed[position] = str(e)
            parts.append(bytes(length))
    return _PackRead(b"".join(parts), failed, skipped)


def _read_chunk(path: str, offset: int, length: int, expected: bytes) -> tuple[bytes, tuple[int, ...]]:
    """In a thread: a chunk of a source, checked against the manifest."""
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        data = os.pread(f.fileno(), length, offset)
        if len(data) != length or digest(data) != expected:
            raise SourceChanged(f"source changed since it was scanned (at byte {offset})")
        if _identity(os.fstat(f.fileno())) != _identity(before):
            raise SourceChanged("source changed while it was being read")
        return data, _identity(before)
