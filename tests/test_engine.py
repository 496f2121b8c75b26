"""The engine: several chats in one llama.cpp context, each as if it were alone.

Real llama.cpp on the real SmolLM2-135M-Instruct GGUF; chats are submitted from several threads as the web server
does. What is checked: no cross-talk between chats decoded in one batch, Stop of one chat among four, chunked
prefill bounding how long running chats wait, prefix reuse per chat and across chats, a full KV cache ending in
a notice rather than a failed llama_decode, decoding going on while the web server handles an update (through the
app's path, on SmolLM2 loaded as the app loads it), and max_tokens held on an answer of partial UTF-8 characters.
"""

from __future__ import annotations

import threading

import pytest

from ggufchat.prompt import PromptTokenizer
from ggufchat.engine import COPY_MIN_TOKENS, Engine
from ggufchat.reuse import common_prefix
from ggufchat.request import EngineError, Request, Sampling
from ggufchat.turns import Done, answer
from helpers import SYSTEM

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0)
KL_TOL = 0.05  # measured: at most 0.018 between a chat alone and in a batch of four
NEAR_TIE = 2.0  # logits: the largest batched-vs-alone difference measured was 1.46
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
           "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    engine = Engine(smollm2_gguf, n_ctx=512, parallel=4, n_threads=1, n_threads_batch=1, prefill_chunk=16).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def chatml(engine):
    """Prompt ids for a one-message ChatML chat (SmolLM2's format)."""
    tokenize = PromptTokenizer(engine.vocab)
    return lambda message: tokenize(f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                    f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")


def forget(engine):
    """Start from an empty cache, so a test's prefix reuse is its own."""
    import llama_cpp

    for slot in engine.slots:
        assert slot.request is None
        llama_cpp.llama_memory_seq_rm(engine.mem, slot.seq, -1, -1)
        slot.cells = []


def run_alone(engine, ids, max_tokens=24, sampling=GREEDY) -> Request:
    request = engine.submit(Request(ids, max_tokens, sampling))
    "".join(request.stream())
    return request


def run_together(engine, prompts=(), max_tokens=24, sampling=GREEDY, requests=None) -> list[Request]:
    """Submit every prompt (or request) at once, from threads like concurrent visitors, and read them all."""
    requests = requests or [Request(ids, max_tokens, sampling) for ids in prompts]
    start = threading.Barrier(len(requests))

    def visitor(request):
        start.wait()
        engine.submit(request)
        try:
            "".join(request.stream())
        except EngineError as err:  # what the backend turns into a notice
            request.raised = err

    threads = [threading.Thread(target=visitor, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r.done.is_set() for r in requests)
    return requests


def kl(a, b) -> float:
    """KL divergence between the next-token distributions of two logits rows."""
    import numpy as np

    pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
    pa, pb = pa / pa.sum(), pb / pb.sum()
    return float((pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30))).sum())


def test_chats_decoded_together_answer_as_they_do_alone(engine, chatml):
    """No cross-talk: decoded in one batch of four, each chat gets the next-token distribution it gets alone.

    Not bit for bit, we found: with three or more chats in a batch, llama.cpp's CPU kernels add in another order, and
    the Q4_1 model quantizes its activations to 8 bits, so a rounding that flips moves a logit by up to ~1.5 (of a
    ~40 range). Greedy answers then agree until a near-tie (one of four parted after 10 tokens here). So the check:
    same tokens up to where a chat's answers part, distributions within KL_TOL up to there, and at the parting the
    batched choice was a near-tie alone. Reading another chat's cells is another matter: its distribution is KL 2 to
    16 away (checked last)."""
    prompts = [chatml(p) for p in PROMPTS]
    alone = []
    for ids in prompts:
        forget(engine)
        request = engine.submit(Request(ids, 24, GREEDY, record_logits=True))
        "".join(request.stream())
        alone.append(request)
    forget(engine)
    steps = engine.steps
    together = run_together(engine, requests=[Request(ids, 24, GREEDY, record_logits=True) for ids in prompts])
    assert max(a for a, _ in list(engine.trace)[steps - engine.steps:]) == 4  # they really were decoded together
    assert engine.steps - steps < sum(len(r.stats.tokens) for r in alone) * 3 // 4
    identical = 0
    for a, b in zip(alone, together):
        ta, tb = a.stats.tokens, b.stats.tokens
        same = common_prefix(ta, tb)
        identical += ta == tb
        assert b.text.strip()
        for i in range(min(same + 1, len(a.logits), len(b.logits))):
            assert kl(a.logits[i], b.logits[i]) < KL_TOL, i
        if same < min(len(ta), len(tb)):  # they parted on a near-tie
            assert a.logits[same][ta[same]] - a.logits[same][tb[same]] < NEAR_TIE
    assert identical >= 2
    # The tolerance tells chats apart: two different chats' next-token distributions are far beyond it.
    assert kl(alone[0].logits[0], alone[1].logits[0]) > 20 * KL_TOL


