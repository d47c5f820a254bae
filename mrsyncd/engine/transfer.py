"""
One transfer, run from the sender's side: offer, send, repair, report.

The control exchange goes through `contract.ReceiverPeer`, whose
implementations are `agent.LocalPeer`, which calls a receiver agent in the
same process (tests), `peers.AMPPeer`, which calls one over an AMP channel,
and the master's `FleetPeer`, which reaches a node through its current connection.  The
loop is:

0. A large manifest that several peers hold none of goes to them first by
   multicast, in a transfer of its own (`multicast_manifest`).
1. ``prepare``: every peer gets the manifest and this run's datagram key
   and answers with the chunks it needs; the sender sends the union, once.
2. ``missing``: every live peer answers with a bounded report of the blocks
   it still lacks; the sender sends the union of the reports.  Repeat until
   every live peer says it is done.
3. ``results``: every peer reports each entry's outcome.

A peer that does not answer is given ``grace`` seconds since it last did
before it is declared failed; the others never wait for it longer than one
``call_timeout`` per repair round.  Preparing and reporting results may take
longer (digesting old copies of large files, a post-receive hook), so those
calls have ``prepare_timeout`` instead.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task, threads
from twisted.python.failure import Failure

from mrsyncd import logs
from mrsyncd.control.contract import (
    DEFAULT_OPTIONS,
    Feedback,
    MissingReport,
    Offer,
    Outcome,
    ReceiverPeer,
    Refused,
    TransferOptions,
    UnknownTransfer,
)
from mrsyncd.engine.multicast import Channel
from mrsyncd.engine.ratecontrol import RateController
from mrsyncd.engine.receiver import OK
from mrsyncd.engine.sender import Sender
from mrsyncd.engine.storage import WOULD_DELETE, WOULD_RECEIVE
from mrsyncd.wire import datagram
from mrsyncd.wire.blockset import RangeSet, decode_map, repair_plan, union_maps
from mrsyncd.wire.manifest import FILE, Manifest, deflated, scan

log = logs.logger(__name__)

#: The repairs that a probe finds go out spread over the datagrams sent in
#: this share of the time to the next probe (`Sender.repair`).
REPAIRS_WITHIN = 0.75
#: What one receiver's answer to a probe costs the network, the request's
#: acknowledgement included: about 300 bytes at 1% loss (measured in
#: scenario H).  Answers cost bytes per receiver, not per loss: ...
PROBE_ANSWER_BYTES = 300
#: ... so probes come less often than ``probe`` seconds when the answers
#: of every receiver would cost more than this share of the data sent: in
#: scenario H (64 receivers at 20 Mbit/s) every 2.6 s, where answers every
#: second were 40% of the feedback, 0.9% of the data.
PROBE_SHARE = 0.003
#: But never less often than this: the repairs a probe finds wait for it.
PROBE_LONGEST = 5.0


#: What delivering a manifest by multicast costs beyond its bytes, a
#: transfer's offer, pass and results, with room to spare: the whole
#: delivery of T's 0.47 MB to 8 nodes took 0.15 s, its bytes at the cap 0.04.
MANIFEST_ROUND = 0.15


def multicast_manifest(
    size: int, wanting: int, rate_bps: float, round_seconds: float = MANIFEST_ROUND
) -> bool:
    """
    Whether a manifest of ``size`` bytes as it travels (`deflated`) goes by
    multicast to the ``wanting`` receivers that hold none, rather than to
    each over its control connection, where it crosses the master's link
    once a receiver (0.47 MB for 10,000 small files: 0.3 s of a
    100 Mbit/s link for 8 nodes, 3.8 s for 100): when the copies it saves
    would take the link at ``rate_bps`` longer than a delivery's round.
    """
    return wanting >= 2 and (wanting - 1) * size * 8 / rate_bps > round_seconds


def _spooled(encoded: bytes, directory: str, block_size: int) -> tuple[int, Manifest, dict[int, str]]:
    """
    ``encoded``, a manifest, deflated into ``directory``/manifest and
    scanned as a transfer's one file (its deflated size first): blocking,
    and for 100,000 files a tenth of a second, so run in a thread.
    """
    packed = deflated(encoded)
    with open(os.path.join(directory, "manifest"), "wb") as f:
        f.write(packed)
    manifest, local_paths = scan([directory + "/"], block_size)
    return len(packed), manifest, local_paths


def probe_interval(probe: float, receivers: int, rate_bps: float) -> float:
    """Seconds between probes of a pass: ``probe``, or longer for many receivers (`PROBE_SHARE`)."""
    answers = receivers * PROBE_ANSWER_BYTES * 8 / (PROBE_SHARE * rate_bps)
    return max(probe, min(PROBE_LONGEST, answers))


@dataclass
class PeerReport:
    name: str
    ok: bool = True
    reason: str = ""
    results: dict[str, str] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    #: File bytes it needed when the transfer was offered.
    needed_bytes: int = 0
    #: Paths it wrote, linked or deleted.
    changed: int = 0
    #: Its post-receive hook's outcome, if it ran one.
    hook: dict[str, Any] | None = None
    #: Seconds from the start of the transfer until it had every file
    #: verified and in place (None if it never had).
    seconds: float | None = None


@dataclass
class TransferReport:
    transfer_id: bytes
    peers: dict[str, PeerReport]
    seconds: float
    passes: int
    sender_stats: dict[str, int]
    #: Where the seconds went, in order: the offer (the manifest's
    #: delivery included), the passes and their rounds of repairs, and
    #: the results.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.peers.values())


def new_offer(
    manifest: Manifest, channel: Channel, destination: str, options: TransferOptions = DEFAULT_OPTIONS
) -> Offer:
    return Offer(
        transfer_id=os.urandom(datagram.TRANSFER_ID_SIZE),
        key=os.urandom(datagram.KEY_SIZE),
        manifest=manifest,
        channel=channel,
        destination=destination,
        options=options,
    )


def clip(
    manifest: Manifest,
    wanted: Mapping[int, RangeSet],
    chunks: bool = False,
    before: tuple[int, int] | None = None,
) -> dict[int, RangeSet]:
    """
    Keep only what names a block (or chunk) of a regular file of the
    manifest, or a block of a pack: a report from a confused or hostile
    receiver must not send the sender past the end of a file, into a
    directory or into a packed file by an index the wire does not use.
    With ``before``, a (file, block) position, keep only what lies before it.
    """
    clipped = {}
    packs, packed_in = manifest.packs, manifest.packed_in
    for index, ranges in wanted.items():
        if not 0 <= index < len(manifest.entries) or manifest.entries[index].kind != FILE:
            continue
        if before is not None and index > before[0]:
            continue
        entry = manifest.entries[index]
        if index in packs:
            limit = len(packs[index].members) if chunks else manifest.unit_blocks(index)
        elif index in packed_in:
            continue
        else:
            limit = manifest.chunks(entry) if chunks else manifest.blocks(entry)
        if before is not None and index == before[0]:
            limit = min(limit, before[1])
        inside = ranges.below(limit)
        if inside:
            clipped[index] = inside
    return clipped


def chunks_to_blocks(manifest: Manifest, needs: Mapping[int, RangeSet]) -> dict[int, RangeSet]:
    """The blocks that needs (chunks of a file, members of a pack) cover."""
    packs = manifest.packs
    return {
        index: manifest.pack_blocks(index, needed)
        if index in packs
        else needed.map(manifest.chunk_blocks, manifest.blocks(manifest.entries[index]))
        for index, needed in clip(manifest, needs, chunks=True).items()
    }


class Transfer:
    def __init__(
        self,
        reactor: Any,
        offer: Offer,
        local_paths: Mapping[int, str],
        peers: list[ReceiverPeer],
        *,
        rate_bps: float,
        grace: float = 30.0,
        call_timeout: float = 10.0,
        prepare_timeout: float = 600.0,
        stalled_rounds: int = 50,
        max_passes: int = 100,
        max_corrupt_chunks: int = 16,
        drain: float = 0.05,
        poll: float = 0.1,
        probe: float = 1.0,
        last_probe: float = 0.15,
        run: bytes | None = None,
        manifest_round: float = MANIFEST_ROUND,
    ) -> None:
        """
        ``run`` salts this run's datagram key (`datagram.run_key`); fresh
        random bytes unless the caller keeps them (the master stores them
        with the job).  ``manifest_round``: see `multicast_manifest`
        (``math.inf``: never by multicast).

        ``prepare_timeout`` is long because preparing may digest old copies
        of large files; ``stalled_rounds`` is how many repair rounds a peer
        may go without receiving a single block before it is failed (joined
        on the wrong interface, or behind a filter that drops everything).

        Two bounds keep one node from holding a job for ever ([master]
        ``max_passes`` and ``max_corrupt_chunks``): a node still missing
        something after ``max_passes`` passes, or one whose chunks failed
        their digests ``max_corrupt_chunks`` times (data forged by an insider
        who holds the key, or a disk that corrupts what it is given), is
        failed with the reason, and the others finish.
        """
        names = [p.name for p in peers]
        if len(set(names)) != len(names):
            raise ValueError("two receivers have the same name")
        self.reactor = reactor
        # A run of its own: a fresh key from the secret, so that this run's
        # nonces (its sequence numbers, from 0) are new, and a datagram of
        # an earlier run, replayed, does not open.
        run = run or os.urandom(datagram.RUN_SIZE)
        self.offer = offer = offer.for_run(
            datagram.run_key(offer.key, offer.transfer_id, run), datagram.preferred_cipher()
        )
        self.peers = {p.name: p for p in peers}
        self.grace = grace
        self.call_timeout = call_timeout
        self.prepare_timeout = prepare_timeout
        self.stalled_rounds = stalled_rounds
        self.max_passes = max_passes
        self.max_corrupt_chunks = max_corrupt_chunks
        self.drain = drain
        self.poll = poll
        self.probe = probe
        self.last_probe = last_probe
        self.rate_bps = rate_bps
        self.manifest_round = manifest_round
        #: The transfer delivering this one's manifest, while it runs.
        self._delivery: Transfer | None = None
        self.controller = RateController(reactor, rate_bps)
        self.sender = Sender(
            reactor,
            offer.manifest,
            local_paths,
            offer.channel,
            offer.transfer_id,
            offer.key,
            self.controller.rate,
            offer.cipher,
        )
        self.sender.on_blocked = self.controller.blocked
        self._control = task.LoopingCall(self._adjust_rate)
        self._control.clock = reactor
        self.reports = {name: PeerReport(name) for name in self.peers}
        self._last_heard: dict[str, float] = {}
        self._stalled: dict[str, tuple[int, int]] = {}
        self._received_at_probe: dict[str, int] = {}
        self._done: set[str] = set()
        self._prepared: set[str] = set()
        #: Packs that a receiver takes only some files of, or with a file
        #: abandoned: repaired block by block, never by parities, since such
        #: a receiver holds no data where the other files lie, which a
        #: parity of the group would have to be solved for too.
        self._partial: set[int] = set()
        self._pass_ended = 0.0
        self._started = 0.0
        self.passes = 0
        self.planned_bytes = 0
        #: Bytes of the manifest's delivery multicast, parities included (`_deliver_manifest`).
        self.manifest_sent = 0
        self.cancelled = False
        #: Stopped by `interrupt`: the transfer stays as it is at every receiver.
        self.interrupted = False

    @property
    def live(self) -> list[str]:
        return [name for name, report in self.reports.items() if report.ok]

    def progress(self) -> dict[str, Any]:
        """For status displays: what was planned, what is sent, who is done."""
        return {
            "planned_bytes": self.planned_bytes,
            "sent_bytes": self.sender.stats["payload"],
            "passes": self.passes,
            "rate_bps": self.sender.pacer.rate_bps,
            "monitor": self.controller.monitor,
            "slow": sorted(self.controller.slow),
            "done": sorted(self._done & set(self.live)),
            "failed": {name: r.reason for name, r in self.reports.items() if not r.ok},
        }

    def feedback(self, name: str, report: Feedback, transfer_id: bytes | None = None) -> None:
        """
        A receiver's loss and delay report about the transfer
        ``transfer_id`` (None: this one), for the rate controller of this
        one or of the delivery of its manifest; reports about any other
        are not this transfer's.
        """
        delivery = self._delivery
        if delivery is not None and transfer_id == delivery.offer.transfer_id:
            delivery.feedback(name, report)
        elif name in self.peers and transfer_id in (None, self.offer.transfer_id):
            self.controller.feedback(name, report)

    def _adjust_rate(self) -> None:
        self.controller.set_active({n for n in self.live if n not in self._done})
        self.sender.pacer.rate_bps = self.controller.update()
        self.sender.echo(self.controller.echo().pack())
        log.debug(
            "rate {rate:.1f} Mbit/s, monitor {monitor}, queue {queue:.1f} ms (for {steering:.0f}), "
            "slow {slow}, TCP-friendly {friendly:.1f} Mbit/s{cause}{competing}",
            rate=self.controller.rate / 1e6,
            monitor=self.controller.monitor,
            queue=self.controller.monitor_queue * 1e3,
            slow=sorted(self.controller.slow),
            friendly=self.controller.friendly / 1e6,
            cause=f" ({self.controller.friendly_cause})" if self.controller.friendly_cause else "",
            steering=self.controller.steering * 1e3,
            competing=", competing" if self.controller.competing else "",
        )

    def cancel(self) -> None:
        """Stop sending; every receiver is told to let go of the transfer."""
        if not (self.cancelled or self.interrupted):
            self.cancelled = True
            self.sender.abort()
            if self._delivery is not None:
                self._delivery.cancel()

    def interrupt(self) -> None:
        """
        Stop sending and tell the receivers nothing: the master is going
        down and resumes the job when it comes back.  A node lets go of the
        transfer when its control connection drops, keeping its part files
        to resume from, which `cancel` would have it remove.
        """
        if not (self.cancelled or self.interrupted):
            self.interrupted = True
            self.sender.abort()
            if self._delivery is not None:
                self._delivery.interrupt()

    @property
    def _stopped(self) -> bool:
        return self.cancelled or self.interrupted

    def _call(self, name: str, method: str, *args: object, **kwargs: object) -> defer.Deferred:
        d = defer.maybeDeferred(getattr(self.peers[name], method), *args, **kwargs)
        # Preparing may digest old copies of large files, and results may
        # wait for a post-receive hook: those get the long timeout.
        d.addTimeout(self.call_timeout if method == "missing" else self.prepare_timeout, self.reactor)
        return d

    def _fail(self, name: str, reason: str) -> None:
        report = self.reports[name]
        if report.ok:
            log.error(
                "transfer {tid}: {node} failed: {reason}",
                tid=self.offer.transfer_id.hex(),
                node=name,
                reason=reason,
            )
            report.ok, report.reason = False, reason

    def _heard(self, name: str) -> None:
        self._last_heard[name] = self.reactor.seconds()

    def _silent(self, name: str, failure: Failure) -> None:
        """
        A call failed: fatal once the peer has been silent for ``grace``.
        Silence counts from the later of its last answer and the end of the
        last pass, so that time spent sending is never held against it.
        """
        since = max(self._last_heard[name], self._pass_ended)
        silent_for = self.reactor.seconds() - since
        if silent_for >= self.grace:
            error = "timed out" if failure.check(defer.TimeoutError) else failure.getErrorMessage()
            self._fail(name, f"no answer for {silent_for:.0f} s (last call: {error})")

    @defer.inlineCallbacks
    def run(self) -> Any:
        started = self._started = self.reactor.seconds()
        for name in self.peers:
            self._heard(name)
        yield self._deliver_manifest()
        offered = not self._stopped
        self.sender.start()
        phases: dict[str, float] = {}
        try:
            blocks = (yield self._prepare(list(self.peers))) if offered else {}
            offered_at = self.reactor.seconds()
            phases["offer"] = offered_at - started
            parities: dict[int, RangeSet] = {}
            self.planned_bytes = self.offer.manifest.bytes_in(blocks)
            # An echo before the first datagram: without one every receiver
            # with a queue reports it (`Receiver._report_due`).
            self.controller.set_active(set(self.live))
            self.sender.echo(self.controller.echo().pack())
            self._control.start(self.controller.interval, now=False)
            while self.live and not self._stopped and not self.offer.options.dry_run:
                if blocks or parities:
                    log.debug(
                        "transfer {tid}: pass {n}, {bytes} bytes and {parities} parities to send",
                        tid=self.offer.transfer_id.hex(),
                        n=self.passes + 1,
                        bytes=self.offer.manifest.bytes_in(blocks),
                        parities=sum(len(p) for p in parities.values()),
                    )
                    yield self._send_pass(blocks, parities)
                    self.passes += 1
                    if self.sender.error is not None:
                        for name in self.live:
                            self._fail(name, self.sender.error)
                        break
                    self._pass_ended = self.reactor.seconds()
                    if self._stopped:
                        break
                # Each receiver answers once the pass is in (no pause here),
                # and wanting nothing, once it has verified what it holds
                # (`receiver.SETTLE_VERIFYING`), rather than being asked
                # again every `poll` while it verifies.
                blocks, parities = yield self._ask_missing(through=self.sender.sequence)
                if not blocks and not parities and set(self.live) <= self._done:
                    break
                if (blocks or parities) and self.passes >= self.max_passes:
                    for name in [n for n in self.live if n not in self._done]:
                        self._fail(name, f"still incomplete after {self.passes} passes (max_passes)")
                    break
                if not blocks and not parities:
                    yield task.deferLater(self.reactor, self.poll, lambda: None)
            sent_at = self.reactor.seconds()
            phases["send"] = sent_at - offered_at
            if offered and not self.interrupted:
                yield self._collect_results()
                phases["results"] = self.reactor.seconds() - sent_at
        finally:
            if self._control.running:
                self._control.stop()
            self.sender.stop()
        if self.cancelled:
            for name in self.live:
                self._fail(name, "cancelled")
        return TransferReport(
            self.offer.transfer_id,
            self.reports,
            self.reactor.seconds() - started,
            self.passes,
            dict(self.sender.stats),
            phases,
        )

    @defer.inlineCallbacks
    def _send_pass(self, blocks: dict[int, RangeSet], parities: dict[int, RangeSet]) -> Any:
        """
        Send a pass, asking every ``probe`` seconds (or longer, see
        `probe_interval`) what was lost of the part already sent and
        repairing it within the pass, so that a long pass does not end with
        a tail of repair rounds.  The last probe is timed
        to fall ``last_probe`` seconds before the pass's end at the present
        rate, so that what the pass leaves to a round after it is that much
        of its losses, not up to ``probe`` seconds of them.  A pass with no
        more than ``last_probe`` + ``drain`` left (a repair pass, mostly) is
        not probed: a probe would see nothing of it.
        """
        datagram_bits = (
            self.offer.manifest.block_size + datagram.OVERHEAD + self.sender.channel.frame_overhead
        ) * 8
        sending = self.sender.send(blocks, parities)
        since, sent_since = self.reactor.seconds(), self.sender.stats["datagrams"]
        while not sending.called:
            interval = probe_interval(self.probe, len(self.live), self.sender.pacer.rate_bps)
            # What is left to send, repairs queued along with the pass included.
            left = (
                (self.sender.planned - self.sender.taken + self.sender.repairs_pending)
                * datagram_bits
                / self.sender.pacer.rate_bps
            )
            if left <= self.last_probe + self.drain:
                break  # too little left for a probe to see any of it
            last = left < interval + self.last_probe
            wait = left - self.last_probe if last else interval
            nap = task.deferLater(self.reactor, wait, lambda: None)
            yield defer.DeferredList([sending, nap], fireOnOneCallback=True, consumeErrors=True)
            if sending.called:
                nap.cancel()
                break
            if self.sender.repairs_pending and not last:
                continue  # the last probe's repairs are still going out
            sent_by = self.sender.position_at(self.reactor.seconds() - self.drain)
            repairs, repair_parities = yield self._ask_missing(before=sent_by)
            # Repairs are spread over the datagrams of most of the time to the
            # next probe, which then finds them sent and can ask again: at the
            # rate the sender reached since the last probe, since the pacer's
            # is a cap that a host short of CPU falls behind.
            now, sent = self.reactor.seconds(), self.sender.stats["datagrams"]
            per_second = self.sender.pacer.rate_bps / datagram_bits
            if now > since:
                per_second = min(per_second, (sent - sent_since) / (now - since))
            since, sent_since = now, sent
            if repairs or repair_parities:
                within = int(interval * REPAIRS_WITHIN * per_second)
                self.sender.repair(repairs, repair_parities, within=within)
            if last:
                # What it found goes out with the pass's end, and what that
                # loses the question after the pass finds: probing the
                # repairs again cost a round of answers from every receiver
                # every few hundred ms (scenario H ended with four).
                break
        yield sending

    @defer.inlineCallbacks
    def _deliver_manifest(self) -> Any:
        """
        Send the manifest to the peers that hold none in a transfer of its
        own, by multicast, when that is cheaper (`multicast_manifest`); the
        offer then names that transfer, and a peer it did not reach whole
        is sent the manifest over its control connection as before.
        """
        wanting = [peer for peer in self.peers.values() if peer.wants_manifest()]
        encoded = self.offer.manifest_bytes
        # Deflated it is smaller still: one too small even as it is stays here.
        if not multicast_manifest(len(encoded), len(wanting), self.rate_bps, self.manifest_round):
            return
        with tempfile.TemporaryDirectory(prefix="mrsyncd-manifest-") as spool:
            try:
                size, manifest, local_paths = yield threads.deferToThreadPool(
                    self.reactor,
                    self.reactor.getThreadPool(),
                    _spooled,
                    encoded,
                    spool,
                    self.offer.manifest.block_size,
                )
            except OSError as e:
                log.warn("transfer {tid}: manifest not multicast: {e}", tid=self.offer.transfer_id.hex(), e=e)
                return
            if not multicast_manifest(size, len(wanting), self.rate_bps, self.manifest_round):
                return
            options = TransferOptions(label=self.offer.options.label, delivers_manifest=True)
            offer = new_offer(manifest, self.offer.channel, "", options)
            self._delivery = delivery = Transfer(
                self.reactor,
                offer,
                local_paths,
                wanting,
                rate_bps=self.rate_bps,
                grace=self.grace,
                call_timeout=self.call_timeout,
                prepare_timeout=self.prepare_timeout,
                max_passes=self.max_passes,
                manifest_round=math.inf,
            )
            try:
                report = yield delivery.run()
            finally:
                self._delivery = None
                self.manifest_sent = sum(delivery.sender.stats[k] for k in ("payload", "parity"))
        reached = sorted(name for name, peer in report.peers.items() if peer.ok)
        log.info(
            "transfer {tid}: manifest ({size} bytes) multicast to {n} of {wanting} in {seconds:.2f} s",
            tid=self.offer.transfer_id.hex(),
            size=size,
            n=len(reached),
            wanting=len(wanting),
            seconds=report.seconds,
        )
        if reached:
            self.offer = self.offer.delivered_by(delivery.offer.transfer_id)

    @defer.inlineCallbacks
    def _prepare(self, names: list[str]) -> Any:
        """
        Offer the transfer; fires with the blocks the union of needs covers.
        A refusal is final.  A peer that cannot be reached (not connected
        yet, or restarted) is given its grace period and offered the
        transfer again in the next round.
        """
        answers = yield defer.DeferredList(
            [self._call(name, "prepare", self.offer) for name in names], consumeErrors=True
        )
        manifest = self.offer.manifest
        # Each answer is decoded, clipped and counted once, however many
        # receivers gave it: for a tree of 10,000 files that each of 8 nodes
        # needs whole, doing it for every node cost 0.4 s before the first datagram.
        needs: dict[bytes, tuple[dict[int, RangeSet], int]] = {}
        for name, (ok, value) in zip(names, answers, strict=True):
            if ok:
                if value not in needs:
                    try:
                        wanted = clip(manifest, decode_map(value), chunks=True)
                    except ValueError as e:
                        self._fail(name, f"sent a malformed answer to the offer: {e}")
                        continue
                    needs[value] = wanted, manifest.bytes_in(wanted, chunks=True)
                    self._partial.update(
                        head
                        for head, members in wanted.items()
                        if head in manifest.packs and len(members) < len(manifest.packs[head].members)
                    )
                self._heard(name)
                self._prepared.add(name)
                self._done.discard(name)
                self.reports[name].needed_bytes = needs[value][1]
            elif value.check(Refused):
                self._fail(name, f"refused the transfer: {value.getErrorMessage()}")
            else:
                self._silent(name, value)
        return chunks_to_blocks(manifest, union_maps(wanted for wanted, _ in needs.values()))

    def _progressing(self, name: str, report: MissingReport) -> None:
        """Fail a peer that keeps missing blocks but takes none of those sent, or keeps getting bad ones."""
        corrupt = report.stats.get("corrupt_chunks", 0)
        if corrupt >= self.max_corrupt_chunks:
            self._fail(
                name,
                f"{corrupt} chunks failed their digests (forged or corrupted data; max_corrupt_chunks)",
            )
            return
        received = report.stats.get("blocks", 0)
        last, rounds = self._stalled.get(name, (-1, 0))
        rounds = rounds + 1 if received == last and report.missing else 0
        self._stalled[name] = (received, rounds)
        if rounds >= self.stalled_rounds:
            self._fail(name, f"received nothing in {rounds} repair rounds (wrong interface? filtered?)")

    @defer.inlineCallbacks
    def _ask_missing(self, before: tuple[int, int] | None = None, through: int | None = None) -> Any:
        """
        Ask the live receivers what they miss and plan the repairs; with
        ``before`` (a file and block the pass in progress has reached),
        only what was sent before that counts; with ``through`` (the
        sequence number after the last datagram sent), each answers once
        what was sent is in.
        """
        names = [n for n in self.live if n not in self._done and n in self._prepared]
        unprepared = [n for n in self.live if n not in self._prepared]
        abandoned = dict(self.sender.abandoned)
        answers = yield defer.DeferredList(
            [
                self._call(name, "missing", self.offer.transfer_id, abandoned, through, before)
                for name in names
            ],
            consumeErrors=True,
        )
        wanted: dict[str, dict[int, RangeSet]] = {}
        for name, (ok, value) in zip(names, answers, strict=True):
            if not ok:
                if value.check(UnknownTransfer):
                    log.info(
                        "{node} restarted: offering transfer {tid} again",
                        node=name,
                        tid=self.offer.transfer_id.hex(),
                    )
                    self._prepared.discard(name)
                    unprepared.append(name)
                else:
                    self._silent(name, value)
                continue
            self._heard(name)
            report: MissingReport = value
            self.reports[name].stats = report.stats
            if report.done and name not in self._done:
                self._done.add(name)
                self.reports[name].seconds = self.reactor.seconds() - self._started
            received = report.stats.get("blocks", 0)
            if before is not None and received == self._received_at_probe.get(name):
                # It took nothing since the last probe (its link is down, or
                # it listens on the wrong interface): repairing it in the
                # pass would only pile up what it cannot take either.
                self._progressing(name, report)
                continue
            self._received_at_probe[name] = received
            try:
                wanted[name] = clip(self.offer.manifest, decode_map(report.missing), before=before)
            except ValueError as e:
                self._fail(name, f"sent a malformed missing report: {e}")
                continue
            self._progressing(name, report)
        # A slow receiver is served in catch-up passes once the others are
        # done, instead of making them wait for repairs at its pace.
        incomplete = {n for n in self.live if n not in self._done}
        if incomplete - self.controller.slow:
            wanted = {n: w for n, w in wanted.items() if n not in self.controller.slow}
        manifest = self.offer.manifest
        self._partial.update(
            manifest.packed_in[index][0] for index in abandoned if index in manifest.packed_in
        )
        partial = self._partial
        blocks, parities = repair_plan(
            ({i: r for i, r in w.items() if i not in partial} for w in wanted.values()), manifest.parity_group
        )
        if partial:
            blocks = union_maps(
                [blocks, *({i: r for i, r in w.items() if i in partial} for w in wanted.values())]
            )
        if unprepared:
            blocks = union_maps([blocks, (yield self._prepare(unprepared))])
        dropped = self.sender.dropped
        return (
            {index: ranges for index, ranges in blocks.items() if index not in dropped},
            {index: groups for index, groups in parities.items() if index not in dropped},
        )

    @defer.inlineCallbacks
    def _collect_results(self) -> Any:
        """
        Ask every live peer for its results; this also ends the transfer
        there.  A failed peer is told too, in case it can still hear: its
        receiver leaves the group and its part files go, since no later job
        resumes this transfer.
        """
        for name in self.peers:
            if not self.reports[name].ok:
                self._call(name, "results", self.offer.transfer_id, discard=True).addErrback(lambda _: None)
        names = self.live
        answers = yield defer.DeferredList(
            [
                self._call(
                    name, "results", self.offer.transfer_id, **({"discard": True} if self.cancelled else {})
                )
                for name in names
            ],
            consumeErrors=True,
        )
        for name, (ok, value) in zip(names, answers, strict=True):
            report = self.reports[name]
            if ok:
                outcome: Outcome = value
                report.results, report.changed, report.hook = outcome.results, outcome.changed, outcome.hook
                bad = {path: why for path, why in outcome.results.items() if why != OK}
                if self.offer.options.dry_run:
                    bad = {
                        path: why
                        for path, why in bad.items()
                        if why not in (WOULD_RECEIVE, WOULD_DELETE, "unchanged")
                    }
                if outcome.hook is not None and outcome.hook["status"] != 0:
                    bad["post-receive hook"] = f"exited {outcome.hook['status']}"
                if bad and not self.cancelled:
                    path, why = next(iter(sorted(bad.items())))
                    self._fail(name, f"{len(bad)} entries failed, first {path}: {why}")
            elif report.ok:
                self._fail(name, f"no results: {value.getErrorMessage()}")
