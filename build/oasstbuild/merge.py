"""Stage 3, merge: unquantized base + LoRA adapter -> one plain HF model the converter can read.

Merging into the 4-bit base would re-quantize the merged weights (lossy, and NF4 is not what llama.cpp reads), so the
base is reloaded from its 16-bit checkpoint. W + BA is computed in float32 (a bf16 checkpoint upcasts exactly) and
rounded once, to `merge_dtype`, when saved: in bf16 the small BA would mostly vanish into W's rounding, and bf16
arithmetic alone moves logits by more than a broken merge would (measured on SmolLM2-135M: bf16 vs fp32 adapter
model, max |logit diff| 2.4; fp32 merged vs fp32 adapter model, 1e-4). Before saving, merged logits are compared
with the adapter model's on held-out conversations: a wrong scale or a skipped layer fails here, not in a chat.

All of it runs on the CPU, in host memory: an fp32 Phi-3.5-mini is 15 GB, more than a 24 GB card has left beside the
CUDA context, and the merge is a single pass of matrix additions (a minute or two on a CPU). The tokenizer files are
the base's own, copied unchanged (see basemodel.TOKENIZER_FILES).
"""

from __future__ import annotations

import json
from pathlib import Path

from .architectures import get_arch
from .basemodel import copy_tokenizer_files, pin_bos_flag
from .common import BuildError, fresh_dir, log
from .recipe import Recipe

# Max |merged - adapter| logit difference: float32 only reorders sums (1e-4 on SmolLM2-135M, logits up to ~40);
# 100x headroom for deeper models, still far below what a skipped layer or a wrong LoRA scale does.
DEFAULT_ATOL = 1e-2
CHECK_TOKENS = 256  # tokens per sample: enough to cover system, user and assistant turns


def check_samples(tokenizer, eval_jsonl: Path, n: int) -> list:
    import torch

    samples = []
    with open(eval_jsonl, encoding="utf-8") as f:
        for line in f:
            if len(samples) >= n:
                break
            messages = json.loads(line)["messages"]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            samples.append(torch.tensor([ids[:CHECK_TOKENS]]))
    return samples


def run(recipe: Recipe, base: str, adapter_dir: Path, data_dir: Path, merged_dir: Path) -> tuple[dict, list[Path]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On the CPU even when a GPU is there (see the module docstring); never with quantization_config.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu")
    arch = get_arch(model.config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(model, adapter_dir, torch_device="cpu").eval()  # PEFT's default: any GPU

    samples = check_samples(tokenizer, data_dir / "eval.jsonl", recipe.merge_check_samples)
    with torch.no_grad():
        before = [model(ids).logits.float() for ids in samples]
        model = model.merge_and_unload()
        after = [model(ids).logits.float() for ids in samples]
    diff = max((a - b).abs().max().item() for a, b in zip(before, after)) if samples else 0.0
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(before, after))
    total = sum(a.shape[1] for a in before) or 1
    atol = recipe.merge_check_atol or DEFAULT_ATOL
    log(
        f"[merge] merged vs adapter logits on {len(samples)} conversations: max |diff| {diff:.2e} "
        f"(tolerance {atol:g}), greedy tokens agree {agree / total:.1%}"
    )
    if diff > atol:
        raise BuildError(f"merged model's logits differ from the adapter model's by {diff:.3g} > {atol:g}")

    fresh_dir(merged_dir)
    model.to(getattr(torch, recipe.merge_dtype)).save_pretrained(merged_dir)
    tokenizer_files = copy_tokenizer_files(base, merged_dir)
    add_bos = pin_bos_flag(merged_dir, tokenizer)  # only where the base's own file does not say
    for name in arch.required_tokenizer_files:
        if not (merged_dir / name).is_file():
            raise BuildError(f"{arch.model_type}: the converter needs {name}, but the base {base} has none")
    files = sorted(p for p in merged_dir.iterdir() if p.is_file())
    result = {
        "saved_dtype": recipe.merge_dtype,
        "check_samples": len(samples),
        "max_abs_logit_diff": diff,
        "tolerance": atol,
        "greedy_agreement": round(agree / total, 4),
        "tokenizer_files": tokenizer_files,
        "add_bos_token": add_bos,
    }
    return result, files