def test_stopping_one_of_four_chats_ends_it_within_a_step_and_frees_its_cells(engine, chatml):
    forget(engine)
    requests = [Request(chatml(f"Write a long story about {thing}."), 200, Sampling(seed=i))
                for i, thing in enumerate(["a dragon", "a lighthouse", "a robot", "a garden"])]
    for r in requests:
        engine.submit(r)
    victim = requests[1]
    stream = victim.stream()
    while len(victim.stats.tokens) < 5:
        next(stream)
    slot = next(s for s in engine.slots if s.request is victim)
    before = engine.steps
    stream.close()  # the Stop button
    assert victim.done.wait(30)
    assert engine.steps - before <= 1
    assert victim.stats.reason == "cancelled" and slot.cells == [] and slot.request is not victim
    others = [r for r in requests if r is not victim]
    for r in others:
        "".join(r.stream())
        assert r.stats.reason in ("stop", "length") and r.error is None
    assert any(len(r.stats.tokens) == 200 for r in others)  # they went on long after the Stop


def test_readers_are_woken_just_before_llama_decode_not_between_the_chats_sampling(engine, chatml, monkeypatch):
    """A step's text reaches the chats' queues in one hand-over right before the next llama_decode (which lets go of
    the GIL for the whole step), never between two chats' sampling calls: a reader woken there takes the GIL at each
    ctypes call the engine still has to make. Counted at the entry of each of those calls, in the llama.cpp thread."""
    import llama_cpp

    forget(engine)
    requests = [Request(chatml(p), 12, GREEDY) for p in PROMPTS]
    queued = lambda: sum(r.events.qsize() for r in requests)  # noqa: E731 - nobody reads until the end
    seen: list[tuple[str, int]] = []
    real_decode, real_sample = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample

    def decode(ctx, batch):
        seen.append(("decode", queued()))
        return real_decode(ctx, batch)

    def sample(chain, ctx, row):
        seen.append(("sample", queued()))
        return real_sample(chain, ctx, row)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    monkeypatch.setattr(llama_cpp, "llama_sampler_sample", sample)
    for r in requests:
        engine.submit(r)
    assert all(r.done.wait(120) for r in requests)
    monkeypatch.undo()
    assert sum(kind == "sample" for kind, _ in seen) > 2 * len(requests)
    at_decode = 0
    for kind, count in seen:
        if kind == "decode":
            assert count >= at_decode  # the readers have not read yet: the queues only grow
            at_decode = count
        else:
            assert count == at_decode, seen  # nothing handed over since the last llama_decode
    # and the last words (after the last step) were handed over too: every answer is whole
    for r in requests:
        assert "".join(r.stream()) == r.text and r.text.strip()


def endless(engine, seed=1) -> Sampling:
    """Sampling that never picks an end-of-generation token: an answer that runs to its max tokens."""
    eog = [t for t in range(engine.vocab.n_tokens) if engine.vocab.is_eog(t)]
    return Sampling(seed=seed, logit_bias=tuple((t, -1e9) for t in eog))


