"""Scheduling decisions, as pure functions of the slots' state: which slot a new chat takes, and what goes into the
next `llama_decode`. The engine (engine.py) asks these and acts; tests/test_schedule.py checks them without a model.

A slot is one sequence of the context, `parallel` in all; its `cells` are the tokens whose K/V it holds. The same
split as llama.cpp's server (`get_available_slot` / `launch_slot_with_task`) and vLLM's scheduler (`schedule` /
`update_from_output`): decide here, do there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .reuse import common_prefix, dropped_span

if TYPE_CHECKING:
    from .request import Request

# A chat whose oldest turns were dropped to fit its window keeps the rest of its cells, shifted down, when at least
# this many remain (fewer: just read them again).
SHIFT_MIN_TOKENS = 32


@dataclass
class Slot:
    seq: int
    cells: list[int] = field(default_factory=list)  # tokens whose K/V this sequence holds, at positions 0..n-1
    request: Request | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, evaluated at the next step
    chain: object = None  # llama_sampler chain
    decoder: object = None  # incremental UTF-8 decoder
    held: str = ""  # text held back: it may be the start of a stop string
    used_at: float = 0.0
    admitted: int = 0  # admission order, for chunked prefill first come first served


def runs(seqs: set[int]) -> int:
    """How many runs of consecutive ids `seqs` make: how many passes over the weights llama.cpp makes for one step
    of chats in those sequences. With a KV stream per sequence, llama.cpp cuts each `llama_decode` into micro-batches
    of consecutive sequence ids (llama_batch_allocr::split_equal with `sequential`), so four chats in sequences 0, 1, 6
    and 7 cost two passes a step. Measured 2026-12-01 on 2 cores, Phi-3.5-mini shape Q4_K_M, four chats of 64 tokens
    (4 interleaved rounds): in sequences 1-4, 13.8 tokens/s; in two or three runs (0, 1, 4, 7 or 0, 3, 4, 7), where
    the empty-or-least-recently-used choice alone put them, 10.0."""
    return sum(1 for seq in seqs if seq - 1 not in seqs)


def continues(cells: list[int], ids: list[int], shift: bool) -> int:
    """How much of the prompt `ids` these cells give if they hold this very chat (its last turn, the same prompt
    again, or, with `shift`, its history with the oldest turns dropped); 0 if they hold another chat's."""
    keep = common_prefix(cells, ids)
    if keep in (len(cells), len(ids)):
        return keep
    cut = dropped_span(cells, ids, keep, SHIFT_MIN_TOKENS) if shift else None
    return keep + len(cells) - cut if cut else 0


def choose_slot(slots: list[Slot], ids: list[int], shift: bool) -> tuple[Slot, int]:
    """The slot a new chat takes (one must be free), and how much of its prompt that slot's cells continue (0: none).

    A chat's next turn continues the cells it left, and an answer asked for again (a retry, the same request) takes
    the cells its prompt already has: nothing of anyone else's is lost, and the prompt's last token is computed as it
    was the first time (so a fixed seed gives the same answer). Any other chat takes an empty slot, or else one whose
    chat has ended; among those first one that keeps the running chats' ids consecutive (see runs()), then the least
    recently used."""
    idle = [s for s in slots if s.request is None]
    continuing = {s.seq: n for s in idle if s.cells and (n := continues(s.cells, ids, shift))}
    if continuing:
        slot = max(idle, key=lambda s: continuing.get(s.seq, 0))
        return slot, continuing[slot.seq]
    running = {s.seq for s in slots if s.request is not None}
    return min(idle, key=lambda s: (bool(s.cells), runs(running | {s.seq}), s.used_at)), 0


def plan_step(slots: list[Slot], n_batch: int, prefill_chunk: int) -> list[tuple[Slot, list[int], bool]]:
    """The next llama_decode: (slot, its tokens, whether the last one's logits are wanted), in sequence order.

    Every answering chat's next token goes in; while any chat answers, prompts go in chunks of at most
    `prefill_chunk` tokens in all (a long prompt never freezes the others for more than a chunk), first come first
    served; with nobody answering, as much as a batch holds. Sequence order because llama.cpp splits a step into one
    pass over the weights per run of consecutive sequence ids, taken in the batch's order (see runs())."""
    plan = [(s, [s.next_token], True) for s in slots if s.request is not None and s.next_token is not None]
    budget = min(prefill_chunk, n_batch - len(plan)) if plan else n_batch
    for slot in sorted((s for s in slots if s.request is not None and s.todo), key=lambda s: s.admitted):
        if budget <= 0:
            break
        chunk = slot.todo[:budget]
        budget -= len(chunk)
        plan.append((slot, chunk, len(chunk) == len(slot.todo) and slot.request.max_tokens > 0))
    return sorted(plan, key=lambda entry: entry[0].seq)
