"""
The master: the live fleet of nodes, the job queue, and the TLS control
listener that nodes and operators dial.

Every connection is TLS with a client certificate from the cluster CA; the
role in that certificate decides what the connection may do, checked on
every command: a node may only register and answer, an operator may only
submit, list, follow and cancel.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import pwd
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from mrsyncd import logs
from mrsyncd.control.commands import (
    MAX_STATUS_WAIT,
    PROTOCOL,
    BadRequest,
    BoundedAMP,
    Cancel,
    Congestion,
    Forbidden,
    ForgetNode,
    Heartbeat,
    JobStatus,
    ListJobs,
    ListNodes,
    NoSuchJob,
    OversizedSpec,
    Refused,
    Register,
    Submit,
    version_mismatch,
)
from mrsyncd.control.contract import Feedback, Offer, TransferOptions
from mrsyncd.control.peers import AMPPeer
from mrsyncd.daemon import readiness, store
from mrsyncd.daemon.config import MasterConfig
from mrsyncd.daemon.node import HEARTBEAT
from mrsyncd.engine.multicast import Channel
from mrsyncd.engine.transfer import Transfer
from mrsyncd.security import tls
from mrsyncd.wire.datagram import KEY_SIZE, OVERHEAD, RUN_SIZE, TRANSFER_ID_SIZE
from mrsyncd.wire.manifest import Manifest, scan

log = logs.logger(__name__)

#: Nodes send a heartbeat every HEARTBEAT seconds; one silent for
#: NODE_SILENCE is taken for gone.
NODE_SILENCE = 3 * HEARTBEAT

#: What ``--backup`` appends to the name of a file it keeps, as rsync does.
BACKUP_SUFFIX = "~"


class NotConnected(Exception):
    """The node is not connected to this master now."""


@dataclass
class NodeState:
    name: str
    tags: tuple[str, ...] = ()
    free: dict[str, int] = field(default_factory=dict)
    connection: MasterControl | None = None
    last_contact: float = 0.0
    address: str = ""
    last_ok_job: int | None = None
    last_ok_at: float | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "connected" if self.connection is not None else "disconnected",
            "tags": list(self.tags),
            "free": self.free,
            "last_contact": self.last_contact,
            "address": self.address,
            "last_ok_job": self.last_ok_job,
            "last_ok_at": self.last_ok_at,
        }


class Fleet:
    """
    The nodes the master expects: every node that has registered, connected
    or not, until an operator forgets it (`forget`).  They are remembered in
    the job store, so that after a restart a node that is down is still
    expected, and a job to ``all`` reports it missed rather than forgetting
    it in silence.
    """

    def __init__(self, clock: Any, known: store.JobStore | None = None) -> None:
        self.clock = clock
        self.known = known
        self.nodes: dict[str, NodeState] = {}
        for node in known.known_nodes() if known is not None else ():
            self.nodes[node.name] = NodeState(
                node.name,
                node.tags,
                last_contact=node.last_contact,
                address=node.address,
                last_ok_job=node.last_ok_job,
                last_ok_at=node.last_ok_at,
            )

    def _remember(self, node: NodeState) -> None:
        if self.known is not None:
            self.known.remember_node(node.name, node.tags, node.address, node.last_contact)

    def attach(
        self, name: str, connection: MasterControl, tags: tuple[str, ...], free: dict[str, int]
    ) -> None:
        node = self.nodes.setdefault(name, NodeState(name))
        if node.connection is not None and node.connection is not connection:
            log.info("{node} connected again: dropping its old connection", node=name)
            node.connection.transport.loseConnection()  # type: ignore[union-attr]
        node.connection, node.tags, node.free = connection, tags, free
        node.last_contact = self.clock.seconds()
        peer = connection.transport.getPeer()  # type: ignore[union-attr]
        node.address = getattr(peer, "host", "")
        self._remember(node)
        log.info(
            "node {node} registered from {address} (tags {tags})", node=name, address=node.address, tags=tags
        )

    def detach(self, name: str, connection: MasterControl) -> None:
        node = self.nodes.get(name)
        if node is not None and node.connection is connection:
            node.connection = None
            self._remember(node)
            log.warn("node {node} disconnected", node=name)

    def drop_silent(self, silence: float) -> None:
        """
        Drop the connection of a node not heard from in ``silence`` seconds:
        a half-open connection (the node's host died, a cable was pulled)
        would otherwise keep it 'connected' and in every job for good.
        """
        now = self.clock.seconds()
        for node in self.nodes.values():
            if node.connection is not None and now - node.last_contact > silence:
                log.warn(
                    "node {node} silent for {seconds:.0f} s: dropping its connection",
                    node=node.name,
                    seconds=now - node.last_contact,
                )
                node.connection.transport.abortConnection()  # type: ignore[union-attr]
                node.connection = None
                self._remember(node)

    def close(self) -> None:
        """
        The store is closing (the master stops): remember when each node
        was last heard from now, since the connections it drops after
        this have no store to tell.
        """
        for node in self.nodes.values():
            if node.connection is not None:
                self._remember(node)
        self.known = None

    def touch(self, name: str, free: dict[str, int] | None) -> None:
        node = self.nodes[name]
        node.last_contact = self.clock.seconds()
        if free is not None:
            node.free = free

    def succeeded(self, name: str, job_id: int) -> None:
        """``name`` completed job ``job_id``: `mrsync nodes` shows it as the node's last good job."""
        node = self.nodes.get(name)
        now = self.clock.seconds()
        if node is not None:
            node.last_ok_job, node.last_ok_at = job_id, now
        if self.known is not None:
            self.known.node_succeeded(name, job_id, now)

    def forget(self, name: str) -> None:
        """
        Expect ``name`` no more.  A connected node is refused: it would be
        known again at once, and a node taken out of service is stopped
        first.
        """
        node = self.nodes.get(name)
        if node is None:
            raise BadRequest(f"unknown node: {self._nearest(name)}")
        if node.connection is not None:
            raise BadRequest(
                f"{name} is connected: stop its daemon first (systemctl stop mrsyncd-node),"
                " or it is known again as it registers"
            )
        del self.nodes[name]
        if self.known is not None:
            self.known.forget_node(name)

    def is_connected(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.connection is not None

    def all_connected(self) -> bool:
        return all(node.connection is not None for node in self.nodes.values())

    def peer(self, name: str) -> AMPPeer:
        node = self.nodes.get(name)
        if node is None or node.connection is None or node.connection.peer is None:
            raise NotConnected(f"{name} is not connected")
        return node.connection.peer

    def _nearest(self, name: str) -> str:
        """An unknown name, and the known ones it may be a typo of."""
        near = difflib.get_close_matches(name, self.nodes, n=3)
        return f"{name} (did you mean {' or '.join(near)}?)" if near else name

    def resolve(self, targets: str) -> list[str]:
        """``all``, ``@tag`` or ``name,name``: the known nodes a job is for, connected or not."""
        if targets == "all":
            names = list(self.nodes)
        elif targets.startswith("@"):
            tag = targets[1:]
            names = [n.name for n in self.nodes.values() if tag in n.tags]
        else:
            names = [t for t in (t.strip() for t in targets.split(",")) if t]
            unknown = [n for n in names if n not in self.nodes]
            if unknown:
                raise BadRequest(f"unknown nodes: {', '.join(map(self._nearest, unknown))}")
        if not names:
            raise BadRequest(f"no nodes match {targets!r}")
        return sorted(set(names))


class FleetPeer:
    """A `contract.ReceiverPeer` that reaches a node through its current connection."""

    def __init__(self, name: str, fleet: Fleet) -> None:
        self.name = name
        self.fleet = fleet

    def _peer(self) -> AMPPeer:
        return self.fleet.peer(self.name)

    def prepare(self, offer: Offer) -> defer.Deferred:
        return defer.maybeDeferred(lambda: self._peer().prepare(offer))

    def wants_manifest(self) -> bool:
        try:
            return self._peer().wants_manifest()
        except NotConnected:
            return True  # whoever it connects as next holds nothing yet

    def missing(
        self,
        transfer_id: bytes,
        abandoned: Mapping[int, str],
        through: int | None = None,
        before: tuple[int, int] | None = None,
    ) -> defer.Deferred:
        return defer.maybeDeferred(lambda: self._peer().missing(transfer_id, abandoned, through, before))

    def results(self, transfer_id: bytes, discard: bool = False) -> defer.Deferred:
        return defer.maybeDeferred(lambda: self._peer().results(transfer_id, discard))


SPEC_DEFAULTS: dict[str, Any] = {
    "targets": "all",
    "excludes": [],
    "filters": [],
    "rate": None,
    "preserve_owner": False,
    "delete": False,
    "backup": False,
    "dry_run": False,
}


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def source_refusal(source: str, config: MasterConfig, key: str) -> str | None:
    """
    Why ``source`` may not be sent, or None: it must lie beneath one of
    ``[master] sources`` and neither hold nor lie inside the master's key
    (``key``) or state directory (the job store holds every running job's
    key).  Paths are compared with symlinks and ``..`` resolved.
    """
    real = os.path.realpath(source)
    roots = [os.path.realpath(root) for root in config.sources]
    if not any(_within(real, root) for root in roots):
        return f"source {source} is outside [master] sources ({', '.join(config.sources)})"
    for what, secret in (("key", key), ("state directory", config.state_dir)):
        if not secret:
            continue
        secret = os.path.realpath(secret)
        if _within(secret, real) or _within(real, secret):
            return f"source {source} holds the master's {what} ({secret}), which is never sent"
    return None


def secret_inodes(config: MasterConfig, key: str) -> dict[tuple[int, int], str]:
    """
    The master's key, its state directory and the files in it, by device
    and inode: what `source_refusal` rules out by path, the scan rules out
    however it is reached (a hard link to the key, a bind mount of the
    state directory, a path swapped for a symlink after the check).
    """
    found: dict[tuple[int, int], str] = {}
    paths = [(key, "key")] if key else []
    paths.append((config.state_dir, "state directory"))
    with contextlib.suppress(OSError):
        paths += [(entry.path, "state") for entry in os.scandir(config.state_dir)]
    for path, what in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            found[st.st_dev, st.st_ino] = f"the master's {what} ({path})"
    return found


#: Where the master's unit gives it directories of its own (PrivateTmp=yes
#: in debian/mrsyncd.mrsyncd-master.service): an operator's files there
#: are not the master's.
PRIVATE_DIRS = ("/tmp", "/var/tmp")


def why_unreadable(error: Exception, in_unit: bool) -> str:
    """
    What an operator told "cannot read the sources" needs to know: that
    the unit's sandbox hides the path (``in_unit``: run by systemd), or
    which user the master reads as.
    """
    path = getattr(error, "filename", None)
    if not isinstance(path, str):
        return ""
    if isinstance(error, FileNotFoundError) and in_unit and any(_within(path, d) for d in PRIVATE_DIRS):
        return (
            f" ({path} is in the master's private {'/var/tmp' if _within(path, '/var/tmp') else '/tmp'}:"
            " its unit has PrivateTmp=yes, so put sources beneath [master] sources elsewhere)"
        )
    if isinstance(error, PermissionError):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid with no name
            user = str(os.geteuid())
        return f" (the master reads sources as user {user}: make them readable to it)"
    return ""


def check_spec(spec: Any) -> dict[str, Any]:
    """A job request from an operator, checked before it is stored."""
    if not isinstance(spec, dict):
        raise BadRequest("a job spec is an object")
    unknown = set(spec) - set(SPEC_DEFAULTS) - {"sources", "destination"}
    if unknown:
        raise BadRequest(f"unknown job options: {', '.join(sorted(unknown))}")
    checked: dict[str, Any] = {**SPEC_DEFAULTS, **spec}
    sources = checked.get("sources")
    if not isinstance(sources, list) or not sources:
        raise BadRequest("sources must be a list of absolute paths on the master")
    if not all(isinstance(s, str) and s.startswith("/") and "\0" not in s for s in sources):
        raise BadRequest("sources must be absolute paths on the master")
    destination = checked.get("destination")
    if not isinstance(destination, str) or not destination.startswith("/") or "\0" in destination:
        raise BadRequest("destination must be an absolute path")
    if not isinstance(checked["targets"], str) or not checked["targets"]:
        raise BadRequest("targets must be all, @tag or a list of node names")
    excludes = checked["excludes"]
    if not isinstance(excludes, list) or not all(isinstance(x, str) for x in excludes):
        raise BadRequest("excludes must be a list of patterns")
    filters = checked["filters"]
    if not isinstance(filters, list) or not all(
        isinstance(x, str) and x[:2] in ("+ ", "- ") and x[2:] for x in filters
    ):
        raise BadRequest("filters must be a list of rules, '+ PATTERN' or '- PATTERN'")
    rate = checked["rate"]
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0):
        raise BadRequest("rate must be a positive number of bits per second")
    for flag in ("preserve_owner", "delete", "backup", "dry_run"):
        if not isinstance(checked[flag], bool):
            raise BadRequest(f"{flag} must be true or false")
    return checked


def filter_rules(spec: dict[str, Any]) -> list[str]:
    """
    A job's filter rules, in order (`manifest.excluded`): its ``filters``
    (``--include``, ``--exclude``), then its ``excludes``, the bare
    patterns of an ``mrsync`` from before filters (and of jobs it queued).
    """
    return [*spec.get("filters", ()), *(f"- {pattern}" for pattern in spec["excludes"])]


def scan_cached(
    cache_path: str,
    sources: list[str],
    block_size: int,
    excludes: list[str],
    max_entries: int,
    secrets: Callable[[], Mapping[tuple[int, int], str]],
) -> tuple[Manifest, dict[int, str], dict[tuple[int, ...], bytes]]:
    """
    Scan in a thread with that thread's own connection to the digest
    cache; with the manifest and local paths, what the cache did not know,
    to be written once the job is offered (`store.remember_digests`).
    """
    cache = store.DigestCache(cache_path, hold=True)
    try:
        manifest, local_paths = scan(sources, block_size, 0, excludes, cache, max_entries, secrets())
        return manifest, local_paths, cache.take()
    finally:
        cache.close()


class JobRunner:
    """Runs queued jobs, at most ``max_jobs`` at once, each on its own group and port."""

    def __init__(
        self,
        reactor: Any,
        config: MasterConfig,
        jobs: store.JobStore,
        fleet: Fleet,
        key: str = "",
        settle: float = 0.0,
        *,
        scan: Callable[..., tuple[Manifest, dict[int, str], dict[tuple[int, ...], bytes]]] = scan_cached,
        transfer: Callable[..., Transfer] = Transfer,
    ) -> None:
        """
        ``settle``: for this many seconds no job starts unless every known
        node is connected, so that after the master starts the nodes have
        the time to register again and no job misses one that was merely
        redialling.  ``scan`` (run in a thread) and ``transfer`` make a
        job's manifest and its transfer: tests run a whole job in process
        with receivers of their own.
        """
        self.reactor = reactor
        self._scan = scan
        self._transfer = transfer
        self._settled_at = reactor.seconds() + settle
        self.config = config
        self.jobs = jobs
        self.fleet = fleet
        self.key = key
        self.running: dict[int, Transfer | None] = {}
        self._slots: dict[int, int] = {}
        self._stopping = False
        #: Waiting for each job to end (`ended`).
        self._enders: dict[int, list[defer.Deferred]] = {}
        #: What jobs did since the master started, for its metrics
        #: (`mrsyncd.daemon.metrics`): ``("jobs", state)``, ``("node", name,
        #: state)``, ``("sent", "data" | "parity" | "manifest")`` and ``("repaired",)``.
        self.totals: Counter[tuple[str, ...]] = Counter()

    def _finish(self, job_id: int, state: str, message: str = "") -> None:
        self.jobs.finish(job_id, state, message)
        self.totals["jobs", state] += 1
        job = self.jobs.get(job_id)
        nodes = {
            name: {"state": node["state"], "reason": node["reason"], "changed": node["changed"]}
            for name, node in (job.nodes if job is not None else {}).items()
        }
        self.jobs.audit(
            job_id, store.FINISHED_EVENT, "master", "", {"state": state, "message": message, "nodes": nodes}
        )
        for ender in self._enders.pop(job_id, []):
            ender.callback(None)

    def ended(self, job_id: int, timeout: float) -> defer.Deferred:
        """Fires once the job has ended (at once if it has, or is unknown), or after ``timeout`` seconds."""
        job = self.jobs.get(job_id)
        if job is None or job.state in store.FINISHED:
            return defer.succeed(None)
        enders = self._enders.setdefault(job_id, [])

        def forget(d: defer.Deferred) -> None:
            enders.remove(d)

        ender: defer.Deferred = defer.Deferred(forget)
        enders.append(ender)
        return ender.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda result, timeout: None)

    def submit(self, spec: dict[str, Any], operator: str, fingerprint: str = "") -> int:
        """A new job, refused (`BadRequest`) before it exists if its targets name no node known now."""
        spec = check_spec(spec)
        self._check_sources(spec)
        self.fleet.resolve(spec["targets"])
        job_id = self.jobs.add(spec, operator)
        self.jobs.audit(job_id, store.SUBMITTED, operator, fingerprint, spec)
        log.info("job {job} submitted by {operator}: {spec}", job=job_id, operator=operator, spec=spec)
        self.reactor.callLater(0, self.kick)
        return job_id

    def _check_sources(self, spec: dict[str, Any]) -> None:
        """Refuse (`BadRequest`) a source outside ``[master] sources`` or holding the master's secrets."""
        for source in spec["sources"]:
            why = source_refusal(source, self.config, self.key)
            if why is not None:
                raise BadRequest(why)

    def kick(self) -> None:
        if self._stopping:
            return
        if self.reactor.seconds() < self._settled_at and not self.fleet.all_connected():
            return  # `MasterService` kicks again when the settling ends
        for job in self.jobs.unfinished():
            if len(self.running) >= self.config.max_jobs:
                return
            if job.id not in self.running:
                self.running[job.id] = None
                self._run(job).addErrback(self._crashed, job.id)

    def _crashed(self, failure: Failure, job_id: int) -> None:
        log.failure("job {job} crashed", failure, job=job_id)
        self._finish(job_id, store.FAILED, f"internal error: {failure.getErrorMessage()}")
        self._release(job_id)

    def _release(self, job_id: int) -> None:
        self.running.pop(job_id, None)
        self._slots.pop(job_id, None)
        self.reactor.callLater(0, self.kick)

    def _slot(self, job: store.Job) -> int:
        taken = set(self._slots.values())
        if job.slot is not None and job.slot not in taken:
            slot = job.slot
        else:
            slot = min(s for s in range(self.config.max_jobs) if s not in taken)
        self._slots[job.id] = slot
        return slot

    def channel(self, slot: int) -> Channel:
        group = str(ip_address(self.config.group) + slot)
        return Channel(
            group, self.config.port_base + slot, self.config.interface, self.config.ttl, self.config.loopback
        )

    @defer.inlineCallbacks
    def _run(self, job: store.Job) -> Any:
        spec = job.spec
        try:
            # Checked again: the job may have been queued under another
            # configuration, before the master restarted.
            self._check_sources(spec)
            # A resumed job keeps the nodes it started with, whichever of
            # them have registered again by now, and waits ``grace`` for the
            # others; a new one is sent to those connected now, and the
            # others are missed at once.
            names = sorted(n for n, node in job.nodes.items() if node["state"] != store.MISSED)
            resumed = bool(names)
            if not resumed:
                names = self.fleet.resolve(spec["targets"])
        except BadRequest as e:
            self._finish(job.id, store.FAILED, str(e))
            self._release(job.id)
            return
        if resumed:
            missed = sorted(n for n, node in job.nodes.items() if node["state"] == store.MISSED)
        else:
            missed = [n for n in names if not self.fleet.is_connected(n)]
            names = [n for n in names if n not in missed]
            for name in missed:
                self.jobs.set_node(job.id, name, store.MISSED, "not connected when the job started")
                self.totals["node", name, store.MISSED] += 1
            if missed:
                log.warn("job {job} misses {nodes}: not connected", job=job.id, nodes=", ".join(missed))
        if not names:
            self._finish(job.id, store.FAILED, f"no node was connected: missed {', '.join(missed)}")
            self._release(job.id)
            return
        for name in names:
            self.jobs.set_node(job.id, name, store.RUNNING)
        transfer_id = job.transfer_id or os.urandom(TRANSFER_ID_SIZE)
        key = job.key or os.urandom(KEY_SIZE)
        slot = self._slot(job)
        # Every start is a run of its own, with a key of its own (`Transfer`).
        run = os.urandom(RUN_SIZE)
        self.jobs.start(job.id, transfer_id, key, slot, run)
        log.info(
            "job {job} started{resumed} for {nodes}",
            job=job.id,
            resumed=" (resumed)" if job.transfer_id else "",
            nodes=", ".join(names),
        )
        scan_started = self.reactor.seconds()
        try:
            manifest, local_paths, learned = yield threads.deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                self._scan,
                self._digest_cache,
                spec["sources"],
                self.config.block_size or self.channel(slot).payload_room() - OVERHEAD,
                filter_rules(spec),
                self.config.max_manifest_entries,
                functools.partial(secret_inodes, self.config, self.key),
            )
        except Exception as e:
            why = f"cannot read the sources: {e}{why_unreadable(e, 'INVOCATION_ID' in os.environ)}"
            for name in names:
                self.jobs.set_node(job.id, name, store.FAILED, why)
            self._finish(job.id, store.FAILED, why)
            log.error("job {job} failed: {why}", job=job.id, why=why)
            self._release(job.id)
            return
        scanned = self.reactor.seconds() - scan_started
        current = self.jobs.get(job.id)
        if self._stopping or current is None or current.state != store.RUNNING:
            if current is not None and current.state == store.CANCELLED:
                for name in names:  # cancelled while its sources were scanned
                    self.jobs.set_node(job.id, name, store.FAILED, "cancelled")
            self._release(job.id)
            return
        options = TransferOptions(
            preserve_owner=spec["preserve_owner"],
            delete=spec["delete"],
            backup_suffix=BACKUP_SUFFIX if spec["backup"] else "",
            dry_run=spec["dry_run"],
            label=str(job.id),
            protect=tuple(filter_rules(spec)),
        )
        offer = Offer(transfer_id, key, manifest, self.channel(slot), spec["destination"], options)
        self.jobs.audit(
            job.id,
            store.STARTED,
            "master",
            "",
            {
                "nodes": names,
                "manifest_sha256": offer.manifest_digest.hex(),
                "files": sum(1 for _ in manifest.files()),
                "bytes": manifest.total_bytes(),
                "resumed": bool(job.transfer_id),
            },
        )
        rate = min(self.config.rate, spec["rate"] or self.config.rate)
        transfer = self._transfer(
            self.reactor,
            offer,
            local_paths,
            [FleetPeer(name, self.fleet) for name in names],
            rate_bps=rate,
            grace=self.config.grace,
            max_passes=self.config.max_passes,
            max_corrupt_chunks=self.config.max_corrupt_chunks,
            run=run,
        )
        self.running[job.id] = transfer
        running = transfer.run()
        if learned:
            self._remember(learned)
        report = yield running
        if self._stopping:
            return  # the master is going down: the job resumes when it comes back
        for name, peer in report.peers.items():
            self.jobs.set_node(
                job.id,
                name,
                store.DONE if peer.ok else store.FAILED,
                peer.reason,
                needed_bytes=peer.needed_bytes,
                changed=peer.changed,
                hook=peer.hook,
            )
            self.jobs.set_files(job.id, name, peer.results)
            self.totals["node", name, store.DONE if peer.ok else store.FAILED] += 1
            if peer.ok and not spec["dry_run"]:
                self.fleet.succeeded(name, job.id)
            # One line a node, the same fields every time, for the journal's readers.
            level = log.info if peer.ok else log.error
            level(
                "job {job} on {node}: {result}; needed {needed} bytes, changed {changed} paths, {took}",
                job=job.id,
                node=name,
                result="done" if peer.ok else peer.reason,
                needed=peer.needed_bytes,
                changed=peer.changed,
                took="never complete" if peer.seconds is None else f"complete in {peer.seconds:.1f} s",
            )
        sent = report.sender_stats.get("payload", 0)
        self.totals["sent", "data"] += sent
        self.totals["sent", "parity"] += report.sender_stats.get("parity", 0)
        self.totals["sent", "manifest"] += transfer.manifest_sent
        self.totals["repaired",] += max(0, sent - transfer.planned_bytes)
        self.jobs.progress(job.id, manifest.total_bytes(), sent)
        failed = sorted(name for name, peer in report.peers.items() if not peer.ok)
        everyone = len(names) + len(missed)
        if transfer.cancelled:
            state, message = store.CANCELLED, "cancelled by an operator"
        elif failed:
            state, message = store.FAILED, f"failed on {len(failed)} of {everyone} nodes: {', '.join(failed)}"
        elif missed:
            state, message = store.FAILED, f"missed {len(missed)} of {everyone} nodes: {', '.join(missed)}"
        else:
            state, message = store.DONE, ""
        # Where the job's time went, for an operator asking why a push was slow.
        phases = ", ".join(
            f"{phase} {seconds:.2f} s" for phase, seconds in {"scan": scanned, **report.phases}.items()
        )
        log.info(
            "job {job} {state} in {seconds:.1f} s ({phases}){message}",
            job=job.id,
            state=state,
            seconds=self.reactor.seconds() - scan_started,
            phases=phases,
            message=f": {message}" if message else "",
        )
        self._finish(job.id, state, message)
        self._release(job.id)

    @property
    def _digest_cache(self) -> str:
        return os.path.join(self.config.state_dir, "digests.sqlite")

    def _remember(self, learned: dict[tuple[int, ...], bytes]) -> None:
        """Write a scan's new digests to the cache, in a thread, while the job runs: it is only a cache."""
        d = threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), store.remember_digests, self._digest_cache, learned
        )
        d.addErrback(lambda failure: log.warn("the digest cache was not written: {why}", why=failure.value))

    def status(self, job_id: int, files: bool) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"no job {job_id}")
        summary = job.summary()
        if job_id in self.running:
            transfer = self.running[job_id]
            summary["phase"] = "scanning" if transfer is None else "sending"
            if transfer is not None:
                summary["progress"] = transfer.progress()
        if files:
            summary["files"] = self.jobs.files(job_id)
        return summary

    def feedback(self, transfer_id: bytes, node: str, report: Feedback) -> None:
        for transfer in self.running.values():
            if transfer is not None:
                transfer.feedback(node, report, transfer_id)

    def cancel(self, job_id: int) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            raise NoSuchJob(f"no job {job_id}")
        if job.state in store.FINISHED:
            return job.state
        transfer = self.running.get(job_id)
        if transfer is not None:
            transfer.cancel()
            return "cancelling"
        self._finish(job_id, store.CANCELLED, "cancelled before it started sending")
        return store.CANCELLED

    def stop(self) -> None:
        """Stop sending; running jobs stay 'running' in the store and resume on restart."""
        self._stopping = True
        for transfer in self.running.values():
            if transfer is not None:
                transfer.interrupt()


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


