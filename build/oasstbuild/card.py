"""The model card (hub/README.md): front matter the Hub indexes, the measured table, and how to use the files."""

from __future__ import annotations

from pathlib import Path

from .common import human_bytes
from .recipe import Recipe


def card_dataset(recipe: Recipe) -> str:
    return recipe.card_dataset or ("" if recipe.is_local_dataset else recipe.dataset)


def front_matter(recipe: Recipe, model_type: str) -> dict:
    dataset = card_dataset(recipe)
    meta = {
        "base_model": recipe.card_base_model or recipe.model_name_or_path,
        "datasets": [dataset] if dataset else [],
        "license": recipe.card_license,
        "language": list(recipe.languages) or None,
        "pipeline_tag": "text-generation",
        "tags": ["gguf", "llama-cpp", "qlora", "lora", "sft", "trl", model_type, "oasst1", "conversational"],
    }
    return {k: v for k, v in meta.items() if v}


def _quant_table(quants: list[dict], base: list[dict]) -> str:
    lines = ["| file | type | size | perplexity | decode tokens/s |", "|---|---|---|---|---|"]
    for q in [*quants, *({**b, "type": f"base model, {b['type']}"} for b in base)]:
        tps = q.get("tokens_per_s")
        ppl = q.get("perplexity")
        lines.append(
            f"| `{q['file']}` | {q['type']} | {human_bytes(q['bytes'])} | {f'{ppl:.3f}' if ppl else 'n/a'} | "
            f"{tps if tps is not None else 'n/a'} |"
        )
    return "\n".join(lines)


def _versus_base(report: dict) -> str:
    change = report.get("finetune_vs_base") or {}
    if not change:
        return ""
    q, c = next(iter(change.items())) if "F16" not in change else ("F16", change["F16"])
    verb = "lowered" if c["change"] < 0 else "raised"
    parts = [f"{k}: {v['base']:.3f} -> {v['finetuned']:.3f} ({v['change']:+.1%})" for k, v in change.items()]
    return (
        f"\n\nThe base model, converted and quantized the same way and scored on the same token ids, is in the last "
        f"rows: the fine-tune {verb} held-out perplexity by {abs(c['change']):.1%} at {q} ({'; '.join(parts)})."
    )


def _visitors(report: dict) -> str:
    """The Space's visitors' verdict (blind side-by-side votes), beside the perplexity."""
    v = report.get("visitors")
    if not v:
        return ""
    from ggufchat.votes import summary

    pairs = "; ".join(f"`{f}` against `{b}`" for f, b in v.get("pairs", []))
    return (f"\n\nIn the chat Space's blind side-by-side mode ({pairs}), each pair of answers shown as A and B in a "
            f"random order: {summary(v)}")


def _cell(text: str) -> str:
    """Model text in one markdown table cell: HTML-escaped (it is the model's output, not markup), pipes escaped,
    line breaks kept."""
    import html

    text = "".join(c for c in text.strip() if c == "\n" or c.isprintable()) or "(empty)"  # no control characters
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>")


def _side_by_side(report: dict) -> str:
    sbs = report.get("side_by_side") or {}
    if not sbs.get("answers"):
        return ""
    rows = "\n".join(
        f"| {_cell(a['prompt'])} | {_cell(a['base'])} | {_cell(a['finetuned'])} |" for a in sbs["answers"]
    )
    return f"""

## Base vs fine-tuned

The first user message of {len(sbs["answers"])} held-out conversations, answered by the base model and by the
fine-tune ({sbs["type"]} both, temperature {sbs["temperature"]:g}, seed {sbs["seed"]}, at most {sbs["max_tokens"]}
tokens; the same sampling for both, nothing picked by hand):

| prompt | base model | fine-tuned |
|---|---|---|
{rows}"""


def _judged(report: dict) -> str:
    j = report.get("judged") or {}
    if not j.get("n"):
        return ""
    lo, hi = j["interval"]
    return (
        f"\n\nJudged by `{j['judge_model']}` on {j['n']} held-out prompts, each pair shown in both orders: the "
        f"fine-tune wins {j['win']}, ties {j['tie']}, loses {j['loss']}; win rate (ties count half) "
        f"{j['win_rate']:.2f}, {j['level']:.0%} bootstrap interval {lo:.2f}-{hi:.2f}."
    )


def _comparisons(report: dict) -> str:
    return _side_by_side(report) + _judged(report)


