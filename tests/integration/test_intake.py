"""
The intake's contract: the C read loop and its pure-Python twin read the
same datagrams off real sockets into the same runs, counts and payloads.
"""

from __future__ import annotations

import errno
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mrsyncd.engine import intake
from mrsyncd.wire import datagram
from mrsyncd.wire.datagram import KIND_DATA, KIND_ECHO, KIND_PARITY, DatagramCipher

#: Every read path this host has: the contract holds for each.
PATHS = [False] + ([True] if intake._crypto is not None else [])
paths = pytest.mark.parametrize("native", PATHS, ids=lambda n: "C" if n else "python")

KEY = bytes(range(32))
TID = b"intake01"
SIZE = 100


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A non-blocking receiving socket on loopback, stamping arrivals, and a socket connected to it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.setblocking(False)
    intake.enable_timestamps(rx)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return rx, tx


def read(native: bool, sent: list[bytes], batch: int = intake.BATCH) -> tuple[intake.Batch, bytearray]:
    cipher = DatagramCipher(TID, KEY, native_path=native)
    rx, tx = socket_pair()
    with rx, tx:
        for data in sent:
            tx.send(data)
        out = intake.buffer_for(SIZE, batch)
        return intake.receive(cipher, rx, out, SIZE, batch, sample=2), out


def payload(file: int, block: int, size: int = SIZE) -> bytes:
    return bytes((file * 31 + block + i) & 0xFF for i in range(size))


def sealed(file: int, block: int, seq: int, kind: int = KIND_DATA, size: int = SIZE, **kw) -> bytes:
    return DatagramCipher(TID, KEY, **kw).encode(file, block, payload(file, block, size), seq, 0, kind)


def mixed() -> list[bytes]:
    """Runs broken by a gap, a short last block, a parity, an echo and every kind of reject."""
    good = [sealed(0, b, b) for b in range(5)]  # blocks 0-4 of file 0: one run
    good += [sealed(0, 6, 5), sealed(0, 7, 6, size=40)]  # a gap, then a run ending short
    good += [sealed(0, 8, 7)]  # after a short block: a run of its own
    good += [sealed(1, 0, 8, KIND_PARITY), sealed(1, 1, 9, KIND_PARITY)]  # parities never join
    good += [sealed(2, 0, 10), sealed(2, 1, 11)]  # another file
    good += [sealed(datagram.ECHO_FILE, 0, 12, KIND_ECHO, size=16)]
    forged = bytearray(sealed(0, 9, 13))
    forged[-1] ^= 1
    other = DatagramCipher(b"other-id", KEY).encode(0, 9, payload(0, 9), 14)
    old = bytearray(sealed(0, 9, 15))
    old[0] = 1
    kind = bytearray(sealed(0, 9, 16))
    kind[1] = 9
    long = sealed(0, 9, 17, size=SIZE + 2)
    return [*good[:3], b"short", bytes(forged), *good[3:], other, bytes(old), bytes(kind), long]


@paths
def test_runs_counts_and_payloads(native):
    batch, out = read(native, mixed())
    assert batch.runs and [r[:4] for r in batch.runs] == [
        (KIND_DATA, 0, 0, 5),
        (KIND_DATA, 0, 6, 2),
        (KIND_DATA, 0, 8, 1),
        (KIND_PARITY, 1, 0, 1),
        (KIND_PARITY, 1, 1, 1),
        (KIND_DATA, 2, 0, 2),
        (KIND_ECHO, datagram.ECHO_FILE, 0, 1),
    ]
    assert [r[6] for r in batch.runs] == [4, 6, 7, 8, 9, 11, 12]  # the last sequence of each
    assert [r[5] for r in batch.runs] == [5 * SIZE, SIZE + 40, SIZE, SIZE, SIZE, 2 * SIZE, 16]
    # short, version, kind, foreign, tag (forged, and one too long for a block)
    assert batch.rejected == (1, 1, 1, 1, 2)
    assert (batch.got, batch.seq_max, batch.more) == (13, 12, False)
    for kind, file, first, count, offset, size, _ in batch.runs:
        if kind != KIND_ECHO:
            blocks = range(first, first + count)
            expected = b"".join(payload(file, b, min(SIZE, size - SIZE * (b - first))) for b in blocks)
            assert bytes(out[offset : offset + size]) == expected


@paths
def test_a_full_batch_says_more_may_wait(native):
    batch, _ = read(native, [sealed(0, b, b) for b in range(10)], batch=4)
    assert (batch.runs, batch.got, batch.more) == ([(KIND_DATA, 0, 0, 4, 0, 4 * SIZE, 3)], 4, True)


@paths
def test_an_empty_socket_gives_an_empty_batch(native):
    batch, _ = read(native, [])
    assert batch == intake.Batch([], 0, -1, 0, 0, 0, (0, 0, 0, 0, 0), False)