class MasterResponders(amp.CommandLocator):
    """
    What the master answers, apart from the connection that carries it (as
    Twisted's `amp.CommandLocator` allows): every command is checked against
    the certificate its connection presented (``caller.identity``), then
    handed to the job runner, its fleet and its store.  Tests speak AMP to
    it over a `StringTransport`.
    """

    def __init__(self, runner: JobRunner, caller: MasterControl) -> None:
        self.runner = runner
        self.caller = caller

    @property
    def max_spec_bytes(self) -> int:
        """Read by `commands.SpecArgument`: AMP parses a command's arguments with its locator."""
        return self.runner.config.max_spec_bytes

    def _require(self, role: str) -> str:
        if self.caller.identity is None or self.caller.identity.role != role:
            got = (
                "no certificate"
                if self.caller.identity is None
                else f"{_a(self.caller.identity.role)} certificate"
            )
            log.warn("refused {a_role} command from {got}", a_role=_a(role), got=got)
            raise Forbidden(f"this needs {_a(role)} certificate; the connection has {got}")
        return self.caller.identity.name

    @Register.responder
    def register(
        self, name: str, tags: list[str] | None, free: dict[str, int] | None, version: int | None
    ) -> dict[str, Any]:
        certified = self._require("node")
        if name != certified:
            raise Refused(f"this certificate is for {certified!r}, not {name!r}")
        why = version_mismatch("master", "node", version)
        if why is not None:
            log.error("refused node {name}: {why}", name=name, why=why)
            raise Refused(why)
        self.caller.node_name = name
        self.caller.peer = AMPPeer(name, self.caller)
        self.runner.fleet.attach(name, self.caller, self._granted(name, tuple(tags or ())), dict(free or {}))
        self.runner.kick()
        return {"version": PROTOCOL}

    def _granted(self, name: str, declared: tuple[str, ...]) -> tuple[str, ...]:
        """
        The tags a node is targeted by: those its certificate grants, or
        the ones its configuration names of those; it can never add one.
        """
        assert self.caller.identity is not None
        granted = self.caller.identity.tags
        if not declared:
            return granted
        refused = [t for t in declared if t not in granted]
        if refused:
            log.warn(
                "node {name} claims tags its certificate does not grant, ignored: {refused}"
                " (mrsync-ca issue --role node {name} --tag TAG grants one)",
                name=name,
                refused=", ".join(refused),
            )
        return tuple(t for t in declared if t in granted)

    @Congestion.responder
    def congestion(self, report: tuple[bytes, Feedback]) -> dict[str, Any]:
        if self.caller.node_name is not None:
            self.runner.feedback(report[0], self.caller.node_name, report[1])
        return {}

    @Heartbeat.responder
    def heartbeat(self, free: dict[str, int] | None) -> dict[str, Any]:
        if self.caller.node_name is not None:
            self.runner.fleet.touch(self.caller.node_name, free)
        return {}

    @Submit.responder
    def submit(self, spec: Any) -> dict[str, Any]:
        operator = self._require("operator")
        assert self.caller.identity is not None
        try:
            if isinstance(spec, OversizedSpec):
                raise spec
            job = self.runner.submit(spec, operator, self.caller.identity.fingerprint)
        except BadRequest as e:
            log.warn("refused a job from {operator}: {why}", operator=operator, why=e)
            raise
        return {"job": job}

    @ListJobs.responder
    def list_jobs(self, limit: int) -> dict[str, Any]:
        self._require("operator")
        return {"jobs": [job.summary() for job in self.runner.jobs.jobs(min(max(limit, 1), 1000))]}

    @JobStatus.responder
    def job_status(self, job: int, files: bool, wait: float | None = None) -> Any:
        self._require("operator")
        runner = self.runner
        if not wait or wait <= 0:
            return {"status": runner.status(job, files)}
        d = runner.ended(job, min(wait, MAX_STATUS_WAIT))
        return d.addCallback(lambda _: {"status": runner.status(job, files)})

    @Cancel.responder
    def cancel(self, job: int) -> dict[str, Any]:
        operator = self._require("operator")
        assert self.caller.identity is not None
        log.info("job {job} cancelled by {operator}", job=job, operator=operator)
        state = self.runner.cancel(job)
        fingerprint = self.caller.identity.fingerprint
        self.runner.jobs.audit(job, store.CANCEL_ASKED, operator, fingerprint, {"state": state})
        return {"state": state}

    @ForgetNode.responder
    def forget_node(self, name: str) -> dict[str, Any]:
        operator = self._require("operator")
        assert self.caller.identity is not None
        self.runner.fleet.forget(name)
        log.info("node {node} forgotten by {operator}", node=name, operator=operator)
        self.runner.jobs.audit(
            0, store.FORGOT_NODE, operator, self.caller.identity.fingerprint, {"node": name}
        )
        return {}

    @ListNodes.responder
    def list_nodes(self) -> dict[str, Any]:
        self._require("operator")
        return {
            "nodes": [
                node.summary() for node in sorted(self.runner.fleet.nodes.values(), key=lambda n: n.name)
            ]
        }


