"""ggufchat: the serving engine behind the chat Space (app.py), shared with the build (build/).

Each module owns one thing and says so at its top:

- errors       the exceptions whose message a visitor reads as a one-line notice
- cpu_backend  registers llama.cpp's fastest CPU variant proven to run on this machine (cached verdict)
- cpu_probe    the child process that proves it: a real K-quant product; a trap kills the child, not the Space
- files        model files: Hub downloads through the HF cache, local paths, integrity checks
- vocab        a model's vocabulary through llama.cpp (tokenize, spell tokens, special tokens)
- prompt       prompt formats, the injection-proof prompt tokenizer, history fitting
- turns        one chat turn, and the contract both backends meet (Store, Waiting, Reading, Done, answer)
- line         the waiting line: seats at the engines, first come first served per model
- local        the model store of this process (several models within a memory budget) and the llama-cpp-agent
               provider that feeds the engine
- remote       the same for a llama-server at BACKEND_URL: HTTP client, tokenizer over /tokenize, provider
- request      one answer as the engine's caller sees it: sampling settings, streamed text, stats
- schedule     the engine's decisions as pure functions: which slot a chat takes, what the next step decodes
- reuse        where a prompt's cells can come from: a slot, a cut of dropped turns, host RAM
- engine       several chats decoded together in one llama.cpp context
- llama_thread the one thread that runs llama.cpp in this process, and llama.cpp's log filter
- feedback     Like/Dislike rows and side-by-side votes, pushed to a Hub dataset
- arena        the blind side-by-side mode: rounds of two models' answers, votes that count once
- votes        the votes' tally: win rate with a bootstrap interval (the build's judged comparison uses it too)

One request, module by module (the local backend):

1. app.respond checks and clamps the visitor's input and calls `store.turn(...)` (turns.Store.turn).
2. turns.Store.turn takes a seat in the waiting line (line.WaitingLine; yields Waiting while it waits), then
   `store.get(label)` gives the loaded model (local.ModelStore: loads and verifies model files, files.py; keeps as
   many loaded as MODELS_RAM_MB holds, unloading the least recently used idle one).
3. turns.answer fits the history to the window (prompt.fit_history: the oldest turns go, the system message stays)
   and tokenizes it once (prompt.PromptTokenizer: message text can never become a control token).
4. llama-cpp-agent's LlamaCppAgent formats the same conversation and calls the provider (local.EngineProvider), which
   checks that it is the prompt that was fitted and submits its ids as a request.Request to the engine.
5. The llama.cpp thread (llama_thread.py) steps engine.Engine: schedule.choose_slot seats the request in a slot
   whose cells hold the longest beginning of its prompt (reuse.py: its own slot, a shift of dropped turns, host RAM,
   another slot), schedule.plan_step puts its prompt chunks and every answering chat's next token in one
   llama_decode, and each sampled token's text goes to the request's stream.
6. The provider streams that text back through the agent; turns.answer yields Reading (progress while a long prompt
   is read), the text so far, then Done; app.respond turns each into what the chat shows. Stop or a closed tab closes
   the generators: the request is cancelled at the engine's next step and the seat is given back.

With BACKEND_URL, steps 2-6 run the same way with remote.RemoteStore and remote.ServerProvider, and llama-server
does what the engine does.

Nothing here imports Gradio or app.py: the Space imports this package, never the other way round.
"""
