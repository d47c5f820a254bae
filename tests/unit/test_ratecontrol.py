"""The token-bucket pacer, driven by a fake clock."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mrsyncd.control.contract import LOST_MARKS, Feedback
from mrsyncd.engine.ratecontrol import (
    FEEDBACK_BUDGET,
    FEEDBACK_SAMPLE,
    NEWS,
    NEWS_OVER,
    REPORT_BYTES,
    SEGMENT,
    SHARED_TARGET,
    SHARING,
    TARGET_DELAY,
    Echo,
    Pacer,
    RateController,
    node_id,
    queue,
    report_due,
)
from mrsyncd.engine.tfrc import throughput

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


# The rate controller, over scripted scenarios on a fake clock.


def drive(controller: RateController, clock: Clock, seconds: float, reports) -> list[float]:
    """Step the controller; ``reports(t)`` gives the feedback heard at time t."""
    rates = []
    for _ in range(round(seconds / controller.interval)):
        for node, feedback in reports(clock.seconds()).items():
            controller.feedback(node, feedback)
        clock.advance(controller.interval)
        rates.append(controller.update())
    return rates


def quiet(t):
    return {}


def fleet(nodes=("a", "b", "c"), max_rate=100e6):
    clock = Clock()
    controller = RateController(clock, max_rate)
    controller.set_active(set(nodes))
    return clock, controller


def test_rate_climbs_to_the_cap_when_no_one_complains():
    clock, controller = fleet()
    assert controller.rate < 100e6
    rates = drive(controller, clock, 2.0, quiet)
    assert rates == sorted(rates)
    assert rates[-1] == 100e6


def test_rate_settles_where_the_queue_holds_the_target_delay():
    """A 60 Mbit/s bottleneck: the queue grows while the rate is above it."""
    clock, controller = fleet()
    queue = [0.0]

    def bottleneck(t):
        # Seconds of queue gained per interval: what is sent beyond 60 Mbit/s.
        queue[0] = max(0.0, queue[0] + (controller.rate - 60e6) / 60e6 * controller.interval)
        # The bottleneck is shared: every receiver sees its queue.
        return {n: Feedback(0.0, queue[0]) for n in "abc"} if queue[0] > 0.002 else {}

    rates = drive(controller, clock, 30.0, bottleneck)
    settled = rates[-100:]
    mean = sum(settled) / len(settled)
    assert 51e6 < mean < 69e6, mean
    assert 40e6 < min(settled) and max(settled) < 80e6, (min(settled), max(settled))
    assert controller.monitor in (None, "a", "b", "c")


def test_a_queue_that_comes_at_once_is_cut_for_once():
    """
    A stall of the sender, or of the host the link runs on, leaves a queue
    of 15 ms behind a push at the link's rate.  A report tells of it an
    interval late; one cut drains it, and a second one, on the same queue,
    only left the link idle while the rate climbed back.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    queue, idle = [0.015], [0.0]

    def stalled(t):
        heard = queue[0]
        gained = (controller.rate - 100e6) / 100e6 * controller.interval
        idle[0] += max(0.0, -gained - queue[0])
        queue[0] = max(0.0, queue[0] + gained)
        return {n: Feedback(0.0, heard) for n in "abc"} if heard > 0.002 else {}

    rates = drive(controller, clock, 3.0, stalled)
    assert min(rates) >= 0.84 * 100e6, [round(r / 1e6, 1) for r in rates]
    assert idle[0] < 0.015, idle[0]
    assert rates[-1] == 100e6


def reported(controller: RateController, clock: Clock, heard: list[float | None]) -> list[float]:
    """The rates after reports of these queues from every receiver, mid-interval as they come (None: none)."""
    rates = []
    for delay in heard:
        clock.advance(controller.interval / 2)
        if delay is not None:
            for node in "abc":
                controller.feedback(node, Feedback(0.0, delay))
        clock.advance(controller.interval / 2)
        rates.append(controller.update())
    return rates


