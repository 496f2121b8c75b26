"""The local backend: the catalog's models served from this process (`ModelStore`), as many in memory at once as
`models_mb` holds, each with its engine, least recently used unloaded first. Every answer is produced by
llama-cpp-agent's `LlamaCppAgent` through `EngineProvider`, a provider that hands the engine the token ids
fit_history measured (turns.answer) instead of a string llama.cpp would re-tokenize with its control tokens live.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine, EngineSettings
from .errors import ConfigError
from .files import ModelSpec, check_model_file
from .line import WaitingLine
from .prompt import PROMPT_FORMATS, PromptFormat, PromptTokenizer, detect_prompt_format, make_messages_formatter
from .request import Request, Sampling
from .turns import Done, Reading, Store, fitted_ids


@dataclass
class LoadedModel:
    label: str
    engine: Engine
    prompt_format: PromptFormat
    formatter: object  # llama_cpp_agent MessagesFormatter
    tokenize: PromptTokenizer
    n_ctx: int  # tokens per chat: prompt + answer

    def provider(self, pace: float = 0.0, fitted: tuple[str, list[int]] | None = None):
        """A llama-cpp-agent provider for one answer; `fitted`: the prompt fit_history measured, and its ids."""
        return _provider_class()(self, pace, fitted)


# Memory for the models kept loaded (MiB): the Space's 16 GB less ~1.5 GiB for the process (0.5 GiB before a model
# loads) and page cache. A model counts its file, KV cache and CACHE_RAM_MB: with the defaults a Phi-3-class Q4 model
# is 2.2 + 3.2 (q8_0) + 1.5 GiB, and two fit side by side. Where llama.cpp repacks Q4_K weights for the CPU
# (CPU_REPACK, 1.45 GiB of Phi-3.5-mini) the copy takes the place of those tensors' file pages, which the kernel can
# take back: 6.9 GiB resident per model, as counted (docs/performance.md "Side by side").
MODELS_MB = 14336

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
        def __init__(self, model: LoadedModel, pace: float = 0.0, fitted: tuple[str, list[int]] | None = None):
            self.model, self.pace, self.fitted, self.request = model, pace, fitted, None
            self.shown = 0  # prompt tokens reported read so far: progress never goes back

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
            ids = fitted_ids(self.fitted, prompt) if self.fitted else self.model.tokenize(prompt)
            self.request = Request(ids, settings.max_tokens, sampling,
                                   stop=settings.get_additional_stop_sequences())
            self.model.engine.submit(self.request)
            chunks = ({"choices": [{"text": text}]} for text in self.request.stream(self.pace, HEARTBEAT_S))
            if settings.stream:
                return chunks
            return {"choices": [{"text": "".join(c["choices"][0]["text"] for c in chunks)}]}

        def reading(self) -> Reading | None:
            """How far the prompt is read, if it is still being read and reading it all takes long enough to say so.
            Between two steps of a long batch, `done` is extrapolated at the measured prompt speed; a step slower than
            that speed (or a new measurement of it) would put it behind what was shown, so it holds there instead."""
            request, speed = self.request, self.model.engine.prompt_tps
            if request is None or not request.stats.to_evaluate or request.stats.first_token_at is not None:
                return None
            stats, total = request.stats, request.stats.to_evaluate
            if speed is None:
                return Reading(stats.evaluated, total, None) if total >= 256 else None
            if total / speed < READING_NOTICE_S:
                return None
            done = stats.evaluated + speed * (time.perf_counter() - (stats.read_at or time.perf_counter()))
            self.shown = done = int(min(max(done, stats.evaluated, self.shown), total - 1))
            return Reading(done, total, (total - done) / speed)

        def finish(self) -> Done | None:
            """End the answer if it still runs (Stop or a disconnect closed us: the engine ends it at its next step)
            and return its numbers; None if it never started."""
            if self.request is None:
                return None
            self.request.cancel()
            self.request.done.wait(30)
            stats = self.request.stats
            return Done(stats.tokens, stats.tokens_per_s, stats.evaluated, stats.prompt_tokens)

    return EngineProvider


class ModelStore(Store):
    """The catalog's models, loaded on first use, each with its engine; all engines share the llama.cpp thread.

    Models stay in memory side by side while their files, KV caches and host-RAM caches fit in `models_mb` together;
    beyond it the least recently used model without a chat is unloaded. `line` gives out the seats: `parallel` chats
    per model at once; a chat for a model that does not fit beside the busy ones waits until they are done."""

    def __init__(self, catalog: list[ModelSpec], paths: dict[str, Path], settings: EngineSettings | None = None,
                 queue_size: int = 16, seed: int = -1, verify_sha256: bool = True, warm_system: str | None = None,
                 models_mb: int = MODELS_MB):
        """`seed`: of every answer (-1: a fresh one each time); `verify_sha256`: hash a Hub file against its LFS
        sha256 before its first load; `warm_system`: a system message read at load, before the first visitor;
        `models_mb`: memory for the models kept loaded (MiB; at least one model is always allowed)."""
        self.specs = {spec.label: spec for spec in catalog if spec.label in paths}
        self.paths, self.settings, self.warm_system = paths, settings or EngineSettings(), warm_system
        self.seed, self.verify_sha256, self.models_bytes = seed, verify_sha256, models_mb << 20
        self.broken = {}
        self.checked: set[Path] = set()  # files already hashed: switching models back does not re-read GBs
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self.metas: dict[str, dict | None] = {}  # each file's GGUF keys, read once
        self.footprints: dict[str, int] = {}
        self.abouts: dict[str, dict] = {}
        self.line = WaitingLine(queue_size, self.settings.parallel, admits=self.fits_beside)
        self.lock = threading.Lock()

    def metadata(self, label: str) -> dict | None:
        """The GGUF keys of `label`'s file, read once (a vocab-only load) for the info line and the memory budget;
        None when unreadable (loading it then fails with its own message)."""
        if label not in self.metas:
            from .cpu_backend import load_cpu_backend
            from .vocab import Vocab

            load_cpu_backend()  # llama.cpp reads no GGUF before a CPU backend is registered
            try:
                self.metas[label] = Vocab.load(self.paths[label]).metadata
            except (ValueError, OSError, ConfigError):
                self.metas[label] = None
        return self.metas[label]

    def footprint(self, label: str) -> int:
        """Bytes a loaded model holds: its file (mapped, read in full by the first answers), the KV cache llama.cpp
        allocates at load for every chat's full window, and the host-RAM budget for its finished chats."""
        if label not in self.footprints:
            from .engine import kv_bytes_for

            meta = self.metadata(label)
            try:
                kv = kv_bytes_for(meta, self.settings) if meta else 0
            except (KeyError, ValueError):  # a header without the shape keys: counted as its file alone
                kv = 0
            self.footprints[label] = Path(self.paths[label]).stat().st_size + kv + (self.settings.cache_mb << 20)
        return self.footprints[label]

    def fits_beside(self, label: str, busy: set) -> bool:
        """Whether `label` may have chats while the models in `busy` have some: together they fit in models_mb (idle
        models are unloaded to make room), or nothing else is busy (one model is always allowed)."""
        others = busy - {label}
        return not others or sum(map(self.footprint, others | {label})) <= self.models_bytes

    @property
    def current(self) -> LoadedModel | None:
        """The most recently used model in memory, if any."""
        return next(reversed(self.loaded.values()), None)

    @property
    def labels(self) -> list[str]:
        return list(self.specs)

    def about(self, label: str) -> dict:
        """For the info line: the served file's own name (GGUF general.name), where it comes from, its prompt format
        (read once from its metadata) and the context per chat."""
        if label not in self.abouts:
            spec, path = self.specs[label], Path(self.paths[label])
            fmt, name, meta = spec.prompt_format, path.stem, self.metadata(label)
            try:
                if meta is None:
                    raise ConfigError(f"{path.name} is unreadable")
                name = meta.get("general.name", name)
                if fmt == "auto":
                    fmt = detect_prompt_format(meta.get("tokenizer.chat_template"), spec.filename)
            except ConfigError:
                fmt = f"{fmt} (unreadable file)"
            source = f"`{spec.repo}` · `{spec.filename}`" if spec.repo else f"`{path.name}` (local file)"
            self.abouts[label] = {"name": name, "format": fmt, "source": source, "n_ctx": self.settings.n_ctx,
                                  "file": path.name}
        return self.abouts[label]

    def get(self, label: str) -> LoadedModel:
        """The loaded model for `label` (call it holding a seat for that label), loading it if needed after unloading
        idle models, least recently used first, until it fits; raises ConfigError when it cannot load."""
        self.check(label)
        with self.lock:
            if label in self.loaded:
                self.loaded.move_to_end(label)
                return self.loaded[label]
            busy = self.line.busy()
            for idle in [other for other in self.loaded if other not in busy]:  # least recently used first
                if sum(map(self.footprint, [*self.loaded, label])) <= self.models_bytes:
                    break
                self.unload(idle)
            try:
                self.loaded[label] = self._load(self.specs[label], self.paths[label])
            except ConfigError as err:
                self.broken[label] = str(err)
                raise
            return self.loaded[label]

    def unload(self, label: str | None = None) -> None:
        """Free one model (default: every model) now: its weights, KV cache and host-RAM cache, not at the next GC."""
        for name in [label] if label else list(self.loaded):
            model = self.loaded.pop(name, None)
            if model is not None:
                model.engine.close()
                print(f"unloaded {Path(self.paths[name]).name}", flush=True)
        gc.collect()

    def _load(self, spec: ModelSpec, path: Path) -> LoadedModel:
        from .cpu_backend import load_cpu_backend

        load_cpu_backend()
        if path not in self.checked:
            check_model_file(path, self.verify_sha256)
            self.checked.add(path)
        start = time.perf_counter()
        engine = Engine(path, self.settings).start()
        seconds = time.perf_counter() - start
        name = spec.prompt_format
        try:
            if name == "auto":
                name = detect_prompt_format(engine.vocab.metadata.get("tokenizer.chat_template"), path.name)
        except ConfigError:
            engine.close()
            raise
        fmt = PROMPT_FORMATS[name]
        model = LoadedModel(spec.label, engine, fmt, make_messages_formatter(fmt), PromptTokenizer(engine.vocab),
                            self.settings.n_ctx)
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
