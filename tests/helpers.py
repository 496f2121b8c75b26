"""Helpers that several test files share, so that no test file imports another.

- Calls to the app's /chat API: `SYSTEM` (the system message the tests send), `DEFAULT_SAMPLING` (temperature, top_p,
  top_k, repeat_penalty: the values tests send when sampling is not what they test),
  `chat` (one whole answer over gradio_client), `stats` and `body` (an answer's stats line, and the answer without
  it), `chatml_ids` (SmolLM2's ChatML prompt built by hand, to count prompts independently of the app), `THINGS`
  (sixteen story subjects, one per visitor).
- In-process models: `load` (a GGUF in the app's ModelStore, as the app loads it).
- Build errors: `one_error_line` (what build/run.py prints for bad input).
- GGUF tokenizer settings: `gguf_add_bos`, `base_adds_bos`.
- The browser (Playwright on Debian's Chromium; the `browser` fixture is in conftest.py): `CHROMIUM`,
  `CHROMIUM_ARGS`, `ARTIFACTS` (where screenshots land), `open_page`, `chat_box`, `send`, `bot_messages`,
  `wait_for_answer`, `shot`.

tests/serving.py starts servers (the app, llama-server); tests/tiny_models.py makes tiny models; conftest.py holds the
fixtures.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from serving import CALL_TIMEOUT, READ_TIMEOUT

# --- the /chat API ----------------------------------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant."
DEFAULT_SAMPLING = (0.7, 0.95, 40, 1.1)  # temperature, top_p, top_k, repeat_penalty
STATS = re.compile(r"<sub>(\d+) tokens · ([\d.]+) tokens/s · prompt (\d+) of (\d+) tokens evaluated</sub>$")
THINGS = ["a dragon", "a lighthouse", "a robot", "a garden", "a violin", "a comet", "a library", "a bakery",
          "a glacier", "a ferry", "a clock", "a kite", "a desert", "a harbour", "a forest", "a market"]


def chat(client, message, model, max_tokens=48, temperature=0.7, top_p=0.95, top_k=40, repeat_penalty=1.1,
         system=SYSTEM):
    job = client.submit(message, model, system, max_tokens, temperature, top_p, top_k, repeat_penalty,
                        api_name="/chat")
    return job.result(timeout=CALL_TIMEOUT)


def chatml_ids(llm, system: str, turns: list[tuple[str, str]], message: str) -> list[int]:
    """The ChatML prompt SmolLM2 was trained on, built here by hand: template markup as control tokens, every
    message's text tokenized as plain text. llama.cpp tokenizes the text between two control tokens as one piece,
    so a message shares its piece with the role name before it."""
    def ids(text: str, special: bool) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=special)

    out = ids("<|im_start|>", True) + ids(f"system\n{system}", False)
    for role, text in [*turns, ("user", message)]:
        out += ids("<|im_end|>\n<|im_start|>", True) + ids(f"{role}\n{text}", False)
    return out + ids("<|im_end|>\n<|im_start|>", True) + ids("assistant\n", False)


def stats(answer: str) -> dict:
    match = STATS.search(answer)
    assert match, f"no stats line in {answer!r}"
    generated, speed, evaluated, prompt = match.groups()
    return {"generated": int(generated), "speed": float(speed), "evaluated": int(evaluated), "prompt": int(prompt)}


def body(answer: str) -> str:
    return STATS.sub("", answer).strip()


# --- in-process models ------------------------------------------------------------------------------------------------


def load(path, prompt_format="auto", n_ctx=2048):
    """A GGUF in the app's ModelStore under the label "model": (store, its EngineSettings)."""
    from ggufchat.engine import EngineSettings
    from ggufchat.files import ModelSpec
    from ggufchat.local import ModelStore

    settings = EngineSettings(n_ctx=n_ctx, parallel=1, n_threads=1, n_threads_batch=1, n_batch=256)
    spec = ModelSpec("model", str(path), prompt_format=prompt_format)
    return ModelStore([spec], {"model": path}, settings, queue_size=4, seed=0), settings


# --- the build --------------------------------------------------------------------------------------------------------


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def gguf_add_bos(gguf) -> bool:
    """The GGUF's tokenizer.ggml.add_bos_token; a file without the key fails (llama.cpp would then add <s>)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        meta = dict(llm.metadata)
    finally:
        llm.close()
    assert "tokenizer.ggml.add_bos_token" in meta, f"{gguf.name} has no tokenizer.ggml.add_bos_token"
    return {"true": True, "false": False}[meta["tokenizer.ggml.add_bos_token"]]


def base_adds_bos(base_dir) -> bool:
    """What the base's own tokenizer does with plain text: puts BOS first or not."""
    from oasstbuild.basemodel import adds_bos
    from transformers import AutoTokenizer

    return adds_bos(AutoTokenizer.from_pretrained(base_dir))


# --- the browser ------------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "browser"
# As the probe found: without the background-networking flags Chromium keeps dialling a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def open_page(browser, url, width=1200, height=900):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    chat_box(page).wait_for()
    return page


def chat_box(page):
    # The chat's textbox comes first in the page; its placeholder goes once the chat has begun.
    return page.locator("textarea[data-testid=textbox]").first


def send(page, text):
    box = chat_box(page)
    box.fill(text)
    box.press("Enter")


def bot_messages(page):
    return page.get_by_test_id("bot")


def wait_for_answer(page, count, timeout=READ_TIMEOUT * 1000):
    """Wait until the count-th answer carries its stats line; returns its text."""
    page.wait_for_function(
        "n => { const m = document.querySelectorAll('[data-testid=bot]');"
        " return m.length >= n && m[n - 1].innerText.includes('tokens/s'); }",
        arg=count,
        timeout=timeout,
    )
    return bot_messages(page).nth(count - 1).inner_text()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
