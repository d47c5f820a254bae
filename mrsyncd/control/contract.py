"""
The contract between the engine and the control plane, in one place: what
a sender offers a receiver (`Offer`, `TransferOptions`), what it asks of one
(`ReceiverPeer`) and what it hears back (`MissingReport`, `Outcome`,
`Feedback`).  The engine implements and calls it; `commands` carries it
between hosts; `agent.LocalPeer`, `peers.AMPPeer` and the master's
`FleetPeer` are its three implementations, tested against one suite
(tests/integration/test_contract.py).  It imports nothing of the engine at run time, so
that ``mrsync``, which speaks only the commands, loads none of it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

from mrsyncd.wire import datagram

if TYPE_CHECKING:
    from mrsyncd.engine.multicast import Channel
    from mrsyncd.wire.manifest import Manifest


class Refused(Exception):
    """A receiver will not take a transfer; the message says why."""


class UnknownTransfer(Exception):
    """
    The receiver does not hold this transfer: it restarted since it was
    prepared.  The sender prepares it again, and it resumes from its part
    files.
    """


@dataclass(frozen=True)
class TransferOptions:
    """What a transfer asks of each receiver beyond writing the files."""

    #: Set owner and group (only when the receiver runs as root).
    preserve_owner: bool = False
    #: Remove what the source does not have from the directories it sends.
    delete: bool = False
    #: Keep each overwritten or deleted file under its name plus this suffix.
    backup_suffix: str = ""
    #: Only find out what would be received; write nothing.
    dry_run: bool = False
    #: The job this transfer belongs to, for logs and the post-receive hook.
    label: str = ""
    #: The job's filter rules: what they leave out is not deleted either,
    #: as with rsync (``manifest.excluded`` says what they leave out).
    protect: tuple[str, ...] = ()
    #: This transfer's one file is the manifest of another, deflated, for
    #: each receiver to keep in memory (`Offer.manifest_from`) rather than
    #: write to a destination: one copy crosses the master's link, not one
    #: a node.
    delivers_manifest: bool = False

    @classmethod
    def from_dict(cls, raw: Any) -> TransferOptions:
        """Options as they arrive over the control channel, checked."""
        if not isinstance(raw, dict) or set(raw) - {f.name for f in fields(cls)}:
            raise ValueError("unknown transfer options")
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        for f in fields(cls):
            if f.name in raw and type(raw[f.name]) is not type(f.default):
                raise ValueError(f"transfer option {f.name} has the wrong type")
        if not all(isinstance(p, str) for p in raw.get("protect", ())):
            raise ValueError("transfer option protect holds filter rules (strings)")
        options = cls(**raw)
        if "/" in options.backup_suffix or "\0" in options.backup_suffix:
            raise ValueError("a backup suffix cannot hold / or NUL")
        return options


DEFAULT_OPTIONS = TransferOptions()


@dataclass
class Outcome:
    """How a transfer ended on one host."""

    #: ``{path: "ok" or why it failed}``
    results: dict[str, str]
    #: How many paths it wrote, linked or deleted.
    changed: int = 0
    #: The post-receive hook's argv, exit status and the tail of its output.
    hook: dict[str, Any] | None = None


@dataclass
class MissingReport:
    """What a receiver still lacks, as `blockset.encode_map` bytes."""

    missing: bytes
    #: False when the report was cut short to keep it bounded.
    complete: bool
    #: True once every file is committed or failed and links are made.
    done: bool
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class Offer:
    """Everything a receiver is told about a transfer before data flows."""

    transfer_id: bytes
    #: The transfer's secret where a sender makes the offer; what receivers
    #: are given is the datagram key of one run of it (`Transfer`).
    key: bytes
    manifest: Manifest
    channel: Channel
    destination: str
    options: TransferOptions = DEFAULT_OPTIONS
    cipher: str = datagram.AES_256_GCM
    #: The transfer that delivered this offer's manifest by multicast, if
    #: one did (`TransferOptions.delivers_manifest`): a receiver that
    #: holds it is offered the manifest by its digest alone.
    manifest_from: bytes = b""
    _changes: dict[bytes, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    @functools.cached_property
    def manifest_bytes(self) -> bytes:
        """The manifest as it travels, encoded once for every receiver (2 MB of JSON take 25 ms)."""
        return self.manifest.to_bytes()

    @functools.cached_property
    def manifest_digest(self) -> bytes:
        """Names the manifest to a receiver that may hold it already (`commands.Prepare`)."""
        return hashlib.sha256(self.manifest_bytes).digest()

    def for_run(self, key: bytes, cipher: str) -> Offer:
        """
        This offer with one run's datagram key and cipher, and what it made
        of its manifest: encoding 100,000 entries again took a master 1.2 s.
        """
        return self._replaced(key=key, cipher=cipher)

    def delivered_by(self, transfer_id: bytes) -> Offer:
        """This offer, its manifest delivered by the transfer ``transfer_id`` (`manifest_from`)."""
        return self._replaced(manifest_from=transfer_id)

    def _replaced(self, **changes: Any) -> Offer:
        offer = replace(self, **changes)
        for name in ("manifest_bytes", "manifest_digest"):
            if name in self.__dict__:
                offer.__dict__[name] = self.__dict__[name]
        offer._changes = self._changes
        return offer

    def manifest_change(self, digest: bytes, base: Manifest) -> bytes:
        """
        The manifest as the change from ``base`` (`Manifest.change_from`),
        made once for every receiver that holds that one (``digest``).
        """
        if digest not in self._changes:
            self._changes[digest] = self.manifest.change_from(base)
        return self._changes[digest]


class ReceiverPeer(Protocol):
    """The sender's view of one receiver (see the module docstring)."""

    name: str

    def prepare(self, offer: Offer) -> defer.Deferred:
        """
        Fires with the chunks needed, ``{file index: RangeSet}`` encoded by
        `blockset.encode_map` as it crosses the control channel: the nodes
        of a job mostly need the same (all of a new tree, or what changed
        in it), and the sender decodes each answer it has not seen once.
        """

    def wants_manifest(self) -> bool:
        """
        Whether an offer would carry its manifest whole to this receiver,
        which holds none from this sender (not one to name by digest or to
        change): the receivers that do are sent it once by multicast
        instead, when that is cheaper (`transfer.Transfer`).
        """

    def missing(
        self,
        transfer_id: bytes,
        abandoned: Mapping[int, str],
        through: int | None = None,
        before: tuple[int, int] | None = None,
    ) -> defer.Deferred:
        """
        Fires with a `MissingReport`; ``abandoned`` files are to be given
        up.  With ``through`` (the sequence number after a pass's last
        datagram) the answer waits, briefly, until the pass is in.  With
        ``before`` (the file and block a pass in progress has reached), only
        what lies before it is reported: a probe in the middle of a tree of
        10,000 files would otherwise hear of every file not sent yet, from
        every receiver, every time.
        """

    def results(self, transfer_id: bytes, discard: bool = False) -> defer.Deferred:
        """
        Fires with an `Outcome`; ends the transfer there, and with
        ``discard`` (it was cancelled) removes its part files.
        """


