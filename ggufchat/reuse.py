"""Where a chat's prompt can come from without being read again: decisions only, no llama.cpp calls (the engine acts).

- its slot's own cells (the same chat's last turn), or another slot's (a shared system prompt): `common_prefix`;
- its slot's cells with a span cut out of the middle, the rest shifted down (a long chat whose oldest turns were
  dropped to fit the window): `dropped_span`;
- host RAM, where a finished chat's cells go when its slot is needed for another chat (`HostCache`), so that a chat
  coming back later restores them instead of reading its whole history again.

Every source is matched on token ids, never on text or on who the visitor is: a chat can only be given cells whose
tokens are exactly the beginning of its own prompt.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def dropped_span(cells: list[int], ids: list[int], keep: int, minimum: int) -> int | None:
    """The end `b` of a span cells[keep:b] whose removal makes all of the rest, cells[b:], continue the prompt right
    after its first `keep` tokens: ids[keep:keep + len(cells) - b] == cells[b:]. That is what history fitting does to a
    long chat (the system message stays, the oldest turns go). None unless at least `minimum` cells would be kept
    that way. The smallest such `b`: the shortest cut."""
    if keep >= len(ids):
        return None
    first = ids[keep]
    for b in range(keep + 1, len(cells) - minimum + 1):
        if cells[b] == first and cells[b:] == ids[keep: keep + len(cells) - b]:
            return b
    return None


@dataclass
class Saved:
    cells: tuple[int, ...]  # the tokens whose K/V `state` holds, at positions 0..n-1
    state: object  # llama_state_seq_get_data's bytes (a ctypes array)
    size: int


class HostCache:
    """Finished chats' cells in host RAM, least recently used out first, within `budget` bytes (0: off)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[tuple[int, ...], Saved] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def fits(self, size: int) -> bool:
        return 0 < size <= self.budget

    def put(self, saved: Saved) -> None:
        """Keep `saved`; entries it extends (the same chat, an earlier turn) are dropped: it holds them."""
        for cells in [c for c in self.entries if saved.cells[: len(c)] == c]:
            self.used -= self.entries.pop(cells).size
        self.entries[saved.cells] = saved
        self.used += saved.size
        while self.used > self.budget and self.entries:
            self.used -= self.entries.popitem(last=False)[1].size

    def best(self, ids: list[int]) -> tuple[Saved | None, int]:
        """The entry sharing the longest beginning with `ids`, and that length."""
        found, length = None, 0
        for saved in self.entries.values():
            n = common_prefix(saved.cells, ids)
            if n > length:
                found, length = saved, n
        return found, length

    def take(self, saved: Saved) -> Saved:
        """Remove `saved`: its cells are going back into a slot (saved again if that slot is needed later)."""
        self.used -= self.entries.pop(saved.cells).size
        return saved