def render(recipe: Recipe, report: dict, files: list[str], images: list[str], model_type: str,
           base_files: list[str] = ()) -> str:
    import yaml

    repo = recipe.hub_repo or f"<namespace>/{recipe.gguf_name}-GGUF"
    data, train, ev = report.get("data", {}), report.get("train", {}), report.get("eval", {})
    default = next((f for f in files if "Q4_K_M" in f), files[0] if files else "")
    base = recipe.card_base_model or recipe.model_name_or_path
    dropped = ", ".join(f"{k} {v}" for k, v in data.get("dropped", {}).items()) or "none"
    lora = ", ".join(train.get("lora_targets", []))
    head = yaml.safe_dump(front_matter(recipe, model_type), sort_keys=False, allow_unicode=True).strip()
    image_md = "\n".join(f"![{Path(i).stem.replace('_', ' ')}]({i})" for i in images)
    f16_note = (
        "" if any("f16" in f for f in files) else " The f16 row is the unquantized export, measured but not uploaded."
    )
    dataset_id = card_dataset(recipe)
    dataset_md = (
        f"[{dataset_id}](https://huggingface.co/datasets/{dataset_id})" if dataset_id else f"`{recipe.dataset}`"
    )
    t = lambda key: f"{train[key]:.3f}" if isinstance(train.get(key), float) else "?"  # noqa: E731
    quant_tag = default.removeprefix(recipe.gguf_name + "-").removesuffix(".gguf")
    quant = "no (16-bit LoRA)"
    if recipe.load_in_4bit:
        quant = recipe.bnb_4bit_quant_type.upper() + (", double quant" if recipe.bnb_4bit_use_double_quant else "")
    served = [default] + [f for f in files if f != default and f.endswith(".gguf")] + list(base_files)
    label = repo.split("/")[-1]  # the Space labels a MODEL_REPO file "<repo name>/<file>"
    arena = (f"\nARENA_MODELS={label}/{default},{label}/{base_files[0]}   # fine-tune against its base, blind"
             if base_files else "")
    base_note = (f" `{base_files[0]}` is the base model, converted and quantized the same way, for the Space's blind "
                 "side-by-side mode." if base_files else "")

    return f"""---
{head}
---

# {recipe.gguf_name} (GGUF)

[{base}](https://huggingface.co/{base}) fine-tuned with QLoRA on multi-turn conversations from {dataset_md}, merged,
converted with llama.cpp and quantized. Built by `python build/run.py --recipe {recipe.name}`.

## Files

Measured on the build machine with llama-cpp-python {report.get("versions", {}).get("llama_cpp_python", "?")}:
perplexity over the assistant tokens of {ev.get("conversations", "?")} held-out conversations (lower is better; every
file scores the same token ids), greedy decode speed with {ev.get("threads", "?")} CPU thread(s).{f16_note}

{_quant_table(report.get("quants", []), report.get("base") or [])}{_versus_base(report)}{_visitors(report)}{_comparisons(report)}

## Training

- Data: {data.get("trees", "?")} conversation trees; from each, the best-ranked reply at every turn
  ({data.get("train", {}).get("threads", "?")} train / {data.get("eval", {}).get("threads", "?")} held-out
  conversations, {data.get("tokens", "?")} tokens). Messages dropped: {dropped}.
- Format: the base model's own chat template; loss on assistant tokens only.
- LoRA r={recipe.lora_r}, alpha={recipe.lora_alpha}, dropout={recipe.lora_dropout} on {lora}; 4-bit base:
  {quant}.
- {train.get("steps", "?")} steps, learning rate {recipe.learning_rate:g} ({recipe.lr_scheduler_type}), max length
  {recipe.max_length}, optimizer {recipe.optim}.
- Train loss {t("first_loss")} -> {t("last_loss")}; held-out loss {t("eval_loss_start")} -> {t("eval_loss")}. The
  weights published are those of step {train.get("best_step", "?")}, the checkpoint with the lowest held-out loss.

{image_md}

## Use

### llama-cpp-python

```python
from llama_cpp import Llama

llm = Llama.from_pretrained(repo_id="{repo}", filename="{default}", n_ctx=4096)
out = llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello! Who are you?"}}])
print(out["choices"][0]["message"]["content"])
```

### llama.cpp

```bash
llama-cli -hf {repo}:{quant_tag} -cnv
llama-server --hf-repo {repo} --hf-file {default} -c 4096
```

### The chat Space

Point the Space at this repo with its environment variables (the first file is served by default):{base_note}

```bash
MODEL_REPO={repo}
MODEL_FILES={",".join(served)}{arena}
```

## Limitations

A small model tuned on crowd-sourced conversations: it can be wrong, outdated or biased, and it was not trained
for safety beyond what the base model and oasst1's moderation provide. Check its answers.
"""
