"""Backends: what app.py talks to. A chat turn goes in (system, past turns, message, sampling); text comes out as it
is generated, then one `Done` with the numbers. Closing the generator cancels the answer.

The local backend keeps one model in memory at a time (`ModelStore`) with its engine, and answers through
llama-cpp-agent: `LlamaCppAgent.get_chat_response` produces every answer, through `EngineProvider`, a provider that
hands the engine the token ids of the prompt (see prompt.PromptTokenizer) instead of a string llama.cpp would
re-tokenize with its control tokens live.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine
from .request import EngineError, Request, Sampling
from .line import WaitingLine
from .errors import ConfigError
from .files import ModelSpec, check_model_file
from .prompt import PROMPT_FORMATS, PromptFormat, PromptTokenizer, detect_prompt_format, fit_history, \
    make_messages_formatter


@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int  # tokens per chat: prompt + answer
    parallel: int = 4  # chats answered at once, in one llama.cpp context
    n_threads: int = 1
    n_threads_batch: int = 1
    n_batch: int = 512
    kv_type: str = "f16"
    prefill_chunk: int = 64  # prompt tokens per step while other chats are answering
    cache_mb: int = 4096  # host RAM for finished chats' cells (MiB; 0: off)
    context_shift: bool = True  # a long chat's dropped turns are cut out of its cells instead of re-reading the rest
    verify_sha256: bool = True
    seed: int = -1  # sampling seed of every answer; -1: a fresh one each time


@dataclass
class LoadedModel:
    label: str
    path: Path
    engine: Engine
    prompt_format: PromptFormat
    formatter: object  # llama_cpp_agent MessagesFormatter
    tokenize: PromptTokenizer
    n_ctx: int  # tokens per chat: prompt + answer

    def provider(self, pace: float = 0.0):
        return make_provider(self, pace)


@dataclass
class Done:
    """The end of an answer: the numbers for the stats line."""

    tokens: list[int]  # the answer's token ids
    tokens_per_s: float
    evaluated: int  # prompt tokens computed for this answer; the rest came from the cache
    prompt_tokens: int

    @property
    def generated(self) -> int:
        return len(self.tokens)


@dataclass
class Reading:
    """The prompt is still being read: `done` of `total` tokens, about `seconds_left` to go (None: no estimate)."""

    done: int
    total: int
    seconds_left: float | None


# Progress is shown only for a prompt that takes longer than this to read (at this process's measured prompt speed):
# below it, the first words come before a visitor wonders.
READING_NOTICE_S = 2.0
HEARTBEAT_S = 1.0  # while a prompt is read, the answer's stream wakes this often to report progress


@functools.cache
def _provider_class():
    """A llama-cpp-agent provider over the engine (one per answer: it keeps that answer's request). Built on first
    use, so that importing this module imports neither llama_cpp_agent nor llama_cpp."""
    from llama_cpp_agent.llm_output_settings import LlmStructuredOutputType
    from llama_cpp_agent.providers.llama_cpp_python import LlamaCppPythonSamplingSettings
    from llama_cpp_agent.providers.provider_base import LlmProvider, LlmProviderId

    class EngineProvider(LlmProvider):
        def __init__(self, model: LoadedModel, pace: float = 0.0):
            self.model, self.pace, self.request = model, pace, None

        def is_using_json_schema_constraints(self):
            return False

        def get_provider_identifier(self):
            return LlmProviderId.llama_cpp_python

        def get_provider_default_settings(self):
            return LlamaCppPythonSamplingSettings()

        def tokenize(self, prompt: str) -> list[int]:
            return self.model.tokenize(prompt)

        def create_chat_completion(self, *args, **kwargs):
            raise NotImplementedError("this provider completes prompts formatted by the agent")

        def create_completion(self, prompt, structured_output_settings, settings, bos_token):
            if structured_output_settings.output_type != LlmStructuredOutputType.no_structured_output:
                raise NotImplementedError("this app streams plain text; grammars go through LlamaCppPythonProvider")
            sampling = Sampling(
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p,
                typical_p=settings.typical_p, repeat_penalty=settings.repeat_penalty,
                frequency_penalty=settings.frequency_penalty, presence_penalty=settings.presence_penalty,
                seed=settings.seed,
            )
            self.request = Request(self.model.tokenize(prompt), settings.max_tokens, sampling,
                                   stop=settings.get_additional_stop_sequences())
            self.model.engine.submit(self.request)
            chunks = ({"choices": [{"text": text}]} for text in self.request.stream(self.pace, HEARTBEAT_S))
            if settings.stream:
                return chunks
            return {"choices": [{"text": "".join(c["choices"][0]["text"] for c in chunks)}]}

        def reading(self) -> Reading | None:
            """How far the prompt is read, if it is still being read and reading it all takes long enough to say so.
            Between two steps of a long batch, `done` is extrapolated at the measured prompt speed."""
            request, speed = self.request, self.model.engine.prompt_tps
            if request is None or not request.stats.to_evaluate or request.stats.first_token_at is not None:
                return None
            stats, total = request.stats, request.stats.to_evaluate
            if speed is None:
                return Reading(stats.evaluated, total, None) if total >= 256 else None
            if total / speed < READING_NOTICE_S:
                return None
            done = stats.evaluated + speed * (time.perf_counter() - (stats.read_at or time.perf_counter()))
            done = int(min(max(done, stats.evaluated), total - 1))
            return Reading(done, total, (total - done) / speed)

        def finish(self) -> Done | None:
            """End the answer if it still runs (Stop or a disconnect closed us: the engine ends it at its next step)
            and return its numbers; None if it never started."""
            if self.request is None:
                return None
            self.request.cancel()
            self.request.done.wait(30)
            stats = self.request.stats
            return Done(stats.generated, stats.tokens_per_s, stats.evaluated, stats.prompt_tokens)

    return EngineProvider


def make_provider(model: LoadedModel, pace: float = 0.0):
    return _provider_class()(model, pace)


def answer(model: LoadedModel, system: str, past: list[dict], message: str, max_tokens: int, sampling: dict,
           seed: int, n_ctx: int, pace: float = 0.0):
    """One chat turn through LlamaCppAgent: yields the answer so far (a str) as it grows, then a Done. Before the first
    words of an answer whose prompt takes a while to read, it yields Reading progress (about once a second).

    Raises BadRequest for a message that cannot fit, EngineError for an answer the engine had to end."""
    from llama_cpp_agent import LlamaCppAgent
    from llama_cpp_agent.chat_history import BasicChatHistory
    from llama_cpp_agent.chat_history.messages import Roles

    past, ids, budget = fit_history(model.formatter, model.tokenize, system, past, message, max_tokens, n_ctx)
    history = BasicChatHistory(k=len(past) + 3)  # trimmed by tokens above; its own limit counts messages
    for item in past:
        history.add_message({"role": Roles(item["role"]), "content": item["content"]})  # it matches Roles, not str
    provider = model.provider(pace)
    agent = LlamaCppAgent(
        provider,
        system_prompt=system,
        custom_messages_formatter=model.formatter,
        add_tools_and_structures_documentation_to_system_prompt=False,  # else it appends "\n" to the system prompt
    )
    settings = provider.get_provider_default_settings()
    settings.stream, settings.seed = True, seed
    # The two providers' settings name the answer's length differently (llama-cpp-python: max_tokens; server:
    # n_predict).
    setattr(settings, "n_predict" if hasattr(settings, "n_predict") else "max_tokens", budget)
    for key, value in sampling.items():
        setattr(settings, key, value)
    stream = agent.get_chat_response(message, chat_history=history, llm_sampling_settings=settings,
                                     returns_streaming_generator=True)
    text, finished = "", False
    try:
        for piece in stream:
            if piece:
                text += piece
                yield text
            elif not text and (reading := provider.reading()) is not None:  # a heartbeat while the prompt is read
                yield reading
        finished = True
    finally:
        stream.close()
        done = provider.finish()
        if done is not None:
            print(f"{'answered' if finished else 'stopped'}: {done.generated} tokens generated, "
                  f"{done.evaluated} of {done.prompt_tokens} prompt tokens evaluated", flush=True)
    if done is None:
        raise EngineError("The model gave no answer.")
    model.tokenize.remember_answer(text, done.tokens)  # so that the next turn reuses the cache
    yield done


class Store:
    """What app.py asks of a backend, local or remote: `labels` for the dropdown, `check` before a chat waits in line,
    `line` (the seats), `get` (a model to answer with), `about` (the info line) and `seed`."""

    broken: dict[str, str]  # label -> why it cannot be served; the other models keep serving

    @property
    def labels(self) -> list[str]:
        raise NotImplementedError

    def check(self, label: str) -> None:
        """ConfigError (a message for the chat) for a label that cannot be served, before it waits in line."""
        if label not in self.labels:
            raise ConfigError(f"Unknown model {label!r}; choose one of: {', '.join(self.labels)}.")
        if label in self.broken:
            raise ConfigError(self.broken[label])


class ModelStore(Store):
    """One model in memory at a time, with its engine: loaded on first use, swapped when the dropdown changes.

    `line` gives out the seats: `parallel` chats of one model at once; a chat for another model waits until the
    current model's chats are done, then swaps it in."""

    def __init__(self, catalog: list[ModelSpec], paths: dict[str, Path], settings: EngineSettings, queue_size: int,
                 warm_system: str | None = None):
        self.specs = {spec.label: spec for spec in catalog if spec.label in paths}
        self.paths, self.settings, self.warm_system = paths, settings, warm_system
        self.broken = {}
        self.checked: set[Path] = set()  # files already hashed: switching models back does not re-read GBs
        self.current: LoadedModel | None = None
        self.abouts: dict[str, dict] = {}
        self.line = WaitingLine(queue_size, settings.parallel)
        self.lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return list(self.specs)

    @property
    def seed(self) -> int:
        return self.settings.seed

    def about(self, label: str) -> dict:
        """For the info line: the served file's own name (GGUF general.name), where it comes from, its prompt format
        (read once from its metadata) and the context per chat."""
        if label not in self.abouts:
            from .prompt import Vocab

            spec, path = self.specs[label], Path(self.paths[label])
            fmt, name = spec.prompt_format, path.stem
            try:
                meta = Vocab.load(path).metadata
                name = meta.get("general.name", name)
                if fmt == "auto":
                    fmt = detect_prompt_format(meta.get("tokenizer.chat_template"), spec.filename)
            except (ValueError, OSError, ConfigError):
                fmt = f"{fmt} (unreadable file)"
            source = f"`{spec.repo}` · `{spec.filename}`" if spec.repo else f"`{path.name}` (local file)"
            self.abouts[label] = {"name": name, "format": fmt, "source": source, "n_ctx": self.settings.n_ctx,
                                  "file": path.name}
        return self.abouts[label]

    def get(self, label: str) -> LoadedModel:
        """The loaded model for `label` (call it holding a seat for that label); raises ConfigError when it cannot
        load."""
        self.check(label)
        with self.lock:
            if self.current is not None and self.current.label == label:
                return self.current
            self.unload()
            try:
                self.current = self._load(self.specs[label], self.paths[label])
            except ConfigError as err:
                self.broken[label] = str(err)
                raise
            return self.current

    def unload(self) -> None:
        if self.current is not None:
            self.current.engine.close()  # frees the weights and the KV cache now, not at the next GC
            self.current = None
            gc.collect()

    def _load(self, spec: ModelSpec, path: Path) -> LoadedModel:
        from .cpu_backend import load_cpu_backend

        load_cpu_backend()
        if path not in self.checked:
            check_model_file(path, self.settings.verify_sha256)
            self.checked.add(path)
        s = self.settings
        start = time.perf_counter()
        engine = Engine(path, n_ctx=s.n_ctx, parallel=s.parallel, n_batch=s.n_batch, n_threads=s.n_threads,
                        n_threads_batch=s.n_threads_batch, kv_type=s.kv_type, prefill_chunk=s.prefill_chunk,
                        cache_bytes=s.cache_mb << 20, shift=s.context_shift).start()
        seconds = time.perf_counter() - start
        name = spec.prompt_format
        try:
            if name == "auto":
                name = detect_prompt_format(engine.vocab.metadata.get("tokenizer.chat_template"), path.name)
        except ConfigError:
            engine.close()
            raise
        fmt = PROMPT_FORMATS[name]
        model = LoadedModel(spec.label, path, engine, fmt, make_messages_formatter(fmt), PromptTokenizer(engine.vocab),
                            s.n_ctx)
        print(f"loaded {path.name} in {seconds:.1f} s (prompt format: {name})", flush=True)
        if self.warm_system is not None:
            self.warm(model, self.warm_system)
        return model

    @staticmethod
    def warm(model: LoadedModel, system: str) -> None:
        """Evaluate the prompt every chat starts with (the system message), so that the first visitor does not."""
        from llama_cpp_agent.chat_history.messages import Roles

        prompt, _ = model.formatter.format_conversation([{"role": "system", "content": system}], Roles.user)
        request = model.engine.submit(Request(model.tokenize(prompt), max_tokens=0))
        request.done.wait()
