"""What a visitor sees while the Space reads a long prompt, and the saved chats a restart must not lose: the real
app over HTTP, and a real browser (Debian's Chromium through Playwright) across a restart of the app."""

from __future__ import annotations

import json
import re

import pytest

import app
from pathlib import Path
from helpers import chat_box, send, shot, wait_for_answer
from serving import app_server, free_port, stream_answer

pytestmark = pytest.mark.slow
DEFAULTS = [app.LIMITS[name][2] for name in ("temperature", "top_p", "top_k", "repeat_penalty")]
PROGRESS = re.compile(r"^⏳ Reading the conversation: (\d+)% of (\d+) tokens(?: · about (\d+) s left)?$")


def test_a_long_prompt_shows_how_far_it_is_read_then_the_answer_replaces_it(tmp_path, smollm2_gguf):
    """About 1,500 tokens take several seconds to read on one thread: the stream says how far it is, about once a
    second, and the answer replaces it. The API sees the same status lines (they start with ⏳, as the waiting line's
    do); the last output is the answer alone."""
    rows = [json.loads(line) for line in open(Path(__file__).parent / "data" / "oasst1-sample" / "train.jsonl")]
    long_message = "Summarise these notes:\n" + "\n".join(r["text"] for r in rows[:40])[:6500]
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "4096", "PARALLEL": "1", "SEED": "1"}
    with app_server(tmp_path, env) as server:
        outputs = list(stream_answer(server, [long_message, [], Path(smollm2_gguf).name, app.SYSTEM_MESSAGE, 8,
                                              *DEFAULTS]))
        read = [int(m[1]) for m in map(PROGRESS.match, outputs) if m]
        assert len(set(read)) >= 2, outputs[:5]  # progress moved while the prompt was read
        assert read == sorted(read) and all(0 <= p < 100 for p in read)
        assert any(m[3] for m in map(PROGRESS.match, outputs) if m)  # an estimate of the time left, once measured
        total = int(PROGRESS.match(next(o for o in outputs if PROGRESS.match(o)))[2])
        answer = outputs[-1]
        assert not answer.startswith("⏳") and f"prompt {total} of " in answer, answer  # the stats line: what was read
        first_text = next(i for i, o in enumerate(outputs) if not o.startswith("⏳"))
        assert all(not o.startswith("⏳") for o in outputs[first_text:])  # once the answer starts, it stays


def test_a_short_prompt_shows_no_progress(tmp_path, smollm2_gguf):
    with app_server(tmp_path, {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "1024"}) as server:
        outputs = list(stream_answer(server, ["Hi!", [], Path(smollm2_gguf).name, app.SYSTEM_MESSAGE, 8,
                                              *DEFAULTS]))
        assert outputs and not any(o.startswith("⏳") for o in outputs), outputs


def saved_chat(page):
    """The entry of the chat below in the list of saved chats (a Dataset table beside the chat)."""
    return page.locator(".table", has_text="Name a colour of the sky.").first


def test_saved_chats_survive_a_restart_of_the_space(tmp_path, smollm2_gguf, browser):
    """Gradio encrypts the chats it saves in the browser with a key it draws per process; the app's key stays, so a
    chat saved before a restart (every rebuild, every sleep of a Space) is listed and continued after it."""
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "1024", "SEED": "3", "GRADIO_SERVER_PORT": str(free_port())}
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with app_server(tmp_path / "first", env) as server:
        page = context.new_page()
        page.goto(server.url)
        chat_box(page).wait_for()
        send(page, "Name a colour of the sky.")
        wait_for_answer(page, 1)
        saved_chat(page).wait_for()  # listed beside the chat: saved (in a round trip after the answer)
    with app_server(tmp_path / "second", env) as server:  # the same Space, restarted (same address)
        page.reload()
        chat_box(page).wait_for()
        saved = saved_chat(page)
        saved.wait_for(timeout=30_000)  # still listed: the new process reads what the old one saved
        shot(page, "08-saved-chat-after-restart")
        saved.click()
        page.get_by_test_id("bot").first.wait_for()
        send(page, "And at night?")
        second = wait_for_answer(page, 2)
        assert re.search(r"\d+ tokens · [\d.]+ tokens/s", second)
        assert page.get_by_test_id("user").count() == 2
    context.close()