def test_a_late_report_is_not_cut_for_twice():
    """
    Scenario A's reports of a stall (ms, one an interval; mid-interval, as
    they come), then one late: its receivers short of CPU.  The update
    without news still holds the last report, which it had answered with a
    rise as the queue drained: cut on it again, the rate fell to 76.5
    Mbit/s after the drain, and the link idled while it climbed back.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = reported(controller, clock, [0.0065, 0.008, 0.0241, 0.0316, 0.0161, None, 0.0021] + [None] * 4)
    cut = rates[2]
    assert cut < 0.9 * 100e6, "a queue of 24 ms is cut for"
    assert min(rates[2:]) == cut, [round(r / 1e6, 1) for r in rates]
    assert rates[-1] == 100e6


def test_a_queue_that_drains_after_a_cut_is_not_cut_for_again():
    """
    Scenario T's reports of a stall at full rate (ms).  Below full rate the
    push steers for a shorter queue where most receivers show one, as all
    of them show the one it made itself: a cut on the queue its first cut
    was draining took the rate on down, 84.5, 72, 73, 67.5, 74 Mbit/s.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = reported(controller, clock, [0.0043, 0.0063, 0.0078, 0.0139, 0.0141, 0.0129, 0.0076, 0.0022])
    rates += reported(controller, clock, [None] * 5)
    cut = rates[3]
    assert cut < 0.9 * 100e6, "a queue of 14 ms is cut for"
    assert min(rates[3:]) == cut, [round(r / 1e6, 1) for r in rates]
    assert rates[-1] == 100e6


def test_a_queue_that_stands_after_a_cut_is_cut_for_again():
    """A queue that does not drain once the cut took effect is others': the push yields to it."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = reported(controller, clock, [0.0043, 0.0139, 0.0141, 0.0135, 0.0137, 0.0138, 0.0136])
    assert rates[-1] < 0.8 * rates[1], [round(r / 1e6, 1) for r in rates]


def test_random_loss_without_a_queue_does_not_slow_the_sender():
    clock, controller = fleet()
    rates = drive(controller, clock, 3.0, lambda t: {n: Feedback(0.02, 0.0) for n in "abc"})
    assert rates[-1] == 100e6


def test_loss_that_comes_and_goes_with_a_queue():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    congested = drive(controller, clock, 1.0, lambda t: {n: stamped(clock, 0.1, 0.03, 0.01) for n in "abc"})
    assert congested[-1] < 0.5 * 100e6
    # From TCP's rate at 10% loss events, +10% an interval.
    recovered = drive(controller, clock, 5.0, quiet)
    assert recovered[-1] == 100e6


def test_a_receiver_far_slower_than_the_rest_is_marked_slow_and_ignored():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)

    def one_slow(t):
        return {"c": Feedback(0.9, 0.05)}

    rates = drive(controller, clock, 3.0, one_slow)
    assert controller.slow == {"c"}
    assert rates[-1] == 100e6, "the others are not held back"
    assert controller.monitor is None


def test_slow_receiver_drives_the_rate_once_it_is_the_only_one_left():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 3.0, lambda t: {"c": Feedback(0.9, 0.05)})
    assert controller.slow == {"c"}
    controller.set_active({"c"})  # a and b are done: catch-up passes for c
    # Alone, its loss is its path's, as a TCP flow's would be.
    rates = drive(controller, clock, 2.0, lambda t: {"c": stamped(clock, 0.5, 0.05, 0.05, shared=False)})
    assert controller.slow == set()
    assert controller.monitor == "c"
    assert rates[-1] < 20e6


def test_a_dead_receiver_stops_counting():
    """Reports older than two intervals are forgotten: dead nodes' last complaints fade."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 0.5, lambda t: {n: Feedback(0.0, 0.05) for n in "abc"})
    low = controller.rate
    rates = drive(controller, clock, 2.0, quiet)
    assert rates[-1] > low and rates[-1] == 100e6


def test_loss_at_every_receiver_with_a_queue_is_congestion_not_a_slow_node():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    # Losing 60%, each names as many as a report holds: chance names most
    # of them shared too, so it takes more of them to tell.
    rates = drive(
        controller,
        clock,
        3.0,
        lambda t: {n: stamped(clock, 0.6, 0.04, 0.05, names=LOST_MARKS) for n in "abc"},
    )
    assert controller.slow == set()
    assert rates[-1] < 0.1 * 100e6


def test_local_send_queue_overflow_slows_down():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    controller.blocked()
    clock.advance(controller.interval)
    assert controller.update() < 100e6


