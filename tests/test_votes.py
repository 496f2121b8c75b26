"""The side-by-side votes' tally (ggufchat/votes.py): the file the Space writes, read back by the page and the build.
No model: rows written by the Space's own Feedback.record_vote."""

from __future__ import annotations

from ggufchat.feedback import Feedback
from ggufchat.votes import read_votes, summary, tally


def test_the_tally_reads_the_spaces_own_rows_per_pair_and_skips_hand_edited_ones(tmp_path):
    feedback = Feedback(tmp_path)
    for vote, outcome in [("A", 1), ("B", -1), ("both bad", 0), ("tie", 0), ("A", 1)]:
        feedback.record_vote({"vote": vote, "outcome": outcome, "finetune": "ft", "base": "base"})
    feedback.record_vote({"vote": "A", "outcome": 1, "finetune": "other", "base": "base"})
    feedback.record_vote({"vote": "A", "outcome": "2", "finetune": "ft", "base": "base"})  # not -1/0/1: skipped
    assert len(read_votes(feedback.votes)) == 7 and len(read_votes(feedback.votes, "ft", "base")) == 6
    t = tally(read_votes(feedback.votes, "ft", "base"))
    assert (t["n"], t["win"], t["tie"], t["loss"], t["both_bad"]) == (5, 2, 2, 1, 1)
    assert t["win_rate"] == 0.6  # (2 + 2/2) / 5
    lo, hi = t["interval"]
    assert 0 <= lo <= 0.6 <= hi <= 1
    assert summary(t).startswith("Visitors preferred the fine-tune in 60% of 5 votes (95% interval ")


def test_no_file_means_no_votes_yet(tmp_path):
    assert read_votes(tmp_path / "votes.csv") == []
    assert summary(tally([])) == "No votes yet."
