"""Visitors' votes in the blind side-by-side mode, and the win rate both they and the build's judged comparison
report: wins + half the ties over the comparisons, with a percentile bootstrap interval. The Space writes votes
(feedback.Feedback.record_vote); the build reads them back into the model card (oasstbuild/card.py).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

# What a visitor can answer, and what each means for the fine-tune (the pair's first model): +1 its answer was
# preferred, -1 the base's, 0 neither ("both bad" counts as a tie: neither answer won).
CHOICES = ("A", "B", "tie", "both bad")
VOTE_FIELDS = ("time", "pair", "vote", "winner", "outcome", "finetune", "base", "shown_as_a", "shown_as_b", "answer_a",
               "answer_b", "conversation", "system", "max_tokens", "temperature", "top_p", "top_k", "repeat_penalty",
               "seed")


def win_tie_loss(outcomes: list[int], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Counts of +1/0/-1 outcomes and the win rate (wins + ties/2) / n with a percentile bootstrap interval
    (resampling comparisons with replacement, `n_boot` times, seeded: the same input gives the same interval)."""
    n = len(outcomes)
    if n == 0:
        return {"n": 0, "win": 0, "tie": 0, "loss": 0, "win_rate": None, "interval": None, "level": level}
    if any(o not in (-1, 0, 1) for o in outcomes):
        raise ValueError("outcomes must be -1, 0 or +1")
    rate = lambda xs: (sum(1 for x in xs if x > 0) + 0.5 * sum(1 for x in xs if x == 0)) / len(xs)  # noqa: E731
    rng = random.Random(seed)
    boots = sorted(rate(rng.choices(outcomes, k=n)) for _ in range(n_boot))
    lo_i = int((1 - level) / 2 * n_boot)
    hi_i = min(n_boot - 1, int((1 + level) / 2 * n_boot))
    return {
        "n": n,
        "win": sum(1 for o in outcomes if o > 0),
        "tie": sum(1 for o in outcomes if o == 0),
        "loss": sum(1 for o in outcomes if o < 0),
        "win_rate": round(rate(outcomes), 4),
        "interval": [round(boots[lo_i], 4), round(boots[hi_i], 4)],
        "level": level,
    }


def read_votes(path: str | Path, finetune: str | None = None, base: str | None = None) -> list[dict]:
    """The vote rows of a votes.csv (none if it does not exist), only those of the pair (finetune, base) if given."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if (finetune is None or r.get("finetune") == finetune)
            and (base is None or r.get("base") == base)]


def tally(rows: list[dict]) -> dict:
    """win_tie_loss of the fine-tune over the rows, plus how many ties were "both bad". Rows with an outcome that is
    not -1/0/1 (a hand-edited file) are skipped."""
    outcomes = [int(r["outcome"]) for r in rows if r.get("outcome") in ("-1", "0", "1")]
    both_bad = sum(1 for r in rows if r.get("vote") == "both bad" and r.get("outcome") == "0")
    return {**win_tie_loss(outcomes), "both_bad": both_bad}


def summary(t: dict, subject: str = "the fine-tune") -> str:
    """One sentence for the page and the card."""
    if not t["n"]:
        return "No votes yet."
    lo, hi = t["interval"]
    return (f"Visitors preferred {subject} in {t['win_rate']:.0%} of {t['n']} votes ({t['level']:.0%} interval "
            f"{lo:.0%}–{hi:.0%}; win {t['win']} / tie {t['tie']} (both bad {t['both_bad']}) / loss {t['loss']}).")
