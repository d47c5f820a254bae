"""
A receiver's delay and loss meter: what its datagrams say about the path
from the sender, read every `FEEDBACK_INTERVAL` as a `ratecontrol.Feedback`.

Pure: it is told what arrived (`DelayLossMeter.count`, once a batch, from
`mrsyncd.intake`'s sums) and how full the socket's queue is, and keeps no
clock.  Loss is the share of sequence numbers not seen; delay is the mean
one-way delay above its base, the least seen over the last two minutes.
"""

from __future__ import annotations

from collections import deque

from mrsyncd.ratecontrol import Feedback

#: How often a receiver looks at its loss and delay, and reports them if
#: there is anything to report (see `mrsyncd.receiver`).
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

    def count(self, got: int, seq_max: int, owd_sum: int, owd_min: int, owd_count: int) -> None:
        """
        ``got`` authentic datagrams arrived, the highest numbered
        ``seq_max``, and ``owd_count`` of them had their one-way delay
        measured (microseconds, on the two hosts' clocks).
        """
        if self.seq_max < 0:
            self._seq_reported = seq_max - 1
        self.seq_max = max(self.seq_max, seq_max)
        self._got += got
        if owd_count:
            self._owd_min = min(self._owd_min, owd_min)
            self._owd_sum += owd_sum
            self._owd_count += owd_count

    def heard_through(self, through: int) -> bool:
        """Every datagram numbered before ``through`` has arrived or is lost (a later one came)."""
        return self.seq_max >= max(0, through - 1)

    def reading(self, queue: tuple[float, int] | None) -> Feedback | None:
        """
        The interval's loss, delay and backlog, and a new interval begun;
        None if nothing arrived nor was expected.  ``queue`` is
        `multicast.receive_queue`'s view of the socket (None: unknown).
        """
        expected = self.seq_max - self._seq_reported if self.seq_max >= 0 else 0
        if not expected and not self._got:
            return None
        loss = max(0.0, 1.0 - self._got / expected) if expected >= LOSS_SAMPLE else 0.0
        delay = 0.0
        if self._owd_count:
            base = min(self._owd_min, *self._owd_mins) if self._owd_mins else self._owd_min
            delay = max(0.0, (self._owd_sum / self._owd_count - base) / 1e6)
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
        self._got = self._owd_sum = self._owd_count = 0
        return Feedback(loss, delay, backlog)
