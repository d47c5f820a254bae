"""
The receiving side: what reaches the disk, when, and where.

Real multicast sockets on ``lo``; some tests drive a `Receiver` directly by
handing it batches as its intake would (`support.deliver`), the others run
a whole `Transfer`.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mrsyncd.engine import receiver as receiver_module
from mrsyncd.engine import storage
from mrsyncd.engine.multicast import sender_socket
from mrsyncd.engine.ratecontrol import Echo, node_id
from mrsyncd.engine.receiver import OK, Receiver
from mrsyncd.engine.storage import part_name
from mrsyncd.wire import datagram, erasure
from mrsyncd.wire.blockset import RangeSet, decode_map
from mrsyncd.wire.manifest import DIR, FILE, Entry, Manifest, scan
from mrsyncd.wire.manifest import digest as manifest_digest
from tests.support import (
    assert_same_tree,
    deliver,
    file_digest,
    full_tree_and_peers,
    make_peers,
    part_files,
    run_transfer,
    seal,
    temp_dir,
    tree_entries,
    unique_channel,
    wait_until,
    write_file,
)


def without(manifest, local, paths):
    """The manifest less some entries, with file indices renumbered."""
    keep = [(i, e) for i, e in enumerate(manifest.entries) if e.path not in paths]
    m = Manifest([e for _, e in keep], manifest.block_size, manifest.chunk_size)
    return m, {j: local[i] for j, (i, _) in enumerate(keep) if i in local}


def walk_all(root):
    """Every path beneath root, for 'nothing was written here' checks."""
    return sorted(tree_entries(root))


class DirectReceiverCase(unittest.TestCase):
    """A `Receiver` fed datagrams by hand: exact control of what arrives."""

    timeout = 30

    def setUp(self):
        self.base = temp_dir(self)
        self.src = os.path.join(self.base, "src")
        self.dst = os.path.join(self.base, "dst")
        os.mkdir(self.src)
        self.rng = random.Random(7)
        self.tid, self.key = os.urandom(8), os.urandom(32)

    def start(self, manifest, parity_group=None):
        """``parity_group``: the tests of parities are drawn for groups of that size, not the default."""
        if parity_group is not None:
            manifest.parity_group = parity_group
        r = Receiver(reactor, self.dst, unique_channel())
        self.addCleanup(r.close)
        self.manifest = manifest
        return r, r.prepare(self.tid, self.key, manifest)

    @defer.inlineCallbacks
    def receiving(self, data, chunk_size=1000, parity_group=None):
        """A receiver prepared for one file, ``data`` in blocks of 100 bytes."""
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=chunk_size)
        r, d = self.start(manifest, parity_group)
        yield d
        return r

    def feed(self, r, index, blocks, data, key=None, tid=None):
        bs = self.manifest.block_size
        key, tid = key or self.key, tid or self.tid
        deliver(r, *(seal(key, tid, index, b, data[b * bs : (b + 1) * bs]) for b in blocks))

    def parity(self, data, group, index, file=0):
        """Parity ``index`` of group ``group`` of a file (0 unless ``file``), as the sender builds it."""
        bs, count = self.manifest.block_size, self.manifest.parity_group
        blocks = [data[b * bs : (b + 1) * bs] for b in range(group * count, (group + 1) * count)]
        return seal(
            self.key,
            self.tid,
            file,
            group * count + index,
            erasure.encode([b for b in blocks if b], index, bs),
            kind=datagram.KIND_PARITY,
        )


class DirectReceiverTests(DirectReceiverCase):
    @defer.inlineCallbacks
    def test_a_file_already_in_place_is_left_alone(self):
        """
        Same size, mtime and mode at the final path: nothing is needed and
        nothing is written, not even its metadata (its ctime stays); one
        whose mode differs only has its mode set.
        """
        os.mkdir(self.dst)
        for name, mode in (("same", 0o640), ("other", 0o600)):
            write_file(os.path.join(self.src, name), b"x" * 500)
            os.chmod(os.path.join(self.src, name), 0o640)
            shutil.copy2(os.path.join(self.src, name), os.path.join(self.dst, name))
            os.chmod(os.path.join(self.dst, name), mode)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        before = {n: os.stat(os.path.join(self.dst, n)) for n in ("same", "other")}
        time.sleep(0.01)  # a metadata write would move the ctime
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {})
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"same": OK, "other": OK})
        self.assertEqual(r.changed, [])
        after = {n: os.stat(os.path.join(self.dst, n)) for n in ("same", "other")}
        self.assertEqual(after["same"].st_ctime_ns, before["same"].st_ctime_ns)
        self.assertEqual(stat.S_IMODE(after["other"].st_mode), 0o640)
        self.assertNotEqual(after["other"].st_ctime_ns, before["other"].st_ctime_ns)

    @defer.inlineCallbacks
    def test_datagrams_of_a_file_in_place_are_duplicates_and_touch_nothing(self):
        """
        A file the destination already holds gets no books of its own, but
        the data other hosts need of it still arrives: each block counts as
        a duplicate and each parity as unused, and a block past its end is
        out of range, as for a file being received.
        """
        os.mkdir(self.dst)
        same = self.rng.randbytes(500)
        write_file(os.path.join(self.src, "same"), same)
        shutil.copy2(os.path.join(self.src, "same"), os.path.join(self.dst, "same"))
        new = self.rng.randbytes(300)
        write_file(os.path.join(self.src, "new"), new)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        index = {e.path: i for i, e in enumerate(manifest.entries)}
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(set(needs), {index["new"]})
        before = os.stat(os.path.join(self.dst, "same"))
        self.feed(r, index["same"], range(5), same)
        deliver(r, self.parity(same, 0, 0, index["same"]))
        deliver(r, seal(self.key, self.tid, index["same"], 5, same[:100]))
        self.assertEqual(
            (r.stats["duplicate"], r.stats["parity_unused"], r.stats["range"], r.stats["blocks"]),
            (5, 1, 1, 0),
        )
        self.assertEqual(os.stat(os.path.join(self.dst, "same")).st_ctime_ns, before.st_ctime_ns)
        self.feed(r, index["new"], range(3), new)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"same": OK, "new": OK})
        with open(os.path.join(self.dst, "new"), "rb") as f:
            self.assertEqual(f.read(), new)

    @defer.inlineCallbacks
    def test_blocks_in_reports_out_commit(self):
        data = self.rng.randbytes(10_000)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet.interval(0, 10)})
        report = r.missing()
        self.assertEqual(decode_map(report.missing), {0: RangeSet.interval(0, 100)})
        self.assertTrue(report.complete)
        self.assertFalse(report.done)

        held = [b for b in range(100) if b % 7 and b not in (40, 41, 42)]
        self.feed(r, 0, held, data)
        self.feed(r, 0, held[:5], data)  # duplicates
        self.assertEqual(r.stats["duplicate"], 5)
        self.assertEqual(r.stats["blocks"], len(held))
        report = r.missing()
        self.assertEqual(set(decode_map(report.missing)[0]), set(range(100)) - set(held))
        # A block is on disk before it is verified, but only in the part file.
        self.assertEqual(os.listdir(self.dst), [part_name(self.tid, 0)])
        # Wrong lengths and indices never touch the disk.
        deliver(r, seal(self.key, self.tid, 0, 0, data[:99]))
        deliver(r, seal(self.key, self.tid, 0, 99, data[:101]))
        deliver(r, seal(self.key, self.tid, 0, 100, data[:100]))
        deliver(r, seal(self.key, self.tid, 1, 0, data[:100]))
        self.assertEqual(r.stats["range"], 4)

        self.feed(r, 0, sorted(set(range(100)) - set(held)), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        self.assertEqual(decode_map(r.missing().missing), {})
        self.assertTrue(r.missing().done)
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(part_files(self.dst), [])

    @defer.inlineCallbacks
    def test_any_m_parities_rebuild_m_lost_blocks_of_a_group(self):
        """
        Group 1 lost three blocks (the file's short last block among them):
        parities 0, 5 and 2 rebuild them.
        """
        data = self.rng.randbytes(30 * 100 - 37)
        r = yield self.receiving(data, parity_group=16)
        lost = {17, 23, 29}
        self.feed(r, 0, [b for b in range(30) if b not in lost], data)
        deliver(r, self.parity(data, 1, 0))
        deliver(r, self.parity(data, 1, 0))  # the same parity twice counts once
        deliver(r, self.parity(data, 1, 5))
        self.assertEqual(r.stats["rebuilt"], 0)
        self.assertEqual(r.stats["parity_kept"], 2)
        self.assertEqual(set(decode_map(r.missing().missing)[0]), lost)
        deliver(r, self.parity(data, 1, 2))
        self.assertEqual(r.stats["rebuilt"], 3)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)
        # A parity of a group that lacks nothing is of no use.
        deliver(r, self.parity(data, 0, 0))
        self.assertEqual(r.stats["parity_unused"], 2)

    @defer.inlineCallbacks
    def test_a_largest_group_is_rebuilt_and_a_parity_past_its_last_is_dropped(self):
        """
        Groups of `erasure.MAX_GROUP`: blocks lost on both sides of position
        128 are rebuilt.  A parity numbered past the group's last
        (`erasure.MAX_PARITIES`), authentic but from no sender of this
        version, is dropped as out of range, not kept and not raised.
        """
        group = erasure.MAX_GROUP
        data = self.rng.randbytes(group * 100 + 250)
        r = yield self.receiving(data, chunk_size=100 * group, parity_group=group)
        lost = [3, 127, 128, 200, group - 1]
        self.feed(r, 0, [b for b in range(group + 3) if b not in lost], data)
        past = seal(self.key, self.tid, 0, erasure.MAX_PARITIES, bytes(100), kind=datagram.KIND_PARITY)
        deliver(r, past)
        self.assertEqual(r.stats[datagram.Reason.RANGE.value], 1)
        self.assertEqual(r._kept.count, 0)
        for index in (0, 31, 7, 19, 2):
            deliver(r, self.parity(data, 0, index))
        self.assertEqual(r.stats["rebuilt"], len(lost))
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_a_block_that_arrives_after_parities_lets_them_solve_the_rest(self):
        """Lacking three, two parities kept: the third block as DATA is enough."""
        data = self.rng.randbytes(32 * 100)
        r = yield self.receiving(data, chunk_size=3200, parity_group=16)
        self.feed(r, 0, [b for b in range(32) if b not in (2, 5, 9)], data)
        deliver(r, self.parity(data, 0, 1))
        deliver(r, self.parity(data, 0, 4))
        self.assertEqual(r.stats["rebuilt"], 0)
        self.feed(r, 0, [5], data)
        self.assertEqual(r.stats["rebuilt"], 2)
        self.assertEqual(r._kept.count, 0)
        yield wait_until(lambda: r.done)
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_parities_for_a_failed_file_are_dropped(self):
        data = self.rng.randbytes(32 * 100)
        r = yield self.receiving(data, chunk_size=1600, parity_group=16)
        self.feed(r, 0, range(14), data)
        deliver(r, self.parity(data, 0, 0))
        r.missing(abandoned={0: "source changed"})  # the file fails here
        self.assertEqual(r.results, {"f": "sender gave up: source changed"})
        deliver(r, self.parity(data, 0, 1))
        deliver(r, self.parity(data, 1, 0))
        self.assertEqual(r.stats["parity_unused"], 2)
        self.assertEqual(r._kept.count, 0)

    @defer.inlineCallbacks
    def test_kept_parities_are_bounded(self):
        self.patch(receiver_module, "KEPT_PARITIES", 5)  # read when a receiver is made
        data = self.rng.randbytes(16 * 100 * 8)
        r = yield self.receiving(data, chunk_size=1600, parity_group=16)
        # Every group lacks two blocks and gets one parity: each is kept.
        for group in range(8):
            self.feed(r, 0, [b for b in range(group * 16, group * 16 + 14)], data)
            deliver(r, self.parity(data, group, 0))
        self.assertEqual(r._kept.count, 5)
        self.assertEqual(sorted(g for _, g in r._kept.groups()), [3, 4, 5, 6, 7])
        # A second parity of a group still kept repairs it; of one let go, not.
        deliver(r, self.parity(data, 7, 1))
        deliver(r, self.parity(data, 0, 1))
        self.assertEqual(r.stats["rebuilt"], 2)
        self.assertEqual(set(decode_map(r.missing().missing)[0]) & {126, 127, 14, 15}, {14, 15})

    @defer.inlineCallbacks
    def small_file_received(self):
        """
        A file of 3000 bytes received whole; returns, for each time a part
        file was made, whether the reactor's thread did it
        (``storage._create_part`` is watched, not replaced).
        """
        data = self.rng.randbytes(3000)
        r = yield self.receiving(data, chunk_size=10_000)
        in_reactor = []
        real = storage._create_part

        def watched(*args, **kwargs):
            in_reactor.append(threading.current_thread() is threading.main_thread())
            return real(*args, **kwargs)

        self.patch(storage, "_create_part", watched)
        self.feed(r, 0, range(30), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(part_files(self.dst), [])
        return in_reactor

    @defer.inlineCallbacks
    def test_a_small_file_gets_its_part_file_in_a_thread_not_the_reactor(self):
        """Making a file can take a millisecond: the reactor must go on reading the socket."""
        in_reactor = yield self.small_file_received()
        self.assertTrue(in_reactor and not any(in_reactor), in_reactor)

    @defer.inlineCallbacks
    def test_small_files_past_the_memory_bound_are_written_from_the_reactor(self):
        self.patch(receiver_module, "UNWRITTEN_BYTES", 2999)
        in_reactor = yield self.small_file_received()
        self.assertTrue(in_reactor[0], in_reactor)

    @defer.inlineCallbacks
    def test_a_small_file_that_cannot_be_written_fails_and_leaves_nothing(self):
        os.mkdir(os.path.join(self.src, "d"))
        data = self.rng.randbytes(3000)
        write_file(os.path.join(self.src, "d", "f"), data)
        write_file(os.path.join(self.src, "g"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=10_000)
        r, d = self.start(manifest)
        yield d
        # Once prepared, something not a directory takes the place of d.
        os.rmdir(os.path.join(self.dst, "d"))
        write_file(os.path.join(self.dst, "d"), b"in the way")
        index = {e.path: i for i, e in enumerate(manifest.entries)}
        self.feed(r, index["d/f"], range(30), data)
        self.feed(r, index["g"], range(30), data)
        yield wait_until(lambda: r.done)
        self.assertTrue(r.results["d/f"].startswith("cannot write: "), r.results)
        self.assertIn("not a directory", r.results["d/f"])
        self.assertEqual(r.results["g"], OK)
        self.assertFalse(os.path.lexists(os.path.join(self.dst, "d", "f")))
        self.assertEqual(part_files(self.dst), [])

    @defer.inlineCallbacks
    def test_chunk_that_fails_verification_is_asked_again(self):
        """Authentic datagrams whose data does not match the manifest never reach the final path."""
        data = self.rng.randbytes(3000)
        r = yield self.receiving(data)
        bad = bytearray(data)
        bad[1234] ^= 0x40  # chunk 1
        self.feed(r, 0, range(30), bytes(bad))
        yield wait_until(lambda: r.stats["corrupt_chunks"] == 1)
        self.assertFalse(r.done)
        self.assertEqual(decode_map(r.missing().missing), {0: RangeSet.interval(10, 20)})
        self.assertFalse(os.path.exists(os.path.join(self.dst, "f")))
        self.feed(r, 0, range(10, 20), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def read_backs(self, *runs):
        """
        Feed a file of 3 chunks in ``runs`` of blocks, one batch each; once
        it is whole and verified, the offsets of the chunks that were read
        back from the part file to be digested.
        """
        read_back = []
        real = storage.digest_range

        def digest_range(root_fd, path, part, offset, length):
            read_back.append(offset)
            return real(root_fd, path, part, offset, length)

        self.patch(storage, "digest_range", digest_range)
        data = self.rng.randbytes(3000)
        r = yield self.receiving(data)
        for blocks in runs:
            self.feed(r, 0, blocks, data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)
        return read_back

    @defer.inlineCallbacks
    def test_a_chunk_gathered_in_order_is_digested_from_memory(self):
        """Reading a chunk back costs a copy and an open a chunk; only a chunk gathered in pieces needs it."""
        read_back = yield self.read_backs(range(10), [19, *range(10, 19)], range(20, 30))
        self.assertEqual(read_back, [1000])  # chunk 1, gathered in two pieces

    @defer.inlineCallbacks
    def test_a_run_across_chunks_is_digested_from_memory_chunk_by_chunk(self):
        # The rest of chunk 0, chunk 1 and half of chunk 2 in one run.
        read_back = yield self.read_backs(range(5), range(5, 25), range(25, 30))
        self.assertEqual(read_back, [])

    @defer.inlineCallbacks
    def test_chunks_that_would_wait_for_a_digest_are_read_back_not_held(self):
        """At most `VERIFY_CONCURRENCY` chunks are held in memory for their digests."""
        self.patch(receiver_module, "VERIFY_CONCURRENCY", 1)  # read when a receiver is made
        read_back = yield self.read_backs(range(30))  # one batch: chunk 0 takes the only digest
        self.assertEqual(read_back, [1000, 2000])

    @defer.inlineCallbacks
    def test_datagrams_of_a_non_file_entry_are_out_of_range(self):
        os.mkdir(os.path.join(self.src, "d"))
        write_file(os.path.join(self.src, "e"), b"")
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        self.assertEqual([e.kind for e in manifest.entries], [DIR, "file"])
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {})
        for index in (0, 1, 2, 2**32 - 1):
            deliver(r, seal(self.key, self.tid, index, 0, b""))
        self.assertEqual(r.stats["range"], 4)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"d": OK, "e": OK})

    @defer.inlineCallbacks
    def test_resume_from_a_part_file(self):
        """Chunks a part file of the same transfer already holds are verified and not asked for."""
        data = self.rng.randbytes(4000)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        os.mkdir(self.dst)
        part = bytearray(data)
        part[1500] ^= 1  # chunk 1 corrupt
        part[3000:4000] = bytes(1000)  # chunk 3 never written
        write_file(os.path.join(self.dst, part_name(self.tid, 0)), bytes(part))
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet([(1, 2), (3, 4)])})
        self.assertEqual(set(decode_map(r.missing().missing)[0]), set(range(10, 20)) | set(range(30, 40)))
        self.feed(r, 0, list(range(10, 20)) + list(range(30, 40)), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_a_survey_that_goes_back_to_a_directory_finds_what_each_holds(self):
        """
        The survey keeps one directory open at a time (`storage._Parent`):
        a manifest that leaves a directory and comes back to it, as no
        scan writes one but a peer may, is surveyed all the same.
        """
        data = {path: self.rng.randbytes(2500) for path in ("a/x", "b/y", "a/z")}
        for path, content in data.items():
            os.makedirs(os.path.dirname(os.path.join(self.src, path)), exist_ok=True)
            write_file(os.path.join(self.src, path), content, mtime_ns=10**18)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        order = ["a", "b", "a/x", "b/y", "a/z"]
        manifest.entries.sort(key=lambda e: order.index(e.path))
        index = {e.path: i for i, e in enumerate(manifest.entries)}
        os.makedirs(os.path.join(self.dst, "a"))
        os.makedirs(os.path.join(self.dst, "b"))
        write_file(os.path.join(self.dst, "a/x"), data["a/x"], mtime_ns=10**18)  # unchanged
        part = bytearray(data["b/y"])
        part[1200] ^= 1  # chunk 1 of the part file is corrupt
        write_file(os.path.join(self.dst, "b", part_name(self.tid, index["b/y"])), bytes(part))
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {index["b/y"]: RangeSet([(1, 2)]), index["a/z"]: RangeSet.interval(0, 3)})
        self.assertEqual(r.results.get("a/x"), OK)

    @defer.inlineCallbacks
    def test_part_file_of_the_wrong_size_is_discarded(self):
        data = self.rng.randbytes(2500)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        os.mkdir(self.dst)
        write_file(os.path.join(self.dst, part_name(self.tid, 0)), data + b"x")
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet.interval(0, 3)})

    @defer.inlineCallbacks
    def test_a_report_before_a_position_names_only_what_lies_before_it(self):
        """A probe in the middle of a pass hears of what was sent, not of every file still to come."""
        for name in ("a", "b", "c"):
            write_file(os.path.join(self.src, name), self.rng.randbytes(1000))
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        r, d = self.start(manifest)
        yield d
        self.assertEqual(sorted(decode_map(r.missing().missing)), [0, 1, 2])
        self.assertEqual(
            decode_map(r.missing(before=(1, 4)).missing),
            {0: RangeSet.interval(0, 10), 1: RangeSet.interval(0, 4)},
        )
        self.assertEqual(decode_map(r.missing(before=(0, 0)).missing), {})

    @defer.inlineCallbacks
    def test_a_part_file_name_planted_as_a_hard_link_is_not_written_through(self):
        """
        A local user who can write the destination plants, at the part
        file's name (the transfer id is on the wire), a hard link to a file
        of theirs choosing, of the right size: the node neither resumes from
        it nor writes into it, and the file arrives whole.
        """
        data = self.rng.randbytes(2500)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        os.mkdir(self.dst)
        victim = os.path.join(self.base, "victim")
        write_file(victim, data)  # the right contents, even: it must not count
        os.link(victim, os.path.join(self.dst, part_name(self.tid, 0)))
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet.interval(0, 3)})
        self.feed(r, 0, range(25), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"f": OK})
        # Resumed from, the planted link would have been renamed into place.
        self.assertEqual(os.stat(victim).st_nlink, 1)
        self.assertNotEqual(os.stat(os.path.join(self.dst, "f")).st_ino, os.stat(victim).st_ino)

    def test_a_part_file_is_made_only_where_no_name_was(self):
        """The name taken between the survey and the first write: the taker's file is not written."""
        os.mkdir(self.dst)
        entry = Entry("f", FILE, 0o644, 0, size=1000)
        victim = os.path.join(self.base, "victim")
        write_file(victim, b"v" * 1000)
        os.link(victim, os.path.join(self.dst, "p"))
        root = os.open(self.dst, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, root)
        fd = storage.open_part(root, entry, "p", create=True)
        os.pwrite(fd, b"x" * 1000, 0)
        os.close(fd)
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"v" * 1000)
        # Reopened later in the transfer, it must still be the node's own.
        os.unlink(os.path.join(self.dst, "p"))
        os.link(victim, os.path.join(self.dst, "p"))
        with self.assertRaisesRegex(OSError, "not this node's"):
            storage.open_part(root, entry, "p", create=False)

    @defer.inlineCallbacks
    def test_a_part_file_of_another_owner_is_not_resumed_from(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root can give a file away")
        data = self.rng.randbytes(2500)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        os.mkdir(self.dst)
        part = os.path.join(self.dst, part_name(self.tid, 0))
        write_file(part, data)
        os.chown(part, 4242, 4242)
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet.interval(0, 3)})
        self.assertFalse(os.path.exists(part) and os.stat(part).st_uid == 4242)

    @defer.inlineCallbacks
    def test_zero_chunks_are_never_asked_for(self):
        data = bytes(2500) + b"tail"
        write_file(os.path.join(self.src, "z"), data)
        write_file(os.path.join(self.src, "zeros"), bytes(3000))
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        r, d = self.start(manifest)
        needs = yield d
        self.assertEqual(needs, {0: RangeSet.interval(2, 3)})
        self.feed(r, 0, range(20, 26), data)
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"z": OK, "zeros": OK})
        for name, content in (("z", data), ("zeros", bytes(3000))):
            with open(os.path.join(self.dst, name), "rb") as f:
                self.assertEqual(f.read(), content)

    @defer.inlineCallbacks
    def test_a_last_chunk_shorter_than_the_others_is_sent_even_if_zeros(self):
        """Only whole chunks are checked for zeros (`storage.zero_chunks`): a small file of zeros is sent."""
        write_file(os.path.join(self.src, "small"), bytes(500))
        write_file(os.path.join(self.src, "tail"), bytes(2500))
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        index = {e.path: i for i, e in enumerate(manifest.entries)}
        r, d = self.start(manifest)
        needs = yield d
        wanted = {index["small"]: RangeSet.interval(0, 1), index["tail"]: RangeSet.interval(2, 3)}
        self.assertEqual(needs, wanted)
        self.feed(r, index["small"], range(5), bytes(500))
        self.feed(r, index["tail"], range(20, 25), bytes(2500))
        yield wait_until(lambda: r.done)
        self.assertEqual(r.results, {"small": OK, "tail": OK})

    @defer.inlineCallbacks
    def test_missing_report_is_bounded(self):
        self.patch(receiver_module, "REPORT_RANGES", 50)
        data = self.rng.randbytes(100 * 400)
        write_file(os.path.join(self.src, "a"), data)
        write_file(os.path.join(self.src, "b"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        r, d = self.start(manifest)
        yield d
        # Every other block of both files: 400 one-block holes.
        self.feed(r, 0, range(0, 400, 2), data)
        self.feed(r, 1, range(0, 400, 2), data)
        report = r.missing()
        self.assertFalse(report.complete)
        got = decode_map(report.missing)
        self.assertEqual(list(got), [0])
        self.assertLessEqual(len(got[0].ranges), 50 + manifest.chunk_blocks)
        self.assertEqual(got[0].ranges, [(b, b + 1) for b in range(1, 400, 2)][: len(got[0].ranges)])
        # Once those are in, the report moves on to what is left.
        self.feed(r, 0, [b for b in range(1, 400, 2)], data)
        got = decode_map(r.missing().missing)
        self.assertNotIn(0, got)
        self.assertEqual(got[1].ranges[0], (1, 2))

    @defer.inlineCallbacks
    def test_sender_gave_up_on_a_file(self):
        data = self.rng.randbytes(3000)
        write_file(os.path.join(self.src, "f"), data)
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=1000)
        os.mkdir(self.dst)
        write_file(os.path.join(self.dst, "f"), b"old")
        r, d = self.start(manifest)
        yield d
        self.feed(r, 0, range(0, 15), data)
        report = r.missing({0: "source changed"})
        self.assertEqual(decode_map(report.missing), {})
        yield wait_until(lambda: r.done)
        self.assertIn("sender gave up", r.results["f"])
        with open(os.path.join(self.dst, "f"), "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(part_files(self.dst), [])

    def numbered(self, r, blocks, data, first_sequence):
        """Feed blocks of file 0 as one pass numbers them: one sequence number each."""
        bs = self.manifest.block_size
        sealed = [
            seal(self.key, self.tid, 0, b, data[b * bs : (b + 1) * bs], first_sequence + n)
            for n, b in enumerate(blocks)
        ]
        deliver(r, *sealed)

    @defer.inlineCallbacks
    def test_a_report_waits_until_the_pass_is_in(self):
        """
        Asked with ``through`` = 30 after datagrams 0 .. 19 were read, the
        report waits for datagram 29 (the last one sent), however long, if
        the limit allows.  A later datagram will do too: those before it
        are lost.
        """
        data = self.rng.randbytes(4000)
        r = yield self.receiving(data)
        self.numbered(r, range(20), data, 0)
        settled = r.settled(30, limit=60)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(settled.called)
        self.numbered(r, range(20, 29), data, 20)  # up to 28: not yet
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(settled.called)
        self.numbered(r, [29], data, 29)
        yield wait_until(lambda: settled.called)
        # Datagrams 30 .. 34 sent, 34 lost: datagram 35 shows it is gone.
        settled = r.settled(35, limit=60)
        self.numbered(r, range(30, 34), data, 30)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(settled.called)
        self.numbered(r, [35], data, 35)
        yield wait_until(lambda: settled.called)
        # Nothing at all: the report goes after the limit.
        settled = r.settled(1000, limit=0.2)
        started = reactor.seconds()
        yield settled
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(set(decode_map(r.missing().missing)[0]), {34, 36, 37, 38, 39})

    @defer.inlineCallbacks
    def test_a_report_with_nothing_to_ask_for_waits_for_verifying(self):
        """
        Every datagram read and the last chunks still being digested: the
        report waits to say ``done`` rather than send the sender asking
        again; once it waits past ``verifying``, it goes, not yet done.
        """
        slow = threading.Event()

        def digest_slowly(held):
            slow.wait(5)
            return manifest_digest(held)

        self.patch(receiver_module, "digest", digest_slowly)
        data = self.rng.randbytes(4000)
        r = yield self.receiving(data)
        blocks = -(-len(data) // self.manifest.block_size)
        self.numbered(r, range(blocks), data, 0)
        early = r.settled(blocks, limit=0.01, verifying=0.1)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(early.called)
        yield wait_until(lambda: early.called)
        self.assertFalse(r.missing().done)
        self.assertEqual(decode_map(r.missing().missing), {})
        settled = r.settled(blocks, limit=0.01, verifying=60)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(settled.called)
        slow.set()
        yield wait_until(lambda: settled.called)
        self.assertTrue(r.missing().done)

    @defer.inlineCallbacks
    def test_a_report_waits_across_the_wrap_of_sequence_numbers(self):
        """Datagrams carry sequence numbers mod 2**32; the master's count goes on past it."""
        data = self.rng.randbytes(4000)
        r = yield self.receiving(data)
        self.numbered(r, range(3), data, (1 << 32) - 6)  # up to 2**32 - 4
        settled = r.settled((1 << 32) + 6, limit=60)  # the last one sent: 2**32 + 5
        self.numbered(r, range(3, 10), data, (1 << 32) - 3)  # up to 2**32 + 3
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(settled.called)
        self.numbered(r, [10], data, (1 << 32) + 5)
        yield wait_until(lambda: settled.called)

    @defer.inlineCallbacks
    def test_a_report_waiting_to_settle_goes_when_the_receiver_closes(self):
        data = self.rng.randbytes(4000)
        r = yield self.receiving(data)
        settled = r.settled(30, limit=60)
        self.assertFalse(settled.called)
        yield r.close()
        self.assertTrue(settled.called)
        self.assertEqual(r._settling, {})
        # Without ``through`` (a probe in a pass), at once.
        self.assertTrue(r.settled(None).called)

    @defer.inlineCallbacks
    def test_a_report_asked_while_the_last_chunk_is_verified_says_done(self):
        """The last block's chunk goes to a thread to be verified; the report waits for it and its commit."""
        data = self.rng.randbytes(3000)
        r = yield self.receiving(data)
        self.numbered(r, range(30), data, 0)
        self.assertFalse(r.done)
        yield r.settled(30, limit=60)
        report = r.missing()
        self.assertTrue(report.done)
        self.assertEqual(decode_map(report.missing), {})
        self.assertEqual(r.results, {"f": OK})


def _full():
    raise OSError(28, "No space left on device")


class PackTests(DirectReceiverCase):
    """
    Small files travel packed (`manifest.Pack`): one stream of blocks, their
    bytes end to end, each file verified by its own digest and placed alone.
    Blocks of 100 bytes and chunks of 4,000: a file of up to 500 bytes is packed.
    """

    @defer.inlineCallbacks
    def packed(self, sizes, in_place=()):
        """
        Files ``f00``, ``f01``, ... of ``sizes`` bytes, those named in
        ``in_place`` already at the destination; a receiver prepared for
        them, its needs, and the one pack's bytes.
        """
        self.data = {}
        for i, size in enumerate(sizes):
            self.data[f"f{i:02d}"] = self.rng.randbytes(size)
            write_file(os.path.join(self.src, f"f{i:02d}"), self.data[f"f{i:02d}"])
        os.mkdir(self.dst)
        for name in in_place:
            shutil.copy2(os.path.join(self.src, name), os.path.join(self.dst, name))
        manifest, _ = scan([self.src + "/"], block_size=100, chunk_size=4000)
        self.assertEqual(len(manifest.packs), 1)
        (self.pack,) = manifest.packs.values()
        self.assertEqual(len(self.pack.members), len(sizes))
        r, d = self.start(manifest)
        needs = yield d
        self.stream = b"".join(self.data[manifest.entries[m].path] for m in self.pack.members)
        return r, needs

    def placed(self, r):
        return {path: result for path, result in r.results.items() if result == OK}

    def assert_received(self, r):
        self.assertEqual(r.results, dict.fromkeys(self.data, OK))
        for name, data in self.data.items():
            with open(os.path.join(self.dst, name), "rb") as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(part_files(self.dst), [])

    @defer.inlineCallbacks
    def test_a_pack_arrives_as_one_stream_and_each_file_is_placed_verified(self):
        sizes = [37, 300, 1, 500, 120, 99, 100, 250]
        r, needs = yield self.packed(sizes)
        blocks = -(-sum(sizes) // 100)
        self.assertEqual(needs, {self.pack.head: RangeSet.interval(0, len(sizes))})  # its members
        self.assertEqual(r.needed_bytes, sum(sizes))
        self.assertEqual(decode_map(r.missing().missing), {self.pack.head: RangeSet.interval(0, blocks)})
        self.feed(r, self.pack.head, range(blocks), self.stream)
        self.assertEqual(r.stats["blocks"], blocks)
        yield wait_until(lambda: r.done)
        self.assert_received(r)
        self.assertEqual(sorted(r.changed), sorted(self.data))

    @defer.inlineCallbacks
    def test_a_file_is_placed_once_the_blocks_that_hold_it_are_in(self):
        """A lost block holds back only the files it holds part of, and is asked for alone."""
        sizes = [150, 150, 150, 150]  # blocks 0-1, 1-2, 3-4, 4-5
        r, _ = yield self.packed(sizes)
        self.feed(r, self.pack.head, [0, 1, 2, 4, 5], self.stream)
        yield wait_until(lambda: len(self.placed(r)) == 3)
        self.assertEqual(set(self.placed(r)), {"f00", "f01", "f03"})
        self.assertEqual(decode_map(r.missing().missing), {self.pack.head: RangeSet.interval(3, 4)})
        self.feed(r, self.pack.head, [3], self.stream)
        yield wait_until(lambda: r.done)
        self.assert_received(r)

    @defer.inlineCallbacks
    def test_parities_repair_a_pack_as_they_do_a_file(self):
        """Blocks a pack lost are rebuilt from parities of its groups, read back from its part file."""
        sizes = [self.rng.randrange(150, 251) for _ in range(15)]
        r, _ = yield self.packed(sizes)
        self.manifest.parity_group = 16
        blocks = -(-sum(sizes) // 100)
        lost = {3, 7, 20}
        self.feed(r, self.pack.head, [b for b in range(blocks) if b not in lost], self.stream)
        self.assertEqual(
            decode_map(r.missing().missing)[self.pack.head], RangeSet([(3, 4), (7, 8), (20, 21)])
        )
        deliver(
            r, self.parity(self.stream, 0, 0, self.pack.head), self.parity(self.stream, 0, 1, self.pack.head)
        )
        deliver(r, self.parity(self.stream, 1, 0, self.pack.head))
        self.assertEqual(r.stats["rebuilt"], 3)
        yield wait_until(lambda: r.done)
        self.assert_received(r)

    @defer.inlineCallbacks
    def test_only_the_blocks_of_files_lacking_are_needed(self):
        """
        Files already in place are not asked for, nor touched: a pack costs a
        changed file its own blocks, and those it shares with its neighbours.
        """
        sizes = [250] * 8
        r, needs = yield self.packed(sizes, in_place=["f00", "f01", "f02", "f04", "f05", "f06", "f07"])
        self.assertEqual(needs, {self.pack.head: RangeSet.interval(3, 4)})  # f03: bytes 750-1000
        self.assertEqual(
            self.manifest.pack_blocks(self.pack.head, needs[self.pack.head]), RangeSet.interval(7, 10)
        )
        self.assertEqual(r.needed_bytes, 250)
        self.feed(r, self.pack.head, range(7, 10), self.stream)
        # Blocks of files in place are duplicates; a file's own index names nothing on the wire.
        self.feed(r, self.pack.head, [0, 15], self.stream)
        index = {e.path: i for i, e in enumerate(self.manifest.entries)}
        deliver(r, seal(self.key, self.tid, index["f01"], 0, self.data["f01"][:100]))
        self.assertEqual((r.stats["duplicate"], r.stats["range"]), (2, 1))
        yield wait_until(lambda: r.done)
        self.assert_received(r)
        self.assertEqual(r.changed, ["f03"])

    @defer.inlineCallbacks
    def test_a_pack_that_fails_while_a_file_of_it_is_being_placed_still_ends(self):
        """A file placed in a thread meanwhile, whose bytes do not match, fails too: the pack ends."""
        sizes = [150, 150, 150, 150]
        r, _ = yield self.packed(sizes)
        bad = bytearray(self.stream)
        bad[10] ^= 1
        self.feed(r, self.pack.head, [0, 1], bytes(bad))  # f00 whole, its batch not yet placed
        self.patch(storage, "pwrite_all", lambda fd, data, offset: _full())
        self.feed(r, self.pack.head, [3], self.stream)  # what is gathered is written out: the disk is full
        yield wait_until(lambda: r.done)
        self.assertEqual(set(r.results.values()), {"cannot write: No space left on device"})
        self.assertEqual(walk_all(self.dst), [])

    @defer.inlineCallbacks
    def test_a_parity_of_a_group_that_holds_files_not_taken_here_rebuilds_nothing(self):
        """
        This host holds no data where the files it does not take lie: a
        parity must solve for those too, so one parity for one lost block is
        kept, not used to rebuild garbage.
        """
        r, needs = yield self.packed([150] * 8, in_place=[f"f{i:02d}" for i in range(8) if i != 3])
        self.manifest.parity_group = 16
        self.feed(r, self.pack.head, [4], self.stream)  # f03 is blocks 4-5: 5 is lost
        deliver(r, self.parity(self.stream, 0, 0, self.pack.head))
        self.assertEqual((r.stats["rebuilt"], r.stats["parity_kept"]), (0, 1))
        self.assertEqual(decode_map(r.missing().missing), {self.pack.head: RangeSet.interval(5, 6)})
        self.feed(r, self.pack.head, [5], self.stream)
        yield wait_until(lambda: r.done)
        self.assert_received(r)
        self.assertEqual(r.stats["corrupt_chunks"], 0)

    @defer.inlineCallbacks
    def test_a_file_whole_when_its_pack_cannot_be_read_back_fails_and_the_pack_ends(self):
        r, _ = yield self.packed([150, 150, 150, 150])
        self.feed(r, self.pack.head, [0], self.stream)
        self.feed(r, self.pack.head, [2], self.stream)  # block 0 written out; block 2 gathered
        real, calls = storage.pwrite_all, []

        def second_fails(fd, data, offset):
            calls.append(offset)
            if len(calls) > 1:
                _full()
            real(fd, data, offset)

        self.patch(storage, "pwrite_all", second_fails)
        self.feed(
            r, self.pack.head, [1], self.stream
        )  # f00 whole, read back: what is gathered cannot be written
        yield wait_until(lambda: r.done)
        self.assertEqual(set(r.results.values()), {"cannot write: No space left on device"})
        self.assertEqual(walk_all(self.dst), [])

    @defer.inlineCallbacks
    def test_a_file_of_a_pack_that_cannot_be_placed_leaves_no_part_file(self):
        def no_metadata(fd, entry, owner):
            raise OSError(5, "Input/output error")

        self.patch(storage, "set_metadata", no_metadata)
        r, _ = yield self.packed([150, 150, 150])
        self.feed(r, self.pack.head, range(5), self.stream)
        yield wait_until(lambda: r.done)
        self.assertEqual(set(r.results.values()), {"cannot write: Input/output error"})
        self.assertEqual(walk_all(self.dst), [])

    @defer.inlineCallbacks
    def test_files_whole_past_the_memory_bound_wait_their_turn_then_are_placed(self):
        """
        Past `UNWRITTEN_BYTES` of small files waiting for their threads, a
        whole member waits where its bytes are (gathered, or written out to
        the pack's part file) until a batch is written.
        """
        self.patch(receiver_module, "UNWRITTEN_BYTES", 300)
        sizes = [250] * 12
        r, _ = yield self.packed(sizes)
        self.feed(r, self.pack.head, range(30), self.stream)
        self.assertTrue(r._held_back)
        yield wait_until(lambda: r.done)
        self.assert_received(r)

    @defer.inlineCallbacks
    def test_a_file_whose_bytes_fail_its_digest_is_asked_again_and_a_second_failure_counts(self):
        """
        A source changed at the sender sends its file's bytes wrong once (the
        next question names it abandoned), so the first failure is asked
        again without counting; a second is forged or corrupted data.
        """
        sizes = [150, 150, 150]
        r, _ = yield self.packed(sizes)
        bad = bytearray(self.stream)
        bad[170] ^= 1  # f01, bytes 150-300: blocks 1-2
        self.feed(r, self.pack.head, range(5), bytes(bad))
        yield wait_until(lambda: set(self.placed(r)) == {"f00", "f02"})
        yield wait_until(lambda: decode_map(r.missing().missing) == {self.pack.head: RangeSet.interval(1, 3)})
        self.assertEqual(r.stats["corrupt_chunks"], 0)
        self.assertFalse(os.path.exists(os.path.join(self.dst, "f01")))
        self.feed(r, self.pack.head, [1, 2], bytes(bad))
        yield wait_until(lambda: r.stats["corrupt_chunks"] == 1)
        yield wait_until(lambda: decode_map(r.missing().missing) == {self.pack.head: RangeSet.interval(1, 3)})
        self.feed(r, self.pack.head, [1, 2], self.stream)
        yield wait_until(lambda: r.done)
        self.assert_received(r)

    @defer.inlineCallbacks
    def test_a_file_the_sender_gave_up_on_fails_alone(self):
        """Its blocks are no longer asked for, but for those it shares with a file still wanted."""
        sizes = [150, 150, 150, 150]  # blocks 0-1, 1-2, 3-4, 4-5
        r, _ = yield self.packed(sizes, in_place=["f03"])
        index = {e.path: i for i, e in enumerate(self.manifest.entries)}
        report = r.missing({index["f01"]: "source changed", index["f02"]: "source changed"})
        self.assertEqual(decode_map(report.missing), {self.pack.head: RangeSet.interval(0, 2)})
        self.assertEqual(r.results["f01"], "sender gave up: source changed")
        self.feed(r, self.pack.head, [0, 1], self.stream)
        yield wait_until(lambda: r.done)
        self.assertEqual(
            r.results,
            {
                "f00": OK,
                "f01": "sender gave up: source changed",
                "f02": "sender gave up: source changed",
                "f03": OK,
            },
        )
        self.assertFalse(os.path.exists(os.path.join(self.dst, "f01")))
        self.assertEqual(part_files(self.dst), [])

    @defer.inlineCallbacks
    def test_datagrams_that_name_a_packed_file_or_lie_past_its_pack_touch_nothing(self):
        sizes = [150, 150, 150]
        r, _ = yield self.packed(sizes)
        index = {e.path: i for i, e in enumerate(self.manifest.entries)}
        deliver(
            r, seal(self.key, self.tid, index["f01"], 0, self.data["f01"][:100])
        )  # not its index on the wire
        deliver(r, seal(self.key, self.tid, self.pack.head, 5, self.stream[:100]))  # the pack has 5 blocks
        deliver(
            r, seal(self.key, self.tid, self.pack.head, 4, self.stream[400:] + b"!")
        )  # its last is 50 bytes
        self.assertEqual((r.stats["range"], r.stats["duplicate"]), (3, 0))
        self.assertEqual(r.stats["blocks"], 0)
        self.assertEqual(walk_all(self.dst), [])
        self.feed(r, self.pack.head, range(5), self.stream)
        yield wait_until(lambda: r.done)
        self.assert_received(r)

    @defer.inlineCallbacks
    def test_a_pack_whose_part_file_cannot_be_written_fails_its_files_not_whole(self):
        """Files already whole are placed; the others fail with the reason, and nothing partial stays."""
        sizes = [150, 150, 150, 150]
        r, _ = yield self.packed(sizes)
        self.feed(r, self.pack.head, [0, 1, 4, 5], self.stream)  # f00 and f03 whole; f01 lacks 2, f02 3
        real = storage.pwrite_all

        self.patch(storage, "pwrite_all", lambda fd, data, offset: _full())
        self.feed(r, self.pack.head, [3], self.stream)  # not next to what is gathered: that is written out
        self.patch(storage, "pwrite_all", real)
        yield wait_until(lambda: r.done)
        self.assertEqual((r.results["f00"], r.results["f03"]), (OK, OK))
        for name in ("f01", "f02"):
            self.assertEqual(r.results[name], "cannot write: No space left on device")
            self.assertFalse(os.path.exists(os.path.join(self.dst, name)))
        self.assertEqual(part_files(self.dst), [])


class ForeignDatagramTests(unittest.TestCase):
    """Datagrams that are not this transfer's are counted and never written."""

    timeout = 60
    N = 20

    def spray(self, sock, channel, offer, rng, n):
        """Send ``n`` datagrams of every unwanted kind; returns how many of each reason."""
        address = channel.address
        manifest = offer.manifest
        index, entry = next((i, e) for i, e in manifest.files() if manifest.blocks(e) > 10)
        bs = manifest.block_size
        ours = datagram.DatagramCipher(offer.transfer_id, offer.key, offer.cipher)
        # another transfer, and this transfer's id under another key
        other = datagram.DatagramCipher(os.urandom(8), os.urandom(32), offer.cipher)
        forger = datagram.DatagramCipher(offer.transfer_id, os.urandom(32), offer.cipher)
        sent = {}

        def send(reason, packet):
            sock.sendto(packet, address)
            sent[reason] = sent.get(reason, 0) + 1

        for _ in range(n):
            block = rng.randrange(manifest.blocks(entry) - 1)
            payload = rng.randbytes(bs)
            good = ours.encode(index, block, payload)
            send("short", rng.randbytes(rng.randrange(0, datagram.OVERHEAD)))
            send("version", bytes([datagram.VERSION + 1]) + good[1:])
            send("kind", good[:1] + b"\x09" + good[2:])
            # another transfer's perfectly valid datagram
            send("foreign", other.encode(index, block, payload))
            # this transfer's id, right place and length, another key
            send("tag", forger.encode(index, block, payload))
            # a valid header with a made-up tag
            send("tag", good[:-16] + os.urandom(16))
            # a valid datagram with one payload bit flipped
            send("tag", good[:-1] + bytes([good[-1] ^ 1]))
            # valid tags (the key holder misbehaving) but out of range
            send("range", ours.encode(len(manifest.entries) + 3, 0, payload))
            send("range", ours.encode(index, 2**32 - 1, payload))
            send("range", ours.encode(index, block, payload + b"x"))
        return sent

    @defer.inlineCallbacks
    def test_foreign_datagrams_are_counted_and_dropped(self):
        src, manifest, local, dests, peers = full_tree_and_peers(self, reactor, 3)
        channel = unique_channel()
        sock = sender_socket(channel)
        self.addCleanup(sock.close)
        rng = random.Random(99)
        burst = {}
        looping = []

        # Once the first receiver has the offer, every receiver's socket has
        # joined (the transfer offers to all before any answer): send a burst
        # that is queued ahead of all data, then keep spraying while data flows.
        first = peers[0]
        real_prepare = first.prepare

        def prepare(offer):
            def joined(needs):
                burst.update(self.spray(sock, channel, offer, rng, self.N))
                lc = task.LoopingCall(self.spray, sock, channel, offer, rng, 1)
                lc.start(0.005)
                looping.append(lc)
                return needs

            return real_prepare(offer).addCallback(joined)

        first.prepare = prepare
        try:
            report = yield run_transfer(self, reactor, manifest, local, peers, channel=channel)
        finally:
            for lc in looping:
                lc.stop()
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        self.assertEqual(burst["short"], self.N)
        for peer, dst in zip(peers, dests, strict=True):
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
            (receiver,) = peer.agent.history
            stats = receiver.stats
            for reason, count in burst.items():
                self.assertGreaterEqual(stats[reason], count, (peer.name, reason, dict(stats)))
            self.assertEqual(stats["corrupt_chunks"], 0)
            # The transfer's own report carries the counters too.
            self.assertGreaterEqual(report.peers[peer.name].stats.get("tag", 0), burst["tag"])
        self.assertGreater(len(looping), 0)


class FinalPathTests(unittest.TestCase):
    """A file at its final path is the old one or the whole new one, never a mix."""

    timeout = 60

    @defer.inlineCallbacks
    def test_old_file_untouched_until_the_new_one_is_renamed(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        rng = random.Random(3)
        new = rng.randbytes(6 << 20)
        write_file(os.path.join(src, "big"), new, 0o644)
        write_file(os.path.join(src, "small"), b"new small", 0o644)
        new_summary = file_digest(os.path.join(src, "big"))
        manifest, local = scan([src + "/"])
        dst = os.path.join(base, "dst")
        os.mkdir(dst)
        old = b"old content " * 1000
        write_file(os.path.join(dst, "big"), old, 0o600)
        write_file(os.path.join(dst, "small"), b"old small", 0o600)
        old_fd = os.open(os.path.join(dst, "big"), os.O_RDONLY)
        self.addCleanup(os.close, old_fd)
        old_stat = os.fstat(old_fd)

        seen = {"old": 0, "new": 0, "parts": set(), "checked_inodes": set()}

        def poll():
            st = os.lstat(os.path.join(dst, "big"))
            if (st.st_dev, st.st_ino) == (old_stat.st_dev, old_stat.st_ino):
                self.assertEqual(st.st_size, len(old))
                self.assertEqual(st.st_mtime_ns, old_stat.st_mtime_ns)
                seen["old"] += 1
            else:
                self.assertTrue(stat.S_ISREG(st.st_mode))
                self.assertEqual(st.st_size, len(new))
                if st.st_ino not in seen["checked_inodes"]:
                    self.assertEqual(file_digest(os.path.join(dst, "big")), new_summary)
                    seen["checked_inodes"].add(st.st_ino)
                seen["new"] += 1
            seen["parts"].update(n for n in os.listdir(dst) if n.startswith(".mrsync-"))

        lc = task.LoopingCall(poll)
        done = lc.start(0.002)
        peers = make_peers(self, reactor, [dst])
        try:
            report = yield run_transfer(self, reactor, manifest, local, peers, rate_bps=100e6)
        finally:
            lc.stop()
        yield done  # re-raises an assertion that failed inside poll
        poll()
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertGreater(seen["old"], 0)
        self.assertGreater(seen["new"], 0)
        self.assertEqual(len(seen["checked_inodes"]), 1)
        # The new data went into a part file beside the destination...
        self.assertTrue(seen["parts"])
        self.assertTrue(all(p.startswith(".mrsync-") and p.endswith(".part") for p in seen["parts"]))
        # ... none of which is left, and the old inode never changed.
        self.assertEqual(part_files(dst), [])
        self.assertEqual(os.pread(old_fd, len(old) + 10, 0), old)
        self.assertEqual(os.fstat(old_fd).st_mtime_ns, old_stat.st_mtime_ns)
        self.assertEqual(os.fstat(old_fd).st_nlink, 0)
        assert_same_tree(self, src, dst)

    @defer.inlineCallbacks
    def test_source_changed_keeps_the_old_file(self):
        """A file the sender abandons fails, and the old one stays in place."""
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        write_file(os.path.join(src, "changing"), random.Random(5).randbytes(3 << 20))
        write_file(os.path.join(src, "steady"), b"steady")
        manifest, local = scan([src + "/"])
        with open(os.path.join(src, "changing"), "r+b") as f:
            f.seek(2 << 20)
            f.write(b"changed after the scan")
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        for dst in dests:
            os.mkdir(dst)
            write_file(os.path.join(dst, "changing"), b"previous version")
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertFalse(report.ok)
        for peer in report.peers.values():
            self.assertFalse(peer.ok)
            self.assertIn("sender gave up", peer.results["changing"])
            self.assertEqual(peer.results["steady"], OK)
        for dst in dests:
            with open(os.path.join(dst, "changing"), "rb") as f:
                self.assertEqual(f.read(), b"previous version")
            self.assertEqual(part_files(dst), [])
            with open(os.path.join(dst, "steady"), "rb") as f:
                self.assertEqual(f.read(), b"steady")

    @defer.inlineCallbacks
    def test_a_path_whose_kind_changed_between_pushes(self):
        """
        A file where the node holds a directory fails alone, with the
        reason, and the directory keeps what it holds; a directory where
        the node holds a file takes its place, as rsync's does.
        """
        base = temp_dir(self)
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        os.mkdir(src)
        write_file(os.path.join(src, "was-a-directory"), b"now a file")  # placed whole
        write_file(os.path.join(src, "big-was-a-directory"), random.Random(9).randbytes(3 << 20))
        os.mkdir(os.path.join(src, "was-a-file"))
        write_file(os.path.join(src, "was-a-file", "x"), b"x")
        write_file(os.path.join(src, "steady"), b"steady")
        os.mkdir(dst)
        for name in ("was-a-directory", "big-was-a-directory"):
            os.mkdir(os.path.join(dst, name))
            write_file(os.path.join(dst, name, "kept"), b"kept")
        write_file(os.path.join(dst, "was-a-file"), b"old file")
        manifest, local = scan([src + "/"])
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [dst]))
        results = report.peers["node0"].results
        self.assertRegex(results["was-a-directory"], r"^cannot write: Is a directory")
        self.assertRegex(results["big-was-a-directory"], r"^cannot commit: .*Is a directory")
        self.assertEqual(
            {path: results[path] for path in ("was-a-file", "was-a-file/x", "steady")},
            {"was-a-file": OK, "was-a-file/x": OK, "steady": OK},
        )
        for name in ("was-a-directory", "big-was-a-directory"):
            with open(os.path.join(dst, name, "kept"), "rb") as f:
                self.assertEqual(f.read(), b"kept")
        with open(os.path.join(dst, "was-a-file", "x"), "rb") as f:
            self.assertEqual(f.read(), b"x")
        self.assertEqual(part_files(dst), [])


class OldCopyTests(unittest.TestCase):
    """What the destination already holds is used, and still never changed in place."""

    timeout = 60

    @defer.inlineCallbacks
    def test_matching_chunks_of_the_old_copy_are_not_sent(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        rng = random.Random(11)
        data = bytearray(rng.randbytes(5 << 20))
        dests = [os.path.join(base, f"dst{i}") for i in range(2)]
        for dst in dests:
            os.mkdir(dst)
            write_file(os.path.join(dst, "image"), bytes(data), 0o600, 1_000_000_000_000_000_000)
        data[(2 << 20) + 5] ^= 0xFF  # one byte of chunk 2 changed
        write_file(os.path.join(src, "image"), bytes(data) + b"appended", 0o644)
        manifest, local = scan([src + "/"])
        old_fds = []
        for dst in dests:
            fd = os.open(os.path.join(dst, "image"), os.O_RDONLY)
            self.addCleanup(os.close, fd)
            old_fds.append(fd)
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, dests))
        self.assertTrue(report.ok, {n: p.reason for n, p in report.peers.items()})
        # Chunk 2 and the last chunk (which grew) crossed the network, not 5 MiB.
        self.assertLessEqual(report.sender_stats["payload"], 2 * manifest.chunk_size + 8)
        self.assertGreater(report.sender_stats["payload"], manifest.chunk_size)
        for dst, fd in zip(dests, old_fds, strict=True):
            assert_same_tree(self, src, dst)
            self.assertEqual(part_files(dst), [])
            old = bytearray(data)
            old[(2 << 20) + 5] ^= 0xFF
            self.assertEqual(os.pread(fd, 6 << 20, 0), bytes(old))

    @defer.inlineCallbacks
    def test_same_size_and_mtime_is_not_sent_but_gets_its_mode(self):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        dst = os.path.join(base, "dst")
        os.mkdir(src)
        os.mkdir(dst)
        content = random.Random(12).randbytes(100_000)
        write_file(os.path.join(src, "f"), content, 0o640, 1_234_567_890_123_456_789)
        write_file(os.path.join(dst, "f"), content, 0o600, 1_234_567_890_123_456_789)
        manifest, local = scan([src + "/"])
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [dst]))
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertEqual(report.sender_stats.get("payload", 0), 0)
        assert_same_tree(self, src, dst)


class SymlinkEscapeTests(unittest.TestCase):
    """Nothing is ever written through a symlink out of the destination."""

    timeout = 60

    def setUp(self):
        self.base = temp_dir(self)
        self.src = os.path.join(self.base, "src")
        self.outside = os.path.join(self.base, "elsewhere")
        os.makedirs(os.path.join(self.src, "a", "b"))
        os.makedirs(os.path.join(self.outside, "b"))
        write_file(os.path.join(self.src, "a", "b", "file"), b"must not escape")
        write_file(os.path.join(self.src, "ok.txt"), b"fine")
        os.link(os.path.join(self.src, "ok.txt"), os.path.join(self.src, "a", "h"))
        os.symlink("whatever", os.path.join(self.src, "a", "s"))
        write_file(os.path.join(self.outside, "victim"), b"victim")
        self.outside_before = {
            p: os.lstat(os.path.join(self.outside, p)).st_mtime_ns for p in walk_all(self.outside)
        }
        self.dst = os.path.join(self.base, "dst")
        os.mkdir(self.dst)

    def assert_outside_untouched(self):
        self.assertEqual(
            {p: os.lstat(os.path.join(self.outside, p)).st_mtime_ns for p in walk_all(self.outside)},
            self.outside_before,
        )
        with open(os.path.join(self.outside, "victim"), "rb") as f:
            self.assertEqual(f.read(), b"victim")

    @defer.inlineCallbacks
    def test_parent_symlink_to_outside_is_refused(self):
        os.symlink(self.outside, os.path.join(self.dst, "a"))
        manifest, local = scan([self.src + "/"])
        # A manifest that names a/b/file without the directories a and a/b,
        # so the receiver meets the symlink in the destination as it is.
        manifest, local = without(manifest, local, {"a", "a/b"})
        self.assertEqual(sorted(e.path for e in manifest.entries), ["a/b/file", "a/h", "a/s", "ok.txt"])
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [self.dst]))
        peer = report.peers["node0"]
        self.assertFalse(peer.ok)
        self.assertTrue(peer.results["a/b/file"].startswith("cannot prepare"), peer.results)
        self.assertTrue(peer.results["a/h"].startswith("cannot link"), peer.results)
        self.assertTrue(peer.results["a/s"].startswith("cannot link"), peer.results)
        self.assertEqual(peer.results["ok.txt"], OK)
        self.assert_outside_untouched()
        self.assertEqual(os.readlink(os.path.join(self.dst, "a")), self.outside)
        self.assertEqual(walk_all(self.dst), ["a", "ok.txt"])

    @defer.inlineCallbacks
    def test_symlink_in_the_way_of_a_directory_is_replaced(self):
        os.symlink(self.outside, os.path.join(self.dst, "a"))
        manifest, local = scan([self.src + "/"])
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [self.dst]))
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertTrue(stat.S_ISDIR(os.lstat(os.path.join(self.dst, "a")).st_mode))
        assert_same_tree(self, self.src, self.dst)
        self.assert_outside_untouched()

    @defer.inlineCallbacks
    def test_final_name_that_is_a_symlink_to_outside_is_replaced(self):
        os.symlink(os.path.join(self.outside, "victim"), os.path.join(self.dst, "ok.txt"))
        manifest, local = scan([self.src + "/"])
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [self.dst]))
        self.assertTrue(report.ok, report.peers["node0"].reason)
        self.assertFalse(os.path.islink(os.path.join(self.dst, "ok.txt")))
        assert_same_tree(self, self.src, self.dst)
        self.assert_outside_untouched()

    @defer.inlineCallbacks
    def test_manifest_symlink_then_entries_beneath_it(self):
        """A hostile manifest: symlink ``a`` to outside, then files under ``a/``."""
        write_file(os.path.join(self.base, "x"), b"x")
        manifest, local = scan([self.src + "/"])
        manifest, local = without(manifest, local, {"a", "a/b"})
        evil = scan([os.path.join(self.base, "x")])[0].entries[0]
        evil.path, evil.kind, evil.target, evil.size, evil.digests = "a", "symlink", self.outside, 0, b""
        manifest.entries.insert(0, evil)
        local = {i + 1: p for i, p in local.items()}
        report = yield run_transfer(self, reactor, manifest, local, make_peers(self, reactor, [self.dst]))
        peer = report.peers["node0"]
        self.assertFalse(peer.ok)
        self.assertNotEqual(peer.results["a"], OK)
        self.assert_outside_untouched()
        # Whatever did land, landed inside the destination.
        self.assertFalse(os.path.islink(os.path.join(self.dst, "a")))