@implementer(IHandshakeListener)
class MasterControl(BoundedAMP):
    """
    One TLS connection to the master, from a node or an operator: who is on
    the other end (its certificate, checked at the handshake and whenever
    the revocation list changes) and which node it registered; what it may
    ask is `MasterResponders`'.
    """

    def __init__(self, master: MasterService) -> None:
        super().__init__(locator=MasterResponders(master.runner, self))
        self.master = master
        self.max_box_bytes = master.config.max_message_bytes
        self.identity: tls.PeerIdentity | None = None
        self.node_name: str | None = None
        #: The registered node as the transfers see it, for as long as this
        #: connection lasts: it knows which manifest the node holds (`AMPPeer.held`).
        self.peer: AMPPeer | None = None

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        try:
            identity = tls.peer_identity(transport)
        except Exception as e:
            log.warn("refusing a connection from {peer}: {e}", peer=transport.getPeer(), e=e)
            transport.loseConnection()
            return
        if self.master.revocations.shut_out(identity, transport):
            return
        cap = self.master.config.max_connections_per_certificate
        held = sum(1 for c in self.master.connections if c.identity and c.identity.serial == identity.serial)
        if held >= cap:
            log.warn(
                "refusing a connection from {name} at {peer}: its certificate already holds {held}"
                " ([master] max_connections_per_certificate)",
                name=identity.name,
                peer=transport.getPeer(),
                held=held,
            )
            transport.abortConnection()
            return
        self.identity = identity
        self.master.connections.add(self)

    def drop_if_revoked(self) -> None:
        """The revocation list changed: a connection whose certificate it now lists goes."""
        if self.identity is not None and self.master.revocations.shut_out(
            self.identity, self.transport, "was"
        ):
            self.identity = None  # no command of it runs meanwhile

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.master.connections.discard(self)
        if self.node_name is not None:
            self.master.fleet.detach(self.node_name, self)


