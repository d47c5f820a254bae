"""
Shared helpers of the test suite: trees, channels, tree comparison, and
in-process transfers over real loopback multicast sockets.

Every channel is an IPv4 group in 239.0.0.0/8 on interface ``lo`` with a
port of its own, so nothing leaves the machine and tests do not hear each
other.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer, reactor, task

from mrsyncd.engine import intake
from mrsyncd.engine.agent import LocalPeer, ReceiverAgent
from mrsyncd.engine.ledger import NEEDED
from mrsyncd.engine.multicast import Channel
from mrsyncd.engine.receiver import Receiver
from mrsyncd.engine.transfer import Transfer, new_offer

# The lab's tree comparisons, which the in-process tests use too.
from mrsyncd.testing.trees import (  # noqa: F401
    assert_same_tree,
    file_digest,
    part_files,
    sparse_digest,
    tree_entries,
)
from mrsyncd.wire import datagram
from mrsyncd.wire.manifest import Manifest, scan

#: Fast enough that every transfer here takes well under a second on lo.
RATE = 200e6

_used: set[tuple[str, int]] = set()


def temp_dir(testcase, prefix: str = "mrsyncd-test-") -> str:
    """A fresh directory under the system temp dir, removed after the test."""
    path = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def unique_channel() -> Channel:
    """
    A group in 239.0.0.0/8 and a free port below the ephemeral range (so that
    no sender's ephemeral socket can take it), on interface ``lo``.
    """
    rng = random.SystemRandom()
    while True:
        group = f"239.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.{rng.randrange(1, 255)}"
        port = rng.randrange(20000, 32000)
        if (group, port) in _used:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _used.add((group, port))
        return Channel(group, port, "lo")


def seal(key: bytes, tid: bytes, *fields: Any, cipher: str = datagram.AES_256_GCM, **named: Any) -> bytes:
    """One datagram as a run's sender with this key seals it (`datagram.DatagramCipher.encode`)."""
    return datagram.DatagramCipher(tid, key, cipher).encode(*fields, **named)


def deliver(receiver: Receiver, *datagrams: bytes) -> None:
    """Hand datagrams to a receiver as its intake does: opened and gathered into one batch."""
    size = receiver._manifest.block_size
    out = intake.buffer_for(size, max(1, len(datagrams)))
    batch = intake.assemble(receiver._cipher, [(d, None) for d in datagrams], out, size)
    receiver.received(batch, memoryview(out))
    # The receiver's tally of wanted chunks is kept as they change: it must
    # be what its files' books say.
    awaiting = receiver._awaiting.values()
    assert receiver._needed_chunks == sum(f.ledger.status.count(NEEDED) for f in awaiting)


def write_file(path: str, data: bytes, mode: int | None = None, mtime_ns: int | None = None) -> None:
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def make_full_tree(root: str, outside_target: str = "/nonexistent/outside/target") -> None:
    """
    A tree with every kind of entry: an empty file, a small file, a file of
    several chunks (with a short last block), a directory, a nested
    directory, a symlink pointing out of the tree, a relative symlink, a
    hardlink, and unusual modes and mtimes.
    """
    rng = random.Random(1234)
    os.makedirs(os.path.join(root, "dir", "nested", "deeper"))
    os.makedirs(os.path.join(root, "emptydir"))
    write_file(os.path.join(root, "empty"), b"", 0o600, 1_000_000_000_123_456_789)
    write_file(os.path.join(root, "small.txt"), b"hello, multicast\n", 0o644, 1_200_000_000_000_000_001)
    # 3.3 MiB: four chunks of the default 1 MiB chunk size; not a whole
    # number of blocks.
    write_file(
        os.path.join(root, "dir", "multi.bin"),
        rng.randbytes(3 * (1 << 20) + 333_333),
        0o751,
        1_500_000_000_987_654_321,
    )
    write_file(
        os.path.join(root, "dir", "nested", "deeper", "leaf"),
        b"leaf" * 1000,
        0o640,
        1_600_000_000_000_000_000,
    )
    write_file(os.path.join(root, "dir", "nested", "blocksize"), rng.randbytes(1408 * 3), 0o400)
    os.link(os.path.join(root, "dir", "multi.bin"), os.path.join(root, "hardlink.bin"))
    os.symlink(outside_target, os.path.join(root, "dir", "outside-link"))
    os.symlink("../small.txt", os.path.join(root, "dir", "relative-link"))
    os.utime(
        os.path.join(root, "dir", "outside-link"), ns=(1_300_000_000_000_000_007,) * 2, follow_symlinks=False
    )
    os.chmod(os.path.join(root, "dir", "nested"), 0o750)
    os.chmod(os.path.join(root, "emptydir"), 0o700)
    # Directories last, since making entries changes their mtimes.
    for d, t in (
        ("dir/nested/deeper", 1_100_000_000_000_000_011),
        ("dir/nested", 1_100_000_000_000_000_012),
        ("dir", 1_100_000_000_000_000_013),
        ("emptydir", 1_100_000_000_000_000_014),
    ):
        os.utime(os.path.join(root, d), ns=(t, t))


class RecordingAgent(ReceiverAgent):
    """A `ReceiverAgent` that remembers its receivers after the transfer ends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history = []

    def prepare(self, offer):
        d = super().prepare(offer)
        receiver = self.receivers.get(offer.transfer_id)
        if receiver is not None:
            self.history.append(receiver)
        return d


def make_peers(testcase, reactor, destinations, names=None):
    """One `LocalPeer` per destination, each with its own agent, closed after the test."""
    peers = []
    for i, destination in enumerate(destinations):
        agent = RecordingAgent(reactor, interface="lo", destination_root=destination)
        testcase.addCleanup(agent.close)
        peers.append(LocalPeer(names[i] if names else f"node{i}", agent))
    return peers


def full_tree_and_peers(testcase, reactor, receivers: int):
    """`make_full_tree` scanned, and a `LocalPeer` (`make_peers`) for each of ``receivers`` destinations."""
    base = temp_dir(testcase)
    src = os.path.join(base, "src")
    make_full_tree(src)
    manifest, local = scan([src + "/"])
    dests = [os.path.join(base, f"dst{i}") for i in range(receivers)]
    return src, manifest, local, dests, make_peers(testcase, reactor, dests)


@defer.inlineCallbacks
def run_transfer(testcase, reactor, manifest: Manifest, local_paths, peers, channel=None, **kwargs):
    """Run one transfer into ``/`` of every peer's destination root."""
    channel = channel or unique_channel()
    offer = new_offer(manifest, channel, "/")
    kwargs.setdefault("rate_bps", RATE)
    kwargs.setdefault("grace", 5.0)
    kwargs.setdefault("call_timeout", 2.0)
    transfer = Transfer(reactor, offer, local_paths, peers, **kwargs)
    report = yield transfer.run()
    return report


@defer.inlineCallbacks
def wait_until(predicate, timeout=10.0, step=0.01):
    """Wait on the running reactor until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        yield task.deferLater(reactor, step, lambda: None)


def unit_settings(unit: str | os.PathLike[str]) -> dict[str, str]:
    """A systemd unit file's settings, the last of each name (sections and comments left out)."""
    settings: dict[str, str] = {}
    with open(unit) as f:
        for line in f:
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                settings[key.strip()] = value.strip()
    return settings
