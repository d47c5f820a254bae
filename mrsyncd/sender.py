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
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from mrsyncd import datagram, logs
from mrsyncd.blockset import RangeSet
from mrsyncd.manifest import Manifest, digest
from mrsyncd.multicast import Channel, adopt, sender_socket
from mrsyncd.ratecontrol import Pacer

log = logs.logger(__name__)

#: Longest sleep between pacing ticks; the reactor wakes often enough that
#: a tick's burst stays small.
TICK = 0.002


class SourceChanged(Exception):
    """A source file no longer matches the manifest."""


class Sender(DatagramProtocol):
    noisy = False

    def __init__(
        self,
        reactor: IReactorTime,
        manifest: Manifest,
        local_paths: Mapping[int, str],
        channel: Channel,
        transfer_id: bytes,
        key: bytes,
        rate_bps: float,
    ) -> None:
        self.reactor = reactor
        self.manifest = manifest
        self.local_paths = local_paths
        self.channel = channel
        self.transfer_id = transfer_id
        self.key = key
        self.pacer = Pacer(reactor, rate_bps)
        #: Called when the local send queue overflows (ENOBUFS, EAGAIN).
        self.on_blocked: Callable[[], None] | None = None
        self.sequence = 0
        self.stats: Counter[str] = Counter()
        #: Files abandoned because their source changed, by file index.
        self.abandoned: dict[int, str] = {}
        self._port: IListeningPort | None = None
        self._fds: dict[int, int] = {}
        self._chunk: tuple[int, int, bytes] = (-1, -1, b"")
        self._queue: Iterator[tuple[int, int, int]] = iter(())
        self._repairs: deque[tuple[int, int, int]] = deque()
        self._position = (0, 0)
        self._positions: deque[tuple[float, tuple[int, int]]] = deque(maxlen=512)
        self._next: tuple[int, int, int] | None = None
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

    def abort(self) -> None:
        """End the pass in progress now; its Deferred fires as if it were done."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._next = None
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)

    def send(
        self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet] | None = None
    ) -> defer.Deferred:
        """
        Send each block once, and the parity of each group in ``parities``
        (see `blockset.repair_plan`), in file order; fires when the last
        datagram has been handed to the kernel.
        """
        assert self._done is None, "one pass at a time"
        self._queue = self._items(blocks, parities or {})
        self._repairs.clear()
        self._advance()
        done = self._done = defer.Deferred()
        self._tick()
        return done

    def repair(self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet]) -> None:
        """
        Send these before the rest of the pass in progress: repairs of what
        was lost earlier in it, so that the pass does not end with a tail of
        repair rounds.
        """
        self._repairs.extend(self._items(blocks, parities))
        if self._next is None and self._done is not None:
            self._advance()

    def position_at(self, when: float) -> tuple[int, int]:
        """The (file, block) the pass had reached at ``when``: what is sent by then."""
        reached = (0, 0)
        for moment, position in self._positions:
            if moment > when:
                break
            reached = position
        return reached

    def _items(
        self, blocks: Mapping[int, RangeSet], parities: Mapping[int, RangeSet]
    ) -> Iterator[tuple[int, int, int]]:
        group = self.manifest.parity_group
        for f in sorted(set(blocks) | set(parities)):
            data = ((b, datagram.KIND_DATA, b) for b in blocks.get(f, ()))
            # A group's parity goes after its blocks: a receiver uses it
            # once it misses no more than one block of the group.
            parity = (((g + 1) * group - 1, datagram.KIND_PARITY, g) for g in parities.get(f, ()))
            for _, kind, index in heapq.merge(parity, data):
                yield f, kind, index

    def _advance(self) -> None:
        if self._repairs:
            self._next = self._repairs.popleft()
            return
        self._next = next(self._queue, None)
        if self._next is not None and self._next[1] == datagram.KIND_DATA:
            self._position = (self._next[0], self._next[2])

    def _tick(self) -> None:
        self._timer = None
        assert self._port is not None
        allowance = self.pacer.allowance()
        now = self.reactor.seconds()
        sent_us = int(now * 1e6)
        self._positions.append((now, self._position))
        while self._next is not None:
            file_index, kind, index = self._next
            if file_index in self.abandoned:
                self._advance()
                continue
            try:
                if kind == datagram.KIND_PARITY:
                    block = index * self.manifest.parity_group
                    payload = self._parity(file_index, block)
                else:
                    block = index
                    payload = self._read(file_index, block)
            except (OSError, SourceChanged) as e:
                self.abandoned[file_index] = str(e)
                log.error("abandoning {path}: {why}", path=self.local_paths[file_index], why=e)
                continue
            packet = datagram.encode(
                self.key, self.transfer_id, file_index, block, payload, self.sequence, sent_us, kind
            )
            if len(packet) > allowance:
                break
            try:
                self._port.write(packet)  # type: ignore[attr-defined]
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                    # The socket buffer is full: the kernel paces us.
                    self.stats["send_blocked"] += 1
                    if self.on_blocked is not None:
                        self.on_blocked()
                    break
                raise
            self.sequence += 1
            allowance -= len(packet)
            self.pacer.spend(len(packet))
            self.stats["datagrams"] += 1
            self.stats["bytes"] += len(packet)
            self.stats["payload" if kind == datagram.KIND_DATA else "parity"] += len(payload)
            self._advance()
        if self._next is None:
            done, self._done = self._done, None
            assert done is not None
            done.callback(None)
            return
        self._timer = self.reactor.callLater(TICK, self._tick)

    def _parity(self, file_index: int, first: int) -> bytes:
        """The XOR of a group of blocks, each padded with zeros to the block size."""
        size = self.manifest.block_size
        last = min(
            first + self.manifest.parity_group, self.manifest.blocks(self.manifest.entries[file_index])
        )
        parity = 0
        for block in range(first, last):
            parity ^= int.from_bytes(self._read(file_index, block).ljust(size, b"\0"), "big")
        return parity.to_bytes(size, "big")

    def _read(self, file_index: int, block: int) -> bytes:
        entry = self.manifest.entries[file_index]
        chunk, first = divmod(block, self.manifest.chunk_blocks)
        cached_file, cached_chunk, data = self._chunk
        if (cached_file, cached_chunk) != (file_index, chunk):
            offset, length = self.manifest.chunk_span(entry, chunk)
            fd = self._fds.get(file_index)
            if fd is None:
                if len(self._fds) >= 16:
                    os.close(self._fds.pop(next(iter(self._fds))))
                fd = self._fds[file_index] = os.open(self.local_paths[file_index], os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, length, offset)
            if len(data) != length or digest(data) != entry.chunk_digest(chunk):
                raise SourceChanged(f"source changed since it was scanned (chunk {chunk})")
            self._chunk = (file_index, chunk, data)
        start = first * self.manifest.block_size
        return data[start : start + self.manifest.block_size]