class MasterService(service.Service):
    """Listens for nodes and operators and runs jobs from the store."""

    def __init__(
        self,
        reactor: Any,
        config: MasterConfig,
        endpoint_factory: Callable[[], Any],
        revocations: tls.Revocations | None = None,
        key: str = "",
    ) -> None:
        """``key``: the master's private key file, which no job may send."""
        self.reactor = reactor
        self.config = config
        self.endpoint_factory = endpoint_factory
        self.revocations = revocations = revocations or tls.Revocations()
        revocations.on_change.append(self.drop_revoked)
        #: Connections past their handshake, with a certificate not revoked.
        self.connections: set[MasterControl] = set()
        path = os.path.join(config.state_dir, "jobs.sqlite")
        self.jobs = store.JobStore(path, keep_jobs=config.keep_jobs, keep_days=config.keep_days)
        self.fleet = Fleet(reactor, self.jobs)
        self.runner = JobRunner(reactor, config, self.jobs, self.fleet, key, settle=config.grace)
        self._watch = task.LoopingCall(self.fleet.drop_silent, NODE_SILENCE)
        self._watch.clock = reactor
        self._port: Any = None
        self._settling: Any = None

    def startService(self) -> None:
        super().startService()

        factory = Factory.forProtocol(lambda: MasterControl(self))
        factory.noisy = False
        self._watch.start(HEARTBEAT, now=False)
        d = self.endpoint_factory().listen(factory)

        def listening(port: Any) -> None:
            self._port = port
            host = port.getHost()
            log.info("master listening on {address}", address=host)
            readiness.notify(ready=True, status=f"listening on {host.host} port {host.port}")
            unfinished = self.jobs.unfinished()
            if unfinished:
                log.info("resuming {n} unfinished jobs once their nodes register", n=len(unfinished))
            self._settling = self.reactor.callLater(self.config.grace, self.runner.kick)

        d.addCallback(listening)
        d.addErrback(self._cannot_listen)

    def drop_revoked(self) -> None:
        for connection in list(self.connections):
            connection.drop_if_revoked()

    def _cannot_listen(self, failure: Failure) -> None:
        log.critical("master cannot listen: {why}", why=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self) -> defer.Deferred | None:  # type: ignore[override]
        readiness.notify(stopping=True)
        super().stopService()
        if self._watch.running:
            self._watch.stop()
        if self._settling is not None and self._settling.active():
            self._settling.cancel()
        self.runner.stop()
        self.fleet.close()
        self.jobs.close()
        if self._port is not None:
            return defer.maybeDeferred(self._port.stopListening)
        return None
