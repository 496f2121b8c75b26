"""The preflight: what would fail after a download or hours of training fails first, in one sentence, with nothing
downloaded. Run as a newcomer would run the default recipe: `python build/run.py`, on this machine (no GPU, no Hub)."""

from __future__ import annotations

import pytest
from conftest import run_build
from helpers import one_error_line

DEFAULT_BASE = "microsoft/Phi-3.5-mini-instruct"


def no_hub_env(tmp_path, offline: bool = True) -> dict:
    """An empty Hugging Face home (nothing cached, no stored token) and no HF_TOKEN."""
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "1" if offline else "0"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf-home" / "datasets")
    return env


def downloaded(tmp_path) -> list[str]:
    home = tmp_path / "hf-home"
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def built(out) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_default_recipe_without_cuda_stops_before_any_download(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    out = tmp_path / "out"
    # Online as far as the build knows (HF_HUB_OFFLINE=0): the GPU check must come before any Hub request.
    env = {**no_hub_env(tmp_path, offline=False), "HF_ENDPOINT": "http://127.0.0.1:9"}
    line = one_error_line(run_build("--output-dir", out, env=env))
    version = torch.__version__.split("+")[0]
    assert f"torch {torch.__version__}" in line and "require_cuda: true" in line
    assert f"pip install torch=={version} --index-url https://download.pytorch.org/whl/cu126" in line
    assert "--require_cuda false" in line
    assert downloaded(tmp_path) == [] and built(out) == [], "nothing may be downloaded or built"


def test_offline_without_the_base_says_which_and_what_to_set(tmp_path):
    out = tmp_path / "out"
    line = one_error_line(run_build("--require_cuda", "false", "--output-dir", out, env=no_hub_env(tmp_path)))
    assert f"base model {DEFAULT_BASE} is not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE is set" in line and "--model_name_or_path PATH" in line
    assert downloaded(tmp_path) == [] and built(out) == []


def test_offline_without_the_dataset_says_which_and_what_to_set(tmp_path):
    local_base = tmp_path / "a-local-base"  # only its existence is checked before the dataset
    local_base.mkdir()
    out = tmp_path / "out"
    args = ["--require_cuda", "false", "--model_name_or_path", local_base, "--output-dir", out]
    line = one_error_line(run_build(*args, env=no_hub_env(tmp_path)))
    assert "dataset OpenAssistant/oasst1 is not in the Hugging Face cache" in line and "--dataset PATH" in line
    assert built(out) == []


def test_unreachable_hub_is_one_sentence_not_a_traceback(tmp_path):
    """Online mode, but the Hub cannot be reached (a closed port stands in for no network): fails fast."""
    env = {**no_hub_env(tmp_path, offline=False), "HF_ENDPOINT": "http://127.0.0.1:9"}
    line = one_error_line(run_build("--require_cuda", "false", "--output-dir", tmp_path / "out", env=env))
    assert f"cannot reach the Hugging Face Hub for base model {DEFAULT_BASE}" in line
    assert "--model_name_or_path PATH" in line


def test_a_missing_local_base_folder_is_named(tmp_path):
    line = one_error_line(
        run_build("--recipe", "smoke", "--model_name_or_path", tmp_path / "nope", "--output-dir", tmp_path / "out")
    )
    assert "base model folder not found" in line and "nope" in line