@pytest.fixture
def passes(monkeypatch):
    """Count llama.cpp's passes over the weights (micro-batches) in each llama_decode of engines created meanwhile.

    A ggml eval callback on the context asks to see layer 0's first node, which every pass computes once: yields
    a list that gets (the sequence ids in the batch, passes) per llama_decode."""
    import ctypes

    import llama_cpp
    from llama_cpp._ggml import libggml

    libggml.ggml_get_name.restype, libggml.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    count = [0]

    @llama_cpp.ggml_backend_sched_eval_callback
    def seen(tensor, ask, _user_data):
        if libggml.ggml_get_name(tensor) != b"attn_norm-0":
            return False
        count[0] += not ask
        return True

    real_init, real_decode, log = llama_cpp.llama_init_from_model, llama_cpp.llama_decode, []

    def init(model, params):
        params.cb_eval = seen
        return real_init(model, params)

    def decode(ctx, batch):
        before = count[0]
        rc = real_decode(ctx, batch)
        log.append(([batch.seq_id[i][0] for i in range(batch.n_tokens)], count[0] - before))
        return rc

    monkeypatch.setattr(llama_cpp, "llama_init_from_model", init)
    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    yield log


def test_chats_running_at_once_sit_in_consecutive_sequences_so_each_step_is_one_pass(smollm2_gguf, chatml, passes):
    """With a KV stream per chat, llama.cpp makes one pass over the weights per run of consecutive sequence ids in a
    step (taken in the batch's order). New chats take slots next to the running ones: here, after a chat alone and
    four together, then another alone, four more used to land in sequences 6, 7, 0 and 1 (two passes a step; on
    Phi-3.5-mini's shape, four chats so seated decoded at 10.0 tokens/s against 13.8 side by side); now 4 to 7, one
    pass."""
    engine = Engine(smollm2_gguf, n_ctx=256, parallel=8, n_threads=1, n_threads_batch=1).start()
    try:
        fresh = iter(range(100))
        ask = lambda: chatml(f"{PROMPTS[0]} ({next(fresh)})")  # noqa: E731 - nothing to reuse but the system prompt
        run_alone(engine, ask(), 4)
        run_together(engine, [ask() for _ in range(4)], 4)
        run_alone(engine, ask(), 4)
        assert sum(bool(slot.cells) for slot in engine.slots) == 6  # two slots empty, six hold finished chats
        del passes[:]
        requests = run_together(engine, requests=[Request(ask(), 12, endless(engine)) for _ in range(4)])
        seqs = sorted({seq for batch, _ in passes for seq in batch})
        assert len(seqs) == 4 and seqs == list(range(seqs[0], seqs[0] + 4)), seqs
        four = [n for batch, n in passes if sorted(batch) == seqs]  # the steps where all four answer
        assert len(four) >= 5 and set(four) == {1}, four
        assert all(len(r.stats.tokens) == 12 for r in requests)
    finally:
        engine.close()


def test_a_prompt_chunk_beside_running_chats_goes_in_sequence_order(smollm2_gguf, chatml, passes):
    """A step holding tokens of sequences 0, 2, 3 and a prompt chunk of 1 is written in sequence order: one pass with
    a token of each, one for the rest of the chunk (three if the chunk came last: 0-1, 2-3, then the rest)."""
    engine = Engine(smollm2_gguf, n_ctx=512, parallel=4, n_threads=1, n_threads_batch=1, prefill_chunk=16).start()
    try:
        running = [Request(chatml(f"{p} (r)"), 2 if i == 1 else 40, endless(engine)) for i, p in enumerate(PROMPTS)]
        for request in running:
            engine.submit(request)
        assert running[1].done.wait(60)
        del passes[:]
        newcomer = engine.submit(Request(chatml("Summarise this: " + "A cat sat on a mat. " * 12), 4, GREEDY))
        for request in running + [newcomer]:
            "".join(request.stream())
        beside = [(batch, n) for batch, n in passes if len(set(batch)) == 4 and len(batch) > 4]
        assert len(beside) >= 2 and all(batch == sorted(batch) and n == 2 for batch, n in beside), beside
    finally:
        engine.close()


