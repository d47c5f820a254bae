"""
The multicast datagram: the only thing mrsyncd puts on the bulk data path.

Every datagram carries one block of one file of one transfer (or, ten times
a second, the sender's echo of its rate controller), and a keyed BLAKE2b tag
over the header and payload.  The key is fresh for every transfer
and travels only over the authenticated control channel, so a receiver can
throw away anything forged, replayed from another transfer, or corrupted
before a single byte of it reaches the disk.

Layout (all integers big-endian), see docs/PROTOCOL.md::

    0   2  magic  b"MR"
    2   1  version (1)
    3   1  kind    (1 = DATA: one block; 2 = PARITY: a parity of a group of
           blocks, see erasure.py; 3 = ECHO: the rate controller's view,
           `ratecontrol.Echo`, with file index ECHO_FILE and block index 0)
    4   8  transfer id
    12  4  file index in the manifest
    16  4  block index in the file
    20  4  sequence number: counts the transfer's datagrams, so receivers
           measure loss as it happens, not only once a pass is over
    24  4  send time, microseconds modulo 2**32 on the sender's clock, so
           receivers measure queueing delay (one-way delay above its minimum)
    28 16  tag = BLAKE2b-128(key, bytes 0..28 + payload)
    44  -  payload (one block; the last block of a file may be shorter)

Decoding is pure and never raises for any input: a malformed datagram is a
`Rejected` value with a reason, so the protocol can count it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

MAGIC = b"MR"
VERSION = 1
KIND_DATA = 1
KIND_PARITY = 2
KIND_ECHO = 3
#: An ECHO's file index: no file has it, so a receiver finds no file for it
#: and looks at its kind only then, off the path of every data datagram.
ECHO_FILE = 0xFFFFFFFF
_KINDS = (KIND_DATA, KIND_PARITY, KIND_ECHO)

_PREFIX = struct.Struct(">2sBB8sIIII")
TAG_SIZE = 16
HEADER_SIZE = _PREFIX.size + TAG_SIZE
KEY_SIZE = 32
TRANSFER_ID_SIZE = 8
MASK32 = 0xFFFFFFFF

#: Payload bytes per datagram that keep the whole IP packet inside a
#: 1500-byte Ethernet MTU for both IPv4 (20+8 header bytes) and IPv6 (40+8):
#: 1500 - 48 - HEADER_SIZE.
DEFAULT_BLOCK_SIZE = 1408
#: The largest payload that fits one UDP datagram over IPv6 with a 9000-byte
#: jumbo frame; larger values would be IP-fragmented.
MAX_BLOCK_SIZE = 9000 - 48 - HEADER_SIZE


class Reason(StrEnum):
    """Why a datagram was dropped; the values name the receiver's counters."""

    SHORT = "short"
    MAGIC = "magic"
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


def _tag(key: bytes, prefix: bytes, payload: bytes) -> bytes:
    mac = hashlib.blake2b(prefix, key=key, digest_size=TAG_SIZE)
    mac.update(payload)
    return mac.digest()


def encode(
    key: bytes,
    transfer_id: bytes,
    file_index: int,
    block_index: int,
    payload: bytes,
    sequence: int = 0,
    sent_us: int = 0,
    kind: int = KIND_DATA,
) -> bytes:
    """Build one tagged datagram."""
    prefix = _PREFIX.pack(
        MAGIC, VERSION, kind, transfer_id, file_index, block_index, sequence & MASK32, sent_us & MASK32
    )
    return prefix + _tag(key, prefix, payload) + payload


def _header(datagram: bytes) -> tuple[Any, ...] | Rejected:
    if len(datagram) < HEADER_SIZE:
        return Rejected(Reason.SHORT)
    fields = _PREFIX.unpack_from(datagram)
    if fields[0] != MAGIC:
        return Rejected(Reason.MAGIC)
    if fields[1] != VERSION:
        return Rejected(Reason.VERSION)
    if fields[2] not in _KINDS:
        return Rejected(Reason.KIND)
    return fields


def peek_transfer_id(datagram: bytes) -> bytes | Rejected:
    """
    Read the transfer id without checking the tag, so that a socket shared by
    several transfers can find the key to check it with.
    """
    header = _header(datagram)
    return header if isinstance(header, Rejected) else bytes(header[3])


def decode(key: bytes, transfer_id: bytes, datagram: bytes) -> DataBlock | Rejected:
    """
    Check a datagram against this transfer's id and key.

    Only a datagram that carries a valid tag is returned as a `DataBlock`;
    range checks against the manifest are the receiver's, since only it knows
    the files.  This runs for every datagram received (up to 85,000 a second
    at 1 Gbit/s), so it is written out in one function.
    """
    if len(datagram) < HEADER_SIZE:
        return Rejected(Reason.SHORT)
    magic, version, kind, seen, file_index, block_index, sequence, sent_us = _PREFIX.unpack_from(datagram)
    if magic != MAGIC or version != VERSION or kind not in _KINDS:
        header = _header(datagram)
        assert isinstance(header, Rejected)
        return header
    if seen != transfer_id:
        return Rejected(Reason.FOREIGN)
    payload = datagram[HEADER_SIZE:]
    mac = hashlib.blake2b(datagram[: _PREFIX.size], key=key, digest_size=TAG_SIZE)
    mac.update(payload)
    if not hmac.compare_digest(datagram[_PREFIX.size : HEADER_SIZE], mac.digest()):
        return Rejected(Reason.TAG)
    return DataBlock(transfer_id, file_index, block_index, payload, sequence, sent_us, kind)
