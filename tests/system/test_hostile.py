"""
Hostile input, against real daemons (mrsyncd/testing/cluster.py): datagrams sprayed at
a job's group and port, malformed and oversized AMP boxes from peers that
hold a cluster certificate, commands a certificate's role does not allow,
job requests and manifests that try to leave the destination, and a
destination directory swapped for a symlink while a job writes into it.

What must hold in every case: files arrive correct or are reported failed
with a reason, nothing is written outside the destination, no daemon
crashes, no job hangs, and the master goes on serving other jobs.

Covered elsewhere and not repeated here: TLS clients with no certificate, a
foreign CA's or an expired one (tests/system/test_daemon.py
``test_master_refuses_clients_without_a_cluster_certificate`` and
tests/integration/test_tls.py), a node certificate running the ``mrsync`` CLI and an
operator certificate registering as a node (tests/system/test_daemon.py), the
receiver's own checks in one process (tests/integration/test_receiver.py), and a
foreign host spraying a LAN with ``mrsync-engine`` (tests/system/test_lan.py).

The daemon tests need root (mount namespaces), hence the ``lan`` mark;
the `BoundedAMP` tests at the top run anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from mrsyncd.control import boxes
from mrsyncd.control.boxes import MAX_BOX_BYTES, MAX_BOX_KEYS, MAX_PIECES, PIECE
from mrsyncd.control.commands import MAX_MESSAGE_BYTES, PROTOCOL, BigBytes, BoundedAMP
from mrsyncd.engine.multicast import Channel, receiver_socket
from mrsyncd.testing.cluster import (
    REPO,
    AmpClient,
    Cluster,
    FinalPaths,
    can_unshare,
    content,
    free_tcp_port,
    operator_fleet,
    random_file,
    same_tree,
    time_limit,
    wait_for,
)
from mrsyncd.wire import datagram
from mrsyncd.wire.manifest import FILE, HARDLINK, SYMLINK, Entry, Manifest, digest, scan
from tests import support

MiB = 1 << 20
JOB_TIMEOUT = 90.0


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    with time_limit(180):
        yield


# The bound on AMP boxes, in one process.


class Take(amp.Command):
    arguments = [(b"blob", BigBytes()), (b"n", amp.Integer())]
    response = [(b"length", amp.Integer())]


class Taker(BoundedAMP):
    @Take.responder
    def take(self, blob: bytes, n: int) -> dict[str, Any]:
        return {"length": len(blob)}


def _feed(
    data: bytes, piece: int = 1 << 16, max_box_bytes: int | None = None
) -> tuple[Taker, StringTransport]:
    proto = Taker()
    if max_box_bytes is not None:
        proto.max_box_bytes = max_box_bytes
    transport = StringTransport()
    proto.makeConnection(transport)
    for i in range(0, len(data), piece):
        proto.dataReceived(data[i : i + piece])
    return proto, transport


def _answers(transport: StringTransport) -> list[dict[bytes, bytes]]:
    parsed = amp._parseBoxes(transport.value()) if hasattr(amp, "_parseBoxes") else None
    if parsed is not None:
        return list(parsed)
    boxes, box, data = [], {}, transport.value()
    while data:
        n = int.from_bytes(data[:2], "big")
        if not n:
            boxes.append(box)
            box, data = {}, data[2:]
            continue
        key, data = data[2 : 2 + n], data[2 + n :]
        m = int.from_bytes(data[:2], "big")
        box[key], data = data[2 : 2 + m], data[2 + m :]
    return boxes


def test_bounded_amp_takes_the_largest_legitimate_box() -> None:
    """
    A `BigBytes` of `MAX_PIECES` full pieces (256 MiB) and other arguments
    goes through a connection whose bound is raised to its most; by
    default (``max_message_bytes``, 64 MiB) it is dropped, and one just
    under that goes through.
    """
    piece = bytes(PIECE)
    blob = [(b"blob" if i == 0 else b"blob.%d" % i, piece) for i in range(MAX_PIECES)]
    data = boxes.encode([(b"_ask", b"1"), (b"_command", b"Take"), *blob, (b"n", b"7")])
    assert len(data) < MAX_BOX_BYTES
    proto, transport = _feed(data, max_box_bytes=MAX_BOX_BYTES)
    assert not transport.disconnecting
    assert _answers(transport) == [{b"_answer": b"1", b"length": b"%d" % (MAX_PIECES * PIECE)}]
    proto, transport = _feed(data)
    assert proto._dropped and transport.value() == b""
    pieces = MAX_MESSAGE_BYTES // (PIECE + 12) - 1
    fits = boxes.encode([(b"_ask", b"1"), (b"_command", b"Take"), *blob[:pieces], (b"n", b"7")])
    proto, transport = _feed(fits)
    assert _answers(transport) == [{b"_answer": b"1", b"length": b"%d" % (pieces * PIECE)}]


def test_bounded_amp_drops_a_box_with_too_many_keys() -> None:
    keys = [(b"k%d" % i, b"v") for i in range(MAX_BOX_KEYS + 1)]
    proto, transport = _feed(boxes.encode([(b"_ask", b"1"), (b"_command", b"Take"), *keys]))
    assert transport.disconnecting or transport.disconnected
    assert transport.value() == b"", "a box over the limit was answered"
    assert proto._currentBox is None, "the box over the limit is still held"


def test_bounded_amp_drops_a_box_with_too_many_bytes() -> None:
    value = bytes(PIECE)
    count = MAX_MESSAGE_BYTES // (PIECE + 8) + 2
    assert count < MAX_BOX_KEYS, "this box must trip the byte bound, not the key bound"
    head = boxes.encode([(b"_ask", b"1"), (b"_command", b"Take")])[:-2]
    proto = Taker()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(head)
    for i in range(count):
        proto.dataReceived(b"\x00\x04" + b"%04d" % (i % 10000) + b"\xff\xff" + value)
        if proto._dropped:
            break
    assert proto._dropped and (transport.disconnecting or transport.disconnected)
    assert i * (PIECE + 8) <= MAX_MESSAGE_BYTES + PIECE + 8
    proto.dataReceived(b"\x00\x04more\xff\xff" + value)  # whatever follows is ignored
    assert proto._currentBox is None and transport.value() == b""


# A master and two nodes on loopback, each node in a mount namespace of its
# own, writing only beneath shared/pub.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not can_unshare():
        pytest.skip("several nodes on one host need root (mount namespaces)")
    c = Cluster(tmp_path_factory.mktemp("hostile"))
    try:
        c.start_master()
        for name in ("node1", "node2"):
            (c.node_dir(name) / "pub").mkdir(parents=True)
            c.add_node(name, roots=[c.shared / "pub"], wait=False)
        for name in ("node1", "node2"):
            c.wait_registered(name, 0)
        (c.base / "outside").mkdir()
        yield c
    finally:
        c.close()


@pytest.fixture
def fleet(cluster: Cluster) -> Iterator[tuple[Cluster, AmpClient]]:
    """Everything up and connected, and an operator's connection to the master."""
    with operator_fleet(cluster) as client:
        yield cluster, client
    assert list((cluster.base / "outside").iterdir()) == [], "something was written outside"


