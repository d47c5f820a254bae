"""
Pacing: how many bytes the sender may put on the wire, and when.

A token bucket refilled from the injected clock.  The sender asks it for an
allowance on every reactor tick, so the rate holds however late the timer
fires, and a burst after a stall is capped by the bucket's depth instead of
flooding switch buffers.  Pure logic: tested with ``task.Clock``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from twisted.internet.interfaces import IReactorTime

from mrsyncd.control.contract import Feedback, fixed
from mrsyncd.engine import tfrc
from mrsyncd.wire.datagram import MASK32, elapsed_us

#: The queueing delay the rate steers for (`RateController.target_delay`).
TARGET_DELAY = 0.007
#: The share of a receiver's socket buffer in use that counts as a queue of
#: ``TARGET_DELAY`` (`RateController.backlog_target`).
BACKLOG_TARGET = 0.3
#: Reports an interval the controller asks for, on average, from receivers
#: whose queue is no news (`Echo.share`): a queue shared by a hundred
#: receivers costs this many reports, not a hundred.  The monitor's queue is
#: the largest of a sample this size; with 4, its noise cost 1% of scenario
#: B's rate (8 receivers, 2% loss).
FEEDBACK_SAMPLE = 8
#: ... or fewer, down to `FEEDBACK_LEAST`, where that many would cost more
#: than this share of the rate: a report is about `REPORT_BYTES` on the wire
#: (TCP, TLS and AMP around 28 bytes), and on a slow link the sample of 8
#: alone was 0.5% of the data (scenario H: 64 receivers at 20 Mbit/s).
FEEDBACK_BUDGET = 0.002
FEEDBACK_LEAST = 2
REPORT_BYTES = 136
#: A queue this much above the monitor's is news: a quarter of the target,
#: above the noise between receivers that share one queue.
NEWS = TARGET_DELAY / 4
#: News is reported `NEWS_OVER` times as often as a queue that is no news
#: (always, with few receivers).  Behind one bottleneck a queue that rises
#: is news to every receiver at once, and reported by all, each rise cost a
#: report from every one of them (a third of scenario H's reports) where a
#: sample tells the same.  A receiver with a bottleneck of its own is still
#: heard within a few intervals, and every interval once it is the monitor.
#: Without a monitor nothing is news: a queue rising from nothing is heard
#: from the sample.
NEWS_OVER = 2
#: The queue the rate steers for once it is below `SHARING` of the most it
#: sent without a queue and other flows show (`RateController.steering`).
#: With the full target a CUBIC flow arriving after the push kept 30-36
#: Mbit/s of 100 in the fairness matrix; with this one, 46-55.  Alone, the
#: full target keeps the link full (scenario A: 4 ms throughout cost 4% of
#: the rate).  At 85%, a push holding 90 Mbit/s beside BBR made no room:
#: BBR kept 12-32 Mbit/s in three cells of the matrix, and 44-57 at 93%.
#: That needs a rate that holds when alone: while the pacer left the
#: frames' headers out, the push's own queue swung it between 90% and 100%
#: of the link, and 93% cost scenario A 2% of its rate.
SHARED_TARGET = 0.004
SHARING = 0.93
#: The controller competes (`RateController.competing`) once a queue of at
#: least the target in force persists in the network though its rate has come down
#: to this share of the most it sent without a queue: the queue is then
#: held by others that do not yield to delay, to whom a sender that does
#: would leave the whole link.
COMPETE_SHARE = 0.5
#: ... for this long: a queue of its own drains in a fraction of it.
COMPETE_AFTER = 1.0
#: It stops competing once the queue has been below this share of the
#: target in force for `COMPETE_AFTER`: the others have left, or yield to delay.
CALM_SHARE = 0.5
#: Bytes of a datagram on the wire, for the TCP-friendly rate (`tfrc.throughput`).
SEGMENT = 1500
#: A receiver's loss is congestion of a link it shares with others when at
#: least `SHARED_SHARE` of the lost datagrams it named in the last
#: `SHARED_WINDOW` seconds, and at least `SHARED_SAMPLE` of them, were named
#: by another receiver too, beyond what chance makes: random loss, or loss
#: on a receiver's own link, strikes each receiver's datagrams apart, but
#: each other receiver that loses 2% of them also loses 2% of this one's
#: (`RateController.sharing`).  Only that share of its loss events counts
#: toward the TCP-friendly rate.
SHARED_WINDOW = 5.0
SHARED_SHARE = 0.5
SHARED_SAMPLE = 6
#: ... and only when chance would name that many of its losses shared at
#: most this often (a Chernoff bound).  The controller asks for every
#: receiver every interval, over a window that moves slowly: counted as
#: soon as half of a sample of 6 was shared, 8 receivers with 2% random
#: loss each (scenario B) capped the rate by chance in 2 runs of 4, for up
#: to 1.5 s, down to 11-12 Mbit/s of 100.
SHARED_CHANCE = 1e-4
#: A receiver's loss is taken as at most this for the chance (`RateController.sharing`).
MOST_LOSS = 0.99


class Pacer:
    def __init__(self, clock: IReactorTime, rate_bps: float, burst_seconds: float = 0.01) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.burst_seconds = burst_seconds
        self._rate = rate_bps / 8.0
        self._tokens = 0.0
        self._last = clock.seconds()

    @property
    def rate_bps(self) -> float:
        return self._rate * 8.0

    @rate_bps.setter
    def rate_bps(self, value: float) -> None:
        if value <= 0:
            raise ValueError("rate must be positive")
        self._refill()
        self._rate = value / 8.0

    @property
    def burst(self) -> float:
        """Bucket depth in bytes; never less than one jumbo datagram."""
        return max(self._rate * self.burst_seconds, 9000.0)

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def allowance(self) -> float:
        """Bytes that may be sent now."""
        self._refill()
        return self._tokens

    def spend(self, nbytes: int) -> None:
        # Refill first: what was earned since the last reading is counted
        # before the spend, so the cap cannot forgive it.
        self._refill()
        self._tokens -= nbytes

    def delay(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` may be sent."""
        self._refill()
        return max(0.0, (nbytes - self._tokens) / self._rate)