@paths
def test_delay_is_sampled_from_the_kernels_arrival_time(native):
    """Sequences 0 and 2 are sampled (sample=2): their send times are a second and two before now."""
    now_us = int(time.time() * 1e6)
    cipher = DatagramCipher(TID, KEY)
    sent = [cipher.encode(0, b, payload(0, b), b, now_us - (b + 1) * 500_000) for b in range(3)]
    batch, _ = read(native, sent)
    assert batch.owd_count == 2
    assert 500_000 <= batch.owd_min < 600_000
    assert 2_000_000 <= batch.owd_sum < 2_200_000


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(0, 12),
            st.sampled_from([KIND_DATA, KIND_DATA, KIND_PARITY]),
            st.sampled_from([SIZE, SIZE, 1, SIZE + 1]),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_the_two_paths_agree(draws):
    """Whatever arrives, in whatever order, both paths give the same batch and the same bytes."""
    if len(PATHS) < 2:
        pytest.skip("the C module is not built")
    sent = []
    for seq, (file, block, kind, size, forge) in enumerate(draws):
        data = bytearray(sealed(file, block, seq, kind, size))
        if forge:
            data[30] ^= 0x40
        sent.append(bytes(data))
    (python, out_p), (native, out_c) = read(False, sent), read(True, sent)
    assert native._replace(owd_sum=0, owd_min=0) == python._replace(owd_sum=0, owd_min=0)
    assert out_c[: sum(r[5] for r in native.runs)] == out_p[: sum(r[5] for r in python.runs)]


def test_the_c_loop_refuses_a_buffer_too_small_for_its_batch():
    if intake._crypto is None:
        pytest.skip("the C module is not built")
    cipher = DatagramCipher(TID, KEY, native_path=True)
    rx, tx = socket_pair()
    with rx, tx, pytest.raises(ValueError):
        intake.receive(cipher, rx, bytearray(10), SIZE)


@paths
def test_a_socket_that_cannot_be_read_is_an_error_not_an_empty_batch(native):
    cipher = DatagramCipher(TID, KEY, native_path=native)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected, pytest.raises(OSError):
        intake.receive(cipher, unconnected, intake.buffer_for(SIZE), SIZE)


def watched_port():
    """An intake port on loopback, watched by a reactor with a fake clock; it keeps what it delivers."""
    clock = MemoryReactorClock()
    rx, tx = socket_pair()
    delivered: list[intake.Batch] = []
    port = intake.IntakePort(clock, rx, DatagramCipher(TID, KEY), SIZE, lambda b, _: delivered.append(b))
    port.startReading()
    return clock, port, rx, tx, delivered


def test_the_port_pauses_for_as_long_as_a_few_datagrams_take_to_come():
    """It waits as long as GATHER datagrams take to come at the rate they came, at most PAUSE_MAX."""
    clock, port, rx, tx, delivered = watched_port()
    with tx:
        clock.advance(1.0)  # one datagram a second
        tx.send(sealed(0, 0, 0))
        port.doRead()
        assert [b.got for b in delivered] == [1]
        assert port not in clock.getReaders()
        clock.advance(intake.PAUSE_MAX)  # the longest pause
        assert port in clock.getReaders()
        # Then half as many again as GATHER during that pause: it waits as
        # long as GATHER of them take.
        count = intake.GATHER * 3 // 2
        assert count < intake.BATCH * intake.BATCHES_PER_WAKE
        for b in range(1, count + 1):
            tx.send(sealed(0, b, b))
        port.doRead()
        assert sum(b.got for b in delivered) == 1 + count
        pause = intake.GATHER * intake.PAUSE_MAX / count
        clock.advance(pause - 1e-5)
        assert port not in clock.getReaders()
        clock.advance(2e-5)
        assert port in clock.getReaders()
    port.stopListening()
    assert port not in clock.getReaders() and rx.fileno() == -1


def test_the_port_reads_on_while_the_socket_holds_more():
    """A wake-up that read its limit and left datagrams waiting does not pause."""
    clock, port, rx, tx, delivered = watched_port()
    with tx:
        count = intake.BATCH * intake.BATCHES_PER_WAKE + 1
        for b in range(count):
            tx.send(sealed(0, b, b))
        clock.advance(1.0)
        port.doRead()
        assert sum(b.got for b in delivered) == count - 1
        assert port in clock.getReaders()
        port.doRead()
        assert sum(b.got for b in delivered) == count
    port.stopListening()


def test_a_pause_gathers_a_few_datagrams_and_never_overfills_the_buffer():
    gather, longest = intake.GATHER, intake.PAUSE_MAX
    # 1000 a second: as long as GATHER take, up to the longest.
    assert intake.pause_after(2, 0.002, 1000, 10**6) == pytest.approx(min(longest, gather / 1000))
    # 100,000 a second: a third of a millisecond.
    assert intake.pause_after(100, 0.001, 100_000, 10**6) == pytest.approx(gather / 100_000)
    # Quiet for a second, then one: the longest, unless a quarter of the
    # buffer (here 50 datagrams) fills sooner at the fastest rate seen.
    assert intake.pause_after(1, 1.0, 1.0, 10**6) == longest
    assert intake.pause_after(1, 1.0, 20_000, 50) == pytest.approx(50 / 20_000)
    assert intake.pause_after(0, 1.0, 0.0, 50) == longest


def test_a_port_the_reactor_gave_up_on_says_so_and_lets_go_of_its_socket():
    clock, port, rx, tx, _ = watched_port()
    tx.close()
    logged = []
    observer = logged.append
    globalLogPublisher.addObserver(observer)
    try:
        port.connectionLost(Failure(OSError(errno.EBADF, "gone")))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert rx.fileno() == -1 and port not in clock.getReaders()
    assert any("stopped reading multicast datagrams" in formatEvent(e) for e in logged), logged
