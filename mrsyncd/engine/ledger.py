"""
A receiver's books for one file: which blocks it holds, which chunks are
whole, being verified or done, and what to ask for again.

Pure arithmetic on a bit a block and a state and a count a chunk (memory:
one bit per block whatever the file's size), kept apart from the sockets
and the disk so that it can be tested exhaustively (tests/unit/test_ledger.py).
Blocks arrive in runs (`mrsyncd.engine.intake`), so the books are kept a run at a
time: a run of 64 blocks costs a few slice operations, not 64 updates.
"""

from __future__ import annotations

from array import array

#: A chunk's states: its blocks are wanted; all arrived and it is being
#: checked against its digest; it is verified (or was never needed).
NEEDED, VERIFYING, DONE = 0, 1, 2


class BlockLedger:
    """The books of one file of ``nblocks`` blocks in chunks of ``chunk_blocks``."""

    # A tree of 100,000 files keeps 100,000 of these.
    __slots__ = ("nblocks", "chunk_blocks", "status", "counts", "remaining", "_bits")

    def __init__(self, nblocks: int, chunk_blocks: int, status: bytes) -> None:
        """``status``: a state (`NEEDED` or `DONE`) per chunk, as the survey found them."""
        self.nblocks = nblocks
        self.chunk_blocks = chunk_blocks
        self.status = bytearray(status)
        self.counts = array("I", bytes(4 * len(status)))
        #: Chunks not yet `DONE`.
        self.remaining = len(status) - self.status.count(DONE)
        self._bits = bytearray(-(-nblocks // 8) if self.remaining else 0)

    def blocks_in_chunk(self, chunk: int) -> int:
        return min(self.chunk_blocks, self.nblocks - chunk * self.chunk_blocks)

    def held(self, block: int) -> bool:
        """A block is held once received, or when its chunk is not needed."""
        if self.status[block // self.chunk_blocks] != NEEDED:
            return True
        return bool(self._bits[block >> 3] >> (block & 7) & 1)

    def fresh(self, first: int, count: int) -> bool:
        """None of blocks ``first`` to ``first + count - 1`` is held: the run can be taken whole."""
        last = first + count
        cb = self.chunk_blocks
        low, high = first // cb, (last - 1) // cb + 1
        if self.status.count(NEEDED, low, high) != high - low:
            return False
        return not _any_set(self._bits, first, last)

    def take(self, first: int, count: int) -> list[int]:
        """
        Hold a `fresh` run; the chunks it made whole are `VERIFYING` and
        returned, to be checked against their digests.
        """
        last = first + count
        _set(self._bits, first, last, True)
        whole = []
        cb = self.chunk_blocks
        for chunk in range(first // cb, (last - 1) // cb + 1):
            self.counts[chunk] += min(last, (chunk + 1) * cb) - max(first, chunk * cb)
            if self.counts[chunk] == self.blocks_in_chunk(chunk):
                self.status[chunk] = VERIFYING
                whole.append(chunk)
        return whole

    def missing(self, first: int, last: int) -> list[int]:
        """The blocks from ``first`` up to ``last`` that are not held."""
        return [b for b in range(first, min(last, self.nblocks)) if not self.held(b)]

    def verified(self, chunk: int) -> bool:
        """A chunk matched its digest; True once every chunk has."""
        self.status[chunk] = DONE
        self.remaining -= 1
        return not self.remaining

    def unwant(self, chunk: int) -> bool:
        """A chunk no longer wanted (its file gave up on): True if it was."""
        if self.status[chunk] != NEEDED:
            return False
        self.status[chunk] = DONE
        self.remaining -= 1
        return True

    def forget(self, chunk: int) -> None:
        """A chunk failed its digest: its blocks are wanted again."""
        if self.status[chunk] == DONE:  # a pack's block that `unwant` let go of
            self.remaining += 1
        self.status[chunk] = NEEDED
        self.counts[chunk] = 0
        first = chunk * self.chunk_blocks
        _set(self._bits, first, first + self.blocks_in_chunk(chunk), False)

    def wanted(self, budget: int) -> list[tuple[int, int]]:
        """The blocks to ask for, as ``[start, end)`` runs: about ``budget`` of them at most."""
        ranges: list[tuple[int, int]] = []
        for chunk, state in enumerate(self.status):
            if state != NEEDED:
                continue
            first = chunk * self.chunk_blocks
            last = first + self.blocks_in_chunk(chunk)
            if self.counts[chunk] == 0:
                if ranges and ranges[-1][1] == first:  # a pack's, whose chunks are blocks
                    ranges[-1] = (ranges[-1][0], last)
                else:
                    ranges.append((first, last))
            else:
                ranges.extend(_zero_runs(self._bits, first, last))
            if len(ranges) >= budget:
                break
        return ranges

    def close(self) -> None:
        """The file is committed or failed: its bits are no longer needed (nor asked about)."""
        self._bits = bytearray()


def _any_set(bits: bytearray, first: int, last: int) -> bool:
    while first < last and first & 7:
        if bits[first >> 3] >> (first & 7) & 1:
            return True
        first += 1
    while last > first and last & 7:
        last -= 1
        if bits[last >> 3] >> (last & 7) & 1:
            return True
    return first < last and bits.count(0, first >> 3, last >> 3) != (last - first) >> 3


def _set(bits: bytearray, first: int, last: int, value: bool) -> None:
    while first < last and first & 7:
        _bit(bits, first, value)
        first += 1
    while last > first and last & 7:
        last -= 1
        _bit(bits, last, value)
    if first < last:
        bits[first >> 3 : last >> 3] = (b"\xff" if value else b"\0") * ((last - first) >> 3)


def _bit(bits: bytearray, block: int, value: bool) -> None:
    if value:
        bits[block >> 3] |= 1 << (block & 7)
    else:
        bits[block >> 3] &= ~(1 << (block & 7)) & 0xFF


def _zero_runs(bits: bytearray, first: int, last: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = -1
    block = first
    while block < last:
        byte = bits[block >> 3]
        if byte == 0xFF and block & 7 == 0 and block + 8 <= last:
            if start >= 0:
                runs.append((start, block))
                start = -1
            block += 8
            continue
        have = byte >> (block & 7) & 1
        if not have and start < 0:
            start = block
        elif have and start >= 0:
            runs.append((start, block))
            start = -1
        block += 1
    if start >= 0:
        runs.append((start, last))
    return runs
