"""
TCP-friendly rate: the throughput equation of TFRC (RFC 5348 §3.1) and the
loss event rate it takes (§5), as TFMCC (RFC 4654) uses them for multicast.

TCP sharing a bottleneck with the push gets about what this equation gives
for its round-trip time and its loss event rate, so a sender that never
exceeds it, at the round-trip time and loss event rate of its most limited
receiver, takes no more than a TCP flow would (`mrsyncd.engine.ratecontrol` caps
its rate so, from the loss its receivers share).
Pure: no clock but the times it is given.
"""

from __future__ import annotations

import math
from collections import deque

#: RFC 5348 §5.4: the weights of the last eight loss intervals, newest first.
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2)
#: The round-trip time a loss event spans at least: a LAN's is a tenth of
#: this, but a receiver knows only its queue, and losses a millisecond apart
#: are one burst of a queue overflowing, which TCP answers once.
EVENT_SPAN = 0.001


def throughput(size: float, rtt: float, p: float) -> float:
    """
    Bits per second of a TCP flow sending ``size``-byte segments with
    round-trip time ``rtt`` seconds and loss event rate ``p`` (§3.1, with
    t_RTO = 4 R and b = 1); infinite without loss.
    """
    if p <= 0.0:
        return math.inf
    rtt = max(rtt, 1e-6)
    denominator = rtt * math.sqrt(2 * p / 3) + 4 * rtt * (3 * math.sqrt(3 * p / 8) * p * (1 + 32 * p * p))
    return 8 * size / denominator


class LossHistory:
    """
    A receiver's loss events and the intervals between them, in datagrams
    (§5): losses within a round-trip time of the first loss of an event are
    that event, as TCP halves its window once for them.
    """

    def __init__(self) -> None:
        #: Closed loss intervals, newest first.
        self._intervals: deque[int] = deque(maxlen=len(WEIGHTS))
        #: Datagrams since the newest event began (the open interval).
        self._open = 0
        self._event_at: float | None = None

    def count(self, expected: int, lost: int, now: float, rtt: float) -> None:
        """``expected`` more datagrams were due by ``now``, ``lost`` of them did not come."""
        if lost > 0 and (self._event_at is None or now - self._event_at > max(rtt, EVENT_SPAN)):
            if self._event_at is not None:
                self._intervals.appendleft(self._open)
            self._open = 0
            self._event_at = now
        self._open += expected

    def rate(self) -> float:
        """The loss event rate: one over the weighted mean loss interval; 0 before the second event."""
        if not self._intervals:
            return 0.0
        closed = list(self._intervals)
        mean = _weighted(closed)
        # The open interval counts once it is longer than the mean (§5.4):
        # a receiver whose losses stopped sees its rate fall.
        with_open = _weighted([self._open, *closed[: len(WEIGHTS) - 1]])
        return 1.0 / max(mean, with_open, 1.0)


def _weighted(intervals: list[int]) -> float:
    weights = WEIGHTS[: len(intervals)]
    return sum(w * i for w, i in zip(weights, intervals, strict=True)) / sum(weights)
