"""
Whole transfers, in process: one `Transfer` and three receivers over real
multicast sockets on ``lo``.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from mrsyncd.control.contract import MissingReport, TransferOptions
from mrsyncd.engine import agent as agent_module
from mrsyncd.engine import sender as sender_module
from mrsyncd.engine import transfer as transfer_module
from mrsyncd.engine.agent import LocalPeer, ReceiverAgent
from mrsyncd.engine.multicast import Channel, adopt, receiver_socket
from mrsyncd.engine.ratecontrol import Echo
from mrsyncd.engine.receiver import OK, Receiver
from mrsyncd.engine.sender import Sender, _after
from mrsyncd.engine.transfer import Transfer, multicast_manifest, new_offer, probe_interval
from mrsyncd.wire import datagram
from mrsyncd.wire.blockset import RangeSet, encode_map
from mrsyncd.wire.manifest import Manifest, deflated, scan
from tests.support import (
    RATE,
    RecordingAgent,
    assert_same_tree,
    full_tree_and_peers,
    make_full_tree,
    make_peers,
    part_files,
    run_transfer,
    temp_dir,
    unique_channel,
    wait_until,
    write_file,
)


def small_files(testcase, count, dirs, size_of):
    """Files ``d<i % dirs>/f<i>`` of ``size_of(i)`` random bytes, scanned: base, src, manifest, paths."""
    base = temp_dir(testcase)
    src = os.path.join(base, "src")
    for d in range(dirs):
        os.makedirs(os.path.join(src, f"d{d}"))
    for i in range(count):
        write_file(os.path.join(src, f"d{i % dirs}", f"f{i:03d}"), os.urandom(size_of(i)))
    manifest, local = scan([src + "/"])
    return base, src, manifest, local


class FullTreeTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_pushing_the_same_tree_again_changes_nothing(self):
        """No data is sent, and no path counts as changed: not even links."""
        base = temp_dir(self)
        src = os.path.join(base, "src")
        make_full_tree(src)
        manifest, local = scan([src + "/"])
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        first = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(first.ok)
        self.assertTrue(all(p.changed > 0 for p in first.peers.values()))
        again = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(again.ok, {n: p.reason for n, p in again.peers.items()})
        self.assertEqual(again.sender_stats.get("payload", 0), 0)
        self.assertEqual({n: p.changed for n, p in again.peers.items()}, {"node0": 0, "node1": 0})
        for dst in dests:
            assert_same_tree(self, src, dst)

    @defer.inlineCallbacks
    def test_a_tree_of_small_files_pushed_again_after_a_few_changed_sends_those(self):
        """
        Small files travel packed, but a node asks only for the blocks that
        hold the files it lacks: a changed file costs its bytes and at most
        the two blocks it shares with its neighbours.
        """
        rng = random.Random(11)
        base, src, manifest, local = small_files(self, 300, 4, lambda i: rng.randrange(1000, 5000))
        self.assertEqual(sum(len(p.members) for p in manifest.packs.values()), 300)
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        first = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(first.ok, {n: p.reason for n, p in first.peers.items()})
        changed = [
            os.path.join(src, "d1", "f001"),
            os.path.join(src, "d2", "f150"),
            os.path.join(src, "d3", "f299"),
        ]
        for path in changed:
            write_file(path, rng.randbytes(os.path.getsize(path)), mtime_ns=1_000_000_000)
        manifest, local = scan([src + "/"])
        read, original = [], sender_module._read_chunks

        def counted(batch):
            read.extend(path for members in batch for path, _, _, expected in members if expected)
            return original(batch)

        self.patch(sender_module, "_read_chunks", counted)
        again = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(again.ok, {n: p.reason for n, p in again.peers.items()})
        sizes = sum(os.path.getsize(path) for path in changed)
        self.assertGreaterEqual(again.sender_stats["payload"], sizes)
        self.assertLessEqual(again.sender_stats["payload"], sizes + 2 * len(changed) * manifest.block_size)
        self.assertEqual({n: p.changed for n, p in again.peers.items()}, {"node0": 3, "node1": 3})
        # The master reads the changed files and the neighbours they share a block with, not their packs.
        self.assertTrue(set(changed) <= set(read) and len(read) <= 3 * len(changed), read)
        for dst in dests:
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])

    @defer.inlineCallbacks
    def test_every_kind_of_entry_to_three_receivers(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        outside = os.path.join(base, "outside")
        os.mkdir(outside)
        with open(os.path.join(outside, "secret"), "w") as f:
            f.write("not to be copied")
        make_full_tree(src, outside_target=os.path.join(outside, "secret"))
        manifest, local = scan([src + "/"])
        kinds = {e.kind for e in manifest.entries}
        self.assertEqual(kinds, {"file", "dir", "symlink", "hardlink"})
        self.assertTrue(any(manifest.chunks(e) > 3 for _, e in manifest.files()))
        dests = [os.path.join(base, f"dst{i}") for i in range(3)]
        peers = make_peers(self, reactor, dests)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertGreaterEqual(report.passes, 1)
        for name, peer in report.peers.items():
            self.assertEqual(set(peer.results), {e.path for e in manifest.entries}, name)
            self.assertEqual(set(peer.results.values()), {OK}, name)
        for dst in dests:
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
            # The symlink out of the tree was copied as a link, never followed.
            self.assertEqual(
                os.readlink(os.path.join(dst, "dir", "outside-link")), os.path.join(outside, "secret")
            )
        self.assertEqual(sorted(os.listdir(outside)), ["secret"])
        self.assertGreater(report.sender_stats["datagrams"], 0)

    @defer.inlineCallbacks
    def test_named_source_and_a_second_run_over_the_copy(self):
        """
        ``src`` (no slash) arrives as ``DEST/src``; running the same transfer
        again over the copy (a new transfer id and key) leaves it identical.
        """
        base = temp_dir(self)
        src = os.path.join(base, "tree")
        make_full_tree(src)
        manifest, local = scan([src])
        dests = [os.path.join(base, f"dst{i}") for i in range(3)]
        for run in range(2):
            report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
            self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
            if run:
                # Unchanged files (same size and mtime) do not cross the network again.
                self.assertEqual(report.sender_stats.get("payload", 0), 0)
            for dst in dests:
                self.assertEqual(os.listdir(dst), ["tree"])
                assert_same_tree(self, src, os.path.join(dst, "tree"))
                self.assertEqual(part_files(dst), [])


class PackReadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_pack_is_read_a_file_at_a_time_and_again_for_blocks_it_lacks(self):
        """The master reads the files that hold the blocks a pass sends; a repair beyond them reads again."""
        base, src, manifest, local = small_files(self, 20, 1, lambda i: 1000)
        ((head, pack),) = manifest.packs.items()
        stream = b"".join(open(local[m], "rb").read() for m in pack.members)
        sender = sender_module.Sender(reactor, manifest, local, unique_channel(), b"t" * 8, b"k" * 32, RATE)
        size = manifest.block_size
        sender._want_packs({head: RangeSet.interval(0, 1)}, {})
        self.assertIsNone(sender._read(head, 0))  # being read
        yield wait_until(lambda: (head, 0) in sender._chunks)
        # Files 0 and 1 (bytes 0-2000) read: block 1 also holds file 2, not read.
        self.assertEqual(sender._pack_held[head], RangeSet.interval(0, 1))
        self.assertEqual(sender._read(head, 0), stream[:size])
        self.assertIsNone(sender._read(head, 10))
        yield wait_until(lambda: (head, 0) in sender._chunks)
        self.assertEqual(sender._read(head, 10), stream[10 * size : 11 * size])
        self.assertEqual(sender._read(head, 0), stream[:size])


class OfferTests(unittest.TestCase):
    def test_a_run_of_an_offer_keeps_its_encoded_manifest(self):
        """Encoding a manifest of 100,000 entries takes a master a second: a run does not do it again."""
        base = temp_dir(self)
        write_file(os.path.join(base, "f"), b"x")
        manifest, _ = scan([base + "/"])
        offer = new_offer(manifest, unique_channel(), "/")
        digest = offer.manifest_digest
        self.patch(Manifest, "to_bytes", lambda _: self.fail("encoded again"))
        run = offer.for_run(b"k" * 32, "chacha20-poly1305")
        self.assertEqual((run.key, run.cipher, run.manifest_digest), (b"k" * 32, "chacha20-poly1305", digest))
        self.assertNotEqual(offer.key, run.key)  # the offer itself is unchanged
        self.assertEqual(offer.cipher, "aes-256-gcm")


class SparseFileTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_sparse_file_over_4_gib(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        path = os.path.join(src, "sparse.img")
        rng = random.Random(4)
        size = (4 << 30) + (8 << 20) + 12345
        with open(path, "wb") as f:
            f.truncate(size)
            os.pwrite(f.fileno(), rng.randbytes(3 << 20), 4097)
            os.pwrite(f.fileno(), rng.randbytes(3 << 20), (4 << 30) + (1 << 20) + 77)
            os.pwrite(f.fileno(), b"the end", size - 7)
        os.utime(path, ns=(1_700_000_000_123_456_789,) * 2)
        manifest, local = scan([src + "/"])
        entry = manifest.entries[0]
        self.assertEqual(entry.size, size)
        self.assertGreater(manifest.blocks(entry), 3_000_000)
        dests = [os.path.join(base, f"dst{i}") for i in range(3)]
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        # Only the chunks that hold data crossed the wire, not 4 GiB of zeros.
        self.assertLess(report.sender_stats["payload"], 3 * (10 << 20))
        self.assertGreaterEqual(report.sender_stats["payload"], 6 << 20)
        for dst in dests:
            assert_same_tree(self, src, dst, sparse=True)
            # and the copy is sparse too
            self.assertLess(os.stat(os.path.join(dst, "sparse.img")).st_blocks * 512, 64 << 20)


class ManifestDeliveryTests(unittest.TestCase):
    """
    A manifest that several receivers hold none of goes to them once, by
    multicast, in a transfer of its own, when that is cheaper than a copy
    over each control connection (`transfer.multicast_manifest`).
    """

    timeout = 60

    def setUp(self):
        # A temporary directory of this test's own: pytest-xdist's other
        # workers make and remove spools of their own in the machine's.
        self.patch(tempfile, "tempdir", temp_dir(self))

    def spools(self):
        """The private directories a delivery uses, on either side: none may stay."""
        return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("mrsyncd-manifest-")}

    def small_tree_and_peers(self, seed, receivers):
        """300 files of 100-3000 bytes (a manifest large enough to matter), and a `LocalPeer` a receiver."""
        rng = random.Random(seed)
        base, src, manifest, local = small_files(self, 300, 4, lambda i: rng.randrange(100, 3000))
        dests = [os.path.join(base, f"dst{i}") for i in range(receivers)]
        return src, manifest, local, dests, make_peers(self, reactor, dests)

    def taken(self, peers):
        """Each peer's offers, as whether the manifest came from a delivery."""
        taken = {peer.name: [] for peer in peers}
        for peer in peers:
            original = peer.agent.delivered_manifest

            def delivered(transfer_id, digest, original=original, name=peer.name):
                data = original(transfer_id, digest)
                taken[name].append(data is not None)
                return data

            self.patch(peer.agent, "delivered_manifest", delivered)
        return taken

    def test_multicast_when_the_copies_it_saves_outlast_its_round(self):
        t = 465_788  # scenario T's 10,000 files, deflated
        self.assertTrue(multicast_manifest(t, 8, 100e6))  # 0.26 s saved
        self.assertTrue(multicast_manifest(t, 100, 100e6))
        self.assertFalse(multicast_manifest(t, 2, 100e6))  # 0.04 s
        self.assertFalse(multicast_manifest(t, 1, 100e6))
        self.assertFalse(multicast_manifest(t, 8, 1e9))  # 0.03 s at 1 Gbit/s ...
        self.assertTrue(multicast_manifest(t, 64, 1e9))  # ... 0.23 s for 64 nodes
        self.assertFalse(multicast_manifest(6_000, 100, 100e6))  # A's one file: 0.05 s

    @defer.inlineCallbacks
    def test_a_manifest_goes_by_multicast_first_and_every_tree_arrives(self):
        src, manifest, local, dests, peers = self.small_tree_and_peers(12, 3)
        taken, before = self.taken(peers), self.spools()
        offer = new_offer(manifest, unique_channel(), "/")
        transfer = Transfer(reactor, offer, local, peers, rate_bps=RATE, manifest_round=0.0)
        report = yield transfer.run()
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertGreaterEqual(transfer.manifest_sent, len(deflated(offer.manifest_bytes)))
        self.assertEqual(taken, {peer.name: [True] for peer in peers})
        for peer, dst in zip(peers, dests, strict=True):
            self.assertEqual([r.options.delivers_manifest for r in peer.agent.history], [True, False])
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
        self.assertEqual(self.spools(), before)

    @defer.inlineCallbacks
    def test_a_delivery_repairs_what_it_loses(self):
        """Every tenth datagram lost, at the delivery's too: it is repaired, and no node goes without."""
        self.patch(agent_module, "Receiver", LossyReceiver)
        src, manifest, local, dests, peers = self.small_tree_and_peers(14, 3)
        taken = self.taken(peers)
        offer = new_offer(manifest, unique_channel(), "/")
        transfer = Transfer(reactor, offer, local, peers, rate_bps=RATE, manifest_round=0.0)
        report = yield transfer.run()
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertEqual(taken, {peer.name: [True] for peer in peers})
        # More than the manifest's bytes went out: what was lost, again.
        self.assertGreater(transfer.manifest_sent, len(deflated(offer.manifest_bytes)))
        for dst in dests:
            assert_same_tree(self, src, dst)

    @defer.inlineCallbacks
    def test_a_small_manifest_goes_over_the_control_connections(self):
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 3)
        taken = self.taken(peers)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertEqual(taken, {peer.name: [] for peer in peers})
        for peer in peers:
            self.assertEqual([r.options.delivers_manifest for r in peer.agent.history], [False])

    @defer.inlineCallbacks
    def test_a_receiver_the_delivery_missed_is_sent_the_manifest_all_the_same(self):
        """It lost the delivery (restarted, say): its offer carries the manifest, and only it goes without."""
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 3)
        forgetful = peers[0].agent
        taken = self.taken(peers)
        original = forgetful._keep_delivered

        def lost(transfer_id, receiver, discard):
            outcome = original(transfer_id, receiver, discard)
            forgetful.close()
            return outcome

        self.patch(forgetful, "_keep_delivered", lost)
        report = yield run_transfer(self, reactor, manifest, local, peers, manifest_round=0.0)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertEqual(taken, {"node0": [False], "node1": [True], "node2": [True]})
        for dst in dests:
            assert_same_tree(self, src, dst)

    @defer.inlineCallbacks
    def test_a_receiver_silent_through_the_delivery_costs_one_grace_not_two(self):
        """Its silence counts from the transfer's start: failed at the delivery, it fails at the offer."""
        src, manifest, local, dests, peers = self.small_tree_and_peers(15, 2)

        class Silent:
            name = "silent"

            def prepare(self, offer):
                return defer.Deferred()

            def wants_manifest(self):
                return True

            def missing(self, transfer_id, abandoned, through=None, before=None):
                return defer.Deferred()

            def results(self, transfer_id, discard=False):
                return defer.fail(ConnectionError("not listening"))

        grace = 4.0
        offer = new_offer(manifest, unique_channel(), "/")
        transfer = Transfer(
            reactor,
            offer,
            local,
            [*peers, Silent()],
            rate_bps=RATE,
            grace=grace,
            call_timeout=0.3,
            prepare_timeout=0.5,
            manifest_round=0.0,
        )
        report = yield transfer.run()
        self.assertIn("no answer", report.peers["silent"].reason)
        for peer, dst in zip(peers, dests, strict=True):
            self.assertTrue(report.peers[peer.name].ok, report.peers[peer.name].reason)
            assert_same_tree(self, src, dst)
        self.assertGreater(transfer.manifest_sent, 0)
        self.assertGreaterEqual(report.seconds, grace)
        self.assertLess(report.seconds, 2 * grace, report.seconds)

    @defer.inlineCallbacks
    def test_cancelled_while_its_manifest_is_delivered_nothing_is_offered(self):
        src, manifest, local, dests, peers = self.small_tree_and_peers(13, 2)
        before = self.spools()
        transfer = Transfer(
            reactor,
            new_offer(manifest, unique_channel(), "/"),
            local,
            peers,
            rate_bps=RATE,
            manifest_round=0.0,
        )
        running = transfer.run()
        yield wait_until(lambda: transfer._delivery is not None)
        transfer.cancel()
        report = yield running
        self.assertEqual(
            {n: p.reason for n, p in report.peers.items()}, {"node0": "cancelled", "node1": "cancelled"}
        )
        for peer, dst in zip(peers, dests, strict=True):
            self.assertEqual([r.options.delivers_manifest for r in peer.agent.history], [True])
            self.assertFalse(os.path.exists(dst) and os.listdir(dst))
        yield wait_until(lambda: self.spools() == before)


