"""Publishing: the exact hub/ folder and the Hub calls, a preflight that fails before training, and no token
anywhere. `HfApi` is replaced by tests/conftest.py's FakeHfApi (the suite stands in only for the Hub: its write API
cannot exist offline). Everything else here is the real build."""

from __future__ import annotations

import json
import subprocess

import pytest
import run
from conftest import REPO, linked_copy

pytestmark = pytest.mark.slow
NAME = "SmolLM2-135M-Instruct-oasst1-smoke"


def publish(out, capfd, *extra) -> tuple[int, str]:
    rc = run.main(
        [
            "--recipe",
            "smoke",
            "--output-dir",
            str(out),
            "--stages",
            "publish",
            "--hub_repo",
            "tester/smoke-gguf",
            *extra,
        ]
    )
    captured = capfd.readouterr()
    return rc, captured.out + captured.err


def test_publish_uploads_exactly_hub(smoke_run, tmp_path, fake_hub, monkeypatch, planted_token, capfd):
    monkeypatch.setenv("HF_TOKEN", planted_token)
    out = linked_copy(smoke_run, tmp_path / "out")
    rc, log = publish(out, capfd, "--hub_private")
    assert rc == 0, log
    names = [c[0] for c in fake_hub.calls]
    # preflight (token + write access) first, then create + upload; all with the token from HF_TOKEN
    assert names == ["init", "whoami", "auth_check", "init", "create_repo", "upload_folder"]
    assert fake_hub.tokens == [planted_token, planted_token]
    create = next(c[1] for c in fake_hub.calls if c[0] == "create_repo")
    assert create == {"repo_id": "tester/smoke-gguf", "repo_type": "model", "private": True, "exist_ok": True}
    upload = next(c[1] for c in fake_hub.calls if c[0] == "upload_folder")
    assert upload["folder_path"] == str(out / "hub") and upload["repo_id"] == "tester/smoke-gguf"
    assert sorted(upload["files"]) == sorted(
        ["README.md", "loss_curve.png", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q5_K_M.gguf"]
    )
    assert upload["files"][f"{NAME}-Q4_K_M.gguf"] == (smoke_run / "gguf" / f"{NAME}-Q4_K_M.gguf").stat().st_size
    card = (out / "hub" / "README.md").read_text()
    assert "MODEL_REPO=tester/smoke-gguf" in card and 'repo_id="tester/smoke-gguf"' in card
    report = json.loads((out / "report.json").read_text())["publish"]
    assert report["uploaded"] and report["repo"] == "tester/smoke-gguf"
    scan_for_token(planted_token, [out], extra_text=log)


def test_preflight_failure_stops_before_any_training(tmp_path, fake_hub, monkeypatch, planted_token, capfd):
    monkeypatch.setenv("HF_TOKEN", planted_token)
    fake_hub.valid = False
    out = tmp_path / "out"
    rc = run.main(["--recipe", "smoke", "--output-dir", str(out), "--hub_repo", "tester/smoke-gguf"])
    err = capfd.readouterr().err
    assert rc == 2 and "error: the Hugging Face token was rejected" in err
    # the server's message quoted the token back: it is shown, scrubbed
    assert "Invalid user token '***'" in err and planted_token not in err
    assert not any((out / d).exists() for d in ("base", "data", "adapter"))

    fake_hub.valid, fake_hub.allow_write = True, False
    rc = run.main(["--recipe", "smoke", "--output-dir", str(out), "--hub_repo", "tester/smoke-gguf"])
    assert rc == 2 and "cannot write to namespace 'tester'" in capfd.readouterr().err
    fake_hub.allow_write = True
    rc = run.main(["--recipe", "smoke", "--output-dir", str(out), "--hub_repo", "someone-else/x"])
    assert rc == 2 and "cannot write to namespace 'someone-else'" in capfd.readouterr().err
    assert not any((out / d).exists() for d in ("base", "data", "adapter"))


def test_no_token_is_a_clear_error(tmp_path, fake_hub, monkeypatch, capfd):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    rc = run.main(["--recipe", "smoke", "--output-dir", str(tmp_path / "out"), "--hub_repo", "tester/x"])
    assert rc == 2 and "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capfd.readouterr().err


def test_a_stored_hf_auth_login_token_is_found_and_used(smoke_run, tmp_path, fake_hub, monkeypatch, capfd):
    """No HF_TOKEN, but `hf auth login` ran before: its token file in HF_HOME is what preflight and upload use."""
    import secrets

    import huggingface_hub.constants as constants

    token = "hf_" + secrets.token_hex(17)
    home = tmp_path / "hf-home"
    home.mkdir()
    # What `hf auth login` leaves behind: the active token, and the named token in stored_tokens.
    (home / "token").write_text(token)
    (home / "stored_tokens").write_text(f"[ci]\nhf_token = {token}\n\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    out = linked_copy(smoke_run, tmp_path / "out")
    rc, log = publish(out, capfd)
    assert rc == 0, log
    assert [c[0] for c in fake_hub.calls] == ["init", "whoami", "auth_check", "init", "create_repo", "upload_folder"]
    assert fake_hub.tokens == [token, token]
    scan_for_token(token, [out], extra_text=log)


def scan_for_token(token: str, folders, extra_text: str = "") -> None:
    assert token not in extra_text
    needle = token.encode()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    assert needle not in f.read(), path


def test_the_token_is_nowhere(smoke_run, tiny_phi3_run, planted_token):
    """The smoke and tiny-phi3 builds ran with the planted token in HF_TOKEN: no log, report, card, checkpoint,
    TensorBoard event file or artefact holds it, nor does the repository."""
    scan_for_token(planted_token, [smoke_run, tiny_phi3_run, smoke_run.parent, tiny_phi3_run.parent])
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        path = REPO / rel
        if path.is_file():
            assert planted_token.encode() not in path.read_bytes(), rel


def test_the_card_gives_the_visitors_verdict_from_the_spaces_votes(smoke_run, tmp_path, capfd):
    """votes.csv as the Space writes it (ggufchat.feedback.Feedback.record_vote): the card's sentence is the page's
    tally (one implementation), counted over the rows whose fine-tune is this build's GGUF."""
    from ggufchat.feedback import Feedback
    from ggufchat.votes import read_votes, summary, tally

    feedback = Feedback(tmp_path / "feedback")
    ours, base = f"{NAME}-Q4_K_M.gguf", f"{NAME}-base-Q4_K_M.gguf"
    for vote, winner, outcome in [("A", ours, 1), ("B", ours, 1), ("A", base, -1), ("tie", "tie", 0),
                                  ("both bad", "both bad", 0), ("B", ours, 1)]:
        feedback.record_vote({"pair": vote, "vote": vote, "winner": winner, "outcome": outcome, "finetune": ours,
                              "base": base, "answer_a": "x", "answer_b": "y"})
    feedback.record_vote({"pair": "other", "vote": "A", "winner": "m", "outcome": -1, "finetune": "another.gguf",
                          "base": "m"})  # another pair the Space also served: not this build's
    out = linked_copy(smoke_run, tmp_path / "out")
    rc = run.main(["--recipe", "smoke", "--output-dir", str(out), "--stages", "publish", "--visitor_votes",
                   str(feedback.votes)])
    log = "".join(capfd.readouterr())
    assert rc == 0, log
    card = (out / "hub" / "README.md").read_text()
    expected = summary(tally(read_votes(feedback.votes, ours, base)))
    assert "Visitors preferred the fine-tune in 67% of 6 votes" in expected  # (3 wins + 2 ties / 2) / 6
    assert expected in card and f"`{ours}` against `{base}`" in card
    assert "[publish] 6 visitor votes from" in log


def test_a_votes_source_that_is_neither_a_file_nor_a_dataset_is_one_clear_line(smoke_run, tmp_path, capfd):
    out = linked_copy(smoke_run, tmp_path / "out")
    rc = run.main(["--recipe", "smoke", "--output-dir", str(out), "--stages", "publish", "--visitor_votes",
                   str(tmp_path / "no-votes.csv")])
    log = "".join(capfd.readouterr())
    assert rc != 0
    assert "visitor_votes" in log and "neither a votes.csv file nor a Hub dataset holding one" in log


def test_the_base_gguf_is_published_under_base_when_asked_and_the_card_pairs_them(smoke_run, tmp_path, fake_hub,
                                                                                  monkeypatch, planted_token, capfd):
    monkeypatch.setenv("HF_TOKEN", planted_token)
    out = linked_copy(smoke_run, tmp_path / "out")
    rc, log = publish(out, capfd, "--hub_include_base")
    assert rc == 0, log
    base = f"{NAME}-base-Q4_K_M.gguf"
    assert (out / "hub" / "base" / base).samefile(out / "base-gguf" / base)
    upload = next(c[1] for c in fake_hub.calls if c[0] == "upload_folder")
    assert f"base/{base}" in upload["files"]
    card = (out / "hub" / "README.md").read_text()
    assert f"MODEL_FILES={NAME}-Q4_K_M.gguf,{NAME}-Q5_K_M.gguf,base/{base}" in card
    assert f"ARENA_MODELS=smoke-gguf/{NAME}-Q4_K_M.gguf,smoke-gguf/base/{base}" in card
