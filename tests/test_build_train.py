"""The train stage's loss mask: assistant-only loss must cover exactly the assistant replies and their end token.

Real TRL tokenization (SFTTrainer's own prepared dataset), for both ways a training template is found: TRL's
Phi-3.5 twin (the tiny Phi-3 has Phi-3.5's exact template) and the recipe's own twin for SmolLM2's ChatML.
"""

from __future__ import annotations

import json

import pytest
from conftest import TINY_RECIPE
from oasstbuild import train
from oasstbuild.common import BuildError
from oasstbuild.recipe import load_recipe


def masked_runs(example) -> list[list[int]]:
    runs, cur = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            cur.append(token)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_mask(trainer, data_dir, end: str, final: str, n: int = 6) -> int:
    tok = trainer.processing_class
    conversations = [json.loads(x)["messages"] for x in (data_dir / "train.jsonl").read_text().splitlines()]
    multi_turn = 0
    for example, messages in zip(trainer.train_dataset.select(range(n)), conversations):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        decoded = [tok.decode(run) for run in masked_runs(example)]
        expected = [r + end for r in replies[:-1]] + [replies[-1] + end + final]
        assert decoded == expected
        multi_turn += len(replies) > 1
    return multi_turn


@pytest.mark.slow
def test_smollm2_mask_from_the_recipes_training_template(smoke_run, tmp_path):
    recipe = load_recipe("smoke", {"max_length": 4096})  # no truncation: every reply must be masked whole
    trainer = train.build_trainer(recipe, str(smoke_run / "base"), smoke_run / "data", tmp_path / "ckpt")
    assert check_mask(trainer, smoke_run / "data", "<|im_end|>", "") > 0


def test_phi3_mask_from_trls_own_phi35_twin(tiny_phi3_hf, tmp_path):
    import run

    out = tmp_path / "out"
    assert (
        run.main(
            [
                "--recipe",
                str(TINY_RECIPE),
                "--model_name_or_path",
                str(tiny_phi3_hf),
                "--stages",
                "data",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    recipe = load_recipe(str(TINY_RECIPE), {"model_name_or_path": str(tiny_phi3_hf), "max_length": 4096})
    assert recipe.training_chat_template == ""
    trainer = train.build_trainer(recipe, str(tiny_phi3_hf), out / "data", tmp_path / "ckpt")
    # Phi-3's chat tokens strip the whitespace after them (rstrip), so "<|end|>\n" is the <|end|> token alone.
    assert check_mask(trainer, out / "data", "<|end|>", "<|endoftext|>") > 0


@pytest.mark.slow
def test_a_training_template_that_renders_differently_is_refused(smoke_run, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_run / "base")
    good = (train.template_path(load_recipe("smoke"))).read_text()
    bad = tmp_path / "bad.jinja"
    bad.write_text(good.replace("named SmolLM", "named Bob"))
    recipe = load_recipe("smoke", {"training_chat_template": str(bad)})
    sample = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    with pytest.raises(BuildError, match="renders differently"):
        train.mask_template(recipe, tokenizer, check_on=sample)
    # and without one, a template TRL has no twin for is refused up front, not silently trained on everything
    with pytest.raises(BuildError, match="TRL ships no training twin"):
        train.mask_template(load_recipe("smoke", {"training_chat_template": ""}), tokenizer, check_on=sample)
