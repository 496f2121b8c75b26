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


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch, tmp_path):
    """taskset / cgroup cpusets / Slurm give a process fewer CPUs than the machine has: llama.cpp gets that many."""
    import os

    import llama_cpp
    from oasstbuild import evaluation, quantize

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    recipe = tiny_recipe("unused", n_threads=0, n_threads_batch=0)
    assert evaluation.thread_counts(recipe) == (1, 1)
    assert evaluation.thread_counts(tiny_recipe("unused", n_threads=2, n_threads_batch=0)) == (2, 1)

    seen = []

    def fake_quantize(src, dst, params):  # records what llama.cpp would be told, writes a stand-in file
        seen.append(params._obj.nthread)  # params is ctypes.byref(llama_model_quantize_params)
        open(dst, "wb").close()
        return 0

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fake_quantize)
    quantize.quantize_file(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M")
    assert seen == [1]


def test_merge_runs_on_the_cpu_and_ships_the_bases_tokenizer_files(tiny_phi3_hf, tmp_path, monkeypatch):
    """Merging an fp32 Phi-3.5-mini takes 15 GB: it stays in host memory even where CUDA is available (here a CPU
    torch that claims a GPU: any tensor sent to CUDA fails). The tokenizer files are the base's, byte for byte."""
    import torch
    from oasstbuild import merge
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3_hf, dtype=torch.float32)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    data = tmp_path / "data"
    data.mkdir()
    chat = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}]
    (data / "eval.jsonl").write_text(json.dumps({"messages": chat}) + "\n")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    recipe = tiny_recipe(tiny_phi3_hf)
    result, files = merge.run(recipe, str(tiny_phi3_hf), tmp_path / "adapter", data, tmp_path / "merged")
    assert result["check_samples"] == 1 and result["max_abs_logit_diff"] <= result["tolerance"]
    for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (tiny_phi3_hf / name).read_bytes(), name


def test_not_slow_reaches_no_full_build():
    """`-m "not slow"` is the quick run: no test it keeps may set up the smoke or tiny-phi3 build, whether or not its
    author marked it (pytest's --setup-plan lists every fixture a run would set up, without running anything)."""
    import subprocess
    import sys

    from conftest import FULL_BUILDS, REPO

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "not slow", "--setup-plan", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    plan = proc.stdout
    assert "SETUP    S llama_cpu_backend" in plan  # the plan lists session fixtures like this
    for fixture in FULL_BUILDS:
        assert f"SETUP    S {fixture}" not in plan, fixture
