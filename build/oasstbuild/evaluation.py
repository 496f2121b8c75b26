"""Stage 6, evaluate: every GGUF (f16 and each quant) in llama-cpp-python, on this machine.

For each file: does it load, its size, perplexity on held-out conversations (assistant tokens only, the tokens the
model was trained to produce), decode tokens/s, and one greedy sample answer. All files see the same token ids, so
their perplexities compare directly: a quant's cost is its distance from f16.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

from .common import BuildError, human_bytes, log, usable_cpus
from .recipe import Recipe


def load_conversations(eval_jsonl: Path, n: int) -> list[list[dict]]:
    with open(eval_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line)["messages"] for line in f if line.strip()]
    return rows[:n] if n > 0 else rows


def score_inputs(
    tokenizer, template: str, conversations: list[list[dict]], n_ctx: int
) -> list[tuple[list[int], list[int]]]:
    """(token ids, assistant mask) per conversation, cut to the context."""
    out = []
    for messages in conversations:
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=template
        )
        ids, mask = enc["input_ids"][:n_ctx], enc["assistant_masks"][:n_ctx]
        if sum(mask[1:]):
            out.append((ids, mask))
    return out


def nll_sum(logits, ids: list[int], mask: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of the assistant tokens; the logits at position p predict token p + 1."""
    import numpy as np

    positions = np.array([p for p in range(len(ids) - 1) if mask[p + 1]])
    rows = np.asarray(logits[positions], dtype=np.float64)
    top = rows.max(axis=1)
    logz = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    targets = np.asarray(ids)[positions + 1]
    return float((logz - rows[np.arange(len(positions)), targets]).sum()), len(positions)


