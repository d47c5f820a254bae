"""
The master's job runner in process: a real store, time from a fake clock.

A follower (``mrsync push``, ``status --follow``) asks `JobStatus` with
``wait``, which the runner holds until the job ends (`JobRunner.ended`).
"""

from __future__ import annotations

import functools
import os
import pwd
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mrsyncd.control.commands import PROTOCOL, BadRequest, Forbidden, ListJobs, Refused, Register, Submit
from mrsyncd.daemon import store
from mrsyncd.daemon.config import MasterConfig
from mrsyncd.daemon.master import (
    SPEC_DEFAULTS,
    Fleet,
    JobRunner,
    MasterControl,
    MasterService,
    scan_cached,
    secret_inodes,
    source_refusal,
    why_unreadable,
)
from mrsyncd.daemon.store import DONE
from mrsyncd.engine.agent import LocalPeer, ReceiverAgent
from mrsyncd.engine.transfer import Transfer
from mrsyncd.security.tls import PeerIdentity
from mrsyncd.wire.manifest import ManifestError
from tests import support


@pytest.fixture
def master(tmp_path: Path):
    service = MasterService(MemoryReactorClock(), MasterConfig(state_dir=str(tmp_path)), lambda: None)
    yield service
    service.jobs.close()


def fired(d) -> list[object]:
    got: list[object] = []
    d.addBoth(got.append)
    return got


def test_a_held_status_is_answered_as_the_job_ends_not_at_its_timeout(master) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    got = fired(master.runner.ended(job, 5.0))
    master.reactor.advance(1.0)
    assert got == []
    master.runner._finish(job, DONE)
    assert got == [None]
    assert master.runner.status(job, False)["state"] == DONE
    # Its timer went with it: nothing fires again, nothing is left waiting.
    master.reactor.advance(10.0)
    assert got == [None] and master.runner._enders == {}


def test_a_held_status_of_a_job_still_running_is_answered_after_its_timeout(master) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    first, second = fired(master.runner.ended(job, 0.5)), fired(master.runner.ended(job, 2.0))
    master.reactor.advance(0.6)
    assert (first, second) == ([None], [])
    master.reactor.advance(1.5)
    assert second == [None]
    assert master.runner._enders.get(job, []) == []


@pytest.mark.parametrize("finished", [True, False])
def test_a_finished_or_unknown_job_is_answered_at_once(master, finished: bool) -> None:
    job = master.jobs.add({"sources": ["/a"]}, "op")
    if finished:
        master.runner._finish(job, DONE)
    got = fired(master.runner.ended(job if finished else job + 1, 5.0))
    assert got == [None]
    assert not master.reactor.getDelayedCalls()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for d in ("srv/pub", "srv/state", "etc", "elsewhere"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "etc" / "master.key").write_text("secret")
    (tmp_path / "srv" / "pub" / "to-etc").symlink_to(tmp_path / "etc")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("srv/pub", None),
        ("srv/pub/", None),
        ("srv/pub/missing", None),  # the scan says it is missing, with its own message
        ("elsewhere", "is outside [master] sources"),
        ("srv/pub/../../elsewhere", "is outside [master] sources"),
        ("srv/pub/to-etc", "is outside [master] sources"),  # a symlink out of the roots
        ("srv", "holds the master's state directory"),
        ("srv/state", "holds the master's state directory"),
    ],
)
def test_a_source_must_lie_beneath_the_roots_and_hold_no_secret(tree: Path, source: str, why: str) -> None:
    config = MasterConfig(state_dir=str(tree / "srv" / "state"), sources=(str(tree / "srv"),))
    got = source_refusal(str(tree / source), config, key=str(tree / "etc" / "master.key"))
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got and str(tree / source) in got


