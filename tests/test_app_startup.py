"""Start-up: model files from the Hugging Face cache when the Hub is unreachable, and one clear exit otherwise.

The Hub cannot be reached from here, so the cache is laid out by hand exactly as huggingface_hub writes it
(blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main), and the app's real `hf_hub_download`
call resolves it.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serving import CALL_TIMEOUT, app_server, run_app
from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, make_messages_formatter
from ggufchat.vocab import Vocab

REPO = "someone/phi35-oasst1-GGUF"
NAME = REPO.split("/")[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_2 = "89abcdef0123456789abcdef0123456789abcdef"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def populate_cache(cache: Path, files: dict[str, Path], corrupt: tuple[str, ...] = (), ref: str = "main",
                   commit: str = COMMIT) -> Path:
    """Lay out `files` (name -> source) as huggingface_hub caches a model repo's `ref` (a branch or tag) at `commit`;
    the blobs of the `corrupt` ones are named for a sha256 their content does not have, like a damaged download.
    Call it again on the same cache for another ref."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        digest = "f" * 64 if name in corrupt else sha256(source)
        blob = repo_dir / "blobs" / digest
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    return cache


def test_serves_from_the_hf_cache_when_the_hub_is_unreachable(tmp_path, smollm2_gguf):
    cache = populate_cache(tmp_path / "hub", {"smol.Q4_1.gguf": smollm2_gguf})
    env = {
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: every Hub request fails at once
        "HF_HUB_ETAG_TIMEOUT": "2",
        "MODEL_REPO": REPO,
        "MODEL_FILES": "smol.Q4_1.gguf",
    }
    with app_server(tmp_path, env) as server:
        answer = ask(server, f"{NAME}/smol.Q4_1.gguf", system="You are a helpful assistant.")
        assert "tokens/s" in answer


def test_offline_mode_uses_the_cache_too(tmp_path, smollm2_gguf):
    cache = populate_cache(tmp_path / "hub", {"smol.Q4_1.gguf": smollm2_gguf})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODEL_REPO": REPO, "MODEL_FILES": "smol.Q4_1.gguf"}
    with app_server(tmp_path, env) as server:
        answer = ask(server, f"{NAME}/smol.Q4_1.gguf")
        assert "tokens/s" in answer


@pytest.mark.parametrize(
    "env, says",
    [
        ({}, "No model file is available"),  # the default catalog, nothing cached, Hub unreachable
        ({"MODEL_REPO": REPO, "MODEL_FILES": "x.gguf"}, "No model file is available"),
        ({"MODEL_PATH": "/nonexistent/model.gguf"}, "No model file is available"),
        ({"MODEL_REPO": REPO}, "MODEL_FILES is empty"),
        ({"N_CTX": "lots"}, "N_CTX='lots' is not a whole number"),
        ({"PROMPT_FORMAT": "alpaca"}, "PROMPT_FORMAT='alpaca' is unknown"),
        ({"KV_CACHE_TYPE": "q4"}, "KV_CACHE_TYPE='q4' is unknown"),
        ({"PARALLEL": "0"}, "PARALLEL=0 must be at least 1"),
    ],
)
def test_nothing_to_serve_exits_with_one_clear_sentence(tmp_path, env, says):
    done = run_app({"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", **env}, cwd=tmp_path)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and says in last_line
    assert "Traceback" not in done.stderr
    if "No model file" in says:
        assert "MODEL_PATH" in last_line


def test_corrupt_download_is_refused_and_the_other_model_keeps_serving(tmp_path, smollm2_gguf):
    files = {"bad.gguf": smollm2_gguf, "good.gguf": smollm2_gguf}
    cache = populate_cache(tmp_path / "hub", files, corrupt=("bad.gguf",))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODEL_REPO": REPO, "MODEL_FILES": "bad.gguf,good.gguf"}
    with app_server(tmp_path, env) as server:
        answer = ask(server, f"{NAME}/bad.gguf")
        # The visitor reads that the model cannot be served; what to do about it is the operator's, in the log.
        assert answer == "⚠️ bad.gguf is damaged and cannot be served now; please choose another model."
        assert "bad.gguf is corrupt: its sha256 does not match the Hub's; delete " in server.output()
        answer = ask(server, f"{NAME}/good.gguf")
        assert "tokens/s" in answer
        # Asking again gets the same notice (the verdict is kept: the file is not loaded).
        answer = ask(server, f"{NAME}/bad.gguf")
        assert "is damaged" in answer


def ask(server, label: str, max_tokens: int = 8, system: str = "", temperature: float = 0.7, top_k: int = 40) -> str:
    job = server.client().submit("Hi", label, system, max_tokens, temperature, 0.95, top_k, 1.1, api_name="/chat")
    return job.result(timeout=CALL_TIMEOUT)


