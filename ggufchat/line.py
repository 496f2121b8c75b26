"""The waiting line: seats at the engines, first come first served per model, with a bounded line of waiters who see
their place. A seat is tied to a model; which models may have seats at the same time is the store's call (memory).
"""

from __future__ import annotations

import threading

from .errors import Busy


class WaitingLine:
    """First come, first served seats at the engine: `capacity` chats answered at once, `max_waiting` more in line.

    Gradio's own queue would also hold requests back, but when full it answers with an error; here a request that
    finds the line full gets a plain "try again" reply, and waiters see their place. A seat is also tied to a key
    (the model): `capacity` seats per model, and `admits(key, busy)` says whether a model may get seats while the
    models in `busy` hold some (the store: do they fit in memory together?). The default admits one model at a time.

    Order: a waiter never passes an earlier one for the same model, nor one that waits for memory (else a busy model's
    visitors would keep it busy forever); it does pass an earlier one that only waits for a seat of another model.
    """

    def __init__(self, max_waiting: int, capacity: int = 1, admits=None):
        self.max_waiting, self.capacity = max_waiting, capacity
        self.admits = admits or (lambda key, busy: busy <= {key})
        self.holders: dict[object, object] = {}  # ticket -> key
        self.waiting: list[tuple[object, object]] = []  # (ticket, key), first in line first
        self.changed = threading.Condition()

    def busy(self) -> set:
        """The models that hold seats now."""
        with self.changed:
            return set(self.holders.values())

    def _fits(self, key) -> bool:
        held = sum(1 for k in self.holders.values() if k == key)
        return held < self.capacity and self.admits(key, set(self.holders.values()))

    def _may_take(self, key, ahead: list[tuple[object, object]]) -> bool:
        """Whether a chat for `key` may be seated now, with `ahead` (ticket, key) still waiting before it."""
        busy = set(self.holders.values())
        for _, k in ahead:
            if k == key or not self.admits(k, busy):
                return False
        return self._fits(key)

    def wait(self, ticket: object, key: object = None):
        """Join the line; yields how many chats must finish before ours starts (about once a second) and returns when
        it has a seat. The caller must call leave(ticket) afterwards, also when it stops early."""
        with self.changed:
            if self._may_take(key, self.waiting):
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
        at = next(i for i, (t, _) in enumerate(self.waiting) if t is ticket)
        if self._may_take(key, self.waiting[:at]):
            self.waiting.pop(at)
            self.holders[ticket] = key
            self.changed.notify_all()
            return True
        return False

    def leave(self, ticket: object) -> None:
        with self.changed:
            self.holders.pop(ticket, None)
            self.waiting = [(t, k) for t, k in self.waiting if t is not ticket]
            self.changed.notify_all()
