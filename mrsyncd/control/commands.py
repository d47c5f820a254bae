"""
The wire vocabulary of mrsyncd's control channel: the AMP commands, their
argument types and the errors they carry.

Every end of the channel speaks these: the master and the nodes
(`control`, `master`).  The operator's ``mrsync`` speaks the operator's
commands through `boxes`, without Twisted, which restates them.

AMP values are at most 65535 bytes, so manifests, need sets and results use
`BigBytes`, which splits a value over numbered keys (with a bound, so that an
authenticated but hostile peer cannot make us buffer without limit).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.protocols import amp
from twisted.python.failure import Failure

from mrsyncd import logs
from mrsyncd.control import boxes
from mrsyncd.control.boxes import MAX_BIG_BYTES, MAX_BOX_KEYS, MAX_PIECES
from mrsyncd.control.contract import LOST_MARKS, Feedback, Refused, UnknownTransfer, fixed
from mrsyncd.wire.datagram import TRANSFER_ID_SIZE, VERSION
from mrsyncd.wire.manifest import deflated, inflated

log = logs.logger(__name__)

#: The version of the whole protocol, control and datagrams, which change
#: together: a sender and a receiver of different versions refuse each
#: other at `Register` (1 had BLAKE2b-tagged clear datagrams, 2 seals them,
#: 3 has the congestion reports of issue 20, 4 sends the manifest compressed,
#: 5 sends it only to receivers that do not hold it yet, 6 protects from
#: deletion by filter rules, ``+ PATTERN`` and ``- PATTERN``, not bare patterns;
#: 10 offers a manifest delivered by multicast, ``Prepare``'s ``manifest_from``).
PROTOCOL = VERSION

UINT32_MAX = (1 << 32) - 1


class BigBytes(amp.Argument):
    """Bytes of any length up to ``MAX_PIECES`` AMP values, as ``name``, ``name.1``, ..."""

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:  # type: ignore[override]
        value: bytes | None = objects.pop(amp._wireNameToPythonIdentifier(name), None)  # type: ignore[attr-defined]
        if value is None:
            if self.optional:
                return
            raise KeyError(name)
        items = boxes.pieces(name, value)
        if len(items) > MAX_PIECES:
            raise amp.TooLong(False, True, name, None)
        strings.update(items)

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:  # type: ignore[override]
        if name not in strings and self.optional:
            objects[amp._wireNameToPythonIdentifier(name)] = None  # type: ignore[attr-defined]
            return
        pieces = [strings.pop(name)]
        while (key := name + b".%d" % (len(pieces),)) in strings:
            if len(pieces) >= MAX_PIECES:
                raise ValueError(f"{name!r} has more than {MAX_PIECES} pieces")
            pieces.append(strings.pop(key))
        objects[amp._wireNameToPythonIdentifier(name)] = b"".join(pieces)  # type: ignore[attr-defined]


class CompressedBytes(BigBytes):
    """
    `BigBytes` compressed with zlib on the wire: a manifest of 10,000 small
    files is 0.90 MB and 0.49 MB compressed at level 1 (format 2 made 2.0 MB
    of JSON and 0.58 MB, in 15 ms), and it crosses the master's link once
    for every node.  What a peer sends
    may inflate to no more than a `BigBytes` can carry.  The same value
    sent again (one manifest to every node of a job) is compressed once.
    """

    LIMIT = MAX_BIG_BYTES

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)
        self._last: tuple[bytes, bytes] | None = None

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:  # type: ignore[override]
        key = amp._wireNameToPythonIdentifier(name)  # type: ignore[attr-defined]
        value = objects.get(key)
        if value is not None:
            if self._last is None or self._last[0] is not value:
                self._last = (value, deflated(value))
            objects[key] = self._last[1]
        super().toBox(name, strings, objects, proto)

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:  # type: ignore[override]
        super().fromBox(name, strings, objects, proto)
        key = amp._wireNameToPythonIdentifier(name)  # type: ignore[attr-defined]
        if objects[key] is not None:
            try:
                objects[key] = inflated(objects[key], self.LIMIT)
            except ValueError as e:
                raise BadRequest(f"{name.decode()} {e}") from None


class _JSONCoded:
    """JSON over whichever bytes argument comes next in the method order."""

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:
        key = amp._wireNameToPythonIdentifier(name)  # type: ignore[attr-defined]
        if objects.get(key) is not None:
            objects[key] = json.dumps(objects[key], sort_keys=True).encode()
        super().toBox(name, strings, objects, proto)  # type: ignore[misc]

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:
        super().fromBox(name, strings, objects, proto)  # type: ignore[misc]
        key = amp._wireNameToPythonIdentifier(name)  # type: ignore[attr-defined]
        if objects[key] is not None:
            try:
                objects[key] = json.loads(objects[key])
            except ValueError as e:
                raise BadRequest(f"{name.decode()} is not valid JSON: {e}") from None


class JSONArgument(_JSONCoded, BigBytes):
    """A value as JSON, ``sort_keys``."""


class CompressedJSON(_JSONCoded, CompressedBytes):
    """
    A `JSONArgument` compressed: a node's results name every path of the
    manifest, 200 kB of JSON for 10,000 small files and 24 kB compressed,
    and every node sends them across the master's link.
    """


class CongestionReport(amp.Argument):
    """
    ``(transfer id, Feedback)`` in 28 bytes and 4 a lost datagram named:
    the transfer id, then loss in units of 10⁻⁴, delay in µs, backlog in
    units of 10⁻³, the loss event rate in units of 10⁻⁹, the one-way delay
    in µs (signed: it is on two clocks) and the stamp in µs (big-endian:
    8s H I H I i I), then up to `LOST_MARKS` sequence numbers (I each).
    These reports are most of what nodes send while data flows, up to 10 a
    second from each node in trouble, and as AMP values they would cost
    twice the bytes.  Values are clamped to their range (a NaN counts as 0).
    """

    _LAYOUT = struct.Struct(f">{TRANSFER_ID_SIZE}sHIHIiI")
    _SIZES = f"{_LAYOUT.size} to {_LAYOUT.size + 4 * LOST_MARKS}, by 4"

    def toString(self, inObject: tuple[bytes, Feedback]) -> bytes:
        transfer_id, report = inObject
        if len(transfer_id) != TRANSFER_ID_SIZE:
            raise ValueError(f"a transfer id has {TRANSFER_ID_SIZE} bytes, not {len(transfer_id)}")
        return self._LAYOUT.pack(
            transfer_id,
            fixed(report.loss, 1.0, 10_000),
            fixed(report.delay, UINT32_MAX / 1e6, 1e6),
            fixed(report.backlog, 1.0, 1000),
            fixed(report.events, 1.0, 1e9),
            max(-(1 << 31), min((1 << 31) - 1, report.owd_us)),
            report.stamp_us & UINT32_MAX,
        ) + b"".join(struct.pack(">I", seq & UINT32_MAX) for seq in report.lost[:LOST_MARKS])

    def fromString(self, inString: bytes) -> tuple[bytes, Feedback]:
        marks, odd = divmod(len(inString) - self._LAYOUT.size, 4)
        if marks < 0 or odd or marks > LOST_MARKS:
            raise BadRequest(f"a congestion report has {self._SIZES} bytes, not {len(inString)}")
        transfer_id, loss, delay, backlog, events, owd_us, stamp_us = self._LAYOUT.unpack_from(inString)
        lost = struct.unpack_from(f">{marks}I", inString, self._LAYOUT.size)
        if loss > 10_000 or backlog > 1000 or events > 1_000_000_000:
            raise BadRequest(
                f"a congestion report's loss, backlog or loss event rate is above 1: "
                f"{loss}, {backlog}, {events}"
            )
        report = Feedback(loss / 10_000, delay / 1e6, backlog / 1000, events / 1e9, owd_us, stamp_us, lost)
        return transfer_id, report


class UnknownManifest(Exception):
    """The receiver does not hold the manifest a `Prepare` named by digest only: send it whole."""


_ERRORS = {Refused: b"REFUSED", UnknownTransfer: b"UNKNOWN_TRANSFER"}


class Forbidden(Exception):
    """The peer's certificate does not carry the role this command needs."""