def test_a_receiver_behind_its_own_slow_link_does_not_set_the_pace():
    """Its queue grows before it loses anything: that alone must not slow the others."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 3.0, lambda t: {"c": Feedback(0.0, 0.04)})
    assert controller.slow == {"c"}
    assert rates[-1] == 100e6
    assert min(rates) == 100e6, "not even for the second it took to tell"


def test_a_queue_at_most_receivers_is_the_shared_bottleneck():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 1.0, lambda t: {n: Feedback(0.0, 0.04) for n in "ab"})
    assert controller.slow == set()
    assert rates[-1] < 0.5 * 100e6


def test_slow_start_reaches_the_cap_within_a_few_intervals():
    clock, controller = fleet()
    assert controller.rate == 50e6
    rates = drive(controller, clock, 0.3, quiet)
    assert rates == [100e6, 100e6, 100e6]


def test_receivers_short_of_cpu_everywhere_slow_the_sender():
    """Every receive buffer filling (24 readers on two cores): the readers set the pace."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 2.0, lambda t: {n: Feedback(0.0, 0.0, backlog=0.9) for n in "abc"})
    assert controller.slow == set()
    assert controller.monitor in {"a", "b", "c"}
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.3 * 100e6


def test_a_reader_that_stalls_briefly_costs_nothing():
    """A buffer a quarter full (a reader's hiccup) is well within what the buffer is for."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 2.0, lambda t: {n: Feedback(0.0, 0.0, backlog=0.25) for n in "abc"})
    assert min(rates) == 100e6


def test_one_receiver_whose_buffer_overflows_is_slow_not_the_pace():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 3.0, lambda t: {"c": Feedback(0.0, 0.0, backlog=1.0)})
    assert controller.slow == {"c"}
    assert min(rates) == 100e6


def test_a_buffer_that_empties_again_lets_the_rate_climb_back():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 1.0, lambda t: {n: Feedback(0.0, 0.0, backlog=1.0) for n in "abc"})
    low = controller.rate
    assert low < 50e6
    rates = drive(controller, clock, 3.0, lambda t: {n: Feedback(0.0, 0.0, backlog=0.1) for n in "abc"})
    assert rates == sorted(rates) and rates[-1] > 2 * low


def test_a_slow_link_is_told_apart_while_the_shared_link_is_kept_full():
    """
    The others hold the target queue (the shared link full, as the
    controller keeps it); the slow receiver's reports cross its own
    congested link, so they arrive one interval in three.
    """
    clock, controller = fleet(nodes=("a", "b", "c", "d"))
    drive(controller, clock, 2.0, quiet)
    step = [0]

    def reports(t):
        step[0] += 1
        heard = {n: Feedback(0.0, 0.008) for n in "abd"}
        if step[0] % 3 == 1:
            heard["c"] = Feedback(0.05, 0.065)
        return heard

    rates = drive(controller, clock, 3.0, reports)
    assert controller.slow == {"c"}
    assert min(rates) > 0.9 * 100e6, "the slow link never set the pace"
    assert controller.monitor != "c"


def test_a_blip_of_trouble_is_not_a_slow_receiver():
    """Three bad reports, then the silence of a receiver that is fine again."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 0.3, lambda t: {"c": Feedback(0.9, 0.05)})
    drive(controller, clock, 2.0, quiet)
    assert controller.slow == set()


# Feedback suppression: the sender echoes its monitor; the rest report a share.


def test_an_echo_survives_the_wire():
    echo = Echo(node_id("node7"), 0.0123, 0.25)
    back = Echo.unpack(echo.pack())
    assert back is not None
    assert back.monitor == echo.monitor
    assert back.queue == pytest.approx(0.0123, abs=1e-6)
    assert back.share == pytest.approx(0.25, abs=1 / 65535)
    assert len(echo.pack()) == 10


def test_an_echo_of_the_wrong_size_is_none_and_values_are_clamped():
    assert Echo.unpack(b"") is None
    assert Echo.unpack(bytes(11)) is None
    back = Echo.unpack(Echo(0, -1.0, 7.0).pack())
    assert back == Echo(0, 0.0, 1.0)
    assert Echo.unpack(Echo(0, float("inf"), 0.0).pack()).queue == pytest.approx(0xFFFFFFFF / 1e6)
    assert Echo.unpack(Echo(0, float("nan"), float("nan")).pack()) == Echo(0, 0.0, 0.0)


def test_node_ids_differ_and_are_never_zero():
    ids = {node_id(f"node{i}") for i in range(1000)}
    assert len(ids) == 1000 and 0 not in ids
    assert node_id("") != 0