class FeedbackTests(unittest.TestCase):
    """
    What a receiver tells the sender's rate controller, from real datagrams
    on a real socket: a network queue and a reader short of CPU are told
    apart.
    """

    timeout = 30

    @defer.inlineCallbacks
    def start(self, rcvbuf, name=None):
        base = temp_dir(self)
        src = os.path.join(base, "src")
        os.mkdir(src)
        self.data = random.Random(3).randbytes(1000 * 1400)
        write_file(os.path.join(src, "f"), self.data)
        self.manifest, _ = scan([src + "/"], block_size=1400)
        self.tid, self.key = os.urandom(8), os.urandom(32)
        channel = unique_channel()
        r = Receiver(reactor, os.path.join(base, "dst"), channel, rcvbuf=rcvbuf, name=name)
        self.addCleanup(r.close)
        self.reports = []
        r.on_feedback = self.reports.append
        yield r.prepare(self.tid, self.key, self.manifest)
        self.out = sender_socket(channel)
        self.addCleanup(self.out.close)
        self.out.connect(channel.address)
        # Time-stamping is turned on for the host a moment after it is asked for.
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.sequence = 0
        return r

    def send(self, blocks, sent_at=None):
        for b in blocks:
            sent_us = int((time.time() if sent_at is None else sent_at) * 1e6)
            payload = self.data[b * 1400 : (b + 1) * 1400]
            self.out.send(seal(self.key, self.tid, 0, b, payload, self.sequence, sent_us))
            self.sequence += 1

    def echo(self, payload):
        self.out.send(
            seal(
                self.key,
                self.tid,
                datagram.ECHO_FILE,
                0,
                payload,
                self.sequence,
                int(time.time() * 1e6),
                datagram.KIND_ECHO,
            )
        )
        self.sequence += 1

    @defer.inlineCallbacks
    def queued(self, seconds, echo=None):
        """
        Datagrams that spent 30 ms in a queue on the way, for ``seconds``,
        with the sender's ``echo`` every 0.05 s if one is given.
        """
        block = 16
        for _ in range(round(seconds / 0.05)):
            if echo is not None:
                self.echo(echo.pack())
            self.send(range(block, block + 8), sent_at=time.time() - 0.03)
            block += 8
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_a_queue_that_is_no_news_is_reported_only_when_the_echo_is_stale(self):
        """The sender echoes a monitor elsewhere with the same queue and asks for no sample."""
        r = yield self.start(rcvbuf=4 << 20, name="node1")
        self.send(range(16))  # the base delay
        yield task.deferLater(reactor, 0.15, lambda: None)
        yield self.queued(0.6, echo=Echo(node_id("node2"), 0.03, 0.0))
        self.assertEqual(self.reports, [])
        self.assertEqual(r.stats[datagram.Reason.RANGE.value], 0)
        yield self.queued(0.6)  # the echoes stop
        self.assertGreater(len(self.reports), 0)
        self.assertTrue(0.02 < self.reports[0].delay < 0.04, self.reports)

    @defer.inlineCallbacks
    def test_the_monitor_reports_whatever_the_share_and_news_at_twice_it(self):
        r = yield self.start(rcvbuf=4 << 20, name="node1")
        r.random.random = lambda: 0.7  # every draw: above a share of 0.5, below twice it
        self.send(range(16))
        yield task.deferLater(reactor, 0.15, lambda: None)
        yield self.queued(0.4, echo=Echo(node_id("node1"), 0.03, 0.0))
        named = len(self.reports)
        self.assertGreater(named, 0)
        yield self.queued(0.4, echo=Echo(node_id("node2"), 0.03, 0.5))
        self.assertEqual(len(self.reports), named, "30 ms against an echoed 30 ms is no news")
        yield self.queued(0.4, echo=Echo(node_id("node2"), 0.01, 0.5))
        self.assertGreater(len(self.reports), named, "30 ms against an echoed 10 ms is news")

    @defer.inlineCallbacks
    def test_an_echo_older_than_the_newest_datagram_is_ignored(self):
        """An echo replayed by someone on the LAN (its tag is good) keeps nobody quiet."""
        r = yield self.start(rcvbuf=4 << 20, name="node1")
        self.send(range(16))
        yield task.deferLater(reactor, 0.15, lambda: None)
        for _ in range(8):
            newest, self.sequence = self.sequence, 3  # numbered as one long gone
            self.echo(Echo(node_id("node2"), 0.03, 0.0).pack())
            self.sequence = newest
            self.send(range(16, 24), sent_at=time.time() - 0.03)
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertGreater(len(self.reports), 0)
        self.assertEqual(r.stats[datagram.Reason.RANGE.value], 0)

    @defer.inlineCallbacks
    def test_a_lost_echo_between_passes_is_not_heavy_loss(self):
        """Between passes only echoes come, one an interval: one of two lost is too few to judge."""
        yield self.start(rcvbuf=4 << 20, name="node1")
        self.send(range(16))
        yield task.deferLater(reactor, 0.15, lambda: None)
        for _ in range(8):
            self.sequence += 1  # this one was lost
            self.echo(Echo(node_id("node2"), 0.0, 1.0).pack())
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.reports, [])

    @defer.inlineCallbacks
    def test_an_echo_naming_a_file_is_not_data(self):
        """Only the key's holder can send one, but an ECHO is never written as a block."""
        r = yield self.start(rcvbuf=4 << 20, name="node1")
        self.out.send(seal(self.key, self.tid, 0, 0, self.data[:1400], 0, 0, datagram.KIND_ECHO))
        yield wait_until(lambda: r.stats[datagram.Reason.RANGE.value], timeout=2)
        self.assertEqual(r.stats["blocks"], 0)

    @defer.inlineCallbacks
    def test_a_malformed_echo_is_counted_and_ignored(self):
        r = yield self.start(rcvbuf=4 << 20, name="node1")
        self.send(range(16))
        yield task.deferLater(reactor, 0.15, lambda: None)
        self.echo(b"short")
        yield self.queued(0.4)
        self.assertEqual(r.stats[datagram.Reason.RANGE.value], 1)
        self.assertGreater(len(self.reports), 0)

    @defer.inlineCallbacks
    def test_a_reader_that_falls_behind_reports_its_buffer_not_a_network_queue(self):
        r = yield self.start(rcvbuf=64 << 10)
        self.send(range(8))  # the base delay
        yield task.deferLater(reactor, 0.15, lambda: None)
        # The reactor does not read while this runs: datagrams wait in the
        # socket buffer for 60 ms, and most do not fit.
        self.send(range(8, 400))
        time.sleep(0.06)
        yield wait_until(lambda: self.reports, timeout=2)
        report = self.reports[0]
        self.assertEqual(report.backlog, 1.0)
        # Read only after 60 ms, but the kernel took them at once.
        self.assertLess(report.delay, 0.01)
        self.assertLess(r.stats["blocks"], 390)

    @defer.inlineCallbacks
    def test_a_queue_on_the_way_shows_as_delay(self):
        """Datagrams that left the sender 30 ms before they arrived (as if queued)."""
        yield self.start(rcvbuf=4 << 20)
        self.send(range(16))
        yield task.deferLater(reactor, 0.15, lambda: None)
        self.send(range(16, 80), sent_at=time.time() - 0.03)
        yield wait_until(lambda: self.reports, timeout=2)
        report = self.reports[0]
        self.assertTrue(0.02 < report.delay < 0.04, report)
        self.assertEqual(report.loss, 0.0)
        self.assertLess(report.backlog, 0.25)

    @defer.inlineCallbacks
    def test_a_receiver_that_keeps_up_stays_silent(self):
        r = yield self.start(rcvbuf=4 << 20)
        for first in range(0, 400, 40):
            self.send(range(first, first + 40))
            yield task.deferLater(reactor, 0.03, lambda: None)
        yield task.deferLater(reactor, 0.25, lambda: None)
        self.assertEqual(r.stats["blocks"], 400)
        self.assertEqual(self.reports, [])


