"""
Faults, with real daemons (mrsyncd/testing/cluster.py) driven as an operator would:
what survives a full disk, a read-only directory, a source file that
changes while it is sent, and a node whose link goes down for ten seconds.

In every case: no partial or corrupt file at any final path at any time
(`FinalPaths` polls them from a thread while the job runs), every healthy
node completes, the affected node completes after recovery or is reported
failed with the reason, and the master keeps serving other jobs (a small
job is pushed during or after the fault and must complete).

The two crashes (a node, and the master, killed with SIGKILL mid-job and
restarted) are tests/system/test_daemon.py's ``test_node_killed_mid_transfer_resumes``
and ``test_master_killed_mid_job_resumes``, which poll the final paths the
same way.

Everything here needs root (mount namespaces, tmpfs, nsenter, network
namespaces), hence the ``lan`` mark.  Each test is bounded in time: every
wait has a timeout, and `time_limit` stops a test that still runs after
its budget.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mrsyncd.testing.cluster import (
    AmpClient,
    Cluster,
    FinalPaths,
    can_unshare,
    content,
    operator_fleet,
    part_files,
    random_file,
    same_tree,
    time_limit,
    wait_for,
)

pytestmark = [
    pytest.mark.lan,
    pytest.mark.skipif(not can_unshare(), reason="needs root: mount namespaces, tmpfs and nsenter"),
]

MiB = 1 << 20
#: The node whose root is a small tmpfs, and its size.
SMALL = "small"
SMALL_FS = 20 * MiB
#: The longest any one job here may take before it counts as hung.
JOB_TIMEOUT = 90.0


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    with time_limit(240):
        yield


def spec(src: Path, targets: str, destination: Path, rate: float | None = None) -> dict[str, Any]:
    return {"sources": [f"{src}/"], "destination": str(destination), "targets": targets, "rate": rate}


def wait_sent(client: AmpClient, job: int, at_least: int, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until the master has sent ``at_least`` payload bytes of a job that still runs."""

    def sent(status: dict[str, Any]) -> int:
        return int((status.get("progress") or {}).get("sent_bytes", 0))

    status = wait_for(
        lambda: client.status(job),
        lambda s: sent(s) >= at_least or s["state"] in ("done", "failed", "cancelled"),
        timeout,
        f"job {job} having sent {at_least} bytes",
        interval=0.02,
    )
    assert status["state"] == "running", f"job {job} ended before the fault: {status}"
    return status


def node_states(status: dict[str, Any]) -> dict[str, str]:
    return {name: node["state"] for name, node in status["nodes"].items()}


def small_job(c: Cluster, client: AmpClient, targets: str, label: str) -> float:
    """Push a small tree to ``targets`` and check it arrived everywhere: the master still serves."""
    src = c.base / f"small-{label}"
    random_file(src / "s.bin", 200_000, hash(label) & 0xFFFF)
    (src / "d").mkdir(exist_ok=True)
    (src / "d" / "t.txt").write_text(f"{label}\n")
    destination = c.shared / f"small-{label}"
    started = time.monotonic()
    job = client.submit(spec(src, targets, destination))
    status = client.wait_job(job, JOB_TIMEOUT)
    assert status["state"] == "done", f"the small job {label} did not complete: {status}\n{c.diagnostics()}"
    for name in targets.split(","):
        same_tree(src, c.node_dir(name) / f"small-{label}")
    return time.monotonic() - started


# The cluster: a master and three nodes on this host's loopback, each node in
# a mount namespace of its own; the root of node "small" is a 20 MB tmpfs.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("faults"))
    small_root = c.node_dir(SMALL)
    small_root.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "mrsyncd-test", str(small_root)], check=True
    )
    try:
        c.start_master()
        for name in ("node1", "node2", SMALL):
            c.add_node(name, wait=False)
        for name in ("node1", "node2", SMALL):
            c.wait_registered(name, 0)
        yield c
    finally:
        c.close()
        subprocess.run(["umount", "-l", str(small_root)], check=False)


