"""Chat with Phi-3.5-mini fine-tuned on OpenAssistant (oasst1), served from GGUF files on a CPU Space.

    pip install -r requirements.txt && python app.py             # the Hub models in CATALOG
    MODEL_PATH=/path/to/model.Q4_K_M.gguf python app.py           # a local file, no download

Every setting is an environment variable; README.md lists them all. The file reads top to bottom:
settings -> model files -> model store -> prompt building -> respond -> UI.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import queue
import re
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting or model file the user must fix; the message is one sentence saying what to do."""


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
    n_ctx: int  # context window in tokens: prompt + answer must fit
    n_threads: int  # decode threads
    n_threads_batch: int  # prompt-processing threads
    n_batch: int
    queue_size: int  # requests waiting beyond this are told to retry
    seed: int  # -1: a fresh seed per answer
    verify_sha256: bool  # hash downloaded files against the Hub's LFS sha256 before loading
    hf_token: str | None

    @classmethod
    def from_env(cls) -> Settings:
        cpus = _cpu_count()
        return cls(
            n_ctx=_env_int("N_CTX", 4096, minimum=256),
            # Measured on 2 cores with a Phi-3.5-mini-shaped Q4_K_M (README, Performance): 2 decode threads give
            # 5.7 tokens/s, 1 thread 2.8. Only if something else keeps a core busy does 1 thread win (3.0 vs 1.9):
            # set N_THREADS=1 on a shared machine.
            n_threads=_env_int("N_THREADS", cpus),
            n_threads_batch=_env_int("N_THREADS_BATCH", cpus),
            n_batch=_env_int("N_BATCH", 512),
            queue_size=_env_int("QUEUE_SIZE", 16),
            seed=_env_int("SEED", -1, minimum=-1),
            verify_sha256=os.environ.get("VERIFY_SHA256", "1") not in ("0", "false", "no"),
            hf_token=os.environ.get("HF_TOKEN") or None,  # only when set: anonymous downloads otherwise
        )


SYSTEM_MESSAGE = "You are a helpful assistant."
# (minimum, maximum, default) of each sampling control; the server enforces them for API callers too.
LIMITS = {
    "max_tokens": (1, 4096, 2048),
    "temperature": (0.1, 4.0, 0.7),
    "top_p": (0.1, 1.0, 0.95),
    "top_k": (0, 100, 40),
    "repeat_penalty": (0.0, 2.0, 1.1),
}


@dataclass(frozen=True)
class ModelSpec:
    label: str  # what the dropdown shows
    filename: str  # file in `repo`, or a local path when `repo` is None
    repo: str | None = None
    revision: str | None = None  # branch, tag or commit; None = the repo's default branch
    prompt_format: str = "auto"  # a PROMPT_FORMATS key, or "auto": read the GGUF's tokenizer.chat_template


# The seed project's own QLoRA fine-tunes of Phi-3-mini. They were trained on openassistant-guanaco text,
# "### Human: ...### Assistant: ...", not on Phi-3's chat template, so they are prompted in that format.
CATALOG = [
    ModelSpec("S29 Phi-3 merged 0.2 (Q4_K_M)", "Q4_K_M.gguf", "Shivdutta/S29-phi3-merged-0.2_GGUF", None, "human"),
    ModelSpec("S29 Phi-3 merged 0.3 (Q5_K_M)", "Q5_K_M.gguf", "Shivdutta/S29-phi3-merged-0.3_GGUF", None, "human"),
]


def catalog_from_env() -> list[ModelSpec]:
    """MODEL_PATH (local files) or MODEL_REPO + MODEL_FILES replace the built-in catalog."""
    prompt_format = os.environ.get("PROMPT_FORMAT", "auto").strip() or "auto"
    if prompt_format != "auto" and prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"PROMPT_FORMAT={prompt_format!r} is unknown; use auto or one of {', '.join(PROMPT_FORMATS)}.")
    if paths := _env_list("MODEL_PATH"):
        return [ModelSpec(Path(p).name, p, prompt_format=prompt_format) for p in paths]
    if repo := os.environ.get("MODEL_REPO", "").strip():
        files = _env_list("MODEL_FILES")
        if not files:
            raise ConfigError("MODEL_REPO is set but MODEL_FILES is empty: name the .gguf files to serve, comma-separated.")
        revision = os.environ.get("MODEL_REVISION", "").strip() or None
        return [ModelSpec(f"{repo.split('/')[-1]}/{f}", f, repo, revision, prompt_format) for f in files]
    return CATALOG


