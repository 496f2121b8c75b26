"""The judged comparison (recipe judge_model, off by default): verdicts in both orders -> win/tie/loss with a
bootstrap interval (pure functions), and the judge call's plumbing with a tiny Phi-3 as a (meaningless) judge."""

from __future__ import annotations

import pytest
from oasstbuild import judge


def test_verdicts_are_read_from_the_judges_reply():
    assert judge.parse_verdict("A") == "A"
    assert judge.parse_verdict(" b.") == "B"
    assert judge.parse_verdict("Tie: both are fine") == "tie"
    assert judge.parse_verdict("Answer B is better") == "B"
    assert judge.parse_verdict("I cannot decide") == "tie"  # nothing usable counts as a tie


def test_both_orders_must_agree_for_a_win():
    # base_first: A = base, B = fine-tune; finetuned_first: A = fine-tune, B = base
    assert judge.outcome("B", "A") == 1  # fine-tune preferred in both orders
    assert judge.outcome("A", "B") == -1  # base preferred in both
    assert judge.outcome("B", "tie") == 1 and judge.outcome("tie", "B") == -1
    assert judge.outcome("A", "A") == 0  # the judge just likes position A: no information, a tie
    assert judge.outcome("B", "B") == 0
    assert judge.outcome("tie", "tie") == 0


def test_win_tie_loss_and_its_bootstrap_interval():
    outcomes = [1] * 30 + [0] * 10 + [-1] * 20
    r = judge.win_tie_loss(outcomes, n_boot=2000, seed=3)
    assert (r["n"], r["win"], r["tie"], r["loss"]) == (60, 30, 10, 20)
    assert r["win_rate"] == pytest.approx((30 + 5) / 60, abs=1e-4)
    lo, hi = r["interval"]
    assert lo < r["win_rate"] < hi
    # Binomial-like spread: the standard error is about sqrt(p(1-p)/n) ~ 0.06, so the 95% interval is ~0.23 wide.
    assert 0.15 < hi - lo < 0.32
    assert judge.win_tie_loss(outcomes, n_boot=2000, seed=3) == r  # seeded: reproducible
    # More prompts, narrower interval.
    r4 = judge.win_tie_loss(outcomes * 4, n_boot=2000, seed=3)
    assert r4["interval"][1] - r4["interval"][0] < (hi - lo) * 0.7


def test_win_tie_loss_edge_cases():
    assert judge.win_tie_loss([1, 1, 1])["interval"] == [1.0, 1.0]
    assert judge.win_tie_loss([-1, -1])["win_rate"] == 0.0
    assert judge.win_tie_loss([])["win_rate"] is None
    with pytest.raises(ValueError):
        judge.win_tie_loss([2])


@pytest.mark.slow
def test_a_local_model_judges_in_both_orders(tiny_phi3_hf):
    # The tiny Phi-3 has random weights: its verdicts mean nothing. This proves the plumbing only (chat template,
    # generate, parsing, both orders per prompt, statistics).
    prompts = ["What is 2 + 2?", "Name a colour."]
    r = judge.judge(str(tiny_phi3_hf), prompts, ["4", "blue"], ["four", "red"], seed=0)
    assert r["n"] == 2 and r["win"] + r["tie"] + r["loss"] == 2
    assert len(r["verdicts"]) == 2
    for v in r["verdicts"]:
        assert v["base_first"] in ("A", "B", "tie") and v["finetuned_first"] in ("A", "B", "tie")
        assert len(v["raw"]) == 2


def test_a_judge_needs_the_base_scored(tiny_phi3_hf):
    from conftest import tiny_recipe
    from oasstbuild.common import BuildError

    with pytest.raises(BuildError, match="needs eval_base"):
        tiny_recipe(tiny_phi3_hf, judge_model=str(tiny_phi3_hf), eval_base=False)


@pytest.mark.slow
def test_the_evaluate_stage_judges_when_asked_and_repeats_its_samples(tiny_phi3_run, tiny_phi3_hf, tmp_path):
    """Off by default; with judge_model set, the evaluate stage judges base vs fine-tune on held-out prompts and the
    card says so. The side-by-side answers are seeded: a rerun gives the same ones."""
    import json

    from conftest import TINY_RECIPE, check_ok, linked_copy, run_build

    before = json.loads((tiny_phi3_run / "report.json").read_text())
    assert before["judged"] is None and len(before["side_by_side"]["answers"]) == 2
    out = linked_copy(tiny_phi3_run, tmp_path / "out")
    args = ["--recipe", TINY_RECIPE, "--model_name_or_path", tiny_phi3_hf, "--output-dir", out]
    check_ok(run_build(*args, "--stages", "evaluate,publish", "--judge_model", tiny_phi3_hf, "--judge_prompts", "3"))
    report = json.loads((out / "report.json").read_text())
    assert report["side_by_side"] == before["side_by_side"]
    j = report["judged"]
    assert j["n"] == 3 and j["win"] + j["tie"] + j["loss"] == 3 and len(j["verdicts"]) == 3
    assert f"Judged by `{tiny_phi3_hf}` on 3 held-out prompts" in (out / "hub" / "README.md").read_text()
