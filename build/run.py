"""Build the Space's model: oasst1 -> QLoRA SFT -> merge -> GGUF -> quants -> evaluation -> Hub.

    # the real model (GPU): Phi-3.5-mini-instruct + QLoRA on all of oasst1, into outputs/phi35-oasst1/
    python build/run.py

    # every stage on a CPU in minutes, offline: SmolLM2-135M-Instruct on the shipped 80-tree oasst sample
    python build/run.py --recipe smoke

    # any recipe field from the command line; publish to your repo (token from HF_TOKEN or `hf auth login`)
    python build/run.py --learning_rate 1e-4 --num_train_epochs 2 --hub_repo you/phi35-oasst1-gguf

    # a subset of stages; stages whose outputs are valid are skipped unless --force
    python build/run.py --recipe smoke --stages quantize,evaluate --quant_types Q4_K_M Q8_0
    python build/run.py --recipe smoke --stages train --force

    # a llama.cpp checkout instead of the converter from the llama-cpp-python sdist
    python build/run.py --llama-cpp-dir ~/src/llama.cpp

    # every GPU of the machine (DDP, or FSDP-QLoRA with build/accelerate_configs/fsdp_qlora.yaml); same global batch
    accelerate launch --config_file build/accelerate_configs/multi_gpu.yaml build/run.py

Outputs in --output-dir (default outputs/<recipe>): data/, adapter/, merged/, gguf/, hub/ (exactly what is pushed)
and report.json. A run killed during training resumes from its latest checkpoint when started again.
Launched as several processes, all of them train; only the main one runs the other stages and writes outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Before torch or llama.cpp load libgomp: idle OpenMP workers sleep instead of spinning. Spinning workers on a small
# CPU with any other load slow everything down up to 50x (measured on 2 cores with a compile running beside: a tiny
# QLoRA step 2.4 s -> 0.05 s, llama.cpp decode 0.3 -> 38 tokens/s with 2 threads). Idle, it costs training ~10%
# and prompt processing ~5%; only the decode speed of very small models drops (SmolLM2-135M: 85 -> 25 tokens/s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the oasstbuild package sits beside this file
sys.path.append(str(Path(__file__).resolve().parents[1]))  # ggufchat: evaluate loads llama.cpp the way the Space does

# Stage modules import only the standard library at import time: torch & co. load inside the stages.
from oasstbuild import (  # noqa: E402
    basemodel,
    data,
    distributed,
    evaluation,
    export,
    merge,
    preflight,
    publish,
    quantize,
    train,
)
from oasstbuild.architectures import get_arch  # noqa: E402
from oasstbuild.common import (  # noqa: E402
    BuildError,
    OutputDir,
    drop_marker,
    fingerprint,
    human_bytes,
    log,
    read_json,
    read_marker,
    table,
    write_json,
    write_marker,
)
from oasstbuild.recipe import STAGES, Recipe, load_recipe, parse_args  # noqa: E402

NEEDS_BASE = {"data", "train", "merge"}


class Stages:
    """Runs stages in order, skipping those whose marker matches; chains fingerprints so upstream changes propagate."""

    def __init__(
        self,
        out: OutputDir,
        recipe: Recipe,
        selected: list[str],
        force: bool,
        report: dict,
        procs: distributed.Procs = distributed.Procs(),
    ):
        self.out, self.recipe, self.selected, self.force, self.report = out, recipe, selected, force, report
        self.procs = procs
        self.upstream = ""  # digest of the previous stage's completed run
        self.timings: dict[str, dict] = {}

    def fingerprint(self, name: str, extra=None) -> str:
        return fingerprint(name, self.recipe.fields_for(name), self.upstream, extra)

    def run(self, name: str, fn, extra=None, into=None) -> dict | None:
        """fn(fp) -> (result, files). Returns the stage's result (fresh or from its marker), None past the selection.
        The result goes into report.json under the stage's name, or as the keys `into(result)` returns."""
        if STAGES.index(name) > max(STAGES.index(s) for s in self.selected):
            return None
        fp = self.fingerprint(name, extra() if callable(extra) else extra)
        if not self.procs.is_main and name != "train":
            return self._follow(name, fp)
        marker = read_marker(self.out, name, fp)
        if name not in self.selected:
            if marker is None:
                raise BuildError(f"stage '{name}' has no up-to-date output in {self.out.root}: add it to --stages")
        elif marker is not None and not self.force:
            if self.procs.is_main:
                log(f"[{name}] up to date, skipped (--force to redo)")
            self.timings[name] = {"status": "skipped", "seconds": marker["seconds"]}
        else:
            if self.procs.is_main:
                log(f"[{name}] running")
                drop_marker(self.out, name)  # a stage that dies half-way must not look complete next time
            t0 = time.perf_counter()
            result, files = fn(fp)
            seconds = time.perf_counter() - t0
            if not self.procs.is_main:  # a training rank besides the main one: the main process records the stage
                return result
            marker = write_marker(self.out, name, fp, result, files, seconds)
            self.timings[name] = {"status": "ran", "seconds": round(seconds, 1)}
            log(f"[{name}] done in {seconds:.1f} s")
        self.upstream = marker["digest"]
        if not self.procs.is_main:  # only train gets here: nothing to record
            return marker["result"]
        self.report.update(into(marker["result"]) if into else {name: marker["result"]})
        self.report.setdefault("stage_seconds", {})[name] = marker["seconds"]
        write_json(self.out.report, self.report)
        if self.procs.multi and STAGES.index(name) < STAGES.index("train"):
            distributed.barrier(self.procs)  # the other ranks wait for this stage's output (see _follow)
        return marker["result"]

    def _follow(self, name: str, fp: str) -> dict:
        """On a rank other than the main one, a stage before train: wait until the main process has run it, then
        take its marker (for the fingerprint chain). Nothing is written."""
        distributed.barrier(self.procs)
        marker = read_marker(self.out, name, fp)
        if marker is None:
            raise BuildError(f"rank {self.procs.rank}: the main process's '{name}' stage left no matching output")
        self.upstream = marker["digest"]
        return marker["result"]