#: Lost datagrams a report names at most (`Feedback.lost`).
LOST_MARKS = 8


@dataclass(frozen=True)
class Feedback:
    """One receiver's view of the last report interval."""

    #: Share of the datagrams sent in the interval that did not arrive.
    loss: float
    #: Queueing delay: mean one-way delay above its minimum, seconds.
    delay: float
    #: How full the receiver's socket buffer is (1.0: it overflowed): a
    #: receiver short of CPU, which the delay leaves out.
    backlog: float = 0.0
    #: Its loss event rate (`tfrc.LossHistory`), for the TCP-friendly rate.
    events: float = 0.0
    #: The interval's mean one-way delay in µs on the two hosts' clocks, and
    #: the receiver's clock when it sent the report (µs, modulo 2³²): with
    #: the time the report arrives, a round trip (`RateController.feedback`).
    owd_us: int = 0
    stamp_us: int = 0
    #: Marked sequence numbers (modulo 2³²) it lost in the interval (`meter.LOST_MARK`).
    lost: tuple[int, ...] = ()


def fixed(value: float, most: float, scale: float) -> int:
    """``value`` in [0, ``most``] as an integer number of 1/``scale`` (NaN: 0), for the wire."""
    return 0 if math.isnan(value) else round(min(max(value, 0.0), most) * scale)
