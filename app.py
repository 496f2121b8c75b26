"""A chat Space for OpenAssistant-tuned models served from GGUF files on CPU with llama.cpp. By default it serves the
seed project's Phi-3-mini fine-tunes (S29, trained on openassistant-guanaco); `build/run.py` makes this project's own
Phi-3.5-mini + oasst1 build, which MODEL_REPO and MODEL_FILES point it to.

    pip install -r requirements.txt && python app.py             # the Hub models in CATALOG
    MODEL_PATH=/path/to/model.Q4_K_M.gguf python app.py           # a local file, no download
    BACKEND_URL=http://127.0.0.1:8080 python app.py               # chats served by llama.cpp's llama-server

Every setting is an environment variable; README.md lists them all. The file reads top to bottom:
settings -> catalog -> respond -> side by side -> UI -> main. A chat turn goes to the model store (`store.turn`,
ggufchat/turns.py), which seats it and answers; a side-by-side round goes to the arena (ggufchat/arena.py). The
serving engine (prompt formats, model files, the scheduler that decodes several chats at once, the CPU-variant
loader, the llama-server client) is the `ggufchat` package beside this file.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ggufchat import votes
from ggufchat.arena import Arena, continued
from ggufchat.cpu_backend import CpuBackend, load_cpu_backend
from ggufchat.engine import KV_TYPES, EngineSettings
from ggufchat.errors import BadRequest, Busy, ConfigError, EngineError
from ggufchat.feedback import Feedback
from ggufchat.files import ModelSpec, fetch_model_files, human_size
from ggufchat.local import MODELS_MB, ModelStore
from ggufchat.prompt import PROMPT_FORMATS
from ggufchat.remote import RemoteStore, Server
from ggufchat.turns import Done, Reading, Store, Waiting

# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number.") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}.")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _cpu_count() -> int:
    # sched_getaffinity honours cgroup/taskset limits; os.cpu_count() reports the host's cores.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    engine: EngineSettings  # context, parallel chats, threads, batch, KV type, prefill chunk, host cache, context shift
    queue_size: int = 16  # chats waiting for a seat beyond this are told to retry
    seed: int = -1  # -1: a fresh seed per answer
    verify_sha256: bool = True  # hash downloaded files against the Hub's LFS sha256 before loading
    hf_token: str | None = None
    parallel: int | None = None  # PARALLEL as set (None: the engine's default here, the server's slots remotely)
    backend_url: str | None = None  # a llama-server serves the chats; no model is loaded here
    backend_api_key: str | None = None
    backend_wait: int = 120  # seconds start-up waits for the server's /health (it may still be loading its model)
    saved_chats_secret: str = ""  # the key of the chats Gradio saves in the browser ("": derived, see saved_chats_key)
    models_mb: int = MODELS_MB  # memory for the models kept loaded side by side (files, KV caches, finished chats)
    arena: tuple[str, ...] | None = None  # ARENA_MODELS: (fine-tune, base) labels; None: the catalog's default pair

    @classmethod
    def from_env(cls) -> Settings:
        cpus = _cpu_count()
        default = EngineSettings()
        kv_type = os.environ.get("KV_CACHE_TYPE", "").strip().lower() or default.kv_type
        if kv_type not in KV_TYPES:
            raise ConfigError(f"KV_CACHE_TYPE={kv_type!r} is unknown; use one of {', '.join(KV_TYPES)}.")
        parallel = _env_int("PARALLEL", 0) or None
        engine = EngineSettings(
            n_ctx=_env_int("N_CTX", default.n_ctx, minimum=256),
            parallel=parallel or default.parallel,
            # Every core: measured 2026-11-29 on 2 cores with a Phi-3.5-mini-shaped Q4_K_M, 2 decode threads give
            # 15.5 tokens/s, 1 thread 9.9. Only if something else keeps a core busy does 1 thread win (10.1 vs 4.7):
            # set N_THREADS=1 on a shared machine.
            n_threads=_env_int("N_THREADS", cpus),
            n_threads_batch=_env_int("N_THREADS_BATCH", cpus),
            n_batch=_env_int("N_BATCH", default.n_batch),
            kv_type=kv_type,
            prefill_chunk=_env_int("PREFILL_CHUNK", default.prefill_chunk),
            cache_mb=_env_int("CACHE_RAM_MB", default.cache_mb, minimum=0),
            context_shift=_env_bool("CONTEXT_SHIFT", default.context_shift),
        )
        return cls(
            engine=engine,
            queue_size=_env_int("QUEUE_SIZE", cls.queue_size),
            seed=_env_int("SEED", cls.seed, minimum=-1),
            verify_sha256=_env_bool("VERIFY_SHA256", cls.verify_sha256),
            hf_token=os.environ.get("HF_TOKEN") or None,  # only when set: anonymous downloads otherwise
            parallel=parallel,
            backend_url=os.environ.get("BACKEND_URL", "").strip() or None,
            # Its own setting, never HF_TOKEN: a token is sent only to a server someone named for it.
            backend_api_key=os.environ.get("BACKEND_API_KEY", "").strip() or None,
            backend_wait=_env_int("BACKEND_WAIT", cls.backend_wait, minimum=0),
            saved_chats_secret=os.environ.get("SAVED_CHATS_SECRET", "").strip(),
            models_mb=_env_int("MODELS_RAM_MB", cls.models_mb),
            arena=arena_from_env(),
        )


def arena_from_env() -> tuple[str, ...] | None:
    """ARENA_MODELS: "fine-tune label,base label", or "off"; unset: the catalog's default pair (None)."""
    raw = os.environ.get("ARENA_MODELS", "").strip()
    if not raw:
        return None
    if raw.lower() == "off":
        return ()
    labels = tuple(label.strip() for label in raw.split(",") if label.strip())
    if len(labels) != 2:
        raise ConfigError(f"ARENA_MODELS={raw!r} must name two models, the fine-tune then its base (comma-separated), "
                          "or be off.")
    return labels


