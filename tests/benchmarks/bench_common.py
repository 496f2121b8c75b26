"""What both benchmarks share: Phi-3.5-mini's shape and the tables they print. Imports nothing heavy at import,
so bench_training.py runs on a GPU machine that has no Gradio or llama.cpp."""

from __future__ import annotations

# Phi-3.5-mini-instruct's shape (config.json of microsoft/Phi-3.5-mini-instruct).
PHI35_SHAPE = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    tie_word_embeddings=False, sliding_window=262144,
)


def phi35_config():
    """A transformers config of Phi-3.5-mini's exact shape; LongRoPE factors of 1 (speed does not depend on them)."""
    from transformers import Phi3Config

    return Phi3Config(**PHI35_SHAPE, rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                                   "long_factor": [1.0] * 48})


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