def test_a_report_is_due_from_the_monitor_with_news_or_by_draw():
    echo = Echo(node_id("m"), 0.008, 0.25)
    same = Feedback(0.0, 0.008)
    assert report_due(same, echo, node_id("m"), draw=0.99), "the monitor always reports"
    assert not report_due(same, echo, node_id("x"), draw=0.99)
    assert not report_due(same, echo, None, draw=0.99)
    assert report_due(same, echo, node_id("x"), draw=0.2), "a draw under the share"
    assert not report_due(same, echo, node_id("x"), draw=0.25)
    news = Feedback(0.0, 0.008 + NEWS + 1e-4)
    assert report_due(news, echo, node_id("x"), draw=0.49), "news: a draw under twice the share"
    assert not report_due(news, echo, node_id("x"), draw=0.5)
    assert report_due(news, Echo(node_id("m"), 0.008, 0.5), node_id("x"), draw=0.99), "with few, always"
    assert not report_due(Feedback(0.0, 0.008 + NEWS), echo, node_id("x"), draw=0.3)
    # Without a monitor nothing is news: a queue rising behind one
    # bottleneck is heard from a sample, not from every receiver at once.
    quiet_echo = Echo(0, 0.0, 0.25)
    assert not report_due(Feedback(0.0, 0.030), quiet_echo, node_id("x"), draw=0.25)
    assert not report_due(Feedback(0.0, 0.030), quiet_echo, 0, draw=0.25)
    assert report_due(Feedback(0.0, 0.030), quiet_echo, node_id("x"), draw=0.2)
    # A full receive buffer is a queue too.
    assert report_due(Feedback(0.0, 0.0, backlog=1.0), echo, node_id("x"), draw=0.49)
    assert NEWS_OVER == 2


def echoed(controller: RateController, views: dict[str, Feedback], rng: random.Random) -> dict[str, Feedback]:
    """What receivers with these views report after the controller's last echo."""
    echo = Echo.unpack(controller.echo().pack())
    assert echo is not None
    return {n: f for n, f in views.items() if report_due(f, echo, node_id(n), rng.random())}


def shared_queue(names: list[str], suppressed: bool) -> tuple[float, float, RateController]:
    """
    The shared bottleneck of test_rate_settles_where_the_queue_holds_the_target_delay,
    behind which each receiver's reading differs a little: the mean rate and
    reports an interval over the last 10 s of 30.
    """
    clock, controller = fleet(nodes=names)
    rng = random.Random(4)
    queued = [0.0]
    sent = []

    def bottleneck(t):
        queued[0] = max(0.0, queued[0] + (controller.rate - 60e6) / 60e6 * controller.interval)
        if queued[0] <= 0.002:
            sent.append(0)
            return {}
        views = {n: Feedback(0.0, queued[0] * rng.uniform(0.95, 1.05)) for n in names}
        heard = echoed(controller, views, rng) if suppressed else views
        sent.append(len(heard))
        return heard

    rates = drive(controller, clock, 30.0, bottleneck)
    return sum(rates[-100:]) / 100, sum(sent[-100:]) / 100, controller


def test_a_queue_shared_by_a_hundred_receivers_costs_a_sample_of_reports():
    """With the echo a handful report each interval, and the rate settles as it does when all do."""
    names = [f"n{i}" for i in range(100)]
    every_rate, every_reports, _ = shared_queue(names, suppressed=False)
    rate, reports, controller = shared_queue(names, suppressed=True)
    assert controller.slow == set()
    assert 51e6 < rate < 69e6, rate
    assert rate == pytest.approx(every_rate, rel=0.05)
    assert every_reports > 50
    assert reports < 2 * FEEDBACK_SAMPLE, reports


def test_the_monitor_is_heard_every_interval_while_the_rest_report_by_sample():
    """
    The echo names the monitor, so the receiver whose queue sets the rate
    never goes quiet, though its queue is no news once echoed.
    """
    names = [f"n{i}" for i in range(24)]
    clock, controller = fleet(nodes=names)
    drive(controller, clock, 2.0, quiet)
    rng = random.Random(5)
    heard = []

    def reports(t):
        views = {n: Feedback(0.0, 0.004) for n in names}
        views["n3"] = Feedback(0.0, 0.009)
        got = echoed(controller, views, rng)
        heard.append("n3" in got)
        return got

    drive(controller, clock, 3.0, reports)
    assert controller.share == pytest.approx(FEEDBACK_SAMPLE / 24, rel=0.05)
    assert controller.monitor == "n3" and controller.slow == set()
    # Before n3 is the monitor it is heard by the sample, and then always.
    assert all(heard[heard.index(True) :]) and heard.index(True) < 10, heard