SYSTEM_MESSAGE = "You are a helpful assistant."
# (minimum, maximum, default) of each sampling control; the server enforces them for API callers too.
LIMITS = {
    "max_tokens": (1, 4096, 2048),
    "temperature": (0.1, 4.0, 0.7),
    "top_p": (0.1, 1.0, 0.95),
    "top_k": (0, 100, 40),
    "repeat_penalty": (0.0, 2.0, 1.1),
}
# At most ~10 streamed updates a second: still smooth to read, and each update costs Gradio a few ms of CPU that
# llama.cpp's threads need (measured over HTTP on 2 cores, paired rounds: +3% decode against one update per token).
STREAM_EVERY = 0.1

# ----------------------------------------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------------------------------------

# The seed project's own QLoRA fine-tunes of Phi-3-mini. They were trained on openassistant-guanaco text,
# "### Human: ...### Assistant: ...", not on Phi-3's chat template, so they are prompted in that format.
CATALOG = [
    ModelSpec("S29 Phi-3 merged 0.2 (Q4_K_M)", "Q4_K_M.gguf", "Shivdutta/S29-phi3-merged-0.2_GGUF", None, "human"),
    ModelSpec("S29 Phi-3 merged 0.3 (Q5_K_M)", "Q5_K_M.gguf", "Shivdutta/S29-phi3-merged-0.3_GGUF", None, "human"),
    # Their base, in its own chat format: the side-by-side mode asks visitors whether the fine-tune is better.
    ModelSpec("Phi-3-mini-4k-instruct (Q4, the base)", "Phi-3-mini-4k-instruct-q4.gguf",
              "microsoft/Phi-3-mini-4k-instruct-gguf", None, "phi3"),
]
DEFAULT_ARENA = (CATALOG[0].label, CATALOG[2].label)  # (fine-tune, base) of the built-in catalog


def prompt_format_from_env() -> str:
    prompt_format = os.environ.get("PROMPT_FORMAT", "auto").strip() or "auto"
    if prompt_format != "auto" and prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"PROMPT_FORMAT={prompt_format!r} is unknown; use auto or one of "
                          f"{', '.join(PROMPT_FORMATS)}.")
    return prompt_format


def catalog_from_env() -> list[ModelSpec]:
    """MODEL_PATH (local files) or MODEL_REPO + MODEL_FILES replace the built-in catalog."""
    prompt_format = prompt_format_from_env()
    if paths := _env_list("MODEL_PATH"):
        return [ModelSpec(Path(p).name, p, prompt_format=prompt_format) for p in paths]
    if repo := os.environ.get("MODEL_REPO", "").strip():
        files = _env_list("MODEL_FILES")
        if not files:
            raise ConfigError("MODEL_REPO is set but MODEL_FILES is empty: name the .gguf files to serve, "
                              "comma-separated.")
        revision = os.environ.get("MODEL_REVISION", "").strip() or None
        return [ModelSpec(f"{repo.split('/')[-1]}/{f}", f, repo, revision, prompt_format) for f in files]
    return CATALOG


