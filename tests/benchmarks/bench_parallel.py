"""Several visitors at once: 1, 2, 4 and 8 concurrent chats, side by side on the same GGUF file and threads.

    python tests/benchmarks/bench_parallel.py --model smollm2 --threads 2      # minutes
    python tests/benchmarks/bench_parallel.py                                  # Phi-3.5-mini-shaped Q4_K_M
    python tests/benchmarks/bench_parallel.py --llama-server                   # also llama.cpp's llama-server -np 8

Paths, each with B chats started together (real oasst1 first messages, each tagged so that no cache has seen it;
the same system message):
- raw loop: the ceiling, a bare batched llama_decode loop on the engine's model (all prompts in one batch, then one
  token per chat per step, greedy argmax, nothing else);
- engine: the app's engine in this process, no web server (scheduler, sampler chains, detokenizing, streaming);
- http: the app (`python app.py`, PARALLEL=8) over HTTP, one event stream per chat (Gradio's REST API, blocking
  reads);
- llama-server: llama.cpp's own server (`-np 8`, unified KV, built once from the same llama-cpp-python sdist by
  tests/build_llama_server.sh), the chats posted to /completion as token ids.

For each: tokens/s of all chats together, prompts included (from the first request to the last token: the measure
that is fair to schedulers that admit chats differently), and decode only (from the first chat's first token),
per-chat tokens/s (median), time to first token p50/p95. Then: a chat arriving while three others
stream, against the same chat alone (time to first token). The paths take turns within each round and ratios are
medians of per-round ratios (this VM's speed drifts). Prints tables, writes tests/benchmarks/results/parallel-*.json
and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests", ROOT / "tests" / "benchmarks"):
    sys.path.insert(0, str(p))

from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, make_messages_formatter  # noqa: E402
from ggufchat.cpu_backend import load_cpu_backend  # noqa: E402
from bench_common import table  # noqa: E402
from bench_serving import cache, log, phi35_shaped, smollm2, text_stamps  # noqa: E402
from ggufchat.engine import Engine  # noqa: E402
from ggufchat.llama_thread import LLAMA_THREAD  # noqa: E402
from ggufchat.request import Request, Sampling  # noqa: E402
from serving import app_server, llama_server, stream_answer  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results"
SAMPLE = ROOT / "tests" / "data" / "oasst1-sample" / "train.jsonl"
SYSTEM = "You are a helpful assistant."
MAX_B = 8


def oasst_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.open()]
    texts = [r["text"] for r in rows if r["parent_id"] is None and r["role"] == "prompter" and 20 < len(r["text"]) < 300]
    return texts[:n]


def fresh(messages: list[str], tag: str) -> list[str]:
    """The messages with a tag in front that no earlier chat had: no path finds any of them in a cache (llama-server
    keeps old prompts in RAM, the engine the cells of finished chats), only the system prompt they all share."""
    return [f"({tag}.{i}) {m}" for i, m in enumerate(messages)]


def summary(chats: list[dict]) -> dict:
    """chats: {"submit", "first", "last", "tokens"} per chat (perf_counter seconds).

    wall_tps: every chat's tokens over the time from the first request to the last token, prompts included (the
    measure of the field notes' llama-server figure, and fair to schedulers that admit chats differently);
    decode_tps: tokens after each chat's first over the time from the first first token to the last token."""
    submit, first, last = min(c["submit"] for c in chats), min(c["first"] for c in chats), max(c["last"] for c in chats)
    tokens = sum(c["tokens"] for c in chats)
    ttft = sorted(c["first"] - c["submit"] for c in chats)
    per_chat = [(c["tokens"] - 1) / (c["last"] - c["first"]) for c in chats if c["tokens"] > 1 and c["last"] > c["first"]]
    return {"wall_tps": tokens / (last - submit),
            "decode_tps": (tokens - len(chats)) / (last - first) if last > first else 0.0,
            "per_chat_tps": statistics.median(per_chat) if per_chat else 0.0,
            "ttft_p50": ttft[len(ttft) // 2], "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "tokens": tokens}


def together(run_one, prompts: list[str]) -> list[dict]:
    """Run one chat per prompt, all started at once, each in its own thread."""
    results, start = [None] * len(prompts), threading.Barrier(len(prompts))

    def worker(i):
        start.wait()
        results[i] = run_one(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- the paths ----------------------------------------------------------------------------------------------------


class EnginePath:
    def __init__(self, model: Path, threads: int, n_ctx: int):
        self.engine = Engine(model, n_ctx=n_ctx, parallel=MAX_B, n_threads=threads, n_threads_batch=threads).start()
        self.tokenize = PromptTokenizer(self.engine.vocab)
        fmt = PROMPT_FORMATS["phi3" if "Phi-3" in model.name else "chatml"]
        self.formatter = make_messages_formatter(fmt)

    def ids(self, message: str) -> list[int]:
        from ggufchat.prompt import format_prompt

        return self.tokenize(format_prompt(self.formatter, SYSTEM, [], message))

    def chat(self, message: str, n_gen: int) -> dict:
        request = Request(self.ids(message), n_gen, Sampling(temperature=0.7, repeat_penalty=1.0, seed=1))
        submit, stamps = time.perf_counter(), []
        self.engine.submit(request)
        for _ in request.stream():
            stamps.append(time.perf_counter())
        return {"submit": submit, "first": request.stats.first_token_at, "last": request.stats.finished_at,
                "tokens": len(request.stats.tokens)}

    def close(self):
        self.engine.close()


class RawPath:
    """The ceiling: a bare batched llama_decode loop on the engine's model, in the llama.cpp thread, in a context of
    its own set up like the engine's (a KV stream per sequence, flash attention): every prompt in one batch, then one
    token per chat per step, greedy argmax (no sampler chain, no detokenizing, no streaming, no scheduling)."""

    def __init__(self, engine: EnginePath, threads: int):
        self.engine, self.threads = engine, threads
        self.ctx = LLAMA_THREAD.call(self._context)

    def _context(self):
        import llama_cpp as ll

        p = ll.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.kv_unified = MAX_B * 256, MAX_B, False
        p.n_batch = p.n_ubatch = 512
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        return ll.llama_init_from_model(self.engine.engine.model.model, p)

    def batch(self, messages: list[str], n_gen: int) -> list[dict]:
        return LLAMA_THREAD.call(self._run, [self.engine.ids(m) for m in messages], n_gen)

    def _run(self, prompts: list[list[int]], n_gen: int) -> list[dict]:
        import llama_cpp as ll
        import numpy as np

        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        n_vocab = self.engine.engine.vocab.n_tokens
        batch = ll.llama_batch_init(512, 0, 1)

        def decode(items):  # (seq, pos, token, wants logits); returns each wanted row's argmax, in order
            rows = []
            for start in range(0, len(items), 512):
                part = items[start:start + 512]
                for i, (seq, pos, token, wants) in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wants
                    batch.seq_id[i][0] = seq
                batch.n_tokens = len(part)
                assert ll.llama_decode(self.ctx, batch) == 0
                rows += [int(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(n_vocab,)).argmax())
                         for i, item in enumerate(part) if item[3]]
            return rows

        submit = time.perf_counter()
        nexts = decode([(s, j, t, j == len(ids) - 1) for s, ids in enumerate(prompts) for j, t in enumerate(ids)])
        first = time.perf_counter()
        positions = [len(ids) for ids in prompts]
        for _ in range(n_gen - 1):
            nexts = decode([(s, positions[s], nexts[s], True) for s in range(len(prompts))])
            positions = [p + 1 for p in positions]
        last = time.perf_counter()
        ll.llama_batch_free(batch)
        return [{"submit": submit, "first": first, "last": last, "tokens": n_gen} for _ in prompts]

    def close(self):
        import llama_cpp as ll

        LLAMA_THREAD.call(ll.llama_free, self.ctx)


class HttpPath:
    """The app over HTTP, each chat a fresh session (an empty conversation) reading its event stream with blocking
    reads, as a visitor's browser would from its own machine (gradio_client's Job polls every millisecond, four of
    them woke this machine's cores about 1,400 times a second, a cost no visitor puts on a Space)."""

    def __init__(self, server, model: Path):
        self.server, self.label = server, model.name

    def chat(self, message: str, n_gen: int, streaming: threading.Event | None = None) -> dict:
        """One chat; `streaming` is set at its first token."""
        submit = time.perf_counter()
        updates = stream_answer(self.server, [message, self.label, SYSTEM, n_gen, 0.7, 0.95, 40, 1.0])
        stamps, final = text_stamps(updates, streaming.set if streaming is not None else None)
        m = re.search(r"<sub>(\d+) tokens", final)
        if not stamps or not m:
            raise RuntimeError(f"no answer: {final[:200]!r}")
        return {"submit": submit, "first": stamps[0], "last": stamps[-1], "tokens": int(m[1])}


class ServerPath:
    """llama.cpp's llama-server (tests/serving.llama_server), prompts as token ids (the same ids the app sends)."""

    def __init__(self, server, ids):
        self.url, self.ids = server.url, ids

    def chat(self, message: str, n_gen: int) -> dict:
        body = json.dumps({"prompt": self.ids(message), "n_predict": n_gen, "stream": True, "temperature": 0.7,
                           "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0, "seed": 1,
                           "cache_prompt": True}).encode()
        request = urllib.request.Request(f"{self.url}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        submit, stamps, tokens = time.perf_counter(), [], 0
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event.get("content") or event.get("tokens"):
                        stamps.append(time.perf_counter())
                    if event.get("stop"):
                        tokens = event.get("tokens_predicted", len(stamps))
                        break
        return {"submit": submit, "first": stamps[0], "last": stamps[-1], "tokens": tokens}


# --- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["phi35-shape", "smollm2"], default="phi35-shape")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--n-gen", type=int, default=0, help="tokens per chat (default by model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chats", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--llama-server", action="store_true", help="also llama.cpp's llama-server (built once)")
    args = parser.parse_args()
    model = smollm2() if args.model == "smollm2" else phi35_shaped()
    # 64 tokens: four Phi-3.5-sized chats then decode together for ~20 s; with 32 (~10 s) this VM's drift of a third
    # within minutes moved the ratios by 0.2 from round to round.
    n_gen, t, n_ctx = args.n_gen or (96 if args.model == "smollm2" else 64), args.threads, 1024
    prompts = oasst_prompts(MAX_B * 2)
    load_cpu_backend()
    engine = EnginePath(model, t, n_ctx)
    raw = RawPath(engine, t)
    paths: dict = {"raw loop": raw, "engine": engine}
    env = {"MODEL_PATH": str(model), "N_CTX": str(n_ctx), "N_THREADS": str(t), "N_THREADS_BATCH": str(t),
           "PARALLEL": str(MAX_B), "SEED": "1"}
    names = [*paths, *(["llama-server"] if args.llama_server else []), "http"]
    samples: dict[str, dict[int, list[dict]]] = {name: {b: [] for b in args.chats} for name in names}
    arrivals: dict[str, list[float]] = {"alone": [], "beside three": []}
    try:
        with contextlib.ExitStack() as stack:
            if args.llama_server:  # -np 8 with unified KV, as llama-server is usually run
                backend = stack.enter_context(llama_server(model, cache(), MAX_B, n_ctx, threads=t,
                                                           extra=("--kv-unified", "-fa", "on"), timeout=300))
                paths["llama-server"] = ServerPath(backend, engine.ids)
            server = stack.enter_context(app_server(Path(os.environ.get("TMPDIR", "/tmp")), env, timeout=600))
            paths["http"] = HttpPath(server, model)
            for r in range(args.rounds):
                for b in args.chats:
                    # Odd rounds go through the paths backwards: a drift in this VM's speed during a round then favours
                    # no path over its neighbour (the ratios are medians of per-round ratios).
                    for name, path in list(paths.items())[:: -1 if r % 2 else 1]:
                        log(f"round {r + 1}/{args.rounds}: {b} chats, {name}")
                        batch = fresh(prompts[r % 2 * MAX_B:][:b], f"{r}.{b}")
                        chats = (path.batch(batch, n_gen) if hasattr(path, "batch")
                                 else together(lambda m, p=path: p.chat(m, n_gen), batch))
                        samples[name][b].append(summary(chats))
                # A chat arriving while three others stream, against the same chat alone (HTTP, as visitors see it).
                late = prompts[-1 - r]
                alone = paths["http"].chat(*fresh([late], f"{r}a"), 4)
                arrivals["alone"].append(alone["first"] - alone["submit"])
                streaming = [threading.Event() for _ in range(3)]
                runners = [threading.Thread(target=paths["http"].chat, args=(m, n_gen * 3, streaming[i]))
                           for i, m in enumerate(fresh(prompts[:3], f"{r}r"))]
                for th in runners:
                    th.start()
                for event in streaming:  # all three past their prompts (which take seconds here), then a moment more
                    event.wait(600)
                time.sleep(0.5)
                late_run = paths["http"].chat(*fresh([late], f"{r}b"), 4)
                arrivals["beside three"].append(late_run["first"] - late_run["submit"])
                for th in runners:
                    th.join()
    finally:
        raw.close()
        engine.close()
    report(samples, arrivals, model, t, n_gen, args)


def report(samples, arrivals, model: Path, threads: int, n_gen: int, args) -> None:
    med = {name: {b: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for b, runs in per_b.items()}
           for name, per_b in samples.items()}
    rows = []

    def ratio(key, runs, baseline):  # the median of per-round ratios: this VM's speed drifts between rounds
        return statistics.median(x[key] / y[key] for x, y in zip(runs, baseline))

    for name, per_b in med.items():
        one = samples[name][args.chats[0]]
        for b, m in per_b.items():
            runs = samples[name][b]
            # Against the raw loop, decode only: it re-reads every prompt, where the others keep the system prompt.
            vs = {f"{other} ({what})": ratio(key, runs, samples[other][b])
                  for other, key, what in (("raw loop", "decode_tps", "decode"), ("llama-server", "decode_tps", "decode"),
                                           ("llama-server", "wall_tps", "incl. prompts"))
                  if other in samples and other != name}
            rows.append([name, b, f"{m['wall_tps']:.2f}", f"{ratio('wall_tps', runs, one):.2f}",
                         f"{m['decode_tps']:.2f}", f"{ratio('decode_tps', runs, one):.2f}", f"{m['per_chat_tps']:.2f}",
                         f"{m['ttft_p50']:.2f}", f"{m['ttft_p95']:.2f}",
                         " ".join(f"{v:.2f}× {k}" for k, v in vs.items())])
    print(f"\n{model.name}, {threads} threads, {n_gen} tokens per chat, {args.rounds} rounds (medians); the app's CPU "
          f"variant: {load_cpu_backend()}" + ("; llama-server: tests/build_llama_server.sh (static, AVX2/FMA/F16C "
          "where the CPU has them, the kernels of the haswell variant)" if args.llama_server else "")
          + "\n")
    print(table(rows, ["path", "chats", "tok/s incl. prompts", f"× {args.chats[0]}", "decode tok/s",
                       f"× {args.chats[0]}", "per-chat tok/s", "TTFT p50 s", "TTFT p95 s", "vs (median of per-round ratios)"]))
    ratio = statistics.median(b / a for a, b in zip(arrivals["alone"], arrivals["beside three"]))
    print(f"\nA chat arriving while 3 stream: TTFT {statistics.median(arrivals['beside three']):.2f} s against "
          f"{statistics.median(arrivals['alone']):.2f} s alone ({ratio:.2f}×; goal ≤ 2×)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    # A run with other answer lengths or chat counts than the README's sweep keeps its own files.
    name = f"parallel-{args.model}" + (f"-{n_gen}tok" if args.n_gen else "") + ("" if args.chats == [1, 2, 4, 8] else
                                                                               "-" + "-".join(map(str, args.chats)))
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"model": model.name, "threads": threads, "n_gen": n_gen, "samples": samples,
                               "medians": med, "arrivals": arrivals}, indent=2))
    plot(med, args.chats, f"{model.name}, {threads} threads", RESULTS / f"{name}.png")
    print(f"wrote {out} and .png")


def plot(med, chats, title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in zip(axes, ("wall_tps", "decode_tps"), ("prompts included", "decode (from the first token)")):
        for name, per_b in med.items():
            ax.plot(chats, [per_b[b][key] for b in chats], "o-", label=name)
        ax.set_xlabel("concurrent chats")
        ax.set_ylabel("tokens/s, all chats")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(chats)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