def spec(src: Path | str, targets: str, destination: Path | str, **options: Any) -> dict[str, Any]:
    return {"sources": [f"{src}/"], "destination": str(destination), "targets": targets, **options}


def serves(c: Cluster, client: AmpClient, label: str) -> None:
    """The master still runs a job to every node, and it arrives."""
    src = c.base / f"check-{label}"
    random_file(src / "f.bin", 100_000, len(label))
    status = client.wait_job(client.submit(spec(src, "node1,node2", c.shared / "pub" / label)), JOB_TIMEOUT)
    assert status["state"] == "done", f"{status}\n{c.diagnostics()}"
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / label)


def wait_sent(client: AmpClient, job: int, at_least: int, timeout: float = 30.0) -> None:
    status = wait_for(
        lambda: client.status(job),
        lambda s: (s.get("progress") or {}).get("sent_bytes", 0) >= at_least or s["state"] != "running",
        timeout,
        f"job {job} sending",
        interval=0.02,
    )
    assert status["state"] == "running", f"job {job} ended too soon: {status}"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


# 1. 100,000 hostile datagrams at a job's group and port.

SPRAYER = r'''
"""Send a planned mix of hostile datagrams to a group and port on lo; print what was sent."""
import json, os, random, sys, time
from mrsyncd.wire import datagram
from mrsyncd.engine.multicast import Channel, sender_socket

cfg = json.loads(sys.argv[1])
out = sender_socket(Channel(cfg["group"], cfg["port"], "lo", 1, True))
out.setblocking(True)
with open(cfg["replay"]) as f:
    replay = [bytes.fromhex(x) for x in json.load(f)]
tid, key, run = bytes.fromhex(cfg["tid"]), bytes.fromhex(cfg["key"]), bytes.fromhex(cfg["run"])
# An insider: a node of the job, given this run's key as every node is.
insider = datagram.DatagramCipher(tid, datagram.run_key(key, tid, run), datagram.preferred_cipher())
bs, entries, fi, nblocks = cfg["block_size"], cfg["entries"], cfg["file_index"], cfg["blocks"]
rng = random.Random(cfg["seed"])
H = datagram.OVERHEAD

def body(n):
    return rng.randbytes(n)

def keyed(f, b, payload, kind=datagram.KIND_DATA):
    # Stamped with the time now, as the sender stamps its own (same host, same clock): an
    # insider's early timestamp would pass for queueing delay and slow the job down to the
    # slowest rate for the rest of it, which is the rate controller's business, not this test's.
    return insider.encode(f, b, payload, 0, int(time.time() * 1e6), kind)

V = bytes([datagram.VERSION])

def forge(kind, i):
    if kind == "short":
        return (V + b"\x01" + tid + body(40))[: rng.randrange(0, H)] if i % 2 else body(rng.randrange(0, H))
    if kind == "version":
        # Earlier versions, later ones, and 0x4D: the "M" that began every datagram of version 1.
        versions = [v for v in (0, 1, 2, 3, 4, 5, 0x4D, 255) if v != datagram.VERSION]
        return bytes([rng.choice(versions)]) + body(rng.randrange(H, 1500))
    if kind == "kind":
        return V + bytes([rng.choice([0, 4, 7, 255])]) + tid + body(rng.randrange(H, 1500))
    if kind == "foreign":
        size = rng.choice([0, 1, bs, bs + 1, rng.randrange(bs, 9000)])
        f, b = rng.randrange(1 << 32), rng.randrange(1 << 32)
        return datagram.DatagramCipher(os.urandom(8), os.urandom(32)).encode(f, b, body(size))
    if kind == "replay":
        return replay[i % len(replay)]
    if kind == "tag":
        # This job's id, a header that looks right, any offset and length, a tag made with another key.
        f = rng.choice([fi, rng.randrange(entries), rng.randrange(entries, 1 << 32)])
        b = rng.choice([rng.randrange(nblocks), nblocks + rng.randrange(1 << 20), (1 << 32) - 1])
        size = rng.choice([bs, rng.randrange(0, bs), bs + 1, rng.randrange(bs, 9000)])
        forger = datagram.DatagramCipher(tid, os.urandom(32), datagram.preferred_cipher())
        return forger.encode(f, b, body(size), rng.randrange(1 << 48))
    if kind == "range":
        # Tagged with the job's own key (an insider), yet naming no block of the transfer.
        which = i % 4
        if which == 0:
            return keyed(entries + rng.randrange(1 << 20), 0, body(bs))
        if which == 1:
            return keyed(fi, nblocks + rng.randrange(1 << 20), body(bs))
        if which == 2:
            return keyed(fi, rng.randrange(nblocks - 1), body(bs + 1))
        # A parity numbered past the file's blocks (any number below is a
        # parity of a real group: see the corrupt kind for wrong content).
        return keyed(fi, nblocks + rng.randrange(1 << 20), body(bs), datagram.KIND_PARITY)
    if kind == "corrupt":
        # Tagged with the job's key, in range, wrong content: only the chunk digest catches these.
        return keyed(fi, nblocks - 2 - (i % 600), body(bs))
    raise ValueError(kind)

plan = [kind for kind, n in cfg["plan"].items() for _ in range(n)]
rng.shuffle(plan)
# Insiders' corrupt blocks first, so that they land before the genuine ones.
plan.sort(key=lambda kind: kind != "corrupt")
sent = {}
started = time.monotonic()
per_second = cfg["per_second"]
for i, kind in enumerate(plan):
    try:
        out.sendto(forge(kind, i), (cfg["group"], cfg["port"]))
        sent[kind] = sent.get(kind, 0) + 1
    except OSError as e:
        sent["error " + str(e.errno)] = sent.get("error " + str(e.errno), 0) + 1
    if i % 200 == 199:
        ahead = started + (i + 1) / per_second - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - started}), flush=True)
'''

