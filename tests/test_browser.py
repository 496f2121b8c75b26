"""A real browser on the real app: Playwright drives Debian's Chromium (no browser download).

Screenshots land in tests/artifacts/browser/ for a person to look at. The `browser` fixture is in conftest.py, the
page helpers in helpers.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import app
from helpers import bot_messages, open_page, send, shot, wait_for_answer
from serving import CALL_TIMEOUT, READ_TIMEOUT, app_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_gguf, tiny_phi3_gguf):
    env = {"MODEL_PATH": f"{smollm2_gguf},{tiny_phi3_gguf['Q4_K_M']}", "N_CTX": "2048", "SEED": "7"}
    with app_server(tmp_path_factory.mktemp("browser"), env) as server:
        yield server


def answer_text(message: str) -> str:
    """A bot message's text without its stats line (wait_for_answer guarantees the line, not the answer)."""
    return re.sub(r"\d+ tokens · [\d.]+ tokens/s.*$", "", message, flags=re.S).strip()


def wait_until(condition, what: str, timeout: float = READ_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


def test_chat_stop_second_turn_parameters_model_switch_and_clear(server, browser):
    page = open_page(browser, server.url)
    shot(page, "01-empty")

    # 1. An answer streams in: seen growing before it is complete (unless this machine decoded all of it within
    #    a few of the app's update intervals, by the answer's own stats line).
    send(page, "Hi! Name three colours.")
    page.wait_for_function(
        "() => { const m = document.querySelector('[data-testid=bot]'); return m && m.innerText.length > 0; }"
    )
    first_seen = bot_messages(page).first.inner_text()
    first = wait_for_answer(page, 1)
    generated, speed = re.search(r"(\d+) tokens · ([\d.]+) tokens/s", first).groups()
    if int(generated) / float(speed) > 3 * app.STREAM_EVERY:
        assert "tokens/s" not in first_seen and len(first) > len(first_seen), "the answer should have streamed"
    shot(page, "02-first-answer")

    # 2. Stop mid-answer: the text stops growing and never gets its stats line.
    stops = server.output().count("stopped:")
    send(page, "Write a long story about a dragon who learns to read. Make it at least 800 words.")
    page.wait_for_function(
        "() => { const m = document.querySelectorAll('[data-testid=bot]'); return m.length >= 2 && m[1].innerText.length > 20; }"
    )
    page.get_by_test_id("stop-button").click()
    # Over once the server has stopped generating and the page shows the chat idle again (its submit button back).
    wait_until(lambda: server.output().count("stopped:") > stops, "the server's line for the stopped answer")
    page.get_by_test_id("stop-button").wait_for(state="hidden")
    stopped = bot_messages(page).nth(1).inner_text()
    assert "tokens/s" not in stopped
    shot(page, "03-stopped")

    # 3. A second turn is answered after the stop, and the stopped answer did not grow meanwhile.
    send(page, "Thanks. And three animals?")
    third = wait_for_answer(page, 3)
    assert answer_text(third), third
    assert bot_messages(page).nth(1).inner_text() == stopped

    # 4. Max tokens from the parameters panel shortens the answer.
    page.get_by_text("Additional inputs").click()
    max_tokens = page.get_by_label("number input for Max tokens")
    # The panel's sliders mount as it opens, and a value typed during that can be reset: type it again until the
    # slider itself (bound to the value Gradio sends) shows it.
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    for _ in range(5):
        max_tokens.fill("4")
        max_tokens.press("Enter")
        try:
            expect(page.get_by_label("range slider for Max tokens")).to_have_value("4", timeout=5000)
            expect(max_tokens).to_have_value("4", timeout=5000)
            break
        except (AssertionError, PlaywrightError):
            continue
    shot(page, "04-parameters")
    send(page, "Tell me a long story about a dragon.")
    fourth = wait_for_answer(page, 4)
    assert fourth.split("tokens ·")[0].strip().split()[-1] in {"1", "2", "3", "4"}, server.output()[-2000:]

    # 5. Switch the model: the other file is loaded and answers.
    model = page.get_by_label("Model")
    model.click()
    page.get_by_role("option", name=Path(server_model(server, 1)).name).click()
    send(page, "Hello")
    wait_for_answer(page, 5)
    assert f"loaded {Path(server_model(server, 1)).name}" in server.output()
    shot(page, "05-switched-model")

    # 6. Clear the chat.
    page.get_by_label("Clear").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=bot]').length === 0")
    assert page.get_by_test_id("user").count() == 0
    shot(page, "06-cleared")
    page.close()


def server_model(server, index):
    return server.env["MODEL_PATH"].split(",")[index]


def test_phone_width(server, browser):
    page = open_page(browser, server.url, width=390, height=844)
    send(page, "Say hello in French.")
    answer = wait_for_answer(page, 1)
    assert answer_text(answer), answer
    # Nothing wider than the screen: no sideways scrolling on a phone.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, "07-phone")
    page.close()


def test_closing_the_tab_stops_generation(server, browser):
    """README: closing the tab ends generation, like Stop. The server's seed is fixed, so the page's request makes the
    same answer as the same request over the API: had generation gone on, all of it but its last token (sampled,
    never evaluated) would have been generated."""
    story = "Write a long story about a dragon who learns to read. Make it at least 800 words."
    defaults = [app.LIMITS[name][2] for name in ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty")]
    job = server.client().submit(story, Path(server_model(server, 0)).name, app.SYSTEM_MESSAGE, *defaults,
                                 api_name="/chat")
    whole = int(re.search(r"<sub>(\d+) tokens", job.result(timeout=CALL_TIMEOUT))[1])

    stops = server.output().count("stopped:")
    page = open_page(browser, server.url)
    send(page, story)
    page.wait_for_function(
        "() => { const m = document.querySelector('[data-testid=bot]'); return m && m.innerText.length > 20; }"
    )
    assert "tokens/s" not in bot_messages(page).first.inner_text()
    page.close()
    wait_until(lambda: server.output().count("stopped:") > stops, "the server's line for the abandoned answer")
    generated = int(re.findall(r"^stopped: (\d+) tokens", server.output(), re.M)[-1])
    assert generated < whole - 1, f"generation went on after the tab closed: {generated} of {whole} tokens"
