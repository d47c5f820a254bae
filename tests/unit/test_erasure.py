"""
The GF(256) erasure code against an independent field and a brute-force
solver, and its C sums against their Python twin.  run-tests.sh runs this
file a second time with MRSYNCD_PURE_PYTHON=1, so every test of encode and
decode holds on both paths.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrsyncd.wire import erasure
from mrsyncd.wire.erasure import (
    MAX_GROUP,
    MAX_PARITIES,
    MUL,
    _inv,
    _mul,
    coefficient,
    decode,
    encode,
    python_combine,
)

built = pytest.mark.skipif(erasure._erasure is None, reason="the C module mrsyncd._erasure is not built")


def slow_mul(a: int, b: int) -> int:
    """Carry-less multiply reduced by x^8 + x^4 + x^3 + x^2 + 1, bit by bit: independent of the tables."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return product


SLOW_INV = {a: next(b for b in range(1, 256) if slow_mul(a, b) == 1) for a in range(1, 256)}


def pad(block: bytes, size: int) -> bytes:
    return block.ljust(size, b"\0")


def xor(blocks, size: int) -> bytes:
    out = bytearray(size)
    for block in blocks:
        for k, byte in enumerate(block):
            out[k] ^= byte
    return bytes(out)


def determinant(matrix: list[list[int]]) -> int:
    """Gaussian elimination over GF(256) with the slow field; 0 when singular."""
    a = [row[:] for row in matrix]
    n = len(a)
    det = 1
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r][col]), None)
        if pivot is None:
            return 0
        a[col], a[pivot] = a[pivot], a[col]  # a swap only flips the sign, and -1 == 1 here
        det = slow_mul(det, a[col][col])
        scale = SLOW_INV[a[col][col]]
        for r in range(col + 1, n):
            factor = slow_mul(a[r][col], scale)
            for c in range(col, n):
                a[r][c] ^= slow_mul(factor, a[col][c])
    return det


# A group: 1..40 blocks of `size` bytes but the last, which may be shorter (even empty).
@st.composite
def groups(draw, max_group: int = 40):
    size = draw(st.integers(min_value=1, max_value=48))
    count = draw(st.integers(min_value=1, max_value=max_group))
    blocks = [draw(st.binary(min_size=size, max_size=size)) for _ in range(count - 1)]
    blocks.append(draw(st.binary(min_size=0, max_size=size)))
    return size, blocks


# Field.


def test_mul_matches_bitwise_multiply():
    for a in range(256):
        for b in range(256):
            assert _mul(a, b) == slow_mul(a, b), (a, b)


def test_every_nonzero_element_has_its_inverse():
    for a in range(1, 256):
        assert _mul(a, _inv(a)) == 1
        assert _inv(a) == SLOW_INV[a]
    with pytest.raises(ZeroDivisionError):
        _inv(0)


def test_mul_tables_agree_with_mul():
    assert len(MUL) == 256
    for c in range(256):
        assert MUL[c] == bytes(_mul(c, x) for x in range(256)), c
    assert bytes(range(256)).translate(MUL[1]) == bytes(range(256))


# Coefficients.


def position_y(i: int) -> int:
    """The documented y_i: groups of up to 128 keep the code they had."""
    return 128 + i if i < 128 else MAX_PARITIES + i - 128


def test_the_cauchy_points_are_distinct_and_fill_the_field():
    xs = set(range(MAX_PARITIES))
    ys = [position_y(i) for i in range(MAX_GROUP)]
    assert len(set(ys)) == MAX_GROUP and not xs & set(ys)
    assert xs | set(ys) == set(range(256))


def test_coefficients_are_the_normalised_cauchy_matrix():
    for j in range(MAX_PARITIES):
        for i in range(MAX_GROUP):
            y = position_y(i)
            cauchy = SLOW_INV[j ^ y]
            assert coefficient(j, i) == slow_mul(cauchy, SLOW_INV[SLOW_INV[y]]), (j, i)
            assert coefficient(j, i) != 0
            assert (coefficient(j, i) == 1) == (j == 0)


@settings(max_examples=300)
@given(st.data())
def test_square_submatrices_are_invertible(data):
    m = data.draw(st.integers(min_value=1, max_value=3))
    rows = data.draw(st.lists(st.integers(0, MAX_PARITIES - 1), min_size=m, max_size=m, unique=True))
    cols = data.draw(st.lists(st.integers(0, MAX_GROUP - 1), min_size=m, max_size=m, unique=True))
    assert determinant([[coefficient(j, i) for i in cols] for j in rows]) != 0


def test_all_two_by_two_submatrices_of_a_small_group_are_invertible():
    for rows in itertools.combinations(range(16), 2):
        for cols in itertools.combinations(range(16), 2):
            assert determinant([[coefficient(j, i) for i in cols] for j in rows]) != 0, (rows, cols)