def test_a_long_prompt_arriving_does_not_stall_running_chats_beyond_a_chunk(engine, chatml):
    forget(engine)
    start = engine.steps
    running = engine.submit(Request(chatml("Count from one to one hundred in words."), 120, endless(engine)))
    stream = running.stream()
    while len(running.stats.tokens) < 3:
        next(stream)
    long_prompt = chatml("Summarise this: " + "The quick brown fox jumps over the lazy dog. " * 40)
    assert len(long_prompt) > 5 * engine.prefill_chunk
    newcomer = engine.submit(Request(long_prompt, 4, GREEDY))
    assert newcomer.done.wait(120)
    "".join(stream)
    steps = list(engine.trace)[start - engine.steps:]
    shared = common_prefix(long_prompt, running.ids)  # the system prompt: copied from the running chat if long enough
    copied = shared if shared >= COPY_MIN_TOKENS else 0
    assert len(running.stats.tokens) == 120 and newcomer.stats.evaluated == len(long_prompt) - copied > 0
    # The newcomer's prompt went in chunks, each beside a token of the running chat: it never waited a whole prompt.
    prefill_steps = [p for a, p in steps if p > 0 and a > 0]
    assert sum(prefill_steps) == newcomer.stats.evaluated
    assert max(prefill_steps) <= engine.prefill_chunk
    # ... and the running chat got a token at every step meanwhile.
    assert all(a == 1 for a, p in steps if p > 0 and a > 0)


