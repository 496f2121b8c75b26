"""Several models in memory (ggufchat/local.py ModelStore, MODELS_RAM_MB): side by side while they fit, each with its
own engine on the one llama.cpp thread; beyond the budget, the least recently used idle model is unloaded. Real
llama.cpp on SmolLM2, under two labels (the second a link to the same file: a separate load, a separate engine)."""

from __future__ import annotations

import threading
import time

import pytest

from ggufchat.engine import EngineSettings
from ggufchat.files import ModelSpec
from ggufchat.llama_thread import LLAMA_THREAD
from ggufchat.local import ModelStore
from ggufchat.turns import Done

SETTINGS = EngineSettings(n_ctx=512, parallel=1, n_threads=1, n_threads_batch=1, n_batch=128, cache_mb=8)
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.0}
LONG = "Write a long essay about the history of Rome."  # SmolLM2 with seed 1: 160 tokens and more


@pytest.fixture
def two_models(smollm2_gguf, tmp_path):
    other = tmp_path / "SmolLM2-again.Q4_1.gguf"
    other.symlink_to(smollm2_gguf)
    specs = [ModelSpec("a", str(smollm2_gguf)), ModelSpec("b", str(other))]
    return specs, {"a": smollm2_gguf, "b": other}


def store_for(two_models, models: int) -> ModelStore:
    """A store whose budget holds `models` of the two (they are the same size)."""
    specs, paths = two_models
    store = ModelStore(specs, paths, SETTINGS, queue_size=4, seed=1, verify_sha256=False)
    store.models_bytes = models * store.footprint("a") + (1 << 20)
    return store


def chat(store, label, message, max_tokens, log):
    """One turn in this thread; appends (time, kind, value) for every item the turn yields."""
    for item in store.turn(label, "You are a helpful assistant.", [], message, max_tokens, SAMPLING):
        kind = "text" if isinstance(item, str) else type(item).__name__
        log.append((time.perf_counter(), kind, item))


def run(*turns):
    logs = [[] for _ in turns]
    threads = [threading.Thread(target=chat, args=(*turn, log)) for turn, log in zip(turns, logs)]
    for t in threads:
        t.start()
    return threads, logs


def texts(log):
    return [t for t, kind, _ in log if kind == "text"]


def done(log) -> Done:
    assert log and log[-1][1] == "Done", f"the turn did not end with Done: {log[-3:]}"
    return log[-1][2]


def test_two_models_that_fit_stream_at_the_same_time(two_models):
    store = store_for(two_models, models=2)
    try:
        threads, (log_a, log_b) = run((store, "a", LONG, 96), (store, "b", LONG, 96))
        for t in threads:
            t.join(300)
        assert set(store.loaded) == {"a", "b"}
        assert len([e for e in LLAMA_THREAD.engines if e in {m.engine for m in store.loaded.values()}]) == 2
        a, b = texts(log_a), texts(log_b)
        assert a and b
        # Their streams overlap: each one's first words came before the other's last ones (neither waited).
        assert a[0] < b[-1] and b[0] < a[-1], "one model's chat waited for the other's"
        assert not any(kind == "Waiting" for _, kind, _ in log_a + log_b)
        assert done(log_a).generated > 20 and done(log_b).generated > 20
    finally:
        store.unload()


def test_loading_a_second_model_neither_stops_nor_ends_the_first_models_chat(two_models):
    store = store_for(two_models, models=2)
    try:
        store.get("a")  # loaded, as the Space loads its default model at start-up
        threads, (log_a,) = run((store, "a", LONG, 160))
        while not texts(log_a) and threads[0].is_alive():
            time.sleep(0.01)
        switched_at = time.perf_counter()
        other, (log_b,) = run((store, "b", "Say hello.", 16))  # another visitor picks model b: it loads now
        for t in threads + other:
            t.join(300)
        answer_a = done(log_a)
        assert answer_a.generated > 20, "the first model's chat was cut short"
        assert [kind for _, kind, _ in log_a].count("Done") == 1
        assert done(log_b).generated > 0
        assert list(store.loaded) == ["a", "b"]  # nothing was unloaded: both fit
        gaps = [b - a for a, b in zip(texts(log_a), texts(log_a)[1:]) if b > switched_at]
        print(f"longest pause in model a's stream while model b loaded: {max(gaps, default=0):.2f} s")
    finally:
        store.unload()


def test_a_model_that_does_not_fit_waits_for_the_busy_one_then_replaces_it(two_models):
    store = store_for(two_models, models=1)
    try:
        threads, (log_a,) = run((store, "a", LONG, 96))
        while not texts(log_a) and threads[0].is_alive():
            time.sleep(0.01)
        other, (log_b,) = run((store, "b", "Say hello.", 16))
        for t in threads + other:
            t.join(300)
        kinds_b = [kind for _, kind, _ in log_b]
        assert "Waiting" in kinds_b and kinds_b.index("Waiting") < kinds_b.index("text")
        assert texts(log_b)[0] > texts(log_a)[-1]  # b's first words only after a's last
        assert done(log_a).generated > 20 and done(log_b).generated > 0
        assert list(store.loaded) == ["b"]  # a, idle and least recently used, was unloaded to make room
    finally:
        store.unload()


def test_the_least_recently_used_idle_model_is_the_one_unloaded(two_models, smollm2_gguf, tmp_path):
    specs, paths = two_models
    third = tmp_path / "SmolLM2-third.Q4_1.gguf"
    third.symlink_to(smollm2_gguf)
    store = ModelStore([*specs, ModelSpec("c", str(third))], {**paths, "c": third}, SETTINGS, queue_size=4, seed=1,
                       verify_sha256=False)
    store.models_bytes = 2 * store.footprint("a") + (1 << 20)
    try:
        for label in ("a", "b", "a", "c"):  # b is used less recently than a when c needs room
            chat(store, label, "Say hello.", 4, [])
        assert list(store.loaded) == ["a", "c"]
    finally:
        store.unload()


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_switching_models_many_times_returns_memory_to_where_it_was(two_models):
    """llama-cpp-python users report models not freed on a switch: here every unload frees its file mapping, KV cache
    and host cache, so ten more switches leave the process where two switches left it."""
    store = store_for(two_models, models=1)
    try:
        for label in ("a", "b"):
            chat(store, label, "Say hello.", 8, [])
        before, engines = rss(), len(LLAMA_THREAD.engines)
        for i in range(10):
            chat(store, "ab"[i % 2], "Say hello.", 8, [])
        grown = rss() - before
        print(f"resident memory after 10 more switches: {grown / 2**20:+.1f} MiB (one model: "
              f"{store.footprint('a') / 2**20:.0f} MiB)")
        assert grown < store.footprint("a") / 2, f"{grown / 2**20:.0f} MiB more after 10 switches"
        assert len(LLAMA_THREAD.engines) == engines and len(store.loaded) == 1
    finally:
        store.unload()
