"""A visitor never waits for what the Space has already read: long chats past their window, chats that come back
after others took their seat, and the choices behind both.

Real llama.cpp on SmolLM2-135M-Instruct through the app's own path (fit_history -> LlamaCppAgent -> provider ->
engine), with real oasst1 messages. Each scenario also runs with the mechanism off, as the engine did before, to show
the scenario really re-reads there.
"""

from __future__ import annotations

import json
import statistics

import pytest

from pathlib import Path

from ggufchat.engine import Engine, EngineSettings
from ggufchat.files import ModelSpec
from ggufchat.local import ModelStore
from ggufchat.prompt import fit_history, format_prompt
from ggufchat.request import Request, Sampling
from ggufchat.reuse import HostCache, Saved, dropped_span
from ggufchat.turns import Done, answer

SYSTEM = "You are a helpful assistant."
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1}
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)


def oasst_messages(n: int) -> list[str]:
    rows = [json.loads(line) for line in open(Path(__file__).parent / "data" / "oasst1-sample" / "train.jsonl")]
    return [r["text"][:300] for r in rows if r["parent_id"] is None and r["role"] == "prompter"][:n]


def store_for(path, **settings) -> ModelStore:
    engine = EngineSettings(**{"n_ctx": 1024, "parallel": 1, "n_threads": 1, "n_threads_batch": 1, "n_batch": 256,
                               **settings})
    return ModelStore([ModelSpec("m", str(path))], {"m": path}, engine, queue_size=8, seed=0)


def chat_turn(store, past, message, max_tokens=96) -> tuple[list[dict], Done]:
    model = store.get("m")
    *texts, done = answer(model, SYSTEM, past, message, max_tokens, SAMPLING, 0)
    assert isinstance(done, Done)
    text = next((t for t in reversed(texts) if isinstance(t, str)), "")
    return past + [{"role": "user", "content": message}, {"role": "assistant", "content": text}], done


def new_tokens(model, message: str) -> int:
    """The tokens a turn adds besides its history: the message, and the template around it and the last answer."""
    return len(model.tokenize.vocab.tokenize(message)) + 12


# --- pure decisions ----------------------------------------------------------------------------------------------


def test_a_dropped_span_is_found_only_where_the_rest_continues_the_prompt():
    system, t1, t2, t3 = [1, 2, 3], list(range(10, 50)), list(range(50, 90)), list(range(90, 130))
    cells = system + t1 + t2 + t3
    assert dropped_span(cells, system + t2 + t3 + [7, 8], 3, 32) == 3 + len(t1)  # the oldest turn went
    assert dropped_span(cells, system + t3 + [7], 3, 32) == 3 + len(t1) + len(t2)  # two went
    assert dropped_span(cells, system + t3 + [7], 3, 41) is None  # too little would be kept
    assert dropped_span(cells, system + t2 + [5] + t3, 3, 32) is None  # the rest does not continue it: never reused
    assert dropped_span(cells, system, 3, 1) is None


def test_the_host_cache_keeps_the_newest_within_its_budget_and_drops_what_an_entry_extends():
    cache = HostCache(budget=100)
    cache.put(Saved((1, 2, 3), "a", 40))
    cache.put(Saved((1, 2, 3, 4, 5), "b", 50))  # the same chat a turn later: the earlier entry goes
    assert list(cache.entries) == [(1, 2, 3, 4, 5)] and cache.used == 50
    cache.put(Saved((9, 9), "c", 30))
    cache.put(Saved((8, 8, 8), "d", 30))  # over budget: the least recently saved goes
    assert list(cache.entries) == [(9, 9), (8, 8, 8)] and cache.used == 60
    saved, length = cache.best([8, 8, 8, 1])
    assert (saved.state, length) == ("d", 3)
    assert cache.best([7])[0] is None
    cache.take(saved)
    assert cache.used == 30 and not cache.fits(101) and not HostCache(0).fits(1)


# --- long chats --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_chats(smollm2_gguf):
    """The same 32-turn chat, 1024-token window, with and without context shift: per turn (new tokens, evaluated,
    prompt tokens, whether history was dropped, whether the prompt still starts with the system message)."""
    results = {}
    for shift in (True, False):
        store = store_for(smollm2_gguf, context_shift=shift)
        model = store.get("m")
        system_ids = model.tokenize(format_prompt(model.formatter, SYSTEM, [], "x")).index(
            model.tokenize.special["<|im_start|>"], 1)
        past, turns = [], []
        try:
            for message in oasst_messages(32):
                kept = fit_history(model.formatter, model.tokenize, SYSTEM, past, message, 96, model.n_ctx)[0]
                first = model.tokenize(format_prompt(model.formatter, SYSTEM, kept, message))[:system_ids]
                dropped = len(kept) < len(past)
                past, done = chat_turn(store, past, message)
                (slot,) = model.engine.slots
                turns.append({"new": new_tokens(model, message), "evaluated": done.evaluated,
                              "prompt": done.prompt_tokens, "dropped": dropped,
                              "system_kept": slot.cells[:system_ids] == first})
            results[shift] = turns
        finally:
            store.unload()
    return results


