"""
AMP's boxes on the standard library alone, for the short-lived ``mrsync``.

The master and the nodes speak AMP through Twisted (`commands`).  The
operator's command ran for a second or less and spent 0.26-0.33 s of it
importing Twisted's AMP, its TLS and pyOpenSSL: more than the whole start
of a 200 MiB push besides, and the largest part of what kept scenario A
under 93% of the link.  What an operator's side needs of AMP is small: its
framing (16-bit-length-prefixed keys and values, an empty key to end a
box), its ``_ask``/``_answer``/``_error`` tags, and the encodings of the
few argument types the operator's commands use.  They are here, with a
caller that blocks on an `ssl` socket (`BoxStream`).

`OPERATOR_COMMANDS` restates the operator's half of `commands`;
``tests/unit/test_boxes.py`` holds each to its Twisted twin, argument for
argument, through Twisted's own parser, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterable
from typing import Any, NamedTuple, Self

#: The most bytes one AMP value holds; `BigBytes` values are split in pieces of it.
PIECE = 0xFFFF
#: 4096 pieces of 64 KiB: a 256 MiB manifest, about 4 million chunks.
MAX_PIECES = 4096
#: The most bytes a `BigBytes` value holds, and a compressed one inflates to.
MAX_BIG_BYTES = MAX_PIECES * PIECE
#: The most keys one box may hold: one `BigBytes` at its largest and the
#: handful of other arguments any command has.
MAX_BOX_KEYS = MAX_PIECES + 64
#: The most bytes one box may ever hold on the wire: one `BigBytes` at its
#: largest plus 16 more values of the greatest size, each key at most 255 bytes.
MAX_BOX_BYTES = (MAX_PIECES + 16) * (2 + 255 + 2 + PIECE)

Items = Iterable[tuple[bytes, bytes]]
Box = dict[bytes, bytes]


class AmpError(Exception):
    """An AMP error answer: ``code`` and ``description`` as the peer sent them."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


#: The error codes of the operator's commands (`commands._OPERATOR_ERRORS`):
#: the master understood the request and refused it, and says why.
REFUSALS = frozenset({"FORBIDDEN", "BAD_REQUEST", "NO_SUCH_JOB"})


def encode(items: Items) -> bytes:
    """AMP's wire form of one box: 16-bit-length-prefixed keys and values, then an empty key."""
    out = bytearray()
    for key, value in items:
        out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    return bytes(out + b"\0\0")


