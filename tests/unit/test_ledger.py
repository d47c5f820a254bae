"""
The block ledger's arithmetic, against a model that keeps a set of blocks:
runs taken whole or a block at a time, chunks made whole, verified or
forgotten, and what is asked for again.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mrsyncd.engine.ledger import DONE, NEEDED, VERIFYING, BlockLedger


class Model:
    """The same books, kept the obvious way."""

    def __init__(self, nblocks: int, chunk_blocks: int, status: bytes) -> None:
        self.nblocks, self.chunk_blocks = nblocks, chunk_blocks
        self.status = list(status)
        self.held: set[int] = set()

    def chunk_of(self, block: int) -> range:
        first = block // self.chunk_blocks * self.chunk_blocks
        return range(first, min(first + self.chunk_blocks, self.nblocks))

    def is_held(self, block: int) -> bool:
        return self.status[block // self.chunk_blocks] != NEEDED or block in self.held

    def take(self, first: int, count: int) -> list[int]:
        self.held.update(range(first, first + count))
        whole = []
        for chunk in sorted({b // self.chunk_blocks for b in range(first, first + count)}):
            if all(b in self.held for b in self.chunk_of(chunk * self.chunk_blocks)):
                self.status[chunk] = VERIFYING
                whole.append(chunk)
        return whole

    def wanted(self) -> set[int]:
        return {b for b in range(self.nblocks) if not self.is_held(b)}


@st.composite
def books(draw):
    chunk_blocks = draw(st.integers(1, 20))
    nblocks = draw(st.integers(1, 120))
    nchunks = -(-nblocks // chunk_blocks)
    states = st.sampled_from([NEEDED, NEEDED, DONE])
    status = bytes(draw(st.lists(states, min_size=nchunks, max_size=nchunks)))
    return nblocks, chunk_blocks, status


@settings(max_examples=300, deadline=None)
@given(books(), st.data())
def test_the_ledger_keeps_the_same_books_as_the_model(shape, data):
    nblocks, chunk_blocks, status = shape
    ledger, model = BlockLedger(nblocks, chunk_blocks, status), Model(nblocks, chunk_blocks, status)
    assert ledger.remaining == status.count(NEEDED)
    for _ in range(data.draw(st.integers(0, 30))):
        first = data.draw(st.integers(0, nblocks - 1))
        count = data.draw(st.integers(1, nblocks - first))
        action = data.draw(st.sampled_from(["take", "take", "verify", "forget"]))
        if action == "take":
            fresh = not any(model.is_held(b) for b in range(first, first + count))
            assert ledger.fresh(first, count) == fresh
            if fresh:
                assert ledger.take(first, count) == model.take(first, count)
        else:
            chunk = first // chunk_blocks
            if ledger.status[chunk] != VERIFYING:
                continue
            if action == "verify":
                all_done = ledger.verified(chunk)
                model.status[chunk] = DONE
                assert all_done == (model.status.count(DONE) == len(model.status))
            else:
                ledger.forget(chunk)
                model.status[chunk] = NEEDED
                model.held -= set(model.chunk_of(first))
        assert [ledger.held(b) for b in range(nblocks)] == [model.is_held(b) for b in range(nblocks)]
        assert bytes(ledger.status) == bytes(model.status)
        asked = {b for start, end in ledger.wanted(nblocks + 1) for b in range(start, end)}
        assert asked == model.wanted()
        assert ledger.missing(first, first + count) == [
            b for b in range(first, first + count) if not model.is_held(b)
        ]


def test_a_run_across_chunks_makes_each_whole_once():
    ledger = BlockLedger(25, 10, bytes(3))
    assert ledger.take(0, 7) == []
    assert ledger.take(7, 16) == [0, 1]  # blocks 7-22: chunk 0 and 1 whole, chunk 2 not
    assert ledger.take(23, 2) == [2]  # the last chunk has 5 blocks
    assert bytes(ledger.status) == bytes([VERIFYING] * 3)
    assert not ledger.fresh(20, 1)


def test_wanted_is_cut_short_at_its_budget():
    ledger = BlockLedger(100, 10, bytes(10))
    for block in range(0, 100, 2):
        ledger.take(block, 1)
    # A chunk's runs are not split: it stops after the chunk that crossed 7.
    assert len(ledger.wanted(7)) == 10
    assert ledger.wanted(7)[0] == (1, 2)


def test_a_file_that_needs_nothing_keeps_no_bits():
    ledger = BlockLedger(10**6, 1000, bytes([DONE]) * 1000)
    assert ledger.remaining == 0 and len(ledger._bits) == 0
    assert ledger.held(123_456)


def test_a_block_let_go_of_then_forgotten_is_wanted_again() -> None:
    """In a pack's ledger (a chunk a block), a neighbour's failure may forget a block `unwant` let go of."""
    ledger = BlockLedger(4, 1, bytes([NEEDED] * 4))
    assert ledger.take(0, 2) == [0, 1]
    assert ledger.unwant(2) and not ledger.unwant(0)
    assert ledger.remaining == 3
    ledger.forget(2)
    ledger.forget(1)
    assert ledger.remaining == 4  # none is done
    assert ledger.wanted(10) == [(1, 4)]