def test_a_slow_link_is_told_apart_among_many_that_report_by_sample():
    """
    23 receivers share a queue below the target and report a sample of the time; one
    behind its own slow link has a queue far above theirs, which is news
    after every echo: it is marked slow and the shared link stays full.
    """
    names = [f"n{i}" for i in range(24)]
    clock, controller = fleet(nodes=names)
    drive(controller, clock, 2.0, quiet)
    rng = random.Random(6)

    def reports(t):
        views = {n: Feedback(0.0, rng.uniform(0.004, 0.006)) for n in names}
        views["n5"] = Feedback(0.05, 0.065)
        return echoed(controller, views, rng)

    rates = drive(controller, clock, 3.0, reports)
    assert controller.slow == {"n5"}
    assert controller.monitor != "n5"
    assert controller.share < 0.5
    assert rates[-1] == 100e6, "the others, below the target, set the pace"


def test_the_share_is_the_sample_over_the_receivers_heard_lately():
    names = [f"n{i}" for i in range(40)]
    clock, controller = fleet(nodes=names)
    assert controller.share == pytest.approx(FEEDBACK_SAMPLE / 40), "the first echo's, before any update"
    drive(controller, clock, 0.1, quiet)
    assert controller.share == pytest.approx(FEEDBACK_SAMPLE / 40), "before any is heard: over all"
    drive(controller, clock, 0.1, lambda t: {n: Feedback(0.0, 0.004) for n in names})
    assert controller.share == pytest.approx(FEEDBACK_SAMPLE / 40)
    drive(controller, clock, 0.5, lambda t: {n: Feedback(0.0, 0.004) for n in names[:2]})
    assert controller.share < 0.25, "the 40 were heard within slow_after"
    drive(controller, clock, 1.0, lambda t: {n: Feedback(0.0, 0.004) for n in names[:2]})
    assert controller.share == 1.0
    drive(controller, clock, 1.5, quiet)
    assert controller.share == pytest.approx(FEEDBACK_SAMPLE / 40), "none heard lately: over all again"


def test_a_slow_link_asks_for_fewer_reports():
    """
    The sample shrinks with the rate, so that reports cost at most
    `FEEDBACK_BUDGET` of it, down to `FEEDBACK_LEAST` an interval.
    """
    names = [f"n{i}" for i in range(64)]
    for rate, sample in (
        (100e6, FEEDBACK_SAMPLE),
        (20e6, 20e6 / 8 * 0.1 * FEEDBACK_BUDGET / REPORT_BYTES),
        (2e6, 2),
    ):
        clock, controller = fleet(nodes=names, max_rate=rate)
        drive(controller, clock, 3.0, quiet)
        assert controller.rate == rate
        assert controller.sample() == pytest.approx(sample)
        assert controller.share == pytest.approx(sample / 64)
    assert 3 < 20e6 / 8 * 0.1 * FEEDBACK_BUDGET / REPORT_BYTES < FEEDBACK_SAMPLE


def test_receivers_a_sample_does_not_hear_are_not_taken_for_short_queues():
    """
    100 receivers behind one bottleneck, its queue far above the target:
    only the sample is heard, every one of them in trouble, and the rest,
    silent, are not a majority with no queue beside which those heard would
    be lagging.
    """
    names = [f"n{i}" for i in range(100)]
    clock, controller = fleet(nodes=names)
    drive(controller, clock, 2.0, quiet)
    rng = random.Random(9)
    drive(controller, clock, 3.0, lambda t: echoed(controller, {n: Feedback(0.0, 0.040) for n in names}, rng))
    assert controller.slow == set()
    assert controller.monitor is not None
    assert controller.rate < 60e6


def test_a_few_of_many_with_a_queue_are_sampled_steadily():
    """
    12 of 100 receivers hold a queue: the share is about the sample over 12,
    not over 100, and does not swing between that and 1.
    """
    names = [f"n{i}" for i in range(100)]
    clock, controller = fleet(nodes=names)
    rng = random.Random(8)
    shares, sent = [], []

    def reports(t):
        views = {n: Feedback(0.0, rng.uniform(0.006, 0.008)) for n in names[:12]}
        heard = echoed(controller, views, rng)
        sent.append(len(heard))
        shares.append(controller.share)
        return heard

    drive(controller, clock, 20.0, reports)
    assert all(0.4 < share < 0.9 for share in shares[-100:]), sorted(shares[-100:])
    assert FEEDBACK_SAMPLE - 2 < sum(sent[-100:]) / 100 < FEEDBACK_SAMPLE + 3


