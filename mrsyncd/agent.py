"""
The receiving host's side of the control exchange.

A `ReceiverAgent` holds this host's receivers, one per transfer, and answers
the calls of `transfer.ReceiverPeer`.  The daemon's AMP responder forwards
to it; `LocalPeer` calls it directly, so that tests run a sender and several
receivers in one process without a control network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer

from mrsyncd.blockset import RangeSet
from mrsyncd.manifest import Manifest
from mrsyncd.multicast import DEFAULT_RCVBUF
from mrsyncd.receiver import MissingReport, Receiver
from mrsyncd.transfer import Offer, UnknownTransfer


class Refused(Exception):
    """This host will not take a transfer; the message says why."""


def _check_space(needs: dict[int, RangeSet], manifest: Manifest, destination: str) -> dict[int, RangeSet]:
    """Refuse before any data is sent if the part files would not fit."""
    needed = 0
    for index, chunks in needs.items():
        entry = manifest.entries[index]
        needed += sum(manifest.chunk_span(entry, chunk)[1] for chunk in chunks)
    st = os.statvfs(destination)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise Refused(
            f"needs {needed} bytes under {destination} but only {free} are free ({needed - free} bytes short)"
        )
    return needs


class ReceiverAgent:
    def __init__(
        self,
        reactor: Any,
        *,
        interface: str = "",
        destination_root: str | None = None,
        roots: Sequence[str] = (),
        rcvbuf: int = DEFAULT_RCVBUF,
    ) -> None:
        """
        ``interface`` overrides the one in an offer: which of its interfaces
        a host receives on is the host's business.  ``destination_root``,
        when set, makes every offer's destination relative to it.  When
        ``roots`` are given, a destination must lie beneath one of them.
        """
        self.reactor = reactor
        self.interface = interface
        self.destination_root = destination_root
        self.roots = [os.path.realpath(root) for root in roots]
        self.rcvbuf = rcvbuf
        self.receivers: dict[bytes, Receiver] = {}

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
        if offer.transfer_id in self.receivers:
            raise ValueError("transfer already prepared")
        channel = offer.channel
        if self.interface:
            channel = type(channel)(
                channel.group, channel.port, self.interface, channel.ttl, channel.loopback
            )
        destination = self.destination(offer.destination)
        receiver = Receiver(
            self.reactor, destination, channel, preserve_owner=offer.preserve_owner, rcvbuf=self.rcvbuf
        )
        self.receivers[offer.transfer_id] = receiver
        d = defer.maybeDeferred(receiver.prepare, offer.transfer_id, offer.key, offer.manifest)
        d.addCallback(_check_space, offer.manifest, destination)

        def refused(failure: Any) -> Any:
            self.receivers.pop(offer.transfer_id, None)
            receiver.close()
            return failure

        d.addErrback(refused)
        return d

    def _receiver(self, transfer_id: bytes) -> Receiver:
        try:
            return self.receivers[transfer_id]
        except KeyError:
            raise UnknownTransfer(transfer_id.hex()) from None

    def missing(self, transfer_id: bytes, abandoned: Mapping[int, str]) -> MissingReport:
        return self._receiver(transfer_id).missing(abandoned)

    def results(self, transfer_id: bytes) -> dict[str, str]:
        receiver = self.receivers.pop(transfer_id, None)
        if receiver is None:
            raise UnknownTransfer(transfer_id.hex())
        receiver.close()
        return dict(receiver.results)

    def close(self) -> None:
        for receiver in self.receivers.values():
            receiver.close()
        self.receivers.clear()


class LocalPeer:
    """A `transfer.ReceiverPeer` that calls an agent in this process."""

    def __init__(self, name: str, agent: ReceiverAgent) -> None:
        self.name = name
        self.agent = agent

    def prepare(self, offer: Offer) -> defer.Deferred:
        # The manifest crosses the control channel as bytes; do the same here
        # so that in-process tests exercise its validation.
        copy = Offer(**{**vars(offer), "manifest": Manifest.from_bytes(offer.manifest.to_bytes())})
        return defer.maybeDeferred(self.agent.prepare, copy)

    def missing(self, transfer_id: bytes, abandoned: Mapping[int, str]) -> defer.Deferred:
        return defer.maybeDeferred(self.agent.missing, transfer_id, abandoned)

    def results(self, transfer_id: bytes) -> defer.Deferred:
        return defer.maybeDeferred(self.agent.results, transfer_id)
