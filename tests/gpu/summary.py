"""One table from tests/gpu/check.sh's outputs: the benchmark's runs and the end-to-end run's stages.

    python3 tests/gpu/summary.py TRAINING_JSON E2E_REPORT_JSON STAGES_RUN
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def main(training: str, e2e: str, stages: str) -> None:
    bench, report = load(training), load(e2e)
    rows = []
    for name, r in bench.get("runs", {}).items():
        plain = bench["runs"].get(f"plain-{name.split('-', 1)[1]}")
        ratio = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x" if plain and r["tokens_per_s"] else ""
        peak = f"{r['peak_gpu_bytes'] / 1e9:.1f} GB" if r.get("peak_gpu_bytes") else "?"
        mode = ("train" if r.get("train_mode") else "EVAL") + (" + ckpt" if r.get("gradient_checkpointing") else "")
        rows.append([f"bench {name}", f"{r['tokens_per_s'] or 0:,.0f} tokens/s {ratio}", peak, mode])
    if not bench:
        rows.append(["bench", "no result (see bench_training.log)", "", ""])
    train = report.get("train", {})
    for stage in filter(None, stages.split(",")):
        seconds = report.get("stage_seconds", {}).get(stage)
        detail = ""
        if stage == "train" and train:
            detail = (f"{train['steps']} steps, loss {train['first_loss']:.3f} -> {train['last_loss']:.3f}, best "
                      f"step {train.get('best_step')}, {train.get('tokens_per_s') or 0:,.0f} tokens/s")
            peak = f"{train['peak_gpu_bytes'] / 1e9:.1f} GB" if train.get("peak_gpu_bytes") else "?"
        elif stage == "merge" and report.get("merge"):
            detail, peak = f"merged vs adapter logits within {report['merge']['max_abs_logit_diff']:.2e} (on CPU)", ""
        elif stage == "export" and report.get("export"):
            detail, peak = f"{report['export']['bytes'] / 1e9:.2f} GB f16 GGUF", ""
        elif stage == "evaluate" and report.get("quants"):
            detail = ", ".join(f"{q['type']} ppl {q['perplexity']:.1f}" for q in report["quants"])
            peak = ""
        else:
            peak = ""
        status = f"{seconds:.0f} s" if seconds is not None else "did not finish (see e2e.log)"
        rows.append([f"e2e {stage}", f"{status}; {detail}" if detail else status, peak,
                     "train" if stage == "train" and train.get("train_mode") else ""])
    header = ["what", "result", "peak GPU", "mode"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    print("\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]))


if __name__ == "__main__":
    main(*(sys.argv[1:4] + [""] * (4 - len(sys.argv))))