# ----------------------------------------------------------------------------------------------------------------------
# Respond
# ----------------------------------------------------------------------------------------------------------------------

# The line of numbers after each answer; removed again when the answer comes back as history.
STATS = re.compile(r"\n\n<sub>\d+ tokens · [^\n]*</sub>$")
# Replies from the app rather than the model start with these; they never reach the model as history.
NOTICE, WAITING = "⚠️ ", "⏳ "


def stats_line(done: Done) -> str:
    return (f"\n\n<sub>{done.generated} tokens · {done.tokens_per_s:.1f} tokens/s · prompt {done.evaluated} of "
            f"{done.prompt_tokens} tokens evaluated</sub>")


def reading_line(reading: Reading) -> str:
    """Progress while a long prompt is read; the answer replaces it. A status line like the waiting line's (WAITING)."""
    left = f" · about {math.ceil(reading.seconds_left)} s left" if reading.seconds_left is not None else ""
    return (f"{WAITING}Reading the conversation: {100 * reading.done // reading.total}% of {reading.total} tokens"
            f"{left}")


def clamp_number(name: str, value) -> float:
    low, high, _ = LIMITS[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name.replace('_', ' ')} must be a number, not {str(value)[:40]!r}.") from None
    if math.isnan(number):
        raise BadRequest(f"{name.replace('_', ' ')} must be a number, not NaN.")
    return min(max(number, low), high)


def text_of(content) -> str:
    """Gradio 6 content: a string (API calls) or a list of {"type": "text", "text": ...} parts (after a UI turn).

    Lone surrogates (JSON allows them, UTF-8 does not) become U+FFFD instead of failing later.
    """
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text", ""), str)
        )
    if not isinstance(content, str):
        return ""
    if content.isascii():
        return content
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in content)


def history_messages(history) -> list[dict]:
    """Gradio history -> alternating user/assistant messages; anything else (files, odd roles) is skipped."""
    messages = []
    for item in history if isinstance(history, (list, tuple)) else []:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            continue
        text = text_of(item.get("content"))
        if item["role"] == "assistant":
            if text.startswith((NOTICE, WAITING)):  # the app's words, and the message they answered
                if messages and messages[-1]["role"] == "user":
                    messages.pop()
                continue
            text = STATS.sub("", text)
        if messages and messages[-1]["role"] == item["role"]:
            messages[-1]["content"] += "\n\n" + text  # e.g. an answer streamed as several bubbles
        else:
            messages.append({"role": item["role"], "content": text})
    if messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    return messages


def respond(store: Store, message, history, model_label, system_message, max_tokens, temperature, top_p, top_k,
            repeat_penalty):
    """Stream an answer. Bad input, a full line or a broken model file get a one-line notice, never an exception."""
    try:
        message = text_of(message)
        if not message.strip():
            raise BadRequest("Please type a message.")
        max_tokens = int(clamp_number("max_tokens", max_tokens))
        sampling = {
            "temperature": clamp_number("temperature", temperature),
            "top_p": clamp_number("top_p", top_p),
            "top_k": int(clamp_number("top_k", top_k)),
            "repeat_penalty": clamp_number("repeat_penalty", repeat_penalty),
        }
        system = text_of(system_message) if system_message is not None else SYSTEM_MESSAGE
        past = history_messages(history)
        text = ""
        for item in store.turn(text_of(model_label), system, past, message, max_tokens, sampling, pace=STREAM_EVERY):
            if isinstance(item, Waiting):
                yield f"{WAITING}Waiting for the model: {item.ahead} {'chat' if item.ahead == 1 else 'chats'} ahead of you."
            elif isinstance(item, Reading):
                yield reading_line(item)
            elif isinstance(item, Done):
                yield text + stats_line(item)
            else:
                text = item
                yield text
    except (BadRequest, ConfigError, Busy, EngineError) as err:
        yield f"{NOTICE}{err}"


# ----------------------------------------------------------------------------------------------------------------------
# Side by side (blind)
# ----------------------------------------------------------------------------------------------------------------------

