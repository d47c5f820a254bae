"""The delay and loss meter, fed counts as the intake's batches give them: no sockets, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mrsyncd.control.contract import LOST_MARKS, Feedback
from mrsyncd.engine.meter import (
    BASE_SPAN,
    BASE_SPANS,
    FEEDBACK_INTERVAL,
    LOSS_SAMPLE,
    LOST_MARK,
    DelayLossMeter,
)

INTERVALS_A_SPAN = round(BASE_SPAN / FEEDBACK_INTERVAL)


def test_nothing_arrived_nor_expected_reads_nothing():
    meter = DelayLossMeter()
    assert meter.reading(None) is None
    meter.count(1, 0, 0, 0, 0)
    assert meter.reading(None) == Feedback(0.0, 0.0, 0.0)
    assert meter.reading(None) is None  # the same sequence again: nothing new


@given(st.integers(LOSS_SAMPLE, 5000), st.data())
def test_loss_is_the_share_of_sequence_numbers_not_seen(expected, data):
    meter = DelayLossMeter()
    meter.count(1, 99, 0, 0, 0)  # the interval before: through 99
    meter.reading(None)
    got = data.draw(st.integers(0, expected))
    meter.count(got, 99 + expected, 0, 0, 0)
    assert meter.reading(None).loss == pytest.approx(1 - got / expected)


def test_too_few_datagrams_are_no_sign_of_loss():
    meter = DelayLossMeter()
    meter.count(1, 0, 0, 0, 0)
    meter.reading(None)
    meter.count(1, LOSS_SAMPLE - 1, 0, 0, 0)  # one of 19 arrived
    assert meter.reading(None).loss == 0.0


def test_delay_is_the_mean_above_the_least_seen():
    meter = DelayLossMeter()
    meter.count(8, 7, 5_000_000 * 2, 5_000_000, 2)  # base: 5 s of clock offset
    assert meter.reading(None).delay == 0.0
    meter.count(8, 15, 5_010_000 + 5_030_000, 5_010_000, 2)
    assert meter.reading(None).delay == pytest.approx(0.020)


def test_the_base_forgets_a_clock_step_after_two_minutes():
    meter = DelayLossMeter()
    meter.count(1, 0, 1_000_000, 1_000_000, 1)
    meter.reading(None)
    sequence = 1
    # The sender's clock steps back 1 s: every delay now reads 1 s more.
    readings = []
    for _ in range((BASE_SPANS + 1) * INTERVALS_A_SPAN):
        meter.count(1, sequence, 2_000_000, 2_000_000, 1)
        sequence += 1
        readings.append(meter.reading(None).delay)
    assert readings[0] == pytest.approx(1.0)
    assert readings[-1] == 0.0


def test_backlog_is_the_queue_or_full_when_it_dropped():
    meter = DelayLossMeter()
    meter.count(1, 0, 0, 0, 0)
    assert meter.reading((0.3, 0)).backlog == 0.3
    meter.count(1, 1, 0, 0, 0)
    assert meter.reading((0.1, 5)).backlog == 1.0  # five dropped since the last look
    meter.count(1, 2, 0, 0, 0)
    assert meter.reading((0.1, 5)).backlog == 0.1  # none since


def test_heard_through():
    meter = DelayLossMeter()
    assert not meter.heard_through(0)
    meter.count(3, 9, 0, 0, 0)
    assert meter.heard_through(10)
    assert not meter.heard_through(11)


def test_marked_losses_between_runs_are_named_once_each_reading():
    m = LOST_MARK
    meter = DelayLossMeter()
    meter.arrived(0, 3 * m)
    meter.arrived(3 * m + 1, 4 * m + 1)  # nothing lost
    meter.arrived(6 * m + 3, 7 * m)  # 4m+2 to 6m+2 lost: 5m and 6m are marked
    meter.arrived(5 * m, 5 * m)  # late (a reordering): nothing more lost
    meter.count(1, 7 * m, 0, 0, 0)
    assert meter.reading(None).lost == (5 * m, 6 * m)
    far = 7 * m + (LOST_MARKS + 5) * m
    meter.arrived(far, far)  # a long gap: the first LOST_MARKS marks
    meter.count(1, far, 0, 0, 0)
    assert meter.reading(None).lost == tuple(range(8 * m, 8 * m + m * LOST_MARKS, m))
    meter.arrived(far + 1, far + 3 * m)
    meter.count(1, far + 3 * m, 0, 0, 0)
    assert meter.reading(None).lost == ()


def test_receivers_that_lose_the_same_datagrams_name_the_same_ones():
    """The sender tells shared loss by the names: every receiver marks by the sequence number alone."""
    m = LOST_MARK
    seen = []
    one = [(0, m - 10), (m + 5, 10 * m)]
    other = [(0, 10), (20, m - 1), (m + 1, 2 * m - 3), (2 * m + 2, 10 * m)]
    for runs in (one, other):
        meter = DelayLossMeter()
        for first, last in runs:
            meter.arrived(first, last)
        meter.count(1, 10 * m, 0, 0, 0)
        seen.append(set(meter.reading(None).lost))
    assert seen == [{m}, {m, 2 * m}]


def test_loss_events_feed_the_reading():
    meter = DelayLossMeter()
    meter.count(1, 0, 0, 0, 0, now=0.0)
    sequence = 0
    for i in range(1, 10):  # one lost in every 100, 50 ms apart
        sequence += 100
        meter.count(99, sequence, 0, 0, 0, now=i * 0.05)
    assert meter.reading(None).events == pytest.approx(1 / 100)


def test_what_our_own_socket_dropped_is_no_loss_event_and_named_not():
    """
    A reader short of CPU: the socket dropped the datagrams of a gap.  It
    shows as a full backlog, not as a loss event nor as named losses, from
    which the sender would take it for a congested path.  A gap beyond
    what the socket dropped is the network's, as before.
    """
    m = LOST_MARK
    meter = DelayLossMeter()
    meter.overflowed(0)
    meter.count(1, 0, 0, 0, 0, now=0.0)
    meter.arrived(0, 0)
    for i in range(1, 10):  # 3 m datagrams a batch, a gap of m after each: all dropped here
        meter.overflowed(i * m)
        meter.count(2 * m, i * 3 * m, 0, 0, 0, now=i * 0.05)
        meter.arrived((i - 1) * 3 * m + m + 1, i * 3 * m)
    reading = meter.reading((0.5, 9 * m))
    assert reading.events == 0.0
    assert reading.lost == ()
    assert reading.backlog == 1.0
    assert reading.loss > 0.3, "still loss to the receiver, which may be the slow one"
    # Now a gap of m, of which the socket dropped only half: the rest is the network's.
    meter.overflowed(9 * m + m // 2)
    meter.count(2 * m, 30 * m, 0, 0, 0, now=0.6)
    meter.arrived(28 * m + 1, 30 * m)
    for i in range(11, 20):
        meter.count(3 * m - 1, i * 3 * m, 0, 0, 0, now=i * 0.05)
    assert meter.reading((0.0, 9 * m + m // 2)).events > 0


def test_while_our_socket_drops_no_gap_is_named():
    """
    The socket's drop count, read after a batch, holds drops whose gaps show
    only in a later batch: here a gap of the network's took the count, and
    the next gap, the socket's, was named.  Receivers sharing a host's CPU
    drop the same datagrams, and the sender took such names for a shared
    link's loss.  Once an interval passes without drops, gaps are named again.
    """
    m = LOST_MARK
    meter = DelayLossMeter()
    meter.overflowed(0)
    meter.count(1, 0, 0, 0, 0, now=0.0)
    meter.arrived(0, 0)
    meter.overflowed(m)  # drops of the datagrams after the next gap
    meter.count(2 * m, 3 * m, 0, 0, 0, now=0.05)
    meter.arrived(m + 1, 3 * m)  # a gap of m: the network's, which took the count
    meter.count(2 * m, 6 * m, 0, 0, 0, now=0.06)
    meter.arrived(4 * m + 1, 6 * m)  # a gap of m: the socket's
    assert meter.reading((0.5, m)).lost == ()
    meter.count(2 * m, 9 * m, 0, 0, 0, now=0.15)
    meter.arrived(7 * m + 1, 9 * m)
    assert meter.reading((0.0, m)).lost == (), "drops seen late may leave gaps in the next interval"
    meter.count(2 * m, 12 * m, 0, 0, 0, now=0.25)
    meter.arrived(10 * m + 1, 12 * m)
    assert meter.reading((0.0, m)).lost == (10 * m,)
