"""
A receiver's delay and loss meter: what its datagrams say about the path
from the sender, read every `FEEDBACK_INTERVAL` as a `contract.Feedback`.

Pure: it is told what arrived (`DelayLossMeter.count`, once a batch, from
`mrsyncd.engine.intake`'s sums) and how full the socket's queue is, and keeps no
clock.  Loss is the share of sequence numbers not seen; delay is the mean
one-way delay above its base, the least seen over the last two minutes.
"""

from __future__ import annotations

from collections import deque

from mrsyncd.control.contract import LOST_MARKS, Feedback
from mrsyncd.engine.tfrc import LossHistory
from mrsyncd.wire.datagram import MASK32

#: How often a receiver looks at its loss and delay, and reports them if
#: there is anything to report (see `mrsyncd.engine.receiver`).
FEEDBACK_INTERVAL = 0.1
#: The base one-way delay is the least seen in BASE_SPANS spans of BASE_SPAN seconds.
BASE_SPAN = 10.0
BASE_SPANS = 12
#: Loss is judged over at least this many datagrams: between passes only
#: the sender's echo comes, one an interval, and one lost of two is no sign
#: of a link that loses half of what is sent.
LOSS_SAMPLE = 20
#: One datagram in this many has its one-way delay measured.
DELAY_SAMPLE = 8
#: Lost datagrams whose sequence number is a multiple of this are named in
#: a report (`Feedback.lost`), at most `LOST_MARKS` of them: every receiver
#: names the same ones, so the sender can tell a loss that all of them saw
#: (a shared link overflowing) from one that each saw alone (random loss,
#: or a receiver's own link).
LOST_MARK = 32
_NONE = 1 << 62