class BadRequest(Exception):
    """A request that cannot be carried out; the message says why."""


class OversizedSpec(BadRequest):
    """A job spec past ``max_spec_bytes``, left unparsed for the responder to refuse."""


class SpecArgument(JSONArgument):
    """
    A job spec: JSON of at most the receiving responders'
    ``max_spec_bytes``, measured before it is parsed.  A larger one becomes
    an `OversizedSpec` for the responder to raise: what an argument raises
    reaches the caller as an unknown error, not as a `BadRequest`.
    """

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: object) -> None:  # type: ignore[override]
        limit = getattr(proto, "max_spec_bytes", MAX_SPEC_BYTES)
        pieces = [k for k in strings if k == name or k.startswith(name + b".")]
        size = sum(len(strings[k]) for k in pieces)
        if size > limit:
            for k in pieces:
                del strings[k]
            objects[amp._wireNameToPythonIdentifier(name)] = OversizedSpec(  # type: ignore[attr-defined]
                f"the job spec is {size} bytes, more than the master takes ({limit}: max_spec_bytes)"
            )
            return
        super().fromBox(name, strings, objects, proto)


class NoSuchJob(Exception):
    """The job id names no job."""


_OPERATOR_ERRORS = {Forbidden: b"FORBIDDEN", BadRequest: b"BAD_REQUEST", NoSuchJob: b"NO_SUCH_JOB"}


