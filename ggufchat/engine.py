"""The engine: several chats decoded together in one llama.cpp context, by one thread.

Each running chat owns a slot, i.e. a sequence id in a context of `parallel` sequences. Every step is one
`llama_decode` holding the next token of every chat that is answering plus a bounded chunk of the prompt of any chat
that has just arrived (chunked prefill: a long prompt never freezes the others for more than a chunk). An idle
engine gathers chats that arrive together for a moment, so that their prompts go in one batch. Each chat
samples with its own sampler chain at its own logits row, streams whole UTF-8 characters, and stops at an
end-of-generation token, a stop string, its max tokens or the end of its context.

Memory: each slot has a KV stream of its own, `n_ctx` cells (`n_ctx * parallel` in all), so no chat can take
another's room and a step's attention reads only the cells of the chats in it. (A unified cache shares one pool, but
then every token attends over every used cell, idle chats' included: measured 2026-11-30 on this 2-core machine,
Phi-3.5-mini shape Q4_K_M, one chat decoded at 0.52 tokens/s beside 5,800 cells kept for other chats, against about
8 with the cache empty.) A chat ends at the end of its stream; should llama.cpp still find no room, the newest chat
in the step ends with a notice: `llama_decode` never fails in a visitor's face.

Prefix reuse (where cells can come from is reuse.py's; which slot, schedule.py's): a slot keeps the cells of its
last chat when that chat ends, and a chat's next turn (or the same request again) takes the slot that holds its
prompt's beginning, also when its oldest turns were dropped to fit the window: those are cut out of its cells and
the rest shifted down (`context_shift`). Any other chat takes an empty slot if there is one, else one holding a
finished chat, whose cells then go to host RAM (`cache_mb`, least recently used out first) so that it reads nothing
again when it comes back; among those slots, first one that keeps the running chats' sequence ids consecutive
(llama.cpp makes a pass over the weights per run of consecutive ids in a step: see schedule.runs()), then the least
recently used. The prompt's beginning is then taken from wherever most of it is: host RAM (this chat, back), or
another slot sharing a long enough beginning (a long system prompt: `llama_memory_seq_cp` across streams copies the
whole buffer). A stopped chat's cells are freed at once.

The engine knows token ids and sampling, never prompt formats: see prompt.py for those, and local.py for the glue.
Its decisions (which slot, what the next step holds) are schedule.py's pure functions. What a caller submits and
reads back is a Request (request.py); LLAMA_THREAD (llama_thread.py) steps the engine.
"""

from __future__ import annotations

import codecs
import random
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import Busy, ConfigError
from .llama_thread import LLAMA_THREAD, quiet_llama_log
from .request import _END, PENALTY_LAST_N, Request, Sampling
from .reuse import HostCache, Saved, common_prefix, dropped_span
from .schedule import SHIFT_MIN_TOKENS, Slot, choose_slot, plan_step
from .vocab import Vocab

KV_TYPES = {"f16": (1, 2.0), "q8_0": (8, 34 / 32)}  # name -> (ggml type, bytes per element)
# Copying another chat's stream to reuse the beginning of a prompt copies the whole stream (n_ctx cells): worth it
# only for a shared beginning this long (estimate: a 1.5 GB stream of Phi-3.5-mini at 4096 cells copies in about the
# time its prompt processing takes for 16 tokens on 2 cores).
COPY_MIN_TOKENS = 16
# Chats that arrive together start together: an idle engine waits this long after each arrival for another one
# before its first step (at most GATHER_MAX_S), so that a burst's prompts go in one batch. Without it the first chat's
# prompt goes alone and the others' follow in chunks beside its answer: measured 2026-11-30 with four HTTP chats on
# Phi-3.5-mini shape (2 cores), their first tokens spread from 4.1 to 5.9 s; gathered, all four came at once. A lone
# visitor pays GATHER_S once, against seconds of prompt.
GATHER_S, GATHER_MAX_S = 0.03, 0.25
# A slot's finished chat goes to host RAM before another chat takes the slot when at least this many of its cells would
# otherwise be lost: the same bar as for restoring them (copying a stream costs ~0.1 s per 300 MB on these cores).
SAVE_MIN_TOKENS = COPY_MIN_TOKENS
PROMPT_SPEED_MIN_TOKENS = 16  # steps with fewer prompt tokens say little about the prompt speed


