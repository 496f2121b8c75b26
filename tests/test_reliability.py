"""Many users at once, Stop, disconnects and broken model files, against the real app over HTTP (loopback only)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

import app
from serving import app_server, call_raw
from test_app_server import SYSTEM, body, chat, stats

pytestmark = pytest.mark.slow

SESSIONS, TURNS = 16, 3


@pytest.fixture(scope="module")
def oasst_prompts(oasst_sample):
    """Real first messages of OpenAssistant conversations, short enough to keep the test quick."""
    prompts = []
    with open(oasst_sample) as f:
        for line in f:
            row = json.loads(line)
            if row["parent_id"] is None and row["role"] == "prompter" and 10 < len(row["text"]) < 240:
                prompts.append(row["text"])
    assert len(prompts) >= SESSIONS * TURNS
    return prompts


@pytest.fixture(scope="module")
def smollm2_prompt_counter(smollm2_gguf):
    """Counts a conversation's prompt tokens exactly as the server does, from the conversation alone."""
    from llama_cpp_agent.chat_history.messages import Roles

    tokenize = app.PromptTokenizer(app.Vocab.load(smollm2_gguf))
    formatter = app.make_messages_formatter(app.PROMPT_FORMATS["chatml"])

    def count(history: list[dict], message: str) -> int:
        conversation = [{"role": "system", "content": SYSTEM}, *app.history_messages(history),
                        {"role": "user", "content": message}]
        return len(tokenize(formatter.format_conversation(conversation, Roles.assistant)[0]))

    return count


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "2048", "QUEUE_SIZE": str(SESSIONS)}
    with app_server(tmp_path_factory.mktemp("many"), env) as server:
        yield server


def test_sixteen_concurrent_multi_turn_chats(server, smollm2_gguf, oasst_prompts, smollm2_prompt_counter):
    """Every request is answered, each answer continues its own conversation, and memory stays flat."""
    label = smollm2_gguf.name
    process = psutil.Process(server.process.pid)
    rss = []
    round_done = threading.Barrier(SESSIONS, action=lambda: rss.append(process.memory_info().rss))

    def session(i: int):
        client, history, turns = server.client(), [], []
        for t in range(TURNS):
            message = oasst_prompts[i * TURNS + t]
            answer = chat(client, message, label, max_tokens=12)
            turns.append((list(history), message, answer))
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
            round_done.wait(timeout=600)
        return turns

    with ThreadPoolExecutor(SESSIONS) as pool:
        sessions = list(pool.map(session, range(SESSIONS)))

    for turns in sessions:
        for history, message, answer in turns:
            assert "tokens/s" in answer, f"not answered: {answer!r}"
            # The server built this prompt from this session's history and nothing else: had conversations
            # been mixed up, its token count would be far from the one computed from the session alone. Only the
            # answers may differ by a token or so: the server sends the model's own ids for them, and re-tokenizing
            # an answer does not always give those back.
            answers = len(history) // 2
            assert abs(stats(answer)["prompt"] - smollm2_prompt_counter(history, message)) <= 2 * answers
    assert server.process.poll() is None
    # Flat memory: later rounds add no more than noise over the first (which warmed caches up).
    assert rss[-1] - rss[0] < 64 * 2**20, [r // 2**20 for r in rss]


def test_a_full_line_is_told_plainly_to_retry(tmp_path, smollm2_gguf):
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "1024", "QUEUE_SIZE": "2"}
    with app_server(tmp_path, env) as server:
        def ask(i):
            job = server.client().submit(f"Write a poem about the number {i}.", smollm2_gguf.name, SYSTEM, 48, 0.7,
                                         0.95, 40, 1.1, api_name="/chat")
            return list(job)

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(ask, range(10)))
        finals = [updates[-1] for updates in results]
        busy = [f for f in finals if f.startswith("⚠️ The Space is busy")]
        answered = [f for f in finals if "tokens/s" in f]
        assert len(busy) + len(answered) == len(finals), finals
        assert busy and len(answered) >= 3
        assert "Please try again" in busy[0]
        # Those who waited were shown their place in the line meanwhile.
        assert any(u.startswith("⏳ Waiting for the model") for updates in results for u in updates)
        assert server.process.poll() is None


# SmolLM2 writes 250 tokens and more for this at the tests' settings; "count to 500" often got a 10-token answer.
LONG_ANSWER = "Write a long story about a dragon who learns to read. Make it at least 800 words."


