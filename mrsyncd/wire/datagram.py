"""
The multicast datagram: the only thing mrsyncd puts on the bulk data path.

Every datagram carries one block of one file (or of a pack of small files,
`manifest.Pack`) of one transfer (or, ten times a second, the sender's
echo of its rate controller), sealed with an AEAD: its header is
authenticated and stays clear, its payload is encrypted.  The
key serves one run of one transfer (`run_key`) and travels only over the
authenticated control channel, so a receiver throws away anything forged,
replayed from another transfer or another run, or corrupted before a single
byte of it reaches the disk, and a host on the LAN reads nothing of the data.

Layout (all integers big-endian), see docs/PROTOCOL.md::

    0   1  version (11)
    1   1  kind    (1 = DATA: one block; 2 = PARITY: a parity of a group of
           blocks, see erasure.py; 3 = ECHO: the rate controller's view,
           `ratecontrol.Echo`, with file index ECHO_FILE and block index 0)
    2   4  the transfer id's first 4 bytes (`WIRE_ID_SIZE`)
    6   6  sequence number: counts the run's datagrams from 0.  It is the
           nonce (4 zero bytes, then the sequence as 8 bytes), and lets
           receivers measure loss as it happens, not only once a pass is over
    12  4  file index in the manifest
    16  4  block index in the file
    20  4  send time, microseconds modulo 2**32 on the sender's clock, so
           receivers measure queueing delay (one-way delay above its minimum)
    24  -  payload, encrypted (one block; the last of a file may be shorter)
    -16 16 AEAD tag over bytes 0..24 and the payload

Decoding is pure and never raises for any input: a malformed datagram is a
`Rejected` value with a reason, so the protocol can count it.

The AEAD runs in the C module `mrsyncd._crypto` where it was built (one
OpenSSL context per key: a datagram costs about 0.8 us), else in the
`cryptography` package, which is the same on the wire but, before its
release 42, sets a context up for every call (about 9 us).
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 11

try:
    from mrsyncd import _crypto
except ImportError:  # not built: the pure-Python path
    _crypto = None  # type: ignore[assignment]
if _crypto is not None and getattr(_crypto, "VERSION", None) != VERSION:
    # Built from an older checkout: its read loop would drop every datagram as another version's.
    _crypto = None  # type: ignore[assignment]
KIND_DATA = 1
KIND_PARITY = 2
KIND_ECHO = 3
#: An ECHO's file index: no file has it, so a receiver finds no file for it
#: and looks at its kind only then, off the path of every data datagram.
ECHO_FILE = 0xFFFFFFFF
_KINDS = (KIND_DATA, KIND_PARITY, KIND_ECHO)

_HEADER = struct.Struct(">BB4sHIIII")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16
#: Bytes a datagram carries beyond its payload.
OVERHEAD = HEADER_SIZE + TAG_SIZE
KEY_SIZE = 32
TRANSFER_ID_SIZE = 8
#: Bytes of the transfer id a datagram carries: enough to tell apart the
#: transfers that share a group and port (a datagram of another that
#: matched them would still fail its tag, since every run has its own
#: key), and 4 more bytes of file a datagram than the whole id left.
WIRE_ID_SIZE = 4
#: Run salts: drawn afresh for every run of a transfer (`run_key`).
RUN_SIZE = 16
MASK32 = 0xFFFFFFFF
#: A run numbers at most this many datagrams (8.9 years at 1 Gbit/s).
MAX_SEQUENCE = (1 << 48) - 1


def elapsed_us(now_us: int, then_us: int) -> int:
    """
    Microseconds from ``then_us`` to ``now_us``, two time stamps carried as
    32 bits (they wrap every 71 minutes), possibly on two hosts' clocks:
    signed, so that a clock behind the other reads as a negative time.
    """
    return ((now_us - then_us + (1 << 31)) & MASK32) - (1 << 31)


AES_256_GCM = "aes-256-gcm"
CHACHA20_POLY1305 = "chacha20-poly1305"
_PYTHON_AEADS: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {
    AES_256_GCM: AESGCM,
    CHACHA20_POLY1305: ChaCha20Poly1305,
}
CIPHERS = tuple(_PYTHON_AEADS)

#: Payload bytes per datagram that keep the whole IP packet inside a
#: 1500-byte Ethernet MTU for both IPv4 (20+8 header bytes) and IPv6 (40+8):
#: 1500 - 48 - OVERHEAD.  The master fills the packet of its own channel
#: instead (`multicast.Channel.payload_room`): 1432 bytes over IPv4.
DEFAULT_BLOCK_SIZE = 1500 - 48 - OVERHEAD
#: The largest payload that fits one UDP datagram over IPv6 with a 9000-byte
#: jumbo frame; larger values would be IP-fragmented.
MAX_BLOCK_SIZE = 9000 - 48 - OVERHEAD


class Reason(StrEnum):
    """Why a datagram was dropped; the values name the receiver's counters."""

    SHORT = "short"
    VERSION = "version"
    KIND = "kind"
    FOREIGN = "foreign"
    TAG = "tag"
    RANGE = "range"


