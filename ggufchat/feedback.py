"""Feedback: what visitors think of answers (Like / Dislike), one CSV row each with the conversation and the settings
that produced the answer. A Space's disk does not survive a restart, so with a Hub dataset repo set the folder is
pushed there every few minutes by huggingface_hub's CommitScheduler.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

FIELDS = ("time", "feedback", "answer_index", "answer", "conversation", "model", "system", "max_tokens",
          "temperature", "top_p", "top_k", "repeat_penalty")


class Feedback:
    def __init__(self, folder: str | Path, repo: str | None = None, token: str | None = None, every_minutes: float = 5,
                 hf_api=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "feedback.csv"
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
        with self.lock:
            new = not self.path.exists()
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(row)
