"""Training throughput of the build's own train stage on a Phi-3.5-mini-shaped model (CUDA only).

    python tests/benchmarks/bench_training.py                 # plain QLoRA vs the default recipe, two datasets
    python tests/benchmarks/bench_training.py --variants recipe --datasets oasst --steps 30
    python tests/benchmarks/bench_training.py --set optim=adamw_torch --set gradient_checkpointing=false

Runs `python build/run.py --recipe phi35-oasst1 --stages data,train` with `random_init` (Phi-3.5-mini's exact
config and a locally trained tokenizer: nothing is downloaded), seq 2048, LoRA r=16 on qkv_proj, o_proj,
gate_up_proj and down_proj, NF4 + double quant, bf16, gradient checkpointing, paged AdamW 8-bit, as:

- plain: micro-batch 4 padded to its longest conversation, eager (the shape of the only H200 figures so far, 12,498
  tokens/s at 60.5 GB on 2026-11-28, measured in eval mode by another script: no checkpointing recompute, no
  dropout, no mask; to be re-measured here);
- recipe: the default recipe as it is (padding-free packing into 2048-token rows, compiled decoder layers);

each on two datasets:

- fixed: every conversation fills the 2048-token window (no padding for anyone);
- oasst: the real, short and uneven oasst threads of tests/data (padding waste counts against the recipe).

Every run goes through the build's train stage, i.e. Trainer, which calls `model.train()`: dropout is on and
gradient checkpointing recomputes activations in backward; the table says so per run (`train_mode`,
`gradient_checkpointing` from report.json, recorded at every step).

Prints tokens/s after warm-up (tokens the model reads, padding excluded: TRL's `num_tokens`; compile time and the
first steps are left out) and peak GPU memory, and writes tests/benchmarks/results/training.json (or --results).
`--base DIR` uses an HF folder already built (e.g. by a random_init run) instead of building the random weights
again for each run. Without CUDA it says so and exits 0: QLoRA speed on a CPU means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ROOT: the build's oasstbuild imports the Space's ggufchat package (as build/run.py arranges).
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "benchmarks"), str(ROOT / "build"), str(ROOT)]
RESULTS = ROOT / "tests" / "benchmarks" / "results"
SAMPLE = ROOT / "tests" / "data" / "oasst1-sample" / "train.jsonl"


def phi35_config_dir(dest: Path) -> Path:
    """Config + tokenizer of Phi-3.5-mini's shape; the train stage's random_init builds the weights from it."""
    from bench_common import phi35_config
    from tiny_models import write_phi3_tokenizer

    phi35_config().save_pretrained(dest)
    write_phi3_tokenizer(dest)
    return dest


def fixed_length_dataset(dest: Path, conversations: int = 256) -> Path:
    """oasst1-schema rows whose one answer is long enough to fill any 2048-token window."""
    words = [json.loads(line)["text"] for line in SAMPLE.open()]
    filler = " ".join(words)[:12000]
    with open(dest, "w") as f:
        for i in range(conversations):
            root = {"message_id": f"r{i}", "parent_id": None, "message_tree_id": f"r{i}", "role": "prompter",
                    "text": f"Question {i}: tell me everything.", "lang": "en", "deleted": False,
                    "review_result": True, "rank": None}
            answer = {**root, "message_id": f"a{i}", "parent_id": f"r{i}", "role": "assistant", "rank": 0,
                      "text": filler[i % 997:] + filler[: i % 997]}
            f.write(json.dumps(root) + "\n" + json.dumps(answer) + "\n")
    return dest


VARIANTS = {
    "plain": {"packing": "false", "compile_decoder": "false", "per_device_train_batch_size": "4",
              "gradient_accumulation_steps": "1"},
    "recipe": {},
}
# TORCH_LOGS artifacts whose lines are counted per run: a recompile or a graph break per step would make the
# compiled recipe's tokens/s a measure of dynamo, not of the kernels (torch/_dynamo guards.py, symbolic_convert.py).
TORCH_LOGS = "recompiles,graph_breaks"
LOG_MARKS = {"recompiles": "Recompiling function", "graph_breaks": "Graph break in user code"}


def run_variant(name: str, config_dir: Path | None, dataset: Path, steps: int, work: Path, sets: list[str],
                base: Path | None = None, recipe: str = "phi35-oasst1", max_length: int = 2048,
                log_every: int = 5, logs: Path | None = None) -> dict:
    """One build/run.py data,train run; its log goes to logs/NAME.log. A run that fails is recorded, not raised:
    the table still shows what the other runs measured."""
    out = work / name
    source = {"random_init": "false", "model_name_or_path": str(base)} if base else {
        "random_init": "true", "config_name_or_path": str(config_dir)}
    # logging_steps: a train-loss log syncs the GPU (loss.item()); logging every step would time the syncs too and
    # favour whichever variant has fewer, longer steps. Tokens/s is measured over the second half of the log marks.
    overrides = {**source, "dataset": str(dataset),
                 "max_steps": str(steps), "eval_steps": "100000", "save_steps": "100000",
                 "logging_steps": str(log_every), "max_length": str(max_length), "lora_r": "16",
                 "eval_fraction": "0.02", **VARIANTS[name.split("-")[0]]}
    overrides.update(s.split("=", 1) for s in sets)
    args = [sys.executable, str(ROOT / "build" / "run.py"), "--recipe", recipe, "--stages", "data,train",
            "--output-dir", str(out)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    logs = logs or work
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    env = {**os.environ, "TORCH_LOGS": TORCH_LOGS}
    with open(log_path, "w") as log:
        done = subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = log_path.read_text(errors="replace")
    counts = {key: text.count(mark) for key, mark in LOG_MARKS.items()}
    if done.returncode != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["?"]
        return {"error": f"exit {done.returncode}: {last[0][:300]}", "log": str(log_path), **counts,
                "overrides": overrides}
    history = json.loads((out / "adapter" / "log_history.json").read_text())
    report = json.loads((out / "report.json").read_text())
    train = report["train"]
    tokens = max(h.get("num_tokens", 0) for h in history)
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    from oasstbuild.recipe import load_recipe

    compiled = load_recipe(recipe, overrides).compile_decoder  # the same recipe and overrides the run had
    return {"tokens": tokens, "seconds": runtime, "steps": train["steps"], "tokens_per_s": train["tokens_per_s"],
            "tokens_per_s_with_warmup": tokens / runtime if runtime else None,
            "peak_gpu_bytes": train.get("peak_gpu_bytes"),
            # The allocator's reserve and the device's own count: bitsandbytes' paged optimizer state lives in CUDA
            # managed memory, which max_memory_allocated never sees.
            "peak_gpu_reserved_bytes": train.get("peak_gpu_reserved_bytes"),
            "peak_device_used_bytes": train.get("peak_device_used_bytes"),
            "compile": ("fell back to eager: " + train["compile_error"]) if train.get("compile_error")
            else ("on" if compiled else "off"),
            **counts, "train_mode": train.get("train_mode"),
            "gradient_checkpointing": train.get("gradient_checkpointing"), "log": str(log_path),
            "overrides": overrides}


def rows(runs: dict) -> list[list]:
    """Table rows, one per run; a run that failed or measured no rate says so instead of a number."""
    out = []
    for key, r in runs.items():
        if "error" in r:
            out.append([key, "failed", "", "", "", "", r["error"]])
            continue
        plain = runs.get(f"plain-{key.split('-', 1)[1]}") if "-" in key else None
        rate, base_rate = r.get("tokens_per_s"), (plain or {}).get("tokens_per_s")
        ratio = f"{rate / base_rate:.2f}" if rate and base_rate and plain is not r else ""
        peaks = [r.get(k) for k in ("peak_gpu_bytes", "peak_gpu_reserved_bytes", "peak_device_used_bytes")]
        peak = " / ".join(f"{p / 1e9:.1f}" if p else "?" for p in peaks) + " GB" if any(peaks) else "no GPU"
        mode = ("train" if r.get("train_mode") else "EVAL") + (", ckpt" if r.get("gradient_checkpointing") else "")
        compile_ = f"{r.get('compile', '?')} ({r.get('recompiles', 0)} recompiles, {r.get('graph_breaks', 0)} breaks)"
        out.append([key, f"{rate:,.0f}" if rate else "no rate (< 4 log marks)", ratio, peak, mode, compile_,
                    f"{r['tokens']:,.0f} in {r['seconds']:.0f} s"])
    return out


HEADER = ["run", "tokens/s", "x plain", "peak alloc / reserved / device", "mode", "compile", "tokens read (all)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the second half is timed)")
    parser.add_argument("--log_every", type=int, default=5, help="steps between train-loss logs (each one syncs)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--datasets", nargs="+", choices=["fixed", "oasst"], default=["fixed", "oasst"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a recipe override for every run (e.g. optim=adamw_torch)")
    parser.add_argument("--base", type=Path, help="an HF folder of Phi-3.5-mini's shape to train (default: random "
                        "weights built from its config for each run)")
    parser.add_argument("--recipe", default="phi35-oasst1", help="the recipe the 'recipe' variant is (name or path)")
    parser.add_argument("--max_length", type=int, default=2048, help="sequence length (and packed row length)")
    parser.add_argument("--cpu", action="store_true", help="run without CUDA too: exercises the plumbing (the GPU "
                        "check's CPU rehearsal); the numbers mean nothing")
    parser.add_argument("--results", type=Path, default=RESULTS / "training.json", help="where the JSON goes")
    parser.add_argument("--logs", type=Path, help="where each run's log goes (default: logs/ beside --results)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("bench_training: no CUDA device here; QLoRA throughput is measured on a GPU only. Skipped.")
        return
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (plumbing only)"
    results = {"gpu": gpu, "steps": args.steps, "runs": {}}
    logs = args.logs or args.results.parent / "logs"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_WORK")) as tmp:
        work = Path(tmp)
        config_dir = None if args.base else phi35_config_dir(work / "phi35-config")
        paths = {"fixed": lambda: fixed_length_dataset(work / "fixed.jsonl"), "oasst": lambda: SAMPLE}
        for data in args.datasets:
            dataset = paths[data]()
            for variant in args.variants:
                key = f"{variant}-{data}"
                results["runs"][key] = run_variant(key, config_dir, dataset, args.steps, work, args.set, args.base,
                                                   args.recipe, args.max_length, args.log_every, logs)
                # After each run: a run cut short by a time limit keeps what was measured before it.
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(results, indent=2))
    print(f"\n{results['gpu']}, {args.steps} steps per run, seq {args.max_length}, LoRA r=16 on every linear\n")
    from bench_common import table

    print(table(rows(results["runs"]), HEADER))
    print("\ngoal (one H200, train mode): the recipe >= 2x the plain shape's tokens/s at <= its peak memory. Earlier "
          "eval-mode figures (2026-11-28, not comparable): plain 12,498 tokens/s at 60.5 GB")


if __name__ == "__main__":
    main()
