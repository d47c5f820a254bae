"""Kept parities: by group, the group kept longest ago forgotten first past the bound."""

from __future__ import annotations

from mrsyncd.engine.parities import KeptParities


def test_a_parity_is_kept_once():
    kept = KeptParities(limit=10)
    assert not kept
    assert kept.keep((0, 1), 0, b"p0") == {0: b"p0"}
    assert kept.keep((0, 1), 0, b"p0") is None
    assert kept.keep((0, 1), 3, b"p3") == {0: b"p0", 3: b"p3"}
    assert kept.count == 2 and kept
    assert kept.get((0, 2)) is None


def test_past_the_bound_the_group_kept_longest_ago_goes_first():
    kept = KeptParities(limit=3)
    for group in range(3):
        kept.keep((0, group), 0, b"p")
    kept.keep((0, 0), 1, b"q")  # group 0 is now the newest
    kept.trim()
    assert kept.groups() == [(0, 2), (0, 0)]
    assert kept.count == 3


def test_take_forgets_a_group():
    kept = KeptParities(limit=10)
    kept.keep((1, 5), 0, b"a")
    kept.keep((1, 5), 1, b"b")
    kept.keep((2, 0), 0, b"c")
    assert kept.take((1, 5)) == {0: b"a", 1: b"b"}
    assert kept.take((1, 5)) == {}
    assert kept.count == 1 and kept.groups() == [(2, 0)]