def queue(
    report: Feedback, target_delay: float = TARGET_DELAY, backlog_target: float = BACKLOG_TARGET
) -> float:
    """
    The queueing delay a report stands for: the network's, or the
    receiver's own receive queue, which counts as a queue of
    ``target_delay`` once ``backlog_target`` of its buffer is in use (so a
    receiver short of CPU slows the sender before its buffer overflows,
    but a brief stall of its reader does not).
    """
    return max(report.delay, target_delay * report.backlog / backlog_target)


def node_id(name: str) -> int:
    """A receiver's name in an `Echo`: 32 bits of its hash, never 0 (no monitor)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") or 1


@dataclass(frozen=True)
class Echo:
    """
    The controller's view, multicast to the receivers every interval (an
    ECHO datagram) so that those with nothing new to say keep quiet: behind
    one bottleneck every receiver sees the same queue, and without this each
    of them reported it ten times a second, so feedback grew with the number
    of receivers.  As in TFMCC, the sender echoes the limiting receiver; here
    the others also report a random share of the time, which keeps the
    slow-receiver rule's median fed.
    """

    #: `node_id` of the monitor, 0 if there is none.
    monitor: int
    #: The monitor's queue, seconds.
    queue: float
    #: The chance that a receiver whose queue is no news reports it.
    share: float

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct(">IIH")

    def pack(self) -> bytes:
        """10 bytes: monitor, queue in µs, share in units of 1/65535 (unsigned, big-endian)."""
        return self._LAYOUT.pack(
            self.monitor & MASK32, fixed(self.queue, MASK32 / 1e6, 1e6), fixed(self.share, 1.0, 65535)
        )

    @classmethod
    def unpack(cls, payload: bytes) -> Echo | None:
        """None for a payload of the wrong size."""
        if len(payload) != cls._LAYOUT.size:
            return None
        monitor, queue_us, share = cls._LAYOUT.unpack(payload)
        return cls(monitor, queue_us / 1e6, share / 65535)


def report_due(report: Feedback, echo: Echo, own_id: int | None, draw: float) -> bool:
    """
    Whether a receiver with a queue to report should, after the sender's
    last `Echo`: always if it is the monitor (the rate follows its reports);
    otherwise when ``draw``, uniform in [0, 1), falls below the echo's
    share, or `NEWS_OVER` times it if its queue is news (more than `NEWS`
    above the monitor's: it may be the next monitor, or a receiver with a
    bottleneck of its own).  The queue is taken with the default targets,
    which are the sender's: a `RateController` built with others would
    have to echo them.
    """
    if echo.monitor and own_id == echo.monitor:
        return True
    news = echo.monitor and queue(report) > echo.queue + NEWS
    return draw < echo.share * (NEWS_OVER if news else 1)


class RateController:
    """
    Sets the sending rate from the receivers' reports, like LEDBAT does
    from delay: queueing delay below ``target_delay`` means spare capacity,
    so the rate grows; above it, a queue is building at the bottleneck, so
    the rate shrinks in proportion.  The rate settles where the bottleneck
    queue holds ``target_delay``: a full link, with room for TCP, which
    fills queues until it loses and so takes its share from a sender that
    yields to delay.  Two rules keep that share fair where delay alone does
    not (issue 20): the rate never exceeds the TCP-friendly rate (`tfrc`)
    of the most limited receiver, from the loss it shares with the others
    (a shallow queue overflows before its delay shows), and a queue that
    stays though the rate has come down to `COMPETE_SHARE` is others', no
    longer yielded to (`competing`).  Loss that each receiver sees alone (a
    flaky NIC, a filter, random loss) does not slow the sender, since
    repairs recover it.  The network's queue shows in the one-way delay (taken when the
    receiver's kernel got the datagram); a receiver short of CPU shows in its
    socket buffer filling (``Feedback.backlog``), which counts as a queue of
    its own (`queue`), with more slack, since a buffer absorbs a stalled
    reader without loss.

    The receiver with the largest queue is the *monitor*.  A receiver that
    loses at least ``slow_loss`` of what is sent while the others' median
    loss stays under ``others_loss`` gets what its own link can carry, not
    what the LAN can: it is not a monitor, and after ``slow_after`` seconds
    it is marked *slow*, so that repairs for it wait until the others are
    done.  Once only slow receivers are incomplete, they drive the rate and
    are served in catch-up passes.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_rate: float,
        *,
        min_rate: float | None = None,
        start_rate: float | None = None,
        target_delay: float = TARGET_DELAY,
        interval: float = 0.1,
        gain: float = 0.1,
        boost: float = 2.0,
        slow_loss: float = 0.5,
        others_loss: float = 0.2,
        slow_after: float = 1.0,
        backlog_target: float = BACKLOG_TARGET,
    ) -> None:
        self.clock = clock
        self.max_rate = max_rate
        self.min_rate = min_rate if min_rate is not None else min(max_rate, max(1e6, max_rate / 100))
        # Start at half the cap and double each interval until a queue shows
        # (TCP's slow start, with our interval for its RTT, which is a hundred
        # LAN round trips): at the cap after one interval on an idle LAN.
        # Starting at a quarter cost 0.14 s of a 200 MiB job at 100 Mbit/s,
        # an eighth growing by a quarter a second.  The cap is the operator's
        # figure for the link, and a queue stops the doubling within one
        # report.
        self.rate = start_rate if start_rate is not None else max(self.min_rate, max_rate / 2)
        self.target_delay = target_delay
        self.interval = interval
        self.gain = gain
        self.boost = boost
        self.others_loss = others_loss
        self.slow_loss = slow_loss
        self.slow_after = slow_after
        self.backlog_target = backlog_target
        self.monitor: str | None = None
        #: The monitor's queue (see `queue`), seconds.
        self.monitor_queue = 0.0
        self._last_queue: float | None = None
        self.slow: set[str] = set()
        self.active: set[str] = set()
        #: The chance a receiver whose queue is no news reports it (`Echo`):
        #: the `sample` over the receivers with a queue, at most 1.
        self.share = 1.0
        self._reports: dict[str, tuple[float, Feedback]] = {}
        self._lossy_since: dict[str, float] = {}
        self._blocked = False
        self.starting = True
        #: No longer yielding to a queue that others hold (`COMPETE_SHARE`):
        #: growing to the TCP-friendly rate if there is one, else holding.
        self.competing = False
        #: The most sent in an interval without a queue of note, bit/s
        #: (None: never without one, as when others held a queue before the
        #: push began; the cap stands for it then).
        self.capacity: float | None = None
        #: The TCP-friendly rate of the last `update` (inf: no shared loss).
        self.friendly = math.inf
        #: What set `friendly`, for the log: the receiver, how many of the
        #: lost datagrams it named others named too, and its loss event
        #: rate ("" while `friendly` is inf).
        self.friendly_cause = ""
        #: Each receiver's least round trip seen, seconds.
        self._rtt_min: dict[str, float] = {}
        #: The lost datagrams each receiver named, with when and in which
        #: update's round, and how many named each (counted once an update,
        #: when first asked).
        self._lost: dict[str, deque[tuple[float, int, int]]] = {}
        self._namers: Counter[int] | None = None
        #: Updates made: a round is the reports between two of them.
        self._round = 0
        #: The loss each receiver reported, by round, for the chance that
        #: it named another's lost datagram (`sharing`); and that chance
        #: for each round, all receivers' told (counted when first asked).
        self._round_loss: dict[int, dict[str, float]] = {}
        self._chance: dict[int, tuple[float, dict[str, float]]] | None = None
        #: The queue the rate steers for now: the target, or `SHARED_TARGET`.
        self.steering = target_delay
        #: Since when a queue has stood though the rate came down, or has
        #: been calm while competing (`COMPETE_AFTER`).
        self._flip_since: float | None = None
        #: The queue the last update's cut answered (where it was heading),
        #: or None if it made none.
        self._answered: float | None = None
        #: The queue the last update held the rate on for that cut, or None.
        self._draining: float | None = None
        #: The monitor's report (its receiver, when heard) the last update
        #: weighed and did not cut for, or None.
        self._spared: tuple[str, float] | None = None

    def feedback(self, node: str, report: Feedback) -> None:
        now = self.clock.seconds()
        self._reports[node] = (now, report)
        if report.lost:
            self._lost.setdefault(node, deque()).extend((now, self._round, seq) for seq in report.lost)
            self._namers = None
        if report.loss:
            losses = self._round_loss.setdefault(self._round, {})
            losses[node] = max(report.loss, losses.get(node, 0.0))
            self._chance = None
        if report.stamp_us:
            # Out on the data path, back with the report: each leg is on two
            # clocks, but their offsets cancel in the sum.  Less the queue
            # the report tells of, it is the path's own round trip; the least
            # over the transfer leaves out the time reports wait in reactors.
            back = elapsed_us(int(now * 1e6), report.stamp_us)
            rtt = (report.owd_us + back) / 1e6 - report.delay
            if 0.0 < rtt < 10.0:
                self._rtt_min[node] = min(rtt, self._rtt_min.get(node, rtt))

    def rtt(self, node: str, report: Feedback) -> float:
        """A receiver's round-trip time: the path's least, plus the queue it reports now."""
        return self._rtt_min.get(node, 0.0) + report.delay

    def shared(self, node: str) -> float:
        """
        The share of a receiver's loss that is congestion of a link it
        shares (see `SHARED_SHARE`), 0 below it.  A receiver that is the
        only one the sender ever heard from shares its path with nobody to
        tell, and all its loss counts, as a TCP flow's does; one left alone
        in a catch-up pass does not: its loss was its own link's.
        """
        named, shared, chance = self.sharing(node)
        if named < SHARED_SAMPLE:
            return 0.0
        if len(self._reports) <= 1:  # only this one was ever heard
            return 1.0
        if not _beyond_chance(shared, named, chance):
            return 0.0
        # Of the losses it shares in truth, all are named by others too;
        # of the rest, the share chance makes.
        share = (shared - chance) / (named - chance)
        return share if share >= SHARED_SHARE else 0.0

    def sharing(self, node: str) -> tuple[int, int, float]:
        """
        How many lost datagrams a receiver named in the window, how many of
        them another receiver named too, and how many of them others would
        have named by chance: each lost a datagram with the loss it
        reported for the round, or the one before or after (the intervals
        of two receivers do not begin together).  A receiver that reported
        none in those rounds named none: reports come when a queue shows,
        at every receiver behind it at once, so a shared queue makes named
        losses come together, though each is chance.
        """
        mine = self._lost.get(node, ())
        if not mine:
            return 0, 0, 0.0
        # How many receivers named each datagram: a receiver names one once.
        if self._namers is None:
            self._namers = Counter(seq for named in self._lost.values() for _, _, seq in named)
        if self._chance is None:
            self._chance = self._chances()
        shared, chance = 0, 0.0
        for _, round_, seq in mine:
            shared += self._namers[seq] > 1
            kept, own = self._chance.get(round_, (1.0, {}))
            chance += 1.0 - kept / (1.0 - own.get(node, 0.0))
        return len(mine), shared, chance

    def _chances(self) -> dict[int, tuple[float, dict[str, float]]]:
        """
        For each round: the chance that no active receiver lost a given
        datagram, and each one's loss (its most in the rounds around), so
        that its own can be taken out.
        """
        chances = {}
        for round_ in self._round_loss:
            most: dict[str, float] = {}
            for near in (round_ - 1, round_, round_ + 1):
                for node, loss in self._round_loss.get(near, {}).items():
                    if node in self.active:
                        most[node] = min(MOST_LOSS, max(loss, most.get(node, 0.0)))
            chances[round_] = (math.prod(1.0 - loss for loss in most.values()), most)
        return chances

    def _friendly(self, reports: dict[str, Feedback]) -> float:
        """
        The TCP-friendly rate of the most limited of these receivers, from
        the loss events of theirs that are shared (inf: none are).
        """
        least, self.friendly_cause = math.inf, ""
        for node, report in reports.items():
            share = self.shared(node) if report.events > 0 else 0.0
            if share:
                rate = tfrc.throughput(SEGMENT, self.rtt(node, report), report.events * share)
                if rate < least:
                    named, shared, chance = self.sharing(node)
                    least = rate
                    self.friendly_cause = (
                        f"{node}: {shared} of {named} named losses shared ({chance:.1f} by chance), "
                        f"events {report.events:.2g}"
                    )
        return least

    def _forget_lost(self, now: float) -> None:
        self._namers = self._chance = None
        oldest = self._round - math.ceil(SHARED_WINDOW / self.interval) - 2
        for round_ in [r for r in self._round_loss if r < oldest]:
            del self._round_loss[round_]
        for node in list(self._lost):
            named = self._lost[node]
            while named and now - named[0][0] > SHARED_WINDOW:
                named.popleft()
            if not named or node not in self.active:
                del self._lost[node]

    def sample(self) -> float:
        """Reports an interval to ask for of receivers with a queue that is no news (`FEEDBACK_BUDGET`)."""
        affordable = FEEDBACK_BUDGET * self.rate / 8 * self.interval / REPORT_BYTES
        return max(FEEDBACK_LEAST, min(FEEDBACK_SAMPLE, affordable))

    def _share_over(self, receivers: float) -> float:
        """The share that asks the `sample` of this many receivers with a queue (1 for none)."""
        return min(1.0, self.sample() / receivers) if receivers else 1.0

    def echo(self) -> Echo:
        """What the receivers are told after an `update`."""
        return Echo(node_id(self.monitor) if self.monitor is not None else 0, self.monitor_queue, self.share)

    def queue(self, report: Feedback) -> float:
        """The queue a report stands for (see `queue`), with this controller's targets."""
        return queue(report, self.target_delay, self.backlog_target)

    def blocked(self) -> None:
        """The local send queue overflowed: the bottleneck is our own link."""
        self._blocked = True

    def set_active(self, nodes: set[str]) -> None:
        """The receivers still missing something; only they count."""
        self.active = set(nodes)
        if not self._reports and nodes:  # the share an echo asks for before any is heard
            self.share = self._share_over(len(nodes))

    def _recent(self, now: float) -> dict[str, Feedback]:
        return {
            node: report
            for node, (when, report) in self._reports.items()
            if node in self.active and now - when <= 2 * self.interval
        }

    def _update_slow(self, now: float, recent: dict[str, Feedback]) -> set[str]:
        """
        Mark slow receivers; returns those that lag now (not monitors).  A
        receiver lags when it loses most of what is sent, or has a queue of
        its own (twice the target beyond the others' median), while most of
        the others (a majority) lose little and have no such queue: then the
        bottleneck is its own link, not the one they share.  The others may
        well hold a queue, near the target or above: that is the shared link,
        which the rate is for.  A lagging receiver's last report counts for
        ``slow_after``: its reports cross its congested link, so they come
        late and in bursts, and a gap between them is no sign of health.
        """

        def latest(node: str) -> Feedback | None:
            when, report = self._reports.get(node, (0.0, None))
            fresh = self.slow_after if node in self._lossy_since else 2 * self.interval
            return report if report is not None and now - when <= fresh else None

        reports = {node: report for node in self.active if (report := latest(node)) is not None}
        troubled = {
            node
            for node, report in reports.items()
            if report.loss >= self.slow_loss or self.queue(report) >= 2 * self.target_delay
        }
        others = self.active - troubled
        lagging: set[str] = set()
        if len(others) > len(troubled):
            losses = [recent[n].loss if n in recent else 0.0 for n in others]
            shared = _median(self._queues_of(others, recent))
            if _median(losses) < self.others_loss:
                lagging = {
                    node
                    for node in troubled
                    if reports[node].loss >= self.slow_loss
                    or self.queue(reports[node]) >= shared + 2 * self.target_delay
                }
        for node in list(self._lossy_since):
            if node not in lagging:
                del self._lossy_since[node]
        for node in lagging:
            # Trouble reported at both ends of slow_after, not a blip that
            # is still remembered: a receiver is silent while all is well.
            heard = self._reports[node][0]
            if heard - self._lossy_since.setdefault(node, heard) >= self.slow_after:
                self.slow.add(node)
        self.slow &= self.active
        if self.active and self.active <= self.slow | lagging:
            self.slow.clear()  # catch-up: only slow receivers are left
            return set()
        return lagging

    def _queues_of(
        self, nodes: set[str], recent: dict[str, Feedback], queue: Callable[[Feedback], float] | None = None
    ) -> list[float]:
        """
        The queues of ``nodes`` (`queue`, or the one given), for a median:
        one for each that has a queue, and 0 for each silent one that has
        none.  Under the echo a receiver with a queue reports it a share of
        the time, so the reports heard stand for as many receivers with a
        queue as there are over the chance of hearing one in the two
        intervals that `recent` holds.  That count comes from every report
        heard, less those from outside ``nodes``, and the queues heard from
        ``nodes`` stand for the rest of theirs (those heard from anyone, if
        none is): when ``nodes`` are the receivers not in trouble, the ones
        heard may all be in trouble, and a silent one is then no sign of a
        short queue.
        """
        queue = queue or self.queue
        heard = [n for n in recent if n in self.active]
        queues = [queue(recent[n]) for n in nodes if n in recent]
        outside = len(heard) - len(queues)
        queued = min(len(nodes), max(len(queues), round(len(heard) / self._reach(2)) - outside))
        sample = queues or [queue(recent[n]) for n in heard]
        if not sample:
            return [0.0]
        return [sample[i % len(sample)] for i in range(queued)] + [0.0] * (len(nodes) - queued) or [0.0]

    def _reach(self, intervals: int) -> float:
        """The chance of hearing, in ``intervals``, a receiver that reports a `share` of them."""
        return 1.0 - (1.0 - self.share) ** intervals

    def update(self) -> float:
        """Called every ``interval``: the rate for the next one, in bits per second."""
        now = self.clock.seconds()
        recent = self._recent(now)
        lagging = self._update_slow(now, recent)
        considered = (self.active - self.slow - lagging) or self.active
        reports = {node: recent[node] for node in considered if node in recent}
        delay = 0.0
        self.monitor = None
        if reports:
            self.monitor = max(reports, key=lambda node: self.queue(reports[node]))
            delay = self.queue(reports[self.monitor])
        weighed = None if self.monitor is None else (self.monitor, self._reports[self.monitor][0])
        spared, self._spared = self._spared, None
        self.monitor_queue = delay
        heard = sum(
            1 for n, (when, _) in self._reports.items() if n in self.active and now - when <= self.slow_after
        )
        # Receivers with a queue: those heard from in slow_after, over the
        # chance that one of them was.
        reach = self._reach(round(self.slow_after / self.interval))
        # Before any is heard, the sample over all (a queue rising from
        # nothing is then news to every receiver: see `NEWS_OVER`).
        self.share = self._share_over(min(heard / reach, len(self.active)) if heard else len(self.active))
        # The queue a report shows is an interval old by the time the rate
        # it leads to takes effect: steer by where the queue is heading (its
        # last change carried on), so that a queue already draining is not
        # cut into again, nor one already filling fed more.  Without this
        # the rate swung around the target once a second and the link went
        # idle on every swing down (95.7% of it used in scenario A).
        # A queue heard of after silence (reports start above 2 ms) is not
        # a trend.
        heading = delay if self._last_queue is None else 2 * delay - self._last_queue
        self._last_queue = delay if reports else None
        # The network's queue: a receiver's own socket buffer (`queue`) is
        # nobody else's.
        network = max((report.delay for report in reports.values()), default=0.0)
        self._forget_lost(now)
        self.friendly = self._friendly(reports)
        if delay < self.target_delay * CALM_SHARE:
            self.capacity = max(self.capacity or 0.0, self.rate)
        capacity = self.max_rate if self.capacity is None else self.capacity
        # Sharing the link with flows it can see (loss the receivers share,
        # a queue it competes for, or a network queue at most receivers) and
        # below `SHARING` of the most it sent without a queue, it steers for
        # a shorter queue, where they find room.  A BBR flow shows only in
        # the queue: it does not fill it to loss, and its window is about
        # twice its rate times the round trip it measured before the push
        # came, so a standing queue of 7 ms held it to 20-30 Mbit/s of 100.
        # Only the median receiver's queue counts: 64 receivers short of CPU
        # stamp datagrams late, one or other of them in every interval.
        shared_queue = _median(self._queues_of(considered, recent, lambda report: report.delay))
        steer = self.target_delay
        if self.rate < SHARING * capacity and (
            self.friendly < math.inf or self.competing or shared_queue >= SHARED_TARGET * CALM_SHARE
        ):
            steer = min(self.target_delay, SHARED_TARGET)
        self.steering = steer
        off = max(-1.5, min(1.0, (steer - heading) / steer))
        if self._blocked:
            off = -1.0
        if off < 0.75:
            self.starting = False
        held = (
            network >= steer
            and self.rate <= COMPETE_SHARE * capacity
            and not self.starting
            # Unless receivers are short of CPU: their kernels then stamp
            # datagrams late, and that delay is theirs, not a queue to take.
            and all(report.backlog < self.backlog_target / 2 for report in reports.values())
        )
        calm = network < steer * CALM_SHARE
        if (calm if self.competing else held) and self._flip_since is None:
            self._flip_since = now
        elif not (calm if self.competing else held):
            self._flip_since = None
        if self._flip_since is not None and now - self._flip_since >= COMPETE_AFTER:
            self.competing = not self.competing
            self._flip_since = None
        answered, self._answered = self._answered, None
        draining, self._draining = self._draining, None
        if self.starting:
            self.rate *= self.boost  # like TCP's slow start, until the first queue
        elif held and not self.competing:
            pass  # yielded enough to tell whose the queue is: wait and see
        elif self.competing:
            # The queue is others': no more yielding to it.  With shared
            # loss the TCP-friendly rate sets the rate (below), which it
            # approaches as TCP would; without, others hold the queue but
            # do not fill it to loss (they pace themselves, as BBR does), and
            # the rate holds where it stopped yielding.
            if self.friendly < math.inf:
                self.rate *= 1.0 + self.gain
        else:
            # Gentle near the target, where a step shows in the delay only a
            # report later, so that a firm one swings around it (and the link,
            # emptied on every swing down, loses throughput); firm far from
            # it: +10% per interval with no queue, -15% with a queue of 2.5
            # times the target.
            factor = 1.0 + self.gain * off * min(1.0, abs(off))
            if factor < 1.0:
                # One cut for a queue that comes at full rate.  The report
                # after a cut tells of the interval before it took effect:
                # while the queue is no higher than the cut's heading, that
                # cut is what answers it.  Cut again on it, and a queue that
                # came at once (a stall of the sender or of the link's host,
                # 10-20 ms) took 25-30% off the rate, and the link idled as
                # the rate climbed back: 84 Mbit/s of 100 held in scenario
                # A.  Only from full rate (`SHARING` of the most sent
                # without a queue): below it the push yields to others as
                # it did, and the fairness matrix's BBR cells, which feel
                # every interval of the push's queue, stay as they were.
                # And on while each report's queue is lower than the last:
                # the cut is draining it.  Below full rate the push steers
                # for `SHARED_TARGET` where most receivers show the queue,
                # as they all show one the push made itself, so a cut on
                # the draining queue took the rate on down: 84.5, 72, 73,
                # 67.5, 74 Mbit/s in scenario T (0.17 s of its link); a
                # queue that others fill stands or rises, and is cut for.
                if not self._blocked and (
                    answered is not None and delay <= answered or draining is not None and delay < draining
                ):
                    factor = 1.0
                    self._draining = delay
                elif weighed is not None and weighed == spared and not self._blocked:
                    # Nor a cut on a report the last update spared.  A
                    # report counts for two intervals (`_recent`), but its
                    # trend shows only the first time: the next one late
                    # (its receiver short of CPU), the same report is
                    # heading for its own queue.  Where the last update
                    # rose on it, as the queue drained, a cut on it cut
                    # the drained queue again: 100, 84, 90, then 76.5
                    # Mbit/s in scenario A.
                    factor = 1.0
                elif self.rate >= SHARING * capacity:
                    self._answered = heading
            if factor >= 1.0:
                self._spared = weighed
            self.rate *= factor
        # Never above what TCP would get on the most limited receiver's
        # round trip and shared loss: fair to TCP in a queue too shallow
        # for the delay to show, or held by flows that fill it to loss.
        self.rate = min(self.rate, self.friendly)
        self.rate = max(self.min_rate, min(self.max_rate, self.rate))
        self._blocked = False
        self._round += 1
        return self.rate


def _beyond_chance(shared: int, named: int, chance: float) -> bool:
    """
    Whether ``shared`` of ``named`` losses named by others too is more than
    chance, which names ``chance`` of them on average, makes at most
    `SHARED_CHANCE` of the time: the Chernoff bound, ``exp(-n D(k/n || p))``,
    which holds for a sum of coin tosses of unequal odds.
    """
    if not named or shared <= chance:
        return False
    seen, odds = shared / named, chance / named
    if odds <= 0.0:
        return True
    divergence = seen * math.log(seen / odds)
    if seen < 1.0:
        divergence += (1.0 - seen) * math.log((1.0 - seen) / (1.0 - odds))
    return named * divergence >= -math.log(SHARED_CHANCE)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