# Two answers share the CPU, each at about half the tokens/s of one: a shorter cap keeps a round to a couple of minutes.
ARENA_MAX_TOKENS = 512
ARENA_SAMPLING = {name: LIMITS[name][2] for name in ("temperature", "top_p", "top_k", "repeat_penalty")}
ASK_VOTE = "Which answer is better? Vote to see which model wrote which."


def arena_turn(arena: Arena, message, past, round_id):
    """Both models answer `message` after the conversation `past`: yields (chat A, chat B, status, round id)."""
    past = history_messages(past)
    try:
        message = text_of(message)
        if not message.strip():
            raise BadRequest("Please type a message.")
        previous = arena.rounds.get(round_id) if isinstance(round_id, str) else None
        if previous is not None and previous.complete and not previous.voted:
            raise BadRequest("Vote on these answers first (or start a new chat): the next message goes on from the "
                             "answer you prefer.")
        r = arena.deal(message, past, SYSTEM_MESSAGE, {"max_tokens": ARENA_MAX_TOKENS, **ARENA_SAMPLING})
        asked = [*past, {"role": "user", "content": message}]
        chats = asked, asked
        for a, b in arena.answer(r, STREAM_EVERY):
            chats = [*asked, {"role": "assistant", "content": a}], [*asked, {"role": "assistant", "content": b}]
            yield *chats, "", r.id
        status = ASK_VOTE if r.complete else f"{NOTICE}One model could not answer, so this pair cannot be voted on."
        yield *chats, status, r.id
    except (BadRequest, ConfigError, Busy, EngineError) as err:
        yield gr.skip(), gr.skip(), f"{NOTICE}{err}", round_id


def arena_vote(arena: Arena, choice, round_id):
    """A vote on the round on screen: (status with the names, tally, the conversation to go on with, chat A, chat B,
    round id). A refused vote changes nothing but the status. API callers see status, tally, chat A and chat B."""
    choice = text_of(choice)
    try:
        r, tally = arena.vote(round_id, choice)
    except BadRequest as err:
        return f"{NOTICE}{err}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    after = continued(r, choice)
    picked = {"A": "You preferred A.", "B": "You preferred B.", "tie": "A tie.", "both bad": "Both bad."}[choice]
    goes_on = "The chat goes on from the answer you chose." if after else "Starting over."
    status = f"A was **{r.shown[0]}**, B was **{r.shown[1]}**. {picked} {goes_on}"
    return status, tally_line(arena, tally), after, after, after, r.id  # the id stays: a second vote is refused


def tally_line(arena: Arena, tally: dict | None = None) -> str:
    return votes.summary(tally or arena.tally(), f"**{arena.finetune}** over **{arena.base}**")


def arena_tab(arena: Arena) -> None:
    """The side-by-side tab's components and events (inside build_ui's Blocks)."""
    gr.Markdown("Two models answer each message, shown as A and B in a random order. Vote for the better answer and "
                "see which model wrote it. Votes are kept, with both answers, to judge the fine-tune against its base.")
    with gr.Row():
        chat_a = gr.Chatbot(label="A", height=420, latex_delimiters=LATEX)
        chat_b = gr.Chatbot(label="B", height=420, latex_delimiters=LATEX)
    status = gr.Markdown()
    with gr.Row():
        box = gr.Textbox(placeholder="Ask both models…", show_label=False, scale=5)
        send = gr.Button("Send", variant="primary", scale=1)
    with gr.Row():
        buttons = {choice: gr.Button(label) for choice, label in
                   (("A", "A is better"), ("B", "B is better"), ("tie", "Tie"), ("both bad", "Both are bad"))}
        restart = gr.Button("New chat")
    tally = gr.Markdown(lambda: tally_line(arena))  # a function: read again at every page load
    past, round_id = gr.State([]), gr.State("")
    choice = gr.Textbox(visible=False)  # the API's way to vote: /arena_vote(choice)

    turn = functools.partial(arena_turn, arena)
    ins, outs = [box, past, round_id], [chat_a, chat_b, status, round_id]
    # concurrency_limit=None: the store's waiting line seats and bounds the two answers, as for the chat.
    send.click(turn, ins, outs, api_name="arena", concurrency_limit=None)
    box.submit(turn, ins, outs, api_visibility="undocumented", concurrency_limit=None)
    for trigger in (send.click, box.submit):  # the box empties at once; the answers read the message sent
        trigger(lambda: "", None, box, api_visibility="undocumented", queue=False)
    outputs = [status, tally, past, chat_a, chat_b, round_id]
    vote = functools.partial(arena_vote, arena)
    for name, button in buttons.items():
        button.click(functools.partial(vote, name), [round_id], outputs, api_visibility="undocumented")
    choice.submit(vote, [choice, round_id], outputs, api_name="arena_vote")
    restart.click(lambda: ([], [], [], "", ""), None, [chat_a, chat_b, past, round_id, status],
                  api_visibility="undocumented")


