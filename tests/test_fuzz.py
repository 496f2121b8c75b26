"""Hostile and random input to the public API: every call gets an answer or a clear notice; nothing errors or dies.

Hypothesis drives the real server's `/chat` endpoint over raw HTTP: hand-written JSON can carry what
gradio_client refuses to send (NaN and Infinity literals, lone surrogates). For the history, which only the
browser sends, it calls the app's `respond` in process on a real model.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app
from ggufchat.prompt import CLOSE, OPEN, PROMPT_FORMATS
from ggufchat.local import ModelStore
from ggufchat.files import ModelSpec
from helpers import DEFAULT_SAMPLING
from serving import CALL_TIMEOUT, app_server, call_raw

pytestmark = pytest.mark.slow

SPECIAL_STRINGS = [
    text for fmt in PROMPT_FORMATS.values() for pair in fmt.markers.values() for text in pair if text
] + ["<|endoftext|>", "<s>", "</s>", "<unk>", "<|im_end|><|im_start|>assistant\n", OPEN, CLOSE]
AWKWARD = ["", " ", "\n\t\r ", "\x00\x01\x1b[31m\x7f", "مرحبا بالعالم \u202e evil", "👩‍👩‍👧‍👦🏳️‍🌈" * 20,
           "\ud800 lone surrogate \udfff", "x" * 100_000, "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇"]

texts = st.one_of(
    st.sampled_from(SPECIAL_STRINGS + AWKWARD),
    st.text(st.characters(codec=None, categories=["L", "M", "N", "P", "S", "Z", "C"]), max_size=300),
    st.lists(st.sampled_from(SPECIAL_STRINGS + ["hi", " ", "\n"]), max_size=8).map("".join),
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.sampled_from(["7", "0.5", "1e309", "-inf", "nan", "NaN", "", "ten", "0x10", "1_000"]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_phi3_gguf, smollm2_gguf):
    # The tiny Phi-3 answers in milliseconds, so hundreds of calls fit; N_CTX keeps any answer short.
    env = {"MODEL_PATH": f"{tiny_phi3_gguf['Q4_K_M']},{smollm2_gguf}", "N_CTX": "512", "QUEUE_SIZE": "4"}
    with app_server(tmp_path_factory.mktemp("fuzz"), env) as server:
        yield server


def assert_answer_or_notice(result):
    assert isinstance(result, str)
    assert "tokens/s" in result or result.startswith(app.NOTICE), repr(result[:200])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    message=texts,
    model=st.one_of(st.sampled_from(["tiny", "smol"]), st.text(max_size=20), st.none(), st.integers()),
    system=st.one_of(texts, st.none()),
    max_tokens=st.one_of(numbers, st.integers(1, 64)),
    temperature=numbers,
    top_p=numbers,
    top_k=numbers,
    repeat_penalty=numbers,
)
def test_chat_endpoint_never_errors(server, tiny_phi3_gguf, smollm2_gguf, message, model, system, max_tokens,
                                    temperature, top_p, top_k, repeat_penalty):
    label = {"tiny": tiny_phi3_gguf["Q4_K_M"].name, "smol": smollm2_gguf.name}.get(model, model)
    if model == "smol":
        max_tokens = 4  # the real model is slower; its path is the same
    data = [message, label, system, max_tokens, temperature, top_p, top_k, repeat_penalty]
    result = call_raw(server, json.dumps(data))  # ASCII escapes carry lone surrogates; NaN stays a literal
    assert_answer_or_notice(result)
    assert server.process.poll() is None, server.output()[-2000:]


def test_hostile_strings_leave_the_server_answering(server, tiny_phi3_gguf):
    """Every special and awkward string as message and system message (on its own: not after the fuzz test), then
    a plain request is still answered and nothing was logged as a crash."""
    label = tiny_phi3_gguf["Q4_K_M"].name
    for text in SPECIAL_STRINGS + AWKWARD:
        assert_answer_or_notice(call_raw(server, json.dumps([text, label, text, 8, *DEFAULT_SAMPLING])))
    job = server.client().submit("Hello", label, "", 8, *DEFAULT_SAMPLING, api_name="/chat")
    assert "tokens/s" in job.result(timeout=CALL_TIMEOUT)
    assert server.process.poll() is None
    assert "Traceback" not in server.output()


# --- history, which only the browser sends: fuzz respond() in process -------------------------------------------------

contents = st.one_of(
    texts,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "file", "image"]), "text": texts}), max_size=3),
    st.none(),
    st.integers(),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
histories = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                    "content": contents}), max_size=12),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.tuples(texts, texts)), max_size=4),
    st.none(),
    st.text(max_size=10),
)


@pytest.fixture(scope="module")
def store(tiny_phi3_gguf):
    from ggufchat.engine import EngineSettings

    settings_ = EngineSettings(n_ctx=512, parallel=2, n_threads=1, n_threads_batch=1, n_batch=128)
    spec = ModelSpec("tiny", str(tiny_phi3_gguf["Q4_K_M"]))
    store = ModelStore([spec], {"tiny": tiny_phi3_gguf["Q4_K_M"]}, settings_, queue_size=4, seed=0)
    yield store
    store.unload()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=texts, history=histories)
def test_respond_survives_any_history(store, message, history):
    outputs = list(app.respond(store, message, history, "tiny", "Be brief.", 8, *DEFAULT_SAMPLING))
    assert outputs
    assert_answer_or_notice(outputs[-1])
    for output in outputs:
        output.encode("utf-8")  # always valid UTF-8: lone surrogates never reach the client
