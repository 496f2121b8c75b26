"""Prompts: the chat formats the served models were trained on, and a tokenizer that keeps message text from ever
becoming a control token (or, in plain-text formats, a turn marker).

Each format reproduces, character for character, the chat template its models were trained with
(tests/test_prompt.py renders the same chat through transformers' apply_chat_template and compares token ids).
llama-cpp-agent's own PHI_3 formatter folds the system prompt into the first user turn, which is not Phi-3.5's
template, hence these custom MessagesFormatters. The tokenizer works on a model's vocabulary alone (vocab.Vocab, or
remote.RemoteVocab over a llama-server's /tokenize).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .errors import BadRequest, ConfigError

# Message contents travel between these private-use characters from the formatter to the tokenizer,
# which tokenizes them as plain text: text a user typed can never become a control token.
OPEN, CLOSE = "\ue000", "\ue001"
MAX_REMEMBERED_ANSWERS = 256  # answers whose token ids are kept: the recent turns of every chat a busy Space serves


@dataclass(frozen=True)
class PromptFormat:
    markers: dict[str, tuple[str, str]]  # role -> (start, end)
    detect: tuple[str, ...]  # substrings of a GGUF chat template that identify this format
    stop: tuple[str, ...] = ()
    skip_empty_system: bool = True  # the template drops a system message whose content is empty
    answer_prefix: str = ""  # put before each past answer's text, after the assistant marker
    # For formats whose turn markers are plain text (no control tokens to keep out of message text): what in a
    # message would read as a marker. Matches are defused by neutralize().
    forged_markers: re.Pattern | None = None

    def neutralize(self, text: str) -> str:
        """Message text as the model should read it: a forged turn marker stays visible but is no longer the marker.

        Its '#' become the full-width '＃' (U+FF03), which looks the same to a reader and tokenizes differently: a
        visitor's "### Assistant: ..." is then a quote of a marker, not the start of a turn."""
        if self.forged_markers is None:
            return text
        return self.forged_markers.sub(lambda m: m.group().replace("#", "\uff03"), text)


PROMPT_FORMATS = {
    # microsoft/Phi-3.5-mini-instruct's template (TRL ships the same copy as phi3_5.jinja).
    "phi3": PromptFormat(
        {
            "system": ("<|system|>\n", "<|end|>\n"),
            "user": ("<|user|>\n", "<|end|>\n"),
            "assistant": ("<|assistant|>\n", "<|end|>\n"),
        },
        detect=("<|user|>", "<|end|>"),
        stop=("<|end|>", "<|endoftext|>"),
    ),
    # ChatML, e.g. SmolLM2-Instruct and Qwen.
    "chatml": PromptFormat(
        {
            "system": ("<|im_start|>system\n", "<|im_end|>\n"),
            "user": ("<|im_start|>user\n", "<|im_end|>\n"),
            "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
        },
        detect=("<|im_start|>",),
        stop=("<|im_end|>",),
        skip_empty_system=False,
    ),
    # openassistant-guanaco text, which the seed project's S29 models were trained on.
    "human": PromptFormat(
        {"system": ("", "\n\n"), "user": ("### Human: ", ""), "assistant": ("### Assistant:", "")},
        detect=("### Human:",),
        stop=("### Human:", "### Assistant:"),
        answer_prefix=" ",
        # Any number of '#', any case, spaces or none: near misses of the marker are read as one too.
        forged_markers=re.compile(r"#+[ \t]*(?:human|assistant)[ \t]*:", re.IGNORECASE),
    ),
}


def detect_prompt_format(chat_template: str | None, source: str) -> str:
    for name, fmt in PROMPT_FORMATS.items():
        if chat_template and all(s in chat_template for s in fmt.detect):
            return name
    what = "has no tokenizer.chat_template" if not chat_template else "has a chat template this app does not know"
    raise ConfigError(f"{source} {what}; set PROMPT_FORMAT to one of {', '.join(PROMPT_FORMATS)}.")


