"""The one thread in which the process runs llama.cpp, and llama.cpp's log filter.

Every model load, context and step of every engine in the process runs in LLAMA_THREAD; other threads hand it work
with `LLAMA_THREAD.call` and wake it when a chat arrives. Engines register themselves and are stepped in turn
(engine.py).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine


class LlamaThread:
    """The one thread in which every llama.cpp computation of the process runs: model loads, other jobs handed to
    it with `call`, and one step of every live engine in turn.

    One thread, because OpenMP keeps a team of worker threads per thread that starts parallel work: once a second
    thread had computed, every later token in the process was ~15% slower (measured 2026-11-28 on 2 cores,
    Phi-3.5-mini-shaped Q4_K_M). It also lets llama.cpp decode ahead of the web server, which spends a few ms of
    Python on each streamed update. Several engines may be live at once (tests do that; the Space keeps one).
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.jobs: deque = deque()  # (future, fn, args, kwargs)
        self.engines: list[Engine] = []
        self.thread: threading.Thread | None = None

    def call(self, fn, *args, **kwargs):
        """Run fn(*args, **kwargs) in the llama.cpp thread and return its result (from any other thread)."""
        from concurrent.futures import Future

        future: Future = Future()
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="llama", daemon=True)
                self.thread.start()
            self.jobs.append((future, fn, args, kwargs))
            self.cond.notify_all()
        return future.result()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not any(e.has_work() for e in self.engines):
                    self.cond.wait()
                jobs, self.jobs = list(self.jobs), deque()
            for future, fn, args, kwargs in jobs:
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # handed to the caller
                    future.set_exception(err)
            for engine in list(self.engines):
                engine.tick()


LLAMA_THREAD = LlamaThread()


_LOG_CALLBACK = None  # referenced for as long as llama.cpp may call it


def quiet_llama_log() -> None:
    """Let through llama.cpp's warnings and errors only: at INFO it logs every tensor and buffer it sets up.

    llama-cpp-python's own log filter maps ggml's levels by an older numbering (INFO became 2, WARN 3, ERROR 4), so
    at any threshold it either prints every INFO line or drops the errors; this callback reads today's numbers."""
    import ctypes
    import sys

    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return
    warn, cont, shown = 3, 5, [False]  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        shown[0] = shown[0] if level == cont else level >= warn
        if shown[0]:
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

    _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
