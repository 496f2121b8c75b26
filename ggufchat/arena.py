"""The blind side-by-side mode: a message answered by two models at once (the fine-tune and its base), shown as A and
B in an order drawn for each message, with the same sampling and seed; the visitor votes, then the names are shown.

Owns the rounds this server dealt. The page (app.py) keeps only a round's id; what was shown, in which order, and
whether it was voted on stays here, so a vote names nothing but A, B, tie or both bad, counts once, and is recorded
with the answers as the visitor saw them (feedback.Feedback.record_vote).
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass, field

from .errors import BadRequest, Busy, ConfigError, EngineError
from .turns import Done, Reading, Store, Waiting
from .votes import CHOICES, read_votes, tally

KEEP_ROUNDS = 10_000  # rounds remembered for a vote; the oldest are forgotten first (a visitor who never votes)


@dataclass
class Round:
    """One message answered by both models: `shown` is (label shown as A, label shown as B)."""

    id: str
    shown: tuple[str, str]
    seed: int
    message: str
    past: list[dict]
    system: str
    settings: dict  # max_tokens and sampling
    answers: list[str] = field(default_factory=lambda: ["", ""])
    complete: bool = False  # both answers ended normally: only then can it be voted on
    voted: bool = False


class Arena:
    """Rounds of `finetune` against `base`, both served by `store`; votes go to `feedback`."""

    def __init__(self, store: Store, finetune: str, base: str, feedback):
        for label in (finetune, base):
            if label not in store.labels:
                raise ConfigError(f"ARENA_MODELS names {label!r}, which is not served; choose two of: "
                                  f"{', '.join(store.labels)}.")
        if finetune == base:
            raise ConfigError("ARENA_MODELS names the same model twice; name the fine-tune, then its base.")
        self.store, self.finetune, self.base, self.feedback = store, finetune, base, feedback
        self.rounds: dict[str, Round] = {}
        self.lock = threading.Lock()

    def deal(self, message: str, past: list[dict], system: str, settings: dict) -> Round:
        """A new round: the order drawn at random (a visitor must not learn which side is which from the layout)."""
        pair = (self.finetune, self.base)
        shown = pair if secrets.randbelow(2) else pair[::-1]
        r = Round(secrets.token_urlsafe(12), shown, secrets.randbelow(2**31), message, past, system, settings)
        with self.lock:
            self.rounds[r.id] = r
            while len(self.rounds) > KEEP_ROUNDS:
                self.rounds.pop(next(iter(self.rounds)))
        return r

    def answer(self, r: Round, pace: float):
        """Both answers at once: yields (text A, text B) as either grows; a side that cannot answer shows its notice.
        The two turns are read in turn in this thread (each yields at least every `pace` s while streaming, every
        second while waiting), so that closing this generator (Stop, a closed tab) closes both and frees both seats."""
        sampling = {k: v for k, v in r.settings.items() if k != "max_tokens"}
        turns = [self.store.turn(label, r.system, r.past, r.message, r.settings["max_tokens"], sampling, pace,
                                 seed=r.seed) for label in r.shown]
        texts, ended = ["", ""], [False, False]
        try:
            while not all(ended):
                for side, turn in enumerate(turns):
                    if ended[side]:
                        continue
                    try:
                        item = next(turn)
                    except StopIteration:
                        ended[side] = True
                        continue
                    except (BadRequest, ConfigError, Busy, EngineError) as err:
                        ended[side], texts[side] = True, f"⚠️ {err}"
                        r.answers[side] = None  # not an answer: the round cannot be voted on
                        continue
                    if isinstance(item, Waiting):
                        texts[side] = f"⏳ Waiting for the model: {item.ahead} ahead."
                    elif isinstance(item, Reading):
                        texts[side] = f"⏳ Reading the conversation: {100 * item.done // item.total}%"
                    elif isinstance(item, Done):
                        ended[side] = True
                    else:
                        texts[side] = r.answers[side] = item
                    yield tuple(texts)
        finally:
            for turn in turns:
                turn.close()
        r.complete = all(a is not None for a in r.answers)

    def vote(self, round_id: str, choice: str) -> tuple[Round, dict]:
        """Record a vote on a round this server dealt, once; returns the round (for the names) and the new tally.
        Raises BadRequest, with a sentence for the visitor, for anything else."""
        if choice not in CHOICES:
            raise BadRequest(f"A vote is one of {', '.join(CHOICES)}; nothing was recorded.")
        with self.lock:
            r = self.rounds.get(str(round_id or ""))
            if r is None:
                raise BadRequest("There is no answer pair to vote on here (it may have expired); nothing was recorded.")
            if r.voted:
                raise BadRequest("This pair was already voted on; a vote counts once.")
            if not r.complete:
                raise BadRequest("Both answers must be complete before a vote; nothing was recorded.")
            r.voted = True
        winner = {"A": r.shown[0], "B": r.shown[1]}.get(choice, choice)
        outcome = 1 if winner == self.finetune else -1 if winner == self.base else 0
        conversation = [*r.past, {"role": "user", "content": r.message}]
        self.feedback.record_vote({
            "pair": r.id, "vote": choice, "winner": winner, "outcome": outcome, "finetune": self.finetune,
            "base": self.base, "shown_as_a": r.shown[0], "shown_as_b": r.shown[1], "answer_a": r.answers[0],
            "answer_b": r.answers[1], "conversation": json.dumps(conversation, ensure_ascii=False), "system": r.system,
            "seed": r.seed, **r.settings,
        })
        return r, self.tally()

    def tally(self) -> dict:
        return tally(read_votes(self.feedback.votes, self.finetune, self.base))


def continued(r: Round, choice: str) -> list[dict]:
    """The conversation after a vote: the chosen answer is kept and the chat goes on from it; a tie or "both bad"
    starts over."""
    if choice not in ("A", "B"):
        return []
    return [*r.past, {"role": "user", "content": r.message},
            {"role": "assistant", "content": r.answers[0 if choice == "A" else 1]}]

