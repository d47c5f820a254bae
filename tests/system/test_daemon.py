"""
The daemons as an operator runs them: ``twistd mrsyncd`` processes (one
master, three nodes) on this host's loopback, driven by the real ``mrsync``
command line, with certificates made by `mrsyncd.security.certs`.

See mrsyncd/testing/cluster.py for the set-up.  As root every node has a mount
namespace of its own, so that one job can write "the same" destination on
several nodes of one host; tests that need it are marked ``lan`` and
skipped without root, as is the one that runs the daemons across a LAN of
network namespaces (mrsyncd/testing/lan.py).

Run: ``PYTHONPATH=. python3 -m pytest -q tests/system/test_daemon.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mrsyncd.control import boxes
from mrsyncd.daemon.tap import EXIT_CONFIG
from mrsyncd.testing import environment
from mrsyncd.testing.cluster import (
    CA,
    REPO,
    TWISTD,
    AmpClient,
    Cluster,
    Daemon,
    FinalPaths,
    can_unshare,
    content,
    part_files,
    random_file,
    same_tree,
    wait_for,
    write_toml,
)
from mrsyncd.wire.datagram import OVERHEAD
from mrsyncd.wire.manifest import default_chunk_size
from tests import support

MiB = 1 << 20
FINISHED = ("done", "failed", "cancelled")
#: node3 may write only beneath ``shared/pub``; node1 and node2 anywhere in ``shared``.
NODES = {
    "node1": {"tags": ["rack1"]},
    "node2": {"tags": ["rack1", "big"], "config": {"allow_setid": True}},
    "node3": {"tags": ["rack2"], "narrow": True},
}
CA_NAME = "mrsyncd test CA"
ALL_CONNECTED = {name: "connected" for name in NODES}
#: Long enough for any one job here; a job still running then counts as hung.
FOLLOW_TIMEOUT = 90.0

#: Several nodes writing one destination on one host: each needs a mount namespace of its own.
NEEDS_MOUNT_NS = pytest.mark.skipif(
    not can_unshare(), reason="several nodes on one host need root (mount namespaces)"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("daemons"))
    try:
        c.start_master()
        for name, spec in NODES.items():
            (c.node_dir(name) / "pub").mkdir(parents=True, exist_ok=True)
            roots = [c.shared / "pub"] if spec.get("narrow") else [c.shared]
            c.add_node(name, roots=roots, tags=spec["tags"], wait=False, **spec.get("config", {}))
        for name in NODES:
            c.wait_registered(name, 0)
        yield c
    finally:
        c.close()


@pytest.fixture
def fleet(cluster: Cluster) -> Cluster:
    """The cluster, with its master and every node running and connected (a test may have killed some)."""
    assert cluster.master is not None
    if not cluster.master.alive:
        cluster.start_master()
    for name, daemon in cluster.nodes.items():
        if name in NODES and not daemon.alive:
            cluster.start_node(name)
    cluster.wait_node_states(ALL_CONNECTED)
    return cluster


def follow(c: Cluster, job: int) -> tuple[int, dict[str, Any]]:
    """``mrsync status JOB --follow --json``: exit code and final status."""
    result = c.cli("status", str(job), "--follow", "--json", timeout=FOLLOW_TIMEOUT)
    try:
        status = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(
            f"status --follow of job {job} exited {result.returncode} with no JSON\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{c.diagnostics()}"
        ) from None
    return result.returncode, status


def half_sent_job(c: Cluster, tag: str, size: int, seed: int) -> tuple[Path, Path, int, int]:
    """
    A job pushing one random file of ``size`` bytes to node1 and node2, once
    half of it is sent: its source, destination, id and the bytes sent.
    """
    src = c.base / f"src{tag}"
    random_file(src / "big.bin", size, seed)
    destination = c.shared / "pub" / f"t{tag}"
    job = c.detach("--rate", "100M", f"{src}/", f"node1,node2:{destination}")
    return src, destination, job, wait_sent(c, job, size // 2)


def wait_sent(c: Cluster, job: int, at_least: int, timeout: float = 30.0) -> int:
    """Poll the job until the master has sent ``at_least`` payload bytes; returns what it had sent."""

    def sent(status: dict[str, Any]) -> int:
        return int((status.get("progress") or {}).get("sent_bytes", 0))

    status = wait_for(
        lambda: c.status(job),
        lambda s: sent(s) >= at_least or s["state"] in ("done", "failed", "cancelled"),
        timeout,
        f"job {job} having sent {at_least} bytes",
        c.diagnostics,
        interval=0.05,
    )
    assert status["state"] == "running", f"job {job} ended before it could be interrupted: {status}"
    return sent(status)


# 1. A push to completion, again with nothing to send, and after one change.


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_push_then_nothing_then_one_chunk(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src1"
    support.make_full_tree(str(src))
    destination = c.shared / "pub" / "t1"

    first = c.cli("push", "--json", f"{src}/", f"all:{destination}", timeout=FOLLOW_TIMEOUT)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}\n{c.diagnostics()}"
    report = json.loads(first.stdout)
    assert report["state"] == "done"
    assert sorted(report["nodes"]) == sorted(NODES)
    assert all(n["state"] == "done" for n in report["nodes"].values()), report["nodes"]
    # Every byte of the tree once: the hardlink's data is multi.bin's, sent once for all three nodes.
    unique = sum(e.stat().st_size for e in src.rglob("*") if e.is_file() and not e.is_symlink())
    unique -= (src / "hardlink.bin").stat().st_size
    assert unique <= report["sent_bytes"] <= unique * 5 // 4, f"{report['sent_bytes']} bytes for {unique}"
    for name in NODES:
        same_tree(src, c.node_dir(name) / "pub" / "t1")
        assert part_files(c.node_dir(name) / "pub" / "t1") == []

    # The same push again: every file is there already, so no file data moves.
    again = c.cli("push", "--json", f"{src}/", f"all:{destination}", timeout=FOLLOW_TIMEOUT)
    assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
    job = json.loads(again.stdout)["id"]
    status = c.status(job)
    assert status["id"] == job and status["state"] == "done"
    assert status["sent_bytes"] == 0, f"an unchanged tree was sent again: {status}"
    for name in NODES:
        same_tree(src, c.node_dir(name) / "pub" / "t1")

    # One byte of one chunk of one file changes: only that chunk is sent.
    changed = src / "dir" / "multi.bin"
    chunk = default_chunk_size(1500 - 28 - OVERHEAD)  # the master's blocks fill its IPv4 group's packets
    offset = chunk + chunk // 2
    with open(changed, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))
    os.utime(changed, ns=(1_700_000_000_000_000_000,) * 2)
    third = c.cli("push", "--json", f"{src}/", f"all:{destination}", timeout=FOLLOW_TIMEOUT)
    assert third.returncode == 0, f"{third.stdout}\n{third.stderr}"
    job = json.loads(third.stdout)["id"]
    status = c.status(job)
    assert status["state"] == "done"
    assert chunk <= status["sent_bytes"] <= chunk * 5 // 4, (
        f"one changed chunk of {chunk} bytes should cost about {chunk} bytes, not {status['sent_bytes']}"
    )
    for name in NODES:
        same_tree(src, c.node_dir(name) / "pub" / "t1")


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_a_dry_run_lists_each_change_and_deletion_once_and_changes_nothing(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src-dry"
    for name in ("a", "b", "c"):
        random_file(src / name, 3000, ord(name))
    destination = c.shared / "pub" / "dry"
    c.cli_ok("push", f"{src}/", f"node1,node2:{destination}", timeout=FOLLOW_TIMEOUT)
    random_file(src / "d", 3000, 4)
    (c.node_dir("node1") / "pub" / "dry" / "old1").write_text("only on node1")
    (c.node_dir("node2") / "pub" / "dry" / "sub").mkdir()
    before = {name: sorted(os.listdir(c.node_dir(name) / "pub")) for name in NODES}

    dry = c.cli("push", "-n", "--delete", f"{src}/", f"all:{destination}", timeout=FOLLOW_TIMEOUT)
    assert dry.returncode == 0, f"{dry.stdout}\n{dry.stderr}"
    lines = dry.stdout.splitlines()
    tail = lines[lines.index(next(line for line in lines if line.startswith("  deleting"))) :]
    assert tail == [
        "  deleting old1  (node1)",
        "  deleting sub  (node2)",
        "  a  (node3)",
        "  b  (node3)",
        "  c  (node3)",
        "  d",
    ], dry.stdout
    assert "  node1: would receive 1 files, 2.9 KiB, delete 1" in lines, dry.stdout
    assert "  node3: would receive 4 files, 11.7 KiB, delete 0" in lines, dry.stdout
    # Nothing was written, deleted or made.
    assert {name: sorted(os.listdir(c.node_dir(name) / "pub")) for name in NODES} == before
    assert (c.node_dir("node1") / "pub" / "dry" / "old1").exists()
    assert not (c.node_dir("node1") / "pub" / "dry" / "d").exists()
    assert part_files(c.node_dir("node1") / "pub" / "dry") == []


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_every_job_is_in_the_audit_log_with_who_what_and_each_node_result(fleet: Cluster) -> None:
    """
    Who submitted (the certificate's name and SHA-256 fingerprint), what
    (sources, targets, destination, the manifest's digest) and how it ended
    on each node, appended to the store's audit log, which SQLite itself
    refuses to change; `mrsync jobs` names who submitted each job.
    """
    c = fleet
    src = c.base / "src1a"
    random_file(src / "f.bin", 100_000, 11)
    destination = c.shared / "pub" / "t1a"
    jobs = []
    for _ in range(2):
        pushed = c.cli("push", "--json", f"{src}/", f"node1,node2:{destination}", timeout=FOLLOW_TIMEOUT)
        assert pushed.returncode == 0, f"{pushed.stdout}\n{pushed.stderr}"
        jobs.append(json.loads(pushed.stdout)["id"])
    with open(c.operator[0], "rb") as f:
        fingerprint = x509.load_pem_x509_certificate(f.read()).fingerprint(hashes.SHA256()).hex()
    db = sqlite3.connect(c.state_dir / "jobs.sqlite")
    try:
        rows = db.execute(
            "SELECT job, event, who, fingerprint, detail FROM audit WHERE job IN (?, ?) ORDER BY seq", jobs
        ).fetchall()
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM audit WHERE job = ?", (jobs[0],))
    finally:
        db.close()
    events = [(job, event, who) for job, event, who, _, _ in rows]
    assert events == [
        (job, event, who)
        for job in jobs
        for event, who in (("submitted", "operator"), ("started", "master"), ("finished", "master"))
    ]
    submitted, started, finished = (json.loads(detail) for _, _, _, _, detail in rows[:3])
    assert rows[0][3] == fingerprint
    assert submitted["sources"] == [f"{src}/"] and submitted["destination"] == str(destination)
    assert submitted["targets"] == "node1,node2"
    assert started["nodes"] == ["node1", "node2"] and len(started["manifest_sha256"]) == 64
    # The same tree twice: the same manifest.
    assert json.loads(rows[4][4])["manifest_sha256"] == started["manifest_sha256"]
    assert finished["state"] == "done"
    assert {n: r["state"] for n, r in finished["nodes"].items()} == {"node1": "done", "node2": "done"}
    header, *lines = c.cli_ok("jobs").stdout.splitlines()
    assert header.split()[:5] == ["JOB", "STATE", "SUBMITTED", "BY", "TARGETS"]
    [mine] = [line.split() for line in lines if line.split()[0] == str(jobs[1])]
    assert mine[4] == "operator", mine  # job, state, date, time, who


def test_the_masters_key_and_state_are_never_sources(fleet: Cluster) -> None:
    """Refused before a job exists (exit 4), the reason named: whatever ``[master] sources`` allows."""
    c = fleet
    before = c.cli_json("jobs")
    key_dir = str(Path(c.master_cert[1]).parent)
    for source, why in ((f"{c.state_dir}/", "state directory"), (key_dir, "key"), (c.master_cert[1], "key")):
        refused = c.cli("push", source, f"all:{c.shared}/pub/leak")
        assert refused.returncode == 4, f"{source}: {refused.stdout}{refused.stderr}"
        assert f"holds the master's {why}" in refused.stderr, refused.stderr
    assert c.cli_json("jobs") == before


# 2. The fleet as the master sees it.


def test_nodes_listed_and_reconnect(fleet: Cluster) -> None:
    c = fleet
    listing = c.cli_ok("nodes").stdout
    for name in NODES:
        line = next((row for row in listing.splitlines() if row.split()[:1] == [name]), None)
        assert line is not None and "connected" in line.split(), f"{name} not listed as connected:\n{listing}"
    nodes = {n["name"]: n for n in c.cli_json("nodes")}
    assert sorted(nodes) == sorted(NODES)
    for name, spec in NODES.items():
        assert nodes[name]["state"] == "connected"
        assert sorted(nodes[name]["tags"]) == sorted(spec["tags"])
        assert nodes[name]["free"], f"{name} reported no free space: {nodes[name]}"

    # A node killed outright shows as disconnected, the others stay connected.
    c.nodes["node2"].kill(signal.SIGKILL)
    c.wait_node_states({"node1": "connected", "node2": "disconnected", "node3": "connected"}, timeout=10)
    c.start_node("node2")
    c.wait_node_states(ALL_CONNECTED, timeout=10)

    # The master goes away for a while: every node redials on its own, with backoff.
    assert c.master is not None
    marks = {name: c.nodes[name].mark() for name in NODES}
    c.master.stop()
    for name in NODES:
        c.nodes[name].wait_log(r"Scheduling retry", 10, marks[name])
    since = c.master.start()
    c.master.wait_log("master listening", 20, since)
    for name in NODES:
        c.wait_registered(name, since, timeout=40)
    c.wait_node_states(ALL_CONNECTED, timeout=10)
    assert all(d.alive for d in c.nodes.values() if d.name in NODES), "a node died instead of redialling"


# 3. Who may connect, and who may do what.


def raw_list_jobs(c: Cluster, identity: tuple[str, str] | None) -> tuple[bytes, str]:
    """
    Ask the master for ``ListJobs`` over TLS with Python's own ssl module,
    with ``identity`` as the client certificate (or none): what came back,
    and the error that ended the exchange, if any.  This bypasses every
    check that ``mrsync`` makes on its own files, so only the master decides.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(c.ca.cert)
    if identity is not None:
        context.load_cert_chain(*identity)
    data, error = b"", ""
    try:
        with socket.create_connection(("127.0.0.1", c.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(boxes.encode([(b"_ask", b"1"), (b"_command", b"ListJobs"), (b"limit", b"5")]))
                while not data.endswith(b"\0\0"):
                    piece = s.recv(65536)
                    if not piece:
                        error = error or "connection closed"
                        break
                    data += piece
    except (OSError, ssl.SSLError) as e:
        error = f"{type(e).__name__}: {e}"
    return data, error


@pytest.fixture(scope="module")
def identities(cluster: Cluster) -> dict[str, tuple[str, str]]:
    """Client certificates the master must not take as an operator's."""
    c = cluster
    foreign = CA(c.base / "foreign-ca", c.base / "foreign", name=CA_NAME)
    return {
        # Another CA with the same name as the cluster's, so only the signature differs.
        "foreign": foreign.issue("operator", "operator"),
        "expired": c.ca.issue("operator", "expired-operator", expired=True),
        "node": c.ca.issue("node", "some-node"),
    }


def test_master_refuses_clients_without_a_cluster_certificate(
    fleet: Cluster, identities: dict[str, tuple[str, str]]
) -> None:
    """The master itself, asked by a client that makes none of mrsync's own checks."""
    c = fleet
    data, error = raw_list_jobs(c, c.operator)
    assert b"_answer" in data and b"jobs" in data, f"the raw client itself is broken: {data!r} {error}"
    for label, identity in (
        ("no certificate", None),
        ("a foreign CA's certificate", identities["foreign"]),
        ("an expired certificate", identities["expired"]),
    ):
        data, error = raw_list_jobs(c, identity)
        assert b"_answer" not in data, f"the master answered a client with {label}: {data!r}"
        assert error, f"the connection with {label} did not end"
    c.cli_ok("jobs")


def test_cli_without_a_certificate(fleet: Cluster) -> None:
    """No certificate anywhere (flags, environment, client.toml) is a wrong command line (2)."""
    result = fleet.cli("jobs", identity=None)
    assert result.returncode == 2, result
    assert "no certificate" in result.stderr, result.stderr


def test_cli_with_a_foreign_certificate(fleet: Cluster, identities: dict[str, tuple[str, str]]) -> None:
    result = fleet.cli("jobs", identity=identities["foreign"])
    assert "not issued by the cluster CA" in result.stderr, result.stderr
    assert result.returncode == 3, f"exit {result.returncode}: {result.stderr}"


def test_cli_says_in_plain_words_what_is_wrong_with_the_master_s_certificate(
    fleet: Cluster, identities: dict[str, tuple[str, str]]
) -> None:
    """Not OpenSSL's or service_identity's words: what is wrong, and what to do."""
    c = fleet
    wrong_name = c.cli("--master-name", "wrong.example", "jobs")
    assert wrong_name.returncode == 3, wrong_name
    assert "the master's certificate is not for 'wrong.example': dial a name it carries" in wrong_name.stderr
    foreign_ca = str(c.base / "foreign-ca" / "ca.crt")
    assert os.path.exists(foreign_ca)
    other_ca = c.cli("jobs", identity=identities["foreign"], ca=foreign_ca)
    assert other_ca.returncode == 3, other_ca
    assert f"the master's certificate does not verify against {foreign_ca}" in other_ca.stderr, (
        other_ca.stderr
    )
    for said in (wrong_name.stderr, other_ca.stderr):
        assert "Error" not in said and "SSL routines" not in said, said


def test_cli_with_an_expired_certificate(fleet: Cluster, identities: dict[str, tuple[str, str]]) -> None:
    c = fleet
    for args in (["jobs"], ["nodes"], ["push", str(c.base / "src-none"), f"node1:{c.shared}/nope"]):
        result = c.cli(*args, identity=identities["expired"])
        assert result.returncode == 3, f"{args}: exit {result.returncode}: {result.stderr}"
        assert "expired" in result.stderr.lower(), result.stderr
    assert not (c.node_dir("node1") / "nope").exists()


def test_node_certificate_cannot_act_as_operator(
    fleet: Cluster, identities: dict[str, tuple[str, str]]
) -> None:
    c = fleet
    (c.base / "src-none").mkdir(exist_ok=True)
    for args in (
        ["jobs"],
        ["nodes"],
        ["status", "1"],
        ["push", str(c.base / "src-none"), f"node1:{c.shared}/nope"],
    ):
        result = c.cli(*args, identity=identities["node"])
        assert result.returncode == 4, f"{args}: exit {result.returncode}: {result.stderr}"
        assert "needs an operator certificate" in result.stderr, result.stderr
    assert not (c.node_dir("node1") / "nope").exists()
    assert all(j["spec"]["destination"] != f"{c.shared}/nope" for j in c.cli_json("jobs"))


def test_operator_certificate_cannot_register_as_node(fleet: Cluster) -> None:
    """An operator's certificate named like a node cannot register, let alone displace that node."""
    c = fleet
    assert c.master is not None
    master = c.master
    since = master.mark()
    identity = c.ca.issue("operator", "node1", out=c.base / "impostor")
    impostor = c.add_node("impostor", identity=identity, wait=False, roots=[c.shared / "pub"])
    del c.nodes["impostor"]
    c.others.append(impostor)
    try:
        wait_for(
            lambda: (master.log(since), impostor.alive, impostor.log()),
            lambda got: (
                bool(re.search(r"refused a node command from an? operator certificate", got[0]))
                or (not got[1] and "operator" in got[2])
            ),
            15,
            "a refusal of the operator certificate as a node's",
            c.diagnostics,
        )
        nodes = {n["name"]: n for n in c.cli_json("nodes")}
        assert sorted(nodes) == sorted(NODES), nodes
        assert nodes["node1"]["state"] == "connected"
        assert "node node1 registered" not in master.log(since), "the impostor registered as node1"
        assert "node1 connected again" not in master.log(since), "the impostor displaced node1"
    finally:
        impostor.stop()


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_connections_come_and_go_without_a_line_each(fleet: Cluster) -> None:
    """The master logs who registered, not every TLS connection (each mrsync command made two lines)."""
    c = fleet
    since = c.master.mark()
    c.cli_ok("jobs")
    c.cli_ok("nodes")
    time.sleep(0.5)  # the master notices the commands' connections close
    log = c.master.log()
    assert "registered from" in log
    assert "connection established" not in log and "connection lost" not in log, c.master.log(since)


# 4. A destination that one target does not allow.


def test_destination_outside_one_nodes_roots(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src4"
    random_file(src / "a.bin", 300_000, 4)
    random_file(src / "sub" / "b.txt", 1234, 5)
    destination = c.shared / "private" / "t4"
    result = c.cli("push", f"{src}/", f"node2,node3:{destination}", timeout=FOLLOW_TIMEOUT)
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    root = os.path.realpath(c.shared / "pub")
    assert "node3: failed" in result.stdout and root in result.stdout, result.stdout
    assert "node2: done" in result.stdout, result.stdout

    jobs = c.cli_json("jobs")
    job = next(j for j in jobs if j["spec"]["destination"] == str(destination))
    status = c.status(job["id"])
    assert status["state"] == "failed"
    assert status["nodes"]["node2"]["state"] == "done"
    assert status["nodes"]["node3"]["state"] == "failed"
    assert root in status["nodes"]["node3"]["reason"], status["nodes"]["node3"]
    same_tree(src, c.node_dir("node2") / "private" / "t4")
    if c.mount_ns:
        assert not (c.node_dir("node3") / "private").exists(), "node3 wrote outside its roots"
    # The journal has one line a node at the job's end, with the same fields for each.
    log = c.master.log()
    done = re.search(
        rf"job {job['id']} on node2: done; needed (\d+) bytes, changed (\d+) paths, complete in [\d.]+ s", log
    )
    assert done and int(done.group(1)) == 300_000 + 1234 and int(done.group(2)) >= 2, log
    assert re.search(
        rf"job {job['id']} on node3: .*{re.escape(root)}.*; needed 0 bytes, changed 0 paths, never complete",
        log,
    ), log


def test_a_mistyped_node_name_is_refused_before_a_job_exists(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src-typo"
    random_file(src / "a.bin", 1000, 6)
    newest = max((j["id"] for j in c.cli_json("jobs")), default=0)
    result = c.cli("push", f"{src}/", f"node1,nod3:{c.shared}/typo", timeout=FOLLOW_TIMEOUT)
    assert result.returncode == 4, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "unknown nodes: nod3 (did you mean node3" in result.stderr, result.stderr
    latest = max((j["id"] for j in c.cli_json("jobs")), default=0)
    assert latest == newest, "a job was made for a mistyped node"
    assert not (c.node_dir("node1") / "typo").exists()


@NEEDS_MOUNT_NS
def test_a_node_that_is_down_is_missed_by_name_until_it_is_forgotten(tmp_path: Path) -> None:
    """
    The master expects every node that has registered, across its own
    restarts: a push to ``all`` while one is down reaches the others,
    names the one it missed and exits 6, and a later push catches it up.
    Only an operator's ``nodes --forget`` makes it unexpected.
    """
    c = Cluster(tmp_path, grace=3)
    try:
        c.start_master()
        for name in ("node1", "node2"):
            c.add_node(name)
        src = c.base / "src"
        random_file(src / "a.bin", 5000, 1)
        first = c.cli_json("push", f"{src}/", f"all:{c.shared}/t")
        assert first["state"] == "done", first

        c.nodes["node2"].kill(signal.SIGKILL)
        c.wait_node_states({"node1": "connected", "node2": "disconnected"})
        random_file(src / "b.bin", 5000, 2)
        missed = c.cli("push", f"{src}/", f"all:{c.shared}/t", timeout=FOLLOW_TIMEOUT)
        assert missed.returncode == 6, f"exit {missed.returncode}\n{missed.stdout}\n{missed.stderr}"
        assert "missed 1 of 2 nodes: node2" in missed.stdout, missed.stdout
        assert "node2: missed: not connected when the job started" in missed.stdout, missed.stdout
        same_tree(src, c.node_dir("node1") / "t")
        second = max(j["id"] for j in c.cli_json("jobs"))
        nodes = {n["name"]: n for n in c.cli_json("nodes")}
        assert (nodes["node1"]["last_ok_job"], nodes["node2"]["last_ok_job"]) == (second, first["id"])
        listing = c.cli_ok("nodes").stdout
        assert re.search(rf"^node2 +disconnected .* #{first['id']} ", listing, re.M), listing

        refused = c.cli("nodes", "--forget", "node1")
        assert refused.returncode == 4 and "node1 is connected" in refused.stderr, refused

        # Restarted, the master still expects node2, and a job waits for it
        # at most grace (3 s here) before missing it.
        c.restart_master()
        c.wait_node_states({"node1": "connected", "node2": "disconnected"})
        again = c.cli("push", f"{src}/", f"all:{c.shared}/t", timeout=FOLLOW_TIMEOUT)
        assert again.returncode == 6 and "node2: missed" in again.stdout, again.stdout

        # Back, node2 is caught up by the next push.
        c.start_node("node2")
        caught_up = c.cli_json("push", f"{src}/", f"all:{c.shared}/t")
        assert caught_up["state"] == "done", caught_up
        same_tree(src, c.node_dir("node2") / "t")

        c.nodes["node2"].stop()
        c.wait_node_states({"node1": "connected", "node2": "disconnected"})
        forgot = c.cli_ok("nodes", "--forget", "node2")
        assert "forgot node2" in forgot.stdout
        assert [n["name"] for n in c.cli_json("nodes")] == ["node1"]
        only = c.cli_json("push", f"{src}/", f"all:{c.shared}/t")
        assert (only["state"], sorted(only["nodes"])) == ("done", ["node1"]), only
        audit = sqlite3.connect(c.state_dir / "jobs.sqlite").execute(
            "SELECT job, who, detail FROM audit WHERE event = 'forget-node'"
        )
        assert audit.fetchall() == [(0, "operator", '{"node": "node2"}')]
    finally:
        c.close()


@NEEDS_MOUNT_NS
def test_a_large_manifest_is_multicast_to_the_nodes_once(tmp_path: Path) -> None:
    """
    Three nodes that hold no manifest, and a tree whose manifest would
    cost the link more sent over each node's connection, at the job's
    1 Mbit/s, than a delivery's round: the master multicasts it once, each
    node takes its offer by that delivery, and every copy is whole.  The
    same push again finds the nodes holding it, and multicasts nothing.
    """
    c = Cluster(tmp_path)
    try:
        c.start_master()
        nodes = ("node1", "node2", "node3")
        for name in nodes:
            c.add_node(name)
        src = c.base / "src"
        rng = random.Random(21)
        for i in range(500):
            (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
            (src / f"d{i % 5}" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(10, 60)))
        first = c.cli_json("push", "--rate", "1M", f"{src}/", f"all:{c.shared}/t")
        assert first["state"] == "done", first
        for name in nodes:
            same_tree(src, c.node_dir(name) / "t")
            assert "job 1: receiving its manifest by multicast" in c.nodes[name].log(), c.nodes[name].log()
        log = c.master.log()
        assert re.search(r"manifest \(\d+ bytes\) multicast to 3 of 3 in", log), c.diagnostics()
        assert "did not keep the manifest's delivery" not in log, log
        again = c.cli_json("push", "--rate", "1M", f"{src}/", f"all:{c.shared}/t")
        assert again["state"] == "done" and again["sent_bytes"] == 0, again
        assert c.master.log().count("multicast to") == 1, c.master.log()
    finally:
        c.close()


def test_include_and_exclude_rules_choose_and_protect_as_rsync_s_and_quiet_is_quiet(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src-filters"
    for rel in ("top.conf", "keep.log", "etc/a.conf", "etc/a.log", "cache/x.conf"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    rules = c.base / "excludes"
    rules.write_text("# what the nodes do not need\ncache/\n")
    there = c.node_dir("node1") / "filters"
    there.mkdir(parents=True, exist_ok=True)
    (there / "old.conf").write_text("the source no longer has it")
    (there / "local.log").write_text("the node's own")
    # As rsync's, the first rule that matches decides: cache/ goes before the includes.
    pushed = c.cli(
        *("push", "-q", "--delete", "--exclude-from", str(rules), "--include", "*/", "--include", "*.conf"),
        *("--exclude", "*", f"{src}/", f"node1:{c.shared}/filters"),
        timeout=FOLLOW_TIMEOUT,
    )
    assert pushed.returncode == 0 and pushed.stdout == "", f"{pushed.stdout}\n{pushed.stderr}"
    got = sorted(str(p.relative_to(there)) for p in there.rglob("*"))
    # What the rules leave out is neither sent nor deleted: local.log stays, old.conf goes.
    assert got == ["etc", "etc/a.conf", "local.log", "top.conf"], got


def test_verbose_names_each_path_that_failed(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src-verbose"
    for name in ("a", "b", "c"):
        random_file(src / name, 2000, ord(name))
    there = c.node_dir("node1") / "verbose"
    # Where two files should go, directories with something in them: those two fail alone.
    for name in ("a", "c"):
        (there / name / "inside").mkdir(parents=True)
    result = c.cli("push", "-v", f"{src}/", f"node1:{c.shared}/verbose", timeout=FOLLOW_TIMEOUT)
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    failed = [line for line in result.stdout.splitlines() if line.startswith("    ")]
    assert [line.split(":")[0].strip() for line in failed] == ["a", "c"], result.stdout
    quiet = c.cli("push", f"{src}/", f"node1:{c.shared}/verbose", timeout=FOLLOW_TIMEOUT)
    assert quiet.returncode == 1 and not any(line.startswith("    a:") for line in quiet.stdout.splitlines())
    assert (there / "b").read_bytes() == (src / "b").read_bytes()


def test_the_next_push_to_a_directory_removes_part_files_a_failed_job_left(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src-sweep"
    random_file(src / "a.bin", 5000, 8)
    there = c.node_dir("node1") / "sweep"
    there.mkdir(parents=True, exist_ok=True)
    left = there / ".mrsync-00112233deadbeef-0.part"
    left.write_bytes(b"half of a file whose job failed")
    two_days_ago = time.time() - 2 * 86400
    os.utime(left, (two_days_ago, two_days_ago))
    recent = there / ".mrsync-00112233feedf00d-0.part"
    recent.write_bytes(b"a job that may yet resume")
    since = c.nodes["node1"].mark()
    c.cli_ok("push", f"{src}/", f"node1:{c.shared}/sweep", timeout=FOLLOW_TIMEOUT)
    assert not left.exists() and recent.exists()
    assert "removed 1 stale part files under" in c.nodes["node1"].log(since)
    assert sorted(os.listdir(there)) == sorted(["a.bin", recent.name])


def test_set_id_bits_arrive_only_where_the_node_allows_them(fleet: Cluster) -> None:
    """
    A user's set-user-ID file, pushed with --preserve-owner to root nodes:
    node2 (``allow_setid = true``) keeps the bit, node1 clears it.
    """
    c = fleet
    src = c.base / "src-setid"
    src.mkdir()
    support.write_file(str(src / "tool"), b"#!/bin/sh\n", 0o4755)
    destination = c.shared / "pub" / "setid"
    targets = f"node1,node2:{destination}"
    result = c.cli("push", "--preserve-owner", f"{src}/", targets, timeout=FOLLOW_TIMEOUT)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{c.diagnostics()}"
    modes = {
        name: oct(stat.S_IMODE(os.stat(c.node_dir(name) / "pub" / "setid" / "tool").st_mode))
        for name in ("node1", "node2")
    }
    assert modes == {"node1": "0o755", "node2": "0o4755"}, modes


#: The capabilities the node unit's drop-in for --preserve-owner grants its
#: user (OPERATIONS.md §5), as setpriv names them.
OWNER_CAPS = tuple(
    cap.removeprefix("CAP_").lower()
    for line in (Path(REPO) / "etc" / "systemd" / "preserve-owner.conf").read_text().splitlines()
    if line.startswith("AmbientCapabilities=")
    for cap in line.partition("=")[2].split()
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_node_user_with_the_owner_capabilities_sets_owners_and_one_without_does_not(tmp_path: Path) -> None:
    """
    Nodes run as an unprivileged user, not root: with exactly `OWNER_CAPS`
    (ambient, as the drop-in's AmbientCapabilities= gives them) a push
    with --preserve-owner sets owners, modes and (``allow_setid``) the
    set-group-ID bit; with
    only dac_override (to read its key here) owners are left as they are,
    and the push still succeeds.
    """
    assert set(OWNER_CAPS) == {"chown", "fowner", "fsetid", "dac_override"}, OWNER_CAPS
    c = Cluster(tmp_path, mount_ns=False)
    try:
        c.start_master()
        for name, caps in (("capable", OWNER_CAPS), ("plain", ("dac_override",))):
            granted = ",".join(f"+{cap}" for cap in caps)
            wrapper = [
                *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
                f"--inh-caps=-all,{granted}",
                f"--ambient-caps=-all,{granted}",
                f"--bounding-set=-all,{granted}",
            ]
            (c.shared / name).mkdir()
            config = c.node_config(name, roots=[c.shared / name], allow_setid=True)
            c.nodes[name] = Daemon(name, config, c.base / f"{name}.log", wrapper=wrapper)
            c.start_node(name)
        src = c.base / "src-owners"
        src.mkdir()
        support.write_file(str(src / "shared"), b"group work\n", 0o2750)
        os.chown(src / "shared", 1234, 2345)
        os.chmod(src / "shared", 0o2750)  # chown cleared it
        for name in ("capable", "plain"):
            pushed = c.cli("push", "--preserve-owner", f"{src}/", f"{name}:{c.shared / name}/t")
            assert pushed.returncode == 0, f"{pushed.stdout}\n{pushed.stderr}\n{c.diagnostics([name])}"
        capable = os.stat(c.shared / "capable" / "t" / "shared")
        plain = os.stat(c.shared / "plain" / "t" / "shared")
        assert (capable.st_uid, capable.st_gid, stat.S_IMODE(capable.st_mode)) == (1234, 2345, 0o2750)
        assert (plain.st_uid, plain.st_gid) == (65534, 65534)
    finally:
        c.close()


def test_tags_come_from_the_node_certificate(tmp_path: Path) -> None:
    """
    A node is targeted by the tags its certificate grants; its own
    configuration may narrow them, and a tag it claims beyond them is
    ignored and logged: a stolen node key cannot claim @secrets.
    """
    c = Cluster(tmp_path, mount_ns=False)
    try:
        master = c.start_master()
        c.add_node("n1", tags=["rack1"], identity=c.ca.issue("node", "n1", tags=["gpu", "rack1"]))
        c.add_node("n2", tags=["secrets"], identity=c.ca.issue("node", "n2"))
        c.add_node("n3", identity=c.ca.issue("node", "n3", tags=["gpu"]))
        nodes = {n["name"]: sorted(n["tags"]) for n in c.cli_json("nodes")}
        assert nodes == {"n1": ["rack1"], "n2": [], "n3": ["gpu"]}, nodes
        assert "node n2 claims tags its certificate does not grant, ignored: secrets" in master.log()
        src = c.base / "src-tags"
        src.mkdir()
        support.write_file(str(src / "f"), b"x")
        refused = c.cli("push", f"{src}/", f"@secrets:{c.shared}/t")
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "no nodes match '@secrets'" in said, refused
        gpu = c.cli_json("push", f"{src}/", f"@gpu:{c.shared}/t")
        assert sorted(gpu["nodes"]) == ["n3"], gpu
    finally:
        c.close()


def test_revoked_node_and_operator_are_dropped_while_connected(tmp_path: Path) -> None:
    """
    Every daemon reads the CA's revocation list ([tls] crl).  An operator and
    a node, connected, are dropped within seconds of the CA revoking them
    and refused when they dial again; the other node stays.  A node drops a
    master whose certificate is revoked, and does not register with it.
    """
    c = Cluster(tmp_path, crl=True, mount_ns=False)
    try:
        assert c.start_master() is not None
        for name in ("node1", "node2"):
            c.add_node(name)
        c.wait_node_states({"node1": "connected", "node2": "connected"})
        assert c.master is not None
        with AmpClient.connect("127.0.0.1", c.port, c.ca.cert, c.operator) as operator:
            assert b"nodes" in operator.call("ListNodes")
            since = c.master.mark()
            c.ca.revoke(c.operator[0], str(c.base / "certs" / "node2.crt"))
            serial = r"\(serial [0-9a-f]+\)"
            dropped = rf"dropping operator operator at [^:]+: its certificate {serial} was revoked"
            c.master.wait_log(dropped, 10, since)
            c.master.wait_log(r"dropping node node2 at [^:]+: its certificate", 10, since)
            assert operator.closed(10), "the revoked operator's connection stayed open"
        # node2 dials again and again, and is refused each time; node1 stays.
        c.master.wait_log(rf"refused node node2 at [^:]+: its certificate {serial} is revoked", 15, since)
        fresh = c.ca.issue("operator", "fresh-operator")
        states = {n["name"]: n["state"] for n in json.loads(c.cli("nodes", "--json", identity=fresh).stdout)}
        assert states == {"node1": "connected", "node2": "disconnected"}, states
        refused = c.cli("nodes", identity=c.operator)
        assert refused.returncode == 3, refused.stdout
        assert "the master closed the connection as it began: it refuses this certificate" in refused.stderr
        # The master's own certificate revoked: node1 drops it and does not register again.
        node1 = c.nodes["node1"]
        mark = node1.mark()
        c.ca.revoke(c.master_cert[0])
        node1.wait_log(r"dropping master master at [^:]+: its certificate .* was revoked", 10, mark)
        node1.wait_log(r"refused master master at [^:]+: its certificate .* is revoked", 15, mark)
        assert "registered as node1" not in node1.log(mark)
    finally:
        c.close()


# 5. Crashes mid-transfer.


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_cancel_mid_transfer(fleet: Cluster) -> None:
    """A cancelled job stops sending, says so, and leaves no file, whole or part."""
    c = fleet
    size = 48 * MiB
    src = c.base / "src5x"
    random_file(src / "big.bin", size, 53)
    destination = c.shared / "pub" / "t5x"
    job = c.detach("--rate", "50M", f"{src}/", f"node1,node2:{destination}")
    wait_sent(c, job, size // 8)
    cancelled = c.cli("cancel", str(job))
    assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled
    code, status = follow(c, job)
    assert code == 5, f"exit {code}: {status}"
    assert status["state"] == "cancelled" and "cancelled by an operator" in status["message"]
    assert status["sent_bytes"] < size, "it went on sending after the cancel"
    for name in ("node1", "node2"):
        assert not (c.node_dir(name) / "pub" / "t5x" / "big.bin").exists()
        assert part_files(c.node_dir(name) / "pub" / "t5x") == [], "a cancelled job's part files stay"
    again = c.cli("cancel", str(job))
    assert again.returncode == 0 and "cancelled" in again.stdout
    missing = c.cli("cancel", "99999")
    assert missing.returncode == 4 and "no job 99999" in missing.stderr


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_node_killed_mid_transfer_resumes(fleet: Cluster) -> None:
    c = fleet
    size = 48 * MiB
    src = c.base / "src5a"
    random_file(src / "big.bin", size, 51)
    destination = c.shared / "pub" / "t5a"
    # Polled all along: a final path holds nothing, or the whole file.
    watcher = FinalPaths(
        {c.node_dir(n) / "pub" / "t5a" / "big.bin": {content(src / "big.bin")} for n in ("node1", "node2")}
    )
    with watcher:
        job = c.detach("--rate", "100M", f"{src}/", f"node1,node2:{destination}")
        sent_at_kill = wait_sent(c, job, size // 2)
        c.nodes["node1"].kill(signal.SIGKILL)
        final = c.node_dir("node1") / "pub" / "t5a" / "big.bin"
        assert not final.exists(), "a half-received file appeared at its final path"
        assert part_files(c.node_dir("node1") / "pub" / "t5a"), "no part file to resume from"
        c.start_node("node1")

        code, status = follow(c, job)
    print(watcher.check())
    assert code == 0, f"exit {code}: {status}\n{c.diagnostics(['node1'])}"
    assert status["id"] == job and status["state"] == "done"
    assert {n: s["state"] for n, s in status["nodes"].items()} == {"node1": "done", "node2": "done"}
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "t5a")
        assert part_files(c.node_dir(name) / "pub" / "t5a") == [], f"part files left on {name}"
    # Starting over would cost the whole file again on top of everything
    # sent so far; resuming re-sends only what node1 did not hold yet.
    assert status["sent_bytes"] < 2 * size - sent_at_kill // 2, (
        f"{status['sent_bytes']} bytes sent for a {size}-byte file, {sent_at_kill} of them before the kill:"
        " node1 started over instead of resuming from its part file"
    )


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_node_killed_while_small_files_are_placed_in_batches_resumes(fleet: Cluster) -> None:
    """
    A tree of small files, each placed with others in a batch
    (`storage.place_batch`): the node is killed while batches are being
    placed.  Every final path holds, at every moment, nothing or the whole
    new file (some of them an old copy to be replaced), and after a restart
    the job ends with every file in place and no part file left.
    """
    c = fleet
    src = c.base / "src5s"
    rng = random.Random(55)
    files = [f"d{n % 20:02d}/f{n:04d}" for n in range(1500)]
    for n, rel in enumerate(files):
        random_file(src / rel, rng.randrange(1, 20_000), 5500 + n)
    size = sum((src / rel).stat().st_size for rel in files)
    destination = c.shared / "pub" / "t5s"
    old = c.node_dir("node1") / "pub" / "t5s"
    for rel in files[::50]:  # old copies, replaced only whole
        random_file(old / rel, 100, 1)
    accepted = {c.node_dir("node1") / "pub" / "t5s" / rel: {content(src / rel)} for rel in files}
    for rel in files[::50]:
        accepted[old / rel].add(content(old / rel))
    with FinalPaths(accepted) as watcher:
        job = c.detach("--rate", "20M", f"{src}/", f"node1:{destination}")
        wait_sent(c, job, size // 3)
        c.nodes["node1"].kill(signal.SIGKILL)
        c.start_node("node1")
        code, status = follow(c, job)
    print(watcher.check())
    assert code == 0, f"exit {code}: {status}\n{c.diagnostics(['node1'])}"
    same_tree(src, c.node_dir("node1") / "pub" / "t5s")
    assert part_files(c.node_dir("node1") / "pub" / "t5s") == []


#: ext4's shutdown ioctl (``EXT4_IOC_SHUTDOWN``) and its flag to drop the
#: journal's unwritten end: xfstests' way (``godown``) to lose power.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


def loop_ext4(image: Path, where: Path) -> str:
    """
    Mount ``image`` at ``where`` on a loop device of its own, which is
    returned.  Not ``mount -o loop``: that reuses a device still attached
    to the image, and a mount namespace that a test on another worker made
    while the image was mounted keeps the first device alive, and with it
    the file system the power cut shut down (every read: EIO).
    """
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["mount", device, str(where)], check=True, capture_output=True)
    return device


def can_lose_power() -> bool:
    """A loop device and ext4 here (not in every container)?"""
    return can_unshare() and shutil.which("mkfs.ext4") is not None and os.path.exists("/dev/loop-control")


@pytest.mark.lan
@NEEDS_MOUNT_NS
@pytest.mark.skipif(not can_lose_power(), reason="needs root, loop devices and mkfs.ext4")
def test_power_lost_while_small_files_are_placed_leaves_old_or_new_files(fleet: Cluster) -> None:
    """
    The node's disk loses power while batches of small files are placed:
    ext4 is shut down without writing the rest of its journal, so whatever
    was not made durable is gone, as after a power cut (an unsynced new file
    comes back empty).  After the file system is mounted again every final
    path holds the old file or the whole new one, never an empty or partial
    one; and the job, resumed, ends with every file in place.
    """
    c = fleet
    src = c.base / "src5p"
    rng = random.Random(56)
    files = [f"d{n % 20:02d}/f{n:04d}" for n in range(1500)]
    for n, rel in enumerate(files):
        random_file(src / rel, rng.randrange(1, 20_000), 7500 + n)
    size = sum((src / rel).stat().st_size for rel in files)
    disk, image = c.node_dir("node1"), c.base / "node1-ext4.img"
    node = c.nodes["node1"]
    node.stop()
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    devices = [loop_ext4(image, disk)]
    try:
        old = disk / "pub" / "t5p"
        for rel in files[::50]:  # old copies, to be replaced only whole
            random_file(old / rel, 100, 1)
        os.sync()
        accepted = {rel: {content(src / rel)} for rel in files}
        for rel in files[::50]:
            accepted[rel].add(content(old / rel))
        c.start_node("node1")
        c.wait_node_states(ALL_CONNECTED)
        job = c.detach("--rate", "20M", f"{src}/", f"node1:{c.shared / 'pub' / 't5p'}")
        wait_sent(c, job, size // 3)
        # The moment of the power cut: the node does nothing more.
        node.kill(signal.SIGSTOP)
        fd = os.open(disk, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        node.kill(signal.SIGKILL)
        subprocess.run(["umount", str(disk)], check=True)
        devices.append(loop_ext4(image, disk))  # the journal is replayed
        placed = 0
        for rel, contents in accepted.items():
            try:
                found = content(old / rel)
            except FileNotFoundError:
                continue
            assert found in contents, f"{rel} after the power cut: {found}, expected one of {contents}"
            placed += found == content(src / rel)
        print(f"after the power cut: {placed} of {len(files)} new files in place")
        assert 0 < placed < len(files), "the power cut should come in the middle of the push"
        c.start_node("node1")
        code, status = follow(c, job)
        assert code == 0, f"exit {code}: {status}\n{c.diagnostics(['node1'])}"
        same_tree(src, old)
        assert part_files(old) == []
    finally:
        node.stop()
        subprocess.run(["umount", str(disk)], capture_output=True)
        for device in devices:  # a device still busy elsewhere goes once it is not
            subprocess.run(["losetup", "--detach", device], capture_output=True)
        image.unlink(missing_ok=True)


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_master_killed_mid_job_resumes(fleet: Cluster) -> None:
    c = fleet
    assert c.master is not None
    # History: a finished job before the crash.
    small = c.base / "src5b-small"
    random_file(small / "s.bin", 10_000, 52)
    earlier = c.cli_json("push", f"{small}/", f"node3:{c.shared}/pub/t5b-earlier")
    assert earlier["state"] == "done"
    history_before = {j["id"]: (j["state"], j["spec"]["destination"]) for j in c.cli_json("jobs")}

    size = 48 * MiB
    src = c.base / "src5b"
    random_file(src / "big.bin", size, 53)
    random_file(src / "small.txt", 5000, 54)
    destination = c.shared / "pub" / "t5b"
    # Polled all along: a final path holds nothing, or the whole file.
    watcher = FinalPaths(
        {
            c.node_dir(n) / "pub" / "t5b" / name: {content(src / name)}
            for n in ("node1", "node2")
            for name in ("big.bin", "small.txt")
        }
    )
    with watcher:
        job = c.detach("--rate", "100M", f"{src}/", f"node1,node2:{destination}")
        wait_sent(c, job, size // 2)
        c.master.kill(signal.SIGKILL)
        since = c.master.start()
        c.master.wait_log("master listening", 20, since)
        # Every node finds the master again by itself.
        c.wait_node_states(ALL_CONNECTED, timeout=30)

        history_after = {j["id"]: (j["state"], j["spec"]["destination"]) for j in c.cli_json("jobs")}
        for old, (state, dest) in history_before.items():
            if old != job:
                assert history_after.get(old) == (state, dest), f"job {old} changed across the restart"
        assert history_after[earlier["id"]] == ("done", f"{c.shared}/pub/t5b-earlier")

        code, status = follow(c, job)
    print(watcher.check())
    assert status["id"] == job
    assert code == 0 and status["state"] == "done", (
        f"job {job} after the master restart: exit {code}, {status['state']}: {status['message']}"
        f" {status['nodes']}\n{c.diagnostics()}"
    )
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "t5b")


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_master_stopped_cleanly_mid_job_resumes_from_part_files(fleet: Cluster) -> None:
    """
    A clean stop (systemctl restart, a package upgrade) interrupts the job
    without a word to the nodes: they keep their part files, and the job,
    resumed when the master is back, sends only what they lack.
    """
    c = fleet
    assert c.master is not None
    size = 48 * MiB
    src, destination, job, sent_at_stop = half_sent_job(c, "5d", size, 56)
    # twistd shuts down on SIGTERM and then ends with that signal, as systemd expects.
    assert c.master.stop() in (0, -signal.SIGTERM), "the master did not stop on SIGTERM"
    for name in ("node1", "node2"):
        assert part_files(c.node_dir(name) / "pub" / "t5d"), f"{name} has no part file to resume from"
    since = c.master.start()
    c.master.wait_log(rf"job {job} started \(resumed\)", 30, since)
    code, status = follow(c, job)
    assert code == 0 and status["state"] == "done", (
        f"job {job} after the clean restart: exit {code}, {status['state']}: {status['message']}"
        f" {status['nodes']}\n{c.diagnostics()}"
    )
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "t5d")
        assert part_files(c.node_dir(name) / "pub" / "t5d") == [], f"part files left on {name}"
    # What each node asked for when the job resumed: the part of the file it
    # did not hold yet, not the whole file again.
    for name in ("node1", "node2"):
        needed = status["nodes"][name]["needed_bytes"]
        assert needed < size - sent_at_stop // 2, (
            f"{name} needed {needed} bytes of a {size}-byte file after the restart, {sent_at_stop} having"
            f" been sent before the stop: it started over instead of resuming from its part file"
        )


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_master_and_node_killed_node_back_later(fleet: Cluster) -> None:
    """
    The master and one target crash together.  Restarted, the master waits
    for the nodes it knows to register again, for at most the grace period
    (20 s here), before it resumes the job: the late one is waited for
    rather than failed or missed.
    """
    c = fleet
    assert c.master is not None
    src, _, job, _ = half_sent_job(c, "5c", 24 * MiB, 55)
    c.nodes["node2"].kill(signal.SIGKILL)
    c.master.kill(signal.SIGKILL)
    since = c.master.start()
    c.wait_registered("node1", since, timeout=30)
    time.sleep(2.0)
    assert f"job {job} started" not in c.master.log(since), c.master.log(since)
    registered = c.master.mark()
    c.start_node("node2")
    c.master.wait_log(rf"job {job} started \(resumed\) for node1, node2", 10, registered)

    code, status = follow(c, job)
    assert code == 0 and status["state"] == "done", (
        f"job {job}: exit {code}, {status['state']}: {status['message']} {status['nodes']}\n{c.diagnostics()}"
    )
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "pub" / "t5c")


# 5b. Ctrl-C at the operator's terminal.


def pushing(c: Cluster, tag: str, seed: int) -> tuple[subprocess.Popen[str], int, str]:
    """
    ``mrsync push`` of a 32 MiB file to node1 and node2 at 20 Mbit/s,
    running: the process, its job and where the file goes, once some of it
    is sent.
    """
    src = c.base / f"src{tag}"
    random_file(src / "big.bin", 32 * MiB, seed)
    proc = c.cli_popen("push", "--rate", "20M", f"{src}/", f"node1,node2:{c.shared}/pub/t{tag}")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    submitted = re.match(r"job (\d+) submitted", line)
    assert submitted, f"mrsync push printed {line!r} first"
    job = int(submitted.group(1))
    wait_sent(c, job, MiB)
    return proc, job, f"pub/t{tag}/big.bin"


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_ctrl_c_during_push_cancels_its_job_reports_and_exits_130(fleet: Cluster) -> None:
    c = fleet
    proc, job, path = pushing(c, "8a", 80)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=FOLLOW_TIMEOUT)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "Traceback" not in err and f"cancelling job {job}" in err, err
    assert f"job {job} cancelled" in out and "node1:" in out and "node2:" in out, out
    assert c.status(job)["state"] == "cancelled"
    for name in ("node1", "node2"):
        assert not (c.node_dir(name) / path).exists(), f"a cancelled file appeared on {name}"


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_a_second_ctrl_c_leaves_at_once_and_the_job_is_still_cancelled(fleet: Cluster) -> None:
    c = fleet
    proc, job, _ = pushing(c, "8b", 81)
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    heard = proc.stderr.readline()
    assert f"cancelling job {job}" in heard, heard
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130
    assert "Traceback" not in proc.stderr.read()
    cancelled = wait_for(
        lambda: c.status(job), lambda s: s["state"] in FINISHED, 30, f"job {job} ended", c.diagnostics
    )
    assert cancelled["state"] == "cancelled", cancelled


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_ctrl_c_during_status_follow_only_stops_following(fleet: Cluster) -> None:
    c = fleet
    src = c.base / "src8c"
    random_file(src / "big.bin", 32 * MiB, 82)
    job = c.detach("--rate", "20M", f"{src}/", f"node1,node2:{c.shared}/pub/t8c")
    wait_sent(c, job, MiB)
    proc = c.cli_popen("status", str(job), "--follow")
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(f"job {job}")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130
    assert "Traceback" not in proc.stderr.read()
    assert c.status(job)["state"] == "running"
    c.cli_ok("cancel", str(job))


# 6. Jobs side by side.


@pytest.mark.lan
@NEEDS_MOUNT_NS
def test_four_concurrent_jobs(fleet: Cluster) -> None:
    c = fleet
    sources = []
    for i in range(4):
        src = c.base / f"src6-{i}"
        random_file(src / "data.bin", 3 * MiB + i * 1000, 60 + i)
        random_file(src / "d" / "small", 100 + i, 70 + i)
        os.chmod(src / "d" / "small", 0o640)
        sources.append(src)
    # Submitted at once, each capped so that they overlap.
    submits = [
        c.cli_popen("push", "--detach", "--json", "--rate", "12M", f"{src}/", f"all:{c.shared}/pub/t6-{i}")
        for i, src in enumerate(sources)
    ]
    jobs = []
    for proc in submits:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        jobs.append(int(json.loads(out)["job"]))
    assert len(set(jobs)) == 4
    followers = [c.cli_popen("status", str(job), "--follow", "--json") for job in jobs]
    statuses = []
    for job, proc in zip(jobs, followers, strict=True):
        out, err = proc.communicate(timeout=FOLLOW_TIMEOUT)
        assert proc.returncode == 0, f"job {job}: exit {proc.returncode}: {out} {err}\n{c.diagnostics()}"
        status = json.loads(out)
        assert status["id"] == job and status["state"] == "done", status
        assert sorted(status["nodes"]) == sorted(NODES)
        statuses.append(status)
    assert max(s["started"] for s in statuses) < min(s["finished"] for s in statuses), (
        "the four jobs did not run at the same time: "
        f"{[(s['id'], s['started'], s['finished']) for s in statuses]}"
    )
    for i, src in enumerate(sources):
        for name in NODES:
            same_tree(src, c.node_dir(name) / "pub" / f"t6-{i}")


# The same daemons across hosts: a LAN of network namespaces.


@pytest.mark.lan
def test_push_across_a_lan(lan: Any, tmp_path: Path) -> None:
    """
    The deployment shape: the master on one host, three nodes on others,
    multicast on eth0 across a bridge with loopback off, nodes dialling the
    master by its address, the operator on the master's host.
    """
    net = lan(nodes=3)
    c = Cluster(
        tmp_path, host=net.master.ipv4, interface="eth0", loopback=False, master_netns=net.master.netns
    )
    try:
        c.start_master()
        for host in net.nodes:
            c.add_node(host.name, netns=host.netns, wait=False)
        for host in net.nodes:
            c.wait_registered(host.name, 0)
        nodes = {n["name"]: n for n in c.cli_json("nodes")}
        assert {name: n["address"] for name, n in nodes.items()} == {h.name: h.ipv4 for h in net.nodes}
        src = tmp_path / "src"
        support.make_full_tree(str(src))
        status = c.cli_json("push", f"{src}/", f"all:{c.shared}/tree")
        assert status["state"] == "done", f"{status}\n{c.diagnostics()}"
        assert sorted(status["nodes"]) == [h.name for h in net.nodes]
        for host in net.nodes:
            same_tree(src, c.node_dir(host.name) / "tree")
    finally:
        c.close()


# 7. Configuration errors stop the daemon at once, naming file and key.


CONFIG_ERRORS = {
    "unknown-key": (
        {"node": {"master": "127.0.0.1:7718", "roots": ["/srv"], "colour": "blue"}},
        ["colour", "[node]"],
    ),
    "bad-port": ({"master": {"port": 70000}}, ["port", "70000"]),
    "bad-type": ({"node": {"master": "127.0.0.1:7718", "roots": "/srv"}}, ["roots"]),
    "unknown-section": ({"nodes": {"roots": ["/srv"]}}, ["nodes"]),
    "bad-group": ({"master": {"group": "10.1.2.3"}}, ["group", "10.1.2.3"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_stops_startup(tmp_path: Path, case: str) -> None:
    sections, names = CONFIG_ERRORS[case]
    path = write_toml(tmp_path / f"{case}.toml", sections)
    daemon = Daemon(case, path, tmp_path / f"{case}.log")
    daemon.start()
    try:
        assert daemon.proc is not None
        code = daemon.proc.wait(30)
    finally:
        daemon.stop()
    said = daemon.log()
    assert "master listening" not in said and "registered as" not in said, said
    assert str(path) in said, f"the message does not name the file:\n{said}"
    for name in names:
        assert name in said, f"the message does not name {name!r}:\n{said}"
    assert code == EXIT_CONFIG, f"twistd exited {code} after a configuration error:\n{said}"


def start_once(config: Path, cwd: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """``twistd mrsyncd --config CONFIG`` in the foreground, to stop at once: how, and what it said."""
    result = subprocess.run(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "mrsyncd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment(),
        cwd=cwd,
    )
    return result, result.stdout + result.stderr


def test_the_units_do_not_restart_a_daemon_stopped_by_its_configuration() -> None:
    for unit in sorted(Path(REPO, "debian").glob("*.service")):
        settings = support.unit_settings(unit)
        assert settings.get("Restart") == "on-failure", unit
        assert str(EXIT_CONFIG) in settings.get("RestartPreventExitStatus", "").split(), (
            f"{unit.name} restarts every {settings.get('RestartSec')} s on a configuration error"
        )


def test_a_certificate_holds_at_most_its_share_of_connections(tmp_path: Path) -> None:
    """
    ``[master] max_connections_per_certificate``: one more connection with
    the same certificate is dropped (and logged); one closed makes room; other
    certificates are not counted against it.
    """
    c = Cluster(tmp_path, max_connections_per_certificate=2)
    try:
        master = c.start_master()
        since = master.mark()
        held = [AmpClient.connect("127.0.0.1", c.port, c.ca.cert, c.operator) for _ in range(2)]
        for client in held:
            assert b"nodes" in client.call("ListNodes")
        extra = AmpClient.connect("127.0.0.1", c.port, c.ca.cert, c.operator)
        assert extra.closed(10), "a third connection with the same certificate was kept"
        master.wait_log(r"refusing a connection from operator .*already holds 2", since=since)
        other = AmpClient.connect("127.0.0.1", c.port, c.ca.cert, c.ca.issue("operator", "ops2"))
        assert b"nodes" in other.call("ListNodes")
        held.pop().close()
        time.sleep(0.2)
        again = AmpClient.connect("127.0.0.1", c.port, c.ca.cert, c.operator)
        assert b"nodes" in again.call("ListNodes")
        for client in (*held, other, again):
            client.close()
    finally:
        c.close()


def test_the_units_bound_memory_tasks_and_descriptors() -> None:
    """
    Above what the daemons were measured to need (a node 237 MiB and the
    master 410 MiB for 100,000 files; a reactor, a thread pool of 10 and a
    hook), and below what would let one runaway daemon take the host.
    """
    sizes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for unit in sorted(Path(REPO, "debian").glob("*.service")):
        settings = support.unit_settings(unit)
        memory = settings["MemoryMax"]
        memory_bytes = int(memory[:-1]) * sizes[memory[-1]]
        assert 1 << 30 <= memory_bytes <= 16 << 30, (unit.name, memory)
        assert 32 <= int(settings["TasksMax"]) <= 1024, unit.name
        assert 1024 <= int(settings["LimitNOFILE"]) <= 1 << 20, unit.name


def test_missing_certificate_file_stops_startup(tmp_path: Path) -> None:
    state = tmp_path / "state"
    missing = tmp_path / "nowhere" / "ca.crt"
    path = write_toml(
        tmp_path / "tls.toml",
        {
            "tls": {"ca": missing, "certificate": tmp_path / "m.crt", "key": tmp_path / "m.key"},
            "master": {"address": "127.0.0.1", "port": 1, "state_dir": state, "sources": ["/srv"]},
        },
    )
    result, said = start_once(path, tmp_path)
    assert result.returncode == EXIT_CONFIG, said
    assert str(path) in said and str(missing) in said, said
    assert "master listening" not in said


@pytest.mark.parametrize("case", ["expired-master", "expired-node", "missing-crl"])
def test_an_expired_own_certificate_or_a_missing_crl_stops_startup(tmp_path: Path, case: str) -> None:
    ca = CA(tmp_path / "ca", tmp_path / "certs")
    if case == "expired-node":
        cert, key = ca.issue("node", "n1", expired=True)
        body: dict[str, Any] = {"node": {"master": "127.0.0.1:1", "roots": [str(tmp_path)]}}
    else:
        cert, key = ca.issue("master", "m", expired=case == "expired-master")
        state = str(tmp_path / "state")
        body = {"master": {"address": "127.0.0.1", "port": 1, "state_dir": state, "sources": ["/"]}}
    tls_section = {"ca": ca.cert, "certificate": cert, "key": key}
    if case == "missing-crl":
        tls_section["crl"] = str(tmp_path / "ca" / "crl.pem")
    path = write_toml(tmp_path / "daemon.toml", {"tls": tls_section, **body})
    result, said = start_once(path, tmp_path)
    assert result.returncode == EXIT_CONFIG, said
    wanted = "crl.pem: No such file" if case == "missing-crl" else "certificate valid only from"
    assert wanted in said and str(path) in said, said
