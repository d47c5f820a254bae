# The C module mrsyncd/_erasure.c.

from collections.abc import Sequence

#: "ssse3" or "bytes": which loop the host's CPU runs.
path: str

def combine(blocks: Sequence[bytes], factors: bytes, size: int, start: bytes | None = None) -> bytes: ...
