"""What a visitor of the Space gets beyond the chat itself: the page says what is served, the model is loaded (and
the system prompt read) before the first visitor arrives, and Like/Dislike lands in a CSV with the conversation and
the settings, pushed to a Hub dataset when one is set (the Hub's write API is the one stand-in here)."""

from __future__ import annotations

import csv
import json

import pytest

from ggufchat.feedback import Feedback
from helpers import DEFAULT_SAMPLING, SYSTEM, stats
from serving import app_server

pytestmark = pytest.mark.slow


def test_the_first_visitor_pays_neither_the_load_nor_the_system_prompt(tmp_path, smollm2_gguf):
    with app_server(tmp_path, {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "1024"}) as server:
        log = server.output()
        # Loaded and described before the server answered its first HTTP request.
        assert f"loaded {smollm2_gguf.name}" in log
        line = next(ln for ln in log.splitlines() if ln.startswith("serving: "))
        assert all(part in line for part in ("CPU backend", "threads", smollm2_gguf.name, "1024 tokens per chat",
                                             "× 4 parallel chats", "KV cache"))
        answer = server.client().predict("Hi", smollm2_gguf.name, "You are a helpful assistant.", 8, *DEFAULT_SAMPLING,
                                         api_name="/chat")
        first = stats(answer)
        # Only the message and the template around it were evaluated: the system prompt was read at start-up.
        assert first["evaluated"] < first["prompt"] - 5
        assert server.output().count(f"loaded {smollm2_gguf.name}") == 1


def test_the_page_says_what_is_served_and_offers_the_chat_features(tmp_path, smollm2_gguf, tiny_phi3_gguf):
    import urllib.request

    env = {"MODEL_PATH": f"{smollm2_gguf},{tiny_phi3_gguf['Q4_K_M']}", "N_CTX": "1024"}
    with app_server(tmp_path, env) as server:
        config = json.loads(urllib.request.urlopen(server.url + "config", timeout=30).read())
    props = [c.get("props", {}) for c in config["components"]]
    info = next(p["value"] for p in props if isinstance(p.get("value"), str) and "prompt format" in p["value"])
    # The first entry: its GGUF's own name, the file, the quant, how it is prompted, the context.
    assert smollm2_gguf.name in info and "Q4_1" in info and "`chatml`" in info and "context 1024 tokens" in info
    chatbot = next(c["props"] for c in config["components"] if c.get("type") == "chatbot")
    assert set(chatbot["buttons"]) >= {"copy", "copy_all", "share"}
    assert {d["left"] for d in chatbot["latex_delimiters"]} >= {"$", "$$", "\\("}
    assert chatbot["feedback_options"] == ["Like", "Dislike"]
    assert chatbot["editable"] == "user"  # edit a message, and the answer is generated again from there
    # Chats kept in the browser: ChatInterface's save_history stores them in a BrowserState (local storage).
    assert any(c.get("type") == "browserstate" for c in config["components"])


def test_feedback_rows_hold_the_conversation_and_settings_and_go_to_the_hub(tmp_path):
    pushed = []

    class HubWriteApi:  # stands in for HfApi's write calls, which cannot reach the Hub offline
        def create_repo(self, repo_id, **kwargs):
            from types import SimpleNamespace

            pushed.append(("create_repo", repo_id, kwargs.get("repo_type")))
            return SimpleNamespace(repo_id=repo_id)

        def run_as_future(self, fn, *args, **kwargs):
            from concurrent.futures import Future

            future = Future()
            future.set_result(fn(*args, **kwargs))
            return future

        def create_commit(self, repo_id, operations, **kwargs):
            pushed.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations)))

    feedback = Feedback(tmp_path / "fb", repo="me/space-feedback", hf_api=HubWriteApi(), every_minutes=60)
    history = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
               {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "7"}]
    settings = {"model": "m.gguf", "system": SYSTEM, "max_tokens": 64, "temperature": 0.7, "top_p": 0.95,
                "top_k": 40, "repeat_penalty": 1.1}
    feedback.record(True, 1, history, settings)
    feedback.record(False, 3, history, settings)
    rows = list(csv.DictReader(open(feedback.path, encoding="utf-8")))
    assert [(r["feedback"], r["answer"]) for r in rows] == [("like", "4"), ("dislike", "7")]
    assert json.loads(rows[1]["conversation"]) == history and json.loads(rows[0]["conversation"]) == history[:2]
    assert rows[1]["temperature"] == "0.7" and rows[1]["model"] == "m.gguf"
    feedback.scheduler.trigger().result()
    assert ("create_repo", "me/space-feedback", "dataset") in pushed
    assert ("create_commit", "me/space-feedback", ["feedback.csv"]) in pushed
    feedback.scheduler.stop()


def test_a_feedback_repo_out_of_reach_keeps_feedback_local_and_the_chat_up(tmp_path, smollm2_gguf):
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "512", "FEEDBACK_REPO": "me/space-feedback",
           "FEEDBACK_DIR": str(tmp_path / "fb"), "HF_HUB_OFFLINE": "1"}
    with app_server(tmp_path, env) as server:
        assert "warning: feedback stays in" in server.output() and "FEEDBACK_REPO=me/space-feedback" in server.output()
        answer = server.client().predict("Hi", smollm2_gguf.name, SYSTEM, 4, *DEFAULT_SAMPLING, api_name="/chat")
        assert stats(answer)["generated"] >= 1
    assert (tmp_path / "fb").is_dir()


def test_the_info_line_says_when_a_file_is_this_projects_own_build(tmp_path, smoke_run, smollm2_gguf):
    """The build names its GGUF after the recipe (general.name ...-oasst1...): the page says it was built here."""
    import urllib.request

    q4 = next((smoke_run / "hub").glob("*-Q4_K_M.gguf"))
    for served, ours in ((q4, True), (smollm2_gguf, False)):
        with app_server(tmp_path, {"MODEL_PATH": str(served), "N_CTX": "512"}) as server:
            config = json.loads(urllib.request.urlopen(server.url + "config", timeout=30).read())
        info = next(c["props"]["value"] for c in config["components"]
                    if c.get("type") == "markdown" and "prompt format" in str(c["props"].get("value")))
        assert served.name in info and ("built by this Space's `build/run.py`" in info) == ours, info