def one_file(testcase, data):
    """A directory holding one file ``f`` of ``data``, scanned: (base, source, manifest, local paths)."""
    base = temp_dir(testcase)
    src = os.path.join(base, "src")
    os.mkdir(src)
    write_file(os.path.join(src, "f"), data)
    manifest, local = scan([src + "/"])
    return base, src, manifest, local


class LossyReceiver(Receiver):
    """
    Test-only loss injector: drops every tenth datagram that reaches the
    socket, before the receiver sees it, as a lossy LAN would.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrived = 0
        self.dropped = 0

    def lose(self) -> bool:
        return self.arrived % 10 == 3

    def received(self, batch, payloads):
        """Each datagram of the batch's runs, one run each, less those lost."""
        size = self._manifest.block_size
        runs = []
        for kind, file, first, count, offset, length, sequence in batch.runs:
            for i in range(count):
                self.arrived += 1
                if self.lose():
                    self.dropped += 1
                    continue
                start = offset + i * size
                runs.append((kind, file, first + i, 1, start, min(size, length - i * size), sequence))
        lost = sum(run[3] for run in batch.runs) - len(runs)
        super().received(batch._replace(runs=runs, got=batch.got - lost), payloads)


class PhasedLossyReceiver(LossyReceiver):
    """Test-only: each destination loses a different tenth, so a parity repairs what several lost."""

    def lose(self) -> bool:
        return self.arrived % 10 == int(self.destination.rstrip("/")[-1]) * 3 % 10


class LossTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_ten_percent_loss_is_repaired(self):
        self.patch(agent_module, "Receiver", LossyReceiver)
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 3)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertGreater(report.passes, 1)
        for peer in peers:
            (receiver,) = peer.agent.history
            self.assertIsInstance(receiver, LossyReceiver)
            self.assertGreater(receiver.dropped, 100)
            self.assertLess(abs(receiver.dropped / receiver.arrived - 0.1), 0.01)
        for dst in dests:
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
        # Repairs resend what was lost, not everything again.
        blocks = sum(manifest.blocks(e) for _, e in manifest.files())
        self.assertLess(report.sender_stats["datagrams"], 2 * blocks)

    @defer.inlineCallbacks
    def test_ten_percent_loss_of_small_files_is_repaired_across_their_packs(self):
        self.patch(agent_module, "Receiver", PhasedLossyReceiver)
        rng = random.Random(13)
        base, src, manifest, local = small_files(self, 600, 6, lambda i: rng.randrange(1, 3000))
        blocks = sum(manifest.unit_blocks(head) for head in manifest.packs)
        self.assertEqual(sum(len(p.members) for p in manifest.packs.values()), 600)
        dests = [os.path.join(base, f"dst{i}") for i in range(3)]
        peers = make_peers(self, reactor, dests)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        for peer in peers:
            (receiver,) = peer.agent.history
            self.assertGreater(receiver.dropped, 50)
        for dst in dests:
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
        self.assertLess(report.sender_stats["datagrams"], 2 * blocks)
        self.assertGreater(report.sender_stats["parity"], 0)  # each node takes every file: parities serve all

    @defer.inlineCallbacks
    def test_packs_a_node_takes_only_some_files_of_are_repaired_block_by_block(self):
        """
        A node that holds half of the files has no data where they lie in
        their packs, which no parity could be solved without: the packs'
        losses are sent again as blocks, and nothing fails its digest.
        """
        self.patch(agent_module, "Receiver", PhasedLossyReceiver)
        base, src, manifest, local = small_files(self, 400, 4, lambda i: 1000 + i * 7)
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        for path in sorted(local.values())[::2]:
            target = os.path.join(dests[1], os.path.relpath(path, src))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(path, target)
        peers = make_peers(self, reactor, dests)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertGreater(report.passes, 1)
        self.assertEqual(report.sender_stats.get("parity", 0), 0)
        for name in ("node0", "node1"):
            self.assertEqual(report.peers[name].stats.get("corrupt_chunks", 0), 0)
        for dst in dests:
            assert_same_tree(self, src, dst)


class DeafInDst0Receiver(LossyReceiver):
    """Test-only: the receiver writing into ``dst0`` loses every datagram; the others none."""

    def lose(self) -> bool:
        return os.path.basename(self.destination.rstrip("/")) == "dst0"


class CorruptingReceiver(Receiver):
    """Test-only: a disk that flips a byte of every run written into ``dst0``."""

    def _accept(self, f, first, count, data):
        if os.path.basename(self.destination.rstrip("/")) == "dst0":
            data = bytearray(data)
            data[0] ^= 0xFF
        super()._accept(f, first, count, data)


