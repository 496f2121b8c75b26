"""The remote backend: every chat served by llama.cpp's `llama-server` at BACKEND_URL (one server, several behind a
load balancer, or a Hugging Face Inference Endpoint running llama.cpp) instead of a model in this process.

What holds in process holds here too. llama-cpp-agent produces every answer, through `ServerProvider`, a
LlamaCppServerProvider that sends the prompt as token ids: template text tokenized with special tokens, message text
without (prompt.PromptTokenizer over `RemoteVocab`, the server's own /tokenize), so a visitor's text never becomes a
control token. Closing an answer closes its HTTP stream, and llama-server cancels the generation. Every request has
timeouts; a server that is down or fails is a one-line notice in the chat (`BackendError`), never a traceback.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import OrderedDict
from copy import deepcopy
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import ConfigError, EngineError
from .line import WaitingLine
from .prompt import PROMPT_FORMATS, PromptFormat, PromptTokenizer, detect_prompt_format, make_messages_formatter
from .request import PENALTY_LAST_N
from .turns import Done, Store, fitted_ids

# llama-server's sampler chain in the engine's order (engine.Engine._sampler). The provider's default list leaves
# out "penalties", and llama-server then ignores the repetition penalty.
SAMPLERS = ["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]


class BackendError(EngineError):
    """The model server failed or cannot be reached; the message is for the visitor."""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


class Server:
    """HTTP to one llama-server base URL (or a load balancer before several): JSON in, JSON or a stream out."""

    def __init__(self, url: str, api_key: str | None = None, connect_timeout: float = 5.0, read_timeout: float = 120.0):
        self.url, self.api_key = url.rstrip("/"), api_key
        # read_timeout bounds the wait for each piece of a response, not its whole length: a long answer that keeps
        # streaming is fine, a server that stops sending is not.
        self.timeout = (connect_timeout, read_timeout)
        self.local = threading.local()  # a requests.Session per thread: sessions are not documented as thread-safe

    @property
    def session(self):
        if not hasattr(self.local, "session"):
            import requests

            self.local.session = requests.Session()
            if self.api_key:  # sent only when set: a token is never handed to a server nobody named for it
                self.local.session.headers["Authorization"] = f"Bearer {self.api_key}"
        return self.local.session

    def call(self, method: str, path: str, *, stream: bool = False, **kwargs):
        """The response to one request; BackendError when there is none or it is an error."""
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, stream=stream, **kwargs)
        except requests.RequestException as err:
            raise BackendError(f"The model server is not reachable ({_first_line(err)}). Please try again shortly.") \
                from None
        if response.status_code >= 400:
            try:
                why = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = response.text[:200] or response.reason
            response.close()
            raise BackendError(f"The model server answered {response.status_code}: {why}")
        return response

    def json(self, method: str, path: str, **kwargs) -> dict:
        return self.call(method, path, **kwargs).json()

    def wait_until_healthy(self, seconds: float) -> None:
        """Return once /health says ok; ConfigError (what to set) if it does not within `seconds`."""
        deadline, why = time.monotonic() + seconds, ""
        while True:
            try:
                self.json("GET", "/health")
                return
            except BackendError as err:
                why = str(err)
                if "answered 401" in why or "answered 403" in why:
                    break  # waiting will not help
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        hint = ("set BACKEND_API_KEY to the key the server expects" if "answered 40" in why else
                "start llama-server there (README: 'Serving from llama-server') or unset BACKEND_URL to load the "
                "model in this process")
        raise ConfigError(f"BACKEND_URL={self.url} is not ready after {seconds:.0f} s ({why}): {hint}.")


class RemoteVocab:
    """The tokenizer questions PromptTokenizer asks (tokenize, detokenize, special tokens), answered by the server.

    Past messages come back every turn, so tokenized fragments are remembered: a turn asks the server about its new
    message and the last answer only."""

    MEMO = 4096

    def __init__(self, server: Server, model: str, fmt: PromptFormat):
        self.server, self.model, self.fmt = server, model, fmt
        self.memo: OrderedDict[tuple[str, bool], tuple[int, ...]] = OrderedDict()
        self.lock = threading.Lock()

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        key = (text, special)
        with self.lock:
            if key in self.memo:
                self.memo.move_to_end(key)
                return list(self.memo[key])
        body = {"content": text, "add_special": False, "parse_special": special, "model": self.model}
        ids = tuple(self.server.json("POST", "/tokenize", json=body)["tokens"])
        with self.lock:
            self.memo[key] = ids
            while len(self.memo) > self.MEMO:
                self.memo.popitem(last=False)
        return list(ids)

    def detokenize(self, tokens) -> bytes:
        body = {"tokens": [int(t) for t in tokens], "model": self.model}
        return self.server.json("POST", "/detokenize", json=body)["content"].encode("utf-8")

    def special_tokens(self) -> dict[str, tuple[int, int]]:
        """The special tokens in this format's template text, with their lstrip/rstrip attributes.

        The server lists no vocabulary, so each marker is asked about: a token that its text gives only with special
        tokens parsed is special; whitespace it swallows on its right (left) makes it rstrip (lstrip), as llama.cpp's
        tokenizer does for Phi-3's markers."""
        import llama_cpp

        found: dict[str, tuple[int, int]] = {}
        plain = self.tokenize("x")
        texts = {t for pair in self.fmt.markers.values() for t in pair if t} | set(self.fmt.stop)
        for text in sorted(texts):
            body = {"content": text, "add_special": False, "parse_special": True, "with_pieces": True,
                    "model": self.model}
            for token in self.server.json("POST", "/tokenize", json=body)["tokens"]:
                piece, token_id = token["piece"], token["id"]
                if not isinstance(piece, str) or not piece or piece in found:
                    continue
                if self.tokenize(piece, special=True) != [token_id] or self.tokenize(piece) == [token_id]:
                    continue  # plain text: the same ids either way
                attr = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
                if self.tokenize(piece + " \n x", special=True)[1:] == plain:
                    attr |= llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
                if self.tokenize("x \n " + piece, special=True)[:-1] == plain:
                    attr |= llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
                found[piece] = (token_id, attr)
        return found


