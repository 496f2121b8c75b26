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
from ggufchat.vocab import Vocab
from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, make_messages_formatter
from helpers import DEFAULT_SAMPLING, SYSTEM, chat, stats
from serving import CALL_TIMEOUT, READ_TIMEOUT, app_server, call_raw

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

    tokenize = PromptTokenizer(Vocab.load(smollm2_gguf))
    formatter = make_messages_formatter(PROMPT_FORMATS["chatml"])

    def count(history: list[dict], message: str) -> int:
        conversation = [{"role": "system", "content": SYSTEM}, *app.history_messages(history),
                        {"role": "user", "content": message}]
        return len(tokenize(formatter.format_conversation(conversation, Roles.assistant)[0]))

    return count


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    # A fixed seed: the same request gets the same answer, so a stopped answer can be compared with the whole one.
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "2048", "QUEUE_SIZE": str(SESSIONS), "SEED": "42"}
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


class Watched:
    """A /chat request whose streamed updates a background thread collects as they come."""

    def __init__(self, server, label: str, message: str, max_tokens: int):
        self.job = server.client().submit(message, label, SYSTEM, max_tokens, *DEFAULT_SAMPLING, api_name="/chat")
        self.updates: list[str] = []
        self.thread = threading.Thread(target=lambda: self.updates.extend(self.job), daemon=True)
        self.thread.start()

    def wait_for(self, predicate, what: str) -> str:
        """The first update for which predicate holds, once it has come."""
        deadline = time.monotonic() + READ_TIMEOUT
        while True:
            for update in list(self.updates):
                if predicate(update):
                    return update
            assert self.thread.is_alive(), f"finished without {what}: {self.updates[-3:]}"
            assert time.monotonic() < deadline, f"no {what} in {READ_TIMEOUT} s: {self.updates[-3:]}"
            time.sleep(0.05)

    def final(self) -> str:
        self.thread.join(CALL_TIMEOUT)
        assert not self.thread.is_alive(), f"no end to {self.updates[-3:]}"
        return self.updates[-1]

    def answered(self) -> bool:
        return any("tokens/s" in u for u in self.updates)


def test_a_full_line_is_told_plainly_to_retry(tmp_path, smollm2_gguf):
    """One chat generating and QUEUE_SIZE=2 waiting, each shown its place: the next one is told to retry. Made
    certain rather than hoped for by load: each request joins only once the one before it is seen in place, and the
    first answer is stopped only after the verdict."""
    # One seat (PARALLEL=1 for the batching engine; one seat is all an app without it has): QUEUE_SIZE waiters beyond it.
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "2048", "QUEUE_SIZE": "2", "PARALLEL": "1"}
    label = smollm2_gguf.name
    with app_server(tmp_path, env) as server:
        for _attempt in range(3):
            holder = Watched(server, label, LONG_ANSWER, 1000)
            holder.wait_for(lambda u: u and not u.startswith(("⏳", "⚠️")), "first piece of the answer")
            waiters = []
            for place in (1, 2):
                waiters.append(Watched(server, label, f"Say hi to number {place}.", 8))
                shown = f"⏳ Waiting for the model: {place} {'chat' if place == 1 else 'chats'} ahead of you."
                waiters[-1].wait_for(lambda u, shown=shown: u == shown, f"place {place}")
            turned_away = Watched(server, label, "Say hi to number 3.", 8).final()
            kept_busy = not holder.answered()  # the holder still generating: the line was full all along
            holder.job.cancel()
            assert all(w.final().endswith("</sub>") for w in waiters), [w.updates[-1] for w in waiters]
            if kept_busy:
                break
        else:
            pytest.fail("three long answers ended before the line could be filled")
        assert turned_away == "⚠️ The Space is busy: 2 chats are already waiting. Please try again in a minute."
        assert server.process.poll() is None


# SmolLM2 writes 250 tokens and more for this at the tests' settings; "count to 500" often got a 10-token answer.
LONG_ANSWER = "Write a long story about a dragon who learns to read. Make it at least 800 words."


def outcomes(server) -> list[str]:
    """The server's line for each answer, in order: "answered: N tokens generated, ..." or "stopped: N ..."."""
    return [line for line in server.output().splitlines() if line.startswith(("answered:", "stopped:"))]


def outcome_after(server, seen: int, timeout: float = READ_TIMEOUT) -> str:
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
    job = server.client().submit(message, label, SYSTEM, 8, *DEFAULT_SAMPLING, api_name="/chat")
    for update in job:
        if update and not update.startswith(("⏳", "⚠️")):
            seconds = time.perf_counter() - start
            job.cancel()
            outcome_after(server, seen)
            return seconds
    raise AssertionError("no answer")


LONG_MAX_TOKENS = 400


@pytest.fixture(scope="module")
def whole_long_answer(server, smollm2_gguf) -> int:
    """Tokens the server generates for LONG_ANSWER when nobody stops it (the server's seed is fixed, so the same
    request makes the same answer): what a Stop that does not stop would cost."""
    seen = len(outcomes(server))
    answer = chat(server.client(), LONG_ANSWER, smollm2_gguf.name, max_tokens=LONG_MAX_TOKENS)
    assert "tokens/s" in answer
    outcome = outcome_after(server, seen)
    assert outcome.startswith("answered:"), outcome
    return int(outcome.split()[1])


def tokens_generated_for_a_client_that_left(server, leave, whole: int) -> int:
    """Have `leave()` start LONG_ANSWER and leave it at its first update; returns the tokens the server generated for
    it. The answer is the same as when nobody leaves, `whole` tokens long: had generation gone on for a client that
    left, all of them would have been generated but the last, which is sampled and never evaluated (and a client
    that left never saw it)."""
    seen = len(outcomes(server))
    finished = leave()
    outcome = outcome_after(server, seen)
    if finished:
        pytest.fail(f"the whole {whole}-token answer came in the first update: nothing was left to stop ({outcome})")
    assert outcome.startswith("stopped:"), f"generation went on for a client that had left: {outcome}"
    return int(outcome.split()[1])


def test_stop_ends_generation_and_frees_the_model(server, smollm2_gguf, whole_long_answer):
    label = smollm2_gguf.name

    def stop_at_the_first_update() -> bool:
        job = server.client().submit(LONG_ANSWER, label, SYSTEM, LONG_MAX_TOKENS, *DEFAULT_SAMPLING,
                                     api_name="/chat")
        for update in job:
            if "tokens/s" in update:
                return True
            job.cancel()
            return False
        return True

    generated = tokens_generated_for_a_client_that_left(server, stop_at_the_first_update, whole_long_answer)
    assert generated < whole_long_answer - 1, f"generation went on after Stop: {generated} of {whole_long_answer}"
    # The model is free: the next request is answered.
    first_token_seconds(server, label)


def test_a_client_that_disconnects_mid_stream_frees_the_model(server, smollm2_gguf, whole_long_answer):
    label = smollm2_gguf.name

    def hang_up_at_the_first_update() -> bool:
        payload = [LONG_ANSWER, label, SYSTEM, LONG_MAX_TOKENS, *DEFAULT_SAMPLING]
        return call_raw(server, json.dumps(payload), read_events=1) is not None  # None: it hung up

    generated = tokens_generated_for_a_client_that_left(server, hang_up_at_the_first_update, whole_long_answer)
    assert generated < whole_long_answer - 1, f"went on for a client that left: {generated} of {whole_long_answer}"
    first_token_seconds(server, label)


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
