"""Start-up: model files from the Hugging Face cache when the Hub is unreachable, and one clear exit otherwise.

The Hub cannot be reached from here, so the cache is laid out by hand exactly as huggingface_hub writes it
(blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main), and the app's real `hf_hub_download`
call resolves it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from serving import app_server, run_app

REPO = "someone/phi35-oasst1-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def populate_cache(cache: Path, files: dict[str, Path], corrupt: tuple[str, ...] = ()) -> Path:
    """Lay out `files` (name -> source) as huggingface_hub caches a model repo's main branch; the blobs of
    the `corrupt` ones are named for a sha256 their content does not have, like a damaged download."""
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
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
        answer = server.client().predict(
            "Hi", f"{REPO.split('/')[1]}/smol.Q4_1.gguf", "You are a helpful assistant.", 8, 0.7, 0.95, 40, 1.1,
            api_name="/chat",
        )
        assert "tokens/s" in answer


def test_offline_mode_uses_the_cache_too(tmp_path, smollm2_gguf):
    cache = populate_cache(tmp_path / "hub", {"smol.Q4_1.gguf": smollm2_gguf})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MODEL_REPO": REPO, "MODEL_FILES": "smol.Q4_1.gguf"}
    with app_server(tmp_path, env) as server:
        answer = server.client().predict(
            "Hi", f"{REPO.split('/')[1]}/smol.Q4_1.gguf", "", 8, 0.7, 0.95, 40, 1.1, api_name="/chat"
        )
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
        client, name = server.client(), REPO.split("/")[1]
        answer = client.predict("Hi", f"{name}/bad.gguf", "", 8, 0.7, 0.95, 40, 1.1, api_name="/chat")
        assert "bad.gguf is corrupt: its sha256 does not match the Hub's" in answer
        answer = client.predict("Hi", f"{name}/good.gguf", "", 8, 0.7, 0.95, 40, 1.1, api_name="/chat")
        assert "tokens/s" in answer
        # Asking again does not re-hash: the verdict is remembered.
        answer = client.predict("Hi", f"{name}/bad.gguf", "", 8, 0.7, 0.95, 40, 1.1, api_name="/chat")
        assert "is corrupt" in answer