# ----------------------------------------------------------------------------------------------------------------------
# Model files
# ----------------------------------------------------------------------------------------------------------------------


def fetch_model_files(catalog: list[ModelSpec], token: str | None) -> tuple[dict[str, Path], dict[str, str]]:
    """Local path or `hf_hub_download` (standard HF cache, so a Space's `preload_from_hub` is reused).

    With the Hub unreachable, huggingface_hub answers from its cache. Returns (paths, problems) by label.
    """
    from huggingface_hub import hf_hub_download

    paths, problems = {}, {}
    for spec in catalog:
        if spec.repo is None:
            path = Path(spec.filename).expanduser()
            if path.is_file():
                paths[spec.label] = path
            else:
                problems[spec.label] = f"{path} does not exist"
            continue
        try:
            paths[spec.label] = Path(
                hf_hub_download(spec.repo, spec.filename, revision=spec.revision, token=token)
            )
        except Exception as err:  # offline and not cached, gated repo, missing file, ...
            problems[spec.label] = f"{spec.repo}/{spec.filename}: {type(err).__name__}: {str(err).splitlines()[0]}"
    return paths, problems


GGUF_MAGIC = b"GGUF"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_model_file(path: Path, verify_sha256: bool) -> None:
    """Refuse files llama.cpp would choke on, with a message naming the file, before handing them over."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"{path.name} is not a GGUF file (no GGUF header).")
    # In the HF cache, an LFS file is a link to blobs/<sha256 of its content>: a free, offline checksum.
    blob = path.resolve()
    if verify_sha256 and path.is_symlink() and _SHA256.fullmatch(blob.name):
        digest = hashlib.sha256()
        with open(blob, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != blob.name:
            raise ConfigError(
                f"{path.name} is corrupt: its sha256 does not match the Hub's; delete {blob} to download it again."
            )


# ----------------------------------------------------------------------------------------------------------------------
# Prompt building
# ----------------------------------------------------------------------------------------------------------------------
#
# Each format reproduces, character for character, the chat template its models were trained with
# (tests/test_prompt.py renders the same chat through transformers' apply_chat_template and compares
# token ids). llama-cpp-agent's own PHI_3 formatter folds the system prompt into the first user turn,
# which is not Phi-3.5's template, hence these custom MessagesFormatters.

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
        eos_token="",
    )


class PromptTokenizer:
    """Tokenizes a formatted prompt the way llama.cpp does with special tokens on, except inside OPEN...CLOSE.

    llama.cpp splits text at special-token strings, drops whitespace beside tokens marked lstrip/rstrip,
    and tokenizes the pieces between them separately; this does the same, but only template text may
    produce special tokens. No BOS is added: the chat templates in PROMPT_FORMATS start without one,
    exactly as the model saw its training data.
    """

    def __init__(self, llm):
        import llama_cpp

        self.llm = llm
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        special_attrs = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.special: dict[str, int] = {}  # text -> token id
        self.attrs: dict[int, int] = {}  # token id -> llama_token_attr bits
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            attr = llama_cpp.llama_vocab_get_attr(vocab, token)
            if attr & special_attrs:
                text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
                if text:
                    self.special.setdefault(text, token)
                    self.attrs[token] = attr
        # Longest first, as llama.cpp tries them, so "<|end|>" never shadows "<|endoftext|>".
        alternatives = sorted(self.special, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self.lstrip, self.rstrip = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP, llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
        self.answers: OrderedDict[str, tuple[int, ...]] = OrderedDict()  # recent answers -> the ids that made them
        self.pieces: dict[bytes, int] | None = None

    def remember_answer(self, text: str, n_prompt: int) -> int:
        """Keep the token ids the model just generated for `text`, its answer to a prompt of n_prompt tokens;
        returns how many tokens it generated for it.

        Re-tokenizing an answer does not always give back the model's own ids (it may have spelt a word in several
        pieces); the next turn's prompt would then leave llama.cpp's cache at that answer and everything after it
        would be evaluated again. Kept only when the ids spell `text` exactly and are all plain text.
        """
        llm = self.llm
        ids = [int(t) for t in llm.input_ids[n_prompt : llm.n_tokens]]  # evaluated: all but the last one sampled
        spelt = llm.detokenize(ids, prev_tokens=[int(t) for t in llm.input_ids[:n_prompt]])
        wanted = text.encode("utf-8")
        rest = wanted[len(spelt) :]
        if rest:  # the last token, sampled and streamed but never evaluated (the answer hit max_tokens, or a Stop)
            ids.append(self._by_piece().get(rest, -1))
        if text and wanted == spelt + rest and not any(t < 0 or t in self.attrs for t in ids):
            self.answers[text] = tuple(ids)
            self.answers.move_to_end(text)
            while len(self.answers) > MAX_REMEMBERED_ANSWERS:
                self.answers.popitem(last=False)
        return len(ids)

    def _by_piece(self) -> dict[bytes, int]:
        """Token id by its text as streamed (a piece inside an answer: no leading-space stripping); built once."""
        if self.pieces is None:
            import ctypes

            import llama_cpp

            vocab, buf = llama_cpp.llama_model_get_vocab(self.llm.model), ctypes.create_string_buffer(256)
            self.pieces = {}
            for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
                n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
                if n > 0 and token not in self.attrs:
                    self.pieces.setdefault(buf.raw[:n], token)
        return self.pieces

    def __call__(self, prompt: str) -> list[int]:
        # 1. Fragments: special tokens found in template text, and the raw text between them.
        fragments: list[int | str | tuple[int, ...]] = [""]
        for i, piece in enumerate(re.split(f"[{OPEN}{CLOSE}]", prompt)):
            trusted = i % 2 == 0  # split alternates template text / message content
            if not trusted and piece in self.answers:  # the model's own answer: its own ids, as in the cache
                fragments += [self.answers[piece], ""]
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
                tokens += self.llm.tokenize(fragment.encode("utf-8"), add_bos=False, special=False)
        return tokens


# ----------------------------------------------------------------------------------------------------------------------
# Model store
# ----------------------------------------------------------------------------------------------------------------------

# requirements.txt builds llama.cpp's CPU code once per x86 generation, as separate libraries (GGML_BACKEND_DL +
# GGML_CPU_ALL_VARIANTS), so one build runs AVX-512 where the CPU has it and stays safe where it does not. These are
# the Linux /proc/cpuinfo flags each variant's instructions need (variants from llama.cpp's ggml/src/CMakeLists.txt).
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = (*_HASWELL, "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
CPU_VARIANT_FLAGS = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _HASWELL,
    "alderlake": (*_HASWELL, "avx_vnni"),
    "skylakex": _AVX512,
    "cannonlake": (*_AVX512, "avx512vbmi"),
    "cascadelake": (*_AVX512, "avx512_vnni"),
    "icelake": (*_AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": (*_AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "sapphirerapids": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"),
}
_cpu_backend: str | None = None  # the variant registered in this process


def os_cpu_flags() -> set[str] | None:
    """The instruction sets the kernel lets processes use (Linux x86 only; None elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return set(line.split(":", 1)[1].split()) if line else None


def pick_cpu_variant(scores: dict[str, int], flags: set[str] | None) -> str | None:
    """The best variant by llama.cpp's own score, among those the OS can run.

    llama.cpp scores a variant by CPUID alone (its own FIXME: "this does not check for OS support"), and some VMs
    advertise AMX without enabling it: the AMX variant would then win and die with SIGILL on the first K-quant
    product. Linux lists in /proc/cpuinfo only what it enabled, so a variant must also find all its flags there;
    an unknown variant is never picked when the flags are known, since what it needs cannot be checked.
    """
    def runnable(name: str) -> bool:
        return flags is None or (name in CPU_VARIANT_FLAGS and set(CPU_VARIANT_FLAGS[name]) <= flags)

    usable = {name: score for name, score in scores.items() if score > 0 and runnable(name)}
    return max(usable, key=usable.get) if usable else None


def load_cpu_backend() -> str:
    """Register llama.cpp's fastest safe CPU variant with the llama.cpp this process uses; returns its name.

    Must run before the first model loads. llama.cpp looks for variant libraries only beside the executable and in
    the working directory; pip installs them in site-packages/bin. A build without variants returns "built-in".
    """
    global _cpu_backend
    if _cpu_backend:
        return _cpu_backend
    import ctypes

    import llama_cpp

    package = Path(llama_cpp.__file__).resolve().parent
    # ggml's functions are looked up through the libllama that llama_cpp loaded, so they come from the very libggml
    # it links (the wheel also holds other copies of libggml, each with its own, empty backend registry).
    ggml = ctypes.CDLL(str(package / "lib" / "libllama.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    if ggml.ggml_backend_dev_by_type(0):  # 0 = GGML_BACKEND_DEVICE_TYPE_CPU: a build with its CPU code linked in
        _cpu_backend = "built-in"
        return _cpu_backend
    libraries = {path.name.removeprefix("libggml-cpu-").removesuffix(".so"): path
                 for path in (package.parent / "bin").glob("libggml-cpu-*.so")}
    scores = {name: ctypes.CDLL(str(path)).ggml_backend_score() for name, path in libraries.items()}
    best = pick_cpu_variant(scores, os_cpu_flags())
    if best is None:
        raise ConfigError(
            f"llama-cpp-python has no CPU backend this machine can run (found: {', '.join(sorted(scores)) or 'none'} "
            f"in {package.parent / 'bin'}): reinstall it with the flags in requirements.txt."
        )
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    if not ggml.ggml_backend_load(str(libraries[best]).encode()):
        raise ConfigError(f"llama.cpp could not load its CPU backend {libraries[best]}.")
    _cpu_backend = best
    return best


# Every llama.cpp call that computes runs in this one thread. OpenMP keeps a team of worker threads per thread that
# starts parallel work: once a second thread had computed, every later token in the process was ~15% slower
# (measured on 2 cores). It also lets llama.cpp decode ahead of the web server: Gradio turns each update into a
# message between two calls to the generator (a few ms of Python), and llama.cpp would otherwise wait for it.
DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-decode")
# At most ~10 streamed updates a second: still smooth to read, and each update costs Gradio a few ms of CPU that
# llama.cpp's threads need (measured over HTTP on 2 cores, paired rounds: +3% decode against one update per token).
STREAM_EVERY = 0.1


@dataclass
class LoadedModel:
    label: str
    llm: object  # llama_cpp.Llama
    prompt_format: PromptFormat
    formatter: object  # llama_cpp_agent MessagesFormatter
    tokenize: PromptTokenizer
    provider: object  # llama_cpp_agent provider that sends token ids, not text


class Busy(Exception):
    """The waiting line is full."""


class WaitingLine:
    """First come, first served turns at the model, with a bounded line of waiters.

    Gradio's own queue would also serialize requests, but when full it answers with an error; here a
    request that finds the line full gets a plain "try again" reply, and waiters see their place.
    """

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.line: list[object] = []  # line[0] holds the turn
        self.changed = threading.Condition()

    def wait(self, ticket: object):
        """Join the line; yields how many are ahead while waiting (about once a second) and returns at our turn.
        The caller must call leave(ticket) afterwards, also when it stops early."""
        with self.changed:
            if len(self.line) > self.max_waiting:
                raise Busy(f"The Space is busy: {len(self.line) - 1} chats are already waiting. Please try again in a minute.")
            self.line.append(ticket)
        while True:
            with self.changed:
                if self.line[0] is ticket:
                    return
                self.changed.wait(timeout=1.0)
                if self.line[0] is ticket:
                    return
                ahead = self.line.index(ticket)
            # Yielding regularly also lets a Stop or a disconnect end a request that is still waiting.
            yield ahead

    def leave(self, ticket: object) -> None:
        with self.changed:
            if ticket in self.line:
                self.line.remove(ticket)
                self.changed.notify_all()


class ModelStore:
    """One llama.cpp model in memory at a time, loaded on first use and swapped when the dropdown changes."""

    def __init__(self, catalog: list[ModelSpec], paths: dict[str, Path], settings: Settings):
        self.specs = {spec.label: spec for spec in catalog if spec.label in paths}
        self.paths = paths
        self.settings = settings
        self.broken: dict[str, str] = {}  # label -> why it cannot load; the other models keep serving
        self.checked: set[Path] = set()  # files already hashed: switching models back does not re-read GBs
        self.current: LoadedModel | None = None
        self.line = WaitingLine(settings.queue_size)  # one load or generation at a time

    @property
    def labels(self) -> list[str]:
        return list(self.specs)

    def get(self, label: str) -> LoadedModel:
        """The loaded model for `label`; raises ConfigError (a message for the chat) when it cannot load."""
        if label not in self.specs:
            raise ConfigError(f"Unknown model {label!r}; choose one of: {', '.join(self.specs)}.")
        if label in self.broken:
            raise ConfigError(self.broken[label])
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
            self.current.llm.close()  # frees the weights and the KV cache now, not at the next GC
            self.current = None
            gc.collect()

    def _load(self, spec: ModelSpec, path: Path) -> LoadedModel:
        from llama_cpp import Llama

        load_cpu_backend()
        if path not in self.checked:
            check_model_file(path, self.settings.verify_sha256)
            self.checked.add(path)
        start = time.perf_counter()
        try:
            llm = DECODER.submit(
                Llama,
                model_path=str(path),
                n_ctx=self.settings.n_ctx,
                n_threads=self.settings.n_threads,
                n_threads_batch=self.settings.n_threads_batch,
                n_batch=self.settings.n_batch,
                # Fused attention on the CPU too: +7% decode on the full-size model here (llama-bench's "auto" uses it).
                flash_attn=True,
                seed=self.settings.seed if self.settings.seed >= 0 else 0xFFFFFFFF,
                verbose=False,
            ).result()
        except (ValueError, RuntimeError, OSError) as err:
            raise ConfigError(f"{path.name} could not be loaded by llama.cpp (truncated or damaged?): {err}") from None
        seconds = time.perf_counter() - start
        name = spec.prompt_format
        if name == "auto":
            try:
                name = detect_prompt_format(llm.metadata.get("tokenizer.chat_template"), path.name)
            except ConfigError:
                llm.close()
                raise
        fmt = PROMPT_FORMATS[name]
        tokenize = PromptTokenizer(llm)
        print(f"loaded {path.name} in {seconds:.1f} s (prompt format: {name})", flush=True)
        return LoadedModel(spec.label, llm, fmt, make_messages_formatter(fmt), tokenize, make_provider(llm, tokenize))


def make_provider(llm, tokenize: PromptTokenizer):
    from llama_cpp_agent.llm_output_settings import LlmStructuredOutputType
    from llama_cpp_agent.providers import LlamaCppPythonProvider

    class TokenIdProvider(LlamaCppPythonProvider):
        """Hands llama.cpp token ids built by PromptTokenizer instead of a string it would re-tokenize, and holds
        the answer to max_tokens itself."""

        def create_completion(self, prompt, structured_output_settings, settings, bos_token):
            if structured_output_settings.output_type != LlmStructuredOutputType.no_structured_output:
                raise NotImplementedError("this app streams plain text; grammars go through LlamaCppPythonProvider")
            ids = tokenize(prompt)
            options = {**settings.as_dict(), "stop": settings.get_additional_stop_sequences()}
            del options["additional_stop_sequences"]
            return llm.create_completion(ids, stopping_criteria=stop_after(len(ids) + settings.max_tokens), **options)

    return TokenIdProvider(llm)


def stop_after(n_tokens: int):
    """A llama-cpp-python stopping criterion: end the answer before its (n_tokens + 1)-th token would be evaluated.

    llama-cpp-python checks max_tokens only after a token that ends a UTF-8 character. A model that keeps emitting
    partial characters (lead bytes, as SmolLM2 did for the message "\\x80") ran past max_tokens and off the end of
    the context: llama_decode returned 1 ("failed to find a memory slot"). This check runs after every token.
    """
    from llama_cpp import StoppingCriteriaList

    # It gets the ids llama.cpp has evaluated so far: the prompt plus all answer tokens but the one just sampled.
    return StoppingCriteriaList([lambda evaluated, _logits: len(evaluated) >= n_tokens])


# ----------------------------------------------------------------------------------------------------------------------
# Respond
# ----------------------------------------------------------------------------------------------------------------------

# The line of numbers after each answer; removed again when the answer comes back as history.
STATS = re.compile(r"\n\n<sub>\d+ tokens · [^\n]*</sub>$")
# Replies from the app rather than the model start with these; they never reach the model as history.
NOTICE, WAITING = "⚠️ ", "⏳ "


class BadRequest(Exception):
    """Input that gets a plain answer in the chat instead of a generation."""


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


def fit_history(model: LoadedModel, system: str, past: list[dict], message: str, max_tokens: int, n_ctx: int):
    """Drop the oldest turns until prompt + answer budget fit the context window; the system message stays.

    Returns (past kept, prompt token count, answer budget). Raises BadRequest if the new message alone
    cannot fit.
    """
    from llama_cpp_agent.chat_history.messages import Roles

    # An answer may not claim more than half the window, or one long answer would evict the whole chat.
    reserve = min(max_tokens, n_ctx // 2)
    while True:
        conversation = [{"role": "system", "content": system}, *past, {"role": "user", "content": message}]
        prompt, _ = model.formatter.format_conversation(conversation, Roles.assistant)
        n_prompt = len(model.tokenize(prompt))
        if n_prompt + reserve <= n_ctx:
            return past, n_prompt, min(max_tokens, n_ctx - n_prompt)
        if not past:
            raise BadRequest(
                f"Your message is too long for this model: {n_prompt} tokens with the system message, and the "
                f"context holds {n_ctx} including {reserve} for the answer. Shorten it or lower max tokens."
            )
        past = past[2:]  # one user turn and its answer


def respond(message, history, model_label, system_message, max_tokens, temperature, top_p, top_k, repeat_penalty):
    """Stream an answer. Bad input, a full line or a broken model file get a one-line notice, never an exception."""
    ticket = object()
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
        for ahead in STORE.line.wait(ticket):  # one generation at a time: the model and its KV cache are shared
            yield f"{WAITING}Waiting for the model: {ahead} {'chat' if ahead == 1 else 'chats'} ahead of you."
        model = STORE.get(text_of(model_label))
        yield from generate(model, system, past, message, max_tokens, sampling, STORE.settings)
    except (BadRequest, ConfigError, Busy) as err:
        yield f"{NOTICE}{err}"
    finally:
        STORE.line.leave(ticket)


def decoded_ahead(stream):
    """Run `stream` in DECODER; yield the text it produced since the previous yield (several tokens when the consumer
    is slower). Closing this stops the stream after its current token and waits until llama.cpp is idle."""
    pieces: queue.SimpleQueue = queue.SimpleQueue()
    stop, done, end = threading.Event(), threading.Event(), object()

    def decode():
        try:
            for piece in stream:
                pieces.put(piece)
                if stop.is_set():
                    break
        except BaseException as err:  # handed to the consumer, raised there
            pieces.put(err)
        finally:
            stream.close()
            pieces.put(end)
            done.set()

    job = DECODER.submit(decode)
    try:
        while True:
            items = [pieces.get()]
            while not pieces.empty():
                items.append(pieces.get_nowait())
            text = "".join(item for item in items if isinstance(item, str))
            if text:
                yield text
                done.wait(STREAM_EVERY)  # llama.cpp decodes on meanwhile; the next update brings what it made
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            if end in items:
                return
    finally:
        stop.set()
        job.result()  # the model and its cache are free again before the next request's turn


def generate(model: LoadedModel, system: str, past: list[dict], message: str, max_tokens: int, sampling: dict,
             settings: Settings):
    import llama_cpp
    from llama_cpp_agent import LlamaCppAgent
    from llama_cpp_agent.chat_history import BasicChatHistory
    from llama_cpp_agent.chat_history.messages import Roles

    past, n_prompt, budget = fit_history(model, system, past, message, max_tokens, settings.n_ctx)
    history = BasicChatHistory(k=len(past) + 3)  # we trim by tokens above; its own limit counts messages
    for item in past:
        history.add_message({"role": Roles(item["role"]), "content": item["content"]})  # it matches Roles, not str
    agent = LlamaCppAgent(
        model.provider,
        system_prompt=system,
        custom_messages_formatter=model.formatter,
        add_tools_and_structures_documentation_to_system_prompt=False,  # else it appends "\n" to the system prompt
    )
    sampler = model.provider.get_provider_default_settings()
    sampler.stream = True
    sampler.max_tokens = budget
    sampler.seed = settings.seed
    for key, value in sampling.items():
        setattr(sampler, key, value)

    llama_cpp.llama_perf_context_reset(model.llm.ctx)
    stream = agent.get_chat_response(
        message, chat_history=history, llm_sampling_settings=sampler, returns_streaming_generator=True
    )
    answer, finished = "", False
    ahead = decoded_ahead(stream)
    try:
        for text in ahead:
            answer += text
            yield answer
        finished = True
    finally:
        ahead.close()  # the Stop button or a disconnect closes us: llama.cpp stops after its current token
        generated = model.tokenize.remember_answer(answer, n_prompt)  # so that the next turn reuses the cache
        perf = llama_cpp.llama_perf_context(model.llm.ctx)
        print(f"{'answered' if finished else 'stopped'}: {generated} tokens generated, "
              f"{perf.n_p_eval} of {n_prompt} prompt tokens evaluated", flush=True)
    speed = perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else 0.0
    stats = f"{generated} tokens · {speed:.1f} tokens/s · prompt {perf.n_p_eval} of {n_prompt} tokens evaluated"
    yield f"{answer}\n\n<sub>{stats}</sub>"


# ----------------------------------------------------------------------------------------------------------------------
# UI
# ----------------------------------------------------------------------------------------------------------------------

STORE: ModelStore  # set by main()

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


def build_ui(labels: list[str]) -> gr.ChatInterface:
    slider = {name: dict(minimum=low, maximum=high, value=default) for name, (low, high, default) in LIMITS.items()}
    return gr.ChatInterface(
        respond,
        title="Phi-3.5-mini · OpenAssistant chat",
        description="QLoRA fine-tune of Phi-3.5-mini-instruct on oasst1, running on CPU with llama.cpp.",
        chatbot=gr.Chatbot(height=520, buttons=["copy"]),
        additional_inputs=[
            lenient(gr.Dropdown(labels, value=labels[0], label="Model")),
            gr.Textbox(SYSTEM_MESSAGE, label="System message"),
            lenient(gr.Slider(**slider["max_tokens"], step=1, label="Max tokens")),
            lenient(gr.Slider(**slider["temperature"], step=0.1, label="Temperature")),
            lenient(gr.Slider(**slider["top_p"], step=0.05, label="Top-p")),
            lenient(gr.Slider(**slider["top_k"], step=1, label="Top-k")),
            lenient(gr.Slider(**slider["repeat_penalty"], step=0.1, label="Repetition penalty")),
        ],
        examples=[[e] for e in EXAMPLES],
        cache_examples=False,
        api_name="chat",
        concurrency_limit=None,  # requests go straight to respond(), whose WaitingLine serializes and bounds them
    )


def main() -> None:
    global STORE
    try:
        settings = Settings.from_env()
        catalog = catalog_from_env()
        paths, problems = fetch_model_files(catalog, settings.hf_token)
        for label, why in problems.items():
            print(f"warning: {label} is unavailable: {why}", file=sys.stderr)
        if not paths:
            raise ConfigError(
                "No model file is available (the Hub is unreachable or the files are missing, and nothing is cached): "
                "set MODEL_PATH to a local .gguf file, or MODEL_REPO and MODEL_FILES to a reachable Hub repo."
            )
        print(f"llama.cpp CPU backend: {load_cpu_backend()}", flush=True)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    STORE = ModelStore(catalog, paths, settings)
    demo = build_ui(STORE.labels)
    # Gradio's queue only hands requests over (no concurrency limit); this cap is a backstop against floods.
    demo.queue(max_size=4 * settings.queue_size + 16)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"))


if __name__ == "__main__":
    main()