@pytest.mark.parametrize("revision", [None, "v2", COMMIT_2], ids=["default branch", "tag", "commit"])
def test_model_revision_serves_that_revisions_file(tmp_path, smollm2_gguf, revision):
    """main holds a file that is not a model; the tag v2 (commit COMMIT_2) holds SmolLM2 under the same name."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Not a model: main has moved on.\n")
    cache = populate_cache(tmp_path / "hub", {"model.gguf": notes})
    populate_cache(cache, {"model.gguf": smollm2_gguf}, ref="v2", commit=COMMIT_2)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODEL_REPO": REPO, "MODEL_FILES": "model.gguf",
           **({"MODEL_REVISION": revision} if revision else {})}
    with app_server(tmp_path, env) as server:
        answer = ask(server, f"{NAME}/model.gguf")
        if revision is None:
            assert answer == "⚠️ model.gguf is not a GGUF file (no GGUF header)."
        else:
            assert "tokens/s" in answer, answer


def test_verify_sha256_0_skips_the_check(tmp_path, smollm2_gguf):
    """A blob whose sha256 does not match its name, refused by default (test above), is served with VERIFY_SHA256=0."""
    cache = populate_cache(tmp_path / "hub", {"bad.gguf": smollm2_gguf}, corrupt=("bad.gguf",))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODEL_REPO": REPO, "MODEL_FILES": "bad.gguf",
           "VERIFY_SHA256": "0"}
    with app_server(tmp_path, env) as server:
        assert "tokens/s" in ask(server, f"{NAME}/bad.gguf")


class HubReadEndpoint(ThreadingHTTPServer):
    """Stands in for the Hub's read API on loopback (the real one cannot be reached offline), answering what the Hub
    answers to huggingface_hub's metadata request for a file: its commit, sha256 (ETag) and size. Any other request
    gets 404. Records each request's method, path and Authorization header."""

    def __init__(self, files: dict[str, Path]):
        self.requests: list[tuple[str, str, str | None]] = []
        self.files = {name: (sha256(path), path.stat().st_size) for name, path in files.items()}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                endpoint.requests.append((self.command, self.path, self.headers.get("Authorization")))
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith(f"/{REPO}/resolve/") and name in endpoint.files:
                    digest, size = endpoint.files[name]
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Linked-Etag", f'"{digest}"')
                    self.send_header("X-Linked-Size", str(size))
                    self.send_header("Content-Length", str(size))
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self.do_HEAD()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("with_token", [True, False], ids=["HF_TOKEN set", "HF_TOKEN unset"])
def test_hf_token_is_sent_with_downloads_only_when_set(tmp_path, smollm2_gguf, planted_token, with_token):
    files = {"smol.Q4_1.gguf": smollm2_gguf}
    cache = populate_cache(tmp_path / "hub", files)
    hub = HubReadEndpoint(files)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),  # no token stored by `hf auth login`
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "MODEL_REPO": REPO,
        "MODEL_FILES": "smol.Q4_1.gguf",
        **({"HF_TOKEN": planted_token} if with_token else {}),
    }
    try:
        with app_server(tmp_path, env) as server:
            assert "tokens/s" in ask(server, f"{NAME}/smol.Q4_1.gguf")
            assert planted_token not in server.output()
    finally:
        hub.shutdown()
        hub.server_close()
    # The app asked the Hub (here, its stand-in) for the file, with the token or without any. (huggingface_hub also
    # fetches a public list, /api/agent-harnesses, at import: not a download, and not the app's doing.)
    downloads = [auth for _, path, auth in hub.requests if path == f"/{REPO}/resolve/main/smol.Q4_1.gguf"]
    assert downloads, hub.requests
    assert downloads == [f"Bearer {planted_token}" if with_token else None] * len(downloads), [
        auth and auth[:10] for auth in downloads]


@pytest.fixture(scope="module")
def seedless_human_server(tmp_path_factory, smollm2_gguf):
    """SmolLM2 (a ChatML model) prompted in the human format because PROMPT_FORMAT says so; SEED=-1."""
    env = {"MODEL_PATH": str(smollm2_gguf), "PROMPT_FORMAT": "human", "SEED": "-1"}
    with app_server(tmp_path_factory.mktemp("settings"), env) as server:
        yield server


def test_prompt_format_from_the_environment_overrides_the_gguf(seedless_human_server, smollm2_gguf):
    from llama_cpp_agent.chat_history.messages import Roles


    answer = ask(seedless_human_server, smollm2_gguf.name)
    assert f"loaded {smollm2_gguf.name} in" in seedless_human_server.output()
    assert "(prompt format: human)" in seedless_human_server.output()
    # The prompt the server counted is the human format's, not the ChatML of the GGUF's own template.
    tokenize = PromptTokenizer(Vocab.load(smollm2_gguf))
    counts = {}
    for name in ("human", "chatml"):
        formatter = make_messages_formatter(PROMPT_FORMATS[name])
        prompt = formatter.format_conversation([{"role": "system", "content": ""},
                                                {"role": "user", "content": "Hi"}], Roles.assistant)[0]
        counts[name] = len(tokenize(prompt))
    assert counts["human"] != counts["chatml"]
    assert f"of {counts['human']} tokens evaluated</sub>" in answer, (counts, answer[-120:])


def test_seed_minus_one_draws_a_new_seed_per_answer(seedless_human_server, smollm2_gguf):
    """The same hot request twice gives two different answers (with a fixed SEED the same: test_app_server.py)."""
    answers = [ask(seedless_human_server, smollm2_gguf.name, max_tokens=24, temperature=1.5, top_k=0)
               for _ in range(2)]
    bodies = [a.split("\n\n<sub>")[0] for a in answers]
    assert all("tokens/s" in a for a in answers) and bodies[0] != bodies[1], bodies
