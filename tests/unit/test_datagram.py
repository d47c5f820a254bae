"""The datagram codec: layout, sealing, and total decoding of any input, on both AEAD paths."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from mrsyncd.wire import datagram
from mrsyncd.wire.datagram import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    HEADER_SIZE,
    OVERHEAD,
    DataBlock,
    DatagramCipher,
    Reason,
    Rejected,
    peek_wire_id,
)

#: Every AEAD path this host has: the contract holds for each.
PATHS = [False] + ([True] if datagram._crypto is not None else [])
paths = pytest.mark.parametrize("native", PATHS, ids=lambda n: "C" if n else "python")

keys = st.binary(min_size=datagram.KEY_SIZE, max_size=datagram.KEY_SIZE)
transfer_ids = st.binary(min_size=datagram.TRANSFER_ID_SIZE, max_size=datagram.TRANSFER_ID_SIZE)
indices = st.integers(min_value=0, max_value=2**32 - 1)
sequences = st.integers(min_value=0, max_value=datagram.MAX_SEQUENCE)
payloads = st.binary(max_size=datagram.MAX_BLOCK_SIZE)
ciphers = st.sampled_from(datagram.CIPHERS)


@st.composite
def valid(draw, native=False):
    """A valid datagram, the cipher that sealed it, and what went into it."""
    cipher = DatagramCipher(draw(transfer_ids), draw(keys), draw(ciphers), native)
    f, b, payload, seq = draw(indices), draw(indices), draw(payloads), draw(sequences)
    return cipher, f, b, payload, seq, cipher.encode(f, b, payload, seq)


def expected_reason(data: bytes, transfer_id: bytes) -> Reason:
    """The reference model of why a datagram that is not valid is dropped."""
    if len(data) < OVERHEAD:
        return Reason.SHORT
    if data[0] != datagram.VERSION:
        return Reason.VERSION
    if data[1] not in (datagram.KIND_DATA, datagram.KIND_PARITY, datagram.KIND_ECHO):
        return Reason.KIND
    if data[2:6] != transfer_id[:4]:  # a datagram carries the id's first 4 bytes
        return Reason.FOREIGN
    return Reason.TAG


@paths
@pytest.mark.parametrize("cipher", datagram.CIPHERS)
def test_layout_and_known_answer(native, cipher):
    """The header is clear; the payload is the AEAD's output under nonce 0000 || sequence."""
    key, tid, seq = bytes(range(32)), b"12345678", (5 << 32) + 11
    payload = b"the quick brown fox " * 10
    packet = DatagramCipher(tid, key, cipher, native).encode(7, 9, payload, seq, (1 << 32) + 13)
    assert HEADER_SIZE == 24 and OVERHEAD == 40
    assert packet[:2] == bytes([datagram.VERSION, datagram.KIND_DATA])
    assert packet[2:6] == b"1234", "the transfer id's first 4 bytes"
    assert packet[6:12] == seq.to_bytes(6, "big")
    assert packet[12:16] == (7).to_bytes(4, "big")
    assert packet[16:20] == (9).to_bytes(4, "big")
    assert packet[20:24] == (13).to_bytes(4, "big"), "send time is kept modulo 2**32"
    assert len(packet) == OVERHEAD + len(payload)
    assert b"quick brown" not in packet
    reference = {AES_256_GCM: AESGCM, CHACHA20_POLY1305: ChaCha20Poly1305}[cipher](key)
    nonce = bytes(4) + seq.to_bytes(8, "big")
    assert packet[HEADER_SIZE:] == reference.encrypt(nonce, payload, packet[:HEADER_SIZE])
    # The largest block still fits a 9000-byte jumbo frame over IPv6.
    assert OVERHEAD + datagram.MAX_BLOCK_SIZE + 48 <= 9000
    assert OVERHEAD + datagram.DEFAULT_BLOCK_SIZE + 48 <= 1500


@pytest.mark.skipif(len(PATHS) < 2, reason="the C module is not built")
@given(valid(native=True), st.booleans())
def test_c_and_python_paths_agree(v, seal_native):
    """Either path opens what the other sealed, byte for byte the same datagram."""
    sealer, f, b, payload, seq, _ = v
    key = os.urandom(32)
    one = DatagramCipher(sealer.transfer_id, key, sealer.cipher, seal_native)
    other = DatagramCipher(sealer.transfer_id, key, sealer.cipher, not seal_native)
    packet = one.encode(f, b, payload, seq, 99)
    assert packet == other.encode(f, b, payload, seq, 99)
    assert other.decode(packet) == DataBlock(sealer.transfer_id, f, b, payload, seq, 99)


def _round_trips(cipher: DatagramCipher, f: int, b: int, payload: bytes, seq: int, packet: bytes) -> None:
    assert peek_wire_id(packet) == cipher.transfer_id[:4] == cipher.wire_id
    got = cipher.decode(packet)
    assert got == DataBlock(cipher.transfer_id, f, b, payload, seq)
    assert type(got.payload) is bytes
    # bytearray input decodes the same (receivers may pass either).
    assert cipher.decode(bytearray(packet)) == got


