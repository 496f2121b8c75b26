"""What `KV_CACHE_TYPE=q8_0` costs against f16: the app's engine at its defaults (4 chats of 4096 tokens) on the same
file and threads, both caches side by side in each round; and what it changes in the model's predictions.

    python tests/benchmarks/bench_kv_type.py                     # Phi-3.5-mini-shaped Q4_K_M (built once) + SmolLM2
    python tests/benchmarks/bench_kv_type.py --model smollm2     # SmolLM2-135M-Instruct for both parts: minutes

Speed (per round, the two caches in alternating order; ratios are medians of per-round ratios, as this VM drifts):
- reading: one long prompt (oasst threads, 1,024 tokens), prompt tokens/s;
- one chat: decode tokens/s of one answer;
- four chats: four answers started together (the engine's default PARALLEL), all their tokens/s.
Quality, on SmolLM2's real weights (the Phi-3.5 shape has random ones): perplexity of oasst1 conversations read with
each cache (flash attention on for both, as the engine runs), and how many greedy answers come out identical.
Memory: the KV cache each engine allocates (llama.cpp's own count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests", ROOT / "tests" / "benchmarks"):
    sys.path.insert(0, str(p))

from bench_common import table  # noqa: E402
from bench_serving import log, phi35_shaped, smollm2  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "oasst1-sample" / "train.jsonl"
RESULTS = ROOT / "tests" / "benchmarks" / "results"
TYPES = ("f16", "q8_0")


def threads_text(n_threads: int) -> list[str]:
    """oasst1 threads as the build takes them (oasstbuild.data.extract_threads: each tree's best-ranked path), as
    plain 'role: text' turns."""
    from oasstbuild.data import extract_threads

    threads, _ = extract_threads(json.loads(line) for line in SAMPLE.open())
    return ["\n\n".join(f"{m['role']}: {m['content']}" for m in t["messages"]) for t in threads[:n_threads]]


# --- speed: the app's engine ----------------------------------------------------------------------------------------
def answer(engine, ids: list[int], n_gen: int, seed: int) -> dict:
    from ggufchat.request import Request, Sampling

    # End-of-generation tokens banned: every answer is n_gen tokens long, whichever cache it reads.
    ban = tuple((t, -math.inf) for t in range(engine.vocab.n_tokens) if engine.vocab.is_eog(t))
    request = Request(ids, n_gen, Sampling(temperature=0.7, repeat_penalty=1.0, seed=seed, logit_bias=ban))
    submit = time.perf_counter()
    engine.submit(request)
    for _ in request.stream():
        pass
    s = request.stats
    return {"submit": submit, "first": s.first_token_at, "last": s.finished_at, "tokens": len(s.tokens),
            "prompt": len(ids)}


def speed_round(engine, vocab_ids, long_ids: list[int], prompts: list[list[int]], n_gen: int, tag: int) -> dict:
    # A fresh tag in front of every prompt: no chat may reuse another's cells (the cache would read nothing).
    def fresh(ids, k):
        return vocab_ids(f"[{tag}.{k}] ") + ids

    t0 = time.perf_counter()
    reading = answer(engine, fresh(long_ids, "r"), 1, tag)
    one = answer(engine, fresh(prompts[0], "o"), n_gen, tag)
    log(f"  reading {reading['first'] - reading['submit']:.0f} s, one chat {time.perf_counter() - t0:.0f} s in all")
    results: list = [None] * 4
    workers = [threading.Thread(target=lambda i=i: results.__setitem__(i, answer(engine, fresh(prompts[i], f"f{i}"),
                                                                                n_gen, tag + i)))
               for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    start, end = min(r["first"] for r in results), max(r["last"] for r in results)
    return {
        "reading": reading["prompt"] / (reading["first"] - reading["submit"]),
        "one chat": (one["tokens"] - 1) / (one["last"] - one["first"]),
        "four chats": sum(r["tokens"] for r in results) / (end - start),
    }


def measure_speed(model: Path, threads: int, rounds: int, n_gen: int, long_prompt: int) -> tuple[dict, dict]:
    from ggufchat.cpu_backend import load_cpu_backend
    from ggufchat.engine import Engine

    load_cpu_backend()
    engines = {t: Engine(model, kv_type=t, n_threads=threads, n_threads_batch=threads).start() for t in TYPES}
    kv = {t: e.kv_bytes for t, e in engines.items()}
    try:
        vocab = engines["f16"].vocab
        ids = vocab.tokenize
        texts = threads_text(40)
        long_ids = ids("\n\n".join(texts))[:long_prompt]
        prompts = [ids(t)[:100] for t in texts[5:9]]
        runs = {t: [] for t in TYPES}
        for r in range(rounds):
            for t in TYPES[:: -1 if r % 2 else 1]:
                log(f"round {r + 1}/{rounds}: {t}")
                runs[t].append(speed_round(engines[t], ids, long_ids, prompts, n_gen, 100 * r + (t == "q8_0")))
    finally:
        for e in engines.values():
            e.close()
    return runs, kv


# --- quality: SmolLM2's real weights ----------------------------------------------------------------------------------
def measure_quality(model: Path, threads: int, n_texts: int, n_answers: int) -> dict:
    from llama_cpp import Llama

    from ggufchat.engine import KV_TYPES
    from oasstbuild.evaluation import cpu_backend, nll_sum

    cpu_backend()
    out = {}
    answers = {}
    texts = threads_text(n_texts + n_answers)
    for t in TYPES:
        ggml_type = KV_TYPES[t][0]
        llm = Llama(model_path=str(model), n_ctx=2048, n_batch=512, logits_all=True, flash_attn=True, type_k=ggml_type,
                    type_v=ggml_type, n_threads=threads, n_threads_batch=threads, verbose=False, seed=1)
        total, count = 0.0, 0
        for text in texts[:n_texts]:
            ids = llm.tokenize(text.encode())[:1024]
            llm.reset()
            llm.eval(ids)
            nll, n = nll_sum(llm.scores[: len(ids)], ids, [1] * len(ids))
            total, count = total + nll, count + n
        out[t] = {"perplexity": math.exp(total / count), "tokens": count}
        answers[t] = []
        for text in texts[n_texts:]:
            prompt = f"<|im_start|>user\n{text.split(chr(10))[0][:400]}<|im_end|>\n<|im_start|>assistant\n"
            done = llm.create_completion(prompt, max_tokens=64, temperature=0.0)
            answers[t].append(done["choices"][0]["text"])
        llm.close()
    out["same answers"] = sum(a == b for a, b in zip(answers["f16"], answers["q8_0"]))
    out["answers"] = n_answers
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["phi35-shape", "smollm2"], default="phi35-shape", help="speed model")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-gen", type=int, default=0, help="tokens per answer (default by model)")
    parser.add_argument("--long-prompt", type=int, default=1024, help="tokens of the prompt read alone")
    args = parser.parse_args()
    model = smollm2() if args.model == "smollm2" else phi35_shaped()
    n_gen = args.n_gen or (128 if args.model == "smollm2" else 48)
    runs, kv = measure_speed(model, args.threads, args.rounds, n_gen, args.long_prompt)
    log("quality on SmolLM2")
    quality = measure_quality(smollm2(), args.threads, n_texts=24, n_answers=8)

    keys = ["reading", "one chat", "four chats"]
    rows = []
    for k in keys:
        med = {t: statistics.median(r[k] for r in runs[t]) for t in TYPES}
        ratio = statistics.median(b[k] / a[k] for a, b in zip(runs["f16"], runs["q8_0"]))
        rows.append([k + (" (prompt tokens/s)" if k == "reading" else " (tokens/s)"), f"{med['f16']:.1f}",
                     f"{med['q8_0']:.1f}", f"{ratio:.2f}"])
    rows.append(["KV cache (MiB)", f"{kv['f16'] / 2**20:,.0f}", f"{kv['q8_0'] / 2**20:,.0f}",
                 f"{kv['q8_0'] / kv['f16']:.2f}"])
    print(f"\n{model.name}, {args.threads} threads, {args.rounds} rounds, {n_gen} tokens per answer, engine defaults "
          "(4 chats x 4096 tokens)\n")
    print(table(rows, ["", "f16", "q8_0", "q8_0 / f16"]))
    print(f"\nSmolLM2-135M-Instruct, {quality['f16']['tokens']:,} tokens of oasst1 threads: perplexity "
          f"f16 {quality['f16']['perplexity']:.4f}, q8_0 {quality['q8_0']['perplexity']:.4f} "
          f"({quality['q8_0']['perplexity'] / quality['f16']['perplexity'] - 1:+.3%}); greedy answers identical: "
          f"{quality['same answers']} of {quality['answers']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"kv-type-{args.model}.json"
    out.write_text(json.dumps({"model": model.name, "threads": args.threads, "n_gen": n_gen, "runs": runs,
                               "kv_bytes": kv, "quality": quality}, indent=2))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
