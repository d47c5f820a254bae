"""
The control contract: the two ends of the AMP connection between a sender
and its receivers (the commands themselves are in `commands`).

Receivers dial the sender (nodes dial their master) and `Register`; from then
on the sender calls `Prepare`, `Missing` and `Results` on that connection.
Bulk data never travels here, only what a transfer needs to agree on: the
manifest and key, need sets, missing reports and per-entry results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure

from mrsyncd import logs
from mrsyncd.control.commands import (
    MAX_MANIFEST_ENTRIES,
    PROTOCOL,
    BoundedAMP,
    Congestion,
    Missing,
    Prepare,
    Refused,
    Register,
    Results,
    UnknownManifest,
    version_mismatch,
)
from mrsyncd.control.contract import Feedback, MissingReport, Offer, Outcome, TransferOptions
from mrsyncd.engine.agent import ReceiverAgent
from mrsyncd.engine.multicast import Channel
from mrsyncd.wire.manifest import Manifest, ManifestError

log = logs.logger(__name__)

#: A receiver keeps the last manifest it was sent, decoded, if it was no
#: bigger than this encoded, so that the same tree offered again is named
#: by its digest (`commands.Prepare`) and neither sent nor decoded again.
#: 10,000 files take 0.9 MB encoded and 4.3 MB decoded; 100,000 take 9 MB
#: and 35 MB, and sending and decoding them (19 MB in manifest format 2)
#: cost an unchanged push of them to 4 nodes 1.8 s of a 100 Mbit/s link and
#: 1.2 s of each node's CPU.  A
#: node holds the manifest while it receives anyway; between jobs it
#: keeps what it held.
KEPT_MANIFEST_BYTES = 32 << 20


class AMPPeer:
    """A `contract.ReceiverPeer` at the far end of an AMP connection."""

    def __init__(self, name: str, protocol: amp.AMP) -> None:
        self.name = name
        self.protocol = protocol
        #: The manifest the receiver holds (`ReceiverControl._manifest_named`),
        #: by digest, as far as this peer knows: the last one it was sent.
        self.held: tuple[bytes, Manifest] | None = None

    def prepare(self, offer: Offer) -> defer.Deferred:
        """
        Offer by the manifest's digest a receiver holds it by, as the change
        from the one it holds if the tree changed, by the transfer that
        delivered it by multicast to one that holds none, and whole to a
        receiver that holds none, or when the others are not taken.
        """

        def offered(
            manifest: bytes | None,
            change: bytes | None = None,
            base: bytes | None = None,
            delivered: bytes | None = None,
        ) -> defer.Deferred:
            return self.protocol.callRemote(
                Prepare,
                transfer_id=offer.transfer_id,
                key=offer.key,
                manifest=manifest,
                manifest_digest=offer.manifest_digest,
                manifest_change=change,
                manifest_base=base,
                manifest_from=delivered,
                group=offer.channel.group,
                port=offer.channel.port,
                ttl=offer.channel.ttl,
                loopback=offer.channel.loopback,
                destination=offer.destination,
                options=asdict(offer.options),
                cipher=offer.cipher,
            )

        def unknown(failure: Failure) -> defer.Deferred:
            failure.trap(UnknownManifest)
            if offer.manifest_from:
                log.info(
                    "transfer {tid}: {node} did not keep the manifest's delivery ({why}): sending it whole",
                    tid=offer.transfer_id.hex(),
                    node=self.name,
                    why=failure.getErrorMessage(),
                )
            return offered(offer.manifest_bytes)

        def taken(response: dict[str, Any]) -> bytes:
            kept = len(offer.manifest_bytes) <= KEPT_MANIFEST_BYTES
            self.held = (offer.manifest_digest, offer.manifest) if kept else None
            return response["needs"]

        def refused(failure: Failure) -> Failure:
            self.held = None  # it may hold the new one, or the old, or neither
            return failure

        held = self.held
        if offer.options.delivers_manifest:
            # Its manifest names one file, the one it delivers: never held.
            return offered(offer.manifest_bytes).addCallback(lambda response: response["needs"])
        if held is None and offer.manifest_from:
            d = offered(None, delivered=offer.manifest_from)
        elif held is None:
            d = offered(offer.manifest_bytes)
        elif held[0] == offer.manifest_digest:
            d = offered(None)
        else:
            d = offered(None, offer.manifest_change(*held), held[0])
        if held is not None or offer.manifest_from:
            d.addErrback(unknown)
        d.addCallbacks(taken, refused)
        return d

    def wants_manifest(self) -> bool:
        return self.held is None

    def missing(
        self,
        transfer_id: bytes,
        abandoned: Mapping[int, str],
        through: int | None = None,
        before: tuple[int, int] | None = None,
    ) -> defer.Deferred:
        d = self.protocol.callRemote(
            Missing,
            transfer_id=transfer_id,
            abandoned={str(k): v for k, v in abandoned.items()},
            through=through,
            before=list(before) if before is not None else None,
        )
        d.addCallback(lambda r: MissingReport(r["missing"], r["complete"], r["done"], dict(r["stats"])))
        return d

    def results(self, transfer_id: bytes, discard: bool = False) -> defer.Deferred:
        d = self.protocol.callRemote(Results, transfer_id=transfer_id, discard=discard)
        d.addCallback(lambda r: Outcome(dict(r["results"]), r["changed"], r["hook"]))
        return d


class ReceiverControl(BoundedAMP):
    """The receiving host's end: answers the sender's commands from an agent."""

    #: Register as soon as connected; a subclass that first judges the
    #: sender's certificate calls `register` itself.
    register_on_connect = True
    #: The most entries a manifest may hold here.
    max_manifest_entries = MAX_MANIFEST_ENTRIES

    def __init__(
        self,
        agent: ReceiverAgent,
        name: str,
        tags: Sequence[str] = (),
        free: Callable[[], dict[str, int]] | None = None,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.name = name
        self.tags = list(tags)
        self.free = free
        self.on_registered = on_registered
        #: The last manifest this sender sent whole: (its digest, it).
        self._manifest: tuple[bytes, Manifest] | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.agent.on_feedback = self._feedback
        self.agent.name = self.name
        if self.register_on_connect:
            self.register()

    def register(self) -> None:
        d = self.callRemote(
            Register,
            name=self.name,
            tags=self.tags,
            free=self.free() if self.free else None,
            version=PROTOCOL,
        )
        d.addCallbacks(self._registered, self._refused)

    def _feedback(self, transfer_id: bytes, report: Feedback) -> None:
        if self.transport is not None and self.agent.on_feedback == self._feedback:
            self.callRemote(Congestion, report=(transfer_id, report))

    def _registered(self, response: dict[str, Any]) -> None:
        assert self.transport is not None
        why = version_mismatch("node", "master", response.get("version"))
        if why is not None:
            log.error("cannot work with the master at {peer}: {why}", peer=self.transport.getPeer(), why=why)
            self.transport.loseConnection()
            return
        log.info("registered as {name} with {peer}", name=self.name, peer=self.transport.getPeer())
        if self.on_registered is not None:
            self.on_registered()

    def _refused(self, failure: Failure) -> None:
        log.error("the sender refused registration: {why}", why=failure.getErrorMessage())
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Receivers stop with their sender; their part files stay for a resume."""
        super().connectionLost(reason)
        self.agent.close()

    def _manifest_named(
        self,
        sent: bytes | None,
        digest: bytes,
        change: bytes | None = None,
        base: bytes | None = None,
        delivered_by: bytes | None = None,
        keep: bool = True,
    ) -> Manifest:
        """
        The manifest a `Prepare` sent, whole or as the change from the one
        held, or named by ``digest`` as one it sent before or delivered by
        the transfer ``delivered_by``.  Receivers only read a manifest, so
        one may serve several.  Unless ``keep`` is false (a manifest's
        delivery, whose own manifest names one file), it is the one held
        from now on.
        """
        delivered = None
        if sent is None and change is None and delivered_by:
            sent = delivered = self.agent.delivered_manifest(delivered_by, digest)
            if delivered is None:
                raise UnknownManifest(f"no manifest {digest.hex()[:16]} delivered by {delivered_by.hex()}")
        if sent is None and change is not None:
            if self._manifest is None or self._manifest[0] != base:
                raise UnknownManifest(f"no manifest {(base or b'').hex()[:16]} held to change")
            try:
                manifest = self._manifest[1].changed(change)
            except ManifestError as e:
                raise UnknownManifest(f"the change does not apply: {e}") from None
            sent = manifest.to_bytes()
            if hashlib.sha256(sent).digest() != digest:
                raise UnknownManifest("the change does not make the manifest named")
        elif sent is None:
            if self._manifest is None or self._manifest[0] != digest:
                raise UnknownManifest(f"no manifest {digest.hex()[:16]} held")
            return self._manifest[1]
        elif delivered is None and hashlib.sha256(sent).digest() != digest:
            raise ManifestError("the manifest does not match its digest")
        else:
            if keep:
                self._manifest = None  # let it go before the new one is decoded: one at a time
            manifest = Manifest.from_bytes(sent)
        if len(manifest.entries) > self.max_manifest_entries:
            raise ManifestError(
                f"the manifest holds {len(manifest.entries)} entries, more than this node takes"
                f" ({self.max_manifest_entries}, [node] max_manifest_entries)"
            )
        if keep:
            self._manifest = (digest, manifest) if len(sent) <= KEPT_MANIFEST_BYTES else None
        return manifest

    @Prepare.responder
    def prepare(self, **kw: Any) -> defer.Deferred:
        try:
            options = TransferOptions.from_dict(kw["options"])
            offer = Offer(
                transfer_id=kw["transfer_id"],
                key=kw["key"],
                manifest=self._manifest_named(
                    kw.get("manifest"),
                    kw["manifest_digest"],
                    kw.get("manifest_change"),
                    kw.get("manifest_base"),
                    kw.get("manifest_from"),
                    keep=not options.delivers_manifest,
                ),
                channel=Channel(kw["group"], kw["port"], "", kw["ttl"], kw["loopback"]),
                destination=kw["destination"],
                options=options,
                cipher=kw["cipher"],
            )
            d = self.agent.prepare(offer)
        except Exception as e:
            d = defer.fail(e)

        def refused(failure: Failure) -> Failure:
            if failure.check(UnknownManifest):
                return failure  # not a refusal: the sender sends the manifest whole
            log.error("refused transfer {tid}: {why}", tid=kw["transfer_id"].hex(), why=failure.value)
            raise Refused(str(failure.value))

        d.addCallbacks(lambda needs: {"needs": needs}, refused)
        return d

    @Missing.responder
    def missing(
        self, transfer_id: bytes, abandoned: dict[str, str], through: int | None, before: list[int] | None
    ) -> defer.Deferred:
        position = (before[0], before[1]) if before is not None and len(before) == 2 else None
        d = self.agent.missing(transfer_id, {int(k): str(v) for k, v in abandoned.items()}, through, position)
        return d.addCallback(
            lambda report: {
                "missing": report.missing,
                "complete": report.complete,
                "done": report.done,
                "stats": report.stats,
            }
        )

    @Results.responder
    def results(self, transfer_id: bytes, discard: bool | None) -> defer.Deferred:
        d = self.agent.results(transfer_id, bool(discard))
        d.addCallback(lambda o: {"results": o.results, "changed": o.changed, "hook": o.hook})
        return d


class SenderControl(BoundedAMP):
    """The sender's end of one receiver's connection."""

    def __init__(
        self,
        on_register: Callable[[AMPPeer], None],
        on_feedback: Callable[[bytes, str, Feedback], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_register = on_register
        self.on_feedback = on_feedback
        self.peer: AMPPeer | None = None

    @Congestion.responder
    def congestion(self, report: tuple[bytes, Feedback]) -> dict[str, Any]:
        if self.peer is not None and self.on_feedback is not None:
            self.on_feedback(report[0], self.peer.name, report[1])
        return {}

    @Register.responder
    def register(
        self, name: str, tags: list[str] | None, free: dict[str, int] | None, version: int | None
    ) -> dict[str, Any]:
        why = version_mismatch("sender", "receiver", version)
        if why is not None:
            log.error("refused receiver {name}: {why}", name=name, why=why)
            raise Refused(why)
        if self.peer is not None:
            raise Refused("already registered")
        self.peer = AMPPeer(name, self)
        self.on_register(self.peer)
        return {"version": PROTOCOL}
