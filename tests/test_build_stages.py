"""Single stages and hooks: the converter's source (pip-fetched sdist, or a checkout), random-init bases."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY_RECIPE, tiny_recipe
from oasstbuild import export


@pytest.mark.slow
def test_converter_is_fetched_with_pip_and_cached(tmp_path, monkeypatch):
    """An empty cache: `pip download` of the installed llama-cpp-python's sdist, then only the converter is kept."""
    monkeypatch.setenv("PHI35_OASST1_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe("unused")
    conv = export.converter_dir(recipe)
    version = export.runtime_version()
    assert conv == tmp_path / "cache" / f"llama.cpp-{version}"
    assert (
        (conv / "convert_hf_to_gguf.py").is_file() and (conv / "conversion").is_dir() and (conv / "gguf-py").is_dir()
    )
    assert not (conv / "src").exists(), "the C++ sources are not kept"
    assert (tmp_path / "cache" / f"llama_cpp_python-{version}.tar.gz").is_file()
    stamp = (conv / ".complete").stat().st_mtime_ns
    assert export.converter_dir(recipe) == conv and (conv / ".complete").stat().st_mtime_ns == stamp  # cached


def test_llama_cpp_dir_is_used_as_given(tiny_phi3_hf, tiny_phi3_gguf, tmp_path):
    checkout = export.converter_dir(tiny_recipe(tiny_phi3_hf))  # any directory holding convert_hf_to_gguf.py
    recipe = tiny_recipe(tiny_phi3_hf, gguf_name="Phi-3.5-tiny-test", llama_cpp_dir=str(checkout))
    result, (f16,) = export.run(recipe, tiny_phi3_hf, tmp_path / "gguf")
    assert result["converter"] == str(checkout)
    assert f16.read_bytes() == tiny_phi3_gguf["F16"].read_bytes()


def test_random_init_builds_the_base_from_its_config(tiny_phi3_hf, tmp_path, capsys):
    import run
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = ["--recipe", str(TINY_RECIPE), "--model_name_or_path", "unused-hub-id", "--config_name_or_path",
            str(tiny_phi3_hf), "--random_init", "--stages", "data", "--output-dir", str(out)]
    rc = run.main(argv)
    assert rc == 0, capsys.readouterr().err
    base = out / "base"
    for name in ("config.json", "tokenizer.model", "tokenizer.json", "model.safetensors"):
        assert (base / name).is_file(), name
    assert json.loads((base / "config.json").read_text())["hidden_size"] == 256
    ours, theirs = load_file(base / "model.safetensors"), load_file(tiny_phi3_hf / "model.safetensors")
    key = "model.layers.0.self_attn.qkv_proj.weight"
    assert ours[key].shape == theirs[key].shape and ours[key].dtype == torch.bfloat16
    assert not torch.allclose(ours[key].float(), theirs[key].float())
    # cached: a second run does not rebuild it
    mtime = os.stat(base / "model.safetensors").st_mtime_ns
    assert run.main(argv) == 0
    assert os.stat(base / "model.safetensors").st_mtime_ns == mtime
