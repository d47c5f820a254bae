"""
The control contract across a real TCP connection on loopback: protocol
versions at registration, and congestion reports (what a receiver's report
becomes at the sender, and what it costs on the wire: these reports are most
of what nodes send while data flows).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import zlib
from dataclasses import replace
from typing import Any
from unittest import mock

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mrsyncd.control.commands import (
    PROTOCOL,
    UINT32_MAX,
    BadRequest,
    CompressedBytes,
    CompressedJSON,
    CongestionReport,
    Refused,
    Register,
)
from mrsyncd.control.contract import LOST_MARKS, Feedback, MissingReport, Offer
from mrsyncd.control.peers import AMPPeer, ReceiverControl, SenderControl
from mrsyncd.engine.agent import ReceiverAgent
from mrsyncd.engine.multicast import Channel
from mrsyncd.wire.manifest import DIGEST_SIZE, FILE, Entry, Manifest

TRANSFER_ID = b"\x01" * 8


class CountingSenderControl(SenderControl):
    """The sender's end, counting the bytes that reach it, and saying when its connection is gone."""

    received_bytes = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class CountingReceiverControl(ReceiverControl):
    """The node's end, counting the bytes that reach it."""

    received_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        super().dataReceived(data)


class LoopbackControl(unittest.TestCase):
    """A node's control connection to a sender, over TCP on loopback."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.heard: list[tuple[bytes, str, Feedback]] = []
        self.registered: defer.Deferred[AMPPeer] = defer.Deferred()
        self.sender: CountingSenderControl | None = None

        def build() -> CountingSenderControl:
            self.sender = CountingSenderControl(
                self.registered.callback, lambda *report: self.heard.append(report)
            )
            return self.sender

        self.port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(self.port.stopListening)
        self.agent = ReceiverAgent(reactor)
        self.client = yield endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port.getHost().port
        ).connect(Factory.forProtocol(lambda: CountingReceiverControl(self.agent, "node1")))
        self.addCleanup(self.disconnect)
        self.peer = yield self.registered

    def disconnect(self) -> defer.Deferred[None]:
        assert self.sender is not None
        self.client.transport.loseConnection()
        return self.sender.lost


class CompressedBytesTests(unittest.TestCase):
    """The manifest crosses compressed, and what a peer sends may not inflate without bound."""

    def round_trip(self, value: bytes) -> tuple[dict[bytes, bytes], bytes]:
        strings: dict[bytes, bytes] = {}
        CompressedBytes().toBox(b"manifest", strings, {"manifest": value}, None)
        objects: dict[str, Any] = {}
        CompressedBytes().fromBox(b"manifest", dict(strings), objects, None)
        return strings, objects["manifest"]

    def test_a_manifest_crosses_smaller_and_whole(self) -> None:
        manifest = (
            b'{"entries": ['
            + b", ".join(b'{"path": "d/f%05d", "digests": "%064x"}' % (i, i) for i in range(5000))
            + b"]}"
        )
        strings, back = self.round_trip(manifest)
        self.assertEqual(back, manifest)
        self.assertLess(sum(map(len, strings.values())), len(manifest) // 3)
        self.assertEqual(self.round_trip(b"")[1], b"")

    def test_one_manifest_sent_to_many_nodes_is_compressed_once(self) -> None:
        compressed: list[int] = []
        real = zlib.compress

        def counting(data: bytes, level: int = -1) -> bytes:
            compressed.append(len(data))
            return real(data, level)

        argument, manifest = CompressedBytes(), b'{"entries": []}' * 1000
        boxes = []
        with mock.patch.object(zlib, "compress", counting):
            for value in (manifest, manifest, bytes(bytearray(manifest))):  # the last: equal, another object
                strings: dict[bytes, bytes] = {}
                argument.toBox(b"manifest", strings, {"manifest": value}, None)
                boxes.append(strings)
        self.assertEqual(compressed, [len(manifest), len(manifest)])
        self.assertEqual(boxes[0], boxes[1])
        objects: dict[str, Any] = {}
        CompressedBytes().fromBox(b"manifest", boxes[2], objects, None)
        self.assertEqual(objects["manifest"], manifest)

    def test_a_bomb_or_garbage_is_refused(self) -> None:
        bomb = zlib.compress(bytes(CompressedBytes.LIMIT + 1), 9)
        for data, why in (
            (bomb, "inflates past"),
            (b"{not zlib", "is not zlib data"),
            (bomb[:100], "cut short"),
        ):
            objects: dict[str, Any] = {}
            with self.assertRaisesRegex(BadRequest, why):
                CompressedBytes().fromBox(b"manifest", {b"manifest": data}, objects, None)


class CompressedJSONTests(unittest.TestCase):
    """A node's results name every path of its manifest: they cross compressed, and whole."""

    def test_results_of_a_tree_cross_smaller_and_whole(self) -> None:
        results = {f"d{i % 100:02d}/f{i:05d}": "ok" for i in range(10_000)} | {
            "d07/f00007": "cannot commit: EIO"
        }
        strings: dict[bytes, bytes] = {}
        CompressedJSON().toBox(b"results", strings, {"results": results}, None)
        objects: dict[str, Any] = {}
        CompressedJSON().fromBox(b"results", dict(strings), objects, None)
        self.assertEqual(objects["results"], results)
        self.assertLess(sum(map(len, strings.values())), len(json.dumps(results)) // 5)

    def test_zlib_that_is_not_json_is_refused(self) -> None:
        objects: dict[str, Any] = {}
        with self.assertRaisesRegex(BadRequest, "results is not valid JSON"):
            CompressedJSON().fromBox(b"results", {b"results": zlib.compress(b"{ok")}, objects, None)


class MissingCalls(LoopbackControl):
    @defer.inlineCallbacks
    def test_the_sequence_after_a_pass_reaches_the_node(self) -> Any:
        """``through`` and ``before`` cross the wire as given, absent included, and large ones whole."""
        calls: list[tuple[bytes, dict[int, str], int | None, tuple[int, int] | None]] = []

        def missing(
            transfer_id: bytes,
            abandoned: dict[int, str],
            through: int | None = None,
            before: tuple[int, int] | None = None,
        ) -> Any:
            calls.append((transfer_id, dict(abandoned), through, before))
            return defer.succeed(MissingReport(b"", True, False, {"blocks": 1}))

        self.agent.missing = missing  # type: ignore[method-assign]
        asked = [(None, None), (7, (0, 0)), (1 << 40, (9999, (1 << 32) - 1))]
        for through, before in asked:
            report = yield self.peer.missing(TRANSFER_ID, {3: "source changed"}, through, before)
            self.assertEqual(report.stats, {"blocks": 1})
        self.assertEqual(calls, [(TRANSFER_ID, {3: "source changed"}, t, b) for t, b in asked])


def tree_manifest(files: int, seed: int) -> Manifest:
    rng = random.Random(seed)
    manifest = Manifest([], block_size=1024)
    for n in range(files):
        entry = Entry(f"d{n // 100}/f{n}", FILE, 0o644, rng.getrandbits(60), size=rng.randrange(1, 20_000))
        entry.digests = rng.randbytes(manifest.chunks(entry) * DIGEST_SIZE)
        manifest.entries.append(entry)
    return manifest


class ManifestOffers(LoopbackControl):
    """A manifest crosses once: the same tree offered again is named by its digest."""

    @defer.inlineCallbacks
    def test_a_manifest_the_node_holds_is_named_not_sent(self) -> Any:
        offered: list[Offer] = []

        def prepare(offer: Offer) -> Any:
            offered.append(offer)
            return defer.succeed(b"")

        self.agent.prepare = prepare  # type: ignore[method-assign]
        node = self.client
        channel = Channel("239.255.77.9", 7799)
        tree, changed = tree_manifest(2000, 1), tree_manifest(2000, 2)
        costs = []
        for n, manifest in enumerate([tree, tree, changed, tree]):
            before = node.received_bytes
            needs = yield self.peer.prepare(Offer(bytes([n]) * 8, b"k" * 32, manifest, channel, "/srv/t"))
            self.assertEqual(needs, b"")
            self.assertEqual(offered[-1].manifest, manifest)
            self.assertEqual(offered[-1].transfer_id, bytes([n]) * 8)
            costs.append(node.received_bytes - before)
        whole = len(zlib.compress(tree.to_bytes(), 1))
        # Sent whole, named, sent whole (another tree), sent whole (the node keeps one).
        self.assertGreater(costs[0], whole)
        self.assertLess(costs[1], 1000)
        self.assertGreater(costs[2], whole)
        self.assertGreater(costs[3], whole)

    @defer.inlineCallbacks
    def test_the_manifest_of_a_tree_of_100000_files_is_kept(self) -> Any:
        """
        9 MB encoded: pushed again, the tree costs the node its digest, not
        5 MB on the wire and more than half a second of decoding.
        """
        tree = tree_manifest(100_000, 3)
        self.assertGreater(len(tree.to_bytes()), 8 << 20)
        self.assertGreater((yield self.offered_at_cost(0, tree)), 1 << 20)
        self.assertLess((yield self.offered_at_cost(1, tree)), 1000)

    @defer.inlineCallbacks
    def offered_at_cost(self, n: int, manifest: Manifest, delivered_by: bytes = b"") -> Any:
        """
        Offer ``manifest``, as delivered by the transfer ``delivered_by`` if
        given; what the node read to take it, once it took that manifest.
        """
        taken: list[Offer] = []

        def prepare(offer: Offer) -> Any:
            taken.append(offer)
            return defer.succeed(b"")

        self.agent.prepare = prepare  # type: ignore[method-assign]
        before = self.client.received_bytes
        offer = Offer(bytes([n]) * 8, b"k" * 32, manifest, Channel("239.255.77.9", 7799), "/t")
        yield self.peer.prepare(offer.delivered_by(delivered_by) if delivered_by else offer)
        self.assertEqual(taken[-1].manifest, manifest)
        return self.client.received_bytes - before

    @defer.inlineCallbacks
    def test_a_manifest_delivered_by_multicast_is_named_not_sent(self) -> Any:
        """
        The node kept the manifest a delivery brought it: the offer names
        the delivery, and the manifest does not cross the control
        connection.  One the node does not hold, or not as named, does.
        """
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        tree, other = tree_manifest(2000, 1), tree_manifest(2000, 2)
        whole = len(zlib.compress(tree.to_bytes(), 1))
        # What the agent keeps when a delivery ends (`ReceiverAgent._keep_delivered`).
        self.agent._delivered[b"d" * 8] = tree.to_bytes()
        self.agent._delivered[b"e" * 8] = other.to_bytes()
        self.assertTrue(self.peer.wants_manifest())
        self.assertLess((yield self.offered_at_cost(0, tree, delivered_by=b"d" * 8)), 1000)
        self.assertFalse(self.peer.wants_manifest())
        self.peer.held = self.client._manifest = None  # as a node that restarted
        self.assertGreater((yield self.offered_at_cost(1, tree, delivered_by=b"d" * 8)), whole)
        self.peer.held = self.client._manifest = None
        self.assertGreater((yield self.offered_at_cost(2, tree, delivered_by=b"e" * 8)), whole)
        self.assertEqual(self.agent._delivered, {})
        digest = hashlib.sha256(tree.to_bytes()).hexdigest()[:16]
        self.assertEqual(
            [line for line in logged if "did not keep" in line],
            [
                f"transfer {n * 8}: node1 did not keep the manifest's delivery (no manifest {digest}"
                f" delivered by {by * 8}): sending it whole"
                for n, by in (("01", "64"), ("02", "65"))
            ],
        )

    @defer.inlineCallbacks
    def test_a_changed_tree_crosses_as_its_change_or_whole_when_that_makes_another_manifest(self) -> Any:
        tree = tree_manifest(2000, 1)
        entries = [
            replace(e, mtime_ns=e.mtime_ns + 1) if n % 100 == 0 else e for n, e in enumerate(tree.entries)
        ]
        entries.insert(5, Entry("d0/new", FILE, 0o644, 1, size=1, digests=b"d" * DIGEST_SIZE))
        del entries[700]
        changed = Manifest(entries, block_size=tree.block_size)
        whole = len(zlib.compress(tree.to_bytes(), 1))
        self.assertGreater((yield self.offered_at_cost(0, tree)), whole)
        self.assertLess((yield self.offered_at_cost(1, changed)), whole / 10)
        # The node no longer holds the tree the sender changes from (it was
        # too big to keep, say): it is sent whole.
        self.client._manifest = None
        self.assertGreater((yield self.offered_at_cost(2, tree)), whole)
        # The node holds another manifest under the digest named: the change
        # makes a manifest of another digest, which is not used.
        assert self.client._manifest is not None
        self.client._manifest = (self.client._manifest[0], changed)
        self.assertGreater((yield self.offered_at_cost(3, changed)), whole)

    @defer.inlineCallbacks
    def test_a_manifest_of_more_entries_than_the_node_takes_is_refused(self) -> Any:
        self.agent.prepare = lambda offer: defer.succeed(b"")  # type: ignore[method-assign]
        self.client.max_manifest_entries = 1999
        offer = Offer(b"t" * 8, b"k" * 32, tree_manifest(2000, 1), Channel("239.255.77.9", 7799), "/srv/t")
        with self.assertRaises(Refused) as caught:
            yield self.peer.prepare(offer)
        self.assertIn(
            "the manifest holds 2000 entries, more than this node takes (1999, [node] max_manifest_entries)",
            str(caught.exception),
        )
        self.client.max_manifest_entries = 2000
        self.assertEqual((yield self.peer.prepare(offer)), b"")


class ProtocolVersions(unittest.TestCase):
    """A sender and a receiver of different protocol versions refuse each other, naming both."""

    def setUp(self) -> None:
        self.logged: list[str] = []
        observer = lambda event: self.logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    @defer.inlineCallbacks
    def listen(self, protocol: Any) -> Any:
        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(protocol)
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def register_as(self, **arguments: Any) -> Any:
        """Register with a sender over loopback as a receiver that sends ``arguments``."""
        registered: list[AMPPeer] = []
        port = yield self.listen(lambda: SenderControl(registered.append))
        client = yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(amp.AMP)
        )
        self.addCleanup(client.transport.loseConnection)
        try:
            answer = yield client.callRemote(Register, name="node1", **arguments)
        except Refused as e:
            return registered, str(e)
        return registered, answer

    @defer.inlineCallbacks
    def test_a_receiver_of_this_version_is_registered_and_told_ours(self) -> Any:
        registered, answer = yield self.register_as(version=PROTOCOL)
        self.assertEqual(answer, {"version": PROTOCOL})
        self.assertEqual([p.name for p in registered], ["node1"])

    @defer.inlineCallbacks
    def test_a_receiver_of_another_version_is_refused(self) -> Any:
        for version, said in [({}, "1 or older"), ({"version": PROTOCOL + 1}, str(PROTOCOL + 1))]:
            registered, why = yield self.register_as(**version)
            self.assertEqual(registered, [])
            wanted = f"the receiver speaks mrsyncd protocol {said} and this sender protocol {PROTOCOL}"
            self.assertIn(wanted, why)
            self.assertTrue(any(why in line for line in self.logged), self.logged)

    @defer.inlineCallbacks
    def test_a_node_hangs_up_on_a_sender_of_another_version(self) -> Any:
        """A sender of protocol 1 takes the registration and answers without a version."""
        hung_up: defer.Deferred[None] = defer.Deferred()

        class OldSender(amp.AMP):
            @Register.responder
            def register(self, **_: Any) -> dict[str, Any]:
                return {}

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                super().connectionLost(reason)
                hung_up.callback(None)

        port = yield self.listen(OldSender)
        yield endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(lambda: ReceiverControl(ReceiverAgent(reactor), "node1"))
        )
        yield hung_up
        self.assertTrue(
            any(
                f"the master speaks mrsyncd protocol 1 or older and this node protocol {PROTOCOL}" in line
                for line in self.logged
            ),
            self.logged,
        )