class Register(amp.Command):
    """
    A receiver introduces itself to the sender it dialled.  On the daemon
    the name must be the one in the node's certificate, and ``free`` maps
    each allowed root to its free bytes.
    """

    arguments = [
        (b"name", amp.Unicode()),
        (b"tags", amp.ListOf(amp.Unicode(), optional=True)),
        (b"free", JSONArgument(optional=True)),
        # Absent from version 1, which did not say.
        (b"version", amp.Integer(optional=True)),
    ]
    response = [(b"version", amp.Integer(optional=True))]
    errors = {Forbidden: b"FORBIDDEN", Refused: b"REFUSED"}


def version_mismatch(ours: str, theirs: str, version: int | None) -> str | None:
    """
    Why a peer of another protocol version cannot work with us, naming both
    versions, or None if it can.  A datagram of another version is dropped
    unread, so without this check a transfer would just never progress.
    """
    if version == PROTOCOL:
        return None
    said = "1 or older" if version is None else str(version)
    return (
        f"the {theirs} speaks mrsyncd protocol {said} and this {ours} protocol {PROTOCOL}: "
        "run the same mrsyncd release on the master and its nodes"
    )


class Congestion(amp.Command):
    """
    A receiver's loss and queueing delay over its last report interval,
    sent only when there is heavy loss or a queue, and a queue that many
    share only by a sample of them (the sender's echo, `ratecontrol.Echo`),
    so that the sender's rate controller hears more from trouble than from
    the number of receivers.
    """

    arguments = [(b"report", CongestionReport())]
    requiresAnswer = False


class Heartbeat(amp.Command):
    """A node shows its master it is alive, and refreshes its free space."""

    arguments = [(b"free", JSONArgument(optional=True))]
    requiresAnswer = True


# Operator commands: only a certificate with the operator role may call them.


class Submit(amp.Command):
    arguments = [(b"spec", SpecArgument())]
    response = [(b"job", amp.Integer())]
    errors = _OPERATOR_ERRORS


