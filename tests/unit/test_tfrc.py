"""The TCP-friendly rate and the loss event rate it takes: pure, no clock but the times given."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mrsyncd.engine.tfrc import EVENT_SPAN, LossHistory, throughput


def test_without_loss_there_is_no_bound():
    assert throughput(1500, 0.01, 0.0) == math.inf


def test_at_low_loss_it_is_the_simple_tcp_equation():
    # s / (R sqrt(2p/3)): 1460-byte segments, 100 ms, one loss in 10,000 is 14.3 Mbit/s.
    assert throughput(1460, 0.1, 1e-4) == pytest.approx(1460 * 8 / (0.1 * math.sqrt(2e-4 / 3)), rel=0.002)
    assert throughput(1460, 0.1, 1e-4) == pytest.approx(14.3e6, rel=0.01)


def test_at_high_loss_the_timeouts_dominate():
    # RFC 5348's full equation, worked by hand for 1500 bytes, 20 ms, 1%.
    simple = 0.02 * math.sqrt(0.02 / 3)
    timeouts = 4 * 0.02 * 3 * math.sqrt(0.03 / 8) * 0.01 * (1 + 32e-4)
    assert throughput(1500, 0.02, 0.01) == pytest.approx(1500 * 8 / (simple + timeouts))
    assert throughput(1500, 0.02, 0.01) < 0.93 * 1500 * 8 / simple


@given(st.floats(1e-4, 1.0), st.floats(1e-6, 0.5), st.floats(1.01, 10))
def test_more_loss_or_a_longer_round_trip_is_a_lower_rate(rtt, p, factor):
    assert throughput(1500, rtt, min(1.0, p * factor)) <= throughput(1500, rtt, p)
    assert throughput(1500, rtt * factor, p) < throughput(1500, rtt, p)


def test_no_rate_before_the_second_loss_event():
    history = LossHistory()
    history.count(1000, 0, 0.0, 0.01)
    assert history.rate() == 0.0
    history.count(100, 3, 1.0, 0.01)  # the first event: no interval closed yet
    assert history.rate() == 0.0


def test_the_rate_is_one_over_the_mean_interval():
    history = LossHistory()
    now = 0.0
    for _ in range(10):  # a loss every 500 datagrams, 50 ms apart
        history.count(499, 0, now, 0.01)
        now += 0.05
        history.count(1, 1, now, 0.01)
    assert history.rate() == pytest.approx(1 / 500)


def test_losses_within_a_round_trip_are_one_event():
    history = LossHistory()
    now = 0.0
    for _ in range(10):  # bursts of three losses 5 ms apart, every 1000 datagrams
        history.count(998, 0, now, 0.02)
        for _ in range(3):
            now += 0.005
            history.count(1, 1, now, 0.02)
        now += 0.1
    # Bursts 115 ms apart, each 1001 datagrams: one event each, not three.
    assert history.rate() == pytest.approx(1 / 1001)


def test_losses_a_lan_round_trip_apart_are_still_one_burst():
    history = LossHistory()
    for i in range(4):  # the receiver sees no queue: its round trip reads 0
        history.count(10, 1, i * EVENT_SPAN / 4, 0.0)
    history.count(10, 1, 2 * EVENT_SPAN, 0.0)
    assert history.rate() == pytest.approx(1 / 40)  # two events, 40 datagrams apart


def test_the_rate_falls_once_losses_stop():
    history = LossHistory()
    now = 0.0
    for _ in range(9):
        now += 0.05
        history.count(100, 1, now, 0.01)
    lossy = history.rate()
    assert lossy == pytest.approx(1 / 100)
    history.count(10_000, 0, now + 1.0, 0.01)
    assert history.rate() < lossy / 5