class CongestionReports(LoopbackControl):
    @defer.inlineCallbacks
    def report(self, feedback: Feedback) -> Any:
        """Send one report as the receiver would; fires with (what arrived, its bytes)."""
        assert self.sender is not None and self.agent.on_feedback is not None
        before, count = self.sender.received_bytes, len(self.heard)
        self.agent.on_feedback(TRANSFER_ID, feedback)
        while len(self.heard) == count:
            yield _later()
        return self.heard[-1], self.sender.received_bytes - before

    @defer.inlineCallbacks
    def test_a_report_arrives_rounded_in_a_small_box(self) -> Any:
        sent = Feedback(0.0213456, 0.00321987, 0.41234, 0.00012345678912, -5_000_123, 0xFEDCBA98)
        (transfer_id, name, feedback), size = yield self.report(sent)
        self.assertEqual((transfer_id, name), (TRANSFER_ID, "node1"))
        self.assertEqual(feedback, Feedback(0.0213, 0.00322, 0.412, 0.000123457, -5_000_123, 0xFEDCBA98))
        # The command's name and one 28-byte value (62 bytes): as 8 AMP values it took about 150.
        self.assertLessEqual(size, 62)
        # Lost datagrams named: 4 bytes each, the first LOST_MARKS of them.
        named = tuple(range(64, 64 * 12, 64))
        (_, _, feedback), more = yield self.report(replace(sent, lost=named))
        self.assertEqual(feedback.lost, named[:LOST_MARKS])
        self.assertEqual(more, size + 4 * LOST_MARKS)

    @defer.inlineCallbacks
    def test_values_out_of_range_are_clamped(self) -> Any:
        (_, _, feedback), _ = yield self.report(Feedback(1.5, -0.001, 1.3, 2.0, 1 << 40, 1 << 33))
        self.assertEqual(feedback, Feedback(1.0, 0.0, 1.0, 1.0, (1 << 31) - 1, 0))
        (_, _, feedback), _ = yield self.report(Feedback(math.nan, 1e9, math.inf, math.nan, -(1 << 40)))
        self.assertEqual(feedback, Feedback(0.0, UINT32_MAX / 1e6, 1.0, 0.0, -(1 << 31)))

    @defer.inlineCallbacks
    def test_a_malformed_report_on_the_wire_drops_the_connection_and_says_why(self) -> Any:
        assert self.sender is not None
        warnings: list[str] = []
        observer = lambda event: warnings.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.client.sendBox(amp.AmpBox({b"_command": b"Congestion", b"report": b"\x01" * 27}))
        yield self.sender.lost
        self.assertEqual(self.heard, [])
        self.assertTrue(
            any("dropping the connection" in w and "by 4 bytes, not 27" in w for w in warnings), warnings
        )

    def test_a_malformed_report_is_refused_with_its_reason(self) -> None:
        argument = CongestionReport()
        for raw, reason in [
            (b"\x01" * 15, "28 to 60, by 4 bytes, not 15"),
            (b"\x01" * 30, "28 to 60, by 4 bytes, not 30"),
            (b"\x01" * 64, "28 to 60, by 4 bytes, not 64"),
            (TRANSFER_ID + (10_001).to_bytes(2, "big") + bytes(18), "above 1"),
            (TRANSFER_ID + bytes(6) + (1001).to_bytes(2, "big") + bytes(12), "above 1"),
            (TRANSFER_ID + bytes(8) + (10**9 + 1).to_bytes(4, "big") + bytes(8), "above 1"),
        ]:
            with self.assertRaisesRegex(BadRequest, reason):
                argument.fromString(raw)


def _later() -> defer.Deferred[None]:
    """A turn of the reactor, so that the report crosses the connection."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(0.001, d.callback, None)  # type: ignore[attr-defined]
    return d