@dataclass
class RemoteModel:
    label: str
    model_id: str  # the server's name for it (/v1/models), sent with each request
    server: Server
    formatter: object  # llama_cpp_agent MessagesFormatter
    tokenize: PromptTokenizer
    n_ctx: int  # the server's context per slot
    format_name: str

    def provider(self, pace: float = 0.0, fitted: tuple[str, list[int]] | None = None):
        """A llama-cpp-agent provider for one answer; `fitted`: the prompt fit_history measured, and its ids."""
        return _provider_class()(self, pace, fitted)


@functools.cache
def _provider_class():
    """Built on first use, so that importing this module imports neither llama_cpp_agent nor requests."""
    from llama_cpp_agent.providers.llama_cpp_server import LlamaCppServerProvider

    class ServerProvider(LlamaCppServerProvider):
        """LlamaCppServerProvider with the prompt as token ids, a stream that is closed when the answer ends (which
        cancels it on the server), timeouts, and errors raised as BackendError instead of printed and swallowed."""

        def __init__(self, model: RemoteModel, pace: float = 0.0, fitted: tuple[str, list[int]] | None = None):
            super().__init__(model.server.url, model.server.api_key)
            self.model, self.pace, self.fitted = model, pace, fitted
            self.response = None
            self.ids: list[int] = []
            self.tokens: list[int] = []
            self.final: dict = {}

        def tokenize(self, prompt: str) -> list[int]:
            return self.model.tokenize(prompt)

        def create_completion(self, prompt, structured_output_settings, settings, bos_token):
            data = self.prepare_generation_settings(deepcopy(settings.as_dict()), structured_output_settings)
            self.ids = fitted_ids(self.fitted, prompt) if self.fitted else self.model.tokenize(prompt)
            data.update(prompt=self.ids, model=self.model.model_id, samplers=SAMPLERS, repeat_last_n=PENALTY_LAST_N,
                        stream=True, return_tokens=True, cache_prompt=True)
            self.response = self.model.server.call("POST", "/completion", json=data, stream=True)
            chunks = ({"choices": [{"text": text}]} for text in self._texts())
            if settings.stream:
                return chunks
            return {"choices": [{"text": "".join(c["choices"][0]["text"] for c in chunks)}]}

        def _texts(self):
            """The answer's text as it streams, at most one piece per `pace` seconds (a slow reader gets few,
            larger updates)."""
            import requests

            pending, last = "", time.monotonic()
            try:
                for line in self.response.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue  # blank lines and ":" keep-alive pings between events
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise BackendError(f"The model server failed: {event['error'].get('message', event['error'])}")
                    self.tokens += event.get("tokens") or []
                    pending += event.get("content", "")
                    if event.get("stop"):
                        self.final = event
                        break
                    if pending and time.monotonic() - last >= self.pace:
                        yield pending
                        pending, last = "", time.monotonic()
            except requests.RequestException as err:
                raise BackendError(f"The model server stopped answering ({_first_line(err)}). "
                                   "Please try again.") from None
            if not self.final:
                raise BackendError("The model server ended the answer early. Please try again.")
            if pending:
                yield pending

        def reading(self):
            return None  # the server reads the prompt; its progress is not asked for

        def finish(self) -> Done | None:
            if self.response is None:
                return None
            self.response.close()  # llama-server sees the connection go and stops generating
            timings = self.final.get("timings", {})
            return Done(self.tokens, float(timings.get("predicted_per_second", 0.0)),
                        int(timings.get("prompt_n", len(self.ids))), len(self.ids))

    return ServerProvider


