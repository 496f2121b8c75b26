"""The engine's decisions as pure functions (ggufchat/schedule.py): which slot a chat takes, what a step decodes.

No model: slots are plain data. test_engine.py checks the same behaviour end to end on a real llama.cpp context
(passes per llama_decode counted through a ggml eval callback)."""

from __future__ import annotations

from ggufchat.request import Request
from ggufchat.schedule import SHIFT_MIN_TOKENS, Slot, choose_slot, continues, plan_step, runs


def running(seq: int, **fields) -> Slot:
    return Slot(seq, request=Request([1, 2, 3], max_tokens=8), **fields)


def test_runs_counts_the_passes_llama_cpp_makes_over_the_weights():
    assert runs(set()) == 0
    assert runs({0, 1, 2, 3}) == 1
    assert runs({0, 1, 6, 7}) == 2
    assert runs({0, 3, 4, 7}) == 3


def test_a_chat_continues_its_own_cells_and_not_anothers():
    mine = list(range(100, 160))
    assert continues(mine, mine + [7, 8], shift=True) == 60  # its next turn
    assert continues(mine, mine[:40], shift=True) == 40  # the same prompt again, shorter (a retry of an edit)
    assert continues(mine, [1] + mine[1:], shift=True) == 0  # another chat's cells
    # Its oldest turns dropped: tokens 10..20 cut out, the rest follows the kept beginning.
    dropped = mine[:10] + mine[20:] + [7]
    assert continues(mine, dropped, shift=True) == 50
    assert continues(mine, dropped, shift=False) == 0  # without context shift only an exact beginning counts
    too_short = mine[:10] + mine[60 - SHIFT_MIN_TOKENS + 1:] + [7]  # fewer than SHIFT_MIN_TOKENS would stay
    assert continues(mine, too_short, shift=True) == 0


def test_a_returning_chat_takes_the_slot_holding_its_cells_even_if_others_are_empty():
    history = list(range(50, 90))
    slots = [Slot(0), Slot(1, cells=[9] * 40, used_at=1.0), Slot(2, cells=history, used_at=5.0), Slot(3)]
    slot, continued = choose_slot(slots, history + [1, 2], shift=True)
    assert (slot.seq, continued) == (2, len(history))


def test_a_new_chat_takes_an_empty_slot_beside_the_running_ones_before_any_holding_cells():
    slots = [running(0), running(1), Slot(2, cells=[5] * 30, used_at=0.0), Slot(3), Slot(4), Slot(5), Slot(6), Slot(7)]
    slot, continued = choose_slot(slots, [1, 2, 3], shift=True)
    assert (slot.seq, continued) == (3, 0)  # empty first; 3 would give two runs (0-1, 3), every other empty slot too
    slots = [running(0), running(1), Slot(2), Slot(3), Slot(6), Slot(7)]
    assert choose_slot(slots, [1, 2, 3], shift=True)[0].seq == 2  # 0, 1, 2: one pass a step


def test_with_every_slot_holding_a_finished_chat_the_least_recently_used_goes():
    slots = [running(0), Slot(1, cells=[4] * 30, used_at=3.0), Slot(2, cells=[5] * 30, used_at=1.0),
             Slot(3, cells=[6] * 30, used_at=2.0)]
    assert choose_slot(slots, [1, 2, 3], shift=True)[0].seq == 1  # consecutive with 0 wins over least recently used
    slots[0] = Slot(0, cells=[7] * 30, used_at=9.0)
    assert choose_slot(slots, [1, 2, 3], shift=True)[0].seq == 2  # nobody running: the least recently used


def test_a_step_holds_every_answering_chat_and_a_bounded_prompt_chunk_in_sequence_order():
    a, b = running(2, next_token=11), running(0, next_token=12)
    newcomer = running(1, todo=list(range(100)), admitted=5)
    later = running(3, todo=list(range(40)), admitted=6)
    plan = plan_step([a, b, newcomer, later], n_batch=512, prefill_chunk=64)
    assert [(slot.seq, len(tokens), logits) for slot, tokens, logits in plan] == [
        (0, 1, True), (1, 64, False), (2, 1, True)]  # the chunk budget went to the first come; 3 waits
    alone = plan_step([newcomer, later], n_batch=512, prefill_chunk=64)  # nobody answering: a whole batch
    assert [(slot.seq, len(tokens), logits) for slot, tokens, logits in alone] == [(1, 100, True), (3, 40, True)]


def test_a_warm_up_reads_its_prompt_without_asking_for_logits():
    warm = Slot(0, request=Request([1, 2, 3], max_tokens=0), todo=[1, 2, 3])
    assert plan_step([warm], n_batch=512, prefill_chunk=64) == [(warm, [1, 2, 3], False)]