# ----------------------------------------------------------------------------------------------------------------------
# UI
# ----------------------------------------------------------------------------------------------------------------------

EXAMPLES = [
    "Explain QLoRA to a software engineer in three sentences.",
    "Write a haiku about open-source AI.",
    "What should I pack for a three-day hike?",
]


def lenient(component):
    """Let the value reach respond() as sent. API callers bypass sliders and the dropdown, and Gradio would answer
    an out-of-range number or unknown label with an error; respond() clamps it or replies with a notice instead.
    (An instance override: subclassing a Gradio component writes a .pyi stub beside this file at import.)"""
    component.preprocess = lambda payload: payload
    return component


LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]
QUANT = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?=[-_.])")


def describe(store: Store, label) -> str:
    """The info line for a dropdown entry: what is served, from where, how it is prompted."""
    label = text_of(label)
    if label not in store.labels:
        return ""
    about = store.about(label)
    quant = QUANT.search(about.get("file", label) + ".")
    ours = " · built by this Space's `build/run.py` (QLoRA on oasst1)" if "oasst1" in about["name"].lower() else ""
    return (f"**{about['name']}**{ours}  \n{about['source']}{f' · {quant[1].upper()}' if quant else ''} · prompt "
            f"format `{about['format']}` · context {about['n_ctx']} tokens · {store.line.capacity} chats at once, "
            + ("served by a llama.cpp server" if isinstance(store, RemoteStore) else "on CPU with llama.cpp"))


