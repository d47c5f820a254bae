"""
What both ends agree on, byte for byte: the multicast datagram and its
AEAD, the manifest and its chunk digests, range maps, and the erasure code
that repairs losses.  Pure: no sockets, no reactor (docs/PROTOCOL.md).
"""