class RemoteStore(Store):
    """What the server serves, in the same shape as local.ModelStore: labels for the dropdown, a seat in the
    waiting line, and a model to answer with. Nothing is loaded here."""

    def __init__(self, server: Server, queue_size: int, prompt_format: str = "auto", parallel: int | None = None,
                 seed: int = -1):
        self.server, self.seed = server, seed  # seed: of every answer; -1: a fresh one each time
        models = server.json("GET", "/v1/models")["data"]
        props = server.json("GET", "/props")
        # Labels are file names when the server names its model by path (llama-server's default without --alias).
        self.ids = {PurePosixPath(m["id"]).name if "/" in m["id"] else m["id"]: m for m in models}
        self.props = {label: props if len(models) == 1 else server.json("GET", "/props", params={"model": m["id"]})
                      for label, m in self.ids.items()}
        self.prompt_format = prompt_format
        self.broken = {}
        self.models: dict[str, RemoteModel] = {}
        # With a load balancer before several servers, /props describes one of them: set PARALLEL to their total.
        slots = parallel or int(props.get("total_slots", 1))
        self.line = WaitingLine(queue_size, slots)
        self.lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return list(self.ids)

    def n_ctx(self, label: str) -> int:
        meta = self.ids[label].get("meta") or {}
        settings = self.props[label].get("default_generation_settings", {})
        return int(meta.get("n_ctx") or settings.get("n_ctx") or 4096)

    def about(self, label: str) -> dict:
        try:
            fmt = self.get(label).format_name
        except (ConfigError, BackendError) as err:
            fmt = f"unknown ({err})"
        return {"name": label, "format": fmt, "source": f"`{label}`", "n_ctx": self.n_ctx(label)}

    def get(self, label: str) -> RemoteModel:
        self.check(label)
        with self.lock:
            if label not in self.models:
                try:
                    self.models[label] = self._connect(label)
                except ConfigError as err:
                    self.broken[label] = str(err)
                    raise
            return self.models[label]

    def _connect(self, label: str) -> RemoteModel:
        name = self.prompt_format
        if name == "auto":
            name = detect_prompt_format(self.props[label].get("chat_template"), f"The server's model {label}")
        fmt = PROMPT_FORMATS[name]
        model_id = self.ids[label]["id"]
        tokenize = PromptTokenizer(RemoteVocab(self.server, model_id, fmt))
        return RemoteModel(label, model_id, self.server, make_messages_formatter(fmt), tokenize, self.n_ctx(label),
                           name)