def record_feedback(feedback: Feedback, data: gr.LikeData, history, model, system, max_tokens, temperature, top_p,
                    top_k, repeat_penalty):
    index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
    settings = {"model": text_of(model), "system": text_of(system), "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "top_k": top_k, "repeat_penalty": repeat_penalty}
    history = [{"role": m.get("role"), "content": text_of(m.get("content"))}
               for m in history or [] if isinstance(m, dict)]
    feedback.record(bool(data.liked), int(index), history, settings)


def saved_chats_key(secret: str = "") -> str:
    """The key Gradio encrypts the chats it saves in the browser with. Gradio draws a new one in every process, so after
    a restart (every rebuild, every sleep) visitors' saved chats could no longer be read. This one stays: the
    SAVED_CHATS_SECRET setting, else derived from the Space's id (SPACE_ID, set on every Space) or, elsewhere, from
    this machine and folder. Not a password: Gradio sends it to the page, as it does its own."""
    if secret:
        return secret
    origin = os.environ.get("SPACE_ID", "").strip()
    if not origin:
        try:
            machine = Path("/etc/machine-id").read_text().strip()
        except OSError:
            machine = ""
        origin = f"{machine or socket.gethostname()}:{Path(__file__).resolve().parent}"
    return hashlib.sha256(f"saved chats of {origin}".encode()).hexdigest()[:32]


def build_ui(store: Store, feedback: Feedback, saved_chats_secret: str = "", arena: Arena | None = None) -> gr.Blocks:
    """The page, wired to `store` (what answers) and `feedback` (where Like/Dislike and votes go); with `arena`, a
    second tab where two models answer side by side, blind."""
    with gr.Blocks(title="OpenAssistant chat · llama.cpp") as demo:
        if arena is None:
            chat_tab(store, feedback, saved_chats_secret)
        else:
            with gr.Tabs():
                with gr.Tab("Chat"):
                    chat_tab(store, feedback, saved_chats_secret)
                with gr.Tab("Side by side (blind)"):
                    arena_tab(arena)
    return demo


def chat_tab(store: Store, feedback: Feedback, saved_chats_secret: str) -> None:
    """The chat: the model's info line, the ChatInterface with its settings, Like/Dislike (inside build_ui's Blocks)."""
    labels = store.labels
    # Unrendered: ChatInterface places them (the settings in its accordion, the chatbot under the info line).
    slider = {name: dict(minimum=low, maximum=high, value=default) for name, (low, high, default) in LIMITS.items()}
    dropdown = lenient(gr.Dropdown(labels, value=labels[0], label="Model", render=False))
    inputs = [
        dropdown,
        gr.Textbox(SYSTEM_MESSAGE, label="System message", render=False),
        lenient(gr.Slider(**slider["max_tokens"], step=1, label="Max tokens", render=False)),
        lenient(gr.Slider(**slider["temperature"], step=0.1, label="Temperature", render=False)),
        lenient(gr.Slider(**slider["top_p"], step=0.05, label="Top-p", render=False)),
        lenient(gr.Slider(**slider["top_k"], step=1, label="Top-k", render=False)),
        lenient(gr.Slider(**slider["repeat_penalty"], step=0.1, label="Repetition penalty", render=False)),
    ]
    chatbot = gr.Chatbot(height=520, buttons=["copy", "copy_all", "share"], latex_delimiters=LATEX,
                         feedback_options=("Like", "Dislike"), render=False)
    info = gr.Markdown(describe(store, labels[0]))
    chat = gr.ChatInterface(
        functools.partial(respond, store),
        chatbot=chatbot,
        additional_inputs=inputs,
        examples=[[e] for e in EXAMPLES],
        cache_examples=False,
        api_name="chat",
        concurrency_limit=None,  # requests go straight to respond(), whose WaitingLine seats and bounds them
        save_history=True,  # past chats in the browser's local storage, listed beside the chat
        editable=True,  # edit a message to regenerate from it; its unchanged prefix still comes from the cache
    )
    chat.saved_conversations.secret = saved_chats_key(saved_chats_secret)
    dropdown.change(functools.partial(describe, store), dropdown, info, api_visibility="undocumented")

    def like(data: gr.LikeData, history, model, system, max_tokens, temperature, top_p, top_k, repeat_penalty):
        record_feedback(feedback, data, history, model, system, max_tokens, temperature, top_p, top_k, repeat_penalty)

    chatbot.like(like, [chatbot, *inputs], None, api_visibility="undocumented")


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def serving_line(store: ModelStore, cpu: CpuBackend) -> str:
    """One line that says what this process serves and with what: for the Space's log."""
    s = store.settings
    files = ", ".join(f"{p.name} ({human_size(p.stat().st_size)})" for p in store.paths.values())
    kv = store.current.engine.kv_bytes if store.current else 0
    return (f"serving: llama.cpp CPU backend {cpu.name} · {s.n_threads} decode / {s.n_threads_batch} prompt threads · "
            f"{files} · context {s.n_ctx} tokens per chat × {store.line.capacity} parallel chats · KV cache "
            f"{human_size(kv)} ({s.kv_type}) · finished chats kept in up to {s.cache_mb} MiB of RAM · context shift "
            f"{'on' if s.context_shift else 'off'} · models kept loaded within {store.models_bytes >> 20} MiB "
            f"({', '.join(f'{label}: {human_size(store.footprint(label))}' for label in store.labels)})")


def feedback_from_env(settings: Settings) -> Feedback:
    """FEEDBACK_DIR, pushed to FEEDBACK_REPO when set. A repo the Space cannot reach or write keeps feedback local
    (with a warning): Like/Dislike must never stop the chat from starting."""
    folder, repo = os.environ.get("FEEDBACK_DIR", "feedback"), os.environ.get("FEEDBACK_REPO", "").strip() or None
    if repo:
        try:
            return Feedback(folder, repo, settings.hf_token)
        except Exception as err:  # offline, no token, no write access: huggingface_hub raises many kinds
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"warning: feedback stays in {folder}/: FEEDBACK_REPO={repo} cannot be written ({first})",
                  file=sys.stderr, flush=True)
    return Feedback(folder)