def outcomes(server) -> list[str]:
    """The server's line for each answer, in order: "answered: N tokens generated, ..." or "stopped: N ..."."""
    return [line for line in server.output().splitlines() if line.startswith(("answered:", "stopped:"))]


def outcome_after(server, seen: int, timeout: float = 30) -> str:
    """The server's line for the next answer after the first `seen`, once it is printed."""
    deadline = time.monotonic() + timeout
    while len(lines := outcomes(server)) <= seen:
        assert time.monotonic() < deadline, f"no line for the answer:\n{server.output()[-3000:]}"
        time.sleep(0.05)
    return lines[seen]


def first_token_seconds(server, label, message="Say hi."):
    """Seconds from sending a request to its first streamed piece of answer; returns once the server is done with it."""
    seen = len(outcomes(server))
    start = time.perf_counter()
    job = server.client().submit(message, label, SYSTEM, 8, 0.7, 0.95, 40, 1.1, api_name="/chat")
    for update in job:
        if update and not update.startswith(("⏳", "⚠️")):
            seconds = time.perf_counter() - start
            job.cancel()
            outcome_after(server, seen)
            return seconds
    raise AssertionError("no answer")


def tokens_generated_for_a_client_that_left(server, leave) -> int:
    """Have `leave()` start a long answer and leave it after five updates; returns the tokens the server generated
    for it. leave() returns True when the answer was complete before then: that one is not counted, and another
    is tried (the model may end any answer early)."""
    for _ in range(3):
        seen = len(outcomes(server))
        finished = leave()
        outcome = outcome_after(server, seen)
        if not finished:
            assert outcome.startswith("stopped:"), f"generation went on for a client that had left: {outcome}"
            return int(outcome.split()[1])
    pytest.fail("the model ended three long answers within five updates")


def test_stop_ends_generation_and_frees_the_model(server, smollm2_gguf):
    label = smollm2_gguf.name
    idle = first_token_seconds(server, label)

    def stop_after_five_updates() -> bool:
        job = server.client().submit(LONG_ANSWER, label, SYSTEM, 1000, 0.7, 0.95, 40, 1.1, api_name="/chat")
        for n, update in enumerate(job):
            if "tokens/s" in update:
                return True
            if n == 4:
                job.cancel()
                return False
        return True

    generated = tokens_generated_for_a_client_that_left(server, stop_after_five_updates)
    after_stop = first_token_seconds(server, label)
    assert generated < 200, "generation went on after Stop"
    # Had generation run on to its 1000 tokens, this request would have waited tens of seconds for it.
    assert after_stop < idle + 1.0, (idle, after_stop)


def test_a_client_that_disconnects_mid_stream_frees_the_model(server, smollm2_gguf):
    label = smollm2_gguf.name
    idle = first_token_seconds(server, label)

    def hang_up_after_five_updates() -> bool:
        payload = [LONG_ANSWER, label, SYSTEM, 1000, 0.7, 0.95, 40, 1.1]
        return call_raw(server, json.dumps(payload), read_events=5) is not None  # None: it hung up

    generated = tokens_generated_for_a_client_that_left(server, hang_up_after_five_updates)
    after = first_token_seconds(server, label)
    assert generated < 200, "generation went on for a client that had left"
    assert after < idle + 1.0, (idle, after)


def test_broken_files_get_a_clear_message_and_the_good_model_keeps_serving(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    truncated, fake, good = tmp_path / "truncated.gguf", tmp_path / "notes.gguf", tmp_path / "good.gguf"
    truncated.write_bytes(data[: len(data) // 3])
    fake.write_text("These are my notes, not a model.\n")
    shutil.copyfile(smollm2_gguf, good)
    with app_server(tmp_path, {"MODEL_PATH": f"{truncated},{fake},{good}"}) as server:
        client = server.client()
        reply = chat(client, "Hi", "truncated.gguf", max_tokens=8)
        assert reply.startswith("⚠️ truncated.gguf could not be loaded by llama.cpp")
        reply = chat(client, "Hi", "notes.gguf", max_tokens=8)
        assert reply == "⚠️ notes.gguf is not a GGUF file (no GGUF header)."
        assert "tokens/s" in chat(client, "Hi", "good.gguf", max_tokens=8)
        assert chat(client, "Hi", "truncated.gguf", max_tokens=8).startswith("⚠️ truncated.gguf")
        assert "tokens/s" in chat(client, "Hi again", "good.gguf", max_tokens=8)
        assert server.process.poll() is None
        assert body(reply)
