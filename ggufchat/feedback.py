"""Feedback: what visitors think of answers, one CSV row each with the conversation and the settings that produced the
answer: Like / Dislike in feedback.csv, the blind side-by-side mode's votes in votes.csv (ggufchat/votes.py). A Space's
disk does not survive a restart, so with a Hub dataset repo set the folder is pushed there every few minutes by
huggingface_hub's CommitScheduler.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

from .votes import VOTE_FIELDS

FIELDS = ("time", "feedback", "answer_index", "answer", "conversation", "model", "system", "max_tokens",
          "temperature", "top_p", "top_k", "repeat_penalty")


class Feedback:
    def __init__(self, folder: str | Path, repo: str | None = None, token: str | None = None, every_minutes: float = 5,
                 hf_api=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "feedback.csv"
        self.votes = self.folder / "votes.csv"
        self.scheduler = None
        self.lock = threading.Lock()
        if repo:
            from huggingface_hub import CommitScheduler

            # hf_api: the tests' stand-in for the Hub's write API, which cannot exist offline.
            self.scheduler = CommitScheduler(repo_id=repo, repo_type="dataset", folder_path=self.folder,
                                             every=every_minutes, token=token, private=True, hf_api=hf_api)
            self.lock = self.scheduler.lock  # never push a half-written row

    def record(self, liked: bool, index: int, history: list[dict], settings: dict) -> None:
        answer = history[index]["content"] if 0 <= index < len(history) else ""
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "feedback": "like" if liked else "dislike",
               "answer_index": index, "answer": answer,
               "conversation": json.dumps(history[: index + 1], ensure_ascii=False), **settings}
        self._append(self.path, FIELDS, row)

    def record_vote(self, row: dict) -> None:
        """One vote of the side-by-side mode (VOTE_FIELDS), stamped with the time."""
        self._append(self.votes, VOTE_FIELDS, {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row})

    def _append(self, path: Path, fields: tuple[str, ...], row: dict) -> None:
        with self.lock:
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