def test_silent_receivers_count_as_no_queue_in_the_median_while_all_report():
    """
    Two of five report a queue near the target, two are silent (no queue),
    one reports a queue of its own link: with nobody asked to keep quiet,
    the silent ones count, and the one is told apart as slow.
    """
    clock, controller = fleet(nodes=("a", "b", "c", "d", "e"))
    drive(controller, clock, 2.0, quiet)
    views = {"a": Feedback(0.0, 0.020), "b": Feedback(0.0, 0.009), "c": Feedback(0.0, 0.009)}
    rates = drive(controller, clock, 3.0, lambda t: views)
    assert controller.share == 1.0
    assert controller.slow == {"a"}
    assert controller.monitor in ("b", "c")
    # The rate is the one b's and c's queue gives, as if a were not there.
    clock, without = fleet(nodes=("b", "c", "d", "e"))
    drive(without, clock, 2.0, quiet)
    assert drive(without, clock, 3.0, lambda t: {n: views[n] for n in "bc"})[-10:] == rates[-10:]


def test_the_queue_of_a_report():
    assert queue(Feedback(0.0, 0.005)) == 0.005
    assert queue(Feedback(0.0, 0.001, backlog=0.3)) == pytest.approx(0.007)
    assert queue(Feedback(0.0, 0.001, backlog=0.6), target_delay=0.01, backlog_target=0.3) == pytest.approx(
        0.02
    )


# Sharing with TCP (issue 20): the TCP-friendly rate once others hold the queue.


#: Tells apart the datagrams that `stamped` reports lost by one receiver alone.
_OWN_LOSSES = itertools.count()


def stamped(
    clock: Clock,
    loss: float,
    delay: float,
    events: float,
    rtt: float = 0.0002,
    shared: bool = True,
    names: int = 1,
) -> Feedback:
    """
    A report as a receiver sends it: its one-way delay and stamp make
    ``rtt`` plus the queue; with loss, it names ``names`` lost datagrams
    that every receiver lost (``shared``) or its own, which no other report
    names (a random one was, now and then, another's too).
    """
    # Two clocks 3 s apart: the receiver's runs ahead, and the offsets cancel.
    offset_us = 3_000_000
    now_us = int(clock.seconds() * 1e6)
    owd_us = round((rtt / 2 + delay) * 1e6) + offset_us
    stamp_us = (now_us + offset_us - round(rtt / 2 * 1e6)) & 0xFFFFFFFF
    lost: tuple[int, ...] = ()
    if events:
        interval = round(clock.seconds() * 10)
        lost = tuple(
            interval * 64 + k if shared else interval * 64 + k + (next(_OWN_LOSSES) % 4095 + 1) * 2**20
            for k in range(names)
        )
    return Feedback(loss, delay, 0.0, events, owd_us, stamp_us, lost)


def test_the_round_trip_is_the_least_seen_plus_the_queue_now():
    clock, controller = fleet()
    controller.feedback("a", stamped(clock, 0.0, 0.004, 0.0, rtt=0.0005))
    controller.feedback("a", stamped(clock, 0.0, 0.000, 0.0, rtt=0.0005))
    report = Feedback(0.0, 0.020)
    assert controller.rtt("a", report) == pytest.approx(0.0205, abs=2e-6)


def test_a_latecomer_that_fills_the_queue_to_loss_gets_a_tcp_share_not_the_link():
    """
    The push has the link; a loss-based TCP flow arrives and holds a 20 ms
    queue, overflowing it now and then.  Yielding to delay would leave it
    everything (the rate at its floor); the push competes at the rate TCP
    would get on that round trip and loss event rate.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    assert controller.rate == 100e6 and not controller.competing
    rates = drive(controller, clock, 5.0, lambda t: {n: stamped(clock, 0.001, 0.020, 2e-4) for n in "abc"})
    assert controller.competing
    friendly = throughput(SEGMENT, 0.0202, 2e-4)
    assert rates[-1] == pytest.approx(friendly, rel=0.01)
    assert rates[-1] > 10 * controller.min_rate


def test_a_queue_held_without_loss_is_competed_for():
    """
    A queue that stays though the push has yielded (a TCP flow that paces
    itself, as BBR does, and never fills it to loss): yielding on would leave
    it the whole link, so the push stops yielding.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 5.0, lambda t: {n: stamped(clock, 0.0, 0.020, 0.0) for n in "abc"})
    assert controller.competing
    assert 0.4 * 100e6 < rates[-1] <= 0.5 * 100e6
    assert rates[-20:] == [rates[-1]] * 20


