"""Tiny models for the tests, built offline in seconds.

`build_tiny_phi3(dest)` writes an HF folder shaped like Phi-3.5-mini-instruct in every way the build cares about:
`Phi3ForCausalLM` with fused qkv_proj/gate_up_proj and LongRoPE factors, random weights, hidden and intermediate
sizes multiples of 256 (K-quants need it), a sentencepiece BPE tokenizer trained on the oasst sample with byte
fallback, Phi-3.5's special tokens and their flags (rstrip on the chat tokens, as in Phi-3.5's tokenizer.json, which
is what llama.cpp's Phi-3 rules mirror), and Phi-3.5-mini-instruct's exact chat template (TRL's copy, so TRL's
assistant-only-loss twin applies to it as it does to the real model).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

# Phi-3.5-mini-instruct's added tokens, in id order from 32000 (here: from the end of the sentencepiece vocab).
# (content, rstrip). llama.cpp (src/llama-vocab.cpp, "phi3" branch) sets rstrip on all of them but <|endoftext|>.
PHI3_ADDED_TOKENS = [
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
]
SAMPLE = Path(__file__).resolve().parent / "data" / "oasst1-sample" / "train.jsonl"
SP_VOCAB = 1000
VOCAB_SIZE = 1024  # padded like Phi-3.5's 32064: the converter fills the gap with [PAD] tokens


def phi35_chat_template() -> str:
    """Phi-3.5-mini-instruct's chat template, as TRL 1.16 stores it for identity comparison."""
    import trl.chat_template_utils as ctu

    return ctu.phi3_5_chat_template


def oasst_texts(sample_jsonl: Path) -> list[str]:
    with open(sample_jsonl, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_sentencepiece(texts: list[str], dest: Path) -> Path:
    """A Llama-style sentencepiece BPE model (byte fallback, <unk>/<s>/</s> at 0/1/2, dummy prefix)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=SP_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    path = dest / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def phi3_tokenizer(sp_model: Path):
    """A transformers tokenizer laid out like Phi-3.5's tokenizer.json: BPE + byte fallback, the legacy
    Prepend("▁")/Replace(" ", "▁") normalizer (applied to each text segment between special tokens), added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(sp_model)).extract(BPE)
    tok = Tokenizer(BPE(extracted["vocab"], extracted["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>")])
    tok.add_tokens([AddedToken("</s>", special=False, normalized=False, rstrip=True)])
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, rstrip=rstrip) for t, rstrip in PHI3_ADDED_TOKENS]
    )
    assert tok.token_to_id("<|endoftext|>") == SP_VOCAB and tok.token_to_id("<|user|>") == SP_VOCAB + 10
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        add_bos_token=False,  # Phi-3.5's template adds no <s>; nor does its tokenizer
        add_eos_token=False,
        padding_side="left",
        model_max_length=131072,
    )


def write_phi3_tokenizer(dest: Path, sample_jsonl: Path = SAMPLE) -> Path:
    """Write the tiny Phi-3.5-style tokenizer into the folder `dest`: tokenizer.model (sentencepiece, which the
    llama.cpp converter reads for Phi-3), tokenizer.json, tokenizer_config.json (tokenizer_class LlamaTokenizer, as
    Phi-3.5 declares) and chat_template.jinja (Phi-3.5-mini-instruct's). Returns `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = phi3_tokenizer(train_sentencepiece(oasst_texts(sample_jsonl), dest))
    tokenizer.chat_template = phi35_chat_template()
    tokenizer.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "LlamaTokenizer"  # the converter's Phi-3 vocab code reads this key
    # As in Phi-3.5-mini-instruct's own tokenizer_config.json (transformers 5 does not write them): the converter
    # turns them into tokenizer.ggml.add_bos_token / add_eos_token.
    cfg["add_bos_token"], cfg["add_eos_token"] = False, False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def build_tiny_phi3(dest: Path, sample_jsonl: Path = SAMPLE, seed: int = 0) -> Path:
    """Write the tiny Phi-3 HF folder to `dest` (replaced if present). Returns `dest`."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    hidden, heads = 256, 4
    rope_dims = hidden // heads
    config = Phi3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,  # multiples of 256: every K-quant applies without fallback
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={
            "rope_type": "longrope",
            "long_factor": [1.0 + i / rope_dims for i in range(rope_dims // 2)],
            "short_factor": [1.0] * (rope_dims // 2),
            "rope_theta": 10000.0,
        },
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=SP_VOCAB,  # <|endoftext|>, like 32000
        pad_token_id=SP_VOCAB,
        sliding_window=262144,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = [SP_VOCAB + 7, SP_VOCAB + 1, SP_VOCAB]  # <|end|>, <|assistant|>, eot
    model.save_pretrained(dest)
    write_phi3_tokenizer(dest, sample_jsonl)
    return dest