def summary(stages: Stages, report: dict) -> str:
    rows = [[n, t["status"], f"{t['seconds']:.1f}"] for n, t in stages.timings.items()]
    text = "Stages\n" + table(rows, ["stage", "status", "seconds"])
    if report.get("quants"):
        qrows = [
            [q["type"], q["file"], human_bytes(q["bytes"]), q.get("perplexity", ""), q.get("tokens_per_s", "")]
            for q in report["quants"]
        ]
        for q in report.get("base") or []:
            qrows.append([f"base {q['type']}", q["file"], human_bytes(q["bytes"]), q["perplexity"], q["tokens_per_s"]])
        text += "\n\nGGUF files\n" + table(qrows, ["type", "file", "size", "perplexity", "tokens/s"])
    for q, c in (report.get("finetune_vs_base") or {}).items():
        text += (
            f"\nfine-tune vs base ({q}): held-out perplexity {c['base']:.3f} -> {c['finetuned']:.3f} "
            f"({c['change']:+.1%})"
        )
    if report.get("judged"):
        j = report["judged"]
        text += (
            f"\njudged by {j['judge_model']} on {j['n']} held-out prompts (both orders): fine-tune win {j['win']} / "
            f"tie {j['tie']} / loss {j['loss']}, win rate {j['win_rate']} ({j['level']:.0%} interval {j['interval']})"
        )
    if report.get("train"):
        t = report["train"]
        text += (
            f"\n\ntrain loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}, eval loss "
            f"{t['eval_loss_start']:.3f} -> {t['eval_loss']:.3f} ({t['steps']} steps; adapter kept: step "
            f"{t.get('best_step', t['steps'])}, the lowest eval loss)"
        )
    return text


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "datasets",
        "llama_cpp_python",
        "huggingface_hub",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _main(argv) -> int:
    args, overrides = parse_args(argv, __doc__)
    recipe = load_recipe(args.recipe, overrides)
    out = OutputDir(Path(args.output_dir or Path("outputs") / recipe.name).resolve())
    procs = distributed.from_env()
    if procs.multi:
        distributed.accumulation_steps(recipe.gradient_accumulation_steps, procs)  # fails in one sentence, early

    # ---- Preflight: what can fail in seconds must not fail after hours of training -------------------------------
    if "train" in args.stages:
        preflight.check_cuda(recipe)
    preflight.check_build_tools(args.stages)
    preflight.check_sources(recipe, args.stages, NEEDS_BASE)
    preflight.check_merge_memory(recipe, args.stages)  # after check_sources: the base's config can be had
    if "publish" in args.stages and recipe.hub_repo and procs.is_main:
        publish.preflight(recipe)
    distributed.start(procs)
    out.root.mkdir(parents=True, exist_ok=True)
    if procs.is_main:
        where = f" on {procs.world_size} processes (only train runs on all)" if procs.multi else ""
        log(f"recipe {recipe.name} -> {out.root}; stages: {','.join(args.stages)}{where}")
    base = model_type = None
    if NEEDS_BASE & set(args.stages):
        t0 = time.perf_counter()
        if not procs.is_main:
            distributed.barrier(procs)  # the main process downloads or materialises the base first
        base = basemodel.resolve(recipe, out.base)
        if procs.is_main:
            distributed.barrier(procs)
        model_type = basemodel.model_type(base)
        get_arch(model_type).check_gguf_name(recipe.gguf_name)
        if procs.is_main:
            log(f"[base] {base} ({model_type}) ready in {time.perf_counter() - t0:.1f} s")

    report = read_json(out.report) or {}
    report.update(recipe=recipe.name, output_dir=str(out.root), versions=versions())
    stages = Stages(out, recipe, args.stages, args.force, report, procs)

    # ---- 1. data: oasst1 trees -> best-ranked multi-turn conversations ------------------------------------------
    stages.run("data", lambda fp: data.run(recipe, base, out.data), extra=lambda: basemodel.source_id(recipe))

    # ---- 2. train: QLoRA SFT (TRL + PEFT), resumable -------------------------------------------------------------
    stages.run("train", lambda fp: train.run(recipe, base, out.data, out.adapter, fp, args.force, procs))
    if not procs.is_main:
        return 0  # merge, export, quantize, evaluate and publish run on the main process alone

    # ---- 3. merge: 16-bit base + adapter, logits checked -----------------------------------------------------------
    stages.run("merge", lambda fp: merge.run(recipe, base, out.adapter, out.data, out.merged))

    # ---- 4. export: llama.cpp convert_hf_to_gguf.py -> f16 GGUF ---------------------------------------------------
    exported = stages.run(
        "export", lambda fp: export.run(recipe, out.merged, out.gguf), extra=lambda: export.converter_id(recipe)
    )
    f16 = out.gguf / exported["file"] if exported else None

    # ---- 5. quantize: llama_model_quantize for each type ------------------------------------------------------------
    quantized = stages.run("quantize", lambda fp: quantize.run(recipe, f16, out.gguf))

    # ---- 6. evaluate: load, size, perplexity, tokens/s, sample for every GGUF ---------------------------------------
    if quantized:
        files = [("F16", f16)] + [(q, out.gguf / v["file"]) for q, v in quantized["types"].items()]

        def evaluate(fp):
            # The base is scored through the same export, quantize and llama.cpp path, for the comparison.
            source = (base or basemodel.resolve(recipe, out.base)) if recipe.eval_base else None
            return evaluation.run(recipe, out.merged, files, out.data / "eval.jsonl", source, out.base_gguf)

        stages.run(
            "evaluate",
            evaluate,
            into=lambda r: {"base": None, "finetune_vs_base": None, "side_by_side": None, "judged": None, **r},
        )

    # ---- 7. publish: hub/ (+ upload when hub_repo is set) -----------------------------------------------------------
    if model_type is None and out.merged.joinpath("config.json").is_file():
        model_type = read_json(out.merged / "config.json")["model_type"]
    stages.run("publish", lambda fp: publish.run(recipe, report, out.gguf, out.adapter, out.hub, model_type or "",
                                                      out.base_gguf))

    print(summary(stages, report), flush=True)
    print(f"\nreport: {out.report}", flush=True)
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