@dataclass(frozen=True)
class EngineSettings:
    """How an engine runs; each default is the one the Space uses (app.py reads the environment into these)."""

    n_ctx: int = 4096  # tokens per chat: prompt + answer
    # 4 chats in one llama_decode per step: 1.5x the tokens/s of one chat on 2 cores (docs/performance.md), and every
    # visitor streams at once instead of waiting for the answers ahead.
    parallel: int = 4
    n_threads: int = 1  # decode threads (app.py: every core; docs/performance.md "Threads")
    n_threads_batch: int = 1  # prompt threads
    n_batch: int = 512
    # A KV_TYPES key. q8_0 halves the KV cache (Phi-3.5-mini: 3.4 GB for four 4096-token chats, f16 6.4 GB) so that
    # two Phi-3-class models fit the Space's 16 GB side by side; measured against f16 (tests/benchmarks/
    # bench_kv_type.py, 2 cores): perplexity within 0.1% (SmolLM2), prompt reading 0.8-0.9x, decode no slower.
    kv_type: str = "q8_0"
    prefill_chunk: int = 64  # prompt tokens per step while other chats are answering
    # Host RAM for finished chats' cells (MiB, per model; 0: off): ~7,700 tokens of Phi-3.5-mini in q8_0. Two
    # Phi-3-class Q4 models then take 2 x (2.4 GB file + 3.4 GB KV + 1.6 GB) = 14.8 GB of MODELS_RAM_MB's 15 GB.
    cache_mb: int = 1536
    context_shift: bool = True  # a long chat's dropped turns are cut out of its cells instead of re-reading the rest


def kv_bytes_per_token(model, kv_type: str) -> int:
    """K and V of one token in every layer (llama_model pointer)."""
    import llama_cpp

    n_embd_kv = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    n_embd_kv *= llama_cpp.llama_model_n_head_kv(model)
    return int(2 * llama_cpp.llama_model_n_layer(model) * n_embd_kv * KV_TYPES[kv_type][1])


def kv_bytes_for(source: str | Path | dict, settings: EngineSettings) -> int:
    """The KV cache an engine with `settings` allocates for a GGUF file, from its header (before loading it; a
    vocab-only load has no per-layer shape, so the GGUF keys are read, as kv_bytes_per_token counts). `source`: the
    file's path, or its keys when they were read already. KeyError for a file without them."""
    from .vocab import Vocab

    meta = source if isinstance(source, dict) else Vocab.load(source).metadata
    arch = meta["general.architecture"]
    n_layer, n_embd = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.embedding_length"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    per_token = 2 * n_layer * (n_embd // n_head) * n_head_kv * KV_TYPES[settings.kv_type][1]
    return int(per_token) * settings.n_ctx * settings.parallel