def perplexity(llm, inputs: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """exp(mean NLL) over assistant tokens, with llama.cpp's logits."""
    total, count = 0.0, 0
    for ids, mask in inputs:
        llm.reset()
        llm.eval(ids)
        nll, n = nll_sum(llm.scores[: len(ids)], ids, mask)
        total, count = total + nll, count + n
    return math.exp(total / count), count


def sample_answer(llm, prompt_ids: list[int], max_tokens: int) -> dict:
    """Greedy answer; tokens/s counts decode only (first token to last), prompt time separately."""
    t0 = time.perf_counter()
    stamps, pieces = [], []
    for chunk in llm.create_completion(prompt_ids, max_tokens=max_tokens, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
        pieces.append(chunk["choices"][0]["text"])
    n = len(stamps)
    decode_s = stamps[-1] - stamps[0] if n > 1 else 0.0
    return {
        "text": "".join(pieces).strip(),
        "tokens": n,
        "prompt_s": round(stamps[0] - t0, 3) if stamps else None,
        "tokens_per_s": round((n - 1) / decode_s, 1) if decode_s > 0 else None,
    }


@functools.cache
def cpu_backend() -> None:
    """Register the CPU variant the Space would pick on this machine (proven to run here by a probe in a child
    process, so a variant whose instructions trap cannot kill the build), and say which, once."""
    from ggufchat.cpu_backend import load_cpu_backend
    from ggufchat.errors import ConfigError

    try:
        log(f"[evaluate] llama.cpp CPU backend: {load_cpu_backend()}")
    except ConfigError as err:
        raise BuildError(str(err)) from None


def first_prompts(conversations: list[list[dict]], n: int) -> list[str]:
    """The opening user message of the first n held-out conversations (the prompts the side-by-side answers)."""
    prompts = []
    for messages in conversations:
        user = next((m["content"] for m in messages if m["role"] == "user"), None)
        if user and user not in prompts:
            prompts.append(user)
        if len(prompts) == n:
            break
    return prompts


def sampled_answers(path: Path, prompt_ids: list[list[int]], recipe: Recipe, threads: int, batch_threads: int):
    """One sampled answer per prompt: the recipe's temperature, llama.cpp's default top-k/top-p, and the same seed
    for every prompt and every model, so that the base and the fine-tune are compared under identical sampling."""
    from llama_cpp import Llama

    cpu_backend()
    llm = Llama(
        model_path=str(path),
        n_ctx=recipe.eval_ctx,
        n_threads=threads,
        n_threads_batch=batch_threads,
        seed=recipe.compare_seed,
        verbose=False,
    )
    try:
        answers = []
        for ids in prompt_ids:
            llm.reset()
            out = llm.create_completion(
                ids,
                max_tokens=recipe.compare_max_tokens,
                temperature=recipe.compare_temperature,
                seed=recipe.compare_seed,
            )
            answers.append(out["choices"][0]["text"].strip())
        return answers
    finally:
        llm.close()


def compare_answers(
    recipe: Recipe, tokenizer, conversations, finetuned: Path, base: Path, quant_type: str, threads, batch_threads
) -> dict:
    """Base and fine-tuned answers to held-out first prompts (side by side), and the judged comparison if the
    recipe names a judge."""
    n = max(recipe.compare_prompts, recipe.judge_prompts if recipe.judge_model else 0)
    prompts, ids = [], []
    for prompt in first_prompts(conversations, len(conversations)):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if len(enc) + recipe.compare_max_tokens <= recipe.eval_ctx:  # room to answer in the evaluation context
            prompts.append(prompt)
            ids.append(enc)
        if len(prompts) == n:
            break
    log(f"[evaluate] base and fine-tune ({quant_type}) answer {len(prompts)} held-out prompts (same sampling)")
    ours = sampled_answers(finetuned, ids, recipe, threads, batch_threads)
    theirs = sampled_answers(base, ids, recipe, threads, batch_threads)
    k = recipe.compare_prompts
    result = {
        "side_by_side": {
            "type": quant_type,
            "temperature": recipe.compare_temperature,
            "seed": recipe.compare_seed,
            "max_tokens": recipe.compare_max_tokens,
            "answers": [{"prompt": p, "base": b, "finetuned": f} for p, b, f in zip(prompts[:k], theirs, ours)],
        }
    }
    if recipe.judge_model:
        from .judge import judge

        judged = judge(recipe.judge_model, prompts, theirs, ours, seed=recipe.compare_seed)
        log(
            f"[evaluate] judged by {recipe.judge_model} on {judged['n']} prompts: fine-tune win {judged['win']} / "
            f"tie {judged['tie']} / loss {judged['loss']}, win rate {judged['win_rate']} "
            f"({judged['level']:.0%} interval {judged['interval']})"
        )
        result["judged"] = judged
    return result


def thread_counts(recipe: Recipe) -> tuple[int, int]:
    """(generation threads, prompt-processing threads): the recipe's, or every CPU this process may use. Under
    run.py's OMP_WAIT_POLICY=PASSIVE a busy core no longer stalls the others; decode of a very small model is then
    faster on one thread (see the smoke recipe)."""
    cpus = usable_cpus()
    return recipe.n_threads or cpus, recipe.n_threads_batch or cpus


def evaluate_file(path: Path, inputs, prompt_ids: list[int], recipe: Recipe, threads: int, batch_threads: int) -> dict:
    from llama_cpp import Llama

    cpu_backend()
    t0 = time.perf_counter()
    # logits_all keeps every position's logits (n_ctx x vocab floats): needed for perplexity, not for generation.
    scorer = Llama(
        model_path=str(path),
        n_ctx=recipe.eval_ctx,
        n_batch=512,
        logits_all=True,
        n_threads=batch_threads,
        n_threads_batch=batch_threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    try:
        ppl, scored = perplexity(scorer, inputs)
    finally:
        scorer.close()
    gen = Llama(
        model_path=str(path), n_ctx=recipe.eval_ctx, n_threads=threads, n_threads_batch=batch_threads, verbose=False
    )
    try:
        sample = sample_answer(gen, prompt_ids, recipe.sample_max_tokens)
    finally:
        gen.close()
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "load_s": round(load_s, 2),
        "perplexity": round(ppl, 4),
        "tokens_scored": scored,
        "tokens_per_s": sample["tokens_per_s"],
        "prompt_s": sample["prompt_s"],
        "sample": sample["text"],
    }


def base_folder(base: str) -> Path:
    """The base model as a local HF folder: itself, or its snapshot in the Hugging Face cache (the data, train and
    merge stages have downloaded it)."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (a run that started at this stage): fetch it
        return Path(snapshot_download(base))


def base_ggufs(recipe: Recipe, base: str, gguf_dir: Path) -> list[tuple[str, Path]]:
    """The base model through the same export and quantize code as the fine-tune: f16 and the first quant type,
    named `<gguf_name>-base-*.gguf`. Rebuilt only when the base or the converter changed."""
    import dataclasses

    from . import export, quantize
    from .common import fingerprint, read_json, write_json

    base_recipe = dataclasses.replace(recipe, gguf_name=f"{recipe.gguf_name}-base")
    types = recipe.quant_types[:1]
    stamp = gguf_dir / "base.json"
    fp = fingerprint(base, export.converter_id(recipe), types)
    names = {"F16": f"{base_recipe.gguf_name}-f16.gguf", **{q: f"{base_recipe.gguf_name}-{q}.gguf" for q in types}}
    files = [(q, gguf_dir / n) for q, n in names.items()]
    if (read_json(stamp) or {}).get("fingerprint") == fp and all(p.is_file() for _, p in files):
        return files
    log(f"[evaluate] the base model {base} through export and quantize, for comparison")
    _, (f16,) = export.run(base_recipe, base_folder(base), gguf_dir)
    for q, path in files[1:]:
        quantize.quantize_file(f16, path, q)
    write_json(stamp, {"fingerprint": fp, "base": base})
    return files


def perplexity_change(finetuned: list[dict], base: list[dict]) -> dict:
    """For each type scored both ways: base and fine-tuned perplexity, and the relative change (negative = better)."""
    ours = {r["type"]: r["perplexity"] for r in finetuned}
    out = {}
    for row in base:
        if row["type"] in ours:
            b, f = row["perplexity"], ours[row["type"]]
            out[row["type"]] = {"base": b, "finetuned": f, "change": round(f / b - 1, 4)}
    return out


def run(
    recipe: Recipe,
    model_dir: Path,
    gguf_files: list[tuple[str, Path]],
    eval_jsonl: Path,
    base: str | None = None,
    base_gguf_dir: Path | None = None,
) -> tuple[dict, list[Path]]:
    """model_dir: the merged HF folder (its tokenizer gives the token ids fed to every GGUF). With `base` (and
    recipe.eval_base), the base model is scored the same way, its GGUFs built in base_gguf_dir."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from .train import mask_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out = load_conversations(eval_jsonl, 0)
    inputs = score_inputs(
        tokenizer,
        mask_template(recipe, tokenizer),
        held_out[: recipe.eval_conversations] if recipe.eval_conversations > 0 else held_out,
        recipe.eval_ctx,
    )
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": recipe.sample_prompt}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    threads, batch_threads = thread_counts(recipe)

    def score(files: list[tuple[str, Path]]) -> list[dict]:
        rows = []
        for quant_type, path in tqdm(files, desc="evaluate", unit="file"):
            row = {"type": quant_type, **evaluate_file(path, inputs, prompt_ids, recipe, threads, batch_threads)}
            log(
                f"[evaluate] {path.name}: {human_bytes(row['bytes'])}, perplexity {row['perplexity']:.3f}, "
                f"{row['tokens_per_s']} tokens/s; sample: {row['sample'][:80]!r}"
            )
            rows.append(row)
        return rows

    rows = score(gguf_files)
    result: dict = {"quants": rows}
    if recipe.eval_base and base is not None and base_gguf_dir is not None:
        # Same token ids, same conversations, same llama.cpp: only the weights differ.
        base_files = base_ggufs(recipe, base, base_gguf_dir)
        result["base"] = score(base_files)
        result["finetune_vs_base"] = perplexity_change(rows, result["base"])
        for q, c in result["finetune_vs_base"].items():
            log(f"[evaluate] {q}: perplexity base {c['base']:.3f} -> fine-tuned {c['finetuned']:.3f} "
                f"({c['change']:+.1%})")
        if recipe.compare_prompts > 0 or recipe.judge_model:
            # The file the Space serves by default (the first quant type), base and fine-tune alike.
            q, base_path = base_files[-1]
            ours = dict(gguf_files)[q]
            result.update(
                compare_answers(recipe, tokenizer, held_out, ours, base_path, q, threads, batch_threads)
            )
    meta = {
        "conversations": len(inputs),
        "n_ctx": recipe.eval_ctx,
        "threads": threads,
        "batch_threads": batch_threads,
        "prompt": recipe.sample_prompt,
    }
    return {**result, "eval": meta}, []
