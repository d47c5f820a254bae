"""
A receiver's intake: datagrams read off its socket a batch at a time,
opened, and gathered into runs of consecutive blocks.

At 1 Gbit/s a node takes 85,000 datagrams a second, and in Python each one
cost more than the kernel's work to deliver it: a read call, a decode, a
tuple, and the bookkeeping and write of one block.  Here one call reads a
batch (``recvmmsg`` in the C module, up to `BATCH` datagrams), opens every
datagram into one buffer, payload after payload, and says which of them
are consecutive blocks of one file: a sender sends a file's blocks in order,
so a batch is mostly one run, and the receiver keeps its books and writes
once per run (`Batch`).

The C loop (`mrsyncd._crypto.receive`) and its pure-Python twin
(`python_receive`) give the same answers; tests/integration/test_intake.py holds both to
one contract.  `IntakePort` is the thin glue that lets the reactor call
them when the socket is readable.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from mrsyncd import logs
from mrsyncd.engine.meter import DELAY_SAMPLE
from mrsyncd.wire import datagram
from mrsyncd.wire.datagram import KIND_DATA, DatagramCipher, Reason

try:
    from mrsyncd import _crypto
except ImportError:  # not built: the pure-Python path
    _crypto = None  # type: ignore[assignment]

log = logs.logger(__name__)

#: Datagrams read in one call: 256 full ones are 370 KB, 3 ms of the
#: link's time at 1 Gbit/s.  Python keeps its books once per run of a
#: batch, so the longer the batch, the less a datagram costs: on one node
#: at 100 Mbit/s (a wake-up every 20 ms either way) 256 took the
#: receiver's CPU from 0.94 to 0.83 s for 200 MiB against 64 (3 runs each).
BATCH = 256
#: Batches read in one wake-up before other events get their turn.
BATCHES_PER_WAKE = 4
#: Datagrams a wake-up should find.  A reader that wakes for every
#: datagram (below a few hundred Mbit/s it is faster than the link) spends
#: more on waking, the reactor's loop and a call into the receiver, than
#: on the datagram.  So after emptying the socket it stops watching it for
#: as long as this many take to arrive at the rate they came: the queue it
#: lets build is a batch (370 KB) whatever the rate, or what `PAUSE_MAX`
#: lets in.  Nothing is measured late for it: arrival times are the
#: kernel's.  On one node at 100 Mbit/s, a wake-up every 20 ms instead of
#: 10 took the receiver's CPU from 1.23 to 0.94 s for 200 MiB (3 runs each).
GATHER = BATCH
#: The longest pause.  A pause is also never longer than a quarter of the
#: receive buffer takes to fill at the fastest rate seen so far, for when
#: the rate jumps (a new pass after a quiet moment).
PAUSE_MAX = 0.020
#: A shorter pause than this costs more than it saves.
PAUSE_MIN = 0.0002
#: The counters of `Batch.rejected`, in order.
REJECTIONS = (Reason.SHORT, Reason.VERSION, Reason.KIND, Reason.FOREIGN, Reason.TAG)
#: Linux's SO_TIMESTAMPNS (and SCM_TIMESTAMPNS), which the socket module
#: does not export: every datagram comes with the time the kernel took it.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@ll")

#: ``(kind, file index, first block, count, offset, size, sequence)``: blocks
#: ``first`` to ``first + count - 1`` of a file, their payloads ``size``
#: bytes at ``offset`` in the batch's buffer, the last sealed with
#: ``sequence``.  Only DATA datagrams make runs longer than one, and only
#: the last of a run may be shorter than a block.
Run = tuple[int, int, int, int, int, int, int]


class Batch(NamedTuple):
    """What one read gave: authentic runs, and counts for the meter and the drop counters."""

    runs: list[Run]
    #: Datagrams that opened.
    got: int
    #: The highest sequence number among them (-1: none).
    seq_max: int
    #: One-way delays, in microseconds on the two hosts' clocks, of those
    #: whose sequence number is a multiple of the ``sample`` asked for.
    owd_sum: int
    owd_min: int
    owd_count: int
    #: Datagrams dropped, per reason of `REJECTIONS`.
    rejected: tuple[int, int, int, int, int]
    #: The read filled the batch: more may be waiting.
    more: bool


def enable_timestamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every datagram with its arrival time (`Batch.owd_sum`)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def buffer_for(block_size: int, batch: int = BATCH) -> bytearray:
    """A buffer that holds the payloads of a batch (one byte over a block each, see `receive`)."""
    return bytearray(batch * (block_size + 1))


def receive(
    cipher: DatagramCipher,
    sock: socket.socket,
    out: bytearray,
    block_size: int,
    batch: int = BATCH,
    sample: int = DELAY_SAMPLE,
) -> Batch:
    """
    Read what ``sock`` holds, up to ``batch`` datagrams, without blocking.
    A datagram is read with room for one byte more than a block, so one
    too long shows as such (it fails its tag) instead of being cut to fit.
    """
    aead = cipher.aead
    if _crypto is not None and isinstance(aead, _crypto.AEAD):
        fd = sock.fileno()
        return Batch(*_crypto.receive(aead, fd, cipher.wire_id, out, block_size, batch, sample))
    return python_receive(cipher, sock, out, block_size, batch, sample)


def python_receive(
    cipher: DatagramCipher, sock: socket.socket, out: bytearray, block_size: int, batch: int, sample: int
) -> Batch:
    """`receive` where the C module is absent: one ``recvmsg`` a datagram."""
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    arrived = []
    for _ in range(batch):
        try:
            # One cut short by the read fails its tag, as in the C loop.
            data, ancillary, _, _ = sock.recvmsg(datagram.OVERHEAD + block_size + 1, space)
        except BlockingIOError:
            break
        when = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                seconds, nanos = _TIMESPEC.unpack_from(value)
                when = seconds + nanos / 1e9
        arrived.append((data, when))
    return assemble(cipher, arrived, out, block_size, sample, more=len(arrived) == batch)


def assemble(
    cipher: DatagramCipher,
    arrived: Iterable[tuple[bytes, float | None]],
    out: bytearray,
    block_size: int,
    sample: int = DELAY_SAMPLE,
    more: bool = False,
) -> Batch:
    """
    The batch that datagrams read one by one make, each with the time it
    arrived (None: now).  Pure but for the clock; tests feed a receiver
    through it.
    """
    runs: list[list[int]] = []
    rejected = dict.fromkeys(REJECTIONS, 0)
    got, seq_max, owd_sum, owd_min, owd_count = 0, -1, 0, 0, 0
    offset = 0
    full = False
    for data, when in arrived:
        block = cipher.decode(data)
        if isinstance(block, datagram.Rejected):
            rejected[block.reason] += 1
            continue
        got += 1
        seq_max = max(seq_max, block.sequence)
        if not block.sequence % sample:
            now_us = int((time.time() if when is None else when) * 1e6)
            owd = datagram.elapsed_us(now_us, block.sent_us)
            owd_min = min(owd_min, owd) if owd_count else owd
            owd_sum += owd
            owd_count += 1
        size = len(block.payload)
        out[offset : offset + size] = block.payload
        last = runs[-1] if runs else None
        if (
            last is not None
            and full
            and block.kind == KIND_DATA
            and last[0] == KIND_DATA
            and last[1] == block.file_index
            and last[2] + last[3] == block.block_index
        ):
            last[3] += 1
            last[5] += size
            last[6] = block.sequence
        else:
            runs.append([block.kind, block.file_index, block.block_index, 1, offset, size, block.sequence])
        full = size == block_size
        offset += size
    return Batch(
        [tuple(run) for run in runs],  # type: ignore[misc]
        got,
        seq_max,
        owd_sum,
        owd_min,
        owd_count,
        tuple(rejected.values()),  # type: ignore[arg-type]
        more,
    )


def pause_after(read: int, elapsed: float, fastest: float, room: float) -> float:
    """
    How long to stop watching a socket emptied by a wake-up that read
    ``read`` datagrams ``elapsed`` seconds after the one before: as long as
    `GATHER` take to come at that rate, at most `PAUSE_MAX`, and never
    longer than ``room`` datagrams take at the ``fastest`` rate seen.
    """
    pause = min(PAUSE_MAX, GATHER * elapsed / read) if read else PAUSE_MAX
    return min(pause, room / fastest) if fastest else pause


@implementer(IReadDescriptor)
class IntakePort:
    """
    A joined multicast socket that the reactor watches, read a batch at a
    time (`receive`) into one buffer that ``deliver`` must consume before
    it returns: the next batch is read over it.  After a wake-up that
    emptied the socket it may stop watching it for a moment (`GATHER`).
    """

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        cipher: DatagramCipher,
        block_size: int,
        deliver: Callable[[Batch, memoryview], None],
    ) -> None:
        self.reactor = reactor
        self.socket = sock
        self._cipher = cipher
        self._block_size = block_size
        self._deliver = deliver
        self._out = buffer_for(block_size)
        self._view = memoryview(self._out)
        self._resume: IDelayedCall | None = None
        self._woke = reactor.seconds()
        #: Datagrams a quarter of the receive buffer holds (the kernel
        #: counts about twice a datagram's size), and the fastest rate seen.
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._room = granted / 4 / (2 * (block_size + datagram.OVERHEAD))
        self._fastest = 0.0
        enable_timestamps(sock)

    def startReading(self) -> None:
        self.reactor.addReader(self)

    def stopListening(self) -> None:
        """Stop reading and close the socket (the name of Twisted's ports)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self.socket.fileno() >= 0:
            self.reactor.removeReader(self)
            self.socket.close()

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        read = 0
        for _ in range(BATCHES_PER_WAKE):
            batch = receive(self._cipher, self.socket, self._out, self._block_size)
            read += batch.got + sum(batch.rejected)
            if batch.runs or any(batch.rejected):
                try:
                    self._deliver(batch, self._view)
                except Exception:
                    # As Twisted's UDP port does: one bad batch is logged,
                    # and the socket is still read.
                    log.failure("handling a batch of datagrams")
            if self.socket.fileno() < 0:
                return
            if not batch.more:
                break
        else:
            return  # still more to read: the reactor calls again at once
        now = self.reactor.seconds()
        elapsed, self._woke = now - self._woke, now
        if read and elapsed > 0:
            self._fastest = max(self._fastest, read / elapsed)
        pause = pause_after(read, elapsed, self._fastest, self._room)
        if pause >= PAUSE_MIN:
            self.reactor.removeReader(self)
            self._resume = self.reactor.callLater(pause, self._resumed)

    def _resumed(self) -> None:
        self._resume = None
        self.reactor.addReader(self)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on the socket (a read failed): say so, as nothing more will arrive."""
        log.failure("stopped reading multicast datagrams", reason)
        self.stopListening()

    def logPrefix(self) -> str:
        return "IntakePort"