class DelayLossMeter:
    """Counts of one interval, and the base delay of the last two minutes."""

    def __init__(self) -> None:
        #: The highest sequence number seen (-1: none yet).
        self.seq_max = -1
        self._seq_reported = -1
        self._got = 0
        self._owd_min = _NONE
        #: Minima of earlier spans: the base delay is the least of the last
        #: two minutes, so that drift between the two hosts' clocks (and a
        #: step of either) is forgotten instead of taken for a queue.
        self._owd_mins: deque[int] = deque(maxlen=BASE_SPANS)
        self._intervals = 0
        self._owd_sum = 0
        self._owd_count = 0
        self._drops = 0
        self.losses = LossHistory()
        #: The queue of the last reading: the round trip a loss event spans.
        self._queue = 0.0
        self._last_arrived = -1
        self._lost: list[int] = []
        #: Datagrams our own socket dropped (its buffer full: a reader short
        #: of CPU) that no gap has yet accounted for, and the socket's count
        #: when last told (`overflowed`).
        self._local = self._local_new = 0
        self._socket_drops = 0
        #: Readings, this one and the next, that name no lost datagrams:
        #: our socket dropped some while they were counted (`overflowed`).
        self._unnamed = 0

    def count(
        self, got: int, seq_max: int, owd_sum: int, owd_min: int, owd_count: int, now: float = 0.0
    ) -> None:
        """
        ``got`` authentic datagrams arrived by ``now``, the highest numbered
        ``seq_max``, and ``owd_count`` of them had their one-way delay
        measured (microseconds, on the two hosts' clocks).
        """
        if self.seq_max < 0:
            self._seq_reported = seq_max - 1
        elif seq_max > self.seq_max:
            expected = seq_max - self.seq_max
            missing = max(0, expected - got)
            own = min(missing, self._local)
            self._local -= own
            self.losses.count(expected, missing - own, now, self._queue)
        self.seq_max = max(self.seq_max, seq_max)
        self._got += got
        if owd_count:
            self._owd_min = min(self._owd_min, owd_min)
            self._owd_sum += owd_sum
            self._owd_count += owd_count

    def overflowed(self, drops: int) -> None:
        """
        Our socket has dropped ``drops`` datagrams since it opened
        (`multicast.receive_queue`).  Those are no loss of the network's:
        the gaps they leave count as no loss events and name no lost
        datagrams, so that a receiver short of CPU shows in its backlog
        (`reading`), not as congestion.  A lone receiver that took its own
        socket's drops for a path's loss held a push with no rate cap to a
        TCP-friendly rate of 0.4-1.3 Gbit/s (scenario N).
        """
        if drops > self._socket_drops:
            self._local += drops - self._socket_drops
            self._local_new += drops - self._socket_drops
            # Which gaps are the socket's is not known: its count, read after
            # a batch, also holds drops of datagrams behind those still in
            # its buffer, whose gaps show in a later batch, maybe in the
            # next interval.  While it drops, no gap is named: receivers
            # sharing a host's CPU drop the same datagrams at once, and
            # named, those would look like a shared link's loss, which
            # caps the rate at TCP's (`RateController.shared`).
            self._unnamed = 2
        self._socket_drops = drops

    def arrived(self, first: int, last: int) -> None:
        """
        Datagrams ``first`` to ``last`` (sequence numbers) arrived, a run
        of them: those between the last run and this one were lost, and the
        marked ones among them are named in the next reading, unless our
        own socket dropped datagrams in this interval or the last
        (`overflowed`).
        """
        # Drops still to account for (`_local`) are this interval's or the
        # last's, so `_unnamed` covers every batch with gaps of our own.
        if self._unnamed:
            self._last_arrived = max(self._last_arrived, last)
            return
        if self._last_arrived >= 0 and first > self._last_arrived + 1 and len(self._lost) < LOST_MARKS:
            mark = -(-(self._last_arrived + 1) // LOST_MARK) * LOST_MARK
            while mark < first and len(self._lost) < LOST_MARKS:
                self._lost.append(mark & MASK32)
                mark += LOST_MARK
        self._last_arrived = max(self._last_arrived, last)

    def heard_through(self, through: int) -> bool:
        """Every datagram numbered before ``through`` has arrived or is lost (a later one came)."""
        return self.seq_max >= max(0, through - 1)

    def reading(self, queue: tuple[float, int] | None, now: float = 0.0) -> Feedback | None:
        """
        The interval's loss, delay and backlog, and a new interval begun;
        None if nothing arrived nor was expected.  ``queue`` is
        `multicast.receive_queue`'s view of the socket (None: unknown);
        ``now`` stamps the report (`Feedback.stamp_us`).
        """
        expected = self.seq_max - self._seq_reported if self.seq_max >= 0 else 0
        if not expected and not self._got:
            return None
        loss = max(0.0, 1.0 - self._got / expected) if expected >= LOSS_SAMPLE else 0.0
        delay = 0.0
        owd_us = 0
        if self._owd_count:
            base = min(self._owd_min, *self._owd_mins) if self._owd_mins else self._owd_min
            owd_us = round(self._owd_sum / self._owd_count)
            delay = max(0.0, (owd_us - base) / 1e6)
        self._queue = delay
        self._intervals += 1
        if self._intervals % round(BASE_SPAN / FEEDBACK_INTERVAL) == 0 and self._owd_min < _NONE:
            self._owd_mins.append(self._owd_min)
            self._owd_min = _NONE
        backlog = 0.0
        if queue is not None:
            backlog, drops = queue
            if drops > self._drops:
                backlog = 1.0  # it overflowed in the interval
            self._drops = drops
        self._seq_reported = self.seq_max
        # Drops no gap showed within two intervals are forgotten: they would
        # otherwise excuse a later loss of the network's.
        self._local = min(self._local, self._local_new)
        self._local_new = 0
        self._unnamed = max(0, self._unnamed - 1)
        self._got = self._owd_sum = self._owd_count = 0
        stamp_us = int(now * 1e6) & MASK32
        lost, self._lost = tuple(self._lost), []
        return Feedback(loss, delay, backlog, self.losses.rate(), owd_us, stamp_us, lost)
