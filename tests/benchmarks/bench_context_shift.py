"""What cutting a long chat's dropped turns out of the cache (context shift) does to the answers, against reading the
kept history again: held-out perplexity of real oasst1 answers, both ways, turn by turn.

    python tests/benchmarks/bench_context_shift.py                       # SmolLM2-135M-Instruct, 1024-token window
    python tests/benchmarks/bench_context_shift.py --n-ctx 2048 --turns 80

A visitor's long chat is simulated with real oasst1 turns (the first prompt and the first-ranked answer of each
tree, one tree after the other), trimmed to the window by the app's own `fit_history` (the system message stays, the
oldest turns go) and tokenized by the app's own tokenizer. Each real answer is then scored token by token
(teacher-forced) in two sequences of one llama.cpp context:
- exact: the trimmed prompt read from scratch (what the engine does with CONTEXT_SHIFT=0);
- shifted: the previous turn's cells, with the dropped turns cut out and the rest shifted down
  (`llama_memory_seq_rm` + `llama_memory_seq_add`, as the engine does), then only the new tokens read.
Perplexity over the answers of the turns after the first cut, with a 95% bootstrap interval of the ratio, and the
prompt tokens each way read. Writes tests/benchmarks/results/context-shift-*.json. A real model is needed for
perplexity to mean anything: SmolLM2 is the one available offline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests", ROOT / "tests" / "benchmarks"):
    sys.path.insert(0, str(p))

from bench_serving import log, smollm2  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results"
SAMPLE = ROOT / "tests" / "data" / "oasst1-sample" / "train.jsonl"
SYSTEM = "You are a helpful assistant."
RESERVE = 256  # the answer's share of the window, as max tokens 256 would claim in the app
MAX_PART = 160  # tokens of a message or answer kept, so that a window holds a few turns


def oasst_turns(n: int) -> list[tuple[str, str]]:
    """(first prompt, its first-ranked answer) of each tree, in file order."""
    rows = [json.loads(line) for line in SAMPLE.open()]
    answers: dict[str, dict] = {}
    for r in rows:
        if r["role"] == "assistant" and not r["deleted"]:
            best = answers.get(r["parent_id"])
            if best is None or (r["rank"] is not None and (best["rank"] is None or r["rank"] < best["rank"])):
                answers[r["parent_id"]] = r
    turns = [(r["text"], answers[r["message_id"]]["text"]) for r in rows
             if r["parent_id"] is None and r["message_id"] in answers]
    return (turns * (n // len(turns) + 1))[:n]


class Scorer:
    """One llama.cpp context, two sequences (a KV stream each, as the engine has), logits where asked."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        from ggufchat.cpu_backend import load_cpu_backend
        from ggufchat.llama_thread import quiet_llama_log
        from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, detect_prompt_format, make_messages_formatter
        from ggufchat.vocab import Vocab

        load_cpu_backend()
        quiet_llama_log()
        self.ll = llama_cpp
        self.model = LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False)
        self.vocab = Vocab(self.model)
        fmt = PROMPT_FORMATS[detect_prompt_format(self.vocab.metadata.get("tokenizer.chat_template"), path.name)]
        self.formatter, self.tokenize = make_messages_formatter(fmt), PromptTokenizer(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = 2 * n_ctx, 2, False
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # as the engine
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.cells: dict[int, list[int]] = {0: [], 1: []}

    def read(self, seq: int, tokens: list[int], scored: list[int]) -> list[float]:
        """Append `tokens` to `seq`; the negative log-likelihood of each of `scored` (the tokens that follow the
        prompt part of `tokens`, teacher-forced)."""
        import numpy as np

        ll, nll = self.ll, []
        start = len(self.cells[seq])
        first_scored = len(tokens) - len(scored) - 1  # the position whose logits predict scored[0]
        for lo in range(0, len(tokens), 512):
            chunk = tokens[lo: lo + 512]
            for j, token in enumerate(chunk):
                i = lo + j
                self.batch.token[j], self.batch.pos[j], self.batch.n_seq_id[j] = token, start + i, 1
                self.batch.seq_id[j][0] = seq
                self.batch.logits[j] = first_scored <= i < len(tokens) - 1
            self.batch.n_tokens = len(chunk)
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            for j in range(len(chunk)):
                i = lo + j
                if first_scored <= i < len(tokens) - 1:
                    row = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, j), shape=(self.vocab.n_tokens,))
                    top = row.max()
                    nll.append(float(top + math.log(np.exp(row - top).sum()) - row[tokens[i + 1]]))
        self.cells[seq] += tokens
        return nll

    def forget(self, seq: int, keep: int) -> None:
        self.ll.llama_memory_seq_rm(self.mem, seq, keep, -1)
        self.cells[seq] = self.cells[seq][:keep]

    def cut(self, seq: int, keep: int, end: int) -> None:
        self.ll.llama_memory_seq_rm(self.mem, seq, keep, end)
        self.ll.llama_memory_seq_add(self.mem, seq, end, -1, keep - end)
        self.cells[seq] = self.cells[seq][:keep] + self.cells[seq][end:]


