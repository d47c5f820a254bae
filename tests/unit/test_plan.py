"""The sender's plan (`sender.plan_runs`): runs of blocks with each group's parities after it."""

from __future__ import annotations

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from mrsyncd.engine.sender import plan_runs
from mrsyncd.wire import datagram
from mrsyncd.wire.blockset import RangeSet

DATA, PARITY = datagram.KIND_DATA, datagram.KIND_PARITY


def one_by_one(blocks, parities, group):
    """The reference: every block and parity a datagram of its own, merged by the block each follows."""
    for f in sorted(set(blocks) | set(parities)):
        data = ((b, DATA, b) for b in blocks.get(f, ()))
        parity = (((p // group + 1) * group - 1, PARITY, p) for p in parities.get(f, ()))
        for _, kind, index in heapq.merge(parity, data):
            yield f, kind, index


range_sets = st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 400)), max_size=8).map(
    lambda spans: RangeSet((start, start + length) for start, length in spans)
)


@st.composite
def plans(draw):
    group = draw(st.sampled_from([2, 3, 32, 128, 224]))
    files = draw(st.lists(st.integers(0, 5), unique=True, min_size=1, max_size=4))
    blocks = {f: draw(range_sets) for f in files if draw(st.booleans())}
    parities = {
        f: RangeSet(
            (g * group, g * group + draw(st.integers(1, min(group, 32))))
            for g in draw(st.lists(st.integers(0, 30), unique=True, max_size=5))
        )
        for f in files
        if draw(st.booleans())
    }
    return blocks, parities, group


@settings(max_examples=300)
@given(plans())
def test_runs_are_the_datagrams_in_the_order_of_one_at_a_time(plan):
    """
    Each run's datagrams, in order, are what the plan of one datagram at a
    time sends, in its order: each block and parity once, a group's
    parities after its last block asked for, wherever a range starts.
    """
    blocks, parities, group = plan
    runs = list(plan_runs(blocks, parities, group))
    assert all(first < end for _, _, first, end in runs)
    assert all(end == first + 1 for _, kind, first, end in runs if kind == PARITY)
    sent = [(f, kind, index) for f, kind, first, end in runs for index in range(first, end)]
    assert sent == list(one_by_one(blocks, parities, group))


def test_a_file_without_parities_goes_in_its_ranges_whole():
    """No parities to place: one run a range, however many groups it spans."""
    runs = list(plan_runs({4: RangeSet([(70, 1000), (1200, 1300)])}, {}, 32))
    assert runs == [(4, DATA, 70, 1000), (4, DATA, 1200, 1300)]


def test_runs_are_cut_at_the_ends_of_groups_with_parities():
    """A range from inside a group: cut at the group's end, its parities after that part."""
    runs = list(plan_runs({0: RangeSet([(70, 300)])}, {0: RangeSet([(0, 2)])}, 224))
    assert runs == [(0, DATA, 70, 224), (0, PARITY, 0, 1), (0, PARITY, 1, 2), (0, DATA, 224, 300)]
