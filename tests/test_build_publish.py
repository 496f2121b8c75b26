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
