"""The blind side-by-side mode (ggufchat/arena.py, app.py's second tab): a fine-tune and its base answer at once, as A
and B in a random order; a vote is recorded with both answers and names, once; the tally updates. Real models on both
sides: the smoke build's fine-tuned SmolLM2 and the base GGUF its evaluate stage made, served by the real app over
HTTP (gradio_client keeps one visitor's session, as a browser tab does)."""

from __future__ import annotations

import csv
import json

import pytest
from serving import app_server

from ggufchat.votes import read_votes, summary, tally


@pytest.fixture(scope="module")
def pair(smoke_run):
    finetune = next((smoke_run / "hub").glob("*-Q4_K_M.gguf"))
    base = next((smoke_run / "base-gguf").glob("*-base-Q4_K_M.gguf"))  # made by the evaluate stage
    return finetune, base


@pytest.fixture(scope="module")
def arena_server(pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arena")
    finetune, base = pair
    env = {"MODEL_PATH": f"{finetune},{base}", "ARENA_MODELS": f"{finetune.name},{base.name}", "N_CTX": "1024",
           "PARALLEL": "1", "CACHE_RAM_MB": "16", "FEEDBACK_DIR": str(tmp / "feedback"), "SEED": "3"}
    with app_server(tmp, env) as server:
        yield server, tmp / "feedback" / "votes.csv"


def play(client, message="Name three colours."):
    """One message to both models: the last update (chat A, chat B, status); the round's id stays in the session."""
    return client.submit(message, api_name="/arena").result()


def text(message: dict) -> str:
    """A chat message's text (Gradio 6 sends content as a list of parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_two_models_answer_and_a_vote_reveals_them_lands_in_the_csv_and_the_tally(arena_server, pair):
    server, votes_csv = arena_server
    finetune, base = (p.name for p in pair)
    client = server.client()
    chat_a, chat_b, status = play(client)
    assert status.startswith("Which answer is better?"), status
    assert chat_a[-1]["role"] == chat_b[-1]["role"] == "assistant"
    answer_a, answer_b = text(chat_a[-1]), text(chat_b[-1])
    assert answer_a.strip() and answer_b.strip()
    assert finetune not in status and base not in status  # blind until the vote

    status, tally_md, *_ = client.predict("A", api_name="/arena_vote")
    assert "A was **" in status and finetune in status and base in status, status
    rows = read_votes(votes_csv)
    assert len(rows) == 1
    row = rows[0]
    assert (row["vote"], row["finetune"], row["base"]) == ("A", finetune, base)
    assert {row["shown_as_a"], row["shown_as_b"]} == {finetune, base}
    assert row["winner"] == row["shown_as_a"] and row["outcome"] == ("1" if row["winner"] == finetune else "-1")
    assert (row["answer_a"], row["answer_b"]) == (answer_a, answer_b)  # what the visitor saw, in the order shown
    assert json.loads(row["conversation"]) == [{"role": "user", "content": "Name three colours."}]
    assert row["temperature"] == "0.7" and row["max_tokens"] == "512" and row["seed"].isdigit()
    assert tally_md == summary(tally(rows), f"**{finetune}** over **{base}**")
    assert "of 1 votes" in tally_md


def test_the_chat_goes_on_from_the_chosen_answer(arena_server):
    server, _ = arena_server
    client = server.client()
    chat_a, chat_b, _ = play(client)
    _, _, kept_a, kept_b = client.predict("B", api_name="/arena_vote")
    assert [text(m) for m in kept_a] == [text(m) for m in kept_b] == [text(m) for m in chat_b]  # B's answer is kept
    chat_a2, chat_b2, status = play(client, "And three more?")
    assert status.startswith("Which answer is better?")
    assert [text(m) for m in chat_a2[:2]] == [text(m) for m in chat_b2[:2]] == [text(m) for m in chat_b]
    assert text(chat_a2[2]) == "And three more?"


def test_tampered_votes_are_refused_with_a_notice_and_not_recorded(arena_server, pair):
    server, votes_csv = arena_server
    client = server.client()
    before = len(read_votes(votes_csv))
    status, *_ = client.predict("A", api_name="/arena_vote")  # nothing dealt in this session yet
    assert status.startswith("⚠️ There is no answer pair to vote on")
    play(client)
    status, *_ = client.predict("some-other-model.gguf", api_name="/arena_vote")  # a model name is not a vote
    assert status.startswith("⚠️ A vote is one of A, B, tie, both bad")
    status, *_ = client.predict(pair[0].name, api_name="/arena_vote")  # nor is a name from the pair
    assert status.startswith("⚠️ A vote is one of")
    status, *_ = client.predict("tie", api_name="/arena_vote")
    assert "A tie. Starting over." in status
    status, *_ = client.predict("B", api_name="/arena_vote")  # the same pair again
    assert status.startswith("⚠️ This pair was already voted on")
    rows = read_votes(votes_csv)
    assert len(rows) == before + 1 and rows[-1]["vote"] == "tie" and rows[-1]["outcome"] == "0"


def test_bad_input_gets_a_notice_and_a_pair_must_be_voted_on_before_the_next(arena_server):
    server, _ = arena_server
    client = server.client()
    *_, status = play(client, "   ")
    assert status == "⚠️ Please type a message."
    play(client)
    *_, status = play(client, "Another question?")
    assert status.startswith("⚠️ Vote on these answers first")


def test_the_votes_file_is_a_plain_csv_with_a_header(arena_server):
    _, votes_csv = arena_server
    with open(votes_csv, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["time", "pair", "vote", "winner", "outcome", "finetune"]


@pytest.mark.slow
def test_in_the_browser_a_vote_reveals_the_names_and_updates_the_tally(arena_server, pair, browser):
    from helpers import READ_TIMEOUT, open_page, shot

    server, votes_csv = arena_server
    finetune, base = (p.name for p in pair)
    before = len(read_votes(votes_csv))
    page = open_page(browser, server.url)
    page.get_by_role("tab", name="Side by side (blind)").click()
    page.get_by_placeholder("Ask both models…").fill("What is the capital of France?")
    page.get_by_role("button", name="Send", exact=True).click()
    page.get_by_text("Which answer is better?").wait_for(timeout=READ_TIMEOUT * 1000)
    assert page.get_by_text("A was").count() == 0  # which model wrote which stays hidden until the vote
    answers = page.get_by_test_id("bot")
    assert answers.count() == 2 and all(answers.nth(i).inner_text().strip() for i in range(2))
    shot(page, "20-side-by-side-answered")

    page.get_by_role("button", name="B is better").click()
    page.get_by_text("A was").wait_for()
    status = page.get_by_text("A was").inner_text()
    assert finetune in status and base in status and "You preferred B." in status
    rows = read_votes(votes_csv)
    assert len(rows) == before + 1 and rows[-1]["vote"] == "B"
    page.get_by_text(f"of {len(rows)} votes").wait_for()  # the tally counts this vote
    shot(page, "21-side-by-side-voted")
    later = open_page(browser, server.url)  # another visitor, later: the tally is read again, not the start-up one
    later.get_by_role("tab", name="Side by side (blind)").click()
    later.get_by_text(f"of {len(rows)} votes").wait_for()
