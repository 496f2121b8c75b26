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


def test_a_merge_that_does_not_fit_in_host_ram_is_refused_with_the_sizes(tiny_phi3_hf):
    """Parameters counted from the config alone (meta device): 4.3 bytes each, against the RAM available."""
    from conftest import tiny_recipe
    from oasstbuild import preflight
    from oasstbuild.common import BuildError
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tiny_phi3_hf)
    params = preflight.base_parameters(recipe)
    assert params == AutoModelForCausalLM.from_pretrained(tiny_phi3_hf).num_parameters()
    needed = int(params * preflight.MERGE_BYTES_PER_PARAM)
    with pytest.raises(BuildError) as e:
        preflight.check_merge_memory(recipe, ["merge"], available_bytes=needed - 1)
    line = str(e.value)
    assert f"the merge stage needs about {needed / 2**20:.1f} MB of host RAM" in line
    assert f"{params / 1e6:.1f}M parameters of the base {tiny_phi3_hf}" in line
    assert "a machine with more RAM" in line and "--stages merge," in line
    preflight.check_merge_memory(recipe, ["merge"], available_bytes=needed)  # just fits
    preflight.check_merge_memory(recipe, ["data", "train"], available_bytes=1)  # no merge here: no limit
    preflight.check_merge_memory(recipe, ["merge"])  # this machine's MemAvailable: a tiny model fits


def test_a_base_too_large_for_this_machines_ram_stops_the_merge_before_anything_runs(tmp_path):
    """Through the CLI: a local base of 140B parameters (its config alone: nothing is loaded) needs about 560 GB to
    merge, more than this machine (or any CI runner) has."""
    from transformers import Phi3Config

    huge = tmp_path / "huge-base"
    Phi3Config(hidden_size=32768, intermediate_size=131072, num_hidden_layers=8, num_attention_heads=256,
               num_key_value_heads=256, vocab_size=32064).save_pretrained(huge)
    out = tmp_path / "out"
    line = one_error_line(run_build("--model_name_or_path", huge, "--stages", "merge", "--output-dir", out))
    assert "the merge stage needs about 558.8 GB of host RAM for the 139.5" in line, line
    assert built(out) == []


def test_training_on_cuda_needs_a_c_compiler_and_python_headers_for_triton(tmp_path, monkeypatch):
    """Asked as on a CUDA machine (cuda=True): a PATH without compilers is refused in one sentence saying what to
    install; this machine's PATH (gcc, Python.h) passes."""
    from oasstbuild import preflight
    from oasstbuild.common import BuildError

    monkeypatch.delenv("CC", raising=False)
    preflight.check_build_tools(["data", "train"], cuda=True)  # this machine has both
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BuildError, match=r"needs a C compiler \(no gcc or clang on PATH\)") as e:
        preflight.check_build_tools(["data", "train"], cuda=True)
    assert "apt-get install build-essential python3." in str(e.value) and "Python's C headers" not in str(e.value)
    monkeypatch.setenv("CC", "no-such-cc -m64")
    with pytest.raises(BuildError, match=r"\$CC=no-such-cc -m64 is not found"):
        preflight.check_build_tools(["train"], cuda=True)
    preflight.check_build_tools(["train"], cuda=False)  # CPU training runs no Triton kernel
    preflight.check_build_tools(["merge", "export"], cuda=True)  # no training, no Triton