@pytest.fixture
def fleet(cluster: Cluster) -> Iterator[tuple[Cluster, AmpClient]]:
    """The cluster with every daemon up and connected, and an operator's connection to its master."""
    with operator_fleet(cluster) as client:
        yield cluster, client


# A full disk.


def test_disk_too_small_is_refused_before_data(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    50 MB to three nodes, one of which has a 20 MB filesystem: that one
    refuses the offer (it needs N bytes and is short by M) before any data
    is sent, the two others complete, and the small node then takes a job
    that fits.
    """
    c, client = fleet
    assert c.master is not None
    src = c.base / "full1"
    random_file(src / "big.bin", 50 * MiB, 1)
    (src / "note.txt").write_text("beside a big file\n")
    destination = c.shared / "full1"
    small_final = c.node_dir(SMALL) / "full1" / "big.bin"
    since = c.master.mark()
    with FinalPaths({small_final: set()}) as watcher:
        job = client.submit(spec(src, f"node1,node2,{SMALL}", destination))
        status = client.wait_job(job, JOB_TIMEOUT)
    print(watcher.check())
    assert status["state"] == "failed", status
    assert node_states(status) == {"node1": "done", "node2": "done", SMALL: "failed"}, status["nodes"]
    reason = status["nodes"][SMALL]["reason"]
    found = re.search(r"needs (\d+) bytes under \S+ but only (\d+) are free \((\d+) bytes short\)", reason)
    assert found, f"no clear reason: {reason!r}"
    needed, free, short = map(int, found.groups())
    assert needed >= 50 * MiB and free <= SMALL_FS and short == needed - free, reason
    assert "refused the transfer" in reason
    assert status["message"] == f"failed on 1 of 3 nodes: {SMALL}", status["message"]
    assert re.search(rf"{SMALL} failed: refused the transfer: needs \d+ bytes", c.master.log(since))
    # Refused before data: nothing of the file ever reached the small node.
    assert not (c.node_dir(SMALL) / "full1" / "big.bin").exists()
    assert part_files(c.node_dir(SMALL)) == []
    for name in ("node1", "node2"):
        same_tree(src, c.node_dir(name) / "full1")
    # The node and the master go on: a job that fits completes.
    small_job(c, client, f"node1,{SMALL}", "after-full1")


def test_disk_fills_up_mid_transfer(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    12 MB fits the small node's 20 MB when offered, but another writer fills
    its disk once data flows: its file fails with "No space left on device"
    and its part file goes; the healthy node completes; with the space back,
    the same push completes there too.
    """
    c, client = fleet
    src = c.base / "full2"
    random_file(src / "big.bin", 12 * MiB, 2)
    destination = c.shared / "full2"
    finals = {
        c.node_dir(SMALL) / "full2" / "big.bin": set(),
        c.node_dir("node1") / "full2" / "big.bin": {content(src / "big.bin")},
    }
    filler = c.node_dir(SMALL) / "filler"
    filled = 0
    try:
        with FinalPaths(finals) as watcher:
            job = client.submit(spec(src, f"node1,{SMALL}", destination, rate=24e6))
            wait_sent(client, job, 1 * MiB)
            with open(filler, "wb") as f:
                try:
                    while True:
                        filled += f.write(bytes(MiB))
                        f.flush()
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
            # The master serves another job while the disk is full.
            during = small_job(c, client, "node1", "during-full2")
            status = client.wait_job(job, JOB_TIMEOUT)
        print(watcher.check(), f"filler {filled} bytes, small job during the fault in {during:.1f} s")
        assert status["state"] == "failed", status
        assert node_states(status) == {"node1": "done", SMALL: "failed"}, status["nodes"]
        reason = status["nodes"][SMALL]["reason"]
        assert "big.bin" in reason and "No space left on device" in reason, reason
        assert status["files"][SMALL]["big.bin"].startswith("cannot write"), status["files"][SMALL]
        same_tree(src, c.node_dir("node1") / "full2")
        assert not (c.node_dir(SMALL) / "full2" / "big.bin").exists()
        assert part_files(c.node_dir(SMALL) / "full2") == [], "the failed file's part file was left behind"
    finally:
        filler.unlink(missing_ok=True)
    # Space is back: the same push completes on the small node.
    job = client.submit(spec(src, SMALL, destination))
    status = client.wait_job(job, JOB_TIMEOUT)
    assert status["state"] == "done", status
    same_tree(src, c.node_dir(SMALL) / "full2")


# A directory that cannot be written.


def nsenter_mount(daemon_pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``mount ARGS`` (or any command) in the mount namespace of a node's process."""
    return subprocess.run(
        ["nsenter", "-t", str(daemon_pid), "-m", "--", *args], capture_output=True, text=True, timeout=20
    )


def test_destination_subdirectory_made_read_only_mid_job(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    A subdirectory of the destination on one node becomes read-only while
    its files are received (a read-only bind mount over it, in that node's
    mount namespace, which stops root as well): that node reports its files
    there failed with the reason, the rest of its tree and the other node
    complete, it takes other jobs meanwhile, and once the directory is
    writable again the same push completes.
    """
    c, client = fleet
    src = c.base / "ro"
    random_file(src / "a.bin", MiB, 3)
    random_file(src / "sub" / "big.bin", 16 * MiB, 4)
    (src / "sub" / "s.txt").write_text("small, in the same directory\n")
    destination = c.shared / "ro"
    big = {content(src / "sub" / "big.bin")}
    finals = {
        c.node_dir("node1") / "ro" / "sub" / "big.bin": big,
        c.node_dir("node2") / "ro" / "sub" / "big.bin": set(),
        c.node_dir("node2") / "ro" / "sub" / "s.txt": set(),
    }
    node2 = c.nodes["node2"]
    assert node2.proc is not None
    locked = str(destination / "sub")  # as node2 sees it, in its own mount namespace
    mounted = False
    try:
        with FinalPaths(finals) as watcher:
            job = client.submit(spec(src, "node1,node2", destination, rate=24e6))
            wait_sent(client, job, 2 * MiB)
            # big.bin's part file is open for writing before the directory is
            # locked: one opened through the new bind mount would make the
            # remount fail with EBUSY (a receiver opens a part file when it
            # writes the file's first chunk).
            wait_for(
                lambda: part_files(c.node_dir("node2") / "ro" / "sub"),
                bool,
                20,
                "node2's part file of sub/big.bin",
            )
            for args in (["mount", "--bind", locked, locked], ["mount", "-o", "remount,bind,ro", locked]):
                done = nsenter_mount(node2.proc.pid, *args)
                assert done.returncode == 0, f"{args}: {done.stderr}"
                mounted = True
            probe = nsenter_mount(node2.proc.pid, "touch", f"{locked}/.probe")
            assert probe.returncode != 0 and "Read-only" in probe.stderr, probe
            during = small_job(c, client, "node1,node2", "during-ro")
            status = client.wait_job(job, JOB_TIMEOUT)
        print(watcher.check(), f"small job during the fault in {during:.1f} s")
        assert status["state"] == "failed", status
        assert node_states(status) == {"node1": "done", "node2": "failed"}, status["nodes"]
        reason = status["nodes"]["node2"]["reason"]
        files = status["files"]["node2"]
        print("node2:", reason, files)
        assert "Read-only file system" in reason, reason
        assert "Read-only file system" in files["sub/big.bin"], files
        assert files["a.bin"] == "ok", files
        same_tree(src, c.node_dir("node1") / "ro")
        assert (c.node_dir("node2") / "ro" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    finally:
        if mounted:
            nsenter_mount(node2.proc.pid, "umount", locked)
    job = client.submit(spec(src, "node2", destination))
    status = client.wait_job(job, JOB_TIMEOUT)
    assert status["state"] == "done", status
    # The tree is whole again.  The failed file's part file could not be
    # removed from the read-only directory, so it is still there: remove it,
    # and push once more so that the directory has its mtime back.
    stale = part_files(c.node_dir("node2") / "ro")
    print("left by the failed transfer:", stale)
    assert len(stale) <= 1, stale
    for path in stale:
        os.unlink(path)
    status = client.wait_job(client.submit(spec(src, "node2", destination)), JOB_TIMEOUT)
    assert status["state"] == "done" and status["sent_bytes"] == 0, status
    same_tree(src, c.node_dir("node2") / "ro")


# A source that changes while it is sent.


def test_source_file_changed_while_sent(fleet: tuple[Cluster, AmpClient]) -> None:
    """
    A file on the master changes after it was scanned and before its last
    chunk is sent: the sender gives it up, every node reports that file
    failed with "sender gave up: ... source changed" and keeps its old
    copy, the other file of the job arrives, and the next push completes.
    """
    c, client = fleet
    assert c.master is not None
    src = c.base / "changing"
    size = 8 * MiB
    random_file(src / "big.bin", size, 5)
    (src / "other.txt").write_text("version 1\n")
    destination = c.shared / "changing"
    targets = ("node1", "node2")
    first = client.wait_job(client.submit(spec(src, ",".join(targets), destination)), JOB_TIMEOUT)
    assert first["state"] == "done", first
    v1 = {name: content(src / name) for name in ("big.bin", "other.txt")}

    random_file(src / "big.bin", size, 6)
    (src / "other.txt").write_text("version 2\n")
    v2_other = content(src / "other.txt")
    finals = {c.node_dir(n) / "changing" / "big.bin": {v1["big.bin"]} for n in targets}
    finals.update({c.node_dir(n) / "changing" / "other.txt": {v1["other.txt"], v2_other} for n in targets})
    since = c.master.mark()
    with FinalPaths(finals) as watcher:
        job = client.submit(spec(src, ",".join(targets), destination, rate=16e6))
        wait_sent(client, job, MiB)
        with open(src / "big.bin", "r+b") as f:
            f.seek(size - MiB)
            f.write(random.Random(7).randbytes(MiB))
        status = client.wait_job(job, JOB_TIMEOUT)
        during = small_job(c, client, ",".join(targets), "after-changing")
    print(watcher.check(), f"small job after the fault in {during:.1f} s")
    assert status["state"] == "failed", status
    assert node_states(status) == dict.fromkeys(targets, "failed"), status["nodes"]
    for name in targets:
        reason = status["nodes"][name]["reason"]
        print(f"{name}: {reason}")
        assert re.search(r"big\.bin: sender gave up: .*source changed", reason), reason
        files = status["files"][name]
        assert files["other.txt"] == "ok", files
        assert files["big.bin"].startswith("sender gave up"), files
        here = c.node_dir(name) / "changing"
        assert content(here / "big.bin") == v1["big.bin"], f"{name}: the old copy was not kept"
        assert content(here / "other.txt") == v2_other
        assert part_files(here) == [], part_files(here)
    assert "abandoning" in c.master.log(since) and "source changed" in c.master.log(since)
    # The source holds still now: the next push brings it.
    job = client.submit(spec(src, ",".join(targets), destination))
    status = client.wait_job(job, JOB_TIMEOUT)
    assert status["state"] == "done", status
    for name in targets:
        same_tree(src, c.node_dir(name) / "changing")


# A node's link down for ten seconds, on a LAN of network namespaces.

OUTAGE = 10.0


def _outage(c: Cluster, net: Any, job: int, host: Any, during: str) -> tuple[float, float]:
    """
    Take ``host``'s link down for `OUTAGE` seconds once ``job`` has sent a
    fifth of its data; meanwhile push a small job to the other node.
    Returns when the link went down, and how long the small job took.
    """
    wait_for(
        lambda: c.status(job),
        lambda s: (s.get("progress") or {}).get("sent_bytes", 0) >= 8 * MiB or s["state"] != "running",
        30,
        f"job {job} sending",
        c.diagnostics,
        interval=0.05,
    )
    assert c.status(job)["state"] == "running"
    host.run(["ip", "link", "set", "eth0", "down"])
    down = time.monotonic()
    try:
        src = c.base / f"small-{during}"
        random_file(src / "s.bin", 100_000, 9)
        started = time.monotonic()
        small = c.cli("push", "--json", f"{src}/", f"node1:{c.shared}/small-{during}", timeout=60)
        took = time.monotonic() - started
        assert small.returncode == 0, f"the small job during the outage: {small.stdout} {small.stderr}"
        same_tree(src, c.node_dir("node1") / f"small-{during}")
        time.sleep(max(0.0, down + OUTAGE - time.monotonic()))
    finally:
        host.run(["ip", "link", "set", "eth0", "up"])
    return down, took


def _follow(c: Cluster, job: int, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
    result = c.cli("status", str(job), "--follow", "--json", timeout=timeout)
    try:
        return dict(json.loads(result.stdout))
    except ValueError:
        raise AssertionError(f"status --follow of job {job}: {result.stdout} {result.stderr}") from None


def test_link_down_ten_seconds(lan: Any, tmp_path: Path) -> None:
    """
    node2's link goes down for 10 s in the middle of a 40 MB job (its
    control connection goes silent with it).  With grace 30 s it is waited
    for and completes after the link is back; with grace 4 s it is reported
    failed, "no answer for N s", while node1 completes; in both cases the
    master serves a small job during the outage, and node2 takes a job once
    its link is back.
    """
    net = lan(nodes=2)
    c = Cluster(
        tmp_path,
        host=net.master.ipv4,
        interface="eth0",
        loopback=False,
        master_netns=net.master.netns,
        grace=30,
    )
    try:
        c.start_master()
        for host in net.nodes:
            c.add_node(host.name, netns=host.netns, wait=False)
        for host in net.nodes:
            c.wait_registered(host.name, 0)
        node2 = net.hosts["node2"]
        src = tmp_path / "src"
        random_file(src / "big.bin", 40 * MiB, 10)
        want = {content(src / "big.bin")}

        # Grace 30 s: node2 is waited for, and completes after the outage.
        finals = {c.node_dir(n) / "long" / "big.bin": want for n in ("node1", "node2")}
        with FinalPaths(finals) as watcher:
            job = c.detach("--rate", "60M", f"{src}/", f"node1,node2:{c.shared}/long")
            down, took = _outage(c, net, job, node2, "long")
            status = _follow(c, job)
        back = time.monotonic() - down - OUTAGE
        print(watcher.check(), f"small job during the outage {took:.1f} s, job ended {back:.1f} s after")
        assert status["state"] == "done", f"{status}\n{c.diagnostics()}"
        assert node_states(status) == {"node1": "done", "node2": "done"}
        for name in ("node1", "node2"):
            same_tree(src, c.node_dir(name) / "long")

        # Grace 4 s: node2 is reported failed with the reason; node1 completes.
        c.master_config(grace=4)
        assert c.master is not None
        c.master.stop()
        since = c.master.mark()
        c.start_master()
        for host in net.nodes:
            c.wait_registered(host.name, since, timeout=40)
        finals = {
            c.node_dir("node1") / "short" / "big.bin": want,
            c.node_dir("node2") / "short" / "big.bin": set(),
        }
        with FinalPaths(finals) as watcher:
            job = c.detach("--rate", "60M", f"{src}/", f"node1,node2:{c.shared}/short")
            down, took = _outage(c, net, job, node2, "short")
            status = _follow(c, job)
        print(watcher.check(), f"small job during the outage {took:.1f} s")
        assert status["state"] == "failed", status
        assert node_states(status) == {"node1": "done", "node2": "failed"}, status["nodes"]
        reason = status["nodes"]["node2"]["reason"]
        assert re.match(r"no answer for \d+ s", reason), reason
        assert status["message"] == "failed on 1 of 2 nodes: node2"
        same_tree(src, c.node_dir("node1") / "short")
        assert not (c.node_dir("node2") / "short" / "big.bin").exists()
        # node2 is back: it takes a job.
        c.wait_node_states({"node1": "connected", "node2": "connected"}, timeout=40)
        again = c.cli("push", "--json", f"{src}/", f"node2:{c.shared}/short", timeout=JOB_TIMEOUT)
        assert again.returncode == 0, f"{again.stdout}\n{again.stderr}\n{c.diagnostics()}"
        for path in part_files(c.node_dir("node2") / "short"):
            print("left by the failed transfer:", path)
            os.unlink(path)
        same_tree(src, c.node_dir("node2") / "short")
    finally:
        c.close()
