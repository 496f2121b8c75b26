"""One answer as its caller sees it: the sampling settings it asks for, the text it streams, its stats.

The engine (engine.py) fills a Request from the llama.cpp thread; the web server's thread reads its stream. The
remote backend (remote.py) takes the same Sampling.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import EngineError

if TYPE_CHECKING:
    from .engine import Engine

PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over (llama-cpp-python's default)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = -1  # -1: a fresh seed for this answer
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits before anything else


@dataclass
class Stats:
    prompt_tokens: int
    evaluated: int = 0  # prompt tokens llama.cpp computed for this answer; the others came from the cache
    to_evaluate: int = 0  # prompt tokens it had to compute when it got its seat (0 until then)
    read_at: float | None = None  # when `evaluated` last grew (or the seat was taken): progress is estimated from it
    tokens: list[int] = field(default_factory=list)  # the answer's ids: every sampled token but an end-of-generation one
    first_token_at: float | None = None
    finished_at: float | None = None
    reason: str = ""  # stop | length | cancelled | error

    @property
    def tokens_per_s(self) -> float:
        n = len(self.tokens)
        if n < 2 or not self.first_token_at or not self.finished_at or self.finished_at <= self.first_token_at:
            return 0.0
        return (n - 1) / (self.finished_at - self.first_token_at)


_END = object()


class Request:
    """One answer: prompt ids in; text pieces, then the end, out. Closing its stream cancels it."""

    def __init__(self, ids: list[int], max_tokens: int, sampling: Sampling = Sampling(), stop=(),
                 record_logits: bool = False):
        self.ids = [int(t) for t in ids]
        self.logits: list | None = [] if record_logits else None  # each sampled position's logits (numpy), for tests
        self.max_tokens = max_tokens  # 0: evaluate the prompt only (a warm-up)
        self.sampling = sampling
        self.stop = tuple(s for s in stop if s)
        self.stats = Stats(prompt_tokens=len(self.ids))
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None
        self.text = ""  # what was streamed
        self.engine: Engine | None = None

    def cancel(self) -> None:
        if not self.done.is_set():
            self.cancelled.set()
            if self.engine is not None:
                self.engine.wake()

    def stream(self, pace: float = 0.0, heartbeat: float | None = None):
        """Yield the answer's text as it comes: everything decoded since the previous yield. With `pace`, wait that
        long after each yield (the engine decodes on meanwhile) so that a slow consumer gets few, larger updates.
        With `heartbeat`, yield "" after that many seconds without text, so that the consumer can show progress while
        the prompt is read. Closing the generator cancels the answer; an answer the engine had to end raises
        EngineError."""
        try:
            while True:
                try:
                    items = [self.events.get(timeout=heartbeat)]
                except queue.Empty:
                    yield ""
                    continue
                while True:
                    try:
                        items.append(self.events.get_nowait())
                    except queue.Empty:
                        break
                text = "".join(item for item in items if isinstance(item, str))
                if text:
                    yield text
                    if pace:
                        self.done.wait(pace)
                if _END in items:
                    if self.error:
                        raise EngineError(self.error)
                    return
        finally:
            self.cancel()
