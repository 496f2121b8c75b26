"""The waiting line (ggufchat/line.py): seats at the engine, first come first served, a bounded line whose waiters
are told their place, and a seat tied to a model. In process, no model: tickets are plain objects."""

from __future__ import annotations

import threading

import pytest

from ggufchat.errors import Busy
from ggufchat.line import WaitingLine


def test_the_waiting_line_admits_exactly_queue_size_and_tells_each_its_place():
    queue_size = 3
    line = WaitingLine(queue_size)
    first = object()
    assert list(line.wait(first)) == []  # an empty line: the turn at once, nothing to wait for

    waiters = [object() for _ in range(queue_size)]
    places = [line.wait(ticket) for ticket in waiters]
    # Each waiter is told how many are ahead of it (a wait() step returns within a second).
    assert [next(place) for place in places] == [1, 2, 3]

    with pytest.raises(Busy, match=f"The Space is busy: {queue_size} chats are already waiting"):
        next(line.wait(object()))

    line.leave(first)  # the answer is done: the first waiter gets the turn, the others move up
    with pytest.raises(StopIteration):
        next(places[0])
    assert [next(place) for place in places[1:]] == [1, 2]

    # A waiter who leaves (Stop, disconnect) frees its place for a newcomer at the end of the line.
    line.leave(waiters[1])
    assert next(places[2]) == 1
    newcomer = line.wait(object())
    assert next(newcomer) == 2


def test_the_waiting_line_hands_the_turn_on_when_its_holder_leaves():
    line = WaitingLine(2)
    first, second = object(), object()
    assert list(line.wait(first)) == []
    got_turn = threading.Event()

    def wait_in_line():
        for _ in line.wait(second):
            pass
        got_turn.set()

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    assert not got_turn.wait(0.3), "the second request got the turn while the first held it"
    line.leave(first)
    assert got_turn.wait(30), "the second request did not get the turn after the first left"
    waiter.join(30)


def test_the_waiting_line_seats_parallel_chats_of_one_model_first_come_first_served():
    line = WaitingLine(max_waiting=2, capacity=2)
    a, b, c, d, e = (object() for _ in range(5))
    assert list(line.wait(a, "m1")) == [] and list(line.wait(b, "m1")) == []  # two seats, taken at once
    waiting_c = line.wait(c, "m1")
    assert next(waiting_c) == 1  # one chat must finish first
    waiting_d = line.wait(d, "m2")
    assert next(waiting_d) == 2
    with pytest.raises(Busy, match="2 chats are already waiting"):
        list(line.wait(e, "m1"))
    line.leave(a)
    assert list(waiting_c) == []  # c takes a's seat
    line.leave(b)
    assert next(waiting_d) == 1  # another model: it waits until no chat of m1 is left
    line.leave(c)
    assert list(waiting_d) == []
    assert line.holders == {d: "m2"} and not line.waiting


def test_models_that_fit_together_are_seated_side_by_side_each_with_its_own_seats():
    """admits: m1 and m2 fit in memory together, m3 fits only alone (the store's fits_beside, as a table)."""
    together = {frozenset({"m1", "m2"})}
    line = WaitingLine(max_waiting=8, capacity=1,
                       admits=lambda key, busy: not (busy - {key}) or frozenset(busy | {key}) in together)
    a, b, c, d = (object() for _ in range(4))
    assert list(line.wait(a, "m1")) == []
    assert list(line.wait(b, "m2")) == []  # m2 beside m1: at once, not after m1's chat
    waiting_c = line.wait(c, "m1")
    assert next(waiting_c) == 1  # m1's one seat is taken
    # d for m2 passes c, which waits for a seat of another model, not for memory; m2's seat is still b's, though.
    waiting_d = line.wait(d, "m2")
    assert next(waiting_d) == 2
    line.leave(b)
    assert list(waiting_d) == []  # m2's seat is free: d takes it while c still waits for m1's
    assert next(waiting_c) == 1
    line.leave(a)
    assert list(waiting_c) == []
    assert line.busy() == {"m1", "m2"}


def test_a_chat_waiting_for_memory_is_not_passed_so_a_busy_model_cannot_starve_it():
    line = WaitingLine(max_waiting=8, capacity=2, admits=lambda key, busy: not (busy - {key}))  # one model at a time
    a, b, c = object(), object(), object()
    assert list(line.wait(a, "m1")) == []
    waiting_b = line.wait(b, "m3")  # m3 does not fit beside m1: it waits for m1's chats to end
    assert next(waiting_b) == 1
    waiting_c = line.wait(c, "m1")  # m1 has a free seat, but b came first and waits for memory m1 holds
    assert next(waiting_c) == 2
    line.leave(a)
    assert list(waiting_b) == []  # m1 is idle now: b gets m3 in
    assert next(waiting_c) == 1  # and c waits for m3's chat, in turn
    line.leave(b)
    assert list(waiting_c) == []