def pieces(name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """A `commands.BigBytes` value: ``name``, ``name.1``, ... of at most `PIECE` bytes each."""
    split = [value[i : i + PIECE] for i in range(0, len(value), PIECE)] or [b""]
    return [(name if i == 0 else name + b".%d" % i, piece) for i, piece in enumerate(split)]


def joined(box: Box, name: bytes) -> bytes:
    """The value of a `commands.BigBytes` argument of ``box``."""
    found = [box[name]]
    while (key := name + b".%d" % len(found)) in box:
        found.append(box[key])
    return b"".join(found)


class Kind:
    """How one of AMP's argument types puts a value in a box and takes it out (as Twisted's does)."""

    def to_box(self, name: bytes, value: Any) -> list[tuple[bytes, bytes]]:
        return [(name, self.encode(value))]

    def from_box(self, name: bytes, box: Box) -> Any:
        return self.decode(box[name])

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


class _Integer(Kind):
    def encode(self, value: Any) -> bytes:
        return b"%d" % (value,)

    def decode(self, data: bytes) -> Any:
        return int(data)


class _Float(Kind):
    def encode(self, value: Any) -> bytes:
        return str(float(value)).encode("ascii")

    def decode(self, data: bytes) -> Any:
        return float(data)


class _Boolean(Kind):
    def encode(self, value: Any) -> bytes:
        return b"True" if value else b"False"

    def decode(self, data: bytes) -> Any:
        if data not in (b"True", b"False"):
            raise ValueError(f"bad boolean value: {data!r}")
        return data == b"True"


class _Text(Kind):
    def encode(self, value: Any) -> bytes:
        return str(value).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return data.decode("utf-8")


class _JSON(Kind):
    """`commands.JSONArgument`: JSON (``sort_keys``) split over as many values as it needs."""

    def to_box(self, name: bytes, value: Any) -> list[tuple[bytes, bytes]]:
        return pieces(name, json.dumps(value, sort_keys=True).encode())

    def from_box(self, name: bytes, box: Box) -> Any:
        return json.loads(joined(box, name))


INTEGER, FLOAT, BOOLEAN, TEXT, JSON = _Integer(), _Float(), _Boolean(), _Text(), _JSON()


class Argument(NamedTuple):
    name: str
    kind: Kind
    optional: bool = False


class Command(NamedTuple):
    """An AMP command as its caller sees it: its name, what it takes and what it answers."""

    name: str
    arguments: tuple[Argument, ...] = ()
    response: tuple[Argument, ...] = ()


SUBMIT = Command("Submit", (Argument("spec", JSON),), (Argument("job", INTEGER),))
LIST_JOBS = Command("ListJobs", (Argument("limit", INTEGER),), (Argument("jobs", JSON),))
JOB_STATUS = Command(
    "JobStatus",
    (Argument("job", INTEGER), Argument("files", BOOLEAN), Argument("wait", FLOAT, optional=True)),
    (Argument("status", JSON),),
)
CANCEL = Command("Cancel", (Argument("job", INTEGER),), (Argument("state", TEXT),))
LIST_NODES = Command("ListNodes", (), (Argument("nodes", JSON),))
FORGET_NODE = Command("ForgetNode", (Argument("name", TEXT),))
#: The commands an operator may send the master (`commands.Submit` and the rest).
OPERATOR_COMMANDS = (SUBMIT, LIST_JOBS, JOB_STATUS, CANCEL, LIST_NODES, FORGET_NODE)


def arguments_box(command: Command, values: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """``values`` as ``command``'s arguments; an optional one given as None is left out, as AMP does."""
    items: list[tuple[bytes, bytes]] = []
    for argument in command.arguments:
        value = values[argument.name]
        if value is None and argument.optional:
            continue
        items += argument.kind.to_box(argument.name.encode(), value)
    return items


def answer_values(command: Command, box: Box) -> dict[str, Any]:
    """``command``'s answer from its box (an optional value not sent is None)."""
    values: dict[str, Any] = {}
    for argument in command.response:
        name = argument.name.encode()
        values[argument.name] = (
            None if argument.optional and name not in box else argument.kind.from_box(name, box)
        )
    return values


class BoxStream:
    """
    AMP boxes over a blocking socket: `ask` sends a command and returns its
    answer's box.  A box past `MAX_BOX_KEYS` keys or ``max_box_bytes``
    bytes ends the stream (`ConnectionError`), as `commands.BoundedAMP`
    ends a connection.
    """

    def __init__(self, sock: socket.socket, max_box_bytes: int = MAX_BOX_BYTES) -> None:
        self.sock = sock
        self.max_box_bytes = max_box_bytes
        self._buffer = bytearray()
        self._at = 0
        self._asked = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _take(self, n: int) -> bytes:
        while len(self._buffer) - self._at < n:
            piece = self.sock.recv(max(1 << 16, n - (len(self._buffer) - self._at)))
            if not piece:
                raise ConnectionError("the peer closed the connection")
            self._buffer += piece
        data = bytes(self._buffer[self._at : self._at + n])
        self._at += n
        if self._at >= 1 << 20 or self._at == len(self._buffer):
            del self._buffer[: self._at]
            self._at = 0
        return data

    def read_box(self) -> Box:
        box: Box = {}
        size = 0
        while True:
            length = int.from_bytes(self._take(2), "big")
            if not length:
                return box
            key = self._take(length)
            value = self._take(int.from_bytes(self._take(2), "big"))
            size += 4 + len(key) + len(value)
            if len(box) >= MAX_BOX_KEYS or size > self.max_box_bytes:
                raise ConnectionError(
                    f"the peer sent a box of more than {MAX_BOX_KEYS} keys or {self.max_box_bytes} bytes"
                )
            box[key] = value

    def ask(self, command: str, items: Items = ()) -> Box:
        """Send ``command`` with ``items``; its answer's box, or `AmpError` for an error answer."""
        self._asked += 1
        tag = b"%x" % self._asked
        self.send(encode([(b"_ask", tag), (b"_command", command.encode()), *items]))
        while True:
            box = self.read_box()
            if box.get(b"_answer") == tag:
                return box
            if box.get(b"_error") == tag:
                raise AmpError(
                    box.get(b"_error_code", b"UNKNOWN").decode("utf-8", "replace"),
                    box.get(b"_error_description", b"").decode("utf-8", "replace"),
                )

    def call_remote(self, command: Command, **values: Any) -> dict[str, Any]:
        """
        ``command`` with ``values`` (every argument named; optional ones may
        be None): its answer, decoded, as Twisted's ``callRemote`` gives it.
        """
        return answer_values(command, self.ask(command.name, arguments_box(command, values)))


def client_context(ca: str, certificate: str, key: str) -> ssl.SSLContext:
    """
    TLS 1.3 that trusts the cluster CA alone (never the system's) and checks
    the master's name, with this side's certificate; what `tls.client_options`
    sets up for Twisted.  An encrypted key is refused, not asked for.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(certificate, key, password=b"")
    return context
