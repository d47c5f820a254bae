"""
One suite for every `contract.ReceiverPeer`, as Flocker runs one suite
against every implementation of an interface: what the engine's `Transfer`
relies on holds whether the receiver is in this process (`LocalPeer`), at
the far end of an AMP connection (`AMPPeer`), or reached through the
master's fleet (`FleetPeer`).  Real parts throughout: a receiver agent with
a real multicast socket and a real destination directory, and for the two
remote peers a TCP connection on loopback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from mrsyncd.control.contract import (
    MissingReport,
    Offer,
    Outcome,
    ReceiverPeer,
    Refused,
    TransferOptions,
    UnknownTransfer,
)
from mrsyncd.control.peers import AMPPeer, ReceiverControl, SenderControl
from mrsyncd.daemon.master import Fleet, FleetPeer
from mrsyncd.engine.agent import MAX_DELIVERED_BYTES, LocalPeer, ReceiverAgent
from mrsyncd.engine.transfer import Transfer, new_offer
from mrsyncd.wire.blockset import decode_map
from mrsyncd.wire.manifest import deflated, scan
from tests.support import RATE, temp_dir, unique_channel, write_file

#: Builds a peer named ``node1`` for ``agent`` in a test case (cleaning up after itself).
PeerBuilder = Callable[[unittest.TestCase, ReceiverAgent], defer.Deferred]


def make_receiver_peer_tests(build: PeerBuilder) -> type[unittest.TestCase]:
    """The contract's tests, for the peers ``build`` makes."""

    class ReceiverPeerTests(unittest.TestCase):
        timeout = 30

        @defer.inlineCallbacks
        def setUp(self) -> Any:
            base = temp_dir(self)
            self.source = os.path.join(base, "src")
            self.root = os.path.join(base, "nodes")
            os.mkdir(self.root)
            self.agent = ReceiverAgent(reactor, roots=[self.root], interface="lo")
            self.addCleanup(self.agent.close)
            self.peer: ReceiverPeer = yield build(self, self.agent)

        def offer(self, files: dict[str, bytes], destination: str = "") -> Offer:
            for name, data in files.items():
                os.makedirs(os.path.dirname(os.path.join(self.source, name)), exist_ok=True)
                write_file(os.path.join(self.source, name), data)
            manifest, _ = scan([self.source + "/"])
            return new_offer(manifest, unique_channel(), destination or os.path.join(self.root, "dest"))

        def test_its_name_is_the_receivers(self) -> None:
            self.assertEqual(self.peer.name, "node1")

        @defer.inlineCallbacks
        def test_a_new_file_needs_every_chunk_and_misses_every_block(self) -> Any:
            offer = self.offer({"f": os.urandom(3_000_000)})
            needs = yield self.peer.prepare(offer)
            chunks = offer.manifest.chunks(offer.manifest.entries[0])
            self.assertEqual({i: r.ranges for i, r in decode_map(needs).items()}, {0: [(0, chunks)]})
            report = yield self.peer.missing(offer.transfer_id, {})
            self.assertIsInstance(report, MissingReport)
            self.assertTrue(report.complete)
            self.assertFalse(report.done)
            missing = decode_map(report.missing)
            blocks = offer.manifest.blocks(offer.manifest.entries[0])
            self.assertEqual({i: r.ranges for i, r in missing.items()}, {0: [(0, blocks)]})
            outcome = yield self.peer.results(offer.transfer_id, discard=True)
            self.assertIsInstance(outcome, Outcome)
            self.assertFalse(os.path.exists(os.path.join(self.root, "dest", "f")))

        @defer.inlineCallbacks
        def test_a_tree_of_nothing_to_send_is_done_at_once_and_in_place(self) -> Any:
            offer = self.offer({"empty": b"", "sub/also-empty": b""})
            needs = yield self.peer.prepare(offer)
            self.assertEqual(needs, b"")
            report = yield self.peer.missing(offer.transfer_id, {}, through=0)
            self.assertTrue(report.done and report.complete, report)
            outcome = yield self.peer.results(offer.transfer_id)
            self.assertEqual(outcome.results, {"empty": "ok", "sub": "ok", "sub/also-empty": "ok"})
            self.assertEqual(outcome.changed, 2)  # the files written; their directory is made, not changed
            self.assertEqual(os.path.getsize(os.path.join(self.root, "dest", "sub", "also-empty")), 0)

        @defer.inlineCallbacks
        def test_an_abandoned_file_fails_with_the_senders_reason(self) -> Any:
            offer = self.offer({"f": os.urandom(5000)})
            yield self.peer.prepare(offer)
            abandoned = {0: "the source changed while it was sent"}
            report = yield self.peer.missing(offer.transfer_id, abandoned)
            for _ in range(100):  # the engine asks again until the receiver is done
                if report.done:
                    break
                yield task.deferLater(reactor, 0.01, lambda: None)
                report = yield self.peer.missing(offer.transfer_id, abandoned)
            self.assertTrue(report.done, report)
            outcome = yield self.peer.results(offer.transfer_id)
            self.assertEqual(outcome.results, {"f": "sender gave up: the source changed while it was sent"})
            self.assertFalse(os.path.exists(os.path.join(self.root, "dest", "f")))

        @defer.inlineCallbacks
        def test_a_destination_outside_the_roots_is_refused_with_its_reason(self) -> Any:
            offer = self.offer({"f": b"x"}, destination="/etc/mrsyncd-contract-test")
            failure = yield self.assertFailure(self.peer.prepare(offer), Refused)
            self.assertIn("outside this node's roots", str(failure))
            self.assertFalse(os.path.exists("/etc/mrsyncd-contract-test"))

        @defer.inlineCallbacks
        def test_a_manifest_delivered_by_multicast_is_taken_from_the_delivery(self) -> Any:
            offer = self.offer({"f": os.urandom(3_000_000), "g": b"x"})
            spool = temp_dir(self)
            write_file(os.path.join(spool, "manifest"), deflated(offer.manifest_bytes))
            manifest, local = scan([spool + "/"])
            options = TransferOptions(delivers_manifest=True)
            delivery = new_offer(manifest, unique_channel(), "", options)
            self.assertTrue(self.peer.wants_manifest())
            report = yield Transfer(reactor, delivery, local, [self.peer], rate_bps=RATE).run()
            self.assertEqual(report.peers["node1"].results, {"manifest": "ok"})
            taken = []
            original = self.agent.delivered_manifest

            def delivered(transfer_id: bytes, digest: bytes) -> bytes | None:
                taken.append(original(transfer_id, digest))
                return taken[-1]

            self.patch(self.agent, "delivered_manifest", delivered)
            needs = yield self.peer.prepare(offer.delivered_by(delivery.transfer_id))
            self.assertEqual(taken, [offer.manifest_bytes])
            chunks = offer.manifest.chunks(offer.manifest.entries[0])
            self.assertEqual(
                {i: r.ranges for i, r in decode_map(needs).items()}, {0: [(0, chunks)], 1: [(0, 1)]}
            )
            yield self.peer.results(offer.transfer_id, discard=True)

        @defer.inlineCallbacks
        def test_a_delivery_of_anything_but_one_manifest_is_refused(self) -> Any:
            options = TransferOptions(delivers_manifest=True)
            offer = self.offer({"m": b"x", "sub/n": b"y"})
            self.assertEqual([e.path for e in offer.manifest.entries], ["m", "sub", "sub/n"])
            for manifest in (offer.manifest, replace(offer.manifest, entries=offer.manifest.entries[1:2])):
                delivery = new_offer(manifest, unique_channel(), "", options)
                failure = yield self.assertFailure(self.peer.prepare(delivery), Refused)
                self.assertIn("a manifest's delivery carries one file and nothing else", str(failure))
            huge = replace(offer.manifest.entries[0], size=MAX_DELIVERED_BYTES + 1)
            big = replace(offer.manifest, entries=[huge])
            huge.digests = b"\0" * 32 * big.chunks(huge)
            delivery = new_offer(big, unique_channel(), "", options)
            failure = yield self.assertFailure(self.peer.prepare(delivery), Refused)
            self.assertIn(f"a manifest's delivery is at most {MAX_DELIVERED_BYTES} bytes", str(failure))

        @defer.inlineCallbacks
        def test_a_transfer_it_does_not_hold_is_unknown(self) -> Any:
            yield self.assertFailure(self.peer.missing(b"\x07" * 8, {}), UnknownTransfer)
            offer = self.offer({"f": b"x" * 100})
            yield self.peer.prepare(offer)
            yield self.peer.results(offer.transfer_id, discard=True)
            # Ended by its results: asked again, it is unknown.
            yield self.assertFailure(self.peer.missing(offer.transfer_id, {}), UnknownTransfer)

    return ReceiverPeerTests