@paths
@given(data=st.data())
def test_round_trip(native, data):
    _round_trips(*data.draw(valid(native)))


@paths
def test_the_smallest_datagram_round_trips(native):
    """An empty payload, every field 0."""
    cipher = DatagramCipher(b"\0" * 8, b"\0" * 32, AES_256_GCM, native)
    _round_trips(cipher, 0, 0, b"", 0, cipher.encode(0, 0, b""))


@paths
def test_sequences_past_48_bits_are_refused(native):
    cipher = DatagramCipher(b"t" * 8, b"k" * 32, AES_256_GCM, native)
    last = cipher.encode(1, 2, b"x", datagram.MAX_SEQUENCE)
    assert cipher.decode(last).sequence == datagram.MAX_SEQUENCE
    with pytest.raises(struct.error):
        cipher.encode(1, 2, b"x", datagram.MAX_SEQUENCE + 1)


@paths
@settings(max_examples=200)
@given(data=st.data())
def test_any_flipped_bit_is_rejected(native, data):
    cipher, _, _, _, _, packet = data.draw(valid(native))
    bit = data.draw(st.integers(min_value=0, max_value=len(packet) * 8 - 1), label="bit")
    mutated = bytearray(packet)
    mutated[bit // 8] ^= 1 << (bit % 8)
    got = cipher.decode(bytes(mutated))
    assert got == Rejected(expected_reason(bytes(mutated), cipher.transfer_id))
    # Where the bit was decides the reason.
    position = bit // 8
    if position == 0:
        assert got.reason is Reason.VERSION
    elif position == 1:
        # Another known kind still fails: the tag covers the kind.
        known = mutated[1] in (datagram.KIND_DATA, datagram.KIND_PARITY, datagram.KIND_ECHO)
        assert got.reason is (Reason.TAG if known else Reason.KIND)
    elif position < 6:
        assert got.reason is Reason.FOREIGN
    else:
        assert got.reason is Reason.TAG


@given(valid(), keys)
def test_another_key_is_rejected(v, other_key):
    cipher, _, _, _, _, packet = v
    other = DatagramCipher(cipher.transfer_id, other_key, cipher.cipher)
    if other.encode(0, 0, b"") != cipher.encode(0, 0, b""):
        assert other.decode(packet) == Rejected(Reason.TAG)


@given(valid(), transfer_ids)
def test_another_transfer_id_is_rejected(v, other_tid):
    cipher, _, _, _, _, packet = v
    if other_tid != cipher.transfer_id:
        other = DatagramCipher(other_tid, os.urandom(32), cipher.cipher)
        # A datagram carries its id's first 4 bytes: one of another id that
        # shares them is told apart by its tag, since the key is another.
        foreign = Reason.FOREIGN if other_tid[:4] != cipher.transfer_id[:4] else Reason.TAG
        assert other.decode(packet) == Rejected(foreign)
        # Even a datagram sealed with the right key under the other id.
        assert other.decode(cipher.encode(1, 2, b"x")) == Rejected(foreign)
        # And one relabelled with this transfer's id fails its tag.
        assert other.decode(packet[:2] + other_tid[:4] + packet[6:]) == Rejected(Reason.TAG)


def test_an_earlier_run_does_not_open():
    """Each run has its own key: a datagram replayed from an earlier run of the same job is a forgery."""
    secret, tid = os.urandom(32), os.urandom(8)
    first_run, second_run = os.urandom(datagram.RUN_SIZE), os.urandom(datagram.RUN_SIZE)
    first = datagram.run_key(secret, tid, first_run)
    assert first == datagram.run_key(secret, tid, first_run)
    assert first != datagram.run_key(secret, tid, second_run)
    assert first != datagram.run_key(secret, os.urandom(8), first_run)
    replayed = DatagramCipher(tid, first).encode(0, 0, b"block", 0)
    assert DatagramCipher(tid, datagram.run_key(secret, tid, second_run)).decode(replayed) == Rejected(
        Reason.TAG
    )


@pytest.mark.parametrize(
    "cpuinfo, cipher",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 aes avx\n", AES_256_GCM),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx\n", CHACHA20_POLY1305),
        ("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n", AES_256_GCM),
        ("processor\t: 0\nFeatures\t: fp asimd\n", CHACHA20_POLY1305),
    ],
)
def test_the_cipher_follows_the_cpu(tmp_path, cpuinfo, cipher):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert datagram.preferred_cipher(str(tmp_path / "cpuinfo")) == cipher
    assert datagram.preferred_cipher(str(tmp_path / "absent")) == AES_256_GCM


def _check_total(data: bytes, cipher: DatagramCipher) -> None:
    seen = peek_wire_id(data)
    if isinstance(seen, Rejected):
        assert seen.reason in (Reason.SHORT, Reason.VERSION, Reason.KIND)
        assert seen == Rejected(expected_reason(data, cipher.transfer_id))
    else:
        assert seen == data[2:6] and type(seen) is bytes
    got = cipher.decode(data)
    assert isinstance(got, Rejected)
    assert got == Rejected(expected_reason(data, cipher.transfer_id))


