"""End to end: `python build/run.py --recipe smoke` from an empty output dir, offline, on this CPU."""

from __future__ import annotations

import json
import math

import pytest
from conftest import check_ok, linked_copy, run_build
from helpers import base_adds_bos, gguf_add_bos

pytestmark = pytest.mark.slow
NAME = "SmolLM2-135M-Instruct-oasst1-smoke"


@pytest.fixture(scope="module")
def report(smoke_run) -> dict:
    return json.loads((smoke_run / "report.json").read_text())


def test_hub_folder_is_exactly_what_would_be_pushed(smoke_run):
    assert sorted(p.name for p in (smoke_run / "hub").iterdir()) == sorted(
        ["README.md", "loss_curve.png", f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q5_K_M.gguf"]
    )
    assert (smoke_run / "hub" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in ("data", "adapter", "merged", "gguf"):
        assert (smoke_run / d).is_dir()


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M"])
def test_quants_load_in_llama_cpp_and_answer(smoke_run, quant):
    from llama_cpp import Llama

    llm = Llama(model_path=str(smoke_run / "hub" / f"{NAME}-{quant}.gguf"), n_ctx=512, n_threads=2, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0.0
        )
    finally:
        llm.close()
    answer = out["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


def test_training_loss_falls(report, smoke_run):
    train = report["train"]
    assert train["steps"] == 16 and train["last_loss"] < train["first_loss"]
    # Steady-state speed from TRL's token count over the last 8 logged steps: more than 1 token/s, below any CPU's peak.
    assert 1 < train["tokens_per_s"] < 1e6
    assert train["eval_loss"] < train["eval_loss_start"]
    history = json.loads((smoke_run / "adapter" / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    half = len(losses) // 2
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half  # epoch 2 below epoch 1


def test_perplexities_are_finite_and_ordered_sensibly(report):
    ppl = {q["type"]: q["perplexity"] for q in report["quants"]}
    assert set(ppl) == {"F16", "Q4_K_M", "Q5_K_M"}
    assert all(math.isfinite(v) and 1 < v < 100 for v in ppl.values())
    for quant in ("Q4_K_M", "Q5_K_M"):
        assert ppl["F16"] <= ppl[quant] * 1.01, "quantization should not improve on f16"
        assert ppl[quant] <= ppl["F16"] * 1.15, "a 4-5 bit quant stays close to f16"
    sizes = {q["type"]: q["bytes"] for q in report["quants"]}
    assert sizes["Q4_K_M"] < sizes["Q5_K_M"] < sizes["F16"]


def test_f16_perplexity_matches_the_merged_hf_model(smoke_run, report):
    """The same assistant tokens scored by transformers on merged/: the f16 GGUF must agree (conversion check)."""
    import math

    import torch
    from oasstbuild import evaluation
    from oasstbuild.recipe import load_recipe
    from oasstbuild.train import mask_template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe("smoke")
    tok = AutoTokenizer.from_pretrained(smoke_run / "merged")
    conversations = evaluation.load_conversations(smoke_run / "data" / "eval.jsonl", recipe.eval_conversations)
    inputs = evaluation.score_inputs(tok, mask_template(recipe, tok), conversations, recipe.eval_ctx)
    model = AutoModelForCausalLM.from_pretrained(smoke_run / "merged", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in inputs:
            logits = model(torch.tensor([ids])).logits[0].numpy()
            nll, n = evaluation.nll_sum(logits, ids, mask)
            total, count = total + nll, count + n
    f16 = next(q for q in report["quants"] if q["type"] == "F16")
    assert count == f16["tokens_scored"]
    assert abs(math.exp(total / count) / f16["perplexity"] - 1) < 0.01


def test_report_contract(report):
    assert {"trees", "threads", "dropped", "turns", "tokens"} <= set(report["data"])
    assert {"first_loss", "last_loss", "eval_loss"} <= set(report["train"])
    for q in report["quants"]:
        assert {"type", "file", "bytes", "perplexity", "tokens_per_s"} <= set(q)
        assert q["tokens_per_s"] > 0 and q["sample"]
    assert set(report["stage_seconds"]) == {"data", "train", "merge", "export", "quantize", "evaluate", "publish"}
    assert report["merge"]["max_abs_logit_diff"] <= report["merge"]["tolerance"]


def test_card_front_matter_table_and_usage(smoke_run, report):
    import yaml

    card = (smoke_run / "hub" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["datasets"] == ["OpenAssistant/oasst1"] and front["license"] == "apache-2.0"
    assert {"gguf", "llama-cpp", "qlora"} <= set(front["tags"])
    for q in report["quants"]:
        assert q["file"] in card and f"{q['perplexity']:.3f}" in card
    assert "Llama.from_pretrained" in card and "llama-cli" in card
    assert f"MODEL_FILES={NAME}-Q4_K_M.gguf,{NAME}-Q5_K_M.gguf" in card and "MODEL_REPO=" in card
    assert "![loss curve](loss_curve.png)" in card


def test_rerun_skips_every_stage(smoke_run, tmp_path):
    out = linked_copy(smoke_run, tmp_path / "out")
    proc = run_build("--recipe", "smoke", "--output-dir", out)
    check_ok(proc)
    for stage in ("data", "train", "merge", "export", "quantize", "evaluate", "publish"):
        assert f"[{stage}] up to date, skipped" in proc.stderr


def test_a_new_quant_list_requantizes_without_retraining(smoke_run, tmp_path):
    out = linked_copy(smoke_run, tmp_path / "out")
    before = {s: (out / ".stages" / f"{s}.json").read_text() for s in ("data", "train", "merge", "export")}
    proc = run_build("--recipe", "smoke", "--output-dir", out, "--stages", "quantize", "--quant_types", "Q8_0")
    check_ok(proc)
    assert "[quantize] running" in proc.stderr and "[train]" not in proc.stderr
    assert before == {s: (out / ".stages" / f"{s}.json").read_text() for s in before}
    assert sorted(p.name for p in (out / "gguf").glob("*.gguf")) == [f"{NAME}-Q8_0.gguf", f"{NAME}-f16.gguf"]
    # the evaluation of the old quants is now out of date: asking for it alone says so
    proc = run_build("--recipe", "smoke", "--output-dir", out, "--stages", "publish", "--quant_types", "Q8_0")
    assert proc.returncode == 2 and "stage 'evaluate' has no up-to-date output" in proc.stderr


def test_force_redoes_a_stage_that_was_up_to_date(smoke_run, tmp_path):
    out = linked_copy(smoke_run, tmp_path / "out")
    marker = out / ".stages" / "quantize.json"
    before = json.loads(marker.read_text())
    proc = run_build("--recipe", "smoke", "--output-dir", out, "--stages", "quantize")
    check_ok(proc)
    assert "[quantize] up to date, skipped" in proc.stderr and json.loads(marker.read_text()) == before
    proc = run_build("--recipe", "smoke", "--output-dir", out, "--stages", "quantize", "--force")
    check_ok(proc)
    assert "[quantize] running" in proc.stderr and "[export]" not in proc.stderr
    assert json.loads(marker.read_text())["digest"] != before["digest"]
    q4 = f"gguf/{NAME}-Q4_K_M.gguf"
    assert (out / q4).stat().st_ino != (smoke_run / q4).stat().st_ino, "the file was written anew"
    # what was computed from the old quants is out of date now
    proc = run_build("--recipe", "smoke", "--output-dir", out, "--stages", "publish")
    assert proc.returncode == 2 and "stage 'evaluate' has no up-to-date output" in proc.stderr


def gguf_tensor_types(gguf_path, converter) -> dict[str, str]:
    """{tensor name: ggml type name} read from the file itself, with the gguf-py of the converter that made it."""
    import subprocess
    import sys

    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader; "
        "print(json.dumps({t.name: t.tensor_type.name for t in GGUFReader(sys.argv[2]).tensors}))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(converter / "gguf-py"), str(gguf_path)],
                          capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M"])
def test_quant_fallbacks_are_counted(smoke_run, report, quant):
    """SmolLM2's hidden size, 576, is no multiple of 256: K-quants fall back on those tensors. The report's count is
    the number of tensors llama.cpp's log names as falling back, and the file stores each in the type it names."""
    import re
    from pathlib import Path

    info = report["quantize"]["types"][quant]
    log = (smoke_run / ".stages" / f"quantize-{quant}.log").read_text()
    named = dict(re.findall(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by 256.*-> falling back to\s+(\w+)", log))
    assert len(named) > 0
    assert info["fallback_tensors"] == len(named) and info["tensors"] > len(named)
    types = gguf_tensor_types(smoke_run / "gguf" / info["file"], Path(report["export"]["converter"]))
    assert {name: types[name].lower() for name in named} == named


def test_gguf_keeps_the_bases_bos_setting(smoke_run):
    expected = base_adds_bos(smoke_run / "base")
    for gguf in sorted((smoke_run / "gguf").glob("*.gguf")):
        assert gguf_add_bos(gguf) is expected, gguf.name


def test_the_base_model_is_scored_the_same_way(smoke_run, report):
    """The evaluation table's base row: SmolLM2 itself through the same export, quantize and llama.cpp scoring, on
    the same token ids; the fine-tune must have lowered held-out perplexity (its eval loss fell in training)."""
    ours = {q["type"]: q for q in report["quants"]}
    base = {q["type"]: q for q in report["base"]}
    assert set(base) == {"F16", "Q4_K_M"}
    for kind, row in base.items():
        assert row["file"] == f"{NAME}-base-{'f16' if kind == 'F16' else kind}.gguf"
        assert row["tokens_scored"] == ours[kind]["tokens_scored"]
        change = report["finetune_vs_base"][kind]
        assert change == {"base": row["perplexity"], "finetuned": ours[kind]["perplexity"],
                          "change": round(ours[kind]["perplexity"] / row["perplexity"] - 1, 4)}
    assert report["finetune_vs_base"]["F16"]["change"] < 0
    card = (smoke_run / "hub" / "README.md").read_text()
    assert "| base model, F16 |" in card and "the fine-tune lowered held-out perplexity by" in card
    assert not any("base" in p.name for p in (smoke_run / "hub").iterdir()), "the base is never published"


def test_base_and_finetuned_answer_the_same_held_out_prompts(smoke_run, report):
    """Side by side in report.json and the card: held-out first prompts, the base's and the fine-tune's answers with
    the same sampling and seed (Q4_K_M both, the file the Space serves)."""
    sbs = report["side_by_side"]
    assert sbs["type"] == "Q4_K_M" and sbs["seed"] == 1234 and sbs["max_tokens"] == 64
    assert len(sbs["answers"]) == 3
    held_out = [json.loads(x)["messages"] for x in (smoke_run / "data" / "eval.jsonl").read_text().splitlines()]
    firsts = [next(m["content"] for m in c if m["role"] == "user") for c in held_out]
    for a in sbs["answers"]:
        assert a["prompt"] in firsts
        assert a["base"] and a["finetuned"]
    assert any(a["base"] != a["finetuned"] for a in sbs["answers"]), "the two models answered identically"
    card = (smoke_run / "hub" / "README.md").read_text()
    assert "## Base vs fine-tuned" in card and "| prompt | base model | fine-tuned |" in card
    assert card.count("\n| ", card.index("| prompt | base model")) >= 3
    assert "judged" not in report or report["judged"] is None  # off by default
