"""The datagram codec: round trips, tags, and total decoding of any input."""

from __future__ import annotations

import os

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mrsyncd import datagram
from mrsyncd.datagram import HEADER_SIZE, DataBlock, Reason, Rejected, decode, encode, peek_transfer_id

keys = st.binary(min_size=datagram.KEY_SIZE, max_size=datagram.KEY_SIZE)
transfer_ids = st.binary(min_size=datagram.TRANSFER_ID_SIZE, max_size=datagram.TRANSFER_ID_SIZE)
indices = st.integers(min_value=0, max_value=2**32 - 1)
payloads = st.binary(max_size=datagram.MAX_BLOCK_SIZE)


@st.composite
def valid(draw):
    """A valid datagram and what went into it."""
    key, tid = draw(keys), draw(transfer_ids)
    f, b, payload = draw(indices), draw(indices), draw(payloads)
    return key, tid, f, b, payload, encode(key, tid, f, b, payload)


def expected_reason(data: bytes, transfer_id: bytes) -> Reason:
    """The reference model of why a datagram that is not valid is dropped."""
    if len(data) < HEADER_SIZE:
        return Reason.SHORT
    if data[:2] != b"MR":
        return Reason.MAGIC
    if data[2] != datagram.VERSION:
        return Reason.VERSION
    if data[3] not in (datagram.KIND_DATA, datagram.KIND_PARITY, datagram.KIND_ECHO):
        return Reason.KIND
    if data[4:12] != transfer_id:
        return Reason.FOREIGN
    return Reason.TAG


def test_layout():
    packet = encode(b"k" * 32, b"12345678", 7, 9, b"payload", 11, (1 << 32) + 13)
    assert HEADER_SIZE == 44
    assert packet[:4] == b"MR\x01\x01"
    assert packet[4:12] == b"12345678"
    assert packet[12:16] == (7).to_bytes(4, "big")
    assert packet[16:20] == (9).to_bytes(4, "big")
    assert packet[20:24] == (11).to_bytes(4, "big")
    assert packet[24:28] == (13).to_bytes(4, "big"), "send time is kept modulo 2**32"
    assert packet[44:] == b"payload"
    assert len(packet) == HEADER_SIZE + 7
    # The largest block still fits a 9000-byte jumbo frame over IPv6.
    assert HEADER_SIZE + datagram.MAX_BLOCK_SIZE + 48 <= 9000
    assert HEADER_SIZE + datagram.DEFAULT_BLOCK_SIZE + 48 <= 1500


@given(valid())
@example((b"\0" * 32, b"\0" * 8, 0, 0, b"", encode(b"\0" * 32, b"\0" * 8, 0, 0, b"")))
@example(
    (
        b"\xff" * 32,
        b"\xff" * 8,
        2**32 - 1,
        2**32 - 1,
        b"\xff" * 9000,
        encode(b"\xff" * 32, b"\xff" * 8, 2**32 - 1, 2**32 - 1, b"\xff" * 9000),
    )
)
def test_round_trip(v):
    key, tid, f, b, payload, packet = v
    assert peek_transfer_id(packet) == tid
    got = decode(key, tid, packet)
    assert got == DataBlock(tid, f, b, payload)
    assert type(got.payload) is bytes
    # bytearray and memoryview input decode the same (receivers may pass either).
    assert decode(key, tid, bytearray(packet)) == got