class DataBlock(NamedTuple):
    """An authentic datagram's contents (a tuple: one is made per datagram)."""

    transfer_id: bytes
    file_index: int
    block_index: int
    payload: bytes
    sequence: int = 0
    sent_us: int = 0
    kind: int = KIND_DATA


@dataclass(frozen=True)
class Rejected:
    reason: Reason


class AEAD(Protocol):
    """One key's sealing and opening; the nonce is made from the sequence."""

    def seal(self, header: bytes, payload: bytes, sequence: int) -> bytes:
        """``header`` + the encrypted ``payload`` + the tag."""

    def open(self, datagram: bytes, header_size: int, sequence: int) -> bytes | None:
        """The payload, or None if the datagram does not authenticate."""


class PythonAEAD:
    """`AEAD` with the `cryptography` package, for hosts without the C module."""

    def __init__(self, cipher: str, key: bytes) -> None:
        if cipher not in _PYTHON_AEADS:
            raise ValueError(f"unknown cipher {cipher}")
        self._aead = _PYTHON_AEADS[cipher](key)

    def seal(self, header: bytes, payload: bytes, sequence: int) -> bytes:
        return header + self._aead.encrypt(_nonce(sequence), payload, header)

    def open(self, datagram: bytes, header_size: int, sequence: int) -> bytes | None:
        if len(datagram) < header_size + TAG_SIZE:
            return None
        try:
            return self._aead.decrypt(
                _nonce(sequence), bytes(datagram[header_size:]), bytes(datagram[:header_size])
            )
        except InvalidTag:
            return None


def _nonce(sequence: int) -> bytes:
    return b"\0\0\0\0" + sequence.to_bytes(8, "big")


def native() -> bool:
    """Whether the C path is in use (``MRSYNCD_PURE_PYTHON=1`` turns it off, for tests)."""
    return _crypto is not None and not os.environ.get("MRSYNCD_PURE_PYTHON")


def new_aead(cipher: str, key: bytes, native_path: bool | None = None) -> AEAD:
    """The C module's `AEAD` unless ``native_path`` (default: `native`) says otherwise."""
    if native() if native_path is None else native_path:
        return _crypto.AEAD(cipher, key)
    return PythonAEAD(cipher, key)


