"""RangeSet against Python sets, and the varint range-map encoding."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mrsyncd.wire import erasure
from mrsyncd.wire.blockset import RangeSet, decode_map, encode_map, repair_plan, union_maps

small_sets = st.sets(st.integers(min_value=0, max_value=300), max_size=120)
range_lists = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1000), st.integers(min_value=-3, max_value=60)).map(
        lambda t: (t[0], t[0] + t[1])
    ),
    max_size=30,
)


def from_set(s):
    return RangeSet((x, x + 1) for x in s)


def model(ranges):
    return {x for start, end in ranges for x in range(start, end)}


def assert_normal(rs: RangeSet) -> None:
    ranges = rs.ranges
    for start, end in ranges:
        assert 0 <= start < end
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert end < start, "ranges must be disjoint and not adjacent"


@given(st.binary(max_size=200).map(lambda b: bytes(x % 3 for x in b)), st.integers(min_value=0, max_value=2))
def test_where_holds_the_positions_of_a_value(values, value):
    rs = RangeSet.where(values, value)
    assert_normal(rs)
    assert set(rs) == {position for position, held in enumerate(values) if held == value}


@given(range_lists)
def test_construction_normalises(ranges):
    rs = RangeSet(ranges)
    assert_normal(rs)
    assert set(rs) == model(ranges)
    assert RangeSet(rs.ranges) == rs
    assert hash(RangeSet(reversed(ranges))) == hash(rs)


@given(small_sets)
def test_same_as_set(s):
    rs = from_set(s)
    assert_normal(rs)
    assert len(rs) == len(s)
    assert list(rs) == sorted(s)
    assert bool(rs) == bool(s)
    for x in range(-2, 305):
        assert (x in rs) == (x in s)
    assert "1" not in rs and 1.5 not in rs and None not in rs


@given(small_sets, small_sets)
def test_operators_match_set(a, b):
    ra, rb = from_set(a), from_set(b)
    for got, want in ((ra | rb, a | b), (ra - rb, a - b), (ra & rb, a & b), (rb - ra, b - a)):
        assert_normal(got)
        assert set(got) == want
        assert len(got) == len(want)
        assert got == from_set(want)
    # The operands are untouched.
    assert set(ra) == a and set(rb) == b


@given(range_lists, range_lists)
def test_operators_on_long_ranges(a, b):
    ra, rb = RangeSet(a), RangeSet(b)
    ma, mb = model(a), model(b)
    assert set(ra | rb) == ma | mb
    assert set(ra - rb) == ma - mb
    assert set(ra & rb) == ma & mb


@given(small_sets, st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=7000))
def test_map(s, scale, limit):
    got = from_set(s).map(scale, limit)
    assert_normal(got)
    assert set(got) == {b for n in s for b in range(n * scale, min((n + 1) * scale, limit))}


@given(range_lists, st.integers(min_value=0, max_value=1100))
def test_below_is_the_intersection_with_an_interval_from_zero(ranges, limit):
    rs = RangeSet(ranges)
    got = rs.below(limit)
    assert_normal(got)
    assert got == rs & RangeSet.interval(0, limit)


def test_interval_and_errors():
    assert list(RangeSet.interval(3, 6)) == [3, 4, 5]
    assert not RangeSet.interval(5, 5)
    assert not RangeSet([(5, 2)])
    with pytest.raises(ValueError):
        RangeSet([(-1, 3)])
    assert RangeSet([(0, 2), (2, 4)]).ranges == [(0, 4)]
    assert RangeSet() != set()


# The encoding.

big_rangesets = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2**40), st.integers(min_value=1, max_value=2**20)).map(
        lambda t: (t[0], t[0] + t[1])
    ),
    max_size=20,
).map(RangeSet)
maps = st.dictionaries(st.integers(min_value=0, max_value=2**32 - 1), big_rangesets, max_size=12)
small_maps = st.dictionaries(
    st.integers(min_value=0, max_value=50), st.builds(from_set, small_sets), max_size=8
)


def non_empty(m):
    return {k: v for k, v in m.items() if v}


def flat(m):
    """A map as its (file, range) pairs in file and block order."""
    return [(k, r) for k in sorted(m) for r in m[k].ranges]


@given(st.one_of(maps, small_maps))
def test_round_trip(m):
    data, complete = encode_map(m)
    assert complete
    assert decode_map(data) == non_empty(m)


def test_empty_map():
    assert encode_map({}) == (b"", True)
    assert encode_map({3: RangeSet()}) == (b"", True)
    assert decode_map(b"") == {}


def test_encoding_is_compact():
    # A run of loss costs a few bytes, whatever the size of the file.
    data, complete = encode_map({5: RangeSet([(10**9, 10**9 + 3)])})
    assert complete and len(data) <= 10
    data, complete = encode_map({0: RangeSet((b, b + 1) for b in range(0, 20000, 2))})
    assert complete and len(data) == 3 + 2 * 10000


@settings(max_examples=300)
@given(st.one_of(maps, small_maps), st.integers(min_value=0, max_value=400))
def test_truncation_is_a_bounded_prefix(m, limit):
    data, complete = encode_map(m, limit)
    assert len(data) <= limit
    decoded = decode_map(data)
    for k, ranges in decoded.items():
        assert ranges and not (ranges - m[k]), "decoded map must be a subset of the original"
    got, want = flat(decoded), flat(m)
    assert got == want[: len(got)], "a truncated map is a prefix, in whole ranges"
    if complete:
        assert decoded == non_empty(m)
    else:
        assert len(got) < len(want)


@given(st.one_of(maps, small_maps))
def test_truncation_keeps_what_fits(m):
    """With room for everything, nothing is dropped; with a little less, something is."""
    full, complete = encode_map(m)
    assert complete
    data, complete = encode_map(m, len(full) + 20)
    assert complete and data == full
    if full:
        data, complete = encode_map(m, len(full) - 1)
        assert not complete and len(data) < len(full)


@settings(max_examples=1000)
@given(st.binary(max_size=300))
def test_decode_garbage_raises_only_value_error(data):
    try:
        result = decode_map(data)
    except ValueError:
        return
    assert isinstance(result, dict)
    for k, v in result.items():
        assert isinstance(k, int) and k >= 0
        assert isinstance(v, RangeSet) and v
        assert_normal(v)


@given(st.one_of(maps, small_maps), st.data())
def test_decode_mutated_encoding(m, data):
    """Truncated or corrupted reports fail cleanly or decode to something well formed."""
    encoded, _ = encode_map(m)
    assume(encoded)
    cut = data.draw(st.integers(0, len(encoded)))
    position = data.draw(st.integers(0, len(encoded) - 1))
    corrupted = bytearray(encoded)
    corrupted[position] ^= data.draw(st.integers(1, 255))
    for candidate in (encoded[:cut], bytes(corrupted), encoded + data.draw(st.binary(max_size=8))):
        try:
            result = decode_map(candidate)
        except ValueError:
            continue
        assert all(isinstance(v, RangeSet) and v for v in result.values())
        for ranges in result.values():
            assert_normal(ranges)


def test_a_report_of_adjacent_ranges_decodes_to_one():
    """A gap of 0 between two ranges is legal on the wire; the set it decodes to is normal."""
    # File 0, two ranges: [0, 1) then, after a gap of 0, [1, 3).
    decoded = decode_map(b"\x00\x02\x00\x01\x00\x02")
    assert decoded == {0: RangeSet.interval(0, 3)}
    assert decoded[0].ranges == [(0, 3)]


def test_decode_rejects_malformed():
    for bad in (
        b"\x80",  # truncated varint
        b"\x00",  # no range count
        b"\x00\x00",  # empty range list
        b"\x00\x01\x00\x00",  # empty range
        b"\x00\x01\x00",  # truncated range
        b"\x00\x01\x00\x01\x00\x01\x00\x01",  # file index repeated
        b"\xff" * 11,  # varint too long
    ):
        with pytest.raises(ValueError):
            decode_map(bad)


@given(st.lists(st.one_of(maps, small_maps), max_size=6))
def test_union_maps_is_set_union(ms):
    got = union_maps(ms)
    keys = {k for m in ms for k, v in m.items() if v}
    assert set(got) == keys
    for k in keys:
        want = RangeSet()
        for m in ms:
            want = want | m.get(k, RangeSet())
        assert got[k] == want
    assert all(v for v in got.values())


@given(st.lists(small_maps, max_size=5))
def test_union_maps_against_python_sets(ms):
    got = union_maps(ms)
    want = {}
    for m in ms:
        for k, v in m.items():
            want.setdefault(k, set()).update(v)
    assert {k: set(v) for k, v in got.items()} == {k: v for k, v in want.items() if v}


@st.composite
def reports(draw):
    """Missing reports of several receivers over a few files."""
    files = draw(st.integers(1, 3))
    return draw(
        st.lists(
            st.dictionaries(st.integers(0, files - 1), range_lists.map(RangeSet), max_size=files),
            min_size=1,
            max_size=6,
        )
    )


@given(reports(), st.integers(2, 16))
def test_repair_plan_repairs_every_receiver(maps, group):
    """
    Every receiver gets each lost block directly, or misses no more blocks
    of a group than parities of that group are sent (any m rebuild any m).
    """
    blocks, parities = repair_plan(maps, group)
    for report in maps:
        for file_index, lost in report.items():
            after = lost - blocks.get(file_index, RangeSet())
            by_group: dict[int, list[int]] = {}
            for b in after:
                by_group.setdefault(b // group, []).append(b)
            for g, left in by_group.items():
                sent = parities.get(file_index, RangeSet()) & RangeSet.interval(g * group, (g + 1) * group)
                assert len(left) <= len(sent), (g, left, sent)


@given(reports(), st.integers(2, 16))
def test_repair_plan_never_sends_more_than_the_union(maps, group):
    blocks, parities = repair_plan(maps, group)
    union = union_maps(maps)
    for file_index, sent in blocks.items():
        assert sent - union.get(file_index, RangeSet()) == RangeSet()
    sent = sum(len(r) for r in blocks.values()) + sum(len(r) for r in parities.values())
    assert sent <= sum(len(r) for r in union.values())


def test_parity_repairs_different_single_losses_with_one_datagram():
    a = {0: RangeSet([(3, 4)])}
    b = {0: RangeSet([(7, 8)])}
    c = {0: RangeSet([(20, 22)])}
    blocks, parities = repair_plan([a, b, c], 16)
    assert parities == {0: RangeSet([(0, 1)])}
    assert blocks == {0: RangeSet([(20, 22)])}


def test_a_group_costs_the_most_one_receiver_lost_of_it():
    """A lost {3}, B {7}, C {9, 10}: two parities repair all three (the union is four blocks)."""
    a = {0: RangeSet([(3, 4)])}
    b = {0: RangeSet([(7, 8)])}
    c = {0: RangeSet([(9, 11)])}
    blocks, parities = repair_plan([a, b, c], 16)
    assert parities == {0: RangeSet([(0, 2)])}
    assert blocks == {}


def test_parities_are_numbered_within_their_group():
    reports = [{0: RangeSet([(33, 34), (40, 41)])}, {0: RangeSet([(35, 36)])}]
    blocks, parities = repair_plan(reports, 16)
    assert parities == {0: RangeSet([(32, 34)])}  # group 2: parities 0 and 1
    assert blocks == {}


def test_a_group_gets_no_more_parities_than_it_has():
    """
    A receiver that lost more of a group than it has parities
    (`erasure.MAX_PARITIES`) gets the union instead; one that lost
    exactly that many gets them all.
    """
    group, most = erasure.MAX_GROUP, erasure.MAX_PARITIES
    other = {0: RangeSet([(1, 2)])}
    scattered = {0: RangeSet([(b, b + 1) for b in range(2, 2 * most + 4, 2)])}  # most + 1 blocks
    blocks, parities = repair_plan([scattered, other], group)
    assert parities == {}
    assert blocks == union_maps([scattered, other])
    fewer = {0: RangeSet([(b, b + 1) for b in range(2, 2 * most + 2, 2)])}  # most blocks
    blocks, parities = repair_plan([fewer, other], group)
    assert parities == {0: RangeSet([(0, most)])}
    assert blocks == {}