def make_messages_formatter(fmt: PromptFormat):
    from llama_cpp_agent.messages_formatter import MessagesFormatter, PromptMarkers, Roles

    class TemplateFormatter(MessagesFormatter):
        def _format_message_content(self, content: str, role: Roles) -> str:
            # Never stripped: the template keeps content as it is, and so does the training data.
            return OPEN + fmt.neutralize(content.replace(OPEN, "").replace(CLOSE, "")) + CLOSE

        def _format_system_message(self, content: str) -> str:
            if fmt.skip_empty_system and content == OPEN + CLOSE:
                return ""
            return super()._format_system_message(content)

        def _format_assistant_message(self, content: str) -> str:
            return super()._format_assistant_message(fmt.answer_prefix + content)

    markers = {Roles(role): PromptMarkers(*pair) for role, pair in fmt.markers.items()}
    markers[Roles.tool] = PromptMarkers("", "")
    return TemplateFormatter(
        pre_prompt="",
        prompt_markers=markers,
        include_sys_prompt_in_first_user_message=False,
        default_stop_sequences=list(fmt.stop),
        strip_prompt=False,  # True would also strip the "\n" after the answer's role marker
        bos_token="",
        # The agent drops streamed chunks equal to this. The engine streams no end-of-generation text, so nothing needs
        # dropping; it must not be "": an empty chunk is the stream's heartbeat while a long prompt is read.
        eos_token="\ufffe",
    )


