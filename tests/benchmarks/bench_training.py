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
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "benchmarks"), str(ROOT / "build")]
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


def run_variant(name: str, config_dir: Path, dataset: Path, steps: int, work: Path, sets: list[str],
                base: Path | None = None) -> dict:
    out = work / name
    source = {"random_init": "false", "model_name_or_path": str(base)} if base else {
        "random_init": "true", "config_name_or_path": str(config_dir)}
    overrides = {**source, "dataset": str(dataset),
                 "max_steps": str(steps), "eval_steps": "100000", "save_steps": "100000", "logging_steps": "1",
                 "max_length": "2048", "lora_r": "16", "eval_fraction": "0.02", **VARIANTS[name.split("-")[0]]}
    overrides.update(s.split("=", 1) for s in sets)
    args = [sys.executable, str(ROOT / "build" / "run.py"), "--recipe", "phi35-oasst1", "--stages", "data,train",
            "--output-dir", str(out)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    subprocess.run(args, check=True, cwd=ROOT)
    history = json.loads((out / "adapter" / "log_history.json").read_text())
    report = json.loads((out / "report.json").read_text())
    tokens = max(h.get("num_tokens", 0) for h in history)
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    return {"tokens": tokens, "seconds": runtime, "tokens_per_s": report["train"]["tokens_per_s"],
            "tokens_per_s_with_warmup": tokens / runtime, "peak_gpu_bytes": report["train"].get("peak_gpu_bytes"),
            "train_mode": report["train"].get("train_mode"),
            "gradient_checkpointing": report["train"].get("gradient_checkpointing"), "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (the second half is timed)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--datasets", nargs="+", choices=["fixed", "oasst"], default=["fixed", "oasst"])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a recipe override for every run (e.g. optim=adamw_torch)")
    parser.add_argument("--base", type=Path, help="an HF folder of Phi-3.5-mini's shape to train (default: random "
                        "weights built from its config for each run)")
    parser.add_argument("--results", type=Path, default=RESULTS / "training.json", help="where the JSON goes")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_training: no CUDA device here; QLoRA throughput is measured on a GPU only. Skipped.")
        return
    results = {"gpu": torch.cuda.get_device_name(0), "steps": args.steps, "runs": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_WORK")) as tmp:
        work = Path(tmp)
        config_dir = phi35_config_dir(work / "phi35-config")
        paths = {"fixed": lambda: fixed_length_dataset(work / "fixed.jsonl"), "oasst": lambda: SAMPLE}
        for data in args.datasets:
            dataset = paths[data]()
            for variant in args.variants:
                results["runs"][f"{variant}-{data}"] = run_variant(f"{variant}-{data}", config_dir, dataset,
                                                                   args.steps, work, args.set, args.base)
                # After each run: a run cut short by a time limit keeps what was measured before it.
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(results, indent=2))
    print(f"\n{results['gpu']}, {args.steps} steps per run, seq 2048, LoRA r=16 on the 4 fused modules\n")
    rows = []
    for key, r in results["runs"].items():
        plain = results["runs"].get(f"plain-{key.split('-')[1]}")
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}" if plain and r["tokens_per_s"] else ""
        peak = f"{r['peak_gpu_bytes'] / 1e9:.1f} GB" if r["peak_gpu_bytes"] else "?"
        mode = ("train" if r["train_mode"] else "EVAL") + (", ckpt" if r["gradient_checkpointing"] else "")
        rows.append([key, f"{r['tokens_per_s'] or 0:,.0f}", ratio, peak, mode,
                     f"{r['tokens']:,} in {r['seconds']:.0f} s"])
    from bench_common import table

    print(table(rows, ["run", "tokens/s", "x plain", "peak", "mode", "tokens read (with warm-up)"]))
    print("\ngoal (one H200, train mode): the recipe >= 2x the plain shape's tokens/s at <= its peak memory. Earlier "
          "eval-mode figures (2026-11-28, not comparable): plain 12,498 tokens/s at 60.5 GB")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