def test_chats_arriving_together_at_an_idle_engine_start_in_one_batch(engine, chatml):
    """Four visitors a few ms apart (as a web server hands them over): their prompts go in the first step together,
    not the first alone and the others in chunks beside its answer."""
    import time

    forget(engine)
    requests = [Request(chatml(f"{p} ({time.time()})"), 4, GREEDY) for p in PROMPTS]
    steps = engine.steps

    def arrive(i):
        time.sleep(0.005 * i)
        engine.submit(requests[i])

    threads = [threading.Thread(target=arrive, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for request in requests:
        "".join(request.stream())
    trace = list(engine.trace)[-(engine.steps - steps):]
    assert trace[0] == (0, sum(len(r.ids) for r in requests))  # (tokens answering, prompt tokens) per step
    assert trace[1] == (4, 0)  # then all four answer together


def test_each_chat_finds_its_own_cells_on_its_next_turn_and_a_long_system_prompt_is_shared(engine):
    forget(engine)
    tokenize = PromptTokenizer(engine.vocab)
    system = "You are a helpful assistant. Answer in plain English, briefly and kindly, and say so when unsure."

    def prompt(message):
        return tokenize(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{message}<|im_end|>\n"
                        f"<|im_start|>assistant\n")

    prompts = [prompt(p) for p in PROMPTS]
    first = [run_alone(engine, prompts[0])]
    assert first[0].stats.evaluated == len(prompts[0])  # a cold cache
    # The others start with the same system prompt: they copy it from the first chat's stream, not evaluate it anew.
    first += run_together(engine, prompts[1:])
    for r in first[1:]:
        shared = common_prefix(r.ids, prompts[0])
        assert shared >= COPY_MIN_TOKENS and r.stats.evaluated == len(r.ids) - shared
    # Each chat's second turn, all four at once, evaluates only what is new: the next message and the template.
    tail = tokenize("<|im_end|>\n<|im_start|>user\nAnd why?<|im_end|>\n<|im_start|>assistant\n")
    second = run_together(engine, [r.ids + r.stats.tokens + tail for r in first])
    for r1, r2 in zip(first, second):
        cut = r1.stats.reason == "length"  # its last token was sampled, never evaluated: it is evaluated now
        assert r2.stats.evaluated == len(tail) + cut, (r1.stats.reason, r2.stats.evaluated, len(tail))


def test_a_short_shared_beginning_is_evaluated_rather_than_copied(engine, chatml):
    """Copying another chat's stream copies all of it: not worth it for a few tokens (COPY_MIN_TOKENS)."""
    forget(engine)
    a, b = chatml("Hi"), chatml("Hello")
    run_alone(engine, a, max_tokens=2)
    shared = common_prefix(a, b)
    assert 0 < shared < COPY_MIN_TOKENS
    request = run_together(engine, [b], max_tokens=2)[0]
    assert request.stats.evaluated == len(b)


def test_a_chat_stops_at_the_end_of_its_cells_and_never_takes_anothers(smollm2_gguf, chatml):
    """More demand than cells: a cache of 160 cells for four chats is 40 per chat. Each answer stops when its own
    cells are full (a clean end, as at max tokens), the others are untouched, llama_decode never fails, and a prompt
    that alone would not fit gets a notice."""
    small = Engine(smollm2_gguf, n_ctx=128, parallel=4, n_threads=1, n_threads_batch=1, kv_cells=160).start()
    try:
        assert small.ctx_per_chat == 40
        requests = run_together(small, [chatml(p) for p in PROMPTS], max_tokens=96, sampling=endless(small))
        for r in requests:
            assert r.error is None and r.stats.reason == "length"
            assert len(r.ids) + len(r.stats.tokens) - 1 == 40  # its stream filled to the last cell, no further
        too_long = small.submit(Request(chatml("word " * 40), 8, GREEDY))
        with pytest.raises(EngineError, match="this model's context holds 40"):
            "".join(too_long.stream())
    finally:
        small.close()


def test_a_q8_0_kv_cache_takes_about_half_the_memory_and_still_answers(smollm2_gguf, chatml):
    """KV_CACHE_TYPE=q8_0: 34 bytes per 32 values against f16's 64, for the same cells."""
    small = Engine(smollm2_gguf, n_ctx=512, parallel=2, kv_type="q8_0").start()
    try:
        request = run_alone(small, chatml(PROMPTS[0]))
        assert request.error is None and request.text.strip()
        full = Engine(smollm2_gguf, n_ctx=512, parallel=2, kv_type="f16").start()
        assert small.kv_bytes / full.kv_bytes == pytest.approx(34 / 64, rel=1e-3)
        full.close()
    finally:
        small.close()


def settled(engine) -> int:
    """The engine's step count once it stops moving (nothing left to decode)."""
    import time

    while True:
        n = engine.steps
        time.sleep(0.5)
        if engine.steps == n:
            return n


def test_llama_cpp_decodes_on_while_the_web_server_handles_an_update(smollm2):
    """Gradio spends a few ms on each update between two calls to the generator; llama.cpp must not wait for it.
    Here the consumer stops pulling after the first update: llama.cpp finishes the answer anyway, and the next update
    brings all the rest at once. Closing the generator early ends the answer and frees its cells."""
    store, settings = smollm2
    model = store.get("model")
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 40, "repeat_penalty": 1.0}
    stream = answer(model, SYSTEM, [], "Tell me a long story about a dragon.", 48, sampling, 0)
    first = next(stream)
    decoded = settled(model.engine)
    rest = list(stream)
    assert model.engine.steps == decoded  # nothing was left to decode once we pulled again
    assert len(rest) == 2 and rest[0].startswith(first) and len(rest[0]) > len(first)  # all the remaining text
    assert isinstance(rest[1], Done) and rest[1].generated == 48

    stopped = answer(model, SYSTEM, [], "Count to one hundred.", 200, sampling, 0)
    next(stopped)
    stopped.close()  # like the Stop button: returns once the engine has ended the answer
    at_close = model.engine.steps
    assert settled(model.engine) == at_close
    assert model.engine.slots[0].cells == [] and model.engine.slots[0].request is None
    *_, done = answer(model, SYSTEM, [], "Hi", 4, sampling, 0)
    assert isinstance(done, Done) and done.generated >= 1


def test_an_answer_of_partial_utf8_characters_stops_at_max_tokens_and_inside_the_context(smollm2_gguf):
    """llama-cpp-python 0.3.36 checks max_tokens only after a token that ends a UTF-8 character: SmolLM2, answering
    the message "\\x80" at temperature 0 with lead bytes only, ran past max_tokens and off the end of the context
    (llama_decode returned 1). The engine counts every token. Here a logit bias forces lead bytes."""
    engine = Engine(smollm2_gguf, n_ctx=256, parallel=1).start()
    try:
        vocab = engine.vocab
        lead_byte = next(t for t in range(vocab.n_tokens) if vocab.piece(t) == b"\xf0")  # never completed
        prompt = PromptTokenizer(vocab)("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        forced = Sampling(temperature=0.1, logit_bias=((lead_byte, 100.0),))
        for max_tokens in (5, 256 - len(prompt)):
            request = engine.submit(Request(prompt, max_tokens, forced))
            text = "".join(request.stream())
            assert request.stats.tokens == [lead_byte] * max_tokens and request.stats.reason == "length"
            assert set(text) <= {"\ufffd"}  # lone lead bytes stream as replacement characters, never raw bytes
            # The last token was sampled, not evaluated: the context is filled to its last cell and no further.
            assert len(engine.slots[0].cells) == len(prompt) + max_tokens - 1 <= 256
    finally:
        engine.close()
