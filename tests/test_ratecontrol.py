"""The token-bucket pacer, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mrsyncd.ratecontrol import Pacer

MB = 8e6  # one megabyte per second, in bits per second


def approx(value):
    # The clock does not start at zero, so differences of its readings carry
    # float rounding: a thousandth of a byte is plenty of tolerance.
    return pytest.approx(value, rel=1e-9, abs=1e-3)


def seconds(value):
    return pytest.approx(value, rel=1e-9, abs=1e-9)


def make(rate_bps=MB, burst_seconds=0.01):
    clock = Clock()
    clock.advance(1000.0)  # not at zero, to catch absolute-time mistakes
    return clock, Pacer(clock, rate_bps, burst_seconds)


def test_starts_empty_and_fills_at_the_rate():
    clock, p = make()
    assert p.rate_bps == MB
    assert p.burst == 10_000  # 10 ms at 1 MB/s
    assert p.allowance() == 0
    clock.advance(0.001)
    assert p.allowance() == approx(1000)
    clock.advance(0.004)
    assert p.allowance() == approx(5000)
    # Asking does not change the answer.
    assert p.allowance() == approx(5000)


def test_capped_by_burst():
    clock, p = make()
    clock.advance(10.0)
    assert p.allowance() == approx(10_000)
    clock.advance(3600.0)
    assert p.allowance() == approx(10_000)


def test_burst_is_never_below_one_jumbo_datagram():
    clock, p = make(rate_bps=8000)  # 1 kB/s: 10 bytes in 10 ms
    assert p.burst == 9000
    clock.advance(100.0)
    assert p.allowance() == approx(9000)
    _, q = make(rate_bps=8e9, burst_seconds=0.002)
    assert q.burst == approx(2e6)


def test_spend_reduces_and_may_go_into_debt():
    clock, p = make()
    clock.advance(1.0)
    assert p.allowance() == approx(10_000)
    p.spend(4000)
    assert p.allowance() == approx(6000)
    p.spend(16_000)
    assert p.allowance() == approx(-10_000)
    clock.advance(0.012)
    assert p.allowance() == approx(2000)


def test_spend_counts_against_what_was_earned_until_now():
    """Spending without asking first must not be forgiven by the next refill."""
    clock, p = make()
    clock.advance(1.0)  # the bucket is full: 10 000 bytes
    p.spend(4000)
    assert p.allowance() == approx(6000)
    clock.advance(1.0)
    p.spend(10_000)
    p.spend(10_000)
    assert p.allowance() == approx(-10_000)


def test_delay():
    clock, p = make()
    assert p.delay(1000) == seconds(0.001)
    clock.advance(0.002)
    assert p.delay(1000) == 0.0  # 2000 bytes already there
    assert p.delay(2000) == seconds(0.0)
    assert p.delay(5000) == seconds(0.003)
    p.spend(12_000)  # 10 000 bytes in debt
    assert p.delay(1000) == seconds(0.011)
    clock.advance(p.delay(1000))
    assert p.allowance() == approx(1000)


def test_rate_change_applies_from_now():
    clock, p = make()
    clock.advance(0.002)  # 2000 bytes earned at the old rate
    p.rate_bps = 4 * MB
    assert p.rate_bps == 4 * MB
    assert p.burst == approx(40_000)
    assert p.allowance() == approx(2000)
    clock.advance(0.001)
    assert p.allowance() == approx(6000)  # 4000 bytes a millisecond now
    assert p.delay(10_000) == seconds(0.001)
    # Slowing down caps what was saved at the new, smaller burst.
    clock.advance(1.0)
    p.rate_bps = MB / 2
    assert p.allowance() == approx(9000)
    clock.advance(0.002)
    assert p.allowance() == approx(9000)


def test_refuses_non_positive_rates():
    clock = Clock()
    for bad in (0, -1.0):
        with pytest.raises(ValueError):
            Pacer(clock, bad)
    p = Pacer(clock, MB)
    with pytest.raises(ValueError):
        p.rate_bps = 0
    assert p.rate_bps == MB


@given(
    st.floats(min_value=1e5, max_value=1e10),
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.05), st.integers(min_value=1, max_value=9000)),
        max_size=200,
    ),
)
def test_a_sender_that_waits_never_exceeds_rate_plus_burst(rate_bps, steps):
    """What an obedient sender puts on the wire in any window is at most burst + rate * time."""
    clock, p = make(rate_bps)
    start = clock.seconds()
    sent = 0.0
    for wait, size in steps:
        clock.advance(wait)
        if p.allowance() >= size:
            p.spend(size)
            sent += size
        else:
            d = p.delay(size)
            assert d > 0
            clock.advance(d)
            assert p.allowance() >= size - 1e-3
            p.spend(size)
            sent += size
        elapsed = clock.seconds() - start
        assert sent <= p.burst + elapsed * rate_bps / 8 + 1e-3


@given(st.floats(min_value=1e5, max_value=1e10), st.floats(min_value=0, max_value=10))
def test_allowance_formula(rate_bps, elapsed):
    clock, p = make(rate_bps)
    clock.advance(elapsed)
    assert p.allowance() == approx(min(p.burst, elapsed * rate_bps / 8))