def test_the_key_is_never_a_source_even_beneath_the_roots(tree: Path) -> None:
    config = MasterConfig(state_dir=str(tree / "srv" / "state"), sources=("/",))
    key = str(tree / "etc" / "master.key")
    for source in (tree / "etc", tree / "etc" / "master.key", tree / "srv" / "pub" / "to-etc", tree):
        got = source_refusal(str(source), config, key)
        assert got is not None and "holds the master's" in got, source
    assert source_refusal(str(tree / "elsewhere"), config, key) is None


def test_a_refused_source_refuses_the_job_before_it_exists(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    config = MasterConfig(state_dir=str(tmp_path / "state"), sources=(str(tmp_path / "pub"),))
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    try:
        spec = {"sources": ["/etc/"], "destination": "/srv/x", "targets": "all"}
        with pytest.raises(BadRequest, match=r"/etc/ is outside \[master\] sources"):
            service.runner.submit(spec, "op")
        assert service.jobs.jobs() == []
    finally:
        service.jobs.close()


def connect(service: MasterService, name: str, tags: tuple[str, ...] = ()) -> MasterControl:
    """A node's control connection, registered: the real protocol over a `StringTransport`."""
    connection = MasterControl(service)
    connection.makeConnection(StringTransport())
    connection.node_name = name
    service.fleet.attach(name, connection, tags, {})
    return connection


def test_the_master_expects_every_node_that_registered_until_it_is_forgotten(tmp_path: Path) -> None:
    config = MasterConfig(state_dir=str(tmp_path))
    first = MasterService(MemoryReactorClock(), config, lambda: None)
    connect(first, "n1", ("gpu",))
    n2 = connect(first, "n2")
    n2.connectionLost(Failure(ConnectionDone()))
    first.runner.jobs.close()
    # After a restart, before any node registers again, both are expected.
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    try:
        assert {n.name: n.connection for n in service.fleet.nodes.values()} == {"n1": None, "n2": None}
        assert service.fleet.resolve("all") == ["n1", "n2"]
        assert service.fleet.resolve("@gpu") == ["n1"]
        connect(service, "n1", ("gpu",))
        with pytest.raises(BadRequest, match="n1 is connected: stop its daemon first"):
            service.fleet.forget("n1")
        with pytest.raises(BadRequest, match=r"unknown node: n12 \(did you mean n2 or n1\?\)"):
            service.fleet.forget("n12")
        service.fleet.forget("n2")
        assert service.fleet.resolve("all") == ["n1"]
        with pytest.raises(BadRequest, match="unknown nodes: n2"):
            service.fleet.resolve("n1,n2")
    finally:
        service.jobs.close()
    again = MasterService(MemoryReactorClock(), config, lambda: None)
    assert list(again.fleet.nodes) == ["n1"]
    again.jobs.close()


def test_after_a_start_jobs_wait_for_the_known_nodes_for_at_most_grace(tmp_path: Path) -> None:
    config = MasterConfig(state_dir=str(tmp_path), grace=10.0)
    known = store.JobStore(str(tmp_path / "jobs.sqlite"))
    for name in ("n1", "n2"):
        known.remember_node(name, (), "", 1.0)
    known.close()
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    try:
        job = service.jobs.add({**SPEC_DEFAULTS, "sources": [], "destination": "/x"}, "op")
        connect(service, "n1")
        service.runner.kick()
        assert service.jobs.get(job).state == store.QUEUED  # n2 may be redialling yet
        service.reactor.advance(10.0)
        service.runner.kick()
        # n2 never came: the job is sent to n1 alone, and n2 is missed at once.
        got = service.jobs.get(job)
        assert got.nodes["n2"]["state"] == store.MISSED, got
        assert got.nodes["n2"]["reason"] == "not connected when the job started"
        assert service.runner.totals["node", "n2", store.MISSED] == 1
    finally:
        service.runner.stop()
        service.jobs.close()


def test_a_job_none_of_whose_nodes_is_connected_fails_and_names_them(tmp_path: Path) -> None:
    known = store.JobStore(str(tmp_path / "jobs.sqlite"))
    known.remember_node("n1", (), "", 1.0)
    known.close()
    service = MasterService(
        MemoryReactorClock(), MasterConfig(state_dir=str(tmp_path), grace=1.0), lambda: None
    )
    try:
        job = service.jobs.add({**SPEC_DEFAULTS, "sources": [], "destination": "/x"}, "op")
        service.reactor.advance(1.0)
        service.runner.kick()
        got = service.jobs.get(job)
        assert (got.state, got.message) == (store.FAILED, "no node was connected: missed n1")
        assert got.nodes == {
            "n1": {
                "state": store.MISSED,
                "reason": "not connected when the job started",
                "needed_bytes": 0,
                "changed": 0,
                "hook": None,
            }
        }
    finally:
        service.jobs.close()


def test_a_source_the_unit_hides_or_the_master_cannot_read_says_why() -> None:
    try:
        open("/tmp/no-such-source-of-mrsyncd")
    except FileNotFoundError as e:
        missing = e
    hidden = why_unreadable(missing, in_unit=True)
    assert "/tmp/no-such-source-of-mrsyncd is in the master's private /tmp" in hidden
    assert "PrivateTmp=yes" in hidden
    assert why_unreadable(missing, in_unit=False) == ""  # not in a unit: missing is missing
    elsewhere = FileNotFoundError(2, "No such file or directory", "/srv/gone")
    assert why_unreadable(elsewhere, in_unit=True) == ""
    denied = PermissionError(13, "Permission denied", "/srv/secret")
    assert why_unreadable(denied, in_unit=True) == (
        f" (the master reads sources as user {pwd.getpwuid(os.geteuid()).pw_name}: make them readable to it)"
    )
    assert why_unreadable(ValueError("two sources both give 'a'"), in_unit=True) == ""


def test_the_scan_refuses_the_masters_secrets_however_they_are_reached(tree: Path) -> None:
    """A hard link to the key or to the job store beneath a source passes the path check, not the scan."""
    state = tree / "srv" / "state"
    (state / "jobs.sqlite").write_text("every job's key")
    config = MasterConfig(state_dir=str(state), sources=(str(tree / "srv" / "pub"),))
    key = str(tree / "etc" / "master.key")
    os.link(key, tree / "srv" / "pub" / "innocent.txt")
    source = str(tree / "srv" / "pub") + "/"
    assert source_refusal(source, config, key) is None
    secrets = functools.partial(secret_inodes, config, key)
    cache = str(tree / "digests.sqlite")
    with pytest.raises(
        ManifestError, match=r"innocent.txt is the master's key \(.*master.key\), which is never sent"
    ):
        scan_cached(cache, [source], 1408, [], 1000, secrets)
    os.unlink(tree / "srv" / "pub" / "innocent.txt")
    os.link(state / "jobs.sqlite", tree / "srv" / "pub" / "copy")
    with pytest.raises(ManifestError, match=r"copy is the master's state \(.*jobs.sqlite\)"):
        scan_cached(cache, [source], 1408, [], 1000, secrets)
    os.unlink(tree / "srv" / "pub" / "copy")
    manifest, _, _ = scan_cached(cache, [source], 1408, [], 1000, secrets)
    assert [e.path for e in manifest.entries] == ["to-etc"]


def test_nodes_that_drop_as_the_master_stops_do_not_write_to_its_closed_store(tmp_path: Path) -> None:
    config = MasterConfig(state_dir=str(tmp_path))
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    node = connect(service, "n1")
    service.reactor.advance(7.0)
    service.fleet.touch("n1", None)
    service.stopService()
    node.connectionLost(Failure(ConnectionDone()))  # raised ProgrammingError on the closed store
    again = store.JobStore(str(tmp_path / "jobs.sqlite"))
    assert [(n.name, n.last_contact) for n in again.known_nodes()] == [("n1", 7.0)]
    again.close()


# The master's responders, spoken to in AMP over `StringTransport`s: the
# connection (`MasterControl`) holds the peer's identity as its TLS
# handshake would have set it, and `MasterResponders` answer.


def session(service: MasterService, identity: PeerIdentity) -> tuple[MasterControl, amp.AMP]:
    """The master's end of a connection from ``identity``, and a client's end joined to it."""
    server = MasterControl(service)
    server.makeConnection(StringTransport())
    server.identity = identity
    client = amp.AMP()
    client.makeConnection(StringTransport())
    return server, client


def answer(server: MasterControl, client: amp.AMP, d: Any) -> list[object]:
    """Carry bytes both ways until neither end has more, then what ``d`` fired with."""
    got = fired(d)
    ends: list[Any] = [client, server]
    while any(end.transport.value() for end in ends):
        for sender, receiver in ((client, server), (server, client)):
            data = sender.transport.value()
            sender.transport.clear()
            if data:
                receiver.dataReceived(data)
    return got


def error(got: list[object]) -> tuple[type[BaseException], str]:
    assert len(got) == 1 and isinstance(got[0], Failure), got
    return got[0].type, got[0].getErrorMessage()


def test_only_an_operator_submits_and_its_job_is_stored_with_its_certificate(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    config = MasterConfig(state_dir=str(tmp_path / "state"), sources=(str(tmp_path),))
    os.mkdir(config.state_dir)
    service = MasterService(MemoryReactorClock(), config, lambda: None)
    spec = {"sources": [f"{tmp_path}/src/"], "destination": "/srv/x", "targets": "all"}
    try:
        connect(service, "n1")
        server, client = session(service, PeerIdentity("n1", "node"))
        refused = error(answer(server, client, client.callRemote(Submit, spec=spec)))
        needs = "this needs an operator certificate; the connection has a node certificate"
        assert refused == (Forbidden, needs)
        assert service.jobs.jobs() == []

        alice = PeerIdentity("alice", "operator", fingerprint="ab" * 32)
        server, client = session(service, alice)
        assert answer(server, client, client.callRemote(Submit, spec=spec)) == [{"job": 1}]
        [listed] = answer(server, client, client.callRemote(ListJobs, limit=10))
        jobs = listed["jobs"]  # type: ignore[index]
        assert [(j["id"], j["operator"], j["spec"]["destination"]) for j in jobs] == [(1, "alice", "/srv/x")]
        [submitted] = service.jobs.audit_log(1)
        assert (submitted["who"], submitted["fingerprint"]) == ("alice", "ab" * 32)
        outside = {**spec, "sources": ["/etc/"]}
        assert error(answer(server, client, client.callRemote(Submit, spec=outside)))[0] is BadRequest
        # The responders measure a spec against this master's max_spec_bytes before parsing it.
        service.runner.config = replace(config, max_spec_bytes=200)
        long = {**spec, "excludes": ["x" * 300]}
        kind, why = error(answer(server, client, client.callRemote(Submit, spec=long)))
        assert kind is BadRequest and "more than the master takes (200: max_spec_bytes)" in why, why
        assert [j.id for j in service.jobs.jobs()] == [1]
    finally:
        service.runner.stop()
        service.jobs.close()


def test_a_node_registers_under_its_certificates_name_and_tags_and_protocol(master: MasterService) -> None:
    server, client = session(master, PeerIdentity("n1", "node", tags=("gpu",)))
    other = client.callRemote(Register, name="n2", tags=[], free={}, version=PROTOCOL)
    assert error(answer(server, client, other)) == (Refused, "this certificate is for 'n1', not 'n2'")
    old = client.callRemote(Register, name="n1", tags=[], free={}, version=PROTOCOL - 1)
    kind, why = error(answer(server, client, old))
    assert kind is Refused and f"protocol {PROTOCOL - 1} and this master protocol {PROTOCOL}:" in why, why
    assert master.fleet.nodes == {}
    claims = client.callRemote(Register, name="n1", tags=["gpu", "root"], free={"/srv": 5}, version=PROTOCOL)
    assert answer(server, client, claims) == [{"version": PROTOCOL}]
    node = master.fleet.nodes["n1"]
    assert (node.connection, node.tags, node.free) == (server, ("gpu",), {"/srv": 5})  # "root" not granted
    # An operator certificate is no node's.
    server, client = session(master, PeerIdentity("alice", "operator"))
    claim = client.callRemote(Register, name="alice", tags=[], free={}, version=PROTOCOL)
    assert error(answer(server, client, claim))[0] is Forbidden


class WholeJobTests(unittest.TestCase):
    """
    A job from submission to its end, in this process: the real scan, a real
    `Transfer` over multicast on ``lo``, and receivers of the test's own (the
    transfer factory hands the transfer `LocalPeer`s where the runner gives
    it the fleet's peers, whose connections here lead nowhere).
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_a_job_runs_to_done_and_every_node_holds_the_tree(self) -> Any:
        base = support.temp_dir(self)
        src = os.path.join(base, "src")
        support.make_full_tree(src)
        channel = support.unique_channel()
        config = MasterConfig(
            state_dir=os.path.join(base, "state"),
            sources=(base,),
            group=channel.group,
            port_base=channel.port,
            interface="lo",
            loopback=True,
            rate=support.RATE,
            max_jobs=1,
        )
        os.mkdir(config.state_dir)
        jobs = store.JobStore(os.path.join(config.state_dir, "jobs.sqlite"))
        self.addCleanup(jobs.close)
        fleet = Fleet(reactor, jobs)
        agents = {}
        for name in ("n1", "n2"):
            agents[name] = ReceiverAgent(reactor, destination_root=os.path.join(base, name))
            self.addCleanup(agents[name].close)
            connection = amp.AMP()
            connection.makeConnection(StringTransport())
            fleet.attach(name, connection, (), {})  # type: ignore[arg-type]
        made: list[Transfer] = []

        def transfer(clock: Any, offer: Any, local: Any, peers: list[Any], **kwargs: Any) -> Transfer:
            mine = [LocalPeer(p.name, agents[p.name]) for p in peers]
            made.append(Transfer(clock, offer, local, mine, **kwargs))
            return made[-1]

        runner = JobRunner(reactor, config, jobs, fleet, transfer=transfer)
        self.addCleanup(runner.stop)
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        job = runner.submit({"sources": [f"{src}/"], "destination": "/tree", "targets": "all"}, "alice")
        yield runner.ended(job, 30)
        status = runner.status(job, files=True)
        self.assertEqual(status["state"], DONE, status)
        # The journal's line for the job's end says where its time went.
        ends = [m for m in map(re.compile(rf"job {job} done in (\S+) s \((.*)\)$").match, logged) if m]
        self.assertEqual(len(ends), 1, logged)
        total, phases = float(ends[0][1]), re.findall(r"(\w+) (\S+) s", ends[0][2])
        self.assertEqual([phase for phase, _ in phases], ["scan", "offer", "send", "results"])
        self.assertGreater(float(dict(phases)["send"]), 0)
        self.assertLessEqual(sum(float(seconds) for _, seconds in phases), total + 0.05 + 0.005 * len(phases))
        self.assertEqual(len(made), 1)
        self.assertEqual({n: s["state"] for n, s in status["nodes"].items()}, {"n1": DONE, "n2": DONE})
        for name in agents:
            support.assert_same_tree(self, src, os.path.join(base, name, "tree"))
        events = [e["event"] for e in jobs.audit_log(job)]
        self.assertEqual(events[:2], [store.SUBMITTED, store.STARTED])
        self.assertEqual(runner.totals["jobs", DONE], 1)
        # What the scan learned was written to the digest cache, after the offer.
        cache = store.DigestCache(os.path.join(config.state_dir, "digests.sqlite"))
        self.addCleanup(cache.close)
        files = sum(1 for _, entry in made[0].offer.manifest.files())
        count = "SELECT COUNT(*) FROM sha256_digests"
        yield support.wait_until(lambda: cache.db.execute(count).fetchone() == (files,))