def local_store(settings: Settings) -> ModelStore:
    """The catalog's files, downloaded (or local), the default one loaded with the system prompt evaluated: the first
    visitor must not pay for either. A default model that cannot load is reported and the others keep serving."""
    catalog = catalog_from_env()
    paths, problems = fetch_model_files(catalog, settings.hf_token)
    for label, why in problems.items():
        print(f"warning: {label} is unavailable: {why}", file=sys.stderr)
    if not paths:
        raise ConfigError(
            "No model file is available (the Hub is unreachable or the files are missing, and nothing is cached): "
            "set MODEL_PATH to a local .gguf file, or MODEL_REPO and MODEL_FILES to a reachable Hub repo."
        )
    cpu = load_cpu_backend()
    print(f"llama.cpp CPU backend: {cpu}", flush=True)
    store = ModelStore(catalog, paths, settings.engine, settings.queue_size, settings.seed, settings.verify_sha256,
                       warm_system=SYSTEM_MESSAGE, models_mb=settings.models_mb)
    try:
        store.get(store.labels[0])
    except ConfigError as err:
        print(f"warning: {err}", file=sys.stderr)
    print(serving_line(store, cpu), flush=True)
    return store


def remote_store(settings: Settings) -> RemoteStore:
    """The models a llama-server at BACKEND_URL serves; start-up waits for its /health and says what to set."""
    server = Server(settings.backend_url, settings.backend_api_key)
    print(f"waiting for the model server at BACKEND_URL (up to {settings.backend_wait} s)", flush=True)
    server.wait_until_healthy(settings.backend_wait)
    try:
        store = RemoteStore(server, settings.queue_size, prompt_format_from_env(), settings.parallel, settings.seed)
        store.get(store.labels[0])  # the prompt format and the server's special tokens, before the first visitor
    except EngineError as err:
        raise ConfigError(f"BACKEND_URL={settings.backend_url}: {err}") from None
    print(f"serving: {', '.join(store.labels)} from llama-server at BACKEND_URL · {store.line.capacity} parallel "
          f"chats · context {store.n_ctx(store.labels[0])} tokens per chat", flush=True)
    return store


# Gradio's queue looks for work every 1 ms and for progress updates every 10 ms, busy or idle (gradio 6: Queue's
# sleep_when_free and progress_update_sleep_when_free; Gradio uses 50 and 100 ms on Windows). On a 2-vCPU Space each
# wake-up takes a core from one of llama.cpp's two threads, and the other then waits for it at the next barrier.
# Gradio's Windows values: a chat that arrives at an idle queue starts up to 50 ms later, unseen beside its answer.
QUEUE_POLL_S, PROGRESS_POLL_S = 0.05, 0.1


def quiet_queue(queue) -> None:
    for name, seconds in (("sleep_when_free", QUEUE_POLL_S), ("progress_update_sleep_when_free", PROGRESS_POLL_S)):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, seconds)
        else:  # a Gradio that renamed it: the chat works, at some cost to its speed
            print(f"warning: Gradio's queue has no {name} to slow its polling; answers may stream a little slower",
                  file=sys.stderr, flush=True)


def arena_for(settings: Settings, store: Store, feedback: Feedback) -> Arena | None:
    """The side-by-side mode for ARENA_MODELS, or for the built-in catalog's pair when it is unset; None when off, or
    when a model of the pair is not served (said in the log: the chat itself goes on)."""
    pair = DEFAULT_ARENA if settings.arena is None else settings.arena
    if not pair or (settings.arena is None and not set(pair) <= set(store.labels)):
        return None  # off, or another catalog than the built-in one and no pair named
    try:
        arena = Arena(store, *pair, feedback)
    except ConfigError as err:
        print(f"warning: the side-by-side mode is off: {err}", file=sys.stderr, flush=True)
        return None
    print(f"side by side: {arena.finetune} against {arena.base} · {tally_line(arena)}", flush=True)
    if isinstance(store, ModelStore) and not store.fits_beside(arena.finetune, {arena.base}):
        print("warning: the side-by-side models do not fit in MODELS_RAM_MB together, so their answers come one after "
              "the other; the default engine settings fit two Phi-3-class Q4 models in 16 GB (README)",
              file=sys.stderr, flush=True)
    return arena


def main() -> None:
    try:
        settings = Settings.from_env()
        store = remote_store(settings) if settings.backend_url else local_store(settings)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    feedback = feedback_from_env(settings)
    demo = build_ui(store, feedback, settings.saved_chats_secret, arena_for(settings, store, feedback))
    # Gradio's queue only hands requests over (no concurrency limit); this cap is a backstop against floods.
    demo.queue(max_size=4 * (settings.queue_size + store.line.capacity) + 16)
    quiet_queue(demo._queue)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))


if __name__ == "__main__":
    main()