class PromptTokenizer:
    """Tokenizes a formatted prompt the way llama.cpp does with special tokens on, except inside OPEN...CLOSE.

    llama.cpp splits text at special-token strings, drops whitespace beside tokens marked lstrip/rstrip,
    and tokenizes the pieces between them separately; this does the same, but only template text may
    produce special tokens. No BOS is added: the chat templates in PROMPT_FORMATS start without one,
    exactly as the model saw its training data.
    """

    def __init__(self, vocab):
        """`vocab`: a Vocab, or anything with its tokenize/detokenize/special_tokens (remote.RemoteVocab)."""
        import llama_cpp

        self.vocab = vocab
        self.special: dict[str, int] = {}  # text -> token id
        self.attrs: dict[int, int] = {}  # token id -> llama_token_attr bits
        for text, (token, attr) in vocab.special_tokens().items():
            self.special[text] = token
            self.attrs[token] = attr
        # Longest first, as llama.cpp tries them, so "<|end|>" never shadows "<|endoftext|>".
        alternatives = sorted(self.special, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self.lstrip, self.rstrip = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP, llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
        self.answers: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # recent answers -> the ids that made them
        self.lock = threading.Lock()  # several chats tokenize and remember answers at once

    def remember_answer(self, text: str, ids) -> None:
        """Keep the token ids the model generated for its answer `text`, so that the next turn's prompt carries them.

        Re-tokenizing an answer does not always give back the model's own ids (it may have spelt a word in several
        pieces); the next turn's prompt would then leave llama.cpp's cache at that answer and everything after it
        would be evaluated again. Kept only when the ids spell `text` exactly and are all plain text. "Exactly" as the
        visitor saw it: bytes that are no UTF-8 (a model may emit a lone byte piece) were shown as U+FFFD, and that
        text comes back with the next turn; re-tokenized, it would be neither the model's ids nor its bytes.
        """
        ids = tuple(int(t) for t in ids)
        shown = self.vocab.detokenize(ids).decode("utf-8", errors="replace")
        if not text or any(t in self.attrs for t in ids) or shown != text:
            return
        with self.lock:
            self.answers[text] = ids
            self.answers.move_to_end(text)
            while len(self.answers) > MAX_REMEMBERED_ANSWERS:
                self.answers.popitem(last=False)

    def __call__(self, prompt: str) -> list[int]:
        with self.lock:
            answers = dict(self.answers)
        return self._tokenize(prompt, answers)

    def _tokenize(self, prompt: str, answers: dict[str, tuple[int, ...]]) -> list[int]:
        # 1. Fragments: special tokens found in template text, and the raw text between them.
        fragments: list[int | str | tuple[int, ...]] = [""]
        for i, piece in enumerate(re.split(f"[{OPEN}{CLOSE}]", prompt)):
            trusted = i % 2 == 0  # split alternates template text / message content
            if not trusted and piece in answers:  # the model's own answer: its own ids, as in the cache
                fragments += [answers[piece], ""]
                continue
            pos = 0
            for match in self.pattern.finditer(piece) if trusted and self.pattern else ():
                fragments[-1] += piece[pos : match.start()]
                fragments += [self.special[match.group()], ""]
                pos = match.end()
            fragments[-1] += piece[pos:]
        # 2. Whitespace stripping around tokens that ask for it (Phi-3's are rstrip).
        for i, fragment in enumerate(fragments):
            if isinstance(fragment, int):
                attr = self.attrs[fragment]
                if attr & self.lstrip and i > 0 and isinstance(fragments[i - 1], str):
                    fragments[i - 1] = fragments[i - 1].rstrip()
                if attr & self.rstrip and i + 1 < len(fragments) and isinstance(fragments[i + 1], str):
                    fragments[i + 1] = fragments[i + 1].lstrip()
        # 3. Token ids.
        tokens: list[int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                tokens.append(fragment)
            elif isinstance(fragment, tuple):
                tokens += fragment
            elif fragment:
                tokens += self.vocab.tokenize(fragment, special=False)
        return tokens


def format_prompt(formatter, system: str, past: list[dict], message: str) -> str:
    from llama_cpp_agent.chat_history.messages import Roles

    conversation = [{"role": "system", "content": system}, *past, {"role": "user", "content": message}]
    return formatter.format_conversation(conversation, Roles.assistant)[0]


def fit_history(formatter, tokenize: PromptTokenizer, system: str, past: list[dict], message: str, max_tokens: int,
                n_ctx: int, step: int | None = None) -> tuple[list[dict], list[int], int]:
    """Drop the oldest turns until prompt + answer budget fit the context window; the system message stays.

    Turns go in sticky steps: the history is only ever cut before a user turn that is the first to start past a
    multiple of `step` characters of the conversation (default: n_ctx characters, about a quarter of the window in
    tokens). As a chat grows, its cut then stays where it is for several turns instead of moving by one turn each
    turn, and the prompt's beginning changes only when it moves: each change costs the engine a context shift (which
    re-ropes the whole cache: docs/performance.md) or, with CONTEXT_SHIFT=0, a re-read of the kept history. The price
    is up to `step` characters less history than would fit. `step=1` drops as few turns as fit.

    Returns (past kept, prompt token ids, answer budget). Raises BadRequest if the new message alone cannot fit.
    """
    # An answer may not claim more than half the window, or one long answer would evict the whole chat.
    reserve = min(max_tokens, n_ctx // 2)
    step = step or n_ctx
    cuts = [0]  # where the kept history may begin: all of it, or a turn that is the first past a multiple of step
    previous = start = 0  # where the turn before this one, and this one, start (characters)
    for i in range(0, len(past), 2):
        if i and start // step > previous // step:
            cuts.append(i)
        previous, start = start, start + sum(len(m["content"]) + 1 for m in past[i:i + 2])
    for i in [*cuts, len(past)]:
        ids = tokenize(format_prompt(formatter, system, past[i:], message))
        if len(ids) + reserve <= n_ctx:
            return past[i:], ids, min(max_tokens, n_ctx - len(ids))
    raise BadRequest(
        f"Your message is too long for this model: {len(ids)} tokens with the system message, and the "
        f"context holds {n_ctx} including {reserve} for the answer. Shorten it or lower max tokens."
    )
