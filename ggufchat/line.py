"""The waiting line: seats at the engine, first come first served, with a bounded line of waiters who see their
place. A seat is tied to a model: one model is in memory at a time.
"""

from __future__ import annotations

import threading

from .errors import Busy


class WaitingLine:
    """First come, first served seats at the engine: `capacity` chats answered at once, `max_waiting` more in line.

    Gradio's own queue would also hold requests back, but when full it answers with an error; here a request that
    finds the line full gets a plain "try again" reply, and waiters see their place. A seat is also tied to a key
    (the model): a chat for another model waits until the current one's chats are done, since one model is in memory.
    """

    def __init__(self, max_waiting: int, capacity: int = 1):
        self.max_waiting, self.capacity = max_waiting, capacity
        self.holders: dict[object, object] = {}  # ticket -> key
        self.waiting: list[tuple[object, object]] = []  # (ticket, key), first in line first
        self.changed = threading.Condition()

    def _fits(self, key) -> bool:
        return len(self.holders) < self.capacity and all(k == key for k in self.holders.values())

    def wait(self, ticket: object, key: object = None):
        """Join the line; yields how many chats must finish before ours starts (about once a second) and returns when
        it has a seat. The caller must call leave(ticket) afterwards, also when it stops early."""
        with self.changed:
            if not self.waiting and self._fits(key):
                self.holders[ticket] = key
                return
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"The Space is busy: {len(self.waiting)} chats are already waiting. "
                           "Please try again in a minute.")
            self.waiting.append((ticket, key))
        while True:
            with self.changed:
                if self._take(ticket, key):
                    return
                self.changed.wait(timeout=1.0)
                if self._take(ticket, key):
                    return
                ahead = 1 + next(i for i, (t, _) in enumerate(self.waiting) if t is ticket)
            # Yielding regularly also lets a Stop or a disconnect end a request that is still waiting.
            yield ahead

    def _take(self, ticket: object, key) -> bool:
        if self.waiting[0][0] is ticket and self._fits(key):
            self.waiting.pop(0)
            self.holders[ticket] = key
            self.changed.notify_all()
            return True
        return False

    def leave(self, ticket: object) -> None:
        with self.changed:
            self.holders.pop(ticket, None)
            self.waiting = [(t, k) for t, k in self.waiting if t is not ticket]
            self.changed.notify_all()