def run(path: Path, n_ctx: int, n_turns: int, threads: int) -> dict:
    from ggufchat.prompt import fit_history
    from ggufchat.reuse import common_prefix, dropped_span

    from ggufchat.schedule import SHIFT_MIN_TOKENS

    s = Scorer(path, n_ctx, threads)
    past, rows, cut_seen = [], [], False
    for t, (message, answer) in enumerate(oasst_turns(n_turns)):
        message = s.vocab.detokenize(s.vocab.tokenize(message)[:MAX_PART]).decode("utf-8", "ignore")
        answer_ids = s.vocab.tokenize(answer)[:MAX_PART]
        answer = s.vocab.detokenize(answer_ids).decode("utf-8", "ignore")
        answer_ids = s.vocab.tokenize(answer)  # what the app would hold for this text
        kept, ids, _ = fit_history(s.formatter, s.tokenize, SYSTEM, past, message, RESERVE, n_ctx)
        t0 = time.perf_counter()
        s.forget(0, 0)  # exact: the whole prompt, from scratch
        exact = s.read(0, ids + answer_ids, answer_ids)
        t1 = time.perf_counter()
        keep = common_prefix(s.cells[1], ids)  # shifted: what the engine would do with the last turn's cells
        end = dropped_span(s.cells[1], ids, keep, SHIFT_MIN_TOKENS) if keep < len(s.cells[1]) else None
        if end:
            s.cut(1, keep, end)
            keep, cut_seen = common_prefix(s.cells[1], ids), True
        keep = min(keep, len(ids) - 1)
        s.forget(1, keep)
        shifted = s.read(1, ids[keep:] + answer_ids, answer_ids)
        t2 = time.perf_counter()
        s.tokenize.remember_answer(answer, answer_ids)
        past = kept + [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        rows.append({"turn": t, "after_cut": cut_seen, "prompt_tokens": len(ids), "answer_tokens": len(answer_ids),
                     "read_exact": len(ids), "read_shifted": len(ids) - keep, "nll_exact": sum(exact),
                     "nll_shifted": sum(shifted), "s_exact": t1 - t0, "s_shifted": t2 - t1})
        log(f"turn {t:3d}: prompt {len(ids):4d} tokens, read {len(ids) - keep:4d} shifted; answer "
            f"{len(answer_ids):3d} tokens, nll/token exact {sum(exact) / len(exact):.3f} shifted "
            f"{sum(shifted) / len(shifted):.3f}{' (after a cut)' if cut_seen else ''}")
    return {"model": path.name, "n_ctx": n_ctx, "turns": rows, **compare([r for r in rows if r["after_cut"]])}


def compare(rows: list[dict], draws: int = 2000) -> dict:
    def ppl(sample, key):
        return math.exp(sum(r[key] for r in sample) / sum(r["answer_tokens"] for r in sample))

    rng = random.Random(0)
    ratios = sorted(ppl(d, "nll_shifted") / ppl(d, "nll_exact")
                    for d in ([rng.choice(rows) for _ in rows] for _ in range(draws)))
    return {"n": len(rows), "answer_tokens": sum(r["answer_tokens"] for r in rows),
            "ppl_exact": ppl(rows, "nll_exact"), "ppl_shifted": ppl(rows, "nll_shifted"),
            "ratio": ppl(rows, "nll_shifted") / ppl(rows, "nll_exact"),
            "ratio_95": [ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]],
            "read_exact_mean": statistics.mean(r["read_exact"] for r in rows),
            "read_shifted_mean": statistics.mean(r["read_shifted"] for r in rows),
            "read_shifted_median": statistics.median(r["read_shifted"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-ctx", type=int, default=1024, help="the chat's window in tokens (N_CTX)")
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = run(smollm2(), args.n_ctx, args.turns, args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"context-shift-{args.n_ctx}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{result['model']}, window {args.n_ctx} tokens, {result['n']} turns after the first cut "
          f"({result['answer_tokens']} answer tokens):\n"
          f"  perplexity of the real answers: exact {result['ppl_exact']:.3f}, shifted {result['ppl_shifted']:.3f}, "
          f"ratio {result['ratio']:.4f} (95% interval {result['ratio_95'][0]:.4f}-{result['ratio_95'][1]:.4f})\n"
          f"  prompt tokens read per turn: exact {result['read_exact_mean']:.0f} (mean), shifted "
          f"{result['read_shifted_mean']:.0f} (mean), {result['read_shifted_median']:.0f} (median)\n  -> {out}")


if __name__ == "__main__":
    main()
