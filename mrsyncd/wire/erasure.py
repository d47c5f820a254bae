"""
Erasure code for repair datagrams: any m parities of a group rebuild any m of its blocks.

A plain XOR parity repairs a group that lost exactly one block, but loss on a
LAN comes in bursts, and a burst that takes two blocks of a group makes every
XOR parity of that group useless.  Here parity ``j`` of a group is a different
linear combination of the group's blocks over GF(2^8) for every ``j``, chosen
so that any m distinct parities determine any m missing blocks: a sender can
keep sending new parities of a group and each one a receiver gets is useful,
whichever blocks and whichever parities the network dropped.

The coefficients come from a Cauchy matrix ``C[j][i] = 1 / (x_j + y_i)``
with ``x_j = j`` for the `MAX_PARITIES` parities and the `MAX_GROUP`
positions' ``y_i`` the rest of GF(2^8): ``128 + i`` for the first 128 (the
code of groups of up to 128, as it was), then ``MAX_PARITIES + i - 128``.
Every square submatrix of a Cauchy matrix is invertible, and scaling each
column keeps that true.  The field has 256 elements to share between
parities and positions, and a group needs only as many parities as the
most blocks one receiver lost of it: at 2% loss, 4.5 of a group of 224 on
average, more than 16 once in 280,000 groups and more than 32 never in
practice (a burst that does is resent as blocks).  So 32 parities leave
room for groups of 224, which cost fewer repair bytes (`NATIVE_GROUP`).
Columns are scaled so that row 0 is all ones, which makes parity 0 the
plain XOR of the blocks: the single-parity repair already on the wire is
the special case ``j = 0``.

All the work is sums of blocks times constants (`combine`): G of them for
a parity of a group of G blocks, and for m blocks rebuilt, m over the blocks
held and m over the parities, after inverting an m-by-m matrix of
coefficients.  The C module `mrsyncd._erasure` does a sum 16 bytes at a
time (about 0.1 us a block), which is what makes groups of 224 affordable;
without it, Python does a block at a time in C anyway: a block times a
constant is one ``bytes.translate`` through a 256-byte product table, and a
sum of blocks is an XOR of ``int``s (about 1.5 us a block).  The ints are
little-endian so that a short last block needs no padding: its missing
high-order zero bytes are the padding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import reduce
from itertools import repeat
from operator import xor
from typing import Final, Literal

try:
    from mrsyncd import _erasure
except ImportError:  # not built: the pure-Python path
    _erasure = None  # type: ignore[assignment]

MAX_PARITIES = 32
"""Distinct parities a group has: parity indices are < 32."""
MAX_GROUP = 256 - MAX_PARITIES
"""Largest group: positions are < 224."""

_POLY = 0x11D
_LITTLE: Final[Literal["little"]] = "little"

_EXP = [0] * 510
_LOG = [0] * 256
_x = 1
for _k in range(255):
    _EXP[_k] = _EXP[_k + 255] = _x
    _LOG[_x] = _k
    _x <<= 1
    if _x & 0x100:
        _x ^= _POLY
del _x, _k


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


MUL: tuple[bytes, ...] = (bytes(256),) + tuple(
    bytes([0] + [_EXP[_LOG[c] + _LOG[x]] for x in range(1, 256)]) for c in range(1, 256)
)
"""``block.translate(MUL[c])`` is the block times ``c``, byte by byte."""


#: ``y_i`` of each position: none of them a parity's ``x_j``.
_Y = tuple(128 + i if i < 128 else MAX_PARITIES + i - 128 for i in range(MAX_GROUP))


def _coefficient_row(parity: int) -> bytes:
    # x_0 = 0, so C[0][i] = 1 / y_i and D[j][i] = C[j][i] / C[0][i] = y_i / (j ^ y_i).
    return bytes(_mul(y, _inv(parity ^ y)) for y in _Y)


_COEFFICIENTS: tuple[bytes, ...] = tuple(_coefficient_row(j) for j in range(MAX_PARITIES))


def coefficient(parity: int, position: int) -> int:
    """The factor by which the block at ``position`` enters parity ``parity``: never 0, and 1 for parity 0."""
    _check_index("parity", parity, MAX_PARITIES)
    _check_index("position", position)
    return _COEFFICIENTS[parity][position]


def encode(blocks: Sequence[bytes], parity: int, size: int) -> bytes:
    """
    Parity ``parity`` of the group ``blocks`` (group positions 0, 1, ...),
    each block zero-padded to ``size`` bytes.  Parity 0 is their XOR.
    """
    _check_index("parity", parity, MAX_PARITIES)
    if len(blocks) > MAX_GROUP:
        raise ValueError(f"a group has at most {MAX_GROUP} blocks, not {len(blocks)}")
    # `combine` refuses a size below 1 and a block longer than ``size``, on both paths.
    return combine(blocks, _COEFFICIENTS[parity], size)


def decode(
    size: int, held: Mapping[int, bytes], parities: Mapping[int, bytes], missing: Sequence[int]
) -> dict[int, bytes]:
    """
    The blocks at positions ``missing``, each ``size`` bytes (zero-padded:
    the caller trims a file's short last block), from the blocks ``held``
    and ``len(missing)`` of the ``parities`` received.

    The group is positions ``0 .. len(held) + len(missing) - 1``, each one
    either held or missing; anything else is a caller's bookkeeping error
    that would otherwise rebuild garbage silently, so it is refused.  The
    lowest parity indices are used, so a group that lost one block is
    rebuilt from parity 0 by XOR alone whenever parity 0 arrived.
    """
    _check_size(size)
    wanted = list(missing)
    m = len(wanted)
    wanted_set = set(wanted)
    if len(wanted_set) != m:
        raise ValueError(f"missing positions repeat: {sorted(wanted)}")
    for position in wanted:
        _check_index("missing position", position)
    for position, block in held.items():
        _check_index("held position", position)
        if position in wanted_set:
            raise ValueError(f"position {position} is both held and missing")
        if len(block) > size:
            raise ValueError(f"held block at position {position} has {len(block)} bytes, more than {size}")
    group = len(held) + m
    if any(position >= group for position in wanted) or any(position >= group for position in held):
        raise ValueError(
            f"held and missing positions must together be 0 .. {group - 1}, "
            f"not held {sorted(held)} and missing {sorted(wanted)}"
        )
    for index, payload in parities.items():
        _check_index("parity", index, MAX_PARITIES)
        if len(payload) != size:
            raise ValueError(f"parity {index} has {len(payload)} bytes, not {size}")
    if len(parities) < m:
        raise ValueError(f"{m} blocks missing but only {len(parities)} parities: need at least {m}")
    if m == 0:
        return {}
    used = sorted(parities)[:m]
    held_blocks = list(held.values())
    # Each parity used, minus the held blocks' part of it, is the sum of the
    # missing blocks times their coefficients: m equations in m unknowns.
    syndromes = [
        combine(held_blocks, bytes(map(_COEFFICIENTS[index].__getitem__, held)), size, parities[index])
        for index in used
    ]
    if m == 1 and used[0] == 0:  # parity 0: the missing block is the syndrome itself
        return {wanted[0]: syndromes[0]}
    inverse = _invert([bytes(_COEFFICIENTS[index][p] for p in wanted) for index in used])
    return {position: combine(syndromes, inverse[k], size) for k, position in enumerate(wanted)}


def _invert(matrix: Sequence[bytes]) -> list[bytes]:
    """
    The inverse of a square matrix over GF(2^8), given and returned as rows.
    Gauss-Jordan elimination on rows [A | I], each a little-endian int, so
    that each row operation is one translate and one XOR.  No row is ever
    swapped: the k-th pivot is the ratio of two leading principal minors of
    a (column-scaled) Cauchy matrix, and those are never 0.
    """
    m = len(matrix)
    width = 2 * m
    rows = [int.from_bytes(row, "little") | 1 << (8 * (m + k)) for k, row in enumerate(matrix)]
    for col in range(m):
        shift = 8 * col
        lead = (rows[col] >> shift) & 0xFF
        if not lead:  # pragma: no cover - see above
            raise AssertionError(f"singular matrix {[list(row) for row in matrix]}")
        pivot_bytes = rows[col].to_bytes(width, "little")
        if lead != 1:
            pivot_bytes = pivot_bytes.translate(MUL[_inv(lead)])
            rows[col] = int.from_bytes(pivot_bytes, "little")
        for r in range(m):
            factor = (rows[r] >> shift) & 0xFF
            if r != col and factor:
                rows[r] ^= (
                    rows[col] if factor == 1 else int.from_bytes(pivot_bytes.translate(MUL[factor]), "little")
                )
    return [(row >> (8 * m)).to_bytes(m, "little") for row in rows]


#: Blocks per group a sender chooses (`preferred_group`): with the C sums,
#: the largest.  A group costs the most blocks any one receiver lost of it,
#: so the larger the group, the nearer that comes to the loss itself: at 2%
#: loss at each of 8 receivers, 5.9% of the data in groups of 32, 3.9% in
#: groups of 128 and 3.4% in groups of 224 (the expectation; at 1% loss at
#: each of 64, 3.5% and 2.8%).  In Python a parity of 128 blocks costs
#: 200 us where one of 32 costs 50, and that would slow a sender more than
#: it saves.
NATIVE_GROUP = MAX_GROUP
PYTHON_GROUP = 32


def preferred_group() -> int:
    """The parity group a new manifest asks for: what this host's arithmetic affords."""
    return NATIVE_GROUP if native() else PYTHON_GROUP


def native() -> bool:
    """Whether the C sums are in use (``MRSYNCD_PURE_PYTHON=1`` turns them off, for tests)."""
    return _erasure is not None and not os.environ.get("MRSYNCD_PURE_PYTHON")


def combine(blocks: Sequence[bytes], factors: bytes, size: int, start: bytes | None = None) -> bytes:
    """
    ``start`` plus the sum of ``factors[k]`` times ``blocks[k]``, each
    zero-padded to ``size`` bytes: in C where it was built.
    """
    if native():
        return _erasure.combine(blocks, factors, size, start)
    return python_combine(blocks, factors, size, start)


def python_combine(blocks: Sequence[bytes], factors: bytes, size: int, start: bytes | None = None) -> bytes:
    """`combine` in Python: the C module's twin, held to the same answers by the contract tests."""
    _check_size(size)
    if len(factors) < len(blocks):
        raise ValueError(f"{len(blocks)} blocks but only {len(factors)} factors")
    for position, block in enumerate(blocks):
        if len(block) > size:
            raise ValueError(f"block at position {position} has {len(block)} bytes, more than {size}")
    if start is not None and len(start) > size:
        raise ValueError(f"start has {len(start)} bytes, more than {size}")
    first = 0 if start is None else int.from_bytes(start, "little")
    return _combine(blocks, factors, first).to_bytes(size, "little")


def _combine(blocks: Iterable[bytes], factors: bytes, start: int = 0) -> int:
    """
    ``start`` plus the sum of ``factors[k]`` times the k-th block, as a
    little-endian int.  map and reduce keep the per-block loop in C, a few
    per cent faster than a for loop, and this loop is the whole cost of
    encoding and most of decoding.
    """
    if not factors.strip(b"\x01"):  # all ones: parity 0, a plain XOR
        return _xor(blocks, start)
    return _xor(map(bytes.translate, blocks, map(MUL.__getitem__, factors)), start)


def _xor(blocks: Iterable[bytes], start: int = 0) -> int:
    """``start`` XOR the blocks, each read as a little-endian int (so a short block is zero-padded)."""
    return reduce(xor, map(int.from_bytes, blocks, repeat(_LITTLE)), start)


def _check_index(what: str, value: int, bound: int = MAX_GROUP) -> None:
    if not 0 <= value < bound:
        raise ValueError(f"{what} {value} is outside 0 .. {bound - 1}")


def _check_size(size: int) -> None:
    if size <= 0:
        raise ValueError(f"block size must be positive, not {size}")