# Encoding.


@given(groups())
def test_parity_zero_is_the_xor_of_the_padded_blocks(group):
    size, blocks = group
    assert encode(blocks, 0, size) == xor((pad(b, size) for b in blocks), size)


@given(groups(), st.integers(0, MAX_PARITIES - 1))
def test_parity_is_the_coefficient_sum_byte_by_byte(group, j):
    size, blocks = group
    parity = encode(blocks, j, size)
    assert len(parity) == size
    for k in range(size):
        want = 0
        for i, block in enumerate(blocks):
            want ^= slow_mul(coefficient(j, i), pad(block, size)[k])
        assert parity[k] == want


def test_parity_of_an_empty_group_is_zeros():
    assert encode([], 5, 7) == bytes(7)


# Decoding.


@settings(max_examples=500, deadline=None)
@given(groups(), st.data())
def test_any_m_parities_rebuild_any_m_missing_blocks(group, data):
    size, blocks = group
    g = len(blocks)
    m = data.draw(st.integers(min_value=1, max_value=min(g, 6)))
    missing = data.draw(st.lists(st.integers(0, g - 1), min_size=m, max_size=m, unique=True))
    chosen = data.draw(
        st.lists(st.integers(0, min(g, MAX_PARITIES) - 1), min_size=m, max_size=m, unique=True)
    )
    held = {i: b for i, b in enumerate(blocks) if i not in missing}
    parities = {j: encode(blocks, j, size) for j in chosen}
    assert decode(size, held, parities, missing) == {i: pad(blocks[i], size) for i in missing}


@settings(max_examples=50, deadline=None)
@given(groups(), st.data())
def test_lowest_parities_are_used(group, data):
    """Parities beyond the m lowest are not read: garbage there changes nothing."""
    size, blocks = group
    g = len(blocks)
    m = data.draw(st.integers(min_value=1, max_value=min(g, MAX_PARITIES - 1)))
    missing = data.draw(st.lists(st.integers(0, g - 1), min_size=m, max_size=m, unique=True))
    chosen = sorted(
        data.draw(st.lists(st.integers(0, MAX_PARITIES - 2), min_size=m, max_size=m, unique=True))
    )
    parities = {j: encode(blocks, j, size) for j in chosen}
    parities[MAX_PARITIES - 1] = b"\xa5" * size
    held = {i: b for i, b in enumerate(blocks) if i not in missing}
    assert decode(size, held, parities, missing) == {i: pad(blocks[i], size) for i in missing}


@pytest.mark.parametrize(
    ("count", "lost"),
    [
        (
            MAX_GROUP,
            lambda rng: [*range(8), *rng.sample(range(8, MAX_GROUP - 1), MAX_PARITIES - 9), MAX_GROUP - 1],
        ),
        (MAX_PARITIES, lambda rng: rng.sample(range(MAX_PARITIES), MAX_PARITIES)),
    ],
    ids=["a largest group, lost on both sides of position 128", "a whole group of 32"],
)
def test_32_parities_rebuild_32_lost_blocks(count, lost):
    rng = random.Random(count)
    size = 24
    blocks = [rng.randbytes(size) for _ in range(count - 1)] + [rng.randbytes(5)]
    parities = {j: encode(blocks, j, size) for j in range(MAX_PARITIES)}
    missing = lost(rng)
    held = {i: b for i, b in enumerate(blocks) if i not in missing}
    assert decode(size, held, parities, missing) == {i: pad(blocks[i], size) for i in missing}


def test_nothing_missing_rebuilds_nothing():
    assert decode(4, {0: b"abcd", 1: b"ef"}, {}, []) == {}


@given(groups(), st.data())
def test_fewer_parities_than_missing_is_refused(group, data):
    size, blocks = group
    g = len(blocks)
    m = data.draw(st.integers(min_value=1, max_value=g))
    missing = data.draw(st.lists(st.integers(0, g - 1), min_size=m, max_size=m, unique=True))
    chosen = data.draw(st.lists(st.integers(0, min(g, MAX_PARITIES) - 1), max_size=m - 1, unique=True))
    held = {i: b for i, b in enumerate(blocks) if i not in missing}
    with pytest.raises(ValueError, match="only .* parities"):
        decode(size, held, {j: encode(blocks, j, size) for j in chosen}, missing)


# The C sums and their Python twin.


@st.composite
def sums(draw):
    size = draw(st.integers(min_value=1, max_value=100))
    count = draw(st.integers(min_value=0, max_value=20))
    blocks = [draw(st.binary(max_size=size)) for _ in range(count)]
    factors = draw(st.binary(min_size=count, max_size=count + 3))
    start = draw(st.none() | st.binary(max_size=size))
    return blocks, factors, size, start


