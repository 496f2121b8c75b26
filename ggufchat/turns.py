"""A chat turn, and the contract both backends meet (the model store here, `local.py`, or a llama-server,
`remote.py`): what app.py asks, what it gets back.

    for item in store.turn(label, system, past, message, max_tokens, sampling, pace):
        Waiting(ahead)  -> no seat yet: `ahead` chats before this one (about once a second)
        Reading(...)    -> the prompt is being read and it takes a while (about once a second)
        str             -> the answer so far, as it grows
        Done(...)       -> the end, with the numbers for the stats line

Closing the generator (Stop, a closed tab) cancels the answer and gives the seat back. Bad input raises BadRequest,
a model that cannot be served ConfigError, a full line Busy, an answer that had to end EngineError: each message is
one sentence for the visitor.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, EngineError
from .prompt import fit_history, format_prompt


@dataclass
class Waiting:
    """No seat yet: `ahead` chats must finish before this one starts."""

    ahead: int


@dataclass
class Reading:
    """The prompt is still being read: `done` of `total` tokens, about `seconds_left` to go (None: no estimate)."""

    done: int
    total: int
    seconds_left: float | None


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


class Store:
    """What app.py talks to: `labels` for the dropdown, `about(label)` for the info line, `turn(...)` for a chat turn.

    A backend provides `line` (a WaitingLine: the seats), `get(label)` (a model with `formatter`, `tokenize`,
    `n_ctx` and `provider(pace, fitted)`, the latter a llama-cpp-agent provider for one answer), `about` and `seed`."""

    broken: dict[str, str]  # label -> why it cannot be served; the other models keep serving
    seed: int  # the sampling seed of every answer; -1: a fresh one each time

    @property
    def labels(self) -> list[str]:
        raise NotImplementedError

    def check(self, label: str) -> None:
        """ConfigError (a message for the chat) for a label that cannot be served, before it waits in line."""
        if label not in self.labels:
            raise ConfigError(f"Unknown model {label!r}; choose one of: {', '.join(self.labels)}.")
        if label in self.broken:
            raise ConfigError(self.broken[label])

    def turn(self, label: str, system: str, past: list[dict], message: str, max_tokens: int, sampling: dict,
             pace: float = 0.0, seed: int | None = None):
        """One chat turn: wait for a seat, then answer (see the module docstring for what it yields). The seat is
        given back however the turn ends. `seed`: this answer's (default: the store's)."""
        self.check(label)
        ticket = object()
        try:
            for ahead in self.line.wait(ticket, label):  # `parallel` chats at once; the model and its cache are shared
                yield Waiting(ahead)
            model = self.get(label)
            yield from answer(model, system, past, message, max_tokens, sampling, self.seed if seed is None else seed,
                              pace)
        finally:
            self.line.leave(ticket)


def answer(model, system: str, past: list[dict], message: str, max_tokens: int, sampling: dict, seed: int = -1,
           pace: float = 0.0):
    """One answer through LlamaCppAgent, for a caller that holds a seat: yields Reading progress while a long prompt is
    read, the answer so far (a str) as it grows, then a Done.

    The oldest turns are dropped to fit the window (fit_history); the ids it measured are the ids submitted: the
    provider checks that the agent formatted exactly that prompt. Raises BadRequest for a message that cannot fit,
    EngineError for an answer the engine had to end."""
    from llama_cpp_agent import LlamaCppAgent
    from llama_cpp_agent.chat_history import BasicChatHistory
    from llama_cpp_agent.chat_history.messages import Roles

    past, ids, budget = fit_history(model.formatter, model.tokenize, system, past, message, max_tokens, model.n_ctx)
    history = BasicChatHistory(k=len(past) + 3)  # trimmed by tokens above; its own limit counts messages
    for item in past:
        history.add_message({"role": Roles(item["role"]), "content": item["content"]})  # it matches Roles, not str
    provider = model.provider(pace, fitted=(format_prompt(model.formatter, system, past, message), ids))
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


def fitted_ids(fitted: tuple[str, list[int]], prompt: str) -> list[int]:
    """The ids fit_history measured, for the prompt the agent formatted; loud if the two differ (a llama-cpp-agent that
    formats differently would otherwise overflow the window or miss the cache in silence)."""
    expected, ids = fitted
    if prompt != expected:
        at = next((i for i, (a, b) in enumerate(zip(prompt, expected)) if a != b), min(len(prompt), len(expected)))
        raise RuntimeError("llama-cpp-agent formatted another prompt than the one fitted to the window (they differ "
                           f"from character {at}): the installed llama-cpp-agent is not the one requirements.txt pins")
    return list(ids)
