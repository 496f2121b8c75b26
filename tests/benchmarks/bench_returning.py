"""What a visitor waits for the Space to read: first-token time per turn of a long chat before and after its window
fills, and of chats that come back after others took their seat, side by side with llama.cpp's llama-server.

    python tests/benchmarks/bench_returning.py                        # Phi-3.5-mini-shaped Q4_K_M, 2 threads
    python tests/benchmarks/bench_returning.py --model smollm2        # minutes

Both paths answer through the app's own turn (`fit_history` -> LlamaCppAgent -> provider), with the same prompt ids:
- engine: the app's engine in this process (PARALLEL=4, N_CTX per chat, host-RAM cache and context shift on);
- llama-server: `-np 4` with the same context per slot, built by tests/build_llama_server.sh from the same sources,
  reached through the app's remote backend (token ids, `cache_prompt`; its defaults: host-RAM prompt cache on,
  context shift and cache reuse off).
Scenarios, one message per turn, one turn at a time (the waits measured are reading, not queueing):
- long: one chat of `--turns` real oasst1 messages in a `--n-ctx` window: the history fills it after a few turns;
- returning: 8 (and 16) chats take turns over 4 seats; every chat's cells left its seat between two of its turns;
- staying: 4 chats take turns over 4 seats: nobody's cells ever leave (the reference for "returning").
Time to first token, prompt tokens read, per turn; medians. Writes tests/benchmarks/results/returning-*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests", ROOT / "tests" / "benchmarks"):
    sys.path.insert(0, str(p))

from bench_common import table  # noqa: E402
from bench_parallel import oasst_prompts  # noqa: E402
from bench_serving import log, phi35_shaped, smollm2  # noqa: E402
from ggufchat.engine import EngineSettings  # noqa: E402
from ggufchat.local import ModelStore  # noqa: E402
from ggufchat.turns import Done, answer  # noqa: E402
from ggufchat.files import ModelSpec  # noqa: E402
from serving import llama_server  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results"
SYSTEM = "You are a helpful assistant."
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1}
SEATS = 4


def turn(store, label: str, past: list[dict], message: str, n_gen: int) -> tuple[list[dict], dict]:
    """One chat turn through the app's path: the new history and {ttft, read, prompt}."""
    model = store.get(label)
    start, first, text, done = time.perf_counter(), None, "", None
    for item in answer(model, SYSTEM, past, message, n_gen, SAMPLING, 1):
        if isinstance(item, str):
            first, text = first or time.perf_counter(), item
        elif isinstance(item, Done):
            done = item
    first = first or time.perf_counter()
    history = past + [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
    return history, {"ttft": first - start, "read": done.evaluated, "prompt": done.prompt_tokens}


def long_chat(store, label, messages, n_gen, n_ctx) -> list[dict]:
    past, rows = [], []
    for message in messages:
        from ggufchat.prompt import fit_history

        model = store.get(label)
        full = len(fit_history(model.formatter, model.tokenize, SYSTEM, past, message, n_gen, n_ctx)[0]) < len(past)
        past, row = turn(store, label, past, message, n_gen)
        rows.append({**row, "full": full})
        log(f"long chat turn {len(rows):2d}: prompt {row['prompt']:4d} tokens, read {row['read']:4d}, "
            f"first token {row['ttft']:.2f} s{' (window full)' if rows[-1]['full'] else ''}")
    return rows


def rotation(store, label, messages, chats: int, rounds: int, n_gen: int) -> list[dict]:
    histories, rows = [[] for _ in range(chats)], []
    for r in range(rounds):
        for c in range(chats):
            histories[c], row = turn(store, label, histories[c], f"({chats}.{c}) {messages[(r * chats + c) % len(messages)]}",
                                     n_gen)
            rows.append({**row, "round": r})
        log(f"{chats} chats over {SEATS} seats, round {r}: first token median "
            f"{statistics.median(x['ttft'] for x in rows if x['round'] == r):.2f} s, read median "
            f"{statistics.median(x['read'] for x in rows if x['round'] == r):.0f} tokens")
    return rows


def scenarios(store, label, args) -> dict:
    messages = oasst_prompts(64)
    out = {"long": long_chat(store, label, [f"(long) {m}" for m in messages[: args.turns]], args.n_gen, args.n_ctx)}
    for chats in (SEATS, 8, 16):
        out[f"rotate-{chats}"] = rotation(store, label, messages, chats, args.rounds, args.n_gen)
    return out


def summary(rows_by: dict) -> list[list]:
    lines = []
    for name, rows in rows_by.items():
        long = rows["long"]
        before = [r for r in long if not r["full"]]
        after = [r for r in long if r["full"]]
        staying = [r for r in rows[f"rotate-{SEATS}"] if r["round"] > 0]
        lines.append([name, "long chat, window not full", len(before), f"{statistics.median(r['ttft'] for r in before):.2f}",
                      f"{statistics.median(r['read'] for r in before):.0f}", max(r["read"] for r in before), ""])
        if after:
            lines.append([name, "long chat, window full", len(after), f"{statistics.median(r['ttft'] for r in after):.2f}",
                          f"{statistics.median(r['read'] for r in after):.0f}", max(r["read"] for r in after),
                          f"{statistics.median(r['ttft'] for r in after) / statistics.median(r['ttft'] for r in before):.2f}× before"])
        base = statistics.median(r["ttft"] for r in staying)
        for chats in (SEATS, 8, 16):
            later = [r for r in rows[f"rotate-{chats}"] if r["round"] > 0]
            what = "staying (cells never leave)" if chats == SEATS else f"{chats} chats over {SEATS} seats"
            ttft = statistics.median(r["ttft"] for r in later)
            lines.append([name, what, len(later), f"{ttft:.2f}", f"{statistics.median(r['read'] for r in later):.0f}",
                          max(r["read"] for r in later), "" if chats == SEATS else f"{ttft / base:.2f}× staying"])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["phi35-shape", "smollm2"], default="phi35-shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per chat (N_CTX) and per llama-server slot")
    parser.add_argument("--n-gen", type=int, default=32, help="tokens per answer")
    parser.add_argument("--turns", type=int, default=20, help="turns of the long chat")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each chat in the rotations")
    parser.add_argument("--no-llama-server", action="store_true")
    args = parser.parse_args()
    model = phi35_shaped() if args.model == "phi35-shape" else smollm2()
    from ggufchat.cpu_backend import load_cpu_backend

    cpu = load_cpu_backend()
    results: dict = {"model": model.name, "threads": args.threads, "n_ctx": args.n_ctx, "n_gen": args.n_gen,
                     "cpu_backend": cpu.name, "paths": {}}

    settings = EngineSettings(n_ctx=args.n_ctx, parallel=SEATS, n_threads=args.threads, n_threads_batch=args.threads)
    store = ModelStore([ModelSpec("m", str(model))], {"m": model}, settings, queue_size=64, seed=1, warm_system=SYSTEM)
    try:
        log("engine (the app's, in this process)")
        results["paths"]["engine"] = scenarios(store, "m", args)
    finally:
        store.unload()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.no_llama_server:
        from ggufchat.remote import RemoteStore, Server

        log("llama-server -np 4")
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(llama_server(model, RESULTS, slots=SEATS, ctx_per_slot=args.n_ctx,
                                                      threads=args.threads, timeout=600))
            remote = RemoteStore(Server(server.url), 64, "auto", SEATS, 1)
            label = remote.labels[0]
            results["paths"]["llama-server"] = scenarios(remote, label, args)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"returning-{model.stem}-{args.n_ctx}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\n{model.name}, {args.threads} threads, {args.n_ctx}-token window per chat, {args.n_gen}-token answers, "
          f"CPU variant {cpu.name} (turns after each chat's first; medians)\n")
    print(table(summary(results["paths"]), ["path", "turns", "n", "first token s", "read", "read max", "vs"]))
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