class Engine:
    """One model, one context, `parallel` slots; stepped by LLAMA_THREAD."""

    def __init__(self, path: str | Path, settings: EngineSettings | None = None, *, kv_cells: int | None = None,
                 **overrides):
        """`settings` (default: EngineSettings()), with any of its fields overridden by keyword (tests, benchmarks).
        `kv_cells`: fewer cells than `n_ctx * parallel`, to test a cache that fills up."""
        s = replace(settings or EngineSettings(), **overrides)
        if s.kv_type not in KV_TYPES:
            raise ConfigError(f"KV_CACHE_TYPE={s.kv_type!r} is unknown; use one of {', '.join(KV_TYPES)}.")
        self.path, self.settings = Path(path), s
        self.n_ctx, self.parallel, self.n_batch = s.n_ctx, s.parallel, s.n_batch
        self.prefill_chunk = max(1, min(s.prefill_chunk, s.n_batch))
        self.kv_cells = kv_cells or s.n_ctx * s.parallel  # each chat may fill its n_ctx while all others do too
        self.ctx_per_chat = min(s.n_ctx, self.kv_cells // s.parallel)  # one stream's cells
        self.slots = [Slot(seq) for seq in range(s.parallel)]
        self.host = HostCache(s.cache_mb << 20)  # finished chats' cells, evicted from their slots
        self.prompt_tps: float | None = None  # prompt tokens per second, as measured in this process (for progress)
        self.waiting: list[Request] = []  # submitted, not yet in a slot
        self.incoming: list[Request] = []
        self.admissions = 0
        self.steps = 0  # llama_decode calls, for tests and benchmarks
        self.saves = self.restores = self.shifts = 0  # chats' cells to host RAM and back; cuts of dropped turns
        self.trace: deque[tuple[int, int]] = deque(maxlen=4096)  # (tokens answering, prompt tokens) of recent steps
        # Text and ends for the chats' streams, handed over just before the next llama_decode: see _hand_over.
        self.outbox: list[tuple[Request, object]] = []
        self.model = self.ctx = self.batch = self.vocab = None
        self.kv_bytes = 0

    # -- life cycle ------------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the model and create the context in the llama.cpp thread, which then steps this engine with the others
        it serves; returns once loaded (ConfigError if it cannot load)."""
        LLAMA_THREAD.call(self._load)
        with LLAMA_THREAD.cond:
            LLAMA_THREAD.engines.append(self)
        return self

    def close(self) -> None:
        """End what is running (with a notice), free the context and the weights."""
        with LLAMA_THREAD.cond:
            if self not in LLAMA_THREAD.engines:
                return
            LLAMA_THREAD.engines.remove(self)
        LLAMA_THREAD.call(self._free)

    def wake(self) -> None:
        LLAMA_THREAD.wake()

    def submit(self, request: Request) -> Request:
        request.engine = self
        with LLAMA_THREAD.cond:
            if self not in LLAMA_THREAD.engines:
                raise Busy("The model is being switched; please send your message again.")
            self.incoming.append(request)
            LLAMA_THREAD.cond.notify_all()
        return request

    def _load(self) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        quiet_llama_log()
        try:
            self.model = LlamaModel(path_model=str(self.path), params=llama_cpp.llama_model_default_params(),
                                    verbose=False)
        except (ValueError, RuntimeError, OSError) as err:
            raise ConfigError(f"{self.path.name} could not be loaded by llama.cpp (truncated or damaged?): {err}")
        self.vocab = Vocab(self.model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.kv_cells
        params.n_seq_max = self.parallel
        params.kv_unified = False  # a stream per chat: see the module docstring
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads, params.n_threads_batch = self.settings.n_threads, self.settings.n_threads_batch
        # Fused attention on the CPU too: +7% decode on the full-size model here; a quantized V cache needs it.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = KV_TYPES[self.settings.kv_type][0]
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            self.model.close()
            raise ConfigError(f"llama.cpp could not create a context of {self.kv_cells} tokens for {self.path.name}: "
                              "lower N_CTX or PARALLEL.")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.kv_bytes = kv_bytes_per_token(self.model.model, self.settings.kv_type) * self.kv_cells

    def _free(self) -> None:
        import llama_cpp

        gone = "The model was unloaded; please send your message again."
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "error", gone)
        for request in self.waiting + self.incoming:
            self._end(request, "error", gone)
        self.waiting, self.incoming = [], []
        self._hand_over()
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        self.model.close()

    # -- the loop --------------------------------------------------------------------------------------------------

    def busy(self) -> bool:
        return bool(self.waiting) or any(slot.request is not None for slot in self.slots)

    def has_work(self) -> bool:  # called holding LLAMA_THREAD.cond
        return bool(self.incoming) or self.busy()

    def tick(self) -> None:
        """One round in the llama.cpp thread: take new requests, drop cancelled ones, seat waiters, decode one step."""
        with LLAMA_THREAD.cond:
            if self.incoming and not self.busy():
                self._gather()
            self.waiting += self.incoming
            self.incoming = []
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                self._finish(slot, "cancelled")
        for request in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(request)
            self._end(request, "cancelled")
        while self.waiting and any(slot.request is None for slot in self.slots):
            self._admit(self.waiting.pop(0))
        if any(slot.request is not None for slot in self.slots):
            self._step()
        if not self.busy():  # no llama_decode follows to hand the last words over
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake the chats' readers with what this thread has for them. Called just before llama_decode, which lets go of
        the GIL for the whole step: each reader (the web server's Python) wakes while llama.cpp computes, instead of
        taking the GIL back at each ctypes call this thread still has to make before it (sampling the other chats),
        where this thread then waited up to a switch interval (5 ms) each time. Measured 2026-11-30, four HTTP chats on
        the Phi-3.5-mini shape (2 cores): from the end of one llama_decode to the start of the next, median 2.4 ms
        before, 0.8 ms after (the engine alone: 0.7 ms)."""
        for request, item in self.outbox:
            request.events.put(item)
            if item is _END:
                request.done.set()
        self.outbox = []

    def _gather(self) -> None:
        """Wait (holding LLAMA_THREAD.cond) for more arrivals while they keep coming and there are free slots."""
        start, seen = time.monotonic(), len(self.incoming)
        while seen < self.parallel and time.monotonic() - start < GATHER_MAX_S:
            LLAMA_THREAD.cond.wait(GATHER_S)
            if len(self.incoming) == seen:
                return
            seen = len(self.incoming)

    def _admit(self, request: Request) -> None:
        import llama_cpp

        ids = request.ids
        if not ids or len(ids) >= self.ctx_per_chat:
            self._end(request, "error",
                      f"The prompt has {len(ids)} tokens; this model's context holds {self.ctx_per_chat}.")
            return
        slot, continued = choose_slot(self.slots, ids, self.settings.context_shift)
        keep = common_prefix(slot.cells, ids)
        # Another chat's cells (a finished one) go to host RAM before this chat overwrites them.
        if not continued and keep < len(ids) and len(slot.cells) - keep >= SAVE_MIN_TOKENS:
            self._save(slot)
        # The prompt's beginning may be longer elsewhere: in another slot (a shared system prompt; across streams
        # llama.cpp copies the donor's whole stream, the part past the shared prefix goes below) or in host RAM (this
        # chat's own cells, evicted while it was away).
        donor = max(self.slots, key=lambda s: common_prefix(s.cells, ids) if s is not slot else -1)
        saved, from_host = self.host.best(ids)
        from_donor = common_prefix(donor.cells, ids) if donor is not slot else 0
        if max(from_host, from_donor) - (continued or keep) >= COPY_MIN_TOKENS:
            if from_host >= from_donor:
                self._restore(slot, self.host.take(saved))
            else:
                llama_cpp.llama_memory_seq_cp(self.mem, donor.seq, slot.seq, -1, -1)
                slot.cells = list(donor.cells)
            keep = common_prefix(slot.cells, ids)
        # A long chat whose oldest turns were dropped to fit the window: cut them out of its cells and shift the rest
        # down, instead of reading the whole kept history again. Not bit-exact (the kept cells were computed while the
        # dropped turns were there to attend to; docs/performance.md "Context shift" has the measured cost), so it can be turned off.
        if self.settings.context_shift and keep < len(slot.cells) and (cut := dropped_span(slot.cells, ids, keep, SHIFT_MIN_TOKENS)):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, keep, cut)
            llama_cpp.llama_memory_seq_add(self.mem, slot.seq, cut, -1, keep - cut)
            slot.cells = slot.cells[:keep] + slot.cells[cut:]
            keep = common_prefix(slot.cells, ids)
            self.shifts += 1
        keep = min(keep, len(ids) - 1)  # the last prompt token is always evaluated: its logits start the answer
        if keep < len(slot.cells) and not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            keep = 0
        slot.cells = slot.cells[:keep]
        slot.request, slot.todo, slot.next_token, slot.held = request, ids[keep:], None, ""
        request.stats.to_evaluate, request.stats.read_at = len(slot.todo), time.perf_counter()
        slot.chain = self._sampler(request.sampling)
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.admissions += 1
        slot.admitted = self.admissions

    def _save(self, slot: Slot) -> None:
        """Copy a slot's cells (a finished chat) to host RAM, if the budget holds them."""
        import ctypes

        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq)
        if not self.host.fits(size):
            return
        state = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, state, size, slot.seq) == size:
            self.host.put(Saved(tuple(slot.cells), state, size))
            self.saves += 1

    def _restore(self, slot: Slot, saved: Saved) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self.ctx, saved.state, saved.size, slot.seq) == saved.size:
            slot.cells = list(saved.cells)
            self.restores += 1
        else:  # cannot happen with the same context; if it does, the prompt is simply read
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)
            slot.cells = []

    def _sampler(self, s: Sampling):
        """llama-cpp-python's chain, in its order: (logit bias,) penalties, top-k, typical, top-p, min-p, temperature,
        draw."""
        import llama_cpp as ll

        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda sampler: ll.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if s.logit_bias:
            biases = (ll.llama_logit_bias * len(s.logit_bias))(*(ll.llama_logit_bias(t, b) for t, b in s.logit_bias))
            add(ll.llama_sampler_init_logit_bias(self.vocab.n_tokens, len(biases), biases))
        add(ll.llama_sampler_init_penalties(self.vocab.n_tokens, PENALTY_LAST_N, s.repeat_penalty,
                                            s.frequency_penalty, s.presence_penalty))
        if s.temperature <= 0:
            add(ll.llama_sampler_init_greedy())
            return chain
        add(ll.llama_sampler_init_top_k(s.top_k))
        add(ll.llama_sampler_init_typical(s.typical_p, 1))
        add(ll.llama_sampler_init_top_p(s.top_p, 1))
        add(ll.llama_sampler_init_min_p(s.min_p, 1))
        add(ll.llama_sampler_init_temp(s.temperature))
        add(ll.llama_sampler_init_dist(s.seed if s.seed >= 0 else random.getrandbits(32)))
        return chain

    def _step(self) -> None:
        import llama_cpp

        batch, n = self.batch, 0
        rows: dict[int, Slot] = {}  # logits row -> slot
        evaluated = plan_step(self.slots, self.n_batch, self.prefill_chunk)  # (slot, its tokens, logits of the last)
        for slot, tokens, logits_last in evaluated:
            for j, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, len(slot.cells) + j, 1
                batch.seq_id[n][0] = slot.seq
                batch.logits[n] = logits_last and j == len(tokens) - 1
                if batch.logits[n]:
                    rows[n] = slot
                n += 1
        batch.n_tokens = n
        self._hand_over()
        start = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, batch)
        now = time.perf_counter()
        self.steps += 1
        answering = sum(1 for slot, _, _ in evaluated if slot.next_token is not None)
        if rc == 0 and n - answering >= PROMPT_SPEED_MIN_TOKENS:
            rate = (n - answering) / max(now - start, 1e-6)
            self.prompt_tps = rate if self.prompt_tps is None else 0.7 * self.prompt_tps + 0.3 * rate
        self.trace.append((answering, n - answering))
        if rc != 0:
            for slot, _, _ in evaluated:  # whatever part of the batch did land is not ours to keep
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, len(slot.cells), -1)
            self._no_room(evaluated) if rc == 1 else self._failed(evaluated, rc)
            return
        for slot, tokens, _ in evaluated:
            slot.cells += tokens
            if slot.next_token is not None:  # a slot that is answering evaluates its last sampled token, nothing else
                slot.next_token = None
            else:
                del slot.todo[: len(tokens)]
                slot.request.stats.evaluated += len(tokens)
                slot.request.stats.read_at = now
                if not slot.todo and slot.request.max_tokens == 0:
                    self._finish(slot, "length")
        for row, slot in rows.items():
            if slot.request.logits is not None:
                import numpy as np

                logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
                slot.request.logits.append(np.ctypeslib.as_array(logits, shape=(self.vocab.n_tokens,)).copy())
            self._sampled(slot, llama_cpp.llama_sampler_sample(slot.chain, self.ctx, row))

    def _no_room(self, evaluated) -> None:
        """llama.cpp found no free cells for the step (its streams should make that impossible): end the newest chat
        in it with a notice, and go on with the others."""
        newest = max((slot for slot, _, _ in evaluated), key=lambda s: s.admitted)
        self._finish(newest, "error", "The model's memory is full right now; please try again in a minute.")

    def _failed(self, evaluated, rc: int) -> None:
        for slot, _, _ in evaluated:
            if slot.request is not None:
                self._finish(slot, "error", f"llama.cpp could not compute this answer (llama_decode returned {rc}).")

    def _sampled(self, slot: Slot, token: int) -> None:
        request, stats = slot.request, slot.request.stats
        now = time.perf_counter()
        if stats.first_token_at is None:
            stats.first_token_at = now
        if self.vocab.is_eog(token):
            self._finish(slot, "stop")
            return
        stats.tokens.append(token)
        if self._emit(slot, slot.decoder.decode(self.vocab.piece(token))):
            self._finish(slot, "stop")
        elif len(stats.tokens) >= request.max_tokens or len(slot.cells) >= self.ctx_per_chat:
            self._finish(slot, "length")  # this last token was sampled and streamed, never evaluated
        else:
            slot.next_token = token

    def _emit(self, slot: Slot, text: str) -> bool:
        """Stream `text`, holding back what could be the start of a stop string; True when a stop string ended it."""
        request = slot.request
        slot.held += text
        out, stopped = slot.held, False
        hits = [i for i in (slot.held.find(s) for s in request.stop) if i >= 0]
        if hits:
            out, stopped = slot.held[: min(hits)], True
        else:
            hold = max((k for s in request.stop for k in range(1, len(s)) if slot.held.endswith(s[:k])), default=0)
            out = slot.held[: len(slot.held) - hold]
        slot.held = slot.held[len(out):] if not stopped else ""
        if out:
            request.text += out
            self.outbox.append((request, out))
        return stopped

    def _finish(self, slot: Slot, reason: str, error: str | None = None) -> None:
        import llama_cpp

        request = slot.request
        if reason in ("length", "stop") and slot.held:  # it ended inside what looked like a stop string: it was not one
            request.text += slot.held
            self.outbox.append((request, slot.held))
        if reason in ("cancelled", "error"):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq, -1, -1)  # Stop frees the chat's cells at once
            slot.cells = []
        llama_cpp.llama_sampler_free(slot.chain)
        slot.chain = slot.decoder = slot.request = slot.next_token = None
        slot.todo, slot.held, slot.used_at = [], "", time.perf_counter()
        self._end(request, reason, error)

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        request.stats.reason = reason
        request.stats.finished_at = time.perf_counter()
        request.error = error
        self.outbox.append((request, _END))
