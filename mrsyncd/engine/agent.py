"""
The receiving host's side of the control exchange.

A `ReceiverAgent` holds this host's receivers, one per transfer, and answers
the calls of `contract.ReceiverPeer`.  The daemon's AMP responder forwards
to it; `LocalPeer` calls it directly, so that tests run a sender and several
receivers in one process without a control network.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer

from mrsyncd import logs
from mrsyncd.control.boxes import MAX_BIG_BYTES
from mrsyncd.control.contract import Feedback, MissingReport, Offer, Outcome, Refused, UnknownTransfer
from mrsyncd.engine.hook import HOOK_TIMEOUT, run_hook
from mrsyncd.engine.multicast import DEFAULT_RCVBUF
from mrsyncd.engine.receiver import OK, Receiver
from mrsyncd.wire.blockset import RangeSet, encode_map
from mrsyncd.wire.datagram import Reason
from mrsyncd.wire.manifest import FILE, Manifest, inflated

#: No bound on a need set's size: `prepare` answers with every chunk needed.
UNLIMITED = 1 << 62
#: Manifests delivered by multicast and not yet named by an offer that a
#: host keeps (`ReceiverAgent.delivered_manifest`): an offer follows its
#: delivery at once, each may be tens of megabytes, and an older one is
#: sent whole if it is named after all.
KEPT_DELIVERIES = 2
#: The most a delivered manifest may inflate to: what a `Prepare` could carry.
MAX_DELIVERED_BYTES = MAX_BIG_BYTES


def _check_space(needs: dict[int, RangeSet], manifest: Manifest, destination: str) -> dict[int, RangeSet]:
    """Refuse before any data is sent if the part files would not fit."""
    needed = manifest.bytes_in(needs, chunks=True)
    existing = destination
    while not os.path.isdir(existing):  # a dry run's destination may not exist yet
        existing = os.path.dirname(existing)
    st = os.statvfs(existing)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise Refused(
            f"needs {needed} bytes under {destination} but only {free} are free ({needed - free} bytes short)"
        )
    return needs


log = logs.logger(__name__)

#: The receiver's counters of datagrams it threw away (and of chunks that
#: failed verification), logged when a transfer ends here.
DROPPED = frozenset(r.value for r in Reason) | {"corrupt_chunks"}


class ReceiverAgent:
    def __init__(
        self,
        reactor: Any,
        *,
        interface: str = "",
        destination_root: str | None = None,
        roots: Sequence[str] = (),
        rcvbuf: int = DEFAULT_RCVBUF,
        post_receive: Sequence[str] = (),
        hook_timeout: float = HOOK_TIMEOUT,
        allow_setid: bool = False,
    ) -> None:
        """
        ``interface`` overrides the one in an offer: which of its interfaces
        a host receives on is the host's business.  ``destination_root``,
        when set, makes every offer's destination relative to it.  When
        ``roots`` are given, a destination must lie beneath one of them.
        ``allow_setid`` is the host's too: no offer can ask for set-id bits.
        """
        self.reactor = reactor
        self.interface = interface
        self.destination_root = destination_root
        self.roots = [os.path.realpath(root) for root in roots]
        self.rcvbuf = rcvbuf
        self.post_receive = list(post_receive)
        self.hook_timeout = hook_timeout
        self.allow_setid = allow_setid
        #: Where this host's loss and delay reports go (its control connection).
        self.on_feedback: Callable[[bytes, Feedback], None] | None = None
        #: This host's name at its sender, set with ``on_feedback``: the
        #: sender's echo names the receiver it follows.
        self.name: str | None = None
        self.receivers: dict[bytes, Receiver] = {}
        #: Transfers whose closed receivers still have a commit or check in
        #: a thread; taking one up again waits for them.
        self._draining: dict[bytes, defer.Deferred] = {}
        #: Manifests delivered by multicast, by the delivering transfer's
        #: id, inflated, until an offer names them (oldest first).
        self._delivered: dict[bytes, bytes] = {}

    def destination(self, requested: str) -> str:
        """Where an offer's destination is on this host, if it is allowed."""
        destination = requested
        if self.destination_root is not None:
            destination = f"{self.destination_root.rstrip('/')}/{requested.lstrip('/')}"
        if not destination.startswith("/"):
            raise Refused(f"destination {requested!r} is not an absolute path")
        real = os.path.realpath(destination)
        if self.roots and not any(
            real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots
        ):
            raise Refused(f"destination {requested!r} is outside this node's roots ({', '.join(self.roots)})")
        return real

    def prepare(self, offer: Offer) -> defer.Deferred:
        """
        Take a transfer and say which chunks this host needs (encoded, see
        `contract.ReceiverPeer.prepare`), or say why not: every failure here
        is a `Refused` carrying its reason, which the sender reports and
        does not retry.
        A transfer offered again (its sender restarted, or gave up waiting
        for the first answer) starts afresh and resumes from its part files.
        """
        old = self.receivers.pop(offer.transfer_id, None)
        if old is not None:
            self._retire(offer.transfer_id, old)
        draining = self._draining.get(offer.transfer_id)
        if draining is None:
            d = defer.maybeDeferred(self._prepare, offer)
        else:
            d = defer.Deferred()
            draining.addBoth(lambda _: d.callback(None))
            d.addCallback(lambda _: self._prepare(offer))

        def refused(failure: Any) -> Any:
            receiver = self.receivers.pop(offer.transfer_id, None)
            if receiver is not None:
                self._retire(offer.transfer_id, receiver)
            if not failure.check(Refused):
                raise Refused(str(failure.value) or failure.getErrorMessage())
            return failure

        d.addCallback(lambda needs: encode_map(needs, UNLIMITED)[0])
        return d.addErrback(refused)

    def _prepare(self, offer: Offer) -> defer.Deferred:
        channel = offer.channel
        if self.interface:
            channel = type(channel)(
                channel.group, channel.port, self.interface, channel.ttl, channel.loopback
            )
        if offer.options.delivers_manifest:
            entries = offer.manifest.entries
            if len(entries) != 1 or entries[0].kind != FILE or "/" in entries[0].path:
                raise Refused("a manifest's delivery carries one file and nothing else")
            if entries[0].size > MAX_DELIVERED_BYTES:
                raise Refused(f"a manifest's delivery is at most {MAX_DELIVERED_BYTES} bytes")
            # The offer's destination is not used: the manifest is kept in
            # memory (`results`), and written only as the receiver's
            # verified commit needs, in a private directory of its own.
            destination = tempfile.mkdtemp(prefix="mrsyncd-manifest-")
        else:
            destination = self.destination(offer.destination)
        receiver = Receiver(
            self.reactor,
            destination,
            channel,
            options=offer.options,
            rcvbuf=self.rcvbuf,
            name=self.name,
            allow_setid=self.allow_setid,
        )
        self.receivers[offer.transfer_id] = receiver
        receiver.on_feedback = functools.partial(self._feedback, offer.transfer_id)
        in_flight = frozenset(self.receivers) | frozenset(self._draining)
        d = defer.maybeDeferred(
            receiver.prepare, offer.transfer_id, offer.key, offer.manifest, offer.cipher, in_flight
        )
        d.addCallback(_check_space, offer.manifest, destination)

        def accepted(needs: dict[int, RangeSet]) -> dict[int, RangeSet]:
            log.info(
                "job {job}: receiving {what}, {needed} bytes needed{dry}",
                job=offer.options.label or offer.transfer_id.hex(),
                what="its manifest by multicast"
                if offer.options.delivers_manifest
                else f"into {destination}",
                needed=receiver.needed_bytes,
                dry=" (dry run)" if offer.options.dry_run else "",
            )
            return needs

        return d.addCallback(accepted)

    def _feedback(self, transfer_id: bytes, report: Feedback) -> None:
        if self.on_feedback is not None:
            self.on_feedback(transfer_id, report)

    def _receiver(self, transfer_id: bytes) -> Receiver:
        try:
            return self.receivers[transfer_id]
        except KeyError:
            raise UnknownTransfer(transfer_id.hex()) from None

    def missing(
        self,
        transfer_id: bytes,
        abandoned: Mapping[int, str],
        through: int | None = None,
        before: tuple[int, int] | None = None,
    ) -> defer.Deferred:
        """A `MissingReport`, once what was sent before ``through`` is in (see `Receiver.settled`)."""
        receiver = self._receiver(transfer_id)

        def report(_: object) -> MissingReport:
            if self.receivers.get(transfer_id) is not receiver:  # ended while it settled
                raise UnknownTransfer(transfer_id.hex())
            return receiver.missing(abandoned, before)

        return receiver.settled(through).addCallback(report)

    def results(self, transfer_id: bytes, discard: bool = False) -> defer.Deferred:
        """
        End a transfer here and say how it went.  When it changed anything,
        the post-receive hook of this host's own configuration runs first,
        and its exit status is part of the answer.
        """
        receiver = self.receivers.pop(transfer_id, None)
        if receiver is None:
            raise UnknownTransfer(transfer_id.hex())
        if receiver.options.delivers_manifest:
            return self._keep_delivered(transfer_id, receiver, discard)
        self._retire(transfer_id, receiver, discard)
        outcome = Outcome(dict(receiver.results), len(receiver.changed))
        failed = {path: why for path, why in outcome.results.items() if why != OK}
        job = receiver.options.label or transfer_id.hex()
        if failed:
            path, why = min(failed.items())
            log.error(
                "job {job}: {n} entries failed, first {path}: {why}",
                job=job,
                n=len(failed),
                path=path,
                why=why,
            )
        else:
            log.info("job {job}: done, {changed} paths changed", job=job, changed=outcome.changed)
        dropped = {k: v for k, v in sorted(receiver.stats.items()) if k in DROPPED and v}
        if dropped:
            log.warn(
                "job {job}: dropped {n} datagrams that failed checks: {counts}",
                job=job,
                n=sum(v for k, v in dropped.items() if k != "corrupt_chunks"),
                counts=" ".join(f"{k}={v}" for k, v in dropped.items()),
            )
        if not (self.post_receive and receiver.done and receiver.changed and not receiver.options.dry_run):
            return defer.succeed(outcome)
        environment = {
            "MRSYNC_JOB": receiver.options.label,
            "MRSYNC_TRANSFER": transfer_id.hex(),
            "MRSYNC_DESTINATION": receiver.destination,
        }
        d = run_hook(self.reactor, self.post_receive, receiver.changed, environment, self.hook_timeout)

        def ran(hook: dict[str, Any]) -> Outcome:
            outcome.hook = hook
            return outcome

        return d.addCallback(ran)

    def _keep_delivered(self, transfer_id: bytes, receiver: Receiver, discard: bool) -> defer.Deferred:
        """
        End a manifest's delivery: keep the manifest, verified and
        committed, in memory for the offer that names it, and remove its
        private directory.  One that did not arrive whole is not kept, and
        that offer is answered `UnknownManifest`, so the sender sends it
        over the control channel.
        """
        outcome = Outcome(dict(receiver.results), len(receiver.changed))
        if not discard and receiver.done and set(outcome.results.values()) == {OK}:
            (path,) = outcome.results
            try:
                with open(os.path.join(receiver.destination, path), "rb") as f:
                    data = inflated(f.read(MAX_DELIVERED_BYTES + 1), MAX_DELIVERED_BYTES)
            except (OSError, ValueError) as e:
                log.warn("transfer {tid}: its manifest is not usable: {why}", tid=transfer_id.hex(), why=e)
            else:
                self._delivered[transfer_id] = data
                while len(self._delivered) > KEPT_DELIVERIES:
                    del self._delivered[next(iter(self._delivered))]
        self._retire(transfer_id, receiver, discard)
        return defer.succeed(outcome)

    def delivered_manifest(self, transfer_id: bytes, digest: bytes) -> bytes | None:
        """
        The manifest the transfer ``transfer_id`` delivered, encoded, for
        the offer that names it (once), if it is the one ``digest`` names.
        """
        data = self._delivered.pop(transfer_id, None)
        return data if data is not None and hashlib.sha256(data).digest() == digest else None

    def _retire(self, transfer_id: bytes, receiver: Receiver, discard: bool = False) -> None:
        """Close a receiver; the transfer may be taken up again once its threads are done."""
        drained = receiver.close(discard)
        if receiver.options.delivers_manifest:
            drained.addBoth(lambda _: shutil.rmtree(receiver.destination, ignore_errors=True))
        if drained.called:
            return
        previous = self._draining.get(transfer_id)
        both = drained if previous is None else defer.gatherResults([previous, drained])
        self._draining[transfer_id] = both

        def done(_: object) -> None:
            if self._draining.get(transfer_id) is both:
                del self._draining[transfer_id]

        both.addBoth(done)

    def close(self) -> None:
        for transfer_id, receiver in list(self.receivers.items()):
            self._retire(transfer_id, receiver)
        self.receivers.clear()
        self._delivered.clear()


class LocalPeer:
    """A `contract.ReceiverPeer` that calls an agent in this process."""

    def __init__(self, name: str, agent: ReceiverAgent) -> None:
        self.name = name
        self.agent = agent
        agent.name = name

    def prepare(self, offer: Offer) -> defer.Deferred:
        # The manifest crosses the control channel as bytes, or was
        # delivered by multicast; do the same here so that in-process tests
        # exercise its validation.
        delivered = None
        if offer.manifest_from:
            delivered = self.agent.delivered_manifest(offer.manifest_from, offer.manifest_digest)
        copy = replace(offer, manifest=Manifest.from_bytes(delivered or offer.manifest_bytes))
        return defer.maybeDeferred(self.agent.prepare, copy)

    def wants_manifest(self) -> bool:
        return True

    def missing(
        self,
        transfer_id: bytes,
        abandoned: Mapping[int, str],
        through: int | None = None,
        before: tuple[int, int] | None = None,
    ) -> defer.Deferred:
        return defer.maybeDeferred(self.agent.missing, transfer_id, abandoned, through, before)

    def results(self, transfer_id: bytes, discard: bool = False) -> defer.Deferred:
        return defer.maybeDeferred(self.agent.results, transfer_id, discard)