class ListJobs(amp.Command):
    arguments = [(b"limit", amp.Integer())]
    response = [(b"jobs", JSONArgument())]
    errors = _OPERATOR_ERRORS


#: The longest a `JobStatus` may be held for its job to end (``wait``).
MAX_STATUS_WAIT = 5.0


class JobStatus(amp.Command):
    """
    A job's status; with ``wait``, once the job has ended or ``wait``
    seconds (at most `MAX_STATUS_WAIT`) have passed, whichever comes first,
    so that a follower hears of the end when it comes, not up to a polling
    interval later.
    """

    arguments = [(b"job", amp.Integer()), (b"files", amp.Boolean()), (b"wait", amp.Float(optional=True))]
    response = [(b"status", JSONArgument())]
    errors = _OPERATOR_ERRORS


class Cancel(amp.Command):
    arguments = [(b"job", amp.Integer())]
    response = [(b"state", amp.Unicode())]
    errors = _OPERATOR_ERRORS


class ListNodes(amp.Command):
    response = [(b"nodes", JSONArgument())]
    errors = _OPERATOR_ERRORS


class ForgetNode(amp.Command):
    """Expect a node no more: ``all`` and its tags stop naming it until it registers again."""

    arguments = [(b"name", amp.Unicode())]
    errors = _OPERATOR_ERRORS


class Prepare(amp.Command):
    """
    Offer a transfer.  ``manifest_digest`` is the SHA-256 of the encoded
    manifest; ``manifest`` may be left out when the receiver holds that
    manifest from an earlier `Prepare` on this connection (it answers
    `UnknownManifest` if not), so that pushing an unchanged tree again does
    not send its manifest to every node again: 0.49 MB each for 10,000
    files, 0.31 s of a 100 Mbit/s link for 8 nodes.  A tree that changed
    goes as ``manifest_change``, the change (`Manifest.change_from`) from
    the manifest ``manifest_base`` names, which the receiver holds from the
    last `Prepare` on this connection (`UnknownManifest` if not, or if the
    change does not rebuild the manifest ``manifest_digest`` names).  A
    receiver that holds none is offered the manifest by ``manifest_from``
    when a transfer of its own delivered it by multicast first
    (`TransferOptions.delivers_manifest`): `UnknownManifest` if that
    delivery did not reach it whole.
    """

    arguments = [
        (b"transfer_id", amp.String()),
        (b"key", amp.String()),
        (b"manifest", CompressedBytes(optional=True)),
        (b"manifest_digest", amp.String()),
        (b"manifest_change", CompressedBytes(optional=True)),
        (b"manifest_base", amp.String(optional=True)),
        (b"manifest_from", amp.String(optional=True)),
        (b"group", amp.Unicode()),
        (b"port", amp.Integer()),
        (b"ttl", amp.Integer()),
        (b"loopback", amp.Boolean()),
        (b"destination", amp.Unicode()),
        (b"options", JSONArgument()),
        # `datagram.CIPHERS`: the sender's choice for its CPU.
        (b"cipher", amp.Unicode()),
    ]
    #: ``needs`` is a `blockset.encode_map` of chunk numbers.
    response = [(b"needs", BigBytes())]
    errors = {**_ERRORS, UnknownManifest: b"UNKNOWN_MANIFEST"}


class Missing(amp.Command):
    #: ``through``: the sequence number after the last datagram of the pass
    #: just sent; the answer waits until those are in (`Receiver.settled`).
    arguments = [
        (b"transfer_id", amp.String()),
        (b"abandoned", JSONArgument()),
        (b"through", amp.Integer(optional=True)),
        #: [file, block] a pass in progress has reached: report only what lies
        #: before it (a node that ignores it is clipped by the sender anyway).
        (b"before", amp.ListOf(amp.Integer(), optional=True)),
    ]
    #: ``missing`` is a bounded `blockset.encode_map` of block numbers.
    response = [
        (b"missing", amp.String()),
        (b"complete", amp.Boolean()),
        (b"done", amp.Boolean()),
        (b"stats", JSONArgument()),
    ]
    errors = _ERRORS