@paths
@settings(max_examples=300)
@given(data=st.binary(max_size=2000), key=keys, tid=transfer_ids)
def test_arbitrary_bytes_never_raise(native, data, key, tid):
    cipher = DatagramCipher(tid, key, AES_256_GCM, native)
    _check_total(data, cipher)
    # Past the cheap checks, down to the tag.
    v = bytes([datagram.VERSION])
    _check_total(v + b"\x01" + tid + data, cipher)
    _check_total(v + b"\x01" + data, cipher)
    _check_total(b"\x01\x01" + tid + data, cipher)
    _check_total(v + b"\x04" + tid + data, cipher)


@paths
def test_every_length_up_to_2000(native):
    key, tid = os.urandom(32), os.urandom(8)
    cipher = DatagramCipher(tid, key, AES_256_GCM, native)
    for n in range(2001):
        _check_total(os.urandom(n), cipher)
        _check_total(bytes(n), cipher)
        _check_total((bytes([datagram.VERSION]) + b"\x01" + tid + os.urandom(n))[:n], cipher)


@paths
@settings(max_examples=200)
@given(data=st.data(), extra=st.binary(min_size=1, max_size=100))
def test_truncated_or_extended_is_rejected(native, data, extra):
    cipher, _, _, _, _, packet = data.draw(valid(native))
    n = data.draw(st.integers(min_value=0, max_value=len(packet) - 1), label="length")
    assert cipher.decode(packet[:n]) == Rejected(Reason.SHORT if n < OVERHEAD else Reason.TAG)
    assert cipher.decode(packet + extra) == Rejected(Reason.TAG)


@paths
@settings(max_examples=200)
@given(data=st.data())
def test_flipped_bytes_are_rejected(native, data):
    cipher, _, _, _, _, packet = data.draw(valid(native))
    mutated = bytearray(packet)
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(packet) - 1), st.integers(1, 255)), min_size=1, max_size=8),
        label="flips",
    )
    for position, mask in flips:
        mutated[position] ^= mask
    got = cipher.decode(bytes(mutated))
    if mutated == packet:  # two flips of one byte cancelled out
        assert isinstance(got, DataBlock)
    else:
        assert got == Rejected(expected_reason(bytes(mutated), cipher.transfer_id))


@paths
@settings(max_examples=200)
@given(
    cipher=ciphers,
    f=indices,
    b=st.integers(min_value=0, max_value=2**32 - 64),
    seq=st.integers(min_value=0, max_value=datagram.MAX_SEQUENCE - 64),
    block_size=st.integers(min_value=0, max_value=1500),
    count=st.integers(min_value=1, max_value=44),
    before=st.integers(min_value=0, max_value=3000),
    after=st.integers(min_value=0, max_value=3000),
)
def test_a_run_is_its_datagrams_end_to_end(native, cipher, f, b, seq, block_size, count, before, after):
    """
    `encode_blocks` seals a run of whole blocks into what `encode` makes of
    each, back to back, each opening as its own datagram: the sequence and
    the block index go up by one a datagram, across 2**32 in the sequence.
    """
    sealer = DatagramCipher(b"t" * 8, os.urandom(32), cipher, native)
    data = os.urandom(before + count * block_size + after)
    run = sealer.encode_blocks(f, b, data, before, block_size, count, seq, 77)
    one = [data[before + i * block_size : before + (i + 1) * block_size] for i in range(count)]
    assert run == b"".join(sealer.encode(f, b + i, one[i], seq + i, 77) for i in range(count))
    size = OVERHEAD + block_size
    for i in range(count):
        assert sealer.decode(run[i * size : (i + 1) * size]) == DataBlock(
            b"t" * 8, f, b + i, one[i], seq + i, 77
        )


@paths
def test_a_run_past_its_data_or_its_numbers_is_refused(native):
    """Both paths refuse a run that reads past its data, or whose last sequence or block index would wrap."""
    cipher = DatagramCipher(b"t" * 8, b"k" * 32, AES_256_GCM, native)
    data = bytes(10 * 100)
    assert len(cipher.encode_blocks(0, 0, data, 0, 100, 10, 0)) == 10 * (OVERHEAD + 100)
    for offset, count in ((1, 10), (0, 11), (-1, 1), (0, 0), (1001, 1)):
        with pytest.raises(ValueError):
            cipher.encode_blocks(0, 0, data, offset, 100, count, 0)
    cipher.encode_blocks(0, 2**32 - 10, data, 0, 100, 10, datagram.MAX_SEQUENCE - 9)
    with pytest.raises(OverflowError):
        cipher.encode_blocks(0, 0, data, 0, 100, 10, datagram.MAX_SEQUENCE - 8)
    with pytest.raises(OverflowError):
        cipher.encode_blocks(0, 2**32 - 9, data, 0, 100, 10, 0)