def test_a_queue_with_receivers_short_of_cpu_is_not_competed_for():
    """Their kernels stamp datagrams late: the delay is the receivers', and yielding to it is right."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 5.0, lambda t: {n: Feedback(0.0, 0.020, 0.3) for n in "abc"})
    assert not controller.competing
    assert rates[-1] == controller.min_rate


def test_loss_each_receiver_sees_alone_sets_no_tcp_share():
    """Random loss, each receiver's own, with a queue the push holds: the delay rules, not the loss."""
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)

    def own(t: float) -> dict[str, Feedback]:
        return {n: stamped(clock, 0.02, 0.008, 0.02, shared=False) for n in "abc"}

    rates = drive(controller, clock, 5.0, own)
    assert controller.friendly == math.inf and controller.friendly_cause == ""
    assert not any(controller.shared(n) for n in "abc")
    # The rate is the one the same queue gives without loss.
    clock, lossless = fleet()
    drive(lossless, clock, 2.0, quiet)
    assert drive(lossless, clock, 5.0, lambda t: {n: stamped(clock, 0.0, 0.008, 0.0) for n in "abc"}) == rates
    assert rates[-1] > 0.4 * 100e6


def test_a_shallow_queue_that_overflows_before_the_delay_shows_gets_a_tcp_share():
    """
    A 3 ms queue never reaches the target, not even `SHARED_TARGET`: the
    shared loss alone holds the push to TCP's rate.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 5.0, lambda t: {n: stamped(clock, 0.05, 0.003, 3e-3) for n in "abc"})
    assert not controller.competing
    assert rates[-1] == pytest.approx(throughput(SEGMENT, 0.0032, 3e-3), rel=0.01)
    assert rates[-1] < 0.9 * 100e6
    assert 0.003 < SHARED_TARGET
    # The log says which receiver set it, and on how much shared loss.
    assert re.fullmatch(
        r"[abc]: (\d+) of \1 named losses shared \(\d+\.\d by chance\), events 0.003",
        controller.friendly_cause,
    )


def test_once_the_others_leave_the_queue_drains_and_the_push_takes_the_link_again():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 5.0, lambda t: {n: stamped(clock, 0.001, 0.020, 2e-4) for n in "abc"})
    assert controller.competing
    rates = drive(controller, clock, 3.0, quiet)
    assert not controller.competing
    assert rates[-1] == 100e6


def test_a_slow_receiver_with_losses_of_its_own_does_not_set_a_tcp_share():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    rates = drive(controller, clock, 3.0, lambda t: {"c": stamped(clock, 0.9, 0.050, 0.05)})
    assert controller.slow == {"c"} and not controller.competing
    assert rates[-1] == 100e6


def test_a_tcp_flow_that_was_there_first_is_competed_with_not_yielded_to():
    """Its queue is there from the first report: the push never saw the link empty, and competes at once."""
    clock, controller = fleet()
    rates = drive(controller, clock, 5.0, lambda t: {n: stamped(clock, 0.001, 0.020, 2e-4) for n in "abc"})
    assert controller.competing and controller.capacity is None
    assert rates[-1] == pytest.approx(throughput(SEGMENT, 0.0202, 2e-4), rel=0.01)


def test_only_the_shared_share_of_loss_events_counts():
    """
    Three fifths of what each receiver lost, the others lost too (a shared
    link), two fifths alone (random loss).  (A coin toss for each made the
    share hover about `SHARED_SHARE`, above or below it by the seed.)
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)

    def mostly_shared(t):
        own = round(t / controller.interval) % 5 in (1, 3)
        return {n: stamped(clock, 0.02, 0.005, 2e-3, shared=not own) for n in "abc"}

    drive(controller, clock, 5.0, mostly_shared)
    share = controller.shared("a")
    assert 0.3 < share < 0.8
    report = stamped(clock, 0.02, 0.005, 2e-3)
    each = [throughput(SEGMENT, controller.rtt(n, report), 2e-3 * controller.shared(n)) for n in "abc"]
    assert controller.friendly == pytest.approx(min(each), rel=0.05)


def test_a_slow_receiver_left_alone_in_catch_up_keeps_its_loss_to_itself():
    clock, controller = fleet()
    drive(controller, clock, 1.0, lambda t: {n: stamped(clock, 0.0, 0.001, 0.0) for n in "abc"})
    controller.set_active({"c"})
    drive(controller, clock, 3.0, lambda t: {"c": stamped(clock, 0.05, 0.005, 0.01, shared=False)})
    assert controller.shared("c") == 0.0
    assert controller.friendly == math.inf