PLAN = {
    "short": 12_000,
    "version": 20_000,
    "kind": 8_000,
    "foreign": 15_000,
    "replay": 15_000,
    "tag": 20_000,
    "range": 9_800,
    "corrupt": 200,
}
#: Which receiver counter each kind lands in.
COUNTER = {
    "short": "short",
    "version": "version",
    "kind": "kind",
    "foreign": "foreign",
    "replay": "foreign",
    "tag": "tag",
    "range": "range",
}


class Capture(threading.Thread):
    """A socket joined to a group on lo that keeps what it hears (a replay attacker's tap)."""

    def __init__(self, group: str, port: int, keep: int = 3000) -> None:
        super().__init__(daemon=True)
        self.sock = receiver_socket(Channel(group, port, "lo"))
        self.sock.settimeout(0.1)
        self.sock.setblocking(True)
        self.sock.settimeout(0.1)
        self.keep = keep
        self.heard: list[bytes] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if len(self.heard) < self.keep and isinstance(datagram.peek_wire_id(data), bytes):
                self.heard.append(data)

    def close(self) -> list[bytes]:
        self.stop.set()
        self.join(5)
        self.sock.close()
        return self.heard


def dropped_counts(log: str, job: int) -> dict[str, int]:
    found = re.search(rf"job {job}: dropped \d+ datagrams that failed checks: (.*)", log)
    assert found, f"no count of dropped datagrams for job {job} in the node's log"
    return {k: int(v) for k, v in (pair.split("=") for pair in found.group(1).split())}