def local_peer(case: unittest.TestCase, agent: ReceiverAgent) -> defer.Deferred:
    return defer.succeed(LocalPeer("node1", agent))


@defer.inlineCallbacks
def loopback(case: unittest.TestCase, agent: ReceiverAgent) -> Any:
    """A receiver's control connection to a sender over TCP on loopback: the sender's end and its peer."""
    registered: defer.Deferred[AMPPeer] = defer.Deferred()
    ends: list[SenderControl] = []

    def sender_end() -> SenderControl:
        ends.append(SenderControl(registered.callback, lambda *report: None))
        return ends[-1]

    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(sender_end)
    )
    case.addCleanup(port.stopListening)
    client = yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(lambda: ReceiverControl(agent, "node1"))
    )
    case.addCleanup(client.transport.abortConnection)
    peer = yield registered
    return ends[0], peer


@defer.inlineCallbacks
def amp_peer(case: unittest.TestCase, agent: ReceiverAgent) -> Any:
    _, peer = yield loopback(case, agent)
    return peer


@defer.inlineCallbacks
def fleet_peer(case: unittest.TestCase, agent: ReceiverAgent) -> Any:
    connection, _ = yield loopback(case, agent)
    fleet = Fleet(reactor)
    fleet.attach("node1", connection, (), {})  # type: ignore[arg-type]
    return FleetPeer("node1", fleet)


class LocalPeerTests(make_receiver_peer_tests(local_peer)):  # type: ignore[misc]
    """In this process, as the engine's own tests run receivers."""


class AMPPeerTests(make_receiver_peer_tests(amp_peer)):  # type: ignore[misc]
    """Over an AMP connection, as ``mrsync-engine`` reaches its receivers."""


class FleetPeerTests(make_receiver_peer_tests(fleet_peer)):  # type: ignore[misc]
    """Through the master's fleet, as a job reaches its nodes."""
