# The C module mrsyncd/_crypto.c.

#: The datagram version its read loop accepts (datagram.VERSION).
VERSION: int

class AEAD:
    def __init__(self, cipher: str, key: bytes) -> None: ...
    def seal(self, header: bytes, payload: bytes, sequence: int) -> bytes: ...
    def open(self, datagram: bytes, header_size: int, sequence: int) -> bytes | None: ...
    def seal_blocks(self, header: bytes, data: bytes, offset: int, block_size: int, count: int) -> bytes: ...

Run = tuple[int, int, int, int, int, int, int]
Rejected = tuple[int, int, int, int, int]

def receive(
    aead: AEAD, fd: int, wire_id: bytes, out: bytearray, block_size: int, batch: int, sample: int
) -> tuple[list[Run], int, int, int, int, int, Rejected, bool]: ...