def test_sharing_the_link_with_a_flow_it_can_see_it_steers_for_a_shorter_queue():
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    alone = drive(controller, clock, 2.0, lambda t: {n: Feedback(0.0, 0.0055) for n in "abc"})
    assert alone[-1] == 100e6, "at the cap, a queue below the target is room to spare"
    # A TCP flow arrives: the queue grows, and overflows now and then.
    drive(controller, clock, 1.0, lambda t: {n: stamped(clock, 0.001, 0.02, 1e-5) for n in "abc"})
    assert controller.rate < SHARING * 100e6 and controller.friendly < math.inf
    drive(controller, clock, 1.0, lambda t: {n: stamped(clock, 0.001, 0.0055, 1e-5) for n in "abc"})
    assert controller.steering == SHARED_TARGET


def test_late_stamps_at_one_receiver_or_another_are_no_flow_to_make_room_for():
    """Receivers short of CPU stamp datagrams late, one or other in every interval: the full target stays."""
    clock, controller = fleet(nodes=("a", "b", "c", "d", "e"))
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 0.3, lambda t: {n: Feedback(0.0, 0.02) for n in "abcde"})
    assert controller.rate < SHARING * 100e6
    steering = []
    for step in range(30):
        drive(controller, clock, 0.1, lambda t, late="abcde"[step % 5]: {late: Feedback(0.0, 0.006)})
        steering.append(controller.steering)
    assert steering == [TARGET_DELAY] * 30


def test_a_queue_at_every_receiver_without_loss_is_a_flow_to_make_room_for():
    """
    A BBR flow that was there first holds a window of about twice its rate
    times the round trip it measured without the push's queue: it never
    fills the queue to loss, and a standing queue of the full target held
    it to 20-30 Mbit/s of 100 in the fairness matrix.
    """
    clock, controller = fleet()
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 0.5, lambda t: {n: Feedback(0.0, 0.02) for n in "abc"})
    assert controller.rate < SHARING * 100e6 and controller.friendly == math.inf
    steering = []
    for _ in range(10):
        drive(controller, clock, 0.1, lambda t: {n: Feedback(0.0, 0.006) for n in "abc"})
        steering.append(controller.steering)
    assert steering == [SHARED_TARGET] * 10


def random_loss(nodes: str, reporting: float, shared: float) -> Callable[[float], dict[str, Feedback]]:
    """
    Reports of receivers that each lose 2% of the datagrams at random, and
    ``shared`` of them all together (a shared link overflowing), naming the
    marked ones they lost; all report in an interval with chance
    ``reporting`` (when a queue shows at them all), else none do.
    """
    draw = random.Random(20261207)
    marks = itertools.count(0, 32)

    def reports(t: float) -> dict[str, Feedback]:
        sent = [next(marks) for _ in range(26)]  # marked, of 830 an interval at 100 Mbit/s
        overflowed = {m for m in sent if draw.random() < shared}
        if draw.random() >= reporting:
            return {}
        return {
            n: Feedback(
                0.02 + shared,
                0.005,
                0.0,
                0.02,
                lost=tuple(m for m in sent if m in overflowed or draw.random() < 0.02)[:LOST_MARKS],
            )
            for n in nodes
        }

    return reports


def test_random_loss_at_many_receivers_is_not_taken_for_a_shared_link():
    """
    Scenario B: 8 receivers each lose 2% of the datagrams at random, and
    report in one interval of four, all together (when a queue shows at
    them all).  One or other of the 7 others loses 13% of what one loses
    too, so a sample with 4 of 6 shared comes by chance now and then: a
    minute of it must never cap the rate at TCP's.
    """
    clock, controller = fleet(tuple("abcdefgh"))
    drive(controller, clock, 2.0, quiet)
    lossy = random_loss("abcdefgh", reporting=0.25, shared=0.0)
    capped = []
    for _ in range(600):
        drive(controller, clock, 0.1, lossy)
        capped.append(controller.friendly_cause)
    assert [cause for cause in capped if cause] == []
    assert controller.rate == 100e6


def test_loss_a_shared_link_adds_to_random_loss_is_heard():
    """
    As above, and a shared link overflows too: 3% of the datagrams, lost at
    every receiver.  The share beyond chance caps the rate within seconds.
    """
    clock, controller = fleet(tuple("abcdefgh"))
    drive(controller, clock, 2.0, quiet)
    drive(controller, clock, 3.0, random_loss("abcdefgh", reporting=1.0, shared=0.03))
    named, shared, chance = controller.sharing("a")
    assert shared > 0.5 * named > chance
    assert controller.friendly < math.inf
    assert re.fullmatch(
        r"[a-h]: \d+ of \d+ named losses shared \(\d+\.\d by chance\), events 0.02", controller.friendly_cause
    )
