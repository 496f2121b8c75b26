"""The Phi-3 path on a tiny Phi-3 (random weights, sentencepiece tokenizer, Phi-3.5's template and special tokens):
train -> merge -> export -> quantize -> evaluate, and llama.cpp tokenizing a chat exactly as transformers does."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RECIPE, run_build
from helpers import base_adds_bos, gguf_add_bos
from tiny_models import phi35_chat_template

CHATS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello there!  How are you?\nI have two questions."},
        {"role": "assistant", "content": " Fine, thanks. Ask away: 1) ... 2) ..."},
        {"role": "user", "content": "Does ünïcode 🤖 survive?\n\n  Indented line."},
    ],
    [{"role": "user", "content": "<|user|> is a token, and so is <|end|>"}],
]


def hf_and_gguf_ids(model_dir, gguf, messages):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    hf = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        return hf, llm.tokenize(text.encode(), add_bos=add_bos, special=True), llm.metadata
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["F16", "Q4_K_M"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_gguf_tokens_equal_hf_tokens(tiny_phi3_hf, tiny_phi3_gguf, kind, chat):
    hf, gguf, meta = hf_and_gguf_ids(tiny_phi3_hf, tiny_phi3_gguf[kind], CHATS[chat])
    assert gguf == hf
    assert meta["general.architecture"] == "phi3" and "Phi-3" in meta["general.name"]


@pytest.mark.slow
def test_tiny_phi3_through_every_stage(tiny_phi3_run):
    out = tiny_phi3_run
    report = json.loads((out / "report.json").read_text())
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert report["train"]["lora_targets"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    # merged: the sentencepiece model the converter needs, and Phi-3.5's own template (not TRL's training twin)
    assert (out / "merged" / "tokenizer.model").is_file()
    assert (out / "merged" / "chat_template.jinja").read_text() == phi35_chat_template()
    assert report["merge"]["max_abs_logit_diff"] <= report["merge"]["tolerance"]
    # every K-quant applies in full: hidden/intermediate sizes are multiples of 256
    assert report["quantize"]["types"]["Q4_K_M"]["fallback_tensors"] == 0
    q4 = out / "gguf" / "Phi-3.5-tiny-oasst1-test-Q4_K_M.gguf"
    for chat in CHATS:
        hf, gguf, meta = hf_and_gguf_ids(out / "merged", q4, chat)
        assert gguf == hf
    assert meta["tokenizer.chat_template"] == (out / "merged" / "chat_template.jinja").read_text()
    assert [q["type"] for q in report["quants"]] == ["F16", "Q4_K_M"]
    assert (out / "hub" / q4.name).is_file()
    # trained as the default recipe would be: through Trainer, in train mode
    assert report["train"]["train_mode"] is True


@pytest.mark.slow
def test_tiny_phi3_gguf_keeps_the_bases_bos_setting(tiny_phi3_run, tiny_phi3_hf):
    """Phi-3.5 adds no BOS (its tokenizer_config.json says add_bos_token: false); every GGUF must say the same."""
    assert base_adds_bos(tiny_phi3_hf) is False
    for gguf in sorted((tiny_phi3_run / "gguf").glob("*.gguf")):
        assert gguf_add_bos(gguf) is False, gguf.name


def test_a_phi3_gguf_name_without_phi3_is_refused_before_training(tiny_phi3_hf, tmp_path):
    proc = run_build(
        "--recipe",
        TINY_RECIPE,
        "--model_name_or_path",
        tiny_phi3_hf,
        "--gguf_name",
        "tiny-oasst1",
        "--output-dir",
        tmp_path,
    )
    assert proc.returncode == 2 and "must contain one of ('phi-3', 'phi3')" in proc.stderr
    assert not (tmp_path / "adapter").exists()