#: Where the package documents the drop-in for nodes that set owners.
#: The drop-in the package ships for nodes that set owners, and the
#: documents that tell an administrator to install it.
OWNER_DROP_IN = "etc/systemd/preserve-owner.conf"
OWNER_DROP_IN_DOCS = ("debian/README.Debian", "man/mrsyncd.8", "docs/OPERATIONS.md")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def drop_in_capabilities(path: str, key: str) -> list[str]:
    """The capabilities a drop-in's ``key`` (``AmbientCapabilities=``, ...) names."""
    with open(os.path.join(REPOSITORY, path)) as f:
        for line in f:
            if line.startswith(key):
                return line.partition("=")[2].split()
    raise AssertionError(f"{path} gives no {key}")


class OwnerDropInTests(unittest.TestCase):
    """
    A node that sets owners runs as its own user with only the
    capabilities the shipped drop-in grants: those must be enough to set
    what a manifest holds, set-id bits included, for any owner and group.
    """

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root, to become another user with capabilities as systemd does")
        if shutil.which("setpriv") is None:
            raise unittest.SkipTest("needs setpriv (util-linux)")

    def test_the_drop_in_is_what_the_documents_install(self):
        for doc in OWNER_DROP_IN_DOCS:
            with open(os.path.join(REPOSITORY, doc)) as f:
                text = f.read().replace("\\-", "-")
            self.assertIn("/usr/share/doc/mrsyncd/examples/preserve-owner.conf", text, doc)
            self.assertNotIn("User=root\nGroup=root\nCapabilityBoundingSet", text, doc)

    def test_the_drop_in_sets_owners_and_set_id_bits_for_a_group_the_node_is_not_in(self):
        ambient = drop_in_capabilities(OWNER_DROP_IN, "AmbientCapabilities=")
        self.assertEqual(ambient, drop_in_capabilities(OWNER_DROP_IN, "CapabilityBoundingSet="))
        granted = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in ambient)])
        path = os.path.join(temp_dir(self), "tool")
        write_file(path, b"#!/bin/sh\n")
        # The receiver's own metadata step, in a process that has what
        # systemd gives the unit's user with that drop-in: no supplementary
        # groups, and only the drop-in's capabilities.
        script = (
            "import os, sys\n"
            "from mrsyncd.engine import fsutil\n"
            "from mrsyncd.wire.manifest import FILE, Entry\n"
            "from mrsyncd.engine.storage import set_metadata\n"
            "assert os.geteuid() == 65534 and fsutil.may_set_owners()\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "set_metadata(fd, Entry('tool', FILE, 0o6755, 10**18, uid=4242, gid=4242), True)\n"
        )
        subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            + [f"--inh-caps={granted}", f"--ambient-caps={granted}", f"--bounding-set={granted}", "--"]
            + [sys.executable, "-c", script, path],
            check=True,
            env={**os.environ, "PYTHONPATH": REPOSITORY, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        st = os.stat(path)
        self.assertEqual((st.st_uid, st.st_gid), (4242, 4242))
        self.assertEqual(oct(stat.S_IMODE(st.st_mode)), oct(0o6755))