def test_a_long_chat_past_its_window_reads_only_its_new_tokens(long_chats):
    turns = long_chats[True]
    full = [t for t in turns[turns.index(next(t for t in turns if t["dropped"])):]]
    assert len(full) >= 12, turns  # the window filled early enough to see many turns after it
    assert statistics.median(t["evaluated"] - t["new"] for t in full) <= 0, full
    assert statistics.mean(t["evaluated"] for t in full) <= 2 * statistics.mean(t["new"] for t in full), full
    assert max(t["evaluated"] for t in full) <= 1024 // 2, full
    assert all(t["system_kept"] for t in turns)  # the system message is never dropped


def test_without_context_shift_the_same_chat_reads_its_whole_history_again(long_chats):
    """What the engine did before: the scenario above really makes turns re-read most of the window."""
    full = [t for t in long_chats[False] if t["dropped"]]
    assert full and max(t["evaluated"] for t in full) > 1024 // 2, long_chats[False]


# --- chats that come back after others took their seat -----------------------------------------------------------


def rotation(store, chats: int, rounds: int) -> list[list[tuple[int, int]]]:
    """`chats` chats take turns, one message each per round: per round, each chat's (new tokens, evaluated)."""
    messages = oasst_messages(chats * rounds)
    histories = [[] for _ in range(chats)]
    out = []
    for r in range(rounds):
        row = []
        for c in range(chats):
            message = f"(chat {c}) {messages[r * chats + c]}"
            histories[c], done = chat_turn(store, histories[c], message, max_tokens=32)
            row.append((new_tokens(store.get("m"), message), done.evaluated))
        out.append(row)
    return out


@pytest.mark.parametrize("chats", [8, 16])
def test_chats_rotating_over_four_seats_read_only_their_new_messages(smollm2_gguf, chats):
    store = store_for(smollm2_gguf, parallel=4, n_ctx=768, cache_mb=256)
    try:
        rounds = rotation(store, chats, 3)
        engine = store.get("m").engine
        for row in rounds[1:]:  # every chat has been evicted from its seat since its last turn
            assert all(evaluated <= new for new, evaluated in row), rounds
        assert engine.restores >= 2 * chats and engine.saves >= 2 * chats
        assert engine.host.used <= 256 << 20
    finally:
        store.unload()


def test_without_host_ram_rotating_chats_read_their_whole_histories_again(smollm2_gguf):
    store = store_for(smollm2_gguf, parallel=4, n_ctx=768, cache_mb=0)
    try:
        rounds = rotation(store, 8, 2)
        assert all(evaluated > new + 20 for new, evaluated in rounds[1]), rounds
    finally:
        store.unload()


def test_a_restored_chat_gets_exactly_its_own_cells_never_anothers(smollm2_gguf):
    """Two chats whose prompts differ in one token take turns on one seat. Each, back from host RAM, reads only its
    last prompt token and answers exactly (same logits) as when its cells never left its seat."""
    engine = Engine(smollm2_gguf, n_ctx=512, parallel=1, n_threads=1, n_threads_batch=1, cache_mb=64).start()
    try:
        words = engine.vocab.tokenize(" ".join(oasst_messages(12)))
        shared, tail = words[:40], words[40:160]
        a = shared + engine.vocab.tokenize(" yes")[:1] + tail
        b = shared + engine.vocab.tokenize(" no")[:1] + tail
        assert a != b and len(a) == len(b)

        def run(ids) -> Request:
            request = engine.submit(Request(ids, 12, GREEDY, record_logits=True))
            assert request.done.wait(120)
            return request

        run(a)
        kept_a = run(a)  # the same prompt again, its cells never having left: the reference
        run(b)  # takes the seat: a's cells go to host RAM
        kept_b = run(b)
        for ids, kept in [(a, kept_a), (b, kept_b), (a, kept_a)]:
            back = run(ids)  # the other chat's cells go to host RAM, this one's come back
            assert back.stats.evaluated == kept.stats.evaluated == 1
            assert back.text == kept.text
            assert all((x == y).all() for x, y in zip(back.logits, kept.logits))
        assert engine.restores == 3
    finally:
        engine.close()