@functools.cache
def preferred_cipher(cpuinfo: str = "/proc/cpuinfo") -> str:
    """
    AES-256-GCM where the CPU has AES instructions (x86's ``aes`` flag,
    ARM's ``aes`` feature), else ChaCha20-Poly1305, which is faster in
    software.  The sender chooses and tells its receivers in the offer;
    the CPU does not change, so the file is read once.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                name, _, values = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return AES_256_GCM if "aes" in values.split() else CHACHA20_POLY1305
    except OSError:
        pass
    return AES_256_GCM


def run_key(secret: bytes, transfer_id: bytes, run: bytes) -> bytes:
    """
    The datagram key of one run of a transfer: HKDF-SHA256 of the job's
    secret, salted with the run's fresh random bytes.  A run's sender
    numbers its datagrams from 0 again, so without a key of its own a
    resumed job would reuse nonces, and datagrams replayed from an earlier
    run would open.
    """
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=run, info=b"mrsyncd datagram v2 " + transfer_id
    ).derive(secret)


class DatagramCipher:
    """Seals and opens the datagrams of one run of one transfer."""

    def __init__(
        self, transfer_id: bytes, key: bytes, cipher: str = AES_256_GCM, native_path: bool | None = None
    ) -> None:
        self.transfer_id = transfer_id
        #: What a datagram of this transfer carries of its id (`WIRE_ID_SIZE`).
        self.wire_id = transfer_id[:WIRE_ID_SIZE]
        self.cipher = cipher
        #: The AEAD, which `mrsyncd.engine.intake` hands to the C read loop.
        self.aead = new_aead(cipher, key, native_path)

    def encode(
        self,
        file_index: int,
        block_index: int,
        payload: bytes,
        sequence: int = 0,
        sent_us: int = 0,
        kind: int = KIND_DATA,
    ) -> bytes:
        """Build one sealed datagram; ``sequence`` must never repeat under this key."""
        return self.aead.seal(
            self._header(kind, sequence, file_index, block_index, sent_us), payload, sequence
        )

    def _header(self, kind: int, sequence: int, file_index: int, block_index: int, sent_us: int) -> bytes:
        return _HEADER.pack(
            VERSION,
            kind,
            self.wire_id,
            sequence >> 32,
            sequence & MASK32,
            file_index,
            block_index,
            sent_us & MASK32,
        )

    def encode_blocks(
        self,
        file_index: int,
        block_index: int,
        data: bytes,
        offset: int,
        block_size: int,
        count: int,
        sequence: int,
        sent_us: int = 0,
    ) -> bytes:
        """
        The DATA datagrams of ``count`` consecutive whole blocks of ``data``
        from ``offset``, numbered from ``sequence``, back to back: what
        `encode` makes of each, in one call of the C module for a sender's
        batch, not a Python call, a slice and a header a datagram.
        """
        if _crypto is not None and isinstance(self.aead, _crypto.AEAD):
            header = self._header(KIND_DATA, sequence, file_index, block_index, sent_us)
            return self.aead.seal_blocks(header, data, offset, block_size, count)
        if offset < 0 or block_size < 0 or count < 1 or offset + count * block_size > len(data):
            raise ValueError("the blocks lie outside data")
        if sequence + count - 1 > MAX_SEQUENCE or block_index + count - 1 > MASK32:
            raise OverflowError("the run's sequence numbers or block indexes overflow")
        return b"".join(
            self.encode(
                file_index,
                block_index + i,
                data[offset + i * block_size : offset + (i + 1) * block_size],
                sequence + i,
                sent_us,
            )
            for i in range(count)
        )

    def decode(self, datagram: bytes) -> DataBlock | Rejected:
        """
        Only an authentic datagram of this run is returned as a `DataBlock`;
        range checks against the manifest are the receiver's, since only it
        knows the files.  This runs for every datagram received (up to
        85,000 a second at 1 Gbit/s), so it is written out in one function.
        """
        if len(datagram) < OVERHEAD:
            return Rejected(Reason.SHORT)
        version, kind, seen, high, low, file_index, block_index, sent_us = _HEADER.unpack_from(datagram)
        if version != VERSION or kind not in _KINDS:
            return _header(datagram)  # type: ignore[return-value]  # which of the two
        if seen != self.wire_id:
            return Rejected(Reason.FOREIGN)
        sequence = high << 32 | low
        payload = self.aead.open(datagram, HEADER_SIZE, sequence)
        if payload is None:
            return Rejected(Reason.TAG)
        return DataBlock(self.transfer_id, file_index, block_index, payload, sequence, sent_us, kind)


def _header(datagram: bytes) -> tuple[Any, ...] | Rejected:
    """The clear header's fields, if the datagram is long enough and of a version and kind we know."""
    if len(datagram) < OVERHEAD:
        return Rejected(Reason.SHORT)
    fields: tuple[Any, ...] = _HEADER.unpack_from(datagram)
    if fields[0] != VERSION:
        return Rejected(Reason.VERSION)
    if fields[1] not in _KINDS:
        return Rejected(Reason.KIND)
    return fields


def peek_wire_id(datagram: bytes) -> bytes | Rejected:
    """
    Read what a datagram carries of its transfer id (`DatagramCipher.wire_id`)
    without opening it, so that a socket shared by several transfers can
    find the key to open it with.
    """
    header = _header(datagram)
    return header if isinstance(header, Rejected) else bytes(header[2])