@built
@given(sums())
def test_c_and_python_sums_agree(case):
    blocks, factors, size, start = case
    expected = python_combine(blocks, factors, size, start)
    assert erasure._erasure.combine(blocks, factors, size, start) == expected
    # Memoryviews and bytearrays (a sender's slices) add up the same.
    views = [memoryview(bytearray(block)) for block in blocks]
    assert erasure._erasure.combine(views, bytearray(factors), size, start) == expected


@built
def test_c_sum_is_the_byte_by_byte_sum():
    """Every factor on every byte value, and lengths around the 16-byte steps of the SSSE3 loop."""
    block = bytes(range(256)) * 2
    for factor in range(256):
        for size in (1, 15, 16, 17, 31, 511, 512):
            start = bytes(range(min(7, size)))
            out = erasure._erasure.combine([block[:size]], bytes([factor]), size, start)
            expected = bytes(slow_mul(factor, b) ^ (k if k < 7 else 0) for k, b in enumerate(block[:size]))
            assert out == expected, (factor, size)


@pytest.mark.parametrize(
    ("blocks", "factors", "size", "start", "message"),
    [
        ([b"ab"], b"", 2, None, "1 blocks but only 0 factors"),
        ([b"abc"], b"\x02", 2, None, "block at position 0 has 3 bytes, more than 2"),
        ([b"ab"], b"\x02", 2, b"abc", "start has 3 bytes, more than 2"),
        ([b""], b"\x02", 0, None, "block size must be positive"),
    ],
)
@pytest.mark.parametrize(
    "combine", [python_combine, getattr(erasure._erasure, "combine", None)], ids=["python", "C"]
)
def test_sums_refuse(combine, blocks, factors, size, start, message):
    if combine is None:
        pytest.skip("the C module mrsyncd._erasure is not built")
    with pytest.raises(ValueError, match=message):
        combine(blocks, factors, size, start)


# Bad input.


@pytest.mark.parametrize(
    ("blocks", "parity", "size", "message"),
    [
        ([b"ab"], -1, 2, "parity -1 is outside 0 .. 31"),
        ([b"ab"], MAX_PARITIES, 2, "parity 32 is outside 0 .. 31"),
        ([b"ab"] * (MAX_GROUP + 1), 0, 2, "at most 224 blocks, not 225"),
        ([b"ab", b"abc"], 1, 2, "block at position 1 has 3 bytes, more than 2"),
        ([b""], 0, 0, "block size must be positive"),
    ],
)
def test_encode_refuses(blocks, parity, size, message):
    with pytest.raises(ValueError, match=message):
        encode(blocks, parity, size)


@pytest.mark.parametrize(
    ("parity", "position", "bound"),
    [(-1, 0, "31"), (MAX_PARITIES, 0, "31"), (0, -1, "223"), (0, MAX_GROUP, "223")],
)
def test_coefficient_refuses(parity, position, bound):
    with pytest.raises(ValueError, match=f"outside 0 .. {bound}"):
        coefficient(parity, position)


P = encode([b"ab", b"cd"], 0, 2)


@pytest.mark.parametrize(
    ("size", "held", "parities", "missing", "message"),
    [
        (2, {0: b"ab", 1: b"cd"}, {0: P}, [1], "position 1 is both held and missing"),
        (2, {0: b"ab"}, {0: P, 1: P}, [1, 1], "missing positions repeat"),
        (2, {0: b"abc"}, {0: P}, [1], "held block at position 0 has 3 bytes, more than 2"),
        (2, {0: b"ab"}, {0: b"abc"}, [1], "parity 0 has 3 bytes, not 2"),
        (2, {0: b"ab"}, {0: b"a"}, [1], "parity 0 has 1 bytes, not 2"),
        (2, {0: b"ab"}, {MAX_PARITIES: P}, [1], "parity 32 is outside"),
        (2, {0: b"ab"}, {0: P}, [MAX_GROUP], "missing position 224 is outside"),
        (2, {-1: b"ab"}, {0: P}, [0], "held position -1 is outside"),
        (2, {0: b"ab"}, {0: P}, [2], "together be 0 .. 1"),
        (2, {3: b"ab"}, {0: P}, [0], "together be 0 .. 1"),
        (0, {0: b""}, {0: b""}, [1], "block size must be positive"),
        (2, {}, {0: P}, [0, 1], "2 blocks missing but only 1 parities"),
    ],
)
def test_decode_refuses(size, held, parities, missing, message):
    with pytest.raises(ValueError, match=message):
        decode(size, held, parities, missing)
