"""
A receiver's kept parities: a group's parities wait here until the group
lacks no more blocks than it has parities, when `erasure.decode` rebuilds
the missing ones.

Memory is bounded (`KeptParities.limit` parities of a block each): past
it the group kept longest ago is forgotten, since a group that waited that
long is likely to be repaired by a pass anyway.  Pure: no sockets, no disk.
"""

from __future__ import annotations

from collections import OrderedDict

#: A group: (file index, group number).
Group = tuple[int, int]


class KeptParities:
    """Parities by group, oldest group first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Parities kept, over all groups.
        self.count = 0
        self._groups: OrderedDict[Group, dict[int, bytes]] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._groups)

    def groups(self) -> list[Group]:
        return list(self._groups)

    def get(self, group: Group) -> dict[int, bytes] | None:
        """A group's parities by their index in the group, or None if it has none."""
        return self._groups.get(group)

    def keep(self, group: Group, index: int, parity: bytes) -> dict[int, bytes] | None:
        """
        Keep parity ``index`` of a group, which becomes the newest; its
        parities, or None if that one was kept already.
        """
        kept = self._groups.setdefault(group, {})
        self._groups.move_to_end(group)
        if index in kept:
            return None
        kept[index] = parity
        self.count += 1
        return kept

    def trim(self) -> None:
        """Forget the oldest groups until at most `limit` parities are kept."""
        while self.count > self.limit:
            self.count -= len(self._groups.popitem(last=False)[1])

    def take(self, group: Group) -> dict[int, bytes]:
        """A group's parities, forgotten (none if it had none)."""
        kept = self._groups.pop(group, {})
        self.count -= len(kept)
        return kept