@pytest.mark.lan
def test_hostile_datagrams_at_the_jobs_group(fleet: tuple[Cluster, AmpClient], tmp_path: Path) -> None:
    """
    Datagrams of a first job are captured with a socket joined to the
    group; during a second job on the same group and port, 100,000 hostile
    datagrams are sent there: truncated headers, wrong version and
    kind, other transfers' (random and replayed from the first job),
    valid-looking headers of this job with wrong tags at any offset and
    length, and, as an insider holding the job's key would, tagged
    datagrams naming blocks that do not exist, longer than a block, and
    blocks with wrong content.  Every file arrives intact on both nodes,
    and each node's log counts every kind of drop.
    """
    c, client = fleet
    # The first job, overheard.
    first = c.base / "flood-first"
    random_file(first / "a.bin", 4 * MiB, 11)
    tap = Capture(c.group, c.port_base)
    tap.start()
    try:
        status = client.wait_job(
            client.submit(spec(first, "node1,node2", c.shared / "pub" / "flood-first")), 60
        )
    finally:
        heard = tap.close()
    assert status["state"] == "done"
    assert len(heard) >= 1000, f"the tap heard only {len(heard)} datagrams of the first job"
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps([d.hex() for d in heard]))

    # The second job, under attack.
    src = c.base / "flood"
    random_file(src / "big.bin", 24 * MiB, 12)
    for i in range(5):
        random_file(src / "small" / f"s{i}", 3000 * i + 1, 13 + i)
    # Scanned with the blocks the master chooses for its group: one packet of its interface's MTU.
    block_size = Channel(c.group, c.port_base, c.interface).payload_room() - datagram.OVERHEAD
    manifest, _ = scan([f"{src}/"], block_size)
    index = next(i for i, e in enumerate(manifest.entries) if e.path == "big.bin")
    finals = {
        c.node_dir(n) / "pub" / "flood" / "big.bin": {content(src / "big.bin")} for n in ("node1", "node2")
    }
    with FinalPaths(finals) as watcher:
        job = client.submit(spec(src, "node1,node2", c.shared / "pub" / "flood", rate=24e6))
        wait_sent(client, job, MiB)
        with sqlite3.connect(f"file:{c.state_dir / 'jobs.sqlite'}?mode=ro", uri=True) as db:
            tid, key, slot, run = db.execute(
                "SELECT transfer_id, key, slot, run FROM jobs WHERE id = ?", (job,)
            ).fetchone()
        assert slot == 0, "the second job is not on the first job's group and port"
        config = {
            "group": c.group,
            "port": c.port_base,
            "replay": str(replay),
            "tid": tid.hex(),
            "key": key.hex(),
            "run": run.hex(),
            "block_size": manifest.block_size,
            "entries": len(manifest.entries),
            "file_index": index,
            "blocks": manifest.blocks(manifest.entries[index]),
            "seed": 14,
            "plan": PLAN,
            "per_second": 20_000,
        }
        env = {**os.environ, "PYTHONPATH": REPO}
        sprayer = subprocess.run(
            [sys.executable, "-c", SPRAYER, json.dumps(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert sprayer.returncode == 0, sprayer.stderr
        sprayed = json.loads(sprayer.stdout)
        state = client.status(job)["state"]
        status = client.wait_job(job, JOB_TIMEOUT)
    print(watcher.check())
    sent = sprayed["sent"]
    print(
        f"sprayed {sum(sent.values())} datagrams in {sprayed['seconds']:.1f} s: {sent}; job was {state} after"
    )
    assert sum(sent.get(k, 0) for k in PLAN) == sum(PLAN.values()) == 100_000, sent
    assert state == "running", "the job ended before the spray did"
    assert status["state"] == "done", f"{status}\n{c.diagnostics()}"
    expected: dict[str, int] = {}
    for kind, counter in COUNTER.items():
        expected[counter] = expected.get(counter, 0) + sent.get(kind, 0)
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "flood")
        counts = dropped_counts(c.nodes[name].log(), job)
        print(name, "counted", counts, f"{sum(v for k, v in counts.items() if k != 'corrupt_chunks')} in all")
        for counter, n in expected.items():
            assert 0 < counts.get(counter, 0) <= n, f"{name}: {counter} counted {counts.get(counter)} of {n}"
        assert counts.get("corrupt_chunks", 0) >= 1, f"{name}: no corrupt chunk caught: {counts}"
    serves(c, client, "after-flood")


# 2. Malformed and oversized AMP boxes from authenticated peers.


def _connect(c: Cluster, identity: tuple[str, str]) -> AmpClient:
    return AmpClient.connect(c.host, c.port, c.ca.cert, identity, timeout=20)


@pytest.mark.lan
def test_malformed_amp_from_authenticated_peers(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    With an operator's and a node's certificate: garbage, a key longer than
    255 bytes, a key declared 65535 bytes long, an empty box, answers and
    errors to questions never asked, a box of thousands of keys, a
    `BigBytes` of more than `MAX_PIECES` pieces, unknown commands and
    arguments of the wrong type.  Framing errors drop the connection with a
    log line; a well-framed box the master cannot use is answered with an
    error, logged, and the connection goes on.  The master stays up, the
    nodes stay connected, and a job runs afterwards.
    """
    c, client = fleet
    assert c.master is not None
    rogue = c.ca.issue("node", "rogue-node")
    since = c.master.mark()
    rng = random.Random(21)
    dropped = {
        "garbage": rng.randbytes(1 << 16),
        "key of 300 bytes": (300).to_bytes(2, "big") + b"k" * 300 + b"\x00\x01v\x00\x00",
        "key declared 65535 bytes": b"\xff\xff" + b"k" * 1000,
        "empty box": boxes.encode([(b"no", b"command")]),
        "answer never asked": boxes.encode([(b"_answer", b"999"), (b"x", b"y")]),
        "error never asked": boxes.encode(
            [(b"_error", b"999"), (b"_error_code", b"X"), (b"_error_description", b"d")]
        ),
        "5000 keys": boxes.encode(
            [(b"_ask", b"1"), (b"_command", b"Submit"), *boxes.pieces(b"spec", b"{}")]
            + [(b"spec.%d" % i, b"x") for i in range(1, 5000)]
        ),
    }
    for identity in (c.operator, rogue):
        for label, data in dropped.items():
            with _connect(c, identity) as peer:
                peer.send(data)
                assert peer.closed(10), f"the master kept a connection that sent {label}"
    log = c.master.log(since)
    assert "a 300-byte string where at most 255 may be" in log
    assert "a 65535-byte string where at most 255 may be" in log
    assert f"a box of more than {MAX_BOX_KEYS} keys" in log
    assert "NoEmptyBoxes" in log and "Unhandled Error" in log

    # Well-framed boxes with arguments that do not parse: logged, answered with
    # an error, and the connection closed (AMP's own handling of an error it
    # does not know).
    pieces = [(b"spec" if i == 0 else b"spec.%d" % i, b" ") for i in range(MAX_PIECES + 1)]
    unparsable = {
        "an integer that is not": ("ListJobs", [(b"limit", b"many")], "invalid literal for int()"),
        "a boolean that is not": ("JobStatus", [(b"job", b"1"), (b"files", b"perhaps")], "Bad boolean value"),
        "a missing argument": ("Cancel", [], "KeyError"),
        f"{MAX_PIECES + 1} pieces": ("Submit", pieces, f"has more than {MAX_PIECES} pieces"),
        "JSON that is not": ("Submit", [(b"spec", b"not json")], "spec is not valid JSON"),
    }
    for label, (command, args, logged) in unparsable.items():
        with _connect(c, c.operator) as peer:
            with pytest.raises(boxes.AmpError) as raised:
                peer.call(command, args)
            assert raised.value.code == "UNKNOWN", (label, raised.value)
            assert peer.closed(10), f"the master kept the connection after {label}"
        assert logged in c.master.log(since), f"{label}: no {logged!r} in the master's log"
    # An unknown command and a request the master understands but refuses:
    # an error answer each, and the connection goes on.
    with _connect(c, c.operator) as peer:
        with pytest.raises(boxes.AmpError) as raised:
            peer.call("Nope")
        assert raised.value.code == "UNHANDLED", raised.value
        with pytest.raises(boxes.AmpError) as raised:
            peer.call("Submit", [(b"spec", b"[1, 2]")])
        assert raised.value.code == "BAD_REQUEST" and "a job spec is an object" in raised.value.description
        assert json.loads(boxes.joined(peer.call("ListJobs", [(b"limit", b"1")]), b"jobs")) is not None

    # A box that never ends: the master buffers at most max_message_bytes of it,
    # every time (before the bound, 390 MB sent this way stayed buffered on a
    # connection the master kept open).
    pid = c.master.proc.pid  # type: ignore[union-attr]
    before = rss_kib(pid)
    peaks = []
    for attempt in range(2):
        with _connect(c, c.operator) as peer:
            peer.send(boxes.encode([(b"_ask", b"1"), (b"_command", b"ListJobs")])[:-2])
            value = b"\xff\xff" + bytes(PIECE)
            sent = 0
            try:
                for i in range(2 * MAX_PIECES):
                    peer.send(b"\x00\x06" + b"k%05d" % i + value)
                    sent += 8 + PIECE
            except OSError:
                pass
            assert peer.closed(20), "the master kept buffering a box that never ends"
        peaks.append(rss_kib(pid, "VmHWM"))
        assert sent <= MAX_MESSAGE_BYTES + (16 << 20), f"{sent} bytes sent before the master dropped the box"
        print(f"endless box {attempt + 1}: dropped after {sent >> 20} MiB, peak RSS {peaks[-1] >> 10} MiB")
    assert f"a box of more than {MAX_MESSAGE_BYTES} bytes (max_message_bytes)" in c.master.log(since)
    after = rss_kib(pid)
    print(f"master RSS {before >> 10} MiB before, {after >> 10} MiB after, peak {max(peaks) >> 10} MiB")
    assert max(peaks) - before < 2 * (MAX_MESSAGE_BYTES >> 10), (
        f"master peak RSS {peaks} KiB from {before} KiB"
    )
    assert peaks[1] - peaks[0] < 64 << 10, f"a second endless box grew the master's peak again: {peaks} KiB"

    assert {n["name"]: n["state"] for n in client.nodes()} == {"node1": "connected", "node2": "connected"}
    serves(c, client, "after-amp")


# 3. Roles: what each certificate may not do.


@pytest.mark.lan
def test_certificates_used_beyond_their_role(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    A node certificate calling every operator command, an operator
    certificate registering as a node, a node registering under another
    node's name, and plain text where TLS is expected: each refused, with a
    log line, nothing changed.
    """
    c, client = fleet
    assert c.master is not None
    rogue = c.ca.issue("node", "rogue-node2")
    since = c.master.mark()
    jobs_before = json.loads(boxes.joined(client.call("ListJobs", [(b"limit", b"1000")]), b"jobs"))
    with _connect(c, rogue) as node:
        for command, args in (
            (
                "Submit",
                boxes.pieces(b"spec", json.dumps(spec(c.base, "all", c.shared / "pub" / "x")).encode()),
            ),
            ("Cancel", [(b"job", b"1")]),
            ("JobStatus", [(b"job", b"1"), (b"files", b"True")]),
            ("ListJobs", [(b"limit", b"5")]),
            ("ListNodes", []),
        ):
            with pytest.raises(boxes.AmpError) as raised:
                node.call(command, args)
            assert raised.value.code == "FORBIDDEN", (command, raised.value)
            assert "needs an operator certificate" in raised.value.description
        # Another node's name.
        with pytest.raises(boxes.AmpError) as raised:
            node.call("Register", [(b"name", b"node1"), (b"tags", b"")])
        assert raised.value.code == "REFUSED" and "rogue-node2" in raised.value.description, raised.value
    with _connect(c, c.operator) as operator:
        with pytest.raises(boxes.AmpError) as raised:
            operator.call("Register", [(b"name", b"node2"), (b"tags", b"")])
        assert raised.value.code == "FORBIDDEN", raised.value
    # Plain text to the TLS port.
    with socket.create_connection((c.host, c.port), timeout=10) as plain:
        plain.sendall(boxes.encode([(b"_ask", b"1"), (b"_command", b"ListJobs"), (b"limit", b"5")]))
        plain.settimeout(10)
        got = b""
        try:
            while piece := plain.recv(4096):
                got += piece
        except OSError:
            pass
        assert b"_answer" not in got, got
    log = c.master.log(since)
    assert log.count("refused an operator command from a node certificate") >= 5, log
    assert "refused a node command from an operator certificate" in log
    assert "node node1 registered" not in log and "node1 connected again" not in log
    jobs_after = json.loads(boxes.joined(client.call("ListJobs", [(b"limit", b"1000")]), b"jobs"))
    assert [j["id"] for j in jobs_after] == [j["id"] for j in jobs_before], "a job appeared"
    assert {n["name"]: n["state"] for n in client.nodes()} == {"node1": "connected", "node2": "connected"}


# 4. Job requests that try to leave the destination, or cannot be held.


@pytest.mark.lan
def test_hostile_job_requests(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    Relative and NUL-bearing paths, and unknown node names (with the nearest
    known ones), are refused at submission with BAD_REQUEST and a log line;
    a destination that climbs out of the nodes' roots with ``..``, or whose
    name is longer than the filesystem allows, and sources that do not
    exist, make jobs that fail on every node with the reason; none hangs and
    nothing is written outside.
    """
    c, client = fleet
    assert c.master is not None
    src = c.base / "req"
    random_file(src / "f.bin", 10_000, 31)
    pub = c.shared / "pub"
    since = c.master.mark()
    refused = {
        "relative destination": spec(src, "all", "pub/x"),
        "NUL in destination": spec(src, "all", f"{pub}/a\0b"),
        "relative source": {"sources": ["req/"], "destination": str(pub / "x"), "targets": "all"},
        "NUL in source": {"sources": [f"{src}\0/etc"], "destination": str(pub / "x"), "targets": "all"},
        "no sources": {"sources": [], "destination": str(pub / "x"), "targets": "all"},
        "unknown option": {**spec(src, "all", pub / "x"), "chroot": "/"},
        "filter without + or -": {**spec(src, "all", pub / "x"), "filters": ["*.tmp"]},
        "filters not a list": {**spec(src, "all", pub / "x"), "filters": "- *"},
        "spec over max_spec_bytes": {**spec(src, "all", pub / "x"), "filters": ["- " + "x" * 250] * 4500},
        "unknown node": spec(src, "node1,nobody,nod2", pub / "y"),
    }
    for label, request in refused.items():
        with pytest.raises(boxes.AmpError) as raised:
            job = client.submit(request)
            pytest.fail(f"{label}: accepted as job {job}")
        assert raised.value.code == "BAD_REQUEST", (label, raised.value)
        if label == "spec over max_spec_bytes":
            assert "more than the master takes (1048576: max_spec_bytes)" in raised.value.description
        if label == "unknown node":
            want = "unknown nodes: nobody, nod2 (did you mean node2 or node1?)"
            assert raised.value.description == want, raised.value
        print(f"{label}: {raised.value.description}")
    log = c.master.log(since)
    assert log.count("refused a job from operator") == len(refused), log

    failing = {
        "climbs out of the roots": (
            spec(src, "node1,node2", f"{pub}/../../outside"),
            "outside this node's roots",
        ),
        "name too long": (spec(src, "node1,node2", pub / ("n" * 300)), "File name too long"),
        "path too long": (spec(src, "node1,node2", pub / "/".join(["p" * 250] * 17)), "File name too long"),
        "no such source": (spec(c.base / "nowhere", "node1,node2", pub / "y"), "cannot read the sources"),
    }
    for label, (request, why) in failing.items():
        status = client.wait_job(client.submit(request), JOB_TIMEOUT)
        assert status["state"] == "failed", (label, status)
        reasons = [n["reason"] for n in status["nodes"].values()] or [status["message"]]
        assert all(why in reason for reason in reasons), (label, status)
        print(f"{label}: {reasons[0][:160]}")
    assert not (c.base / "outside" / "req").exists()
    assert not list(c.base.glob("nodes/*/outside"))
    # A name of exactly 255 bytes is fine.
    longest = c.base / "req-255"
    random_file(longest / ("x" * 255), 1000, 32)
    status = client.wait_job(client.submit(spec(longest, "node1,node2", pub / "longest")), JOB_TIMEOUT)
    assert status["state"] == "done", status
    for name in ("node1", "node2"):
        same_tree(longest, c.node_dir(name) / "pub" / "longest")


@pytest.mark.lan
def test_symlinks_out_of_the_destination(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    Symlinks in the source that point out of it arrive as symlinks, nothing
    followed; on a node, symlinks to the outside standing where the job has
    a directory and a file are replaced, never written through.
    """
    c, client = fleet
    outside = c.base / "outside"
    src = c.base / "links"
    random_file(src / "sub" / "inner.bin", 50_000, 41)
    (src / "file.txt").write_text("a regular file\n")
    os.symlink(str(outside), src / "abs-out")
    os.symlink("../../../../../../../../etc/passwd", src / "rel-out")
    for name in ("node1", "node2"):
        here = c.node_dir(name) / "pub" / "links"
        here.mkdir(parents=True)
        os.symlink(str(outside), here / "sub")
        os.symlink(str(outside / "victim"), here / "file.txt")
    status = client.wait_job(client.submit(spec(src, "node1,node2", c.shared / "pub" / "links")), JOB_TIMEOUT)
    assert status["state"] == "done", status
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "links")
    assert list(outside.iterdir()) == []


# 5. A destination subdirectory swapped for a symlink while the job writes into it.


@pytest.mark.lan
def test_destination_directory_swapped_for_a_symlink(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    While node1 receives into ``swap/sub``, that directory is renamed away
    and a symlink to a directory outside takes its place: nothing is
    written outside, node1 reports the files beneath it failed with the
    reason, node2 completes, and the next push puts a real directory back.
    """
    c, client = fleet
    outside = c.base / "outside"
    src = c.base / "swap"
    random_file(src / "sub" / "big.bin", 16 * MiB, 51)
    # Too large to travel packed with top.txt, which comes first (`manifest.Pack`): sent after big.bin.
    (src / "sub" / "later.txt").write_text("written after the swap\n" * 10_000)
    (src / "top.txt").write_text("beside it\n")
    here = c.node_dir("node1") / "pub" / "swap"
    finals = {
        here / "sub" / "big.bin": set(),
        outside / "big.bin": set(),
        outside / "later.txt": set(),
        c.node_dir("node2") / "pub" / "swap" / "sub" / "big.bin": {content(src / "sub" / "big.bin")},
    }
    with FinalPaths(finals) as watcher:
        job = client.submit(spec(src, "node1,node2", c.shared / "pub" / "swap", rate=24e6))
        wait_sent(client, job, 2 * MiB)
        os.rename(here / "sub", here / "sub.moved")
        os.symlink(str(outside), here / "sub")
        status = client.wait_job(job, JOB_TIMEOUT)
    print(watcher.check())
    assert list(outside.iterdir()) == [], f"written outside: {list(outside.iterdir())}"
    assert status["state"] == "failed", status
    assert {n: s["state"] for n, s in status["nodes"].items()} == {"node1": "failed", "node2": "done"}
    reason = status["nodes"]["node1"]["reason"]
    files = status["files"]["node1"]
    print("node1:", reason, files)
    assert files["top.txt"] == "ok", files
    for path in ("sub/big.bin", "sub/later.txt"):
        assert f"'sub' in '{path}' is not a directory" in files[path], files
    assert "sub: cannot set metadata: 'sub' is no longer a directory" in reason, reason
    assert os.readlink(here / "sub") == str(outside)
    same_tree(src, c.node_dir("node2") / "pub" / "swap")
    # The next push makes sub a directory again and completes.
    status = client.wait_job(client.submit(spec(src, "node1", c.shared / "pub" / "swap")), JOB_TIMEOUT)
    assert status["state"] == "done", status
    assert (here / "sub").is_dir() and not (here / "sub").is_symlink()
    assert (here / "sub" / "big.bin").read_bytes() == (src / "sub" / "big.bin").read_bytes()
    assert list(outside.iterdir()) == []


# 6. Manifests that try to leave the destination, from a stand-in master.


class StandInMaster:
    """
    A TLS listener with the master's certificate that a node dials: the
    test plays the master and sends the node whatever it likes.  It answers
    the node's Register with this protocol version, and every other question
    (Heartbeat) with an empty answer.
    """

    def __init__(self, c: Cluster) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*c.master_cert)
        self.context.load_verify_locations(c.ca.cert)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.port = free_tcp_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(30)

    def accept(self) -> AmpClient:
        raw, _ = self.listener.accept()
        raw.settimeout(30)
        peer = AmpClient(self.context.wrap_socket(raw, server_side=True))
        register = peer.read_box()
        assert register.get(b"_command") == b"Register", register
        peer.send(boxes.encode([(b"_answer", register[b"_ask"]), (b"version", b"%d" % PROTOCOL)]))
        return peer

    def close(self) -> None:
        self.listener.close()


def _manifest(entries: list[dict[str, Any]]) -> bytes:
    """A manifest of these entries, unchecked: `Manifest.to_bytes` encodes whatever it holds."""
    return Manifest(
        [Entry(**{"mode": 0o644, "mtime_ns": 1_600_000_000_000_000_000, **e}) for e in entries]
    ).to_bytes()


def _zeros(path: str, size: int = 100) -> dict[str, Any]:
    return {"path": path, "kind": FILE, "size": size, "digests": digest(bytes(size))}


def _prepare(
    peer: AmpClient,
    manifest: bytes | None,
    destination: str,
    label: str,
    transfer_id: bytes = b"",
    digest: bytes | None = None,
) -> dict[bytes, bytes]:
    """A `Prepare` box; ``manifest`` None names it by ``digest`` alone, as one sent before."""
    channel = support.unique_channel()
    assert manifest is not None or digest is not None
    # As `commands.CompressedBytes` sends it.
    sent = boxes.pieces(b"manifest", zlib.compress(manifest)) if manifest is not None else []
    return peer.call(
        "Prepare",
        [
            (b"transfer_id", transfer_id or os.urandom(8)),
            (b"key", os.urandom(32)),
            *sent,
            (b"manifest_digest", digest or hashlib.sha256(manifest or b"").digest()),
            (b"group", channel.group.encode()),
            (b"port", b"%d" % channel.port),
            (b"ttl", b"1"),
            (b"loopback", b"True"),
            (b"destination", destination.encode()),
            (b"options", json.dumps({"label": label}).encode()),
            (b"cipher", datagram.AES_256_GCM.encode()),
        ],
    )


@pytest.mark.lan
def test_hostile_manifests_from_a_stand_in_master(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    A node dials a stand-in master (the test, with the master's
    certificate), which offers manifests with absolute paths, ``..``, NUL,
    names and paths over the limits, hardlinks out of the tree and
    destinations outside the node's roots: each is refused with the reason
    and a log line.  A symlink to the outside followed by a file beneath it
    writes nothing outside.  The node stays up throughout.
    """
    c, _ = fleet
    outside = c.base / "outside"
    pub = c.shared / "pub"
    fake = StandInMaster(c)
    victim = c.add_node("victim", master=f"127.0.0.1:{fake.port}", roots=[pub], start=False)
    del c.nodes["victim"]
    c.others.append(victim)
    (c.node_dir("victim") / "pub").mkdir(parents=True, exist_ok=True)
    try:
        victim.start()
        peer = fake.accept()
        refusals = {
            "absolute path": (_manifest([_zeros("/etc/evil")]), str(pub / "m"), "is absolute"),
            "dot-dot": (_manifest([_zeros("../../evil")]), str(pub / "m"), "leaves the destination"),
            "dot-dot inside": (_manifest([_zeros("a/../../evil")]), str(pub / "m"), "leaves the destination"),
            "NUL": (_manifest([_zeros("a\0b")]), str(pub / "m"), "contains NUL"),
            "long name": (_manifest([_zeros("n" * 256)]), str(pub / "m"), "longer than 255"),
            "long path": (_manifest([_zeros("/".join(["p" * 200] * 21))]), str(pub / "m"), "PATH_MAX"),
            "hardlink out": (
                _manifest([_zeros("f"), {"path": "h", "kind": HARDLINK, "target": "../../etc/passwd"}]),
                str(pub / "m"),
                "leaves the destination",
            ),
            "symlink NUL": (
                _manifest([{"path": "s", "kind": SYMLINK, "target": "/etc\0x"}]),
                str(pub / "m"),
                "bad symlink target",
            ),
            "outside the roots": (_manifest([_zeros("f")]), str(outside), "outside this node's roots"),
            "dot-dot out of the roots": (
                _manifest([_zeros("f")]),
                f"{pub}/../../outside",
                "outside this node's roots",
            ),
            "relative destination": (_manifest([_zeros("f")]), "pub/m", "not an absolute path"),
            "not JSON": (b"\x00garbage", str(pub / "m"), "not valid JSON"),
        }
        # A manifest that is not the one its digest names, or one named by a digest alone that
        # the node was never sent: refused, and asked for whole.
        forged = _manifest([_zeros("f")])
        refusals["digest"] = (forged, str(pub / "m"), "does not match its digest")
        for label, (manifest, destination, why) in refusals.items():
            with pytest.raises(boxes.AmpError) as raised:
                _prepare(peer, manifest, destination, label, digest=b"\0" * 32 if label == "digest" else None)
            assert raised.value.code == "REFUSED" and why in raised.value.description, (label, raised.value)
        with pytest.raises(boxes.AmpError) as raised:
            _prepare(peer, None, str(pub / "m"), "unknown", digest=os.urandom(32))
        assert raised.value.code == "UNKNOWN_MANIFEST", raised.value
        # A symlink to the outside, then a file beneath it (a whole chunk of zeros: no data needs to flow).
        zeros = _zeros("esc/pwned", Manifest([]).chunk_size)
        evil = _manifest([{"path": "esc", "kind": SYMLINK, "target": str(outside)}, zeros])
        transfer_id = os.urandom(8)
        assert b"needs" in _prepare(peer, evil, str(pub / "esc"), "symlink-then-file", transfer_id)
        wait_for(
            lambda: peer.call("Missing", [(b"transfer_id", transfer_id), (b"abandoned", b"{}")]),
            lambda box: box.get(b"done") == b"True",
            20,
            "the node done with the symlink-then-file transfer",
        )
        # As `commands.CompressedJSON` sends them.
        results = json.loads(
            zlib.decompress(boxes.joined(peer.call("Results", [(b"transfer_id", transfer_id)]), b"results"))
        )
        print("symlink then file:", results)
        assert results["esc"] != "ok" and results["esc"].startswith("cannot link"), results
        assert list(outside.iterdir()) == [], "written through the symlink"
        landed = c.node_dir("victim") / "pub" / "esc"
        assert (landed / "esc").is_dir() and not (landed / "esc").is_symlink()
        log = victim.log()
        assert log.count("refused transfer") >= len(refusals), log[-3000:]
        assert victim.alive, victim.tail()
        peer.close()
    finally:
        fake.close()
        victim.stop()