@settings(max_examples=300)
@given(valid(), st.data())
def test_any_flipped_bit_is_rejected(v, data):
    key, tid, _, _, _, packet = v
    bit = data.draw(st.integers(min_value=0, max_value=len(packet) * 8 - 1), label="bit")
    mutated = bytearray(packet)
    mutated[bit // 8] ^= 1 << (bit % 8)
    mutated = bytes(mutated)
    got = decode(key, tid, mutated)
    assert got == Rejected(expected_reason(mutated, tid))
    # Where the bit was decides the reason.
    position = bit // 8
    if position < 2:
        assert got.reason is Reason.MAGIC
    elif position == 2:
        assert got.reason is Reason.VERSION
    elif position == 3:
        # Another known kind still fails: the tag covers the kind.
        known = mutated[3] in (datagram.KIND_DATA, datagram.KIND_PARITY, datagram.KIND_ECHO)
        assert got.reason is (Reason.TAG if known else Reason.KIND)
    elif position < 12:
        assert got.reason is Reason.FOREIGN
    else:
        assert got.reason is Reason.TAG


@given(valid(), keys)
def test_another_transfers_key_is_rejected(v, other_key):
    key, tid, _, _, _, packet = v
    if other_key != key:
        assert decode(other_key, tid, packet) == Rejected(Reason.TAG)


@given(valid(), transfer_ids)
def test_another_transfer_id_is_rejected(v, other_tid):
    key, tid, _, _, _, packet = v
    if other_tid != tid:
        assert decode(key, other_tid, packet) == Rejected(Reason.FOREIGN)
        # Even a datagram tagged with the right key under the other id.
        assert decode(key, other_tid, encode(key, tid, 1, 2, b"x")) == Rejected(Reason.FOREIGN)


@given(valid(), transfer_ids, keys)
def test_header_rewritten_to_this_transfer_is_rejected(v, tid, key):
    """A datagram of another transfer relabelled with this transfer's id fails its tag."""
    other_key, other_tid, f, b, payload, packet = v
    relabelled = packet[:4] + tid + packet[12:]
    if other_tid != tid or other_key != key:
        assert decode(key, tid, relabelled) == Rejected(Reason.TAG)


def _check_total(data: bytes, key: bytes, tid: bytes) -> None:
    seen = peek_transfer_id(data)
    if isinstance(seen, Rejected):
        assert seen.reason in (Reason.SHORT, Reason.MAGIC, Reason.VERSION, Reason.KIND)
        assert seen == Rejected(expected_reason(data, tid))
    else:
        assert seen == data[4:12] and type(seen) is bytes
    got = decode(key, tid, data)
    assert isinstance(got, Rejected)
    assert got == Rejected(expected_reason(data, tid))


@settings(max_examples=500)
@given(st.binary(max_size=2000), keys, transfer_ids)
def test_arbitrary_bytes_never_raise(data, key, tid):
    _check_total(data, key, tid)


@given(st.binary(max_size=2000), keys, transfer_ids)
def test_arbitrary_bytes_behind_a_good_prefix_never_raise(tail, key, tid):
    """Past the cheap checks, down to the tag."""
    _check_total(b"MR\x01\x01" + tid + tail, key, tid)
    _check_total(b"MR\x01\x01" + tail, key, tid)
    _check_total(b"MR\x02\x01" + tail, key, tid)
    _check_total(b"MR\x01\x02" + tail, key, tid)


def test_every_length_up_to_2000():
    key, tid = os.urandom(32), os.urandom(8)
    for n in range(2001):
        _check_total(os.urandom(n), key, tid)
        _check_total(bytes(n), key, tid)
        _check_total((b"MR\x01\x01" + tid + os.urandom(n))[:n], key, tid)


@settings(max_examples=300)
@given(valid(), st.data())
def test_truncated_is_rejected(v, data):
    key, tid, _, _, _, packet = v
    n = data.draw(st.integers(min_value=0, max_value=len(packet) - 1), label="length")
    got = decode(key, tid, packet[:n])
    assert got == Rejected(Reason.SHORT if n < HEADER_SIZE else Reason.TAG)


@given(valid(), st.binary(min_size=1, max_size=100))
def test_extended_is_rejected(v, extra):
    key, tid, _, _, _, packet = v
    assert decode(key, tid, packet + extra) == Rejected(Reason.TAG)


@settings(max_examples=300)
@given(valid(), st.data())
def test_flipped_bytes_are_rejected(v, data):
    key, tid, _, _, _, packet = v
    mutated = bytearray(packet)
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(packet) - 1), st.integers(1, 255)), min_size=1, max_size=8),
        label="flips",
    )
    for position, mask in flips:
        mutated[position] ^= mask
    mutated = bytes(mutated)
    got = decode(key, tid, mutated)
    if mutated == packet:  # two flips of one byte cancelled out
        assert isinstance(got, DataBlock)
    else:
        assert got == Rejected(expected_reason(mutated, tid))
