"""The Space's chat features in a real browser (Playwright driving Debian's Chromium): Markdown and LaTeX render,
Like writes a feedback row with the conversation and settings, an edited message is answered again from the cache,
and past chats are kept in the browser. Screenshots land in tests/artifacts/browser/."""

from __future__ import annotations

import csv
import re

import pytest

from helpers import bot_messages, open_page, send, shot, wait_for_answer
from serving import app_server

pytestmark = pytest.mark.slow
LONG_SYSTEM = ("You are a helpful assistant for visitors of a chat demo. Answer briefly and kindly, in plain "
               "English, and say so when you are not sure.")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf):
    root = tmp_path_factory.mktemp("space")
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "2048", "SEED": "7", "FEEDBACK_DIR": str(root / "feedback")}
    with app_server(root, env) as server:
        server.feedback = root / "feedback" / "feedback.csv"
        yield server


def test_markdown_latex_like_edit_and_saved_chats(server, browser):
    page = open_page(browser, server.url)
    # A system message long enough that a new prompt starting with it copies it from the cache rather than reading it
    # again (ggufchat.engine.COPY_MIN_TOKENS): the edit below shows that reuse.
    page.get_by_text("Additional inputs").click()
    page.get_by_label("System message").fill(LONG_SYSTEM)
    # 1. A message with a code block and formulas in three notations: rendered, not shown as source.
    send(page, "Explain this code:\n```python\nprint(2 ** 10)\n```\nand the formulas $e^{i\\pi}+1=0$ and \\(a^2+b^2=c^2\\).")
    wait_for_answer(page, 1)
    user = page.get_by_test_id("user").first
    assert user.locator("pre code").count() == 1
    assert user.locator(".katex").count() >= 2
    shot(page, "08-markdown-latex")

    # 2. Like the answer: one CSV row with the conversation and the settings it was made with.
    page.get_by_test_id("bot").first.hover()
    page.get_by_label("Like", exact=True).first.click()
    page.wait_for_function("() => true")
    for _ in range(50):
        if server.feedback.exists() and server.feedback.read_text().count("\n") >= 2:
            break
        page.wait_for_timeout(100)
    (row,) = csv.DictReader(open(server.feedback, encoding="utf-8"))
    assert row["feedback"] == "like" and row["model"] and row["max_tokens"] and "print(2 ** 10)" in row["conversation"]
    shot(page, "09-liked")

    # 3. Edit the message: answered again; the part of the prompt that did not change comes from the cache.
    before = bot_messages(page).first.inner_text()
    page.get_by_test_id("user").first.hover()
    page.get_by_label("Edit", exact=True).first.click()
    editor = page.locator("textarea:not([data-testid=textbox])").first  # the message, now editable in place
    editor.fill("Say hello in French.")
    page.get_by_label("Submit", exact=True).first.click()
    page.wait_for_function("old => { const m = document.querySelectorAll('[data-testid=bot]');"
                           " return m.length === 1 && m[0].innerText.includes('tokens/s') && m[0].innerText !== old; }",
                           arg=before, timeout=60_000)
    assert "print" not in page.get_by_test_id("user").first.inner_text()
    answer = bot_messages(page).first.inner_text()
    stats = re.search(r"prompt (\d+) of (\d+) tokens evaluated", answer)
    assert stats, answer
    assert int(stats[1]) < int(stats[2])  # the system message was reused: copied from the first prompt's cells
    shot(page, "10-edited")

    # 4. Retry: the answer is generated again with the sliders as they are now, the prompt still from the cache.
    page.get_by_test_id("bot").first.hover()
    page.get_by_label("Retry", exact=True).first.click()
    page.wait_for_function("old => { const m = document.querySelectorAll('[data-testid=bot]');"
                           " return m.length === 1 && m[0].innerText.includes('tokens/s') && m[0].innerText !== old; }",
                           arg=answer, timeout=60_000)
    again = re.search(r"prompt (\d+) of (\d+) tokens evaluated", bot_messages(page).first.inner_text())
    assert int(again[2]) == int(stats[2]) and int(again[1]) <= 1  # the same prompt, all of it but one token reused
    shot(page, "11-retried")

    # 5. Past chats are kept in the browser: a new chat, and the previous one is listed to go back to.
    page.get_by_role("button", name=re.compile("New chat", re.I)).first.click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=bot]').length === 0")
    assert page.get_by_text("Say hello in French").count() >= 1  # the saved chat's title in the side panel
    shot(page, "12-saved-chats")
    page.close()


def test_on_a_phone_a_visitor_sends_stops_and_reads_without_scrolling_sideways(server, browser):
    page = open_page(browser, server.url, width=390, height=844)
    send(page, "Write a long story about a dragon who learns to read. Make it at least 800 words.")
    page.wait_for_function("() => { const m = document.querySelector('[data-testid=bot]');"
                           " return m && m.innerText.length > 40; }", timeout=60_000)
    page.get_by_test_id("stop-button").click()
    page.get_by_test_id("stop-button").wait_for(state="hidden")
    answer = bot_messages(page).first.inner_text()
    assert len(answer) > 40 and "tokens/s" not in answer  # stopped before its end, and readable
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "13-phone-stopped")
    page.close()