class BoundTests(unittest.TestCase):
    """No one node holds a job for ever: the others finish, and it fails with the reason."""

    timeout = 60

    @defer.inlineCallbacks
    def bounded(self, receiver_class, **bounds):
        self.patch(agent_module, "Receiver", receiver_class)
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        write_file(os.path.join(src, "f"), random.Random(5).randbytes(3_000_000))
        manifest, local = scan([src + "/"])
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        peers = make_peers(self, reactor, dests)
        report = yield run_transfer(self, reactor, manifest, local, peers, **bounds)
        self.assertTrue(report.peers["node1"].ok, report.peers["node1"].reason)
        self.assertFalse(report.peers["node0"].ok)
        with open(os.path.join(dests[1], "f"), "rb") as f, open(os.path.join(src, "f"), "rb") as g:
            self.assertEqual(f.read(), g.read())
        self.assertFalse(os.path.exists(os.path.join(dests[0], "f")))
        return report

    @defer.inlineCallbacks
    def test_a_node_still_incomplete_after_max_passes_fails(self):
        report = yield self.bounded(DeafInDst0Receiver, max_passes=3, stalled_rounds=10_000)
        self.assertEqual(report.peers["node0"].reason, "still incomplete after 3 passes (max_passes)")
        self.assertEqual(report.passes, 3)

    @defer.inlineCallbacks
    def test_a_node_whose_chunks_keep_failing_their_digests_fails(self):
        report = yield self.bounded(CorruptingReceiver, max_corrupt_chunks=3)
        self.assertRegex(
            report.peers["node0"].reason,
            r"^[3-9]\d* chunks failed their digests \(forged or corrupted data; max_corrupt_chunks\)$",
        )


class RandomLossReceiver(LossyReceiver):
    """Test-only: drops 5% of what reaches the socket, differently at every receiver."""

    seeds = iter(range(1000))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(next(self.seeds))

    def lose(self) -> bool:
        return self.rng.random() < 0.05


class CodedRepairTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_different_losses_at_four_receivers_cost_less_than_their_union(self):
        self.patch(agent_module, "Receiver", RandomLossReceiver)
        base, src, manifest, local = one_file(self, random.Random(5).randbytes(3 << 20))
        dests = [os.path.join(base, f"dst{i}") for i in range(4)]
        peers = make_peers(self, reactor, dests)
        report = yield run_transfer(self, reactor, manifest, local, peers)
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        for dst in dests:
            assert_same_tree(self, src, dst)
        receivers = [peer.agent.history[0] for peer in peers]
        # Groups that lacked two or more blocks somewhere were rebuilt from parities.
        self.assertGreater(sum(r.stats["rebuilt"] for r in receivers), 100)
        self.assertGreater(report.sender_stats["coded_parities"], 0, "only XOR parities were sent")
        # The union of four receivers' losses is about four times one's; the
        # repairs cost about the most one receiver lost of each group.
        repairs = report.sender_stats["datagrams"] - manifest.blocks(manifest.entries[0])
        self.assertLess(repairs, 0.6 * sum(r.dropped for r in receivers))


class BatchTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_batch_is_at_most_a_millisecond_of_the_rate(self):
        """
        A batch leaves back to back: at 100 Mbit/s more than 8 datagrams
        would be a queue of mrsyncd's own; at 1 Gbit/s up to 44 go at once.
        """
        base, _, manifest, local = one_file(self, random.Random(9).randbytes(4 << 20))
        per_batch = {}
        for rate in (100e6, 1e9):
            peers = make_peers(self, reactor, [os.path.join(base, f"dst-{rate:.0f}")])
            report = yield run_transfer(self, reactor, manifest, local, peers, rate_bps=rate)
            self.assertTrue(report.ok)
            stats = report.sender_stats
            if not stats["batches"]:
                raise unittest.SkipTest("no UDP segmentation offload on this kernel: one datagram per call")
            per_batch[rate] = stats["datagrams"] / stats["batches"]
        self.assertLessEqual(per_batch[100e6], 8.5)
        self.assertGreater(per_batch[1e9], 2 * per_batch[100e6])

    @defer.inlineCallbacks
    def test_without_segmentation_offload_a_run_leaves_a_datagram_a_call(self):
        """
        Where the kernel has no UDP segmentation offload, the runs sealed in
        one piece each still leave one datagram a call: every block arrives
        once, whole, in the order of its sequence number.
        """
        blocks = 300
        sender, arrived = heard_sender(self, blocks)
        sender._gso = False
        sender.start()
        yield sender.send({0: RangeSet.interval(0, blocks)})
        yield task.deferLater(reactor, 0.05, lambda: None)
        arrived = sorted(arrived(), key=lambda block: block.sequence)
        self.assertEqual([block.block_index for block in arrived], list(range(blocks)))
        self.assertEqual([block.sequence for block in arrived], list(range(blocks)))
        self.assertEqual(sender.stats["datagrams"], blocks)
        self.assertEqual(sender.stats["batches"], 0)


def test_what_is_left_of_a_batch_the_kernel_took_part_of():
    """
    A batch's pieces each hold one or more datagrams: what is kept to send
    again starts where the kernel stopped.
    """
    pieces = [b"abc", b"defg"]
    assert _after(pieces, 0) == pieces
    assert _after(pieces, 2) == [b"c", b"defg"]
    assert _after(pieces, 3) == [b"defg"]
    assert _after(pieces, 5) == [b"fg"]
    assert _after(pieces, 7) == []


class DeadPeer:
    """
    A receiver that takes the offer (its socket joins the group) and then
    never answers again: every later call returns a Deferred that never fires.
    """

    def __init__(self, name, agent):
        self.name = name
        self.agent = agent
        self.live = LocalPeer(name, agent)
        self.calls = []

    def prepare(self, offer):
        self.calls.append("prepare")
        return self.live.prepare(offer)

    def wants_manifest(self):
        return self.live.wants_manifest()

    def missing(self, transfer_id, abandoned, through=None, before=None):
        self.calls.append("missing")
        return defer.Deferred()

    def results(self, transfer_id):
        self.calls.append("results")
        return defer.Deferred()


class DeadReceiverTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_dead_receiver_is_dropped_after_grace(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        make_full_tree(src)
        manifest, local = scan([src + "/"])
        dests = [os.path.join(base, f"dst{i}") for i in range(3)]
        peers = make_peers(self, reactor, dests[:2])
        dead_agent = ReceiverAgent(reactor, interface="lo", destination_root=dests[2])
        self.addCleanup(dead_agent.close)
        dead = DeadPeer("dead", dead_agent)
        grace = 1.5
        started = time.monotonic()
        report = yield run_transfer(
            self, reactor, manifest, local, peers + [dead], grace=grace, call_timeout=0.3, poll=0.05
        )
        elapsed = time.monotonic() - started
        self.assertFalse(report.ok)
        self.assertFalse(report.peers["dead"].ok)
        self.assertIn("no answer", report.peers["dead"].reason)
        self.assertEqual(report.peers["dead"].results, {})
        for peer in peers:
            self.assertTrue(report.peers[peer.name].ok, report.peers[peer.name].reason)
            self.assertEqual(set(report.peers[peer.name].results.values()), {OK})
        for dst in dests[:2]:
            assert_same_tree(self, src, dst)
        # Declared failed only after the grace period, and not much later.
        self.assertGreaterEqual(report.seconds, grace)
        self.assertLess(elapsed, grace + 5)
        self.assertNotIn("results", dead.calls)
        self.assertIn("missing", dead.calls)

    @defer.inlineCallbacks
    def test_receiver_that_never_takes_the_offer(self):
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 2)

        class Silent:
            name = "silent"
            calls: list[str] = []

            def prepare(self, offer):
                return defer.Deferred()

            def wants_manifest(self):
                return True

            def missing(self, transfer_id, abandoned, through=None, before=None):
                self.calls.append("missing")
                return defer.fail(ConnectionError("not listening"))

            def results(self, transfer_id, discard=False):
                self.calls.append(f"results discard={discard}")
                return defer.fail(ConnectionError("not listening"))

        silent = Silent()
        report = yield run_transfer(
            self, reactor, manifest, local, peers + [silent], call_timeout=0.3, prepare_timeout=0.5
        )
        self.assertFalse(report.peers["silent"].ok)
        # A call that raised would only count as silence: the calls are
        # recorded instead.  Never asked for its missing blocks; told, at
        # the end, to let go of the transfer and its part files.
        self.assertEqual(silent.calls, ["results discard=True"])
        for peer in peers:
            self.assertTrue(report.peers[peer.name].ok, report.peers[peer.name].reason)
        for dst in dests:
            assert_same_tree(self, src, dst)

    @defer.inlineCallbacks
    def _read_ahead(self, count, size_of, most_calls):
        """
        A pass reads the files ahead of it in runs, one thread call for each
        (not one for each file), or a pack of them in one; each file is still
        checked against its digest on its own, and one changed fails alone.
        """
        base, src, manifest, local = small_files(self, count, 3, size_of)
        dst = os.path.join(base, "dst")
        changed = os.path.join(src, "d1", f"f{count // 2 + 1:03d}")
        with open(changed, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
        reads: list[int] = []
        original = sender_module._read_chunks

        def counted(batch):
            reads.append(sum(len(read) if isinstance(read, list) else 1 for read in batch))
            return original(batch)

        self.patch(sender_module, "_read_chunks", counted)
        peers = make_peers(self, reactor, [dst])
        report = yield run_transfer(self, reactor, manifest, local, peers)
        results = report.peers[peers[0].name].results
        self.assertEqual(
            results.pop(f"d1/f{count // 2 + 1:03d}"),
            "sender gave up: source changed since it was scanned (at byte 0)",
        )
        self.assertEqual(set(results.values()), {OK})
        self.assertEqual(sum(reads), count)
        self.assertLessEqual(len(reads), most_calls, reads)
        self.assertFalse(os.path.exists(changed.replace(src, dst)))
        with open(os.path.join(src, "d2", f"f{count - 1:03d}"), "rb") as f:
            with open(os.path.join(dst, "d2", f"f{count - 1:03d}"), "rb") as g:
                self.assertEqual(f.read(), g.read())

    def test_packed_files_are_read_a_pack_at_a_time_and_one_changed_among_them_fails_alone(self):
        return self._read_ahead(300, lambda i: 100 + i * 7, 2)  # packs of 256 files and 44

    def test_small_files_are_read_a_run_at_a_time_and_one_changed_among_them_fails_alone(self):
        # Above `PACKED_SHARE` of a chunk: not packed, read ahead in runs of a chunk's bytes.
        return self._read_ahead(30, lambda i: 140_000 + i * 1000, 8)

    @defer.inlineCallbacks
    def test_a_sender_that_has_stopped_holds_no_file_data(self):
        base = temp_dir(self)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(src)
        write_file(os.path.join(src, "big"), os.urandom(3_000_000))
        write_file(os.path.join(src, "small"), os.urandom(5_000))
        manifest, local = scan([src + "/"])
        offer = new_offer(manifest, unique_channel(), "/")
        transfer = Transfer(reactor, offer, local, make_peers(self, reactor, [dst]), rate_bps=RATE, grace=5.0)
        report = yield transfer.run()
        self.assertTrue(report.ok)
        self.assertEqual(dict(transfer.sender._chunks), {})

    @defer.inlineCallbacks
    def test_a_malformed_answer_to_the_offer_fails_that_receiver_alone(self):
        """
        The answers to an offer are decoded once for all the receivers that
        gave the same: one that gave garbage fails with the reason, and the
        others, which gave the same answer as each other, are each counted
        as needing the whole tree.
        """
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 3)

        class Garbled:
            """Takes the offer, then answers with a varint cut short."""

            def __init__(self, peer):
                self.peer, self.name = peer, "garbled"

            def prepare(self, offer):
                return self.peer.prepare(offer).addCallback(lambda _: b"\x80")

            def wants_manifest(self):
                return self.peer.wants_manifest()

            def missing(self, *args, **kwargs):
                return self.peer.missing(*args, **kwargs)

            def results(self, *args, **kwargs):
                return self.peer.results(*args, **kwargs)

        garbled = Garbled(peers.pop())
        report = yield run_transfer(self, reactor, manifest, local, peers + [garbled])
        self.assertFalse(report.peers["garbled"].ok)
        self.assertEqual(
            report.peers["garbled"].reason, "sent a malformed answer to the offer: truncated varint"
        )
        for peer in peers:
            self.assertTrue(report.peers[peer.name].ok, report.peers[peer.name].reason)
            self.assertEqual(report.peers[peer.name].needed_bytes, manifest.total_bytes())
        for dst in dests[:2]:
            assert_same_tree(self, src, dst)
        self.assertEqual(part_files(dests[2]), [])


class InterruptTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_an_interrupted_transfer_keeps_the_part_files_to_resume_from(self):
        """
        The master going down interrupts its transfers: the receivers are
        told nothing, so their part files stay for the job to resume from
        (a cancel would have them removed).
        """
        base = temp_dir(self)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(src)
        os.makedirs(dst)
        write_file(os.path.join(src, "big.bin"), random.Random(7).randbytes(16 << 20))
        manifest, local = scan([src + "/"])
        (peer,) = make_peers(self, reactor, [dst])
        told = []
        results = peer.results

        def recorded(transfer_id, discard=False):
            told.append(discard)
            return results(transfer_id, discard)

        peer.results = recorded
        offer = new_offer(manifest, unique_channel(), "/")
        transfer = Transfer(reactor, offer, local, [peer], rate_bps=40e6, grace=5.0)
        finished = transfer.run()
        receivers = peer.agent.receivers

        def received():
            receiver = receivers.get(offer.transfer_id)
            return receiver is not None and receiver.stats["bytes"] >= 2 << 20

        yield wait_until(received)
        transfer.interrupt()
        report = yield finished
        self.assertEqual(told, [])
        self.assertTrue(report.peers["node0"].ok, report.peers["node0"].reason)
        self.assertIn(offer.transfer_id, receivers)
        self.assertFalse(os.path.exists(os.path.join(dst, "big.bin")))
        (part,) = part_files(dst)
        self.assertGreaterEqual(os.stat(os.path.join(dst, part)).st_blocks * 512, 1 << 20)


class ChannelTests(unittest.TestCase):
    def test_unique_channels_stay_on_lo(self):
        channels = [unique_channel() for _ in range(20)]
        self.assertEqual(len({c.address for c in channels}), 20)
        for c in channels:
            self.assertEqual(c.interface, "lo")
            self.assertTrue(c.group.startswith("239."))
            self.assertEqual(c.ttl, 1)


class DeleteTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_delete_removes_what_the_source_lacks_but_not_what_excludes_match(self):
        base = temp_dir(self)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(os.path.join(src, "d"))
        for name in ("a", "d/b"):
            with open(os.path.join(src, name), "w") as f:
                f.write(name)
        os.makedirs(os.path.join(dst, "d", "gone-dir"))
        for name in ("stale", "d/stale", "d/gone-dir/x", "notes.keep", "d/more.keep"):
            with open(os.path.join(dst, name), "w") as f:
                f.write("old")
        manifest, local = scan([src + "/"], excludes=["*.keep"])
        (peer,) = make_peers(self, reactor, [dst])
        options = TransferOptions(delete=True, protect=("*.keep",))
        offer = new_offer(manifest, unique_channel(), "/", options)
        report = yield Transfer(reactor, offer, local, [peer], rate_bps=200e6, grace=5.0).run()
        self.assertTrue(report.ok, report.peers["node0"].reason)
        left = sorted(os.path.relpath(os.path.join(d, n), dst) for d, ds, fs in os.walk(dst) for n in ds + fs)
        self.assertEqual(left, ["a", "d", "d/b", "d/more.keep", "notes.keep"])


class SetIdTests(unittest.TestCase):
    """
    A file's set-user-ID and set-group-ID bits arrive only where the node
    allows them (``allow_setid``) and the job sets owners: otherwise a
    user's own set-user-ID file would land root's and set-user-ID.
    """

    timeout = 60

    def push(self, allow_setid: bool, preserve_owner: bool):
        base = temp_dir(self)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.makedirs(os.path.join(src, "shared"))
        write_file(os.path.join(src, "tool"), b"#!/bin/sh\n", 0o4755)
        write_file(os.path.join(src, "shared", "group-tool"), b"#!/bin/sh\n", 0o2750)
        os.chmod(os.path.join(src, "shared"), 0o2775)
        manifest, local = scan([src + "/"])
        agent = RecordingAgent(reactor, interface="lo", destination_root=dst, allow_setid=allow_setid)
        self.addCleanup(agent.close)
        offer = new_offer(manifest, unique_channel(), "/", TransferOptions(preserve_owner=preserve_owner))
        d = Transfer(reactor, offer, local, [LocalPeer("node0", agent)], rate_bps=200e6, grace=5.0).run()
        return d.addCallback(lambda report: (report, agent, offer, local, dst))

    def modes(self, dst: str) -> dict[str, str]:
        return {
            p: oct(stat.S_IMODE(os.lstat(os.path.join(dst, p)).st_mode))
            for p in ("tool", "shared", "shared/group-tool")
        }

    @defer.inlineCallbacks
    def test_cleared_by_default_even_with_owners(self):
        report, agent, offer, local, dst = yield self.push(allow_setid=False, preserve_owner=True)
        self.assertTrue(report.ok, report.peers["node0"].reason)
        # The directory's set-group-ID bit only hands its group to new entries: it stays.
        self.assertEqual(self.modes(dst), {"tool": "0o755", "shared": "0o2775", "shared/group-tool": "0o750"})
        # The cleared modes are what the node compares with: the same push again changes nothing.
        again = yield Transfer(
            reactor, offer, local, [LocalPeer("node0", agent)], rate_bps=200e6, grace=5.0
        ).run()
        self.assertTrue(again.ok)
        self.assertEqual(again.peers["node0"].changed, 0)
        self.assertEqual(again.sender_stats.get("payload", 0), 0)

    @defer.inlineCallbacks
    def test_cleared_when_the_job_does_not_set_owners(self):
        report, _, _, _, dst = yield self.push(allow_setid=True, preserve_owner=False)
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertEqual(self.modes(dst)["tool"], "0o755")

    @defer.inlineCallbacks
    def test_kept_where_allowed_and_owners_are_set(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("owners are set only as root")
        report, _, _, _, dst = yield self.push(allow_setid=True, preserve_owner=True)
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertEqual(
            self.modes(dst), {"tool": "0o4755", "shared": "0o2775", "shared/group-tool": "0o2750"}
        )


class BackupAndHookTests(unittest.TestCase):
    timeout = 60

    def tree(self, base: str, content: str) -> str:
        src = os.path.join(base, "src")
        os.makedirs(src, exist_ok=True)
        with open(os.path.join(src, "f"), "w") as f:
            f.write(content)
        return src

    @defer.inlineCallbacks
    def test_backup_keeps_overwritten_and_deleted_files(self):
        base = temp_dir(self)
        dst = os.path.join(base, "dst")
        os.makedirs(dst)
        with open(os.path.join(dst, "f"), "w") as f:
            f.write("old contents")
        with open(os.path.join(dst, "extra"), "w") as f:
            f.write("not in the source")
        src = self.tree(base, "new contents")
        manifest, local = scan([src + "/"])
        (peer,) = make_peers(self, reactor, [dst])
        offer = new_offer(manifest, unique_channel(), "/", TransferOptions(delete=True, backup_suffix="~"))
        report = yield Transfer(reactor, offer, local, [peer], rate_bps=200e6, grace=5.0).run()
        self.assertTrue(report.ok, report.peers["node0"].reason)
        read = {name: open(os.path.join(dst, name)).read() for name in sorted(os.listdir(dst))}
        self.assertEqual(read, {"extra~": "not in the source", "f": "new contents", "f~": "old contents"})

    @defer.inlineCallbacks
    def test_post_receive_hook_runs_with_the_job_and_changed_paths(self):
        base = temp_dir(self)
        dst, out = os.path.join(base, "dst"), os.path.join(base, "hook.out")
        src = self.tree(base, "data")
        script = f'echo "$MRSYNC_JOB $MRSYNC_DESTINATION" > {out}; cat "$MRSYNC_CHANGED" >> {out}; exit 3'
        agent = ReceiverAgent(
            reactor, interface="lo", destination_root=dst, post_receive=["/bin/sh", "-c", script]
        )
        self.addCleanup(agent.close)
        manifest, local = scan([src + "/"])
        offer = new_offer(manifest, unique_channel(), "/", TransferOptions(label="42"))
        report = yield Transfer(reactor, offer, local, [LocalPeer("node0", agent)], rate_bps=200e6).run()
        peer = report.peers["node0"]
        self.assertEqual(peer.hook["status"], 3)
        self.assertFalse(peer.ok, "a hook that fails fails the node")
        self.assertIn("post-receive hook", peer.reason)
        with open(out) as f:
            job_line, changed = f.read().split("\n", 1)
        self.assertEqual(job_line.split(), ["42", os.path.realpath(dst)])
        self.assertEqual(changed, "f\0", "the changed paths, each followed by a NUL")
        # Nothing changed the second time: the hook does not run again.
        os.unlink(out)
        again = yield Transfer(
            reactor,
            new_offer(manifest, unique_channel(), "/"),
            local,
            [LocalPeer("node0", agent)],
            rate_bps=200e6,
        ).run()
        self.assertTrue(again.ok)
        self.assertIsNone(again.peers["node0"].hook)
        self.assertFalse(os.path.exists(out))


class ProbeTimingTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def probed_pass(self, lost_at_first_probe=0, lost_at_probe=1):
        """
        A pass of 1420 datagrams at 8.5 Mbit/s (about 2 s) to one node,
        probed every second; the node's answer to probe ``lost_at_probe``
        may claim the first ``lost_at_first_probe`` blocks lost, which are
        then repaired within the pass.  Fires with the report, the times of
        the probes and the time the transfer ended (its Results call).
        """
        base, _, manifest, local = one_file(self, os.urandom(2_000_000))
        [peer] = make_peers(self, reactor, [os.path.join(base, "dst")])
        calls = []
        missing = peer.missing

        def recording(transfer_id, abandoned, through=None, before=None):
            calls.append((reactor.seconds(), through))
            d = missing(transfer_id, abandoned, through, before)
            if len(calls) == lost_at_probe and lost_at_first_probe:
                lost = encode_map({0: RangeSet.interval(0, lost_at_first_probe)})[0]
                d.addCallback(lambda report: MissingReport(lost, True, False, report.stats))
            return d

        peer.missing = recording
        results = peer.results
        ended = []

        def ending(*args):
            ended.append(reactor.seconds())
            return results(*args)

        peer.results = ending
        report = yield run_transfer(
            self, reactor, manifest, local, [peer], rate_bps=8.5e6, probe=1.0, last_probe=0.15
        )
        self.assertTrue(report.ok, report)
        probes = [when for when, through in calls if through is None]
        return report, probes, ended[0]

    @defer.inlineCallbacks
    def test_the_last_probe_comes_just_before_the_pass_ends(self):
        """
        The second probe is timed to fall ``last_probe`` before the pass
        ends, instead of leaving its last second of losses to the round
        after it.
        """
        report, probes, ended = yield self.probed_pass()
        self.assertEqual(len(probes), 2, probes)
        self.assertGreater(probes[1] - probes[0], 0.5)
        self.assertLess(ended - probes[1], 0.5)

    @defer.inlineCallbacks
    def test_repairs_sent_along_are_counted_in_what_is_left(self):
        """
        400 repairs (0.55 s) queued by the first probe make the pass that
        much longer: the last probe still comes just before its end.
        """
        report, probes, ended = yield self.probed_pass(lost_at_first_probe=400)
        self.assertEqual(report.sender_stats["datagrams"] - report.peers["node0"].stats["blocks"], 400)
        self.assertLess(ended - probes[-1], 0.5, (probes, ended))

    @defer.inlineCallbacks
    def test_the_repairs_the_last_probe_finds_are_not_probed_again(self):
        """
        400 repairs (0.55 s) found by the last probe go out with the pass's
        end, and the question after the pass finds what they lost: no third
        probe, which would cost an answer from every receiver.
        """
        report, probes, ended = yield self.probed_pass(lost_at_first_probe=400, lost_at_probe=2)
        self.assertEqual(report.sender_stats["datagrams"] - report.peers["node0"].stats["blocks"], 400)
        self.assertEqual(len(probes), 2, probes)


class ProbeIntervalTests(unittest.TestCase):
    def test_a_few_receivers_are_probed_every_probe_seconds(self):
        self.assertEqual(probe_interval(1.0, 8, 100e6), 1.0)
        self.assertEqual(probe_interval(0.5, 1, 10e6), 0.5)

    def test_many_receivers_are_probed_less_often_at_a_low_rate(self):
        """Their answers cost bytes each, whatever they lost: together at most PROBE_SHARE of the data."""
        interval = probe_interval(1.0, 64, 20e6)
        answers = 64 * transfer_module.PROBE_ANSWER_BYTES * 8 / interval
        self.assertAlmostEqual(answers / 20e6, transfer_module.PROBE_SHARE)
        self.assertGreater(interval, 1.5)
        self.assertGreater(probe_interval(1.0, 128, 20e6), interval)

    def test_the_repairs_a_probe_finds_wait_a_few_seconds_at_most(self):
        self.assertEqual(probe_interval(1.0, 1000, 1e6), transfer_module.PROBE_LONGEST)


class SenderRepairTests(unittest.TestCase):
    def test_what_is_still_queued_is_not_queued_twice(self):
        """A probe while repairs are still queued asks again for some of them: each goes out once."""
        _, _, manifest, local = one_file(self, os.urandom(100_000))
        # 1 Mbit/s: the pass's first datagram waits 11 ms, and this test is over by then.
        sender = Sender(reactor, manifest, local, unique_channel(), os.urandom(8), os.urandom(32), 1e6)
        sender.start()
        self.addCleanup(sender.stop)
        sender.send({0: RangeSet.interval(0, 60)})
        sender.repair({0: RangeSet.interval(0, 10)}, {0: RangeSet([(32, 34)])}, within=100)
        sender.repair({0: RangeSet.interval(5, 15)}, {0: RangeSet([(32, 35)])}, within=100)
        self.assertEqual(sender.repairs_pending, 15 + 3)


def heard_sender(case, blocks):
    """
    A sender at 20 Mbit/s (not started) of one file of ``blocks`` blocks, and
    a function that decodes what a socket on its group has heard so far.
    """
    _, _, manifest, local = one_file(case, os.urandom(blocks * 1408))
    channel = unique_channel()
    collecting = Collecting()
    port = adopt(reactor, receiver_socket(channel), collecting, 2048)
    case.addCleanup(port.stopListening)
    tid, key = os.urandom(8), os.urandom(32)
    sender = Sender(reactor, manifest, local, channel, tid, key, 20e6)
    case.addCleanup(sender.stop)
    cipher = datagram.DatagramCipher(tid, key)
    return sender, lambda: [cipher.decode(data) for data in collecting.arrived]


class Collecting(DatagramProtocol):
    def __init__(self):
        self.arrived = []

    def datagramReceived(self, data, addr):
        self.arrived.append(data)


class RepairSpreadTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def spread(self, blocks, repairs, within):
        """
        Send a pass of ``blocks`` with the first ``repairs`` of them queued
        again as repairs at its start, spread over ``within`` datagrams;
        fires with where in the pass the repairs went out.  20 Mbit/s: at
        most 17 datagrams a tick, read as they come.
        """
        sender, heard = heard_sender(self, blocks)
        sender.start()
        sending = sender.send({0: RangeSet.interval(0, blocks)})
        sender.repair({0: RangeSet.interval(0, repairs)}, {}, within=within)
        yield sending
        yield task.deferLater(reactor, 0.05, lambda: None)
        arrived = heard()
        self.assertEqual(len(arrived), blocks + repairs)
        sent = [block.block_index for block in sorted(arrived, key=lambda block: block.sequence)]
        self.assertEqual(sorted(sent), sorted([*range(blocks), *range(repairs)]))
        return [at for at, block in enumerate(sent) if block in sent[:at]]

    @defer.inlineCallbacks
    def test_repairs_are_spread_over_the_datagrams_given(self):
        """
        Ten repairs to be spread over the next 210 datagrams leave one after
        every 20 of the pass's own, not in a rush.
        """
        repairs_at = yield self.spread(300, 10, within=210)
        self.assertEqual(repairs_at, [20 + 21 * k for k in range(10)])

    @defer.inlineCallbacks
    def test_no_more_than_the_pass_has_left(self):
        """
        Repairs spread over more datagrams than the pass has left are spread
        over what it has left (40 of its own and the 5), the last as its
        last datagram.
        """
        repairs_at = yield self.spread(40, 5, within=1000)
        self.assertEqual(repairs_at, [8 + 9 * k for k in range(5)])

    @defer.inlineCallbacks
    def test_after_the_pass_nothing_is_queued(self):
        """A probe answered after its pass was sent queues nothing: the round after the pass asks again."""
        _, _, manifest, local = one_file(self, os.urandom(20 * 1408))
        sender = Sender(reactor, manifest, local, unique_channel(), os.urandom(8), os.urandom(32), RATE)
        sender.start()
        self.addCleanup(sender.stop)
        yield sender.send({0: RangeSet.interval(0, 15)})
        sender.repair({0: RangeSet.interval(0, 10)}, {}, within=100)
        self.assertEqual(sender.repairs_pending, 0)


class WireRateTests(unittest.TestCase):
    timeout = 30

    def test_a_datagram_takes_its_headers_of_the_link(self):
        self.assertEqual(unique_channel().frame_overhead, 8 + 20 + 14)
        self.assertEqual(Channel("ff02::1:2", 7000).frame_overhead, 8 + 40 + 14)

    def test_a_datagram_fills_a_packet_of_at_most_ethernets_mtu(self):
        """
        1500 less the IP and UDP headers, on IPv4 and IPv6, whether the
        interface is the kernel's choice or named (``lo``'s MTU of 65536 is
        capped: jumbo blocks are the operator's to ask for); an interface that
        does not exist leaves the error to the socket that would use it.
        """
        self.assertEqual(unique_channel().payload_room(), 1472)
        self.assertEqual(Channel("ff02::1:2", 7000).payload_room(), 1452)
        self.assertEqual(Channel("239.255.1.2", 7000, "lo").payload_room(), 1472)
        self.assertEqual(Channel("239.255.1.2", 7000, "no-such-if0").payload_room(), 1472)
        ipv6 = Channel("ff02::1:2", 7000)
        self.assertEqual(ipv6.payload_room() - datagram.OVERHEAD, datagram.DEFAULT_BLOCK_SIZE)

    @defer.inlineCallbacks
    def test_the_rate_is_a_rate_on_the_wire(self):
        """
        300 datagrams at 4 Mbit/s, each 1490 bytes on an Ethernet link: a
        pass takes at least their frames' time less the pacer's burst (9000
        bytes), 0.876 s; paced by UDP payloads it would take 2.8% less.
        """
        _, _, manifest, local = one_file(self, os.urandom(300 * 1408))
        channel = unique_channel()
        sender = Sender(reactor, manifest, local, channel, os.urandom(8), os.urandom(32), 4e6)
        sender.start()
        self.addCleanup(sender.stop)
        started = reactor.seconds()
        yield sender.send({0: RangeSet.interval(0, 300)})
        elapsed = reactor.seconds() - started
        frame = 1408 + datagram.OVERHEAD + channel.frame_overhead
        self.assertEqual(frame, 1490)
        self.assertGreaterEqual(elapsed, (300 * frame - 9000) * 8 / 4e6)


class EchoTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_the_rate_controller_is_echoed_every_interval(self):
        """
        An ECHO leaves every 0.1 s of the transfer, read off a real socket
        on the group, and takes a sequence number of its own.
        """
        base, _, manifest, local = one_file(self, os.urandom(2 << 20))
        channel = unique_channel()
        collecting = Collecting()
        port = adopt(reactor, receiver_socket(channel), collecting, 2048)
        self.addCleanup(port.stopListening)
        offer = new_offer(manifest, channel, "/")
        peers = make_peers(self, reactor, [os.path.join(base, "dst")])
        transfer = Transfer(reactor, offer, local, peers, rate_bps=20e6)
        report = yield transfer.run()  # about 0.9 s
        self.assertTrue(report.ok)
        yield task.deferLater(reactor, 0.05, lambda: None)
        cipher = datagram.DatagramCipher(offer.transfer_id, transfer.offer.key, transfer.offer.cipher)
        got = [cipher.decode(data) for data in collecting.arrived]
        echoes = [block for block in got if block.kind == datagram.KIND_ECHO]
        self.assertEqual(len(echoes), report.sender_stats["echoes"])
        self.assertGreaterEqual(len(echoes), 8)
        self.assertLessEqual(len(echoes), report.seconds / 0.1 + 1)
        for echo in echoes:
            self.assertEqual(echo.file_index, datagram.ECHO_FILE)
            self.assertIsInstance(Echo.unpack(echo.payload), Echo)
        sequences = [block.sequence for block in got]
        self.assertEqual(len(set(sequences)), len(got))
        self.assertLess(max(sequences), report.sender_stats["datagrams"] + report.sender_stats["echoes"])

    def test_an_echo_that_cannot_be_sent_is_dropped(self):
        """
        The socket fails under it: the rate controller's loop goes on, and
        its sequence number is spent all the same, since it was the nonce of
        a sealed datagram and a nonce is never sealed twice.
        """
        _, _, manifest, local = one_file(self, os.urandom(1408))
        sender = Sender(reactor, manifest, local, unique_channel(), os.urandom(8), os.urandom(32), RATE)
        sender.start()
        self.addCleanup(sender.stop)
        sender.echo(Echo(0, 0.0, 1.0).pack())
        self.assertEqual((sender.sequence, sender.stats["echoes"]), (1, 1))
        sender._port.socket.shutdown(socket.SHUT_WR)  # every send now fails: EPIPE
        sender.echo(Echo(0, 0.0, 1.0).pack())
        self.assertEqual((sender.sequence, sender.stats["echoes"], sender.stats["echoes_dropped"]), (2, 1, 1))


class ShortPassTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_a_short_repair_pass_is_not_probed(self):
        """
        At 5% loss the first pass (about 1.3 s) is probed, the repair passes
        after it (a few hundredths of a second each) are not: a probe would
        see nothing of them, and one that took the last pass's position for
        theirs queued their own blocks again as repairs.
        """
        self.patch(agent_module, "Receiver", RandomLossReceiver)
        base, src, manifest, local = one_file(self, random.Random(3).randbytes(3 << 20))
        [peer] = make_peers(self, reactor, [os.path.join(base, "dst")])
        probes = []  # in-pass probes and polls: Missing without ``through``
        missing = peer.missing

        def recording(transfer_id, abandoned, through=None, before=None):
            if through is None:
                probes.append(reactor.seconds())
            return missing(transfer_id, abandoned, through, before)

        peer.missing = recording
        passes = []
        send_pass = Transfer._send_pass

        def timed(transfer, blocks, parities):
            started = reactor.seconds()
            return send_pass(transfer, blocks, parities).addCallback(
                lambda result: passes.append((started, reactor.seconds())) or result
            )

        self.patch(Transfer, "_send_pass", timed)
        report = yield run_transfer(self, reactor, manifest, local, [peer], rate_bps=20e6)
        self.assertTrue(report.ok, report)
        assert_same_tree(self, src, os.path.join(base, "dst"))
        self.assertGreater(len(passes), 1)
        (first_start, first_end), *repairs = passes
        self.assertTrue(any(first_start <= t <= first_end for t in probes), (probes, passes))
        self.assertEqual([t for t in probes if any(start <= t <= end for start, end in repairs)], [])