class Results(amp.Command):
    #: ``discard``: the transfer was cancelled, so its part files go too.
    arguments = [(b"transfer_id", amp.String()), (b"discard", amp.Boolean(optional=True))]
    response = [
        (b"results", CompressedJSON()),
        (b"changed", amp.Integer()),
        (b"hook", JSONArgument(optional=True)),
    ]
    errors = _ERRORS


#: A connection's bound on one box by default: a manifest of 500,000 entries
#: is about 30 MiB compressed, a node's results for them about as much.
MAX_MESSAGE_BYTES = 64 << 20
#: The largest job spec the master takes by default (``max_spec_bytes``).
MAX_SPEC_BYTES = 1 << 20
#: Entries a manifest may hold by default (``max_manifest_entries``): a
#: node holds a manifest whole, about 2.4 KiB of memory an entry (237 MiB
#: for 100,000 files), and the units cap a node at 2 GiB.
MAX_MANIFEST_ENTRIES = 500_000


class BoundedAMP(amp.AMP):
    """
    `amp.AMP` with a bound on each box.  AMP buffers a whole box before it
    parses it and puts no limit on its number of keys, so an authenticated
    peer could make us buffer without end; a box past `MAX_BOX_KEYS` keys
    or ``max_box_bytes`` bytes, or a key longer than AMP allows, is logged
    and the connection dropped.
    """

    #: This connection's bound on one box (at most `MAX_BOX_BYTES`).
    max_box_bytes = MAX_MESSAGE_BYTES
    _box_keys = 0
    _box_bytes = 0
    _dropped = False

    def _drop(self, why: str) -> None:
        transport: Any = self.transport
        log.warn("dropping the connection from {peer}: {why}", peer=transport.getPeer(), why=why)
        self._dropped = True
        self._currentBox = None
        getattr(transport, "abortConnection", transport.loseConnection)()

    def dataReceived(self, data: bytes) -> None:
        if not self._dropped:
            super().dataReceived(data)

    def makeConnection(self, transport: Any) -> None:
        """
        AMP's, less the line it logs for every connection made (and lost,
        below): the master and the nodes say who registered and who left,
        and every ``mrsync`` command would otherwise add two lines.
        """
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None  # as AMP does

    def unhandledError(self, failure: Failure) -> None:  # type: ignore[override]
        """
        A command that has no answer failed, e.g. a malformed congestion
        report: AMP drops the connection then, with a warning about its
        own API; say what was wrong instead.
        """
        if self.transport is not None and not self._dropped:
            self._drop(f"{type(failure.value).__name__}: {failure.getErrorMessage()}")

    def proto_key(self, string: bytes) -> str:
        if self._dropped:
            return "key"
        if not string:
            self._box_keys = self._box_bytes = 0
            return str(super().proto_key(string))
        self._box_keys += 1
        self._box_bytes += 2 + len(string)
        if self._box_keys > MAX_BOX_KEYS:
            self._drop(f"a box of more than {MAX_BOX_KEYS} keys")
            return "key"
        return str(super().proto_key(string))

    def proto_value(self, string: bytes) -> str:
        if self._dropped:
            return "key"
        self._box_bytes += 2 + len(string)
        if self._box_bytes > self.max_box_bytes:
            self._drop(f"a box of more than {self.max_box_bytes} bytes (max_message_bytes)")
            return "key"
        return str(super().proto_value(string))

    def lengthLimitExceeded(self, length: int) -> None:
        log.warn(
            "dropping the connection from {peer}: a {length}-byte string where at most {limit} may be",
            peer=self.transport.getPeer(),  # type: ignore[union-attr]
            length=length,
            limit=self.MAX_LENGTH,
        )
        super().lengthLimitExceeded(length)
